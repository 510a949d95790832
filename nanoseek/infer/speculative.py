"""MTP self-speculative decoding (DeepSeek-V3 sec. 2.2 + Leviathan et al. 2023).

The MTP module drafts token t+2 from the main model's hidden state at t; the next step verifies [t+1, draft] in
one forward of the main model and accepts the draft with the standard rule (`Sampler.verify`), so greedy output
is identical to plain greedy and sampled output keeps its distribution. Each accepted draft is a token without a
decode step of its own. The MTP module keeps its own one-layer latent cache beside the main one; DeepSeek-V4's MTP
block (`SpeculatorV4`) keeps its own window + compressed cache and drafts from the main model's residual streams.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from nanoseek.infer.cache import CompressedKVCache, LatentCache
from nanoseek.infer.runner import Runner, pow2
from nanoseek.infer.runner_v4 import RunnerV4
from nanoseek.infer.sampling import SampleOutput, Sampler
from nanoseek.infer.sequence import Sequence
from nanoseek.model import Transformer
from nanoseek.model.mla import write_latents

Append = Callable[[Sequence, SampleOutput, int], list[int]]


def greedy_step(
    model: Transformer,
    ids: torch.Tensor,
    kv_cache: torch.Tensor,
    mtp_cache: torch.Tensor,
    slots: torch.Tensor | None,
    start: torch.Tensor,
    cache_len: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One greedy self-speculative step as a single pure function (what a compiled engine compiles): verify ids
    [N, 2] = [last token, MTP's draft] with the main model, then draft the next token with MTP from the positions
    that were kept. Returns (greedy tokens [N, 2], accepted [N] = draft was the argmax, next draft [N], new
    main-cache entries [L, N, 2, W], new MTP-cache entries [N, 2, W])."""
    logits, h, new = model.cached_step(ids, kv_cache, slots, start, cache_len)
    tokens = logits.argmax(dim=-1)  # [N, 2]
    accepted = tokens[:, 0] == ids[:, 1]
    # MTP position start sees (h_start, token start+1) = t0; position start+1 (used only if accepted): t1
    nxt = torch.stack((tokens[:, 0], torch.where(accepted, tokens[:, 1], tokens[:, 0])), dim=1)
    kept = accepted.long()  # the last kept position: the draft comes from there (both get MTP-cache entries)
    mtp_logits, mtp_new = model.mtp_cached_step(h, nxt, mtp_cache, slots, start, cache_len, query_rows=kept)
    return tokens, accepted, mtp_logits[:, 0].argmax(dim=-1), new, mtp_new


