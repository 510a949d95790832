"""Export a model directory to one GGUF file for llama.cpp and ollama: V2/V3 as architecture `deepseek2`, V3.2 as
`deepseek32`, V4 as `deepseek4` (gguf_v4.py).

What llama.cpp's own converter (`convert_hf_to_gguf.py`, DeepseekV2Model / DeepseekV32Model) writes, from our
config and weights: MLA as MQA over the latent (`head_count_kv = 1`, key/value lengths in both forms),
`kv_b_proj` split into `attn_k_b` (transposed) and `attn_v_b`, routed experts stacked, the balancing bias as
`exp_probs_b`, sigmoid gating written explicitly (llama.cpp loads deepseek2 as softmax otherwise), and the
tokenizer embedded with the pre-tokenizer named `deepseek-v3` (our split rules are DeepSeek-V3's, so llama.cpp and
ollama pick the same regexes). V3 files leave the MTP layers out (as that converter does); V3.2 files keep them as
blocks `blk.{num_hidden_layers + k}` with their `nextn.*` tensors and add the lightning indexer's tensors and keys,
as DeepseekV32Model does. Configs llama.cpp would run differently are refused up front.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from nanoseek.config import ModelConfig
from nanoseek.export.gguf_experts import expert_tensors
from nanoseek.io import atomic_path

ARCHS = {
    "deepseek_v2": "deepseek2",
    "deepseek_v3": "deepseek2",
    "deepseek_v32": "deepseek32",
    "deepseek_v4": "deepseek4",
}
DTYPES = ("f32", "f16", "bf16", "q8_0")
KEEP_F32 = ("ffn_gate_inp.weight", "exp_probs_b.bias")
QK8_0 = 32  # q8_0 block: rows must be a multiple of it (as in llama.cpp's converter, others fall back to f16)


def check_llama_cpp_compatible(config: ModelConfig) -> None:
    """Raise ValueError naming the field when llama.cpp (deepseek2, deepseek32 or deepseek4) would not run this
    config exactly as nanoseek does."""

    def need(cond: bool, field: str, msg: str) -> None:
        if not cond:
            raise ValueError(f"cannot export to GGUF: {field} {msg}")

    c = config
    if c.is_v4:
        from nanoseek.export.gguf_v4 import check_deepseek4_compatible

        check_deepseek4_compatible(c, need)
        return
    moe = c.n_routed_experts > 0 and c.first_k_dense_replace < c.num_hidden_layers
    need(c.qk_nope_head_dim >= 1, "qk_nope_head_dim", f"must be >= 1 for llama.cpp's MLA, got {c.qk_nope_head_dim}")
    need(not c.attention_bias, "attention_bias", "must be false: llama.cpp's deepseek2 has no attention biases")
    # llama.cpp treats 26/27-layer deepseek2 files as V2-Lite and then ignores q_lora_rank (not so deepseek32)
    need(
        c.q_lora_rank is None or c.num_hidden_layers not in (26, 27) or c.sparse_attention,
        "num_hidden_layers",
        f"= {c.num_hidden_layers} with q_lora_rank set: llama.cpp reads 26/27-layer deepseek2 models as "
        "V2-Lite (plain q_proj); use another depth or q_lora_rank=null",
    )
    if moe:
        need(
            c.n_shared_experts >= 1,
            "n_shared_experts",
            "must be >= 1: llama.cpp's deepseek2 MoE layers require shared-expert tensors",
        )
        need(c.n_routed_experts <= 512, "n_routed_experts", f"= {c.n_routed_experts}: llama.cpp loads at most 512")
        if c.n_group > 1:
            need(
                0 < c.topk_group < c.n_group,
                "topk_group",
                f"({c.topk_group}) must be strictly between 0 and n_group ({c.n_group}) for llama.cpp; "
                "topk_group == n_group keeps every group, so set n_group=1 and topk_group=1 for the same routing",
            )
            need(
                c.topk_method == "noaux_tc",
                "topk_method",
                f"{c.topk_method!r} with n_group > 1: llama.cpp scores groups by the sum of their top-2 experts "
                "(noaux_tc); group_limited_greedy's max is not supported",
            )
            need(
                c.n_group < c.n_routed_experts,
                "n_group",
                f"({c.n_group}) must be smaller than n_routed_experts ({c.n_routed_experts}) for llama.cpp",
            )
    if c.sparse_attention:
        # llama.cpp rotates indexer queries and keys by a Hadamard matrix of 64 or more (a power of two dividing
        # d_I): orthogonal, so the scores are ours, but it exists only for such sizes
        need(
            c.index_head_dim % 64 == 0,
            "index_head_dim",
            f"({c.index_head_dim}) must be a multiple of 64 for llama.cpp's deepseek32 indexer (Hadamard rotation)",
        )
    rs = c.yarn
    if rs is not None and float(rs["factor"]) > 1:
        m, m_all = rs.get("mscale"), rs.get("mscale_all_dim")
        # llama.cpp scales attention by yarn_log_multiplier (mscale_all_dim) and assumes mscale equals it
        need(
            bool(m_all) and bool(m) and float(m) == float(m_all),
            "rope_scaling.mscale",
            f"({m}) must equal rope_scaling.mscale_all_dim ({m_all}) and both be set: llama.cpp's YaRN assumes "
            "it (DeepSeek-V3 uses 1.0 and 1.0)",
        )


def _tokenizer_vocab(model_dir: Path, vocab_size: int):
    """(tokens, token types, merges, the Tokenizer) from tokenizer.json + tokenizer_config.json; the token list is
    padded to vocab_size (llama.cpp needs one entry per embedding row)."""
    import gguf

    from nanoseek.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(model_dir)  # clear errors for a missing or malformed tokenizer.json
    data = json.loads(tok.to_json())
    model = data.get("model", {})
    if model.get("type") != "BPE":
        raise ValueError(f"cannot export to GGUF: tokenizer.json model type {model.get('type')!r}; need byte-level BPE")
    by_id: dict[int, tuple[str, int]] = {i: (t, gguf.TokenType.NORMAL) for t, i in model["vocab"].items()}
    for added in data.get("added_tokens", []):
        kind = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        by_id[added["id"]] = (added["content"], kind)
    n = max(by_id) + 1
    if n > vocab_size:
        raise ValueError(
            f"cannot export to GGUF: the tokenizer has {n} tokens but config.json vocab_size is {vocab_size}"
        )
    tokens, types = [], []
    for i in range(vocab_size):  # rows of the embedding the tokenizer never produces: unused placeholders
        text, kind = by_id.get(i, (f"[PAD{i}]", gguf.TokenType.UNUSED))
        tokens.append(text)
        types.append(int(kind))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, types, merges, tok


def _tensors(model, config: ModelConfig):
    """(GGUF name, float32 tensor in PyTorch layout) for every weight llama.cpp reads. V3: MTP layers skipped;
    V3.2: MTP depth k is block num_hidden_layers + k, with its `nextn.*` tensors (and, as in DeepSeek's checkpoints
    and so in the converter's output, its copies of the embedding and head)."""
    c = config
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    yield "token_embd.weight", sd["embed_tokens.weight"]
    yield "output_norm.weight", sd["norm.weight"]
    if not c.tie_word_embeddings:  # tied: llama.cpp falls back to token_embd
        yield "output.weight", sd["lm_head.weight"]
    for i in range(c.num_hidden_layers):
        yield from _block_tensors(sd, f"layers.{i}.", f"blk.{i}.", c, i)
    if not c.sparse_attention:
        return
    for k in range(c.num_nextn_predict_layers):
        i = c.num_hidden_layers + k
        p, b = f"mtp.{k}.", f"blk.{i}."
        yield from _block_tensors(sd, p + "block.", b, c, i)
        yield b + "nextn.eh_proj.weight", sd[p + "eh_proj.weight"]  # input [enorm(e) | hnorm(h)], as ours
        yield b + "nextn.enorm.weight", sd[p + "enorm.weight"]
        yield b + "nextn.hnorm.weight", sd[p + "hnorm.weight"]
        yield b + "nextn.shared_head_norm.weight", sd[p + "shared_head.norm.weight"]
        yield b + "nextn.embed_tokens.weight", sd["embed_tokens.weight"]
        yield (
            b + "nextn.shared_head_head.weight",
            sd["embed_tokens.weight" if c.tie_word_embeddings else "lm_head.weight"],
        )


def _block_tensors(sd: dict[str, torch.Tensor], p: str, b: str, c: ModelConfig, i: int):
    """One MLA block's tensors: our names under prefix p -> GGUF names under b; layer index i picks dense or MoE."""
    H, dn, dv, dc = c.num_attention_heads, c.qk_nope_head_dim, c.v_head_dim, c.kv_lora_rank
    a = p + "self_attn."
    yield b + "attn_norm.weight", sd[p + "input_layernorm.weight"]
    if c.q_lora_rank is None:
        yield b + "attn_q.weight", sd[a + "q_proj.weight"]
    else:
        yield b + "attn_q_a.weight", sd[a + "q_a_proj.weight"]
        yield b + "attn_q_a_norm.weight", sd[a + "q_a_layernorm.weight"]
        yield b + "attn_q_b.weight", sd[a + "q_b_proj.weight"]
    yield b + "attn_kv_a_mqa.weight", sd[a + "kv_a_proj_with_mqa.weight"]
    yield b + "attn_kv_a_norm.weight", sd[a + "kv_a_layernorm.weight"]
    # absorbed MLA: W_UK per head transposed to [H, d_c, d_nope] (folded into the query), W_UV [H, d_v, d_c]
    k_b, v_b = sd[a + "kv_b_proj.weight"].view(H, dn + dv, dc).split([dn, dv], dim=1)
    yield b + "attn_k_b.weight", k_b.transpose(1, 2)
    yield b + "attn_v_b.weight", v_b
    yield b + "attn_output.weight", sd[a + "o_proj.weight"]
    if c.sparse_attention:  # the lightning indexer, under the converter's names
        x = a + "indexer."
        yield b + "indexer.attn_q_b.weight", sd[x + "wq_b.weight"]
        yield b + "indexer.attn_k.weight", sd[x + "wk.weight"]
        yield b + "indexer.k_norm.weight", sd[x + "k_norm.weight"]
        yield b + "indexer.k_norm.bias", sd[x + "k_norm.bias"]
        yield b + "indexer.proj.weight", sd[x + "weights_proj.weight"]
    yield b + "ffn_norm.weight", sd[p + "post_attention_layernorm.weight"]
    m = p + "mlp."
    if not c.is_moe_layer(i):
        for proj in ("gate", "up", "down"):
            yield b + f"ffn_{proj}.weight", sd[m + f"{proj}_proj.weight"]
        return
    yield b + "ffn_gate_inp.weight", sd[m + "gate.weight"]
    if c.topk_method == "noaux_tc":
        yield b + "exp_probs_b.bias", sd[m + "gate.e_score_correction_bias"]
    yield from expert_tensors(sd, m, b, c)


def _encode(name: str, t: torch.Tensor, dtype: str, keep_f32: tuple[str, ...]):
    """(array, raw GGML type or None) for one tensor. 1-D tensors and those named in keep_f32 (routers, biases;
    V4's mHC and compressor tensors) stay f32, as in llama.cpp's converter: norms are tiny, and a rounded router or
    bias could pick other experts. Integer tensors (V4's hash routing table) are written as int32."""
    import gguf

    if not t.is_floating_point():
        return np.ascontiguousarray(t.numpy().astype(np.int32)), None
    arr = np.ascontiguousarray(t.numpy().astype(np.float32))
    if arr.ndim == 1 or name.endswith(keep_f32) or dtype == "f32":
        return arr, None
    if dtype == "q8_0" and arr.shape[-1] % QK8_0 == 0:
        q = gguf.GGMLQuantizationType.Q8_0
        return gguf.quants.quantize(arr, q), q
    if dtype == "bf16":
        q = gguf.GGMLQuantizationType.BF16
        return gguf.quants.quantize(arr, q), q
    return arr.astype(np.float16), None  # f16, and q8_0 rows that are not a multiple of 32


def export_gguf(model_dir: str | os.PathLike, out: str | os.PathLike, dtype: str = "f32") -> Path:
    """Write `model_dir` (an HF DeepSeek-V2/V3/V3.2/V4 directory with tokenizer.json) as one GGUF file, atomically."""
    import gguf

    from nanoseek.checkpoint.hf import load_model

    if dtype not in DTYPES:
        raise ValueError(f"unknown GGUF dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
    model_dir, out = Path(model_dir), Path(out)
    config = ModelConfig.from_json(model_dir)
    check_llama_cpp_compatible(config)
    if not (model_dir / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"no tokenizer.json in {model_dir}: a GGUF file embeds the tokenizer; save the model with its tokenizer"
        )
    tokens, types, merges, tok = _tokenizer_vocab(model_dir, config.vocab_size)
    model = load_model(model_dir, dtype=torch.float32)
    c = config

    with atomic_path(out) as tmp:
        w = gguf.GGUFWriter(tmp, ARCHS[c.model_type])
        w.add_name(model_dir.resolve().name)
        w.add_file_type(
            {
                "f32": gguf.LlamaFileType.ALL_F32,
                "f16": gguf.LlamaFileType.MOSTLY_F16,
                "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
            }[dtype]
        )
        if c.is_v4:
            from nanoseek.export import gguf_v4

            gguf_v4.add_metadata(w, c)
            tensors, keep_f32 = gguf_v4.tensors(model, c), gguf_v4.KEEP_F32
        else:
            _add_mla_metadata(w, c)
            tensors, keep_f32 = _tensors(model, c), KEEP_F32
        # tokenizer
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("deepseek-v3")  # same split rules: see nanoseek.tokenizer.DEEPSEEK_V3_SPLITS
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_bos_token_id(tok.bos_id)
        w.add_eos_token_id(tok.eos_id)
        w.add_pad_token_id(tok.pad_id)
        w.add_add_bos_token(True)  # tokenizer_config add_bos_token: prompts start with BOS
        w.add_add_eos_token(False)
        w.add_chat_template(tok.chat_template)
        for name, t in tensors:
            arr, raw = _encode(name, t, dtype, keep_f32)
            if raw is None:
                w.add_tensor(name, arr)
            else:
                w.add_tensor(name, arr, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return out


def _add_mla_metadata(w, c: ModelConfig) -> None:
    """The deepseek2 / deepseek32 keys (hyper-parameters, YaRN; V3.2 adds its MTP blocks and the indexer)."""
    import gguf

    n_mtp = c.num_nextn_predict_layers if c.sparse_attention else 0  # V3 files leave MTP layers out
    w.add_block_count(c.num_hidden_layers + n_mtp)
    if n_mtp:
        w.add_nextn_predict_layers(n_mtp)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(1)  # absorbed MLA is MQA over the shared latent
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    # no routed experts: every block dense, the MTP blocks too
    w.add_leading_dense_block_count(c.first_k_dense_replace if c.n_routed_experts else c.num_hidden_layers + n_mtp)
    w.add_q_lora_rank(c.q_lora_rank or 0)  # llama.cpp requires the key; 0 = plain q_proj
    w.add_kv_lora_rank(c.kv_lora_rank)
    w.add_key_length(c.kv_lora_rank + c.qk_rope_head_dim)  # MQA form: [c_KV | k_pe]
    w.add_value_length(c.kv_lora_rank)
    w.add_key_length_mla(c.qk_nope_head_dim + c.qk_rope_head_dim)  # per-head form
    w.add_value_length_mla(c.v_head_dim)
    w.add_rope_dimension_count(c.qk_rope_head_dim)
    w.add_expert_feed_forward_length(c.moe_intermediate_size)
    w.add_expert_count(c.n_routed_experts)
    w.add_expert_used_count(c.num_experts_per_tok if c.n_routed_experts else 0)
    w.add_expert_shared_count(c.n_shared_experts)
    w.add_expert_weights_scale(c.routed_scaling_factor)
    w.add_expert_weights_norm(c.norm_topk_prob)
    w.add_expert_gating_func(
        gguf.ExpertGatingFuncType.SIGMOID if c.scoring_func == "sigmoid" else gguf.ExpertGatingFuncType.SOFTMAX
    )
    if c.n_group > 1:
        w.add_expert_group_count(c.n_group)
        w.add_expert_group_used_count(c.topk_group)
    if c.sparse_attention:
        w.add_indexer_head_count(c.index_n_heads)
        w.add_indexer_key_length(c.index_head_dim)
        w.add_indexer_top_k(c.index_topk)
    rs = c.yarn
    if rs is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rs["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(rs["original_max_position_embeddings"]))
        w.add_rope_scaling_yarn_beta_fast(float(rs.get("beta_fast") or 32.0))
        w.add_rope_scaling_yarn_beta_slow(float(rs.get("beta_slow") or 1.0))
        # llama.cpp divides this by 0.1 again (its converter's convention for deepseek2 and deepseek32)
        w.add_rope_scaling_yarn_log_mul(0.1 * float(rs["mscale_all_dim"]))


def modelfile(gguf_path: Path) -> str:
    """An ollama Modelfile for the exported file: our R1-style chat template in ollama's Go template syntax
    (ollama does not run the Jinja template stored in the GGUF), stopping at EOS."""
    return (
        f"FROM ./{gguf_path.name}\n"
        'TEMPLATE """{{- if .System }}{{ .System }}{{ end }}'
        "{{- range $i, $_ := .Messages }}"
        '{{- if eq .Role "user" }}<｜User｜>{{ .Content }}'
        '{{- else if eq .Role "assistant" }}<｜Assistant｜>{{ .Content }}<｜end▁of▁sentence｜>'
        '{{- end }}{{- end }}<｜Assistant｜>"""\n'
        'PARAMETER stop "<｜end▁of▁sentence｜>"\n'
        "PARAMETER temperature 0\n"
    )
