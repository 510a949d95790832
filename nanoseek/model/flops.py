"""Model FLOPs per token, counting MLA's low-rank projections and only the activated experts.

Used for MFU = achieved FLOP/s / peak FLOP/s in training metrics and benchmarks. A multiply-add is 2 FLOPs;
training (forward + backward) is 3x forward.
"""

from __future__ import annotations

from nanoseek.config import CSA, ModelConfig


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
    if config.is_v4:
        return _v4_flops_per_token(config, seq_len, training)
    c = config
    ctx = (seq_len + 1) / 2  # average number of keys a causal query attends to
    attended, indexer = ctx, 0.0
    if c.sparse_attention:  # DSA: MLA reads at most index_topk keys; the indexer (no backward) scores them all
        k = min(c.index_topk, seq_len)
        attended = (k * (k + 1) / 2 + k * (seq_len - k)) / seq_len
        indexer_params = c.q_lora_rank * c.index_n_heads * c.index_head_dim + c.hidden_size * (
            c.index_head_dim + c.index_n_heads
        )
        indexer = 2 * indexer_params + 2 * c.index_n_heads * (c.index_head_dim + 1) * ctx
    attn_scores = 2 * c.num_attention_heads * attended * (c.qk_head_dim + c.v_head_dim)
    layers = list(range(c.num_hidden_layers))
    params = c.hidden_size * c.vocab_size  # lm_head
    if include_mtp:
        for k in range(c.num_nextn_predict_layers):
            layers.append(c.num_hidden_layers + k)
            params += 2 * c.hidden_size * c.hidden_size + c.hidden_size * c.vocab_size  # eh_proj + shared head
    params += sum(_attention_matmul_params(c) + _ffn_matmul_params(c, i) for i in layers)
    forward = 2 * params + attn_scores * len(layers)
    return (3 * forward if training else forward) + indexer * len(layers)


def _mean_capped(seq_len: float, cap: float) -> float:
    """Mean over positions t < seq_len of min(t + 1, cap): keys seen by a query under a cap."""
    if seq_len <= cap:
        return (seq_len + 1) / 2
    return (cap * (cap + 1) / 2 + cap * (seq_len - cap)) / seq_len


def _v4_flops_per_token(c: ModelConfig, seq_len: int, training: bool) -> float:
    """DeepSeek-V4: projections (grouped output, compressors, indexer, mHC mixes), activated experts, and
    attention over the window plus the compressed entries each query reads (CSA: at most index_topk). The
    indexer runs without a backward pass. No MTP block (nanoseek builds none for V4 yet)."""
    H, n_h, d, hc = c.hidden_size, c.num_attention_heads, c.head_dim, c.hc_mult
    attn = (
        H * c.q_lora_rank + c.q_lora_rank * n_h * d + H * d + n_h * d * c.o_lora_rank + c.o_groups * c.o_lora_rank * H
    )
    moe = H * c.n_routed_experts + (c.num_experts_per_tok + c.n_shared_experts) * 3 * H * c.moe_intermediate_size
    params = H * c.vocab_size + hc * hc * H  # lm_head, final stream collapse
    attn_scores, indexer = 0.0, 0.0
    for i in range(c.num_hidden_layers):
        rate = c.compress_rate(i)
        keys = _mean_capped(seq_len, c.sliding_window)
        params += attn + moe + 2 * (2 + hc) * hc * hc * H
        if rate:
            entries = seq_len / rate
            params += 2 * H * d * (2 if c.layer_types[i] == CSA else 1)  # compressor kv and gate
            keys += _mean_capped(entries, c.index_topk) if c.layer_types[i] == CSA else (entries + 1) / 2
        if c.layer_types[i] == CSA:
            index_params = 2 * H * 2 * c.index_head_dim + c.q_lora_rank * c.index_n_heads * c.index_head_dim
            index_params += H * c.index_n_heads
            indexer += 2 * index_params + 2 * c.index_n_heads * c.index_head_dim * (seq_len / rate + 1) / 2
        attn_scores += 2 * n_h * keys * 2 * d  # q.k and p.v, both head_dim wide
    forward = 2 * params + attn_scores
    return (3 * forward if training else forward) + indexer
