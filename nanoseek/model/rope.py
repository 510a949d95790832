"""Rotary position embedding on the decoupled `qk_rope_head_dim` part, with YaRN context extension.

Checkpoint weights pair rotary dims as adjacent (2j, 2j+1) ("interleaved", the reference code's complex
form). `apply_rope` rotates those pairs and writes the result de-interleaved ([evens', odds']), exactly as
transformers' `rope_interleave=True` path: q and k get the same permutation, so q.k is unchanged.
"""

from __future__ import annotations

import math

import torch

from nanoseek.config import ModelConfig, yarn_mscale


def rope_frequencies(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies theta'_j [qk_rope_head_dim/2] and the cos/sin magnitude ("attention_factor").

    YaRN (Peng et al. 2023): pairs rotating faster than beta_fast turns over the original context keep their
    frequency, those slower than beta_slow are divided by `factor`, a linear ramp blends the ones between.
    """
    dim, base = config.qk_rope_head_dim, config.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim))
    rs = config.yarn
    if rs is None:
        return inv_freq, 1.0
    factor = float(rs["factor"])
    orig = int(rs["original_max_position_embeddings"])
    beta_fast, beta_slow = float(rs.get("beta_fast") or 32), float(rs.get("beta_slow") or 1)

    def correction_dim(rotations: float) -> float:  # dim index whose wavelength makes `rotations` turns
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    # HF semantics: cos/sin are scaled by mscale/mscale_all_dim (1.0 for real configs), else by m(factor)
    mscale, mscale_all_dim = rs.get("mscale"), rs.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        attention_factor = yarn_mscale(factor, float(mscale)) / yarn_mscale(factor, float(mscale_all_dim))
    else:
        attention_factor = yarn_mscale(factor)
    return inv_freq, attention_factor


def rope_cos_sin(
    inv_freq: torch.Tensor, attention_factor: float, positions: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of the angles positions * inv_freq: [..., qk_rope_head_dim/2] for positions [...]."""
    angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq.to(positions.device)
    cos, sin = angles.cos(), angles.sin()
    if attention_factor != 1.0:
        cos, sin = cos * attention_factor, sin * attention_factor
    return cos.to(dtype), sin.to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x [..., T, heads, d_R] by cos/sin [..., T, 1, d_R/2]; output de-interleaved."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def apply_rope_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate half-split pairs (j, j + d/2) of x [..., T, heads, d] by cos/sin [..., T, 1, d/2] ("NEOX" pairing).

    The V3.2 lightning indexer's RoPE (transformers, llama.cpp, DeepSeek's code after its 2025-11-17 fix);
    the main MLA uses the interleaved pairing of `apply_rope`.
    """
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def apply_rope_tail(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V4's RoPE: rotate interleaved pairs (2j, 2j+1) of the LAST 2 * cos.shape[-1] dims of x
    [..., T, heads, d] by cos/sin [..., T, 1, d_R/2], pairs kept in place (V4 reads keys as values, so the
    layout must survive; -sin undoes the rotation). The leading d - d_R dims pass through."""
    rope_dim = 2 * cos.shape[-1]
    nope, rot = x[..., :-rope_dim], x[..., -rope_dim:]
    x1, x2 = rot[..., 0::2], rot[..., 1::2]
    rot = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    return torch.cat((nope, rot), dim=-1)