class Speculator:
    """Drafts and verifies for the engine's sequences. `append(seq, out, row)` is the engine's rule for recording
    a sampled token (EOS, stops, limits); it returns the ids that joined the output."""

    def __init__(
        self, runner: Runner | RunnerV4, sampler: Sampler, mtp_cache: LatentCache | CompressedKVCache, append: Append
    ) -> None:
        model = runner.model
        self.runner, self.sampler, self.append = runner, sampler, append
        self.cache, self.mtp_cache = runner.cache, mtp_cache
        self.vocab_size, self.device = model.config.vocab_size, runner.device
        self.mtp_fn, self.greedy_fn = None, None  # compiled draft step; compiled verify-and-redraft (greedy_step)
        if runner.compiled:
            self.mtp_fn = runner.compile(model.mtp_cached_step)
            self.greedy_fn = runner.compile(lambda *args: greedy_step(model, *args))

    def first_draft(self, seq: Sequence, hidden: torch.Tensor) -> None:
        """MTP prefill over the prompt (inputs h_i [1, P, d], V4: the streams [1, P, hc, d], and token i+1) and a
        draft for the token after the first output token."""
        P = len(seq.prompt_ids)
        nxt = torch.tensor([seq.prompt_ids[1:] + [seq.output_ids[-1]]], device=self.device)
        slot = torch.tensor([seq.slot], device=self.device)
        zero, last = torch.zeros(1, dtype=torch.long, device=self.device), torch.tensor([P - 1], device=self.device)
        logits = self._mtp(hidden, nxt, slot, zero, last)
        self.mtp_cache.lengths[seq.slot] = P
        d = self.sampler.sample(slot, logits[:, 0], return_probs=True)
        seq.draft, seq.draft_probs = d.token(0), None if d.probs is None else d.probs[0]

    def decode(self, seqs: list[Sequence]) -> tuple[list[tuple[Sequence, list[int]]], int]:
        """Verify [last token, draft] for every sequence in one forward; accept, extend, redraft. Returns
        ((sequence, new token ids) for each, drafts accepted)."""
        tokens = [[s.output_ids[-1], s.draft] for s in seqs]
        if self.greedy_fn is not None and self.sampler.plain_greedy.issuperset(s.slot for s in seqs):
            rows = self.runner.in_place_rows([s.slot for s in seqs], tokens)
            if rows is not None:
                return self._decode_greedy(seqs, *rows)
        start = torch.tensor([self.cache.lengths[s.slot] for s in seqs], device=self.device)
        drafts = torch.tensor([s.draft for s in seqs], device=self.device)
        logits, hidden, slots = self.runner.forward([s.slot for s in seqs], tokens)  # [N, 2, V]
        q = None  # the drafts' distributions; plain-greedy rows keep none (one-hot)
        if any(s.draft_probs is not None for s in seqs):
            q = torch.stack([self._one_hot(s.draft) if s.draft_probs is None else s.draft_probs for s in seqs])
        accepted, out0 = self.sampler.verify(slots, drafts, q, logits[:, 0])
        emitted = [self.append(s, out0, i) for i, s in enumerate(seqs)]
        acc = accepted.tolist()
        # second token for rows whose draft was accepted (the sampler must see the first for penalties)
        rows = [i for i, s in enumerate(seqs) if acc[i] and not s.done]
        if rows:
            idx = torch.tensor(rows, device=self.device)
            out1 = self.sampler.sample(slots[idx], logits[idx, 1])
            for j, i in enumerate(rows):
                emitted[i] += self.append(seqs[i], out1, j)
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
                nxt.append([tok1, s.output_ids[-1]])
            pick = torch.tensor([1 if acc[i] else 0 for i in live], device=self.device)  # the last kept position
            mtp_logits = self._mtp(hidden[idx], torch.tensor(nxt, device=self.device), slots[idx], start[idx], pick)
            d = self.sampler.sample(slots[idx], mtp_logits[:, 0], return_probs=True)
            for j, i in enumerate(live):
                s = seqs[i]
                self.mtp_cache.lengths[s.slot] = self.cache.lengths[s.slot]
                s.draft, s.draft_probs = d.token(j), None if d.probs is None else d.probs[j]
        return [(s, emitted[i]) for i, s in enumerate(seqs)], sum(acc)

    def _decode_greedy(
        self, seqs: list[Sequence], ids: torch.Tensor, row_start: torch.Tensor
    ) -> tuple[list[tuple[Sequence, list[int]]], int]:
        """Compiled, all rows plain greedy: verify and redraft in one call (`greedy_step`) over the cache rows read
        in place (`Runner.in_place_rows`: ids [R, 2] = [last token, draft], row_start [R])."""
        slots = [s.slot for s in seqs]
        cache_len = self.runner.cache_read_len([self.cache.lengths[s] for s in slots])
        mtp_kv = self.mtp_cache.kv[0]
        tokens, accepted, draft, new, mtp_new = self.runner.call(
            self.greedy_fn, ids, self.cache.kv, mtp_kv, None, row_start, cache_len
        )
        slots_t = torch.tensor(slots, device=self.device)
        write_latents(self.cache.kv, slots_t, row_start[slots_t], new[:, slots_t])
        write_latents(mtp_kv, slots_t, row_start[slots_t], mtp_new[slots_t])
        out0, out1 = SampleOutput(tokens=tokens[:, 0]), SampleOutput(tokens=tokens[:, 1])
        acc, drafts = accepted.tolist(), draft.tolist()
        results = []
        for s in seqs:
            emitted = self.append(s, out0, s.slot)
            if acc[s.slot] and not s.done:
                emitted += self.append(s, out1, s.slot)
            self.cache.lengths[s.slot] += 2 if acc[s.slot] else 1
            self.mtp_cache.lengths[s.slot] = self.cache.lengths[s.slot]
            s.draft, s.draft_probs = drafts[s.slot], None
            results.append((s, emitted))
        return results, sum(acc[s] for s in slots)

    def _mtp(
        self, h: torch.Tensor, next_tokens: torch.Tensor, slots: torch.Tensor, start: torch.Tensor, rows: torch.Tensor
    ) -> torch.Tensor:
        """MTP logits [N, 1, V] at position rows[n] of each row, for hidden states h [N, T, d] and the tokens
        after them; extends the MTP cache by all T positions."""
        (N, T), kv = h.shape[:2], self.mtp_cache.kv[0]
        cache_len = int(start.max())
        fn = self.runner.model.mtp_cached_step
        if self.runner.compiled and (T <= 2 or cache_len == 0):
            # decode-time drafts: rows padded to a power of two; a prompt's prefill (no past): its length padded
            # to a power of two (causal, so the padding changes no real position; its entries are not stored)
            n_pad, length = (pow2(N), T) if T <= 2 else (N, min(max(16, pow2(T)), self.runner.max_len))
            h = F.pad(h, (0, 0, 0, length - T, 0, n_pad - N))
            next_tokens = F.pad(next_tokens, (0, length - T, 0, n_pad - N))
            slots, start, rows = (torch.cat((t, t[-1:].expand(n_pad - N))) for t in (slots, start, rows))
            cache_len = self.runner.cache_read_len([cache_len])
            fn = self.mtp_fn
        logits, new = self.runner.call(fn, h, next_tokens, kv, slots, start, cache_len, rows)
        write_latents(kv, slots[:N], start[:N], new[:N, :T])
        return logits[:N]

    def _one_hot(self, token: int) -> torch.Tensor:
        return torch.zeros(self.vocab_size, device=self.device).index_fill_(
            0, torch.tensor([token], device=self.device), 1.0
        )


