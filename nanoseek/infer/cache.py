"""Decode caches. V3/V3.2: the MLA latent cache, per layer, per batch slot, per position only
[kv_a_layernorm(c_KV) | rope(k_pe)] (+ the indexer key for V3.2): (kv_lora_rank + qk_rope_head_dim) numbers per
token per layer (576 for DeepSeek-V3, vs 40,960 for materialised per-head K and V). V4: `CompressedKVCache`, a
window of W keys per layer plus one entry per `rate` tokens in compressed layers (compressed_attention.py).
Slots are preallocated; a finished sequence's slot is reused by the next. `kv_cache_bytes` gives the size of
either at any length by formula.
"""

from __future__ import annotations

import torch

from nanoseek.config import CSA, ModelConfig
from nanoseek.model.compressed_attention import LayerCacheV4, empty_layer_cache


class _Slots:
    """Which cache rows are free; a subclass holds the tensors (`tensors()`, slot on dim 0 or 1)."""

    def __init__(self, n_slots: int) -> None:
        self.n_slots = n_slots
        self.lengths = [0] * n_slots  # tokens stored per slot
        self._free = list(range(n_slots - 1, -1, -1))

    @property
    def n_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError("no free cache slot; wait for a running sequence to finish")
        slot = self._free.pop()
        self.lengths[slot] = 0
        return slot

    def release(self, slot: int) -> None:
        self.lengths[slot] = 0
        self._free.append(slot)

    def tensors(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def nbytes(self) -> int:
        """Bytes the cache's tensors hold, all slots."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def bytes_per_sequence(self) -> int:
        """Measured: the bytes one slot's share of the cache tensors holds (every slot is preallocated for max_len
        tokens), to compare with `kv_cache_bytes(config, max_len)`."""
        return self.nbytes() // self.n_slots


class LatentCache(_Slots):
    def __init__(
        self,
        config: ModelConfig,
        n_slots: int,
        max_len: int,
        n_layers: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__(n_slots)
        self.n_layers = config.num_hidden_layers if n_layers is None else n_layers
        self.max_len = max_len
        self.width = config.latent_cache_width
        self.kv = torch.zeros(self.n_layers, n_slots, max_len, self.width, dtype=dtype, device=device)

    def tensors(self) -> list[torch.Tensor]:
        return [self.kv]

    def bytes_per_token(self) -> int:
        """(kv_lora_rank + qk_rope_head_dim [+ index_head_dim for V3.2]) x layers x dtype size."""
        return self.width * self.n_layers * self.kv.element_size()

    def copy_slot(self, src: int, dst: int) -> None:
        """Share a prefilled prompt: copy src's cached positions into dst (e.g. G samples of one prompt)."""
        n = self.lengths[src]
        self.kv[:, dst, :n] = self.kv[:, src, :n]
        self.lengths[dst] = n


class CompressedKVCache(_Slots):
    """DeepSeek-V4's decode cache: per layer a LayerCacheV4 (window ring, compressed entries, the unfinished
    windows' projections, CSA indexer keys) for n_slots sequences of up to max_len tokens. Pass `layers` to
    TransformerV4.forward_cached. layer_ids: whose state it holds, the main layers by default (MTP block k is
    layer num_hidden_layers + k: `mtp_decode_cache`). One position written past a slot's length is never read
    before it is written again (LayerCacheV4), so cutting `lengths` back by that one position is a complete
    rollback."""

    def __init__(
        self,
        config: ModelConfig,
        n_slots: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        layer_ids: range | None = None,
    ) -> None:
        super().__init__(n_slots)
        self.max_len = max_len
        ids = range(config.num_hidden_layers) if layer_ids is None else layer_ids
        self.layers: list[LayerCacheV4] = [empty_layer_cache(config, i, n_slots, max_len, dtype, device) for i in ids]

    def tensors(self) -> list[torch.Tensor]:
        return [t for layer in self.layers for t in layer.tensors()]

    def copy_slot(self, src: int, dst: int) -> None:
        """Share a prefilled prompt: src's whole state (window, entries, open windows) into dst."""
        for layer in self.layers:
            for t in layer.tensors():
                t[dst] = t[src]
        self.lengths[dst] = self.lengths[src]


def decode_cache(
    config: ModelConfig,
    n_slots: int,
    max_len: int,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> LatentCache | CompressedKVCache:
    """The model family's own decode cache: V4's compressed one, else MLA's latent one (V3.2: + indexer keys)."""
    kind = CompressedKVCache if config.is_v4 else LatentCache
    return kind(config, n_slots, max_len, dtype=dtype, device=device)


def mtp_decode_cache(
    config: ModelConfig,
    n_slots: int,
    max_len: int,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> LatentCache | CompressedKVCache:
    """The first MTP depth's own decode cache, beside the main one (speculative decoding): one MLA latent layer
    (V3 / V3.2, with the indexer's keys), or the V4 MTP block's LayerCacheV4 (`layers[0]`)."""
    if config.is_v4:
        n = config.num_hidden_layers
        return CompressedKVCache(config, n_slots, max_len, dtype, device, layer_ids=range(n, n + 1))
    return LatentCache(config, n_slots, max_len, n_layers=1, dtype=dtype, device=device)


def kv_cache_bytes(config: ModelConfig, seq_len: int, dtype_bytes: int = 2) -> int:
    """Decode-cache bytes that one sequence of seq_len tokens needs (the main layers, no MTP), by formula.

    V3 / V3.2: (kv_lora_rank + qk_rope_head_dim [+ index_head_dim]) numbers per token per layer.
    V4, per layer: a window of min(W, seq_len) keys of head_dim; compressed layers one entry of head_dim per
    `rate` tokens plus the open windows' projections (kv and score: rate x head_dim each for HCA, 2 rate x
    2 head_dim each for CSA, whose entries overlap); CSA layers the same again for the indexer at
    index_head_dim. Equals the bytes of a one-slot CompressedKVCache with max_len = seq_len."""
    c = config
    if not c.is_v4:
        return c.latent_cache_width * c.num_hidden_layers * seq_len * dtype_bytes
    numbers = 0
    for i in range(c.num_hidden_layers):
        numbers += min(c.sliding_window, seq_len) * c.head_dim
        rate = c.compress_rate(i)
        if rate:
            dims = (c.head_dim, c.index_head_dim) if c.layer_types[i] == CSA else (c.head_dim,)
            overlap = 2 if c.layer_types[i] == CSA else 1
            numbers += sum(seq_len // rate * d + 2 * (overlap * rate) * (overlap * d) for d in dims)
    return numbers * dtype_bytes


def kv_bytes_per_token(config: ModelConfig, seq_len: int, dtype_bytes: int = 2) -> float:
    """kv_cache_bytes / seq_len: what each token of a seq_len context costs (constant for V3, falling for V4)."""
    return kv_cache_bytes(config, seq_len, dtype_bytes) / seq_len
