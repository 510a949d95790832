"""The inference engine: continuous batching over a latent KV cache, with optional MTP self-speculation.

Each `step()` admits waiting requests into free cache slots (prefill, one prompt at a time so no compute is
spent on padding; identical prompts are prefilled once and the cache row copied), then decodes one token
for every running sequence in a single batched forward (absorbed MLA over the cached latents).
Finished sequences free their slot at once, so new requests join a running batch.

Speculative mode (DeepSeek-V3 sec. 2.2 + Leviathan et al. 2023): the MTP module drafts token t+2 from the
main model's hidden state; the next step verifies [t+1, draft] in one forward and accepts the draft with
the standard rule, so greedy output is identical to plain greedy and sampled output keeps its distribution.
"""

from __future__ import annotations

import functools
import itertools
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from nanoseek.infer.cache import LatentCache
from nanoseek.infer.sampling import SampleOutput, Sampler, SamplingParams
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


@dataclass
class Completion:
    """The result of one request."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string), "length" (max_tokens or context full) or "abort"
    prompt_tokens: int
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None


@dataclass(eq=False)  # identity semantics: sequences are dict keys
class Sequence:
    id: int
    prompt_ids: list[int]
    params: SamplingParams
    slot: int = -1
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[int, float]] = field(default_factory=list)
    finish_reason: str | None = None
    text: str = ""
    draft: int | None = None  # speculative: MTP's guess for the token after output_ids[-1]
    draft_probs: torch.Tensor | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


class Engine:
    def __init__(
        self,
        model: Transformer,
        tokenizer=None,
        max_batch_size: int = 16,
        max_len: int | None = None,
        speculative: bool = False,
        compile: bool = False,
    ) -> None:
        self.model = model.eval()
        self.config = c = model.config
        self.tokenizer = tokenizer
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.max_len = min(max_len or c.max_position_embeddings, c.max_position_embeddings)
        if speculative and not model.mtp:
            raise ValueError("speculative decoding needs an MTP module: this model has num_nextn_predict_layers=0")
        self.speculative = speculative
        self.cache = LatentCache(c, max_batch_size, self.max_len, dtype=self.dtype, device=self.device)
        self.mtp_cache = (
            LatentCache(c, max_batch_size, self.max_len, n_layers=1, dtype=self.dtype, device=self.device)
            if speculative
            else None
        )
        self.sampler = Sampler(c.vocab_size, max_batch_size, self.device)
        eos = tokenizer.eos_id if tokenizer is not None else c.eos_token_id
        self.eos_ids = {eos} if eos is not None else set()
        self.waiting: deque[Sequence] = deque()
        self.running: dict[int, Sequence] = {}  # slot -> sequence
        self._ids = itertools.count()
        self.stats = {"drafted": 0, "accepted": 0, "steps": 0, "tokens": 0}
        # decode steps of a few rows are hundreds of tiny ops: on CPU, waking a thread pool for each costs more
        # than it saves, and on a busy machine multi-threaded tiny ops stall (4 ms vs 60-150 ms per step, 2 cores).
        # From 8 rows on, the GEMMs are big enough for all threads (batch 16: 2.7 vs 3.1 ms per step, compiled)
        self.decode_single_thread = True
        self.single_thread_below = 8  # rows
        # compile: decode steps run a torch.compile'd `cached_step` at fixed shapes, the batch padded to a power
        # of two and the cache read to a power-of-two length, so a few graphs serve every step (each new shape
        # compiles once, ~20-30 s on a laptop CPU); prompts of up to `compiled_prefill_max` tokens go through the
        # same compiled step, padded to a power of two (`_prefill`: 15 tokens 10.2 -> 4.7 ms, 256 20.3 -> 17.1 ms)
        self._step_fn, self._mtp_fn, self._spec_fn = model.cached_step, None, None
        if compile:
            shapes = (max_batch_size.bit_length() + 1) * (self.max_len.bit_length() + 1) * 4  # rows x cache x T x mode
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, shapes)
            # the C++ wrapper: the compiled graph's buffer bookkeeping in C++ rather than Python, measured
            # alternately 3.9 -> 3.2 ms per step at batch 16, 1.15 -> 0.79 ms at batch 1 (longer first compiles)
            compiled = functools.partial(torch.compile, dynamic=False, options={"cpp_wrapper": True})
            self._step_fn = compiled(model.cached_step)
            self._mtp_fn = compiled(model.mtp_cached_step) if speculative else None
            self._spec_fn = compiled(model.speculative_greedy_step) if speculative else None
        self.compiled = compile
        self.compiled_prefill_max = 256  # prompt tokens; each power-of-two length from 16 compiles once
        self._compiled_shapes: set[tuple] = set()  # (function, input shapes and ints) already compiled

    @classmethod
    def from_pretrained(cls, path: str | Path, device=None, dtype=None, **kwargs) -> Engine:
        """Load a model directory (and its tokenizer.json when present)."""
        from nanoseek.checkpoint.hf import load_model
        from nanoseek.tokenizer import Tokenizer

        model = load_model(path, device=device, dtype=dtype)
        tok = Tokenizer.from_pretrained(path) if (Path(path) / "tokenizer.json").exists() else None
        return cls(model, tok, **kwargs)

    # ------------------------------------------------------------------------------------ requests
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None) -> int:
        """Queue a prompt (text, or token ids) and return its sequence id."""
        params = params or SamplingParams()
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer; pass token ids or load a model dir with one")
            ids = self.tokenizer.encode(prompt, bos=True)
        else:
            ids = list(prompt)
        if not ids:
            raise ValueError("empty prompt: give at least one token")
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {self.config.vocab_size})")
        room = self.max_len - 1 - (1 if self.speculative else 0)
        if len(ids) > room:
            raise ValueError(
                f"prompt has {len(ids)} tokens but the context holds {self.max_len} (room for {room} prompt "
                "tokens and at least one new one); shorten the prompt or load with a larger max_len"
            )
        seq = Sequence(next(self._ids), ids, params)
        self.waiting.append(seq)
        return seq.id

    def abort(self, seq_id: int) -> bool:
        """Drop a request now, waiting or running (its cache slot is free for the next step). Returns whether it
        was still there; its finish_reason becomes "abort"."""
        seq = next((s for s in self.waiting if s.id == seq_id), None)
        if seq is not None:
            self.waiting.remove(seq)
        else:
            seq = next((s for s in self.running.values() if s.id == seq_id), None)
            if seq is None:
                return False
            self._free(seq)
        seq.finish_reason = "abort"
        return True

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def acceptance_rate(self) -> float | None:
        """Share of MTP drafts the main model accepted so far (speculative engines; None before any draft). Each
        accepted draft is a token without a decode step of its own."""
        return self.stats["accepted"] / self.stats["drafted"] if self.stats["drafted"] else None

    # ---------------------------------------------------------------------------------------- step
    @torch.inference_mode()
    def step(self) -> list[tuple[Sequence, list[int]]]:
        """Admit, prefill and decode once. Returns (sequence, newly generated token ids) for each sequence
        that advanced; `sequence.done` tells whether it finished (its slot is already free)."""
        events: dict[int, tuple[Sequence, list[int]]] = {}
        new = self._admit()
        decoding = [s for s in self.running.values() if s not in new]
        if decoding:
            step = self._decode_speculative if self.speculative else self._decode
            one = self.decode_single_thread and len(decoding) < self.single_thread_below
            with single_thread(self.device.type == "cpu" and one):
                for seq, toks in step(decoding):
                    events[seq.id] = (seq, toks)
        for seq, toks in new.items():
            events[seq.id] = (seq, toks)
        for seq, _ in events.values():
            if seq.done:
                self._free(seq)
        self.stats["steps"] += 1
        return list(events.values())

    def _admit(self) -> dict[Sequence, list[int]]:
        """Prefill waiting sequences into free slots and sample their first token."""
        new: dict[Sequence, list[int]] = {}
        prefilled: dict[tuple[int, ...], tuple[int, torch.Tensor, torch.Tensor]] = {}
        while self.waiting and self.cache.n_free:
            seq = self.waiting.popleft()
            seq.slot = self.cache.allocate()
            self.running[seq.slot] = seq
            self.sampler.add(seq.slot, seq.params, seq.prompt_ids)
            key = tuple(seq.prompt_ids)
            slot_t = torch.tensor([seq.slot], device=self.device)
            if key in prefilled:  # same prompt (e.g. G samples in GRPO): share the prefill
                src, logits, hidden = prefilled[key]
                self.cache.copy_slot(src, seq.slot)
            else:
                logits, hidden = self._prefill(seq.prompt_ids, slot_t)
                self.cache.lengths[seq.slot] = len(seq.prompt_ids)
                prefilled[key] = (seq.slot, logits, hidden)
            out = self.sampler.sample(slot_t, logits[:, -1], return_probs=False)
            new[seq] = self._append(seq, out, 0)
            if self.speculative and not seq.done:
                self._draft(seq, hidden)
        return new

    def _prefill(self, prompt: list[int], slot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write a prompt's latents into cache row `slot` from position 0. Returns (logits of its last position
        [1, 1, V], hidden states [1, P, d]). Compiled engines run prompts of up to `compiled_prefill_max` tokens
        through the compiled step, padded to a power of two (causal attention: padding changes no real position,
        and its entries are not stored); longer prompts stay eager, where padding would cost more than it saves."""
        P, zero = len(prompt), torch.zeros(1, dtype=torch.long, device=self.device)
        ids = torch.tensor([prompt], device=self.device)
        if not (self.compiled and P <= self.compiled_prefill_max):
            return self.model.forward_cached(ids, self.cache.kv, slot, zero, last_only=True)
        L = min(max(16, _pow2(P)), self.max_len)
        logits, hidden, new = self._call(self._step_fn, F.pad(ids, (0, L - P)), self.cache.kv, slot, zero, 0)
        write_latents(self.cache.kv, slot, zero, new[:, :, :P])
        return logits[:, P - 1 : P], hidden[:, :P]

    def _forward(
        self, seqs: list[Sequence], tokens: list[list[int]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One cached forward of `tokens` (one row per sequence) after each sequence's cached positions;
        writes their latents. Returns (logits [N, T, V], hidden [N, T, d], slots [N])."""
        N = len(seqs)
        slots = [s.slot for s in seqs]
        start = [self.cache.lengths[s] for s in slots]
        slots_t, start_t = torch.tensor(slots, device=self.device), torch.tensor(start, device=self.device)
        if not self.compiled:
            ids = torch.tensor(tokens, device=self.device)
            logits, hidden, new = self._step_fn(ids, self.cache.kv, slots_t, start_t, max(start))
            write_latents(self.cache.kv, slots_t, start_t, new)
            return logits, hidden, slots_t
        # compiled: fixed shapes. The rows are either the cache rows 0..R-1 themselves (read in place) or, when
        # the running slots are scattered, the sequences padded to a power of two (their cache rows gathered)
        cache_len = self._cache_read_len(start)
        rows = self._in_place_rows(slots, tokens)
        if rows is not None:
            logits, hidden, new = self._call(self._step_fn, rows[0], self.cache.kv, None, rows[1], cache_len)
            if slots != list(range(len(rows[1]))):  # else every row is a running sequence, in order
                logits, hidden, new = logits[slots_t], hidden[slots_t], new[:, slots_t]
        else:
            pad = _pow2(N) - N
            padded = (torch.cat((t, t[-1:].expand(pad, *t.shape[1:]))) for t in (slots_t, start_t))
            ids = torch.tensor(tokens + tokens[-1:] * pad, device=self.device)
            logits, hidden, new = self._call(self._step_fn, ids, self.cache.kv, *padded, cache_len)
            logits, hidden, new = logits[:N], hidden[:N], new[:, :N]
        write_latents(self.cache.kv, slots_t, start_t, new)
        return logits, hidden, slots_t

    def _cache_read_len(self, start: list[int]) -> int:
        """Compiled steps read the cache up to a power of two (>= 16) past the longest sequence (masked)."""
        return min(max(16, _pow2(max(start))), self.max_len)

    def _in_place_rows(self, slots: list[int], tokens: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Rows for a compiled step over the cache rows 0..R-1 read in place (R a power of two): (ids [R, T],
        start [R]); idle rows are fed tokens[0] at position 0 and their results dropped. None when the running
        slots are too scattered for it (R > twice the padded batch): then gather the rows instead."""
        R = min(_pow2(max(slots) + 1), self.cache.n_slots)
        if R > 2 * _pow2(len(slots)):
            return None
        row_of = dict(zip(slots, range(len(slots))))
        rows = [row_of.get(r) for r in range(R)]
        ids = torch.tensor([tokens[0] if i is None else tokens[i] for i in rows], device=self.device)
        start = [0 if i is None else self.cache.lengths[slots[i]] for i in rows]
        return ids, torch.tensor(start, device=self.device)

    def _call(self, fn, *args):
        """fn(*args). Dynamo re-checks ~1k guards (every parameter's identity, dtype, shape, ...) before each call
        of a compiled function: 1.3 ms per step at batch 1, more than the step itself. Once a shape has compiled,
        only the input shapes, ints and the thread count tell the cached graphs apart, so evaluate just those guards. Unsafe only if
        the model's parameters are replaced or change dtype/device after the engine is built (in-place updates,
        as in GRPO, are fine)."""
        if not self.compiled or fn not in (self._step_fn, self._mtp_fn, self._spec_fn):
            return fn(*args)
        key = (fn, torch.get_num_threads(), *(tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in args))
        if key in self._compiled_shapes:
            with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                return fn(*args)
        out = fn(*args)  # a new shape: compiled, with every guard
        self._compiled_shapes.add(key)
        return out

    def _decode(self, seqs: list[Sequence]) -> list[tuple[Sequence, list[int]]]:
        logits, _, slots = self._forward(seqs, [[s.output_ids[-1]] for s in seqs])
        for s in seqs:
            self.cache.lengths[s.slot] += 1
        out = self.sampler.sample(slots, logits[:, -1])
        return [(s, self._append(s, out, i)) for i, s in enumerate(seqs)]

    # --------------------------------------------------------------------------------- speculative
    def _draft(self, seq: Sequence, hidden: torch.Tensor) -> None:
        """MTP prefill over the prompt (inputs h_i and token i+1) and a draft for the token after the first."""
        P = len(seq.prompt_ids)
        nxt = torch.tensor([seq.prompt_ids[1:] + [seq.output_ids[-1]]], device=self.device)
        h = hidden if hidden.shape[1] == P else None
        if h is None:  # prefill kept only the last position: recompute the prompt's hidden states once
            h = self.model.hidden(torch.tensor([seq.prompt_ids], device=self.device))[0]
        slot_t = torch.tensor([seq.slot], device=self.device)
        last = torch.tensor([P - 1], device=self.device)
        logits = self._mtp(h, nxt, slot_t, torch.zeros(1, dtype=torch.long, device=self.device), last)
        self.mtp_cache.lengths[seq.slot] = P
        d = self.sampler.sample(slot_t, logits[:, 0], return_probs=True)
        seq.draft, seq.draft_probs = d.token(0), None if d.probs is None else d.probs[0]

    def _mtp(
        self, h: torch.Tensor, next_tokens: torch.Tensor, slots: torch.Tensor, start: torch.Tensor, rows: torch.Tensor
    ) -> torch.Tensor:
        """MTP logits [N, 1, V] at position rows[n] of each row, for hidden states h [N, T, d] and the tokens
        after them; extends the MTP cache by all T positions."""
        (N, T), kv = h.shape[:2], self.mtp_cache.kv[0]
        cache_len = int(start.max())
        fn = self.model.mtp_cached_step
        if self.compiled and (T <= 2 or cache_len == 0):
            # decode-time drafts: rows padded to a power of two; a prompt's prefill (no past): its length padded
            # to a power of two (causal, so the padding changes no real position; its entries are not stored)
            n_pad, length = (_pow2(N), T) if T <= 2 else (N, min(max(16, _pow2(T)), self.max_len))
            h = F.pad(h, (0, 0, 0, length - T, 0, n_pad - N))
            next_tokens = F.pad(next_tokens, (0, length - T, 0, n_pad - N))
            slots, start, rows = (torch.cat((t, t[-1:].expand(n_pad - N))) for t in (slots, start, rows))
            cache_len = self._cache_read_len([cache_len])
            fn = self._mtp_fn
        logits, new = self._call(fn, h, next_tokens, kv, slots, start, cache_len, rows)
        write_latents(kv, slots[:N], start[:N], new[:N, :T])
        return logits[:N]

    def _decode_speculative(self, seqs: list[Sequence]) -> list[tuple[Sequence, list[int]]]:
        """Verify [last token, draft] for every sequence in one forward; accept, extend, redraft."""
        if self._spec_fn is not None and self.sampler.plain_greedy.issuperset(s.slot for s in seqs):
            rows = self._in_place_rows([s.slot for s in seqs], [[s.output_ids[-1], s.draft] for s in seqs])
            if rows is not None:
                return self._decode_speculative_greedy(seqs, *rows)
        start = torch.tensor([self.cache.lengths[s.slot] for s in seqs], device=self.device)
        drafts = torch.tensor([s.draft for s in seqs], device=self.device)
        logits, hidden, slots = self._forward(seqs, [[s.output_ids[-1], s.draft] for s in seqs])  # [N, 2, V]
        q = None  # the drafts' distributions; plain-greedy rows keep none (one-hot)
        if any(s.draft_probs is not None for s in seqs):
            V = self.config.vocab_size
            q = torch.stack(
                [_one_hot(s.draft, V, self.device) if s.draft_probs is None else s.draft_probs for s in seqs]
            )
        accepted, out0 = self.sampler.verify(slots, drafts, q, logits[:, 0])
        results = []
        emitted = [self._append(s, out0, i) for i, s in enumerate(seqs)]
        acc = accepted.tolist()
        # second token for rows whose draft was accepted (the sampler must see the first for penalties)
        rows = [i for i, s in enumerate(seqs) if acc[i] and not s.done]
        if rows:
            idx = torch.tensor(rows, device=self.device)
            out1 = self.sampler.sample(slots[idx], logits[idx, 1])
            for j, i in enumerate(rows):
                emitted[i] += self._append(seqs[i], out1, j)
        self.stats["drafted"] += len(seqs)
        self.stats["accepted"] += sum(acc)
        for i, s in enumerate(seqs):
            self.cache.lengths[s.slot] += 2 if acc[i] else 1
        # MTP: positions start and start+1 take (h, token after it); rows that rejected use only the first
        live = [i for i, s in enumerate(seqs) if not s.done]
        if live:
            idx = torch.tensor(live, device=self.device)
            nxt = []
            for i in live:
                s = seqs[i]
                tok1 = s.output_ids[-2] if acc[i] and len(emitted[i]) == 2 else s.output_ids[-1]
                tok2 = s.output_ids[-1]
                nxt.append([tok1, tok2])
            pick = torch.tensor([1 if acc[i] else 0 for i in live], device=self.device)  # the last kept position
            nxt_t = torch.tensor(nxt, device=self.device)
            mtp_logits = self._mtp(hidden[idx], nxt_t, slots[idx], start[idx], pick)
            d = self.sampler.sample(slots[idx], mtp_logits[:, 0], return_probs=True)
            for j, i in enumerate(live):
                s = seqs[i]
                self.mtp_cache.lengths[s.slot] = self.cache.lengths[s.slot]
                s.draft, s.draft_probs = d.token(j), None if d.probs is None else d.probs[j]
        for i, s in enumerate(seqs):
            results.append((s, emitted[i]))
        return results

    def _decode_speculative_greedy(
        self, seqs: list[Sequence], ids: torch.Tensor, row_start: torch.Tensor
    ) -> list[tuple[Sequence, list[int]]]:
        """Compiled, all rows plain greedy: verify and redraft in one call (`Transformer.speculative_greedy_step`)
        over the cache rows read in place (`_in_place_rows`: ids [R, 2] = [last token, draft], row_start [R])."""
        slots = [s.slot for s in seqs]
        cache_len = self._cache_read_len([self.cache.lengths[s] for s in slots])
        mtp_kv = self.mtp_cache.kv[0]
        tokens, accepted, draft, new, mtp_new = self._call(
            self._spec_fn, ids, self.cache.kv, mtp_kv, None, row_start, cache_len
        )
        slots_t = torch.tensor(slots, device=self.device)
        write_latents(self.cache.kv, slots_t, row_start[slots_t], new[:, slots_t])
        write_latents(mtp_kv, slots_t, row_start[slots_t], mtp_new[slots_t])
        out0, out1 = SampleOutput(tokens=tokens[:, 0]), SampleOutput(tokens=tokens[:, 1])
        acc, drafts = accepted.tolist(), draft.tolist()
        results = []
        for s in seqs:
            emitted = self._append(s, out0, s.slot)
            if acc[s.slot] and not s.done:
                emitted += self._append(s, out1, s.slot)
            self.cache.lengths[s.slot] += 2 if acc[s.slot] else 1
            self.mtp_cache.lengths[s.slot] = self.cache.lengths[s.slot]
            s.draft, s.draft_probs = drafts[s.slot], None
            results.append((s, emitted))
        self.stats["drafted"] += len(seqs)
        self.stats["accepted"] += sum(acc[s] for s in slots)
        return results

    # ----------------------------------------------------------------------------------- bookkeeping
    def _append(self, seq: Sequence, out: SampleOutput, row: int) -> list[int]:
        """Record a sampled token, apply stop rules; returns the ids that became part of the output."""
        if seq.done:
            return []
        token = out.token(row)
        if seq.slot in self.sampler.penalised:  # counts feed only the penalties
            self.sampler.observe(torch.tensor([seq.slot]), torch.tensor([token]))
        self.stats["tokens"] += 1
        if token in self.eos_ids and not seq.params.ignore_eos:
            seq.finish_reason = "stop"
            return []
        seq.output_ids.append(token)
        if out.logprobs is not None:
            seq.logprobs.append(float(out.logprobs[row]))
            n = seq.params.top_logprobs
            if n and out.top_ids is not None:
                ids, lps = out.top_ids[row, :n].tolist(), out.top_logprobs[row, :n].tolist()
                seq.top_logprobs.append(dict(zip(ids, lps)))
        if self.tokenizer is not None:
            seq.text = self.tokenizer.decode(seq.output_ids)
            for stop in seq.params.stop:
                cut = seq.text.find(stop)
                if cut >= 0:
                    seq.text = seq.text[:cut]
                    seq.finish_reason = "stop"
                    return [token]
        limit = self.max_len - (2 if self.speculative else 1)
        if len(seq.output_ids) >= seq.params.max_tokens or len(seq.prompt_ids) + len(seq.output_ids) >= limit:
            seq.finish_reason = "length"
        return [token]

    def _free(self, seq: Sequence) -> None:
        if self.running.pop(seq.slot, None) is not None:
            self.cache.release(seq.slot)
            if self.mtp_cache is not None:
                self.mtp_cache.release(seq.slot)
            self.sampler.remove(seq.slot)

    def _completion(self, seq: Sequence) -> Completion:
        want = seq.params.wants_logprobs
        return Completion(
            text=seq.text,
            token_ids=list(seq.output_ids),
            finish_reason=seq.finish_reason or "length",
            prompt_tokens=len(seq.prompt_ids),
            logprobs=seq.logprobs if want else None,
            top_logprobs=seq.top_logprobs if seq.params.top_logprobs else None,
        )

    # ---------------------------------------------------------------------------------- public API
    def generate(
        self,
        prompts: str | list[int] | list[str] | list[list[int]],
        params: SamplingParams | list[SamplingParams] | None = None,
        **kwargs,
    ) -> list[Completion]:
        """Complete every prompt (batched, continuous). Keyword arguments build SamplingParams
        (max_tokens, temperature, top_p, top_k, min_p, seed, stop, logprobs, ...)."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if params is None:
            params = SamplingParams(**kwargs)
        plist = params if isinstance(params, list) else [params] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        done: dict[int, Sequence] = {}
        wanted = set(ids)  # other queued requests may finish too
        while len(done) < len(wanted):
            for seq, _ in self.step():
                if seq.done and seq.id in wanted:
                    done[seq.id] = seq
        return [self._completion(done[i]) for i in ids]

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None, **kwargs) -> Iterator[str]:
        """Yield the completion's text as it grows (needs a tokenizer); other queued requests also advance."""
        if self.tokenizer is None:
            raise ValueError("streaming text needs a tokenizer")
        sid = self.add_request(prompt, params or SamplingParams(**kwargs))
        shown = 0
        while True:
            events = self.step()
            for seq, _ in events:
                if seq.id != sid:
                    continue
                text = seq.text
                if not seq.done and text.endswith("\ufffd"):  # half a multi-byte character: wait for the rest
                    continue
                if len(text) > shown:
                    yield text[shown:]
                    shown = len(text)
                if seq.done:
                    return
            if not events and not self.has_work():
                return


def _pow2(n: int) -> int:
    """The smallest power of two >= n (n >= 1)."""
    return 1 << (n - 1).bit_length()


def _one_hot(token: int, n: int, device) -> torch.Tensor:
    return torch.zeros(n, device=device).index_fill_(0, torch.tensor([token], device=device), 1.0)