class SpeculatorV4(Speculator):
    """Speculation on DeepSeek-V4: the MTP block drafts from the main model's residual streams (MTPModuleV4) over
    its own LayerCacheV4, and verification is V3's. Both caches are written in place (RunnerV4), the rejected
    draft's position too, and need no undo: the one position a V4 cache row holds past its sequence's length is
    written again before anything reads it (compressed_attention.LayerCacheV4), so a rejection advances
    `lengths` by one instead of two, as on V3's latent cache. That holds for one draft token, which is what
    MTP depth 1 makes. Eager, like RunnerV4."""

    def _mtp(
        self, h: torch.Tensor, next_tokens: torch.Tensor, slots: torch.Tensor, start: torch.Tensor, rows: torch.Tensor
    ) -> torch.Tensor:
        """MTP logits [N, 1, V] at position rows[n] of each row, for the main model's streams h [N, T, hc, d] and
        the tokens after them; extends the MTP cache by all T positions. A prompt goes in chunks of the runner's
        prefill_chunk (rows must lie in the last chunk: the drafts read the last kept position)."""
        model, cache, chunk = self.runner.model, self.mtp_cache.layers[0], self.runner.prefill_chunk
        T = h.shape[1]
        for i in range(0, T, chunk):
            at = rows - i if i + chunk >= T else torch.zeros_like(rows)  # earlier chunks only fill the cache
            logits = model.mtp_forward_cached(
                h[:, i : i + chunk], next_tokens[:, i : i + chunk], cache, slots, start + i, at
            )
        return logits
