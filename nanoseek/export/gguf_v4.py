"""DeepSeek-V4 in GGUF: llama.cpp's `deepseek4` architecture, written as its converter (`conversion/deepseek.py`,
DeepseekV4Model) writes DeepSeek's checkpoints, from our config and weights.

No tensor is permuted: llama.cpp reads every V4 matrix in PyTorch's [out, in] layout (`attn_output_a` too: it
views the [g*r_o, n_h*d/g] matrix as g groups itself; position biases stay [rate, width]). Routed experts are
stacked, the hash-routing table is int32 `ffn_gate_tid2eid` (hash layers have no `exp_probs_b`), the mHC and
compressor tensors stay float32, and the MTP blocks are left out (the converter puts them in a separate file).
What llama.cpp hard-codes (4 streams, rates 4 and 128, sqrtsoftplus routing, hash layers first) is checked by
`check_deepseek4_compatible`, through `nanoseek.export.gguf.check_llama_cpp_compatible`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from nanoseek.config import CSA, HCA, ModelConfig
from nanoseek.export.gguf_experts import expert_tensors

# written float32 whatever --dtype says (llama.cpp's converter keeps DeepSeek's float32 tensors float32)
KEEP_F32 = (
    "ffn_gate_inp.weight",
    "exp_probs_b.bias",
    "attn_sinks.weight",
    "_fn.weight",
    "_base.weight",
    "_scale.weight",
    "compressor_ape.weight",
)
ARCH = "deepseek4"
SQRTSOFTPLUS = 4  # llama.cpp's expert_gating_func value (gguf 0.19's ExpertGatingFuncType lacks it)
LLAMA_CPP_RATES = {CSA: 4, HCA: 128}  # llama.cpp's deepseek4 graph knows exactly these two compressors


def check_deepseek4_compatible(c: ModelConfig, need: Callable[[bool, str, str], None]) -> None:
    """Refuse, through need(cond, field, message), V4 configs llama.cpp's deepseek4 would load differently."""
    need(c.hc_mult == 4, "hc_mult", f"must be 4: llama.cpp's deepseek4 graph asserts 4 mHC streams, got {c.hc_mult}")
    for kind in sorted(set(c.layer_types)):
        if kind in LLAMA_CPP_RATES:
            need(
                c.compress_rates.get(kind) == LLAMA_CPP_RATES[kind],
                f"compress_rates[{kind!r}]",
                f"= {c.compress_rates.get(kind)}: llama.cpp's deepseek4 compresses {kind} by exactly "
                f"{LLAMA_CPP_RATES[kind]} tokens",
            )
    need(c.n_routed_experts <= 512, "n_routed_experts", f"= {c.n_routed_experts}: llama.cpp loads at most 512")
    need(
        c.scoring_func == "sqrtsoftplus",
        "scoring_func",
        f"{c.scoring_func!r}: llama.cpp's deepseek4 loads only sqrtsoftplus routing",
    )
    need(
        c.norm_topk_prob,
        "norm_topk_prob",
        "must be true: nanoseek and transformers always renormalise V4's expert weights, llama.cpp only when it is "
        "true",
    )
    need(
        c.topk_method == "noaux_tc",
        "topk_method",
        f"{c.topk_method!r}: llama.cpp's deepseek4 picks score-routed experts with the balancing bias (noaux_tc)",
    )
    need(
        c.swiglu_limit > 1e-6,
        "swiglu_limit",
        f"({c.swiglu_limit}) must be > 1e-6: llama.cpp's deepseek4 skips the SwiGLU clamp below that",
    )
    n_hash = c.mlp_layer_types.count("hash_moe")
    need(
        c.mlp_layer_types[:n_hash] == ["hash_moe"] * n_hash,
        "mlp_layer_types",
        f"{c.mlp_layer_types}: llama.cpp's deepseek4 hash-routes only the first hash_layer_count layers; put the "
        "hash_moe layers first",
    )
    rs = c.yarn
    need(
        rs is None or float(rs.get("attention_factor", 1.0)) == 1.0,
        "rope_scaling.attention_factor",
        f"({rs and rs.get('attention_factor')}) must be 1 or absent: llama.cpp's deepseek4 scales no cos/sin",
    )
    if CSA in c.layer_types:
        need(
            c.index_head_dim % 64 == 0,
            "index_head_dim",
            f"({c.index_head_dim}) must be a multiple of 64 for llama.cpp's deepseek4 indexer (Hadamard rotation)",
        )
    if c.head_dim == c.index_head_dim:  # llama.cpp then rotates every attention cache by the same Hadamard matrix
        need(c.head_dim % 64 == 0, "head_dim", f"({c.head_dim}) equal to index_head_dim must be a multiple of 64")


