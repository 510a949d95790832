"""Exact prefix caching: the latents of prompt prefixes seen before, kept in fixed-size blocks keyed by a hash of
every token up to the block's end (vLLM's scheme), so a request that starts like an earlier one (a long system
prompt, earlier turns, few-shot examples) copies those latents into its cache row instead of recomputing them.

Blocks live in one preallocated tensor, at most `max_blocks` of them; the least recently used block is evicted to
make room. Only whole blocks are reused, and never a prompt's last token: the model must still compute it to give
the first output token's logits. A block's key chains its parent's, so a hit means the whole prefix matched.
"""

from __future__ import annotations

from collections import OrderedDict

import torch


def block_hashes(ids: list[int], block_size: int) -> list[int]:
    """The chained key of each whole block of `ids`: block i's key depends on tokens [0, (i + 1) * block_size)."""
    keys, parent = [], 0
    for i in range(len(ids) // block_size):
        parent = hash((parent, tuple(ids[i * block_size : (i + 1) * block_size])))
        keys.append(parent)
    return keys


class PrefixCache:
    """Latents [layers, max_blocks, block_size, width] of prompt blocks, LRU-bounded. `queries` and `hits` count
    prompt tokens looked up and found (vLLM's `prefix_cache_queries` / `prefix_cache_hits`)."""

    def __init__(self, kv: torch.Tensor, max_blocks: int, block_size: int = 16) -> None:
        if max_blocks < 1 or block_size < 1:
            raise ValueError(f"prefix cache needs max_blocks >= 1 and block_size >= 1, got {max_blocks}, {block_size}")
        layers, _, _, width = kv.shape
        self.block_size, self.max_blocks = block_size, max_blocks
        self.store = torch.zeros(layers, max_blocks, block_size, width, dtype=kv.dtype, device=kv.device)
        self.rows: OrderedDict[int, int] = OrderedDict()  # key -> row of `store`, least recently used first
        self.queries = self.hits = 0

    def load(self, ids: list[int], kv: torch.Tensor, slot: int) -> int:
        """Copy the longest cached prefix of `ids` (whole blocks, not the last token) into cache row `slot`;
        returns how many tokens it holds (0 on a miss)."""
        B = self.block_size
        self.queries += len(ids)
        rows = []
        for key in block_hashes(ids[: len(ids) - 1], B):
            row = self.rows.get(key)
            if row is None:
                break
            self.rows.move_to_end(key)
            rows.append(row)
        if rows:
            n = len(rows) * B
            kv[:, slot, :n] = self.store[:, rows].flatten(1, 2)
            self.hits += n
        return len(rows) * B

    def save(self, ids: list[int], kv: torch.Tensor, slot: int) -> None:
        """Keep the whole blocks of `ids`, whose latents cache row `slot` now holds, evicting the least recently
        used blocks when full."""
        B = self.block_size
        for i, key in enumerate(block_hashes(ids, B)):
            if key in self.rows:
                self.rows.move_to_end(key)
                continue
            if len(self.rows) < self.max_blocks:
                row = len(self.rows)
            else:
                _, row = self.rows.popitem(last=False)
            self.store[:, row] = kv[:, slot, i * B : (i + 1) * B]
            self.rows[key] = row

    @property
    def n_tokens(self) -> int:
        return len(self.rows) * self.block_size
