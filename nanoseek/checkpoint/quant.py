"""DeepSeek's low-precision weight formats, dequantised tensor by tensor on load (and written, for tests/export).

* FP8 (V3, V3.1, V3.2, V4): e4m3 values Q with one scale per 128 x 128 block, W = Q[r, c] * S[r // 128, c // 128]
  (edge blocks partial). V3/V3.1/V3.2 store S as `<name>_scale_inv` (float32; V3.1 on made them powers of two,
  `scale_fmt: ue8m0`); V4 as `<name>.scale` in E8M0, a bare exponent byte b meaning 2^(b - 127).
* FP4 (V4's routed experts, `expert_dtype: fp4`): MXFP4, e2m1 values packed two per byte (element 2i in the low
  nibble, 2i + 1 in the high one: torch's float4_e2m1fn_x2 [out, in / 2]) with one E8M0 scale per 32 inputs
  ([out, in / 32]).
Every dequantised tensor is float32, made from one memory-mapped tensor at a time (checkpoint/hf.py).
"""

from __future__ import annotations

import torch

E4M3_MAX = 448.0
FP4_BLOCK = 32
# e2m1 codes 0..15: sign bit 3, then the magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6
FP4_VALUES = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6])
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
FP4_DTYPE = torch.float4_e2m1fn_x2
QUANTIZED = (*FP8_DTYPES, FP4_DTYPE)


def dequantize(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """FP8 (block `block`) or packed FP4 (MXFP4) weights with their scales -> float32 [out, in]."""
    if q.dtype == FP4_DTYPE:
        return dequantize_fp4(q, scale)
    return dequantize_fp8(q, scale, block)


def dequantize_fp8(q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """W[r, c] = Q[r, c] * S[r // 128, c // 128] (edge blocks partial), in float32; S float32 or E8M0."""
    rows, cols = q.shape
    s = scale_inv.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return q.float() * s


def dequantize_fp4(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """MXFP4 [out, in / 2] (float4_e2m1fn_x2 or uint8) with E8M0 scales [out, in / 32] -> float32 [out, in]."""
    codes = packed.view(torch.uint8)
    rows = codes.shape[0]
    nibbles = torch.stack((codes & 0x0F, codes >> 4), dim=-1).view(rows, -1).long()  # low nibble first
    return FP4_VALUES[nibbles] * scale.float().repeat_interleave(FP4_BLOCK, dim=1)


def _ue8m0(s: torch.Tensor) -> torch.Tensor:
    """The power of two at or above s (UE8M0 scales round up, so no value overflows the format)."""
    return torch.exp2(torch.ceil(torch.log2(s.clamp(min=2.0**-126))))


def quantize_fp8(
    w: torch.Tensor, block: tuple[int, int] = (128, 128), ue8m0: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 values, float32 block scales S with W ~ Q * S): the published layout's writer, per 128 x 128 block
    scaled so its largest magnitude fits 448; ue8m0 rounds each scale up to a power of two (V3.1 on)."""
    rows, cols = w.shape
    br, bc = -(-rows // block[0]), -(-cols // block[1])
    padded = w.float().new_zeros(br * block[0], bc * block[1])
    padded[:rows, :cols] = w.float()
    blocks = padded.view(br, block[0], bc, block[1])
    scale = (blocks.abs().amax(dim=(1, 3)) / E4M3_MAX).clamp(min=1e-12)
    if ue8m0:
        scale = _ue8m0(scale)
    q = (blocks / scale[:, None, :, None]).view(br * block[0], bc * block[1])[:rows, :cols]
    return q.to(torch.float8_e4m3fn), scale


def quantize_fp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float4_e2m1fn_x2 [out, in / 2], E8M0 scales [out, in / 32]): MXFP4, each group of 32 inputs scaled by a
    power of two so its largest magnitude fits 6, every value rounded to the nearest e2m1 value."""
    rows, cols = w.shape
    if cols % FP4_BLOCK:
        raise ValueError(f"MXFP4 needs the input width to be a multiple of {FP4_BLOCK}, got {cols}")
    groups = w.float().view(rows, cols // FP4_BLOCK, FP4_BLOCK)
    scale = _ue8m0(groups.abs().amax(dim=-1) / 6.0)  # [out, in / 32]
    x = (groups / scale[..., None]).view(rows, cols)
    magnitudes = FP4_VALUES[:8]
    code = torch.bucketize(x.abs(), (magnitudes[1:] + magnitudes[:-1]) / 2)  # nearest magnitude
    code = (code + 8 * (x < 0)).to(torch.uint8).view(rows, cols // 2, 2)
    return (code[..., 0] | (code[..., 1] << 4)).view(FP4_DTYPE), to_e8m0(scale)


def to_e8m0(scale: torch.Tensor) -> torch.Tensor:
    """Power-of-two float scales -> E8M0 (float8_e8m0fnu: the byte log2(s) + 127), as DeepSeek-V4 stores them."""
    return (torch.log2(scale.float()).round() + 127).to(torch.uint8).view(torch.float8_e8m0fnu)
