"""The inference engine: continuous batching over a latent KV cache, with optional MTP self-speculation.

Each `step()` admits waiting requests into free cache slots (prefill, one prompt at a time so no compute is
spent on padding; identical prompts are prefilled once and the cache row copied; with a prefix cache, a prompt's
known prefix is copied in and only the rest computed), then decodes one token
for every running sequence in a single batched forward (absorbed MLA over the cached latents; DeepSeek-V3.2 adds
the indexer's keys and attends to its top-k; DeepSeek-V4 decodes over its own window + compressed-entry cache).
Finished sequences free their slot at once, so new requests join a running batch.

This file is the scheduler: who runs this step, what their sampled tokens mean (EOS, stop strings, limits).
The forward passes are `runner.py` (eager, or compiled at fixed shapes; V4: `runner_v4.py`), drafting and verifying is
`speculative.py`, a request's state and its incrementally decoded text `sequence.py`.
"""

from __future__ import annotations

import itertools
import sys
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import torch

from nanoseek.infer import fast_decode
from nanoseek.infer.cache import decode_cache, mtp_decode_cache
from nanoseek.infer.prefix_cache import PrefixCache, PrefixCacheV4, prefix_block_size
from nanoseek.infer.runner import Runner, single_thread
from nanoseek.infer.runner_v4 import RunnerV4
from nanoseek.infer.sampling import SampleOutput, Sampler, SamplingParams
from nanoseek.infer.sequence import Completion, Sequence
from nanoseek.infer.speculative import Speculator, SpeculatorV4
from nanoseek.infer.structured import grammar_vocabulary, start_constraint
from nanoseek.model import Transformer


