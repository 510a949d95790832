"""The MLA latent KV cache: per layer, per batch slot, per position only [kv_a_layernorm(c_KV) | rope(k_pe)].

That is (kv_lora_rank + qk_rope_head_dim) numbers per token per layer (576 for DeepSeek-V3, vs 40,960 for
materialised per-head K and V). Slots are preallocated; a finished sequence's slot is reused by the next.
"""

from __future__ import annotations

import torch

from nanoseek.config import ModelConfig


class LatentCache:
    def __init__(
        self,
        config: ModelConfig,
        n_slots: int,
        max_len: int,
        n_layers: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        self.n_layers = config.num_hidden_layers if n_layers is None else n_layers
        self.n_slots, self.max_len = n_slots, max_len
        self.width = config.latent_cache_width
        self.kv = torch.zeros(self.n_layers, n_slots, max_len, self.width, dtype=dtype, device=device)
        self.lengths = [0] * n_slots  # tokens stored per slot
        self._free = list(range(n_slots - 1, -1, -1))

    def bytes_per_token(self) -> int:
        """(kv_lora_rank + qk_rope_head_dim [+ index_head_dim for V3.2]) x layers x dtype size."""
        return self.width * self.n_layers * self.kv.element_size()

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

    def copy_slot(self, src: int, dst: int) -> None:
        """Share a prefilled prompt: copy src's cached positions into dst (e.g. G samples of one prompt)."""
        n = self.lengths[src]
        self.kv[:, dst, :n] = self.kv[:, src, :n]
        self.lengths[dst] = n
