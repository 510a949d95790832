"""Learning-rate schedules as plain functions: linear warmup times a decay over training progress.

lr(step, progress) = max_lr * warmup(step) * decay(progress). Warmup counts optimizer steps; the decay
follows `progress` in [0, 1], the fraction of the run done: step / steps, or elapsed / time_budget when
the run is sized by wall time (the cosine over the time budget of shared/cpu-feasibility.md).
"""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "wsd")


def warmup_factor(step: int, warmup: int) -> float:
    """Linear warmup: (step + 1) / warmup for the first `warmup` steps (0-based), then 1."""
    return 1.0 if warmup <= 0 else min(1.0, (step + 1) / warmup)


def cosine_decay(progress: float, min_ratio: float = 0.1) -> float:
    """1 at progress 0, falling along a half cosine to min_ratio at progress 1 (and after)."""
    p = min(max(progress, 0.0), 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))


def wsd_decay(progress: float, min_ratio: float = 0.1, decay_frac: float = 0.2) -> float:
    """Warmup-stable-decay: 1 until 1 - decay_frac of the run, then linear down to min_ratio at progress 1."""
    p = min(max(progress, 0.0), 1.0)
    start = 1.0 - decay_frac
    if decay_frac <= 0 or p <= start:
        return 1.0
    return 1.0 - (1.0 - min_ratio) * (p - start) / decay_frac


def lr_at(
    step: int,
    progress: float,
    max_lr: float,
    schedule: str = "cosine",
    warmup: int = 0,
    min_ratio: float = 0.1,
    decay_frac: float = 0.2,
) -> float:
    """The learning rate of optimizer step `step` (0-based) taken at `progress` in [0, 1] of the run."""
    if schedule == "cosine":
        decay = cosine_decay(progress, min_ratio)
    elif schedule == "wsd":
        decay = wsd_decay(progress, min_ratio, decay_frac)
    else:
        raise ValueError(f"unknown schedule {schedule!r}: choose one of {', '.join(SCHEDULES)}")
    return max_lr * warmup_factor(step, warmup) * decay