def add_metadata(w, c: ModelConfig) -> None:
    """The deepseek4 keys, those llama.cpp requires included (spec B12.1); MTP blocks are not in this file."""
    import gguf

    L = c.num_hidden_layers
    w.add_block_count(L)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_embedding_length_out(c.hc_mult * c.hidden_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(1)  # one shared K = V head
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_rope_dimension_count(c.qk_rope_head_dim)
    w.add_rope_freq_base(c.rope_theta)  # sliding-only layers
    # the V4 keys below have no GGUFWriter method in gguf 0.19 (the key names are llama.cpp's constants.py)
    w.add_float32(f"{ARCH}.attention.compress_rope_freq_base", c.compress_rope_theta)  # CSA/HCA (YaRN only there)
    rs = c.yarn
    if rs is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rs["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(rs["original_max_position_embeddings"]))
        w.add_rope_scaling_yarn_beta_fast(float(rs.get("beta_fast") or 32.0))
        w.add_rope_scaling_yarn_beta_slow(float(rs.get("beta_slow") or 1.0))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_q_lora_rank(c.q_lora_rank)
    w.add_sliding_window(c.sliding_window)
    w.add_uint32(f"{ARCH}.attention.output_group_count", c.o_groups)
    w.add_uint32(f"{ARCH}.attention.output_lora_rank", c.o_lora_rank)
    # per block, the MTP blocks' too (as config.json's compress_ratios): 0 sliding, 4 CSA, 128 HCA
    w.add_array(
        f"{ARCH}.attention.compress_ratios", [c.compress_rate(i) for i in range(L + c.num_nextn_predict_layers)]
    )
    w.add_indexer_head_count(c.index_n_heads)
    w.add_indexer_key_length(c.index_head_dim)
    w.add_indexer_top_k(c.index_topk)
    w.add_uint32(f"{ARCH}.hyper_connection.count", c.hc_mult)
    w.add_uint32(f"{ARCH}.hyper_connection.sinkhorn_iterations", c.hc_sinkhorn_iters)
    w.add_float32(f"{ARCH}.hyper_connection.epsilon", c.hc_eps)
    w.add_uint32(f"{ARCH}.hash_layer_count", c.mlp_layer_types.count("hash_moe"))
    w.add_expert_count(c.n_routed_experts)
    w.add_expert_used_count(c.num_experts_per_tok)
    w.add_expert_feed_forward_length(c.moe_intermediate_size)
    w.add_expert_shared_count(c.n_shared_experts)
    w.add_expert_weights_scale(c.routed_scaling_factor)
    w.add_expert_weights_norm(c.norm_topk_prob)
    w.add_uint32(f"{ARCH}.expert_gating_func", SQRTSOFTPLUS)
    w.add_swiglu_clamp_exp([float(c.swiglu_limit)] * L)
    w.add_swiglu_clamp_shexp([float(c.swiglu_limit)] * L)


def tensors(model, c: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """(GGUF name, tensor in PyTorch layout) for the main model; tid2eid stays an integer tensor."""
    sd = {
        k: v.detach() if k.endswith("tid2eid") else v.detach().float()
        for k, v in model.state_dict().items()
        if not k.startswith("mtp.")
    }
    yield "token_embd.weight", sd["embed_tokens.weight"]
    yield "output_norm.weight", sd["norm.weight"]
    # llama.cpp's deepseek4 has no tied fallback: a tied model writes its embedding again as the head
    yield "output.weight", sd["embed_tokens.weight" if c.tie_word_embeddings else "lm_head.weight"]
    yield "output_hc_fn.weight", sd["hc_head.hc_fn"]  # [hc, hc*d]
    yield "output_hc_base.weight", sd["hc_head.hc_base"]
    yield "output_hc_scale.weight", sd["hc_head.hc_scale"]
    for i in range(c.num_hidden_layers):
        p, b = f"layers.{i}.", f"blk.{i}."
        for sub in ("attn", "ffn"):  # [(2 + hc) hc, hc*d], [(2 + hc) hc], [3]
            for part in ("fn", "base", "scale"):
                yield b + f"hc_{sub}_{part}.weight", sd[p + f"{sub}_hc.{part}"]
        a = p + "self_attn."
        yield b + "attn_norm.weight", sd[p + "input_layernorm.weight"]
        yield b + "attn_sinks.weight", sd[a + "sinks"]
        yield b + "attn_q_a.weight", sd[a + "q_a_proj.weight"]
        yield b + "attn_q_a_norm.weight", sd[a + "q_a_norm.weight"]
        yield b + "attn_q_b.weight", sd[a + "q_b_proj.weight"]
        yield b + "attn_kv.weight", sd[a + "kv_proj.weight"]
        yield b + "attn_kv_a_norm.weight", sd[a + "kv_norm.weight"]
        yield b + "attn_output_a.weight", sd[a + "o_a_proj.weight"]  # [g*r_o, n_h*d/g]
        yield b + "attn_output_b.weight", sd[a + "o_b_proj.weight"]
        if c.compress_rate(i):  # CSA: [2d, d] projections (two overlapping halves); HCA: [d, d]
            yield from _compressor(sd, a + "compressor.", b + "attn_compressor_")
        if c.attention_type(i) == CSA:
            x = a + "indexer."
            yield b + "indexer.attn_q_b.weight", sd[x + "q_b_proj.weight"]
            yield b + "indexer.proj.weight", sd[x + "weights_proj.weight"]
            yield from _compressor(sd, x + "compressor.", b + "indexer_compressor_")
        yield b + "ffn_norm.weight", sd[p + "post_attention_layernorm.weight"]
        m = p + "mlp."
        yield b + "ffn_gate_inp.weight", sd[m + "gate.weight"]
        if c.mlp_layer_type(i) == "hash_moe":
            yield b + "ffn_gate_tid2eid.weight", sd[m + "gate.tid2eid"]  # [V, K] int -> ggml {K, V} int32
        else:
            yield b + "exp_probs_b.bias", sd[m + "gate.e_score_correction_bias"]
        yield from expert_tensors(sd, m, b, c)


def _compressor(sd: dict[str, torch.Tensor], p: str, b: str) -> Iterator[tuple[str, torch.Tensor]]:
    yield b + "kv.weight", sd[p + "kv_proj.weight"]
    yield b + "gate.weight", sd[p + "gate_proj.weight"]
    yield b + "ape.weight", sd[p + "position_bias"]  # [rate, width] -> ggml {width, rate}
    yield b + "norm.weight", sd[p + "kv_norm.weight"]
