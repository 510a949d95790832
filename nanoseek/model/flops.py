"""Model FLOPs per token, counting MLA's low-rank projections and only the activated experts.

Used for MFU = achieved FLOP/s / peak FLOP/s in training metrics and benchmarks. A multiply-add is 2 FLOPs;
training (forward + backward) is 3x forward.
"""

from __future__ import annotations

from nanoseek.config import ModelConfig


def _attention_matmul_params(c: ModelConfig) -> int:
    H = c.num_attention_heads
    q = (
        c.hidden_size * H * c.qk_head_dim
        if c.q_lora_rank is None
        else c.q_lora_rank * (c.hidden_size + H * c.qk_head_dim)
    )
    kv = c.hidden_size * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank * H * (
        c.qk_nope_head_dim + c.v_head_dim
    )
    return q + kv + H * c.v_head_dim * c.hidden_size


def _ffn_matmul_params(c: ModelConfig, layer_idx: int) -> int:
    d = c.hidden_size
    if not c.is_moe_layer(layer_idx):
        return 3 * d * c.intermediate_size
    active = c.num_experts_per_tok + c.n_shared_experts
    return d * c.n_routed_experts + active * 3 * d * c.moe_intermediate_size  # router + activated experts


def flops_per_token(config: ModelConfig, seq_len: int, training: bool = True, include_mtp: bool = True) -> float:
    """FLOPs to process one token of a causal sequence of length seq_len (forward, or forward+backward)."""
    c = config
    ctx = (seq_len + 1) / 2  # average number of keys a causal query attends to
    attn_scores = 2 * c.num_attention_heads * ctx * (c.qk_head_dim + c.v_head_dim)
    layers = list(range(c.num_hidden_layers))
    params = c.hidden_size * c.vocab_size  # lm_head
    if include_mtp:
        for k in range(c.num_nextn_predict_layers):
            layers.append(c.num_hidden_layers + k)
            params += 2 * c.hidden_size * c.hidden_size + c.hidden_size * c.vocab_size  # eh_proj + shared head
    params += sum(_attention_matmul_params(c) + _ffn_matmul_params(c, i) for i in layers)
    forward = 2 * params + attn_scores * len(layers)
    return 3 * forward if training else forward
