"""DeepSeekMoE's experts as llama.cpp stacks them: shared by the deepseek2 / deepseek32 writer (gguf.py) and the
deepseek4 one (gguf_v4.py), which gguf.py itself calls, so neither imports the other for it."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from nanoseek.config import ModelConfig


def expert_tensors(sd: dict[str, torch.Tensor], m: str, b: str, c: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Routed experts stacked per projection ([E, out, in], as the converter stacks them) and the shared expert."""
    I = c.moe_intermediate_size
    w13, w2 = sd[m + "experts.w13"], sd[m + "experts.w2"]  # [E, d, 2I], [E, I, d]
    yield b + "ffn_gate_exps.weight", w13[:, :, :I].transpose(1, 2)  # [E, I, d]: per expert [out, in]
    yield b + "ffn_up_exps.weight", w13[:, :, I:].transpose(1, 2)
    yield b + "ffn_down_exps.weight", w2.transpose(1, 2)  # [E, d, I]
    for proj in ("gate", "up", "down"):
        yield b + f"ffn_{proj}_shexp.weight", sd[m + f"shared_experts.{proj}_proj.weight"]