class Engine:
    """Continuous batching for one model: `add_request` and `step` (the server's loop), or `generate` and `stream`."""

    def __init__(
        self,
        model: Transformer,
        tokenizer=None,
        max_batch_size: int = 16,
        max_len: int | None = None,
        speculative: bool = False,
        compile: bool = False,
        prefix_cache_tokens: int | None = 0,
        fast: bool | None = None,
        verbose: bool = True,
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
        # V3 / V3.2: MLA's latent cache (+ indexer keys); V4: its window + compressed entries, decoded eagerly
        self.cache = decode_cache(c, max_batch_size, self.max_len, dtype=self.dtype, device=self.device)
        self.sampler = Sampler(c.vocab_size, max_batch_size, self.device)
        self.runner = (RunnerV4 if c.is_v4 else Runner)(model, self.cache, compile)
        self.mtp_cache, self.speculator = None, None
        if speculative:
            self.mtp_cache = mtp_decode_cache(c, max_batch_size, self.max_len, dtype=self.dtype, device=self.device)
            speculator = SpeculatorV4 if c.is_v4 else Speculator
            self.speculator = speculator(self.runner, self.sampler, self.mtp_cache, self._append)
        self.prefix_cache = self._prefix_cache(prefix_cache_tokens)
        # the default path: plain greedy decoding runs K steps per call of an ahead-of-time compiled graph
        # (fast_decode.py), built once per model config in the background on first demand (decoding stays eager
        # meanwhile) and cached across processes
        self.fast: fast_decode.FastDecoder | None = None
        if fast is None:
            fast = fast_decode.enabled() and not compile and not speculative
        if fast:
            why = fast_decode.supported(model, self.cache)
            if why is None:
                self.fast = fast_decode.FastDecoder(model, self.cache, verbose=verbose)
            elif verbose:
                print(f"nanoseek: no fast decode path for this engine ({why}); decoding eagerly", file=sys.stderr)
        eos = tokenizer.eos_id if tokenizer is not None else c.eos_token_id
        self.eos_ids = {eos} if eos is not None else set()
        self.grammar_vocab = None  # llguidance's view of the tokenizer, built by the first constrained request
        self.waiting: deque[Sequence] = deque()
        self.running: dict[int, Sequence] = {}  # slot -> sequence
        self._ids = itertools.count()
        self.stats = {"drafted": 0, "accepted": 0, "steps": 0, "tokens": 0}
        # decode steps of a few rows are hundreds of tiny ops: on CPU, waking a thread pool for each costs more
        # than it saves, and on a busy machine multi-threaded tiny ops stall (4 ms vs 60-150 ms per step, 2 cores).
        # From 8 rows on, the GEMMs are big enough for all threads (batch 16: 2.7 vs 3.1 ms per step, compiled)
        self.decode_single_thread = True
        self.single_thread_below = 8  # rows

    @classmethod
    def from_pretrained(cls, path: str | Path, device=None, dtype=None, **kwargs) -> Engine:
        """Load a model directory (and its tokenizer.json when present)."""
        from nanoseek.checkpoint.hf import load_model
        from nanoseek.tokenizer import Tokenizer

        model = load_model(path, device=device, dtype=dtype)
        tok = Tokenizer.from_pretrained(path) if (Path(path) / "tokenizer.json").exists() else None
        return cls(model, tok, **kwargs)

    def _prefix_cache(self, tokens: int | None) -> PrefixCache | PrefixCacheV4 | None:
        """A prefix cache of `tokens` positions (0: none; None: 4 contexts where it applies). Exact only where the
        cache row is the whole state a prefix leaves: not with MTP drafts (their cache would need it too)."""
        applies = not self.speculative
        if tokens is None:
            tokens = 4 * self.max_len if applies else 0
        if tokens <= 0:
            return None
        if not applies:
            raise ValueError(
                "prefix caching does not work with --speculative (the MTP block's cache would need it too): "
                "turn one of them off"
            )
        block = prefix_block_size(self.config)  # V4: a multiple of every compression rate
        if self.config.is_v4:
            return PrefixCacheV4(self.config, self.cache, max(1, tokens // block), block)
        return PrefixCache(self.cache.kv, max(1, tokens // block), block)

    @property
    def compiled(self) -> bool:
        """Whether decode steps run compiled at fixed shapes (`Runner`)."""
        return self.runner.compiled

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
        if params.grammar is not None:
            if self.tokenizer is None:
                raise ValueError("structured output (a grammar) needs the model's tokenizer")
            if self.grammar_vocab is None:
                self.grammar_vocab = grammar_vocabulary(self.tokenizer, self.config.vocab_size)
            seq.constraint = start_constraint(self.grammar_vocab, params.grammar, self.tokenizer, ids)
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
            one = self.decode_single_thread and len(decoding) < self.single_thread_below
            with single_thread(self.device.type == "cpu" and one):
                for seq, toks in self._decode(decoding):
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
            self.sampler.add(seq.slot, seq.params, seq.prompt_ids, seq.constraint)
            key = tuple(seq.prompt_ids)
            slot_t = torch.tensor([seq.slot], device=self.device)
            if key in prefilled:  # same prompt (e.g. G samples in GRPO): share the prefill
                src, logits, hidden = prefilled[key]
                self.cache.copy_slot(src, seq.slot)
            else:
                pc = self.prefix_cache
                rows = self.cache if self.config.is_v4 else self.cache.kv  # what the prefix cache reads and writes
                start = seq.cached_tokens = pc.load(seq.prompt_ids, rows, seq.slot) if pc is not None else 0
                logits, hidden = self.runner.prefill(seq.prompt_ids, slot_t, start)
                self.cache.lengths[seq.slot] = len(seq.prompt_ids)
                if pc is not None:
                    pc.save(seq.prompt_ids, rows, seq.slot)
                prefilled[key] = (seq.slot, logits, hidden)
            out = self.sampler.sample(slot_t, logits[:, -1], return_probs=False)
            new[seq] = self._append(seq, out, 0)
            if self.speculator is not None and not seq.done:
                self.speculator.first_draft(seq, hidden)
        return new

    def _decode(self, seqs: list[Sequence]) -> list[tuple[Sequence, list[int]]]:
        """One token for every running sequence, or one or two with speculation."""
        if self.speculator is not None:
            events, accepted = self.speculator.decode(seqs)
            self.stats["drafted"] += len(seqs)
            self.stats["accepted"] += accepted
            return events
        if self.fast is not None and self._fast_decode_ok(seqs):
            return self._fast_decode(seqs)
        logits, _, slots = self.runner.forward([s.slot for s in seqs], [[s.output_ids[-1]] for s in seqs])
        for s in seqs:
            self.cache.lengths[s.slot] += 1
        out = self.sampler.sample(slots, logits[:, -1])
        return [(s, self._append(s, out, i)) for i, s in enumerate(seqs)]

    def _fast_decode_ok(self, seqs: list[Sequence]) -> bool:
        """Whether these rows can take the fast path now: all plain greedy (no penalties, log-probs or grammar),
        room in the cache for K more positions, and the artifact for this many rows loaded."""
        slots = [s.slot for s in seqs]
        if not self.sampler.plain_greedy.issuperset(slots):
            return False
        if max(self.cache.lengths[s] for s in slots) + self.fast.steps >= self.max_len:
            return False
        return self.fast.ready(len(seqs))

    def _fast_decode(self, seqs: list[Sequence]) -> list[tuple[Sequence, list[int]]]:
        """K greedy tokens for every row in one call; tokens after a row finishes (EOS, stop, limit) are dropped
        (its slot, with the extra cache entries, is freed)."""
        slots = [s.slot for s in seqs]
        tokens = self.fast.decode(slots, [s.output_ids[-1] for s in seqs], [self.cache.lengths[s] for s in slots])
        for s in slots:
            self.cache.lengths[s] += self.fast.steps
        events = []
        for seq, row in zip(seqs, tokens):
            new = []
            for token in row:
                if seq.done:
                    break
                new += self._append(seq, SampleOutput(None, _token_list=[token]), 0)
            events.append((seq, new))
        return events

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
            self._finish(seq, "stop")
            return []
        seq.output_ids.append(token)
        if out.logprobs is not None:
            seq.logprobs.append(float(out.logprobs[row]))
            n = seq.params.top_logprobs
            if n and out.top_ids is not None:
                ids, lps = out.top_ids[row, :n].tolist(), out.top_logprobs[row, :n].tolist()
                seq.top_logprobs.append(dict(zip(ids, lps)))
        if self.tokenizer is not None and seq.add_text(self.tokenizer.token_bytes(token), seq.params.stop):
            seq.finish_reason = "stop"  # the text is cut before the stop string
            return [token]
        if seq.constraint is not None and seq.constraint.accept(token):  # a complete answer: only EOS may follow
            self._finish(seq, "stop")
            return [token]
        limit = self.max_len - (2 if self.speculative else 1)
        if len(seq.output_ids) >= seq.params.max_tokens or len(seq.prompt_ids) + len(seq.output_ids) >= limit:
            self._finish(seq, "length")
        return [token]

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        if self.tokenizer is not None:
            seq.finish_text()

    def _free(self, seq: Sequence) -> None:
        if self.running.pop(seq.slot, None) is not None:
            self.cache.release(seq.slot)
            if self.mtp_cache is not None:
                self.mtp_cache.release(seq.slot)
            self.sampler.remove(seq.slot)

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
        return [done[i].completion() for i in ids]

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
                if len(seq.text) > shown:  # whole characters only: the text never ends in half of one
                    yield seq.text[shown:]
                    shown = len(seq.text)
                if seq.done:
                    return
            if not events and not self.has_work():
                return
