"""DeepSeek-V4 tensor names on disk: DeepSeek's hub names, which transformers also writes back on save.

A V4 directory names tensors as DeepSeek publishes them (`embed.weight`, `layers.L.attn.wq_a.weight`,
`layers.L.ffn.experts.E.w1.weight`, `hc_head_fn`, `head.weight`); transformers renames them on load and back on
`save_pretrained`, keeping only a `model.` prefix on some (`model.layers.L.attn.wq_a.weight`,
`model.embed_tokens.weight`, `model.hc_head.hc_fn`). Inside nanoseek the names are transformers' module names, as
for V3, so this file translates between the hub names and the V3-style HF names that checkpoint/hf.py handles
(`model.layers.L.self_attn.q_a_proj.weight`, `model.layers.L.mlp.experts.E.gate_proj.weight`).

MTP depth k is stored as `mtp.k.*` (its block's tensors named as a layer's, plus `e_proj`, `h_proj`, `enorm`,
`hnorm`, `norm`, `hc_head_fn/base/scale`); the V3-style name puts it at layer num_hidden_layers + k, as for V3.
transformers 5.25 ignores `mtp.*` on load (`_keys_to_ignore_on_load_unexpected`) and so never saves it.
"""

from __future__ import annotations

import re

import torch

from nanoseek.config import ModelConfig

