"""The engine's forward passes for DeepSeek-V4 models, over their compressed cache (`CompressedKVCache`).

The same two calls as V3's `Runner` (`prefill` one prompt into a slot, `forward` a batch of running sequences),
so the scheduler does not care which family it serves. A V4 step reads and writes its cache in place
(`TransformerV4.forward_cached`): the window ring, the compressed entries, the open windows' projections and the
CSA indexer keys of each slot, every row at its own position, so sequences of any lengths decode in one batch.
Eager only: V3's compiled fixed-shape step returns its cache entries instead of writing them, which V4's
pooling (an entry exists only once its window's last token has arrived) does not fit.
"""

from __future__ import annotations

import torch

from nanoseek.infer.cache import CompressedKVCache
from nanoseek.model import Transformer


class RunnerV4:
    """Eager forwards of a TransformerV4 over a CompressedKVCache. Prompts are prefilled in chunks of
    `prefill_chunk` tokens (exact: a chunk continues from the cache like any step), so a long prompt's attention
    scores stay [chunk, window + chunk + entries] instead of [P, P]."""

    compiled = False

    def __init__(self, model: Transformer, cache: CompressedKVCache, compile: bool = False) -> None:
        if compile:
            raise ValueError(
                "compiled decoding (--compile) covers deepseek_v3 / deepseek_v32 models; a deepseek_v4 step updates "
                "its compressed cache in place and runs eager: drop --compile"
            )
        self.model, self.cache = model, cache
        self.device, self.max_len = next(model.parameters()).device, cache.max_len
        self.prefill_chunk = 1024  # prompt tokens per forward

    def prefill(self, prompt: list[int], slot: torch.Tensor, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Write prompt[start:] into cache row `slot` (its first `start` tokens are there already). Returns (logits
        of the last position [1, 1, V], the last layer's streams at the computed positions [1, P - start, hc, d],
        what the MTP block drafts from)."""
        logits, streams = None, []
        for i in range(start, len(prompt), self.prefill_chunk):
            ids = torch.tensor([prompt[i : i + self.prefill_chunk]], device=self.device)
            pos = torch.tensor([i], device=self.device)
            logits, x = self.model.forward_cached(ids, self.cache.layers, slot, pos, last_only=True)
            streams.append(x)
        return logits, torch.cat(streams, dim=1)

    def forward(self, slots: list[int], tokens: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One cached forward of `tokens` (one row per sequence, each after its slot's cached positions); the
        cache is updated in place (the caller advances the lengths; one last position it does not count is
        written again before it is read, so a rejected draft needs no undo). Returns (logits [N, T, V], streams
        [N, T, hc, d], slots [N])."""
        slots_t = torch.tensor(slots, device=self.device)
        start = torch.tensor([self.cache.lengths[s] for s in slots], device=self.device)
        ids = torch.tensor(tokens, device=self.device)
        logits, streams = self.model.forward_cached(ids, self.cache.layers, slots_t, start)
        return logits, streams, slots_t
