"""The engine's forward passes over the latent cache, at shapes that torch.compile can reuse.

The scheduler (engine.py) decides which sequences run; the runner turns their tokens into logits and writes their
latents. Eager, it runs the exact shapes. Compiled, it runs a torch.compile'd `cached_step` at fixed shapes: the
batch padded to a power of two (or the cache rows 0..R-1 read in place), the cache read to a power-of-two length,
and prompts of up to `compiled_prefill_max` tokens padded to a power of two, so a few graphs serve every step (each
new shape compiles once, ~20-30 s on a laptop CPU; a 15-token prefill 10.2 -> 4.7 ms, 256 tokens 20.3 -> 17.1 ms).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from nanoseek.infer.cache import LatentCache
from nanoseek.model import Transformer
from nanoseek.model.mla import write_latents


@contextmanager
def single_thread(enable: bool = True) -> Iterator[None]:
    """Run the block with one intra-op thread (restored afterwards)."""
    prev = torch.get_num_threads()
    if enable and prev != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if enable and prev != 1:
            torch.set_num_threads(prev)


def pow2(n: int) -> int:
    """The smallest power of two >= n (n >= 1)."""
    return 1 << (n - 1).bit_length()


class Runner:
    """Cached forward steps of `model` over `cache`, eager or compiled at fixed shapes."""

    def __init__(self, model: Transformer, cache: LatentCache, compile: bool = False) -> None:
        self.model, self.cache, self.compiled = model, cache, compile
        self.device, self.max_len = cache.kv.device, cache.max_len
        self.compiled_prefill_max = 256  # prompt tokens; each power-of-two length from 16 compiles once
        # V3.2: longer prompts prefill in chunks of this many tokens, whose index scores are [chunk, cached + chunk]
        # instead of [P, P] (4 GiB at 32k tokens); exact, a chunk continues from the cache like any step
        self.sparse_prefill_chunk = 1024
        self._compiled_fns: list[Callable] = []
        self._compiled_shapes: set[tuple] = set()  # (function, thread count, input shapes and ints) compiled
        if compile:
            shapes = (cache.n_slots.bit_length() + 1) * (self.max_len.bit_length() + 1) * 4  # rows x cache x T x mode
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, shapes)
        self.step_fn = self.compile(model.cached_step)

    def compile(self, fn: Callable) -> Callable:
        """fn compiled for fixed shapes when this runner compiles, else fn itself. The C++ wrapper keeps the graph's
        buffer bookkeeping out of Python: 3.9 -> 3.2 ms per step at batch 16, 1.15 -> 0.79 ms at batch 1."""
        if not self.compiled:
            return fn
        compiled = torch.compile(fn, dynamic=False, options={"cpp_wrapper": True})
        self._compiled_fns.append(compiled)
        return compiled

    def call(self, fn: Callable, *args):
        """fn(*args). Dynamo re-checks ~1k guards (every parameter's identity, dtype, shape, ...) before each call
        of a compiled function: 1.3 ms per step at batch 1, more than the step itself. Once a shape has compiled,
        only the input shapes, ints and the thread count tell the cached graphs apart, so evaluate just those
        guards. Unsafe only if the model's parameters are replaced or change dtype/device after the engine is
        built (in-place updates, as in GRPO, are fine)."""
        if fn not in self._compiled_fns:
            return fn(*args)
        key = (fn, torch.get_num_threads(), *(tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in args))
        if key in self._compiled_shapes:
            with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                return fn(*args)
        out = fn(*args)  # a new shape: compiled, with every guard
        self._compiled_shapes.add(key)
        return out

    def prefill(self, prompt: list[int], slot: torch.Tensor, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Write a prompt's latents into cache row `slot` from position `start` (the row already holds the first
        `start`, from the prefix cache). Returns (logits of its last position [1, 1, V], hidden states of the
        computed positions [1, P - start, d]). Compiled, whole prompts of up to `compiled_prefill_max` tokens are
        padded to a power of two (causal attention: padding changes no real position, and its entries are not
        stored); longer prompts and prompt tails stay eager, where padding would cost more than it saves."""
        P, zero = len(prompt), torch.zeros(1, dtype=torch.long, device=self.device)
        if self.model.config.sparse_attention and P - start > self.sparse_prefill_chunk:
            return self._prefill_chunks(prompt, slot, start)
        if start:
            tail = torch.tensor([prompt[start:]], device=self.device)
            return self.model.forward_cached(tail, self.cache.kv, slot, zero + start, last_only=True)
        ids = torch.tensor([prompt], device=self.device)
        if not (self.compiled and P <= self.compiled_prefill_max):
            return self.model.forward_cached(ids, self.cache.kv, slot, zero, last_only=True)
        L = min(max(16, pow2(P)), self.max_len)
        logits, hidden, new = self.call(self.step_fn, F.pad(ids, (0, L - P)), self.cache.kv, slot, zero, 0)
        write_latents(self.cache.kv, slot, zero, new[:, :, :P])
        return logits[:, P - 1 : P], hidden[:, :P]

    def _prefill_chunks(self, prompt: list[int], slot: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """prefill, eager, sparse_prefill_chunk tokens at a time."""
        hidden = []
        for i in range(start, len(prompt), self.sparse_prefill_chunk):
            ids = torch.tensor([prompt[i : i + self.sparse_prefill_chunk]], device=self.device)
            pos = torch.tensor([i], device=self.device)
            logits, h = self.model.forward_cached(ids, self.cache.kv, slot, pos, last_only=True)
            hidden.append(h)
        return logits, torch.cat(hidden, dim=1)

    def forward(self, slots: list[int], tokens: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One cached forward of `tokens` (one row per sequence) after the cached positions of each cache row in
        `slots`; writes their latents (the caller advances the lengths). Returns (logits [N, T, V], hidden
        [N, T, d], slots [N])."""
        N = len(slots)
        start = [self.cache.lengths[s] for s in slots]
        slots_t, start_t = torch.tensor(slots, device=self.device), torch.tensor(start, device=self.device)
        if not self.compiled:
            ids = torch.tensor(tokens, device=self.device)
            logits, hidden, new = self.step_fn(ids, self.cache.kv, slots_t, start_t, max(start))
            write_latents(self.cache.kv, slots_t, start_t, new)
            return logits, hidden, slots_t
        # compiled: fixed shapes. The rows are either the cache rows 0..R-1 themselves (read in place) or, when
        # the running slots are scattered, the sequences padded to a power of two (their cache rows gathered)
        cache_len = self.cache_read_len(start)
        rows = self.in_place_rows(slots, tokens)
        if rows is not None:
            logits, hidden, new = self.call(self.step_fn, rows[0], self.cache.kv, None, rows[1], cache_len)
            if slots != list(range(len(rows[1]))):  # else every row is a running sequence, in order
                logits, hidden, new = logits[slots_t], hidden[slots_t], new[:, slots_t]
        else:
            pad = pow2(N) - N
            padded = (torch.cat((t, t[-1:].expand(pad, *t.shape[1:]))) for t in (slots_t, start_t))
            ids = torch.tensor(tokens + tokens[-1:] * pad, device=self.device)
            logits, hidden, new = self.call(self.step_fn, ids, self.cache.kv, *padded, cache_len)
            logits, hidden, new = logits[:N], hidden[:N], new[:, :N]
        write_latents(self.cache.kv, slots_t, start_t, new)
        return logits, hidden, slots_t

    def cache_read_len(self, start: list[int]) -> int:
        """Compiled steps read the cache up to a power of two (>= 16) past the longest sequence (masked)."""
        return min(max(16, pow2(max(start))), self.max_len)

    def in_place_rows(self, slots: list[int], tokens: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Rows for a compiled step over the cache rows 0..R-1 read in place (R a power of two): (ids [R, T],
        start [R]); idle rows are fed tokens[0] at position 0 and their results dropped. None when the running
        slots are too scattered for it (R > twice the padded batch): then gather the rows instead."""
        R = min(pow2(max(slots) + 1), self.cache.n_slots)
        if R > 2 * pow2(len(slots)):
            return None
        row_of = dict(zip(slots, range(len(slots))))
        rows = [row_of.get(r) for r in range(R)]
        ids = torch.tensor([tokens[0] if i is None else tokens[i] for i in rows], device=self.device)
        start = [0 if i is None else self.cache.lengths[slots[i]] for i in rows]
        return ids, torch.tensor(start, device=self.device)