_TOP = {  # hub -> internal, outside the layers
    "embed.weight": "embed_tokens.weight",
    "norm.weight": "norm.weight",
    "hc_head_fn": "hc_head.hc_fn",
    "hc_head_base": "hc_head.hc_base",
    "hc_head_scale": "hc_head.hc_scale",
}
_COMPRESSOR = {"wkv.weight": "kv_proj.weight", "wgate.weight": "gate_proj.weight", "ape": "position_bias"}
_COMPRESSOR["norm.weight"] = "kv_norm.weight"
_LAYER = {  # hub -> internal, after `layers.L.`
    **{f"hc_{sub}_{p}": f"{sub}_hc.{p}" for sub in ("attn", "ffn") for p in ("fn", "base", "scale")},
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn.attn_sink": "self_attn.sinks",
    "attn.wq_a.weight": "self_attn.q_a_proj.weight",
    "attn.q_norm.weight": "self_attn.q_a_norm.weight",
    "attn.wq_b.weight": "self_attn.q_b_proj.weight",
    "attn.wkv.weight": "self_attn.kv_proj.weight",
    "attn.norm.weight": "self_attn.kv_norm.weight",
    "attn.wo_a.weight": "self_attn.o_a_proj.weight",
    "attn.wo_b.weight": "self_attn.o_b_proj.weight",
    **{f"attn.compressor.{k}": f"self_attn.compressor.{v}" for k, v in _COMPRESSOR.items()},
    **{f"attn.indexer.compressor.{k}": f"self_attn.indexer.compressor.{v}" for k, v in _COMPRESSOR.items()},
    "attn.indexer.wq_b.weight": "self_attn.indexer.q_b_proj.weight",
    "attn.indexer.weights_proj.weight": "self_attn.indexer.weights_proj.weight",
    "ffn.gate.weight": "mlp.gate.weight",
    "ffn.gate.bias": "mlp.gate.e_score_correction_bias",
    "ffn.gate.tid2eid": "mlp.gate.tid2eid",
    "ffn.shared_experts.w1.weight": "mlp.shared_experts.gate_proj.weight",
    "ffn.shared_experts.w3.weight": "mlp.shared_experts.up_proj.weight",
    "ffn.shared_experts.w2.weight": "mlp.shared_experts.down_proj.weight",
}
_LAYER_BACK = {v: k for k, v in _LAYER.items()}
_W = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_W_BACK = {v: k for k, v in _W.items()}
_HUB_EXPERT = re.compile(r"^ffn\.experts\.(\d+)\.(w[123])\.weight$")
_HF_EXPERT = re.compile(r"^mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_LAYER_NAME = re.compile(r"^layers\.(\d+)\.(.+)$")
_MTP_NAME = re.compile(r"^mtp\.(\d+)\.(.+)$")
_MTP_OWN = {  # hub -> internal, after `mtp.k.`, outside its block
    **{f"{n}.weight": f"{n}.weight" for n in ("e_proj", "h_proj", "enorm", "hnorm", "norm")},
    "hc_head_fn": "hc_head.hc_fn",
    "hc_head_base": "hc_head.hc_base",
    "hc_head_scale": "hc_head.hc_scale",
}
_MTP_OWN_BACK = {v: k for k, v in _MTP_OWN.items()}


def hf_name(stored: str, config: ModelConfig) -> str | None:
    """The V3-style HF name of a tensor stored under `stored` (hub or transformers-saved form); None for tensors
    nanoseek does not build (a `gate.bias` the hub keeps on hash-routed layers). Unknown names come back
    unchanged, for the loader to report."""
    name = stored.removeprefix("model.")
    if name.endswith(".scale"):  # an FP8/FP4 weight's block scales: the V3-style `weight_scale_inv`
        weight = hf_name(name.removesuffix("scale") + "weight", config)
        return None if weight is None else weight + "_scale_inv"
    if name == "head.weight" or name == "lm_head.weight":
        return "lm_head.weight"
    mtp = _MTP_NAME.match(name)
    if mtp is not None:  # MTP depth k: layer num_hidden_layers + k
        idx, rest = config.num_hidden_layers + int(mtp.group(1)), mtp.group(2)
        if rest in _MTP_OWN:
            return f"model.layers.{idx}.{_MTP_OWN[rest]}"
        return _layer_name(idx, rest)
    if name in _TOP or name in _TOP.values():
        return "model." + _TOP.get(name, name)
    m = _LAYER_NAME.match(name)
    if m is None:
        return stored
    idx, rest = int(m.group(1)), m.group(2)
    if rest == "ffn.gate.bias" and idx < config.num_hidden_layers and config.mlp_layer_types[idx] == "hash_moe":
        return None  # hash routing has no bias
    return _layer_name(idx, rest)


def _layer_name(idx: int, rest: str) -> str:
    """The V3-style HF name of a layer tensor stored as `...{idx}.{rest}` (hub or transformers-saved `rest`)."""
    e = _HUB_EXPERT.match(rest)
    if e is not None:
        rest = f"mlp.experts.{e.group(1)}.{_W[e.group(2)]}.weight"
    else:
        rest = _LAYER.get(rest, rest)
    return f"model.layers.{idx}.{rest}"


def hub_tensor(name: str, t: torch.Tensor, config: ModelConfig) -> tuple[str, torch.Tensor]:
    """(hub name, tensor as the hub stores it) for a V3-style HF name from checkpoint.hf.internal_to_hf; layers
    from num_hidden_layers on are the MTP depths (`mtp.k.*`)."""
    if name == "lm_head.weight":
        return "head.weight", t
    name = name.removeprefix("model.")
    back = {v: k for k, v in _TOP.items()}
    if name in back:
        return back[name], t
    m = _LAYER_NAME.match(name)
    if m is None:
        raise ValueError(f"no DeepSeek-V4 hub name for {name!r}")
    idx, rest = int(m.group(1)), m.group(2)
    prefix = f"layers.{idx}." if idx < config.num_hidden_layers else f"mtp.{idx - config.num_hidden_layers}."
    if idx >= config.num_hidden_layers and rest in _MTP_OWN_BACK:
        return prefix + _MTP_OWN_BACK[rest], t
    e = _HF_EXPERT.match(rest)
    if e is not None:
        return f"{prefix}ffn.experts.{e.group(1)}.{_W_BACK[e.group(2)]}.weight", t
    if rest not in _LAYER_BACK:
        raise ValueError(f"no DeepSeek-V4 hub name for {name!r}")
    if rest == "mlp.gate.tid2eid":
        t = t.to(torch.int32)  # as DeepSeek ships it
    return prefix + _LAYER_BACK[rest], t
