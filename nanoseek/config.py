"""ModelConfig: DeepSeek V2/V3/V3.2/V4 hyper-parameters under Hugging Face's field names, and config.json I/O.

A model directory's `config.json` is the HF config JSON of its `model_type` (`DeepseekV3Config`, ...V32, ...V4, or
V2 for V2 checkpoints), so the same file is read by nanoseek, `transformers`, vLLM and llama.cpp's converter. The
named presets are data in presets.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanoseek.io import atomic_write_text
from nanoseek.presets import PRESETS


@dataclass
class ModelConfig:
    """DeepSeek-V3 architecture. Defaults are transformers' `DeepseekV3Config` defaults (the 671B model)."""

    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432  # SwiGLU width of the dense FFN layers
    moe_intermediate_size: int = 2048  # SwiGLU width of one routed (or shared) expert
    num_hidden_layers: int = 61  # main-model layers; MTP layers are stored after them
    num_attention_heads: int = 128
    # MLA (DeepSeek-V2 report, sec. 2.1)
    q_lora_rank: int | None = 1536  # d'_c; None => plain q_proj (V2-Lite)
    kv_lora_rank: int = 512  # d_c, the cached latent
    qk_nope_head_dim: int = 128  # d_h
    qk_rope_head_dim: int = 64  # d_h^R, decoupled RoPE part shared by all heads for k
    v_head_dim: int = 128
    # DeepSeekMoE (V3 report, sec. 2.1.2)
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"  # "sigmoid" (V3) or "softmax" (V2)
    topk_method: str = "noaux_tc"  # "noaux_tc" (V3), "greedy" / "group_limited_greedy" (V2)
    first_k_dense_replace: int = 3
    aux_loss_alpha: float = 0.0001  # sequence-wise balance loss weight (V3 report: 1e-4)
    # MTP (V3 report, sec. 2.2)
    num_nextn_predict_layers: int = 1
    # DeepSeek Sparse Attention's lightning indexer (V3.2 report, sec. 2.1); read when model_type is deepseek_v32
    index_n_heads: int = 64  # n_I
    index_head_dim: int = 128  # d_I; RoPE (half-split) on its first qk_rope_head_dim dims
    index_topk: int = 2048  # keys each query attends to; dense causal attention while the context is shorter
    # DeepSeek-V4 (read when model_type is deepseek_v4; defaults are transformers' DeepseekV4Config's). V4 reuses
    # q_lora_rank, qk_rope_head_dim (RoPE on the LAST dims of each head), index_* (its indexer picks compressed
    # entries), rope_scaling (YaRN on compressed layers only), and the MoE fields (no dense layers, no groups).
    head_dim: int = 512  # width of every query head and of the single shared K=V head
    sliding_window: int = 128  # W: every layer attends to the last W tokens, itself included
    layer_types: list[str] | None = None  # per layer: one of V4_LAYER_TYPES
    compress_rates: dict[str, int] = field(default_factory=lambda: dict(V4_COMPRESS_RATES))  # tokens per entry
    compress_rope_theta: float = 160000.0  # RoPE base of the compressed layers (rope_theta: sliding-only layers)
    o_groups: int = 8  # grouped output projection: heads in o_groups groups, each to o_lora_rank dims
    o_lora_rank: int = 1024
    hc_mult: int = 4  # mHC: residual streams per token
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    mlp_layer_types: list[str] | None = None  # per layer: "hash_moe" (experts by token id) or "moe"
    # per MTP block: its attention's layer type (default sliding_attention, as V4-Flash ships). config.json keeps
    # it where DeepSeek does: compress_ratios entries past num_hidden_layers. MTP blocks always route by "moe".
    mtp_layer_types: list[str] | None = None
    swiglu_limit: float = 10.0  # experts clamp gate <= limit and |up| <= limit before SiLU(gate) * up
    # positions and norms
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # YaRN: {"type": "yarn", "factor", "original_max_position_embeddings", ...}
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    pad_token_id: int | None = None
    model_type: str = "deepseek_v3"
    torch_dtype: str = "float32"
    extra: dict = field(default_factory=dict, repr=False)  # unknown config.json keys, written back unchanged

    def __post_init__(self) -> None:
        if self.is_v4:
            _resolve_v4_layer_types(self)
        self.validate()

    # ----------------------------------------------------------------- derived
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def yarn(self) -> dict | None:
        """The YaRN parameters when rope_scaling is YaRN with factor > 1, else None."""
        rs = self.rope_scaling
        if not rs or rs.get("type", rs.get("rope_type")) != "yarn":
            return None
        return rs

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(qk_head_dim), times mscale^2 when YaRN is on (mscale from mscale_all_dim, as HF does)."""
        scale = self.qk_head_dim**-0.5
        rs = self.yarn
        if rs is not None and rs.get("mscale_all_dim"):
            m = yarn_mscale(float(rs["factor"]), float(rs["mscale_all_dim"]))
            scale *= m * m
        return scale

    @property
    def sparse_attention(self) -> bool:
        """True for DeepSeek-V3.2: every MLA layer has a lightning indexer choosing index_topk keys per query."""
        return self.model_type == "deepseek_v32"

    @property
    def latent_cache_width(self) -> int:
        """Numbers cached per token per layer: [c_KV | rope(k_pe)], plus the indexer key [d_I] for V3.2."""
        return self.kv_lora_rank + self.qk_rope_head_dim + (self.index_head_dim if self.sparse_attention else 0)

    @property
    def is_v4(self) -> bool:
        """True for DeepSeek-V4: hybrid compressed attention, mHC residual streams, hash-routed first layers."""
        return self.model_type == "deepseek_v4"

    def attention_type(self, layer_idx: int) -> str:
        """V4: the attention layer type of layer layer_idx; num_hidden_layers + k is MTP block k."""
        n = self.num_hidden_layers
        return self.layer_types[layer_idx] if layer_idx < n else self.mtp_layer_types[layer_idx - n]

    def mlp_layer_type(self, layer_idx: int) -> str:
        """V4: "hash_moe" or "moe" for layer layer_idx (MTP blocks: "moe", biased routing)."""
        return self.mlp_layer_types[layer_idx] if layer_idx < self.num_hidden_layers else "moe"

    def compress_rate(self, layer_idx: int) -> int:
        """V4: tokens pooled into one compressed KV entry in layer layer_idx (0: sliding window only)."""
        return self.compress_rates.get(self.attention_type(layer_idx), 0)

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx >= self.first_k_dense_replace and self.n_routed_experts > 0

    # -------------------------------------------------------------- validation
    def validate(self) -> None:
        """Raise ValueError naming the bad field and how to fix it."""

        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"invalid model config: {msg}")

        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "kv_lora_rank",
            "qk_rope_head_dim",
            "v_head_dim",
        ):
            v = getattr(self, name)
            need(isinstance(v, int) and v > 0, f"{name} must be a positive integer, got {v!r}")
        need(self.qk_nope_head_dim >= 0, "qk_nope_head_dim must be >= 0")
        need(self.qk_rope_head_dim % 2 == 0, f"qk_rope_head_dim must be even (RoPE pairs), got {self.qk_rope_head_dim}")
        need(
            self.q_lora_rank is None or (isinstance(self.q_lora_rank, int) and self.q_lora_rank > 0),
            f"q_lora_rank must be a positive integer or null, got {self.q_lora_rank!r}",
        )
        need(
            0 <= self.first_k_dense_replace <= self.num_hidden_layers,
            f"first_k_dense_replace ({self.first_k_dense_replace}) must be in [0, num_hidden_layers"
            f"={self.num_hidden_layers}]",
        )
        need(self.num_nextn_predict_layers >= 0, "num_nextn_predict_layers must be >= 0")
        need(self.hidden_act == "silu", f"hidden_act {self.hidden_act!r} is not supported; DeepSeek uses 'silu'")
        need(
            self.model_type in _ARCHITECTURES,
            f"model_type must be one of {', '.join(_ARCHITECTURES)}, got {self.model_type!r}",
        )
        if self.is_v4:
            _validate_v4(self, need)
        if self.sparse_attention:
            need(self.q_lora_rank is not None, "deepseek_v32 needs q_lora_rank: the indexer reads the query latent")
            for name in ("index_n_heads", "index_head_dim", "index_topk"):
                v = getattr(self, name)
                need(isinstance(v, int) and v > 0, f"{name} must be a positive integer, got {v!r}")
            need(
                self.qk_rope_head_dim <= self.index_head_dim,
                f"index_head_dim ({self.index_head_dim}) must be >= qk_rope_head_dim ({self.qk_rope_head_dim})",
            )
        if self.n_routed_experts > 0 and self.first_k_dense_replace < self.num_hidden_layers:
            need(self.moe_intermediate_size > 0, "moe_intermediate_size must be > 0 for MoE layers")
            need(
                self.scoring_func in ("sigmoid", "softmax", "sqrtsoftplus"),
                f"scoring_func must be 'sigmoid', 'softmax' or 'sqrtsoftplus', got {self.scoring_func!r}",
            )
            need(
                self.topk_method in ("noaux_tc", "greedy", "group_limited_greedy"),
                f"topk_method must be noaux_tc, greedy or group_limited_greedy, got {self.topk_method!r}",
            )
            need(self.n_group >= 1, f"n_group must be >= 1, got {self.n_group}")
            need(
                self.n_routed_experts % self.n_group == 0,
                f"n_routed_experts ({self.n_routed_experts}) must be divisible by n_group ({self.n_group})",
            )
            need(
                1 <= self.topk_group <= self.n_group,
                f"topk_group ({self.topk_group}) must be between 1 and n_group ({self.n_group})",
            )
            per_group = self.n_routed_experts // self.n_group
            need(
                1 <= self.num_experts_per_tok <= self.topk_group * per_group,
                f"num_experts_per_tok ({self.num_experts_per_tok}) must be between 1 and topk_group * experts per "
                f"group ({self.topk_group * per_group})",
            )
            if self.topk_method == "noaux_tc" and self.n_group > 1:
                need(per_group >= 2, "noaux_tc group scores sum the top-2 experts of a group: need >= 2 per group")
        rs = self.rope_scaling
        if rs:
            kind = rs.get("type", rs.get("rope_type"))
            need(kind in ("yarn", "default", None), f"rope_scaling type {kind!r} is not supported (use 'yarn')")
            if kind == "yarn":
                need(float(rs.get("factor", 0)) >= 1, "rope_scaling.factor must be >= 1 for YaRN")
                need(
                    int(rs.get("original_max_position_embeddings", 0)) > 0,
                    "rope_scaling.original_max_position_embeddings is required for YaRN",
                )

    # ---------------------------------------------------------------- HF JSON
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from an HF config dict (DeepseekV3Config v4/v5 layout, or DeepseekV2Config)."""
        d = dict(d)
        model_type = d.get("model_type", "deepseek_v3")
        if model_type not in _ARCHITECTURES:
            raise ValueError(
                f"config.json has model_type {model_type!r}; nanoseek loads {', '.join(map(repr, _ARCHITECTURES))} "
                "models"
            )
        if model_type == "deepseek_v32":
            _fold_v32_layer_types(d)
        if model_type == "deepseek_v4":
            _fold_v4(d)
        else:
            d.pop("head_dim", None)  # V2/V3 configs put qk_rope_head_dim there; nanoseek's head_dim is V4's
        # aliases used by HF
        if "num_local_experts" in d:
            d.setdefault("n_routed_experts", d.pop("num_local_experts"))
        if "num_mtp_layers" in d:
            d.setdefault("num_nextn_predict_layers", d.pop("num_mtp_layers"))
        if "dtype" in d and "torch_dtype" not in d:
            d["torch_dtype"] = d.pop("dtype")
        # transformers v5 writes `rope_parameters` (with rope_theta inside) instead of rope_scaling
        rp = d.pop("rope_parameters", None)
        if rp:
            rp = dict(rp)
            d.setdefault("rope_theta", rp.pop("rope_theta", 10000.0))
            if rp.get("rope_type", rp.get("type", "default")) != "default" and not d.get("rope_scaling"):
                d["rope_scaling"] = rp
        if d.get("rope_scaling"):
            rs = dict(d["rope_scaling"])
            rs.setdefault("type", rs.get("rope_type"))
            d["rope_scaling"] = rs
        if model_type == "deepseek_v2":  # V2 family: softmax routing, no bias, no MTP unless stated
            d.setdefault("scoring_func", "softmax")
            d.setdefault("topk_method", "greedy")
            d.setdefault("num_nextn_predict_layers", 0)
            d.setdefault("norm_topk_prob", False)
            d.setdefault("n_group", 1)
            d.setdefault("topk_group", 1)
            d.setdefault("first_k_dense_replace", 1)
        if d.get("n_group") is None:
            d["n_group"] = 1
        if d.get("topk_group") is None:
            d["topk_group"] = 1
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names}
        for k in ("num_key_value_heads", "qk_head_dim", "head_dim", "rope_interleave", "transformers_version"):
            extra.pop(k, None)  # derived or fixed; recomputed when written
        if known.get("q_lora_rank") == 0:
            known["q_lora_rank"] = None
        return cls(**known, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """The HF config.json dict, with everything other tools need to interpret the checkpoint."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        d = {**self.extra, **d}
        v3 = self.model_type == "deepseek_v3"
        d["architectures"] = [_ARCHITECTURES[self.model_type]]
        if not (self.sparse_attention or self.is_v4):  # the indexer fields mean nothing to V2/V3 readers
            for k in ("index_n_heads", "index_head_dim", "index_topk"):
                d.pop(k)
        if not self.is_v4:
            for k in _V4_FIELDS:
                d.pop(k)
        d["num_key_value_heads"] = self.num_attention_heads  # MLA expands to per-head K/V (HF default 128)
        d["qk_head_dim"] = self.qk_head_dim
        if v3:
            d["rope_interleave"] = True  # checkpoint rope rows use the interleaved (complex) pairing
        d["moe_layer_freq"] = 1
        d["n_group"], d["topk_group"] = self.n_group, self.topk_group
        if self.rope_scaling:
            rs = dict(self.rope_scaling)
            kind = rs.get("type", rs.get("rope_type"))
            rs["type"] = rs["rope_type"] = kind
            if kind == "yarn":  # HF scales cos/sin by 1.369 if either is missing; llama.cpp needs both
                rs.setdefault("mscale", 1.0)
                rs.setdefault("mscale_all_dim", 1.0)
                rs.setdefault("beta_fast", 32.0)
                rs.setdefault("beta_slow", 1.0)
            d["rope_scaling"] = rs
        if self.is_v4:
            _v4_to_dict(self, d)
        return d

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> ModelConfig:
        """Read `config.json` (a file, or a model directory containing one)."""
        p = Path(path)
        if p.is_dir():
            p = p / "config.json"
        if not p.exists():
            raise FileNotFoundError(f"no config.json at {p}: pass a model directory or its config.json")
        try:
            d = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{p} is not valid JSON ({e}); fix or regenerate the file") from None
        return cls.from_dict(d)

    def save_json(self, path: str | os.PathLike) -> None:
        """Write config.json atomically."""
        p = Path(path)
        if p.is_dir():
            p = p / "config.json"
        atomic_write_text(p, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # ----------------------------------------------------------------- presets
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


_ARCHITECTURES = {
    "deepseek_v2": "DeepseekV2ForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
    "deepseek_v32": "DeepseekV32ForCausalLM",
    "deepseek_v4": "DeepseekV4ForCausalLM",
}

# DeepSeek-V4 layer kinds (transformers' names): window only; + CSA (entries of 4 tokens, an indexer picks
# index_topk of them); + HCA (entries of 128 tokens, all attended)
SLIDING, CSA, HCA = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"
V4_LAYER_TYPES = (SLIDING, CSA, HCA)
V4_COMPRESS_RATES = {CSA: 4, HCA: 128}
_V4_FIELDS = (
    "head_dim",
    "sliding_window",
    "layer_types",
    "compress_rates",
    "compress_rope_theta",
    "o_groups",
    "o_lora_rank",
    "hc_mult",
    "hc_sinkhorn_iters",
    "hc_eps",
    "mlp_layer_types",
    "mtp_layer_types",
    "swiglu_limit",
)
# V3 fields a V4 model does not have; `intermediate_size` would even be read as moe_intermediate_size by HF
_V3_ONLY = (
    "intermediate_size",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "v_head_dim",
    "n_group",
    "topk_group",
    "first_k_dense_replace",
    "moe_layer_freq",
    "qk_head_dim",
    "rope_interleave",
)
# transformers' DeepseekV4Config defaults (= V4-Flash) where they differ from, or are not, this dataclass's
_V4_DEFAULTS: dict[str, Any] = dict(
    hidden_size=4096,
    num_hidden_layers=43,
    num_attention_heads=64,
    q_lora_rank=1024,
    moe_intermediate_size=2048,
    n_routed_experts=256,
    n_shared_experts=1,
    num_experts_per_tok=6,
    scoring_func="sqrtsoftplus",
    routed_scaling_factor=1.5,
    max_position_embeddings=1048576,
    index_n_heads=64,
    index_head_dim=128,
    index_topk=512,
)


def _fold_v4(d: dict[str, Any]) -> None:
    """A DeepseekV4Config dict (transformers' or DeepSeek's hub config.json) -> nanoseek's fields, in place.

    As transformers does: missing fields take its defaults; the hub's legacy fields (`compress_ratios` per layer,
    `num_hash_layers`, `compress_rate_csa/hca`, `qk_rope_head_dim`) fold into layer_types, mlp_layer_types,
    compress_rates and the rotary width (`partial_rotary_factor` * head_dim wins); nested rope_parameters
    {main, compress} become rope_theta, compress_rope_theta and rope_scaling (a flat rope_scaling wins).
    """
    for alias, name in (("intermediate_size", "moe_intermediate_size"), ("num_local_experts", "n_routed_experts")):
        if alias in d:
            d.setdefault(name, d.pop(alias))
    prf = d.pop("partial_rotary_factor", None)
    rp = d.get("rope_parameters")
    if isinstance(rp, dict) and isinstance(rp.get("main"), dict):
        d.pop("rope_parameters")
        main, comp = rp["main"], dict(rp.get("compress") or {})
        d["rope_theta"] = main.get("rope_theta", d.get("rope_theta", 10000.0))
        d["compress_rope_theta"] = comp.pop("rope_theta", d.get("compress_rope_theta", 160000.0))
        prf = prf if prf is not None else main.get("partial_rotary_factor")
        comp.pop("partial_rotary_factor", None)
        if comp.get("rope_type", comp.get("type", "default")) != "default" and not d.get("rope_scaling"):
            d["rope_scaling"] = comp
    for k, v in _V4_DEFAULTS.items():
        d.setdefault(k, v)
    d.setdefault("head_dim", 512)
    if prf is None and "qk_rope_head_dim" not in d:
        prf = 64 / 512
    if prf is not None:
        d["qk_rope_head_dim"] = int(d["head_dim"] * prf)
    rates = dict(d.get("compress_rates") or V4_COMPRESS_RATES)
    for legacy, kind in (("compress_rate_csa", CSA), ("compress_rate_hca", HCA)):
        if d.get(legacy) is not None:
            rates[kind] = d.pop(legacy)
    d["compress_rates"] = rates
    ratios = d.pop("compress_ratios", None)
    if ratios is not None:
        by_ratio = {0: SLIDING, rates[CSA]: CSA, rates[HCA]: HCA}
        bad = sorted(set(ratios) - set(by_ratio))
        if bad:
            raise ValueError(
                f"config.json compress_ratios has rates {bad}; V4 layers compress by 0, {list(rates.values())}"
            )
        n = d["num_hidden_layers"]
        if d.get("layer_types") is None:
            d["layer_types"] = [by_ratio[r] for r in ratios]
        if d.get("mtp_layer_types") is None and len(ratios) > n:  # the MTP blocks' slots
            d["mtp_layer_types"] = [by_ratio[r] for r in ratios[n:]]
    n_hash = d.pop("num_hash_layers", None)
    if d.get("mlp_layer_types") is None and n_hash is not None:
        d["mlp_layer_types"] = ["hash_moe"] * n_hash + ["moe"] * max(0, d["num_hidden_layers"] - n_hash)


def _resolve_v4_layer_types(c: ModelConfig) -> None:
    """Fill V4's per-layer schedules as transformers does (lists may be longer than num_hidden_layers: the hub
    counts MTP layers) and pin the V3-only MoE fields: V4 has no dense layers and no expert groups."""
    n = c.num_hidden_layers
    if c.layer_types is None:  # transformers' default: two HCA layers, then CSA / HCA alternating
        c.layer_types = [HCA] * min(n, 2) + [CSA if i % 2 else HCA for i in range(max(n - 2, 0))]
    if c.mlp_layer_types is None:  # transformers' default: three hash-routed layers
        c.mlp_layer_types = ["hash_moe"] * min(n, 3) + ["moe"] * max(0, n - 3)
    c.layer_types, c.mlp_layer_types = list(c.layer_types[:n]), list(c.mlp_layer_types[:n])
    k = c.num_nextn_predict_layers
    c.mtp_layer_types = (list(c.mtp_layer_types or []) + [SLIDING] * k)[:k]
    c.first_k_dense_replace, c.n_group, c.topk_group = 0, 1, 1


def _validate_v4(c: ModelConfig, need) -> None:
    n = c.num_hidden_layers
    need(len(c.layer_types) == n, f"layer_types has {len(c.layer_types)} entries for {n} layers")
    bad = sorted(set(c.layer_types) - set(V4_LAYER_TYPES))
    need(not bad, f"layer_types entries must be in {V4_LAYER_TYPES}, got {bad}")
    need(len(c.mlp_layer_types) == n, f"mlp_layer_types has {len(c.mlp_layer_types)} entries for {n} layers")
    bad = sorted(set(c.mlp_layer_types) - {"hash_moe", "moe"})
    need(not bad, f"mlp_layer_types entries must be 'hash_moe' or 'moe', got {bad}")
    bad = sorted(set(c.mtp_layer_types) - set(V4_LAYER_TYPES))
    need(not bad, f"mtp_layer_types entries must be in {V4_LAYER_TYPES}, got {bad}")
    for kind in set(c.layer_types + c.mtp_layer_types) - {SLIDING}:
        need(c.compress_rates.get(kind, 0) > 0, f"compress_rates[{kind!r}] must be a positive integer")
    need(c.q_lora_rank is not None, "deepseek_v4 needs q_lora_rank (queries and the indexer read its latent)")
    need(c.head_dim > 0 and c.qk_rope_head_dim <= c.head_dim, "qk_rope_head_dim must be <= head_dim")
    need(c.sliding_window >= 1, f"sliding_window must be >= 1, got {c.sliding_window}")
    need(
        c.o_groups >= 1 and c.num_attention_heads % c.o_groups == 0,
        f"num_attention_heads ({c.num_attention_heads}) must be divisible by o_groups ({c.o_groups})",
    )
    need(
        c.o_lora_rank >= 1 and c.hc_mult >= 1 and c.hc_sinkhorn_iters >= 1,
        "o_lora_rank, hc_mult, hc_sinkhorn_iters >= 1",
    )
    need(c.n_routed_experts > 0 and c.n_shared_experts == 1, "deepseek_v4 has routed experts and one shared expert")
    need(c.swiglu_limit > 0, f"swiglu_limit must be > 0 (transformers clamps with it always), got {c.swiglu_limit}")
    if CSA in c.layer_types + c.mtp_layer_types:
        need(min(c.index_n_heads, c.index_head_dim, c.index_topk) > 0, "index_n_heads/head_dim/topk must be > 0")
        need(c.qk_rope_head_dim <= c.index_head_dim, "index_head_dim must be >= qk_rope_head_dim")


def _v4_to_dict(c: ModelConfig, d: dict[str, Any]) -> None:
    """config.json for V4: transformers' fields, plus the legacy forms DeepSeek's reference code and llama.cpp's
    converter read (compress_ratios, num_hash_layers, qk_rope_head_dim; transformers ignores them here)."""
    for k in _V3_ONLY:
        d.pop(k, None)
    d["num_key_value_heads"] = 1
    d["partial_rotary_factor"] = c.qk_rope_head_dim / c.head_dim
    d.pop("mtp_layer_types")  # DeepSeek's form: the MTP blocks' rates follow the layers' in compress_ratios
    d["compress_ratios"] = [c.compress_rate(i) for i in range(c.num_hidden_layers + c.num_nextn_predict_layers)]
    if c.rope_scaling:  # as given: V4 applies no YaRN magnitude factor, so no mscale keys are added
        kind = c.rope_scaling.get("type", c.rope_scaling.get("rope_type"))
        d["rope_scaling"] = {**c.rope_scaling, "type": kind, "rope_type": kind}
    n_hash = next((i for i, kind in enumerate(c.mlp_layer_types) if kind != "hash_moe"), c.num_hidden_layers)
    if "hash_moe" not in c.mlp_layer_types[n_hash:]:
        d["num_hash_layers"] = n_hash


def _fold_v32_layer_types(d: dict[str, Any]) -> None:
    """transformers' V3.2 config lists per-layer kinds; nanoseek derives them from first_k_dense_replace.

    Pops `mlp_layer_types` (a dense prefix then MoE layers, as DeepSeek ships) and `layer_types` (every layer
    "indexed_attention") from d, refusing patterns nanoseek cannot build.
    """
    mlp = d.pop("mlp_layer_types", None)
    if mlp is not None:
        n_dense = next((i for i, kind in enumerate(mlp) if kind != "dense"), len(mlp))
        if any(kind != "sparse" for kind in mlp[n_dense:]):
            raise ValueError(f"config.json mlp_layer_types {mlp} is not dense layers followed by MoE layers")
        d["first_k_dense_replace"] = n_dense
    layers = d.pop("layer_types", None)
    if layers is not None and any(kind != "indexed_attention" for kind in layers):
        raise ValueError(f"config.json layer_types {layers}: deepseek_v32 layers are all 'indexed_attention'")


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN attention temperature m = 0.1 * mscale * ln(s) + 1 (1 when s <= 1)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0
