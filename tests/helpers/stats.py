"""Goodness of fit for tests that check sampled tokens against exact probabilities."""

from __future__ import annotations

import math

import torch


def chi2_ok(counts: torch.Tensor, probs: torch.Tensor) -> bool:
    """Pearson chi-square below the 0.999 quantile (Wilson-Hilferty approximation) for len(probs)-1 dof."""
    n = counts.sum()
    expected = n * probs.double()
    stat = ((counts.double() - expected) ** 2 / expected).sum().item()
    k = len(probs) - 1
    return stat < k * (1 - 2 / (9 * k) + 3.09 * math.sqrt(2 / (9 * k))) ** 3
