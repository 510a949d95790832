"""ModelConfig: the DeepSeek-V3 hyper-parameters under Hugging Face's field names, and named presets.

A model directory's `config.json` is the HF `DeepseekV3Config` JSON (or `DeepseekV2Config` for V2 checkpoints),
so the same file is read by nanoseek, `transformers`, vLLM and llama.cpp's converter.
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
            self.model_type in ("deepseek_v3", "deepseek_v2"),
            f"model_type must be 'deepseek_v3' or 'deepseek_v2', got {self.model_type!r}",
        )
        if self.n_routed_experts > 0 and self.first_k_dense_replace < self.num_hidden_layers:
            need(self.moe_intermediate_size > 0, "moe_intermediate_size must be > 0 for MoE layers")
            need(
                self.scoring_func in ("sigmoid", "softmax"),
                f"scoring_func must be 'sigmoid' or 'softmax', got {self.scoring_func!r}",
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
        if model_type not in ("deepseek_v3", "deepseek_v2"):
            raise ValueError(
                f"config.json has model_type {model_type!r}; nanoseek loads 'deepseek_v3' and 'deepseek_v2' models"
            )
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
        d["architectures"] = ["DeepseekV3ForCausalLM" if v3 else "DeepseekV2ForCausalLM"]
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


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN attention temperature m = 0.1 * mscale * ln(s) + 1 (1 when s <= 1)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


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
}
