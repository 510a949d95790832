"""nanoseek must reproduce transformers' DeepseekV3/V2ForCausalLM logits on the same weights, both ways."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from nanoseek import ModelConfig, Transformer, load_model, save_model  # noqa: E402

YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 16,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}
TINY = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=48,
    moe_intermediate_size=16,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    kv_lora_rank=16,
    qk_rope_head_dim=8,
    v_head_dim=12,
    qk_nope_head_dim=8,
    n_shared_experts=1,
    n_routed_experts=8,
    num_experts_per_tok=2,
    first_k_dense_replace=1,
    max_position_embeddings=64,
)


def _hf_v3(tmp_path, q_lora_rank, n_group, topk_group, rope):
    cfg = transformers.DeepseekV3Config(
        **TINY, q_lora_rank=q_lora_rank, n_group=n_group, topk_group=topk_group, rope_parameters=rope
    )
    torch.manual_seed(0)
    hf = transformers.DeepseekV3ForCausalLM(cfg).eval()
    with torch.no_grad():  # HF initialises the bias to zeros, which would hide selection bugs
        for layer in hf.model.layers[cfg.first_k_dense_replace :]:
            layer.mlp.gate.e_score_correction_bias.copy_(torch.randn(cfg.n_routed_experts) * 0.5)
            layer.mlp.gate.weight.normal_(0, 0.5)  # spread the scores so routing choices are decisive
    hf.save_pretrained(tmp_path)
    return hf


def _compare(hf, ours, vocab, seq_len=48):
    torch.manual_seed(1)
    ids = torch.randint(0, vocab, (3, seq_len))
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids)
    got = got.logits if hasattr(got, "logits") else got
    diff = (ref - got).abs().max().item()
    assert diff < 1e-4, f"max |logits diff| = {diff}"


@pytest.mark.parametrize(
    "q_lora_rank,n_group,topk_group,rope",
    [
        (24, 4, 2, YARN),  # group-limited routing + YaRN beyond the original 16 positions
        (None, 4, 1, YARN),  # V2-Lite-style plain q_proj
        (24, 1, 1, {"rope_type": "default", "rope_theta": 10000.0}),  # plain RoPE, no groups
    ],
)
def test_v3_logits_match_transformers(tmp_path, q_lora_rank, n_group, topk_group, rope):
    hf = _hf_v3(tmp_path, q_lora_rank, n_group, topk_group, rope)
    ours = load_model(tmp_path)
    assert ours.config.n_group == n_group and (ours.config.yarn is not None) == (rope is YARN)
    _compare(hf, ours, TINY["vocab_size"])


def test_parity_test_catches_missing_group_limit_and_mscale(tmp_path):
    """Guard the guard: dropping group-limited routing or the YaRN mscale must break parity."""
    hf = _hf_v3(tmp_path, 24, 4, 1, YARN)
    ours = load_model(tmp_path)
    for moe in ours.moe_layers():
        moe.gate.topk_group = moe.gate.n_group  # routing without the group limit
    with pytest.raises(AssertionError):
        _compare(hf, ours, TINY["vocab_size"])
    ours = load_model(tmp_path)
    for layer in ours.layers:
        layer.self_attn.softmax_scale = ours.config.qk_head_dim**-0.5  # YaRN mscale^2 dropped
    with pytest.raises(AssertionError):
        _compare(hf, ours, TINY["vocab_size"])


@pytest.mark.parametrize("topk_method,n_group,topk_group", [("greedy", 1, 1), ("group_limited_greedy", 4, 2)])
def test_v2_logits_match_transformers(tmp_path, topk_method, n_group, topk_group):
    cfg = transformers.DeepseekV2Config(
        **TINY,
        q_lora_rank=None,
        n_group=n_group,
        topk_group=topk_group,
        topk_method=topk_method,
        routed_scaling_factor=1.0,
        norm_topk_prob=False,
        rope_parameters={**YARN, "mscale": 0.707, "mscale_all_dim": 0.707},
    )
    torch.manual_seed(0)
    hf = transformers.DeepseekV2ForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    assert ours.config.scoring_func == "softmax" and ours.config.model_type == "deepseek_v2"
    _compare(hf, ours, TINY["vocab_size"])


@pytest.mark.parametrize("preset", ["tiny"])
def test_nanoseek_checkpoint_loads_in_transformers(tmp_path, preset):
    yarn = {k: v for k, v in YARN.items() if k not in ("rope_type", "rope_theta")}
    config = ModelConfig.from_preset(preset, rope_scaling={"type": "yarn", **yarn}, max_position_embeddings=64)
    torch.manual_seed(0)
    ours = Transformer(config).eval()
    with torch.no_grad():
        for moe in ours.moe_layers():
            moe.gate.e_score_correction_bias.copy_(torch.randn(config.n_routed_experts) * 0.3)
    save_model(ours, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == "DeepseekV3ForCausalLM"
    assert hf.config.num_key_value_heads == config.num_attention_heads
    _compare(hf, ours, config.vocab_size)
