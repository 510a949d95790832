"""Exact prefix caching: the cache state of prompt prefixes seen before, kept in fixed-size blocks keyed by a hash
of every token up to the block's end (vLLM's scheme), so a request that starts like an earlier one (a long system
prompt, earlier turns, few-shot examples) copies that state into its cache row instead of recomputing it.

Blocks live in preallocated tensors, at most `max_blocks` of them; the least recently used block is evicted to
make room. Only whole blocks are reused, and never a prompt's last token: the model must still compute it to give
the first output token's logits. A block's key chains its parent's, so a hit means the whole prefix matched.

V3 / V3.2 (`PrefixCache`): a block is its positions' latents (+ indexer keys), the whole per-token state.
V4 (`PrefixCacheV4`): a cache row is not per-token (a window ring, pooled entries, open windows), so a block keeps
what restoring a row at the block's end needs (see the class).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch

from nanoseek.config import CSA, ModelConfig
from nanoseek.infer.cache import CompressedKVCache
from nanoseek.model.compressed_attention import CompressorCache


def block_hashes(ids: list[int], block_size: int) -> list[int]:
    """The chained key of each whole block of `ids`: block i's key depends on tokens [0, (i + 1) * block_size)."""
    keys, parent = [], 0
    for i in range(len(ids) // block_size):
        parent = hash((parent, tuple(ids[i * block_size : (i + 1) * block_size])))
        keys.append(parent)
    return keys


class _Blocks:
    """The LRU index of cached blocks: chained key -> row of the subclass's store. `queries` and `hits` count
    prompt tokens looked up and found (vLLM's `prefix_cache_queries` / `prefix_cache_hits`)."""

    def __init__(self, max_blocks: int, block_size: int) -> None:
        if max_blocks < 1 or block_size < 1:
            raise ValueError(f"prefix cache needs max_blocks >= 1 and block_size >= 1, got {max_blocks}, {block_size}")
        self.block_size, self.max_blocks = block_size, max_blocks
        self.rows: OrderedDict[int, int] = OrderedDict()  # key -> row of the store, least recently used first
        self.queries = self.hits = 0

    def _match(self, ids: list[int]) -> list[int]:
        """Rows of the longest cached chain of whole blocks of ids[:-1] (the last token is always computed)."""
        self.queries += len(ids)
        rows = []
        for key in block_hashes(ids[: len(ids) - 1], self.block_size):
            row = self.rows.get(key)
            if row is None:
                break
            self.rows.move_to_end(key)
            rows.append(row)
        self.hits += len(rows) * self.block_size
        return rows

    def _new_blocks(self, ids: list[int], first: int = 0) -> list[tuple[int, int]]:
        """(block index, store row) for each whole block of `ids` from block `first` on that is not cached yet,
        rows taken from the free ones or the least recently used (the caller fills them); cached blocks become
        the most recently used."""
        out = []
        for i, key in enumerate(block_hashes(ids, self.block_size)):
            if key in self.rows:
                self.rows.move_to_end(key)
                continue
            if i < first:  # nothing to fill it from
                continue
            if len(self.rows) < self.max_blocks:
                row = len(self.rows)
            else:
                _, row = self.rows.popitem(last=False)
            self.rows[key] = row
            out.append((i, row))
        return out

    @property
    def n_tokens(self) -> int:
        return len(self.rows) * self.block_size


class PrefixCache(_Blocks):
    """V3 / V3.2: latents [layers, max_blocks, block_size, width] of prompt blocks, LRU-bounded."""

    def __init__(self, kv: torch.Tensor, max_blocks: int, block_size: int = 16) -> None:
        super().__init__(max_blocks, block_size)
        layers, _, _, width = kv.shape
        self.store = torch.zeros(layers, max_blocks, block_size, width, dtype=kv.dtype, device=kv.device)

    def load(self, ids: list[int], kv: torch.Tensor, slot: int) -> int:
        """Copy the longest cached prefix of `ids` (whole blocks, not the last token) into cache row `slot`;
        returns how many tokens it holds (0 on a miss)."""
        rows = self._match(ids)
        n = len(rows) * self.block_size
        if rows:
            kv[:, slot, :n] = self.store[:, rows].flatten(1, 2)
        return n

    def save(self, ids: list[int], kv: torch.Tensor, slot: int) -> None:
        """Keep the whole blocks of `ids`, whose latents cache row `slot` now holds, evicting the least recently
        used blocks when full."""
        B = self.block_size
        for i, row in self._new_blocks(ids):
            self.store[:, row] = kv[:, slot, i * B : (i + 1) * B]


@dataclass
class _CompressorStore:
    """One compressor's share of each cached block (PrefixCacheV4)."""

    rate: int
    entries: torch.Tensor  # [max_blocks, block_size // rate, dim]: the entries the block completes
    open_kv: torch.Tensor | None  # CSA: [max_blocks, rate, width], its last window's projections (ring layout)
    open_score: torch.Tensor | None


class PrefixCacheV4(_Blocks):
    """DeepSeek-V4: a cache row at position L is a window ring (keys of L-W..L-1), the compressed entries, and the
    open windows' projections. Blocks are a multiple of every compression rate long, so at a block's end no window
    is open except CSA's overlap (the next entry pools the last window's first halves). A block therefore keeps,
    per layer: the keys of its last min(block, W) positions, the entries (CSA: and the indexer's keys) it completes,
    and for CSA compressors the projections of its last window. Loading L = n blocks writes the entries of all n,
    the ring from the keys of the blocks that reach into L-W..L-1, and the last block's open CSA windows: the row a
    prefill of those L tokens leaves, in every part that a later position reads.

    The ring forgets older positions, so what a block keeps is recorded while its prompt is prefilled: `load`
    turns the row's tapes on (LayerCacheV4.tape, CompressorCache.tape: each forward appends its new tokens' keys
    and projections) and `save` reads and clears them; call them around the prefill, as for PrefixCache."""

    def __init__(self, config: ModelConfig, cache: CompressedKVCache, max_blocks: int, block_size: int) -> None:
        super().__init__(max_blocks, block_size)
        rates = [config.compress_rate(i) for i in range(config.num_hidden_layers)]
        if any(r and block_size % r for r in rates):
            raise ValueError(f"a V4 prefix block ({block_size} tokens) must be a multiple of every rate {set(rates)}")
        self.windows: list[torch.Tensor] = []  # per layer [max_blocks, min(block, ring), head_dim]
        self.compressors: list[list[_CompressorStore]] = []  # per layer: main compressor, CSA indexer
        for i, layer in enumerate(cache.layers):
            ring, d = layer.window.shape[1:]
            self.windows.append(layer.window.new_zeros(max_blocks, min(block_size, ring), d))
            csa = config.attention_type(i) == CSA
            self.compressors.append([self._compressor(c, rates[i], csa) for c in _compressors(layer)])
        self._start = 0  # where the taped prefill began

    def _compressor(self, c: CompressorCache, rate: int, csa: bool) -> _CompressorStore:
        n, width = self.max_blocks, c.kv.shape[-1]
        entries = c.entries.new_zeros(n, self.block_size // rate, c.entries.shape[-1])
        if not csa:  # an HCA window is closed at every block boundary: its projections are never read again
            return _CompressorStore(rate, entries, None, None)
        return _CompressorStore(rate, entries, c.kv.new_zeros(n, rate, width), c.score.new_zeros(n, rate, width))

    def load(self, ids: list[int], cache: CompressedKVCache, slot: int) -> int:
        """Restore the longest cached prefix of `ids` (whole blocks, not the last token) into cache row `slot` and
        start recording the prefill that follows; returns how many tokens it holds (0 on a miss)."""
        rows = self._match(ids)
        B, L = self.block_size, len(rows) * self.block_size
        for layer, window, stores in zip(cache.layers, self.windows, self.compressors):
            layer.tape = []
            for c in _compressors(layer):
                c.tape = []
            if not rows:
                continue
            ring, k = layer.window.shape[1], window.shape[1]
            last = rows[-math.ceil(ring / B) :]  # the blocks holding positions L - ring .. L - 1
            ends = (len(rows) - len(last) + 1 + torch.arange(len(last)))[:, None] * B
            pos = ends - k + torch.arange(k)  # [blocks, k]: the positions of their kept keys
            keep = pos >= L - ring
            layer.window[slot, pos[keep] % ring] = window[last][keep]
            for c, s in zip(_compressors(layer), stores):
                c.entries[slot, : L // s.rate] = s.entries[rows].flatten(0, 1)
                if s.open_kv is not None:  # ring rows of positions L - rate .. L - 1
                    at = (L - s.rate + torch.arange(s.rate)) % c.kv.shape[1]
                    c.kv[slot, at], c.score[slot, at] = s.open_kv[rows[-1]], s.open_score[rows[-1]]
        self._start = L
        return L

    def save(self, ids: list[int], cache: CompressedKVCache, slot: int) -> None:
        """Keep the whole blocks of `ids` that cache row `slot` has just prefilled (from the taped prefill) and
        stop recording, evicting the least recently used blocks when full."""
        taped = []
        for layer in cache.layers:
            keys = torch.cat(layer.tape, dim=1)[0]  # [P - start, head_dim]
            projections = [tuple(torch.cat(t, dim=1)[0] for t in zip(*c.tape)) for c in _compressors(layer)]
            taped.append((keys, projections))
            layer.tape = None
            for c in _compressors(layer):
                c.tape = None
        B, start = self.block_size, self._start
        # blocks before `start` were loaded (if one has been evicted since, in a tiny cache, it is not re-made)
        for i, row in self._new_blocks(ids, first=start // B):
            b = (i + 1) * B - start  # the block's end in the tape
            for layer, window, stores, (keys, projections) in zip(cache.layers, self.windows, self.compressors, taped):
                window[row] = keys[b - window.shape[1] : b]
                for c, s, (kv, score) in zip(_compressors(layer), stores, projections):
                    s.entries[row] = c.entries[slot, i * B // s.rate : (i + 1) * B // s.rate]
                    if s.open_kv is not None:
                        s.open_kv[row], s.open_score[row] = kv[b - s.rate : b], score[b - s.rate : b]


def _compressors(layer) -> list[CompressorCache]:
    """A V4 layer cache's compressors: the main one (CSA, HCA), then the CSA indexer's."""
    return [c for c in (layer.compressor, layer.indexer) if c is not None]


def prefix_block_size(config: ModelConfig) -> int:
    """Tokens per prefix-cache block: 16, or for V4 the least multiple of 16 and every compression rate."""
    if not config.is_v4:
        return 16
    return math.lcm(16, *(config.compress_rate(i) for i in range(config.num_hidden_layers) if config.compress_rate(i)))
