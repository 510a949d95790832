"""Indexer top-k selections recorded during a forward, and the check that none hinged on a tie.

Our indexer breaks exact ties by the earliest key (nanoseek.model.indexer.select_topk); transformers' plain `topk`
breaks them by its algorithm. Parity with transformers is only defined where the k-th and (k+1)-th visible scores
differ, so parity tests assert that (spec P9)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from nanoseek.model import compressed_attention, indexer

Selection = tuple[torch.Tensor, torch.Tensor, int]  # scores [B, Tq, S], visible [B, Tq, S], topk


@contextlib.contextmanager
def recorded_selections() -> Iterator[list[Selection]]:
    """Every select_topk call (V3.2's Indexer and V4's compressed attention) inside the block, in call order."""
    seen: list[Selection] = []
    original = indexer.select_topk

    def record(scores: torch.Tensor, visible: torch.Tensor, topk: int) -> torch.Tensor:
        seen.append((scores, visible.expand(scores.shape), topk))
        return original(scores, visible, topk)

    indexer.select_topk = compressed_attention.select_topk = record
    try:
        yield seen
    finally:
        indexer.select_topk = compressed_attention.select_topk = original


def assert_decisive(selections: list[Selection], margin: float = 1e-5) -> int:
    """Each row with more than topk visible keys has a gap above `margin` between its k-th and (k+1)-th score, so
    no tie-break rule and no float rounding (another implementation's) can change the choice. Returns how many
    queries really chose (more than k visible)."""
    assert selections, "no indexer selection was made: the test does not exercise the indexer"
    chose = 0
    for scores, visible, k in selections:
        s = scores.masked_fill(~visible, float("-inf")).sort(dim=-1, descending=True).values
        rows = visible.sum(-1) > k
        if rows.any():
            gap = (s[..., k - 1] - s[..., k])[rows]
            assert gap.min().item() > margin, f"near-tie at the top-k boundary: {gap.min().item()}"
            chose += int(rows.sum())
    return chose
