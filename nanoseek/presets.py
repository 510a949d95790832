"""Named model configurations: the published DeepSeek models (their parameter counts are tested on the meta
device) and the small ones that train on a laptop CPU. Plain data, read by `ModelConfig.from_preset`; layer kinds
are transformers' `layer_types` strings (nanoseek.config.SLIDING / CSA / HCA)."""

from __future__ import annotations

from typing import Any

_YARN_V3 = {
    "type": "yarn",
    "factor": 40.0,
    "original_max_position_embeddings": 4096,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}

PRESETS: dict[str, dict[str, Any]] = {
    # unit tests: every feature on (q_lora, group-limited routing, dense + MoE layers, MTP), tiny sizes
    "tiny": dict(
        vocab_size=256,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        q_lora_rank=24,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=8,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        routed_scaling_factor=2.5,
        first_k_dense_replace=1,
        num_nextn_predict_layers=1,
        max_position_embeddings=256,
    ),
    # ~1.7M params: learns 2-3 operand arithmetic in 5 minutes on 2 CPU cores (shared/cpu-feasibility.md)
    "cpu-small": dict(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=384,
        moe_intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        q_lora_rank=64,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        routed_scaling_factor=1.0,
        first_k_dense_replace=1,
        num_nextn_predict_layers=1,
        max_position_embeddings=1024,
    ),
    # ~165M total params, a single-GPU research model
    "gpu-small": dict(
        vocab_size=16384,
        hidden_size=768,
        intermediate_size=2048,
        moe_intermediate_size=256,
        num_hidden_layers=12,
        num_attention_heads=12,
        q_lora_rank=384,
        kv_lora_rank=256,
        qk_nope_head_dim=64,
        qk_rope_head_dim=32,
        v_head_dim=64,
        n_routed_experts=16,
        n_shared_experts=1,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        first_k_dense_replace=1,
        num_nextn_predict_layers=1,
        max_position_embeddings=4096,
    ),
    # real shapes (instantiate on the meta device to inspect)
    "deepseek-v2-lite": dict(
        model_type="deepseek_v2",
        vocab_size=102400,
        hidden_size=2048,
        intermediate_size=10944,
        moe_intermediate_size=1408,
        num_hidden_layers=27,
        num_attention_heads=16,
        q_lora_rank=None,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        n_routed_experts=64,
        n_shared_experts=2,
        num_experts_per_tok=6,
        n_group=1,
        topk_group=1,
        routed_scaling_factor=1.0,
        norm_topk_prob=False,
        scoring_func="softmax",
        topk_method="greedy",
        first_k_dense_replace=1,
        num_nextn_predict_layers=0,
        max_position_embeddings=163840,
        rope_scaling={**_YARN_V3, "mscale": 0.707, "mscale_all_dim": 0.707},
        bos_token_id=100000,
        eos_token_id=100001,
        torch_dtype="bfloat16",
    ),
    "deepseek-v3": dict(
        max_position_embeddings=163840,
        rope_scaling=dict(_YARN_V3),
        torch_dtype="bfloat16",
    ),
    # DeepSeek-V3.2(-Exp): V3 plus a lightning indexer in every layer (685B on the hub, counting MTP)
    "deepseek-v32": dict(
        model_type="deepseek_v32",
        index_n_heads=64,
        index_head_dim=128,
        index_topk=2048,
        max_position_embeddings=163840,
        rope_scaling=dict(_YARN_V3),
        torch_dtype="bfloat16",
    ),
}
# unit tests for V3.2: "tiny" with sparse attention that binds beyond 8 tokens; d_I a multiple of 64 (llama.cpp)
PRESETS["tiny-v32"] = dict(PRESETS["tiny"], model_type="deepseek_v32", index_n_heads=4, index_head_dim=64, index_topk=8)

# DeepSeek-V4: layer schedules as DeepSeek's config.json files give them (compress_ratios 0 / 4 / 128)
_YARN_V4 = {
    "type": "yarn",
    "factor": 16.0,
    "original_max_position_embeddings": 65536,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
}
_V4_REAL = dict(
    model_type="deepseek_v4",
    vocab_size=129280,
    head_dim=512,
    qk_rope_head_dim=64,
    sliding_window=128,
    n_shared_experts=1,
    num_experts_per_tok=6,
    scoring_func="sqrtsoftplus",
    swiglu_limit=10.0,
    index_n_heads=64,
    index_head_dim=128,
    num_nextn_predict_layers=1,
    max_position_embeddings=1048576,
    rope_theta=10000.0,
    compress_rope_theta=160000.0,
    rope_scaling=_YARN_V4,
    torch_dtype="bfloat16",
)
PRESETS["deepseek-v4-flash"] = dict(  # 284B total, 13B activated
    _V4_REAL,
    hidden_size=4096,
    num_hidden_layers=43,
    num_attention_heads=64,
    q_lora_rank=1024,
    o_groups=8,
    o_lora_rank=1024,
    layer_types=["sliding_attention"] * 2
    + ["compressed_sparse_attention", "heavily_compressed_attention"] * 20
    + ["compressed_sparse_attention"],
    mlp_layer_types=["hash_moe"] * 3 + ["moe"] * 40,
    n_routed_experts=256,
    moe_intermediate_size=2048,
    routed_scaling_factor=1.5,
    index_topk=512,
)
PRESETS["deepseek-v4-pro"] = dict(  # 1.6T total, 49B activated
    _V4_REAL,
    hidden_size=7168,
    num_hidden_layers=61,
    num_attention_heads=128,
    q_lora_rank=1536,
    o_groups=16,
    o_lora_rank=1024,
    layer_types=["heavily_compressed_attention"] * 2
    + ["compressed_sparse_attention", "heavily_compressed_attention"] * 29
    + ["compressed_sparse_attention"],
    mlp_layer_types=["hash_moe"] * 3 + ["moe"] * 58,
    n_routed_experts=384,
    moe_intermediate_size=3072,
    routed_scaling_factor=2.5,
    index_topk=1024,
)
_V4_SMALL = dict(
    model_type="deepseek_v4",
    layer_types=[
        "sliding_attention",
        "compressed_sparse_attention",
        "heavily_compressed_attention",
        "compressed_sparse_attention",
    ],  # every attention type
    num_hidden_layers=4,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    scoring_func="sqrtsoftplus",
    routed_scaling_factor=1.5,
    num_nextn_predict_layers=1,  # one MTP block, as tiny and cpu-small have
)
# unit tests: window 8, "compressed_sparse_attention" entries of 4 tokens (the indexer keeps 3), "heavily_compressed_attention" entries of 8, two hash-routed layers
PRESETS["tiny-v4"] = dict(
    _V4_SMALL,
    vocab_size=256,
    hidden_size=32,
    num_attention_heads=4,
    head_dim=16,
    qk_rope_head_dim=8,
    q_lora_rank=24,
    o_groups=2,
    o_lora_rank=8,
    sliding_window=8,
    compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
    index_n_heads=2,
    index_head_dim=16,
    index_topk=3,
    mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe"],
    moe_intermediate_size=16,
    max_position_embeddings=256,
)
# the V4 counterpart of cpu-small (about the same parameters): window 32, "compressed_sparse_attention" 4 (top-16), "heavily_compressed_attention" 16, one hash layer
PRESETS["cpu-small-v4"] = dict(
    _V4_SMALL,
    vocab_size=512,
    hidden_size=128,
    num_attention_heads=4,
    head_dim=32,
    qk_rope_head_dim=8,
    q_lora_rank=64,
    o_groups=2,
    o_lora_rank=32,
    sliding_window=32,
    compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 16},
    index_n_heads=2,
    index_head_dim=32,
    index_topk=16,
    mlp_layer_types=["hash_moe", "moe", "moe", "moe"],
    moe_intermediate_size=128,
    max_position_embeddings=1024,
)
