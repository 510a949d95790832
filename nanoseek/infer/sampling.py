"""Sampling for a running batch: penalties, temperature, top-k / top-p / min-p, seeded draws, log-probs,
and the speculative-decoding acceptance rule.

The engine calls `Sampler.sample(slots, logits)` once per decoding step with the last-position logits of every
running sequence. Per-request parameters live in `[max_slots]` tensors indexed by slot, so sequences join and
leave the batch without rebuilding anything, and every step is a handful of batched tensor ops.

Processing order (the HF / vLLM order): grammar mask -> penalties -> temperature -> top-k -> top-p -> min-p -> draw.
The grammar mask (`structured.py`) is applied only to rows with a constraint: other rows pay nothing.
The "processed logits" are the output of that chain, with removed tokens at -inf. Reported log-probs are
`log_softmax(processed logits)`: the distribution actually sampled from, as OpenAI reports them. Greedy rows
(temperature 0) use temperature 1 for the log-probs, since their sampling distribution is a point mass and
would only report 0 / -inf; their token is the argmax of the penalised logits either way.

Draws use the exponential-race trick of DeepSeek's reference `generate.py`: `argmax(probs / E)` with
`E ~ Exp(1)` i.i.d. is an exact sample from `probs`. Seeded rows draw their `E` from their own `torch.Generator`,
so a seeded request yields the same tokens whatever else is in the batch and whichever slot it occupies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from nanoseek.infer.structured import Constraint, mask_logits

MAX_TOP_LOGPROBS = 20


GREEDY_BELOW = 1e-5  # temperatures this small are greedy (as in vLLM): logits / T would overflow to inf


@dataclass
class SamplingParams:
    """How one request samples. Defaults follow the OpenAI API; every "off" value leaves the logits untouched."""

    temperature: float = 1.0  # 0 (or below 1e-5, where logits / T overflow) => greedy
    top_k: int = 0  # 0 => off
    top_p: float = 1.0  # nucleus: the smallest set of tokens with mass >= top_p; 1 => off
    min_p: float = 0.0  # keep tokens with p >= min_p * p_max; 0 => off
    repetition_penalty: float = 1.0  # CTRL / HF rule on tokens seen in prompt + output; 1 => off
    frequency_penalty: float = 0.0  # OpenAI: logit -= frequency_penalty * count(token in output)
    presence_penalty: float = 0.0  # OpenAI: logit -= presence_penalty * (count > 0)
    seed: int | None = None  # same seed + same input => same output, whatever the batch
    logprobs: bool = False  # return the chosen token's log-prob
    top_logprobs: int = 0  # and the n most likely alternatives (implies logprobs)
    max_tokens: int = 256
    stop: list[str] = field(default_factory=list)  # stop strings, checked by the engine on decoded text
    ignore_eos: bool = False  # keep going past EOS (vLLM's option: fixed-length benchmarks)
    grammar: str | None = None  # llguidance grammar the output must match (structured.grammar_from_response_format)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):  # the OpenAI API accepts a bare string
            self.stop = [self.stop]
        checks = [
            ("temperature", math.isfinite(self.temperature) and self.temperature >= 0, "must be >= 0"),
            ("top_k", isinstance(self.top_k, int) and self.top_k >= 0, "must be an int >= 0 (0 = off)"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("min_p", 0 <= self.min_p <= 1, "must be in [0, 1]"),
            ("repetition_penalty", math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0, "must be > 0"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "must be in [-2, 2]"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "must be in [-2, 2]"),
            ("seed", self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed < 2**63), "must be None or an int in [0, 2**63)"),
            ("top_logprobs", isinstance(self.top_logprobs, int) and 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS, f"must be an int in [0, {MAX_TOP_LOGPROBS}]"),
            ("max_tokens", isinstance(self.max_tokens, int) and self.max_tokens >= 1, "must be an int >= 1"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "must be a list of non-empty strings"),
            ("grammar", self.grammar is None or isinstance(self.grammar, str), "must be None or a grammar string"),
        ]  # fmt: skip
        for name, ok, rule in checks:
            if not ok:
                raise ValueError(f"SamplingParams.{name} {rule}, got {getattr(self, name)!r}")

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs or self.top_logprobs > 0


@dataclass
class SampleOutput:
    """One step's result for rows `slots`. Log-prob fields are filled for all rows when any row asked for them;
    `top_ids` / `top_logprobs` have as many columns as the largest `top_logprobs` asked, sorted descending."""

    tokens: Tensor  # [N] int64
    logprobs: Tensor | None = None  # [N] float32, log-prob of the chosen token
    top_ids: Tensor | None = None  # [N, n] int64
    top_logprobs: Tensor | None = None  # [N, n] float32
    probs: Tensor | None = None  # [N, V] the sampling distribution (one-hot for greedy rows), on request
    _token_list: list[int] | None = field(default=None, repr=False)

    def token(self, row: int) -> int:
        """tokens[row] as an int (one host copy for all rows)."""
        if self._token_list is None:
            self._token_list = self.tokens.tolist()
        return self._token_list[row]


# ------------------------------------------------------------------------------------------ pure helpers
def apply_penalties(
    logits: Tensor,
    counts: Tensor,
    prompt_mask: Tensor,
    repetition_penalty: Tensor,
    frequency_penalty: Tensor,
    presence_penalty: Tensor,
) -> Tensor:
    """Penalise repeated tokens. logits [N, V]; counts [N, V] output-token counts; prompt_mask [N, V] bool;
    penalties [N]. Repetition (Keskar et al. 2019, HF rule) applies to tokens seen in prompt or output, and
    divides positive logits but multiplies negative ones so that it always lowers them; frequency and presence
    (OpenAI rule) apply to output tokens only. Rows with neutral penalties come back bit-identical."""
    seen = prompt_mask | (counts > 0)
    rep = repetition_penalty[:, None]
    logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    counts = counts.to(logits.dtype)
    return logits - frequency_penalty[:, None] * counts - presence_penalty[:, None] * (counts > 0).to(logits.dtype)


def filter_top_k_top_p_min_p(logits: Tensor, top_k: Tensor, top_p: Tensor, min_p: Tensor) -> Tensor:
    """Set the logits of removed tokens to -inf. logits [N, V] (temperature already applied); top_k [N] int
    (0 = off); top_p, min_p [N] float (1 / 0 = off). Top-p is taken on the distribution left by top-k (the HF
    and vLLM order) and keeps the smallest prefix whose mass is >= top_p; min-p keeps p >= min_p * p_max. All
    three keep a prefix of the tokens sorted by logit, so one stable sort serves them, and the top token is
    never removed."""
    V = logits.size(-1)
    sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)  # stable: ties resolve like argmax
    rank = torch.arange(V, device=logits.device)
    k = torch.where(top_k > 0, top_k.clamp(max=V), V)
    remove = rank >= k[:, None]  # [N, V] in sorted order
    probs = sorted_logits.masked_fill(remove, -math.inf).softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # mass of strictly more likely tokens
    # top_p == 1 is "off": rounding in the cumsum must not drop the tail
    remove |= (mass_before >= top_p[:, None]) & (top_p[:, None] < 1)
    remove |= probs < min_p[:, None] * probs[:, :1]  # probs[:, 0] is p_max
    remove[:, 0] = False
    remove = torch.empty_like(remove).scatter_(1, order, remove)  # back to vocabulary order
    return logits.masked_fill(remove, -math.inf)


def probs_from_logits(logits: Tensor, temperature: Tensor) -> Tensor:
    """The distribution sampled from: softmax(logits / T) per row, a one-hot at the argmax where T == 0."""
    greedy = temperature == 0
    probs = (logits / torch.where(greedy, 1.0, temperature)[:, None]).softmax(dim=-1)
    one_hot = torch.zeros_like(probs).scatter_(1, logits.argmax(dim=-1, keepdim=True), 1.0)
    return torch.where(greedy[:, None], one_hot, probs)


def speculative_accept(
    draft_tokens: Tensor,
    draft_probs: Tensor,
    target_probs: Tensor,
    uniform: Tensor,
    noise: Tensor,
    greedy: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Speculative sampling (Leviathan et al. 2023, Chen et al. 2023) for one drafted position per row.

    Accept draft token x ~ q with probability min(1, p(x) / q(x)); on rejection draw from
    normalize(max(0, p - q)). The emitted token is then distributed exactly as p. Greedy rows accept iff
    x == argmax(p) and otherwise emit argmax(p).
    draft_tokens [N]; draft_probs q, target_probs p [N, V]; uniform [N] ~ U[0, 1); noise [N, V] ~ Exp(1)
    for the residual draw. Returns (accepted [N] bool, token [N] int64).
    """
    x = draft_tokens[:, None]
    p_x = target_probs.gather(1, x).squeeze(1)
    q_x = draft_probs.gather(1, x).squeeze(1)
    accepted = uniform * q_x < p_x  # u < p/q without dividing by a q that could be 0
    residual = (target_probs - draft_probs).clamp_min(0)
    # p == q leaves no residual mass, but then rejection has probability 0: fall back to p for safety
    residual = torch.where(residual.sum(dim=-1, keepdim=True) > 0, residual, target_probs)
    resampled = (residual / noise).argmax(dim=-1)  # exponential race: a sample from normalize(residual)
    if greedy is not None:
        best = target_probs.argmax(dim=-1)
        accepted = torch.where(greedy, draft_tokens == best, accepted)
        resampled = torch.where(greedy, best, resampled)
    return accepted, torch.where(accepted, draft_tokens, resampled)


# --------------------------------------------------------------------------------------------- sampler
class Sampler:
    """Batched sampling state, indexed by slot: per-row parameters as `[max_slots]` tensors, per-row token
    counts for the penalties, and a `torch.Generator` per seeded row (unseeded rows use torch's global RNG).

    Counts are a dense `[max_slots, V]` int32 tensor plus a bool prompt mask: 5 bytes per (slot, token), i.e.
    41 MB for 64 slots at DeepSeek-V3's V = 129280. Dense keeps `observe` and the penalties one scatter / one
    gather each; a sparse per-row list would only pay off for hundreds of slots.
    """

    def __init__(self, vocab_size: int, max_slots: int = 64, device: torch.device | str = "cpu"):
        self.vocab_size, self.max_slots, self.device = vocab_size, max_slots, torch.device(device)

        def full(value: float, dtype: torch.dtype = torch.float32) -> Tensor:
            return torch.full((max_slots,), value, dtype=dtype, device=self.device)

        self.temperature, self.top_p, self.min_p = full(1.0), full(1.0), full(0.0)
        self.top_k, self.top_logprobs = full(0, torch.long), full(0, torch.long)
        self.repetition_penalty, self.frequency_penalty, self.presence_penalty = full(1.0), full(0.0), full(0.0)
        self.wants_logprobs = full(False, torch.bool)
        self.counts = torch.zeros(max_slots, vocab_size, dtype=torch.int32, device=self.device)
        self.prompt_mask = torch.zeros(max_slots, vocab_size, dtype=torch.bool, device=self.device)
        self.params: dict[int, SamplingParams] = {}  # slot -> request params (the engine reads max_tokens, stop)
        self.plain_greedy: set[int] = set()  # argmax rows with no penalty and no log-probs: the decode fast path
        self.penalised: set[int] = set()  # rows whose penalties need token counts
        self.generators: dict[int, torch.Generator] = {}
        self.constraints: dict[int, Constraint] = {}  # rows whose tokens a grammar restricts

    def add(
        self, slot: int, params: SamplingParams, prompt_ids: list[int], constraint: Constraint | None = None
    ) -> None:
        """Start a sequence in row `slot` (with `constraint`, its tokens are masked by a grammar)."""
        if not 0 <= slot < self.max_slots:
            raise ValueError(f"slot {slot} out of range [0, {self.max_slots})")
        if slot in self.params:
            raise ValueError(f"slot {slot} is already in use")
        self.params[slot] = params
        p = params
        temperature = p.temperature if p.temperature >= GREEDY_BELOW else 0.0
        for t, v in [
            (self.temperature, temperature),
            (self.top_k, p.top_k),
            (self.top_p, p.top_p),
            (self.min_p, p.min_p),
            (self.repetition_penalty, p.repetition_penalty),
            (self.frequency_penalty, p.frequency_penalty),
            (self.presence_penalty, p.presence_penalty),
            (self.top_logprobs, p.top_logprobs),
            (self.wants_logprobs, p.wants_logprobs),
        ]:
            t[slot] = v
        self.counts[slot] = 0
        self.prompt_mask[slot] = False
        if prompt_ids:
            self.prompt_mask[slot, torch.tensor(prompt_ids, device=self.device)] = True
        if p.seed is not None:
            self.generators[slot] = torch.Generator(self.device).manual_seed(p.seed)
        penalised = p.repetition_penalty != 1 or p.frequency_penalty != 0 or p.presence_penalty != 0
        if penalised:
            self.penalised.add(slot)
        if constraint is not None:
            self.constraints[slot] = constraint
        elif temperature == 0 and not penalised and not p.wants_logprobs:  # a masked row is never plain argmax
            self.plain_greedy.add(slot)

    def remove(self, slot: int) -> None:
        """End the sequence in row `slot`; the row's tensors are reset on the next `add`."""
        self.params.pop(slot, None)
        self.generators.pop(slot, None)
        self.plain_greedy.discard(slot)
        self.penalised.discard(slot)
        self.constraints.pop(slot, None)

    def observe(self, slots: Tensor, tokens: Tensor) -> None:
        """Count generated tokens. tokens [N] or [N, K] (K accepted tokens per row); negative entries are
        padding and ignored."""
        if not self.penalised.intersection(slots.tolist()):  # counts only feed the penalties
            return
        slots = slots.to(self.device).long()
        tokens = tokens.to(self.device).long()
        if tokens.dim() == 2:
            slots = slots[:, None].expand_as(tokens)
        keep = tokens >= 0
        ones = torch.ones_like(tokens[keep], dtype=self.counts.dtype)
        self.counts.index_put_((slots[keep], tokens[keep]), ones, accumulate=True)

    def process(self, slots: Tensor, logits: Tensor) -> Tensor:
        """Processed logits [N, V] float32: penalties, temperature (1 for greedy rows), filtering (-inf)."""
        logits = logits.to(self.device, torch.float32)
        rep, freq, pres = self.repetition_penalty[slots], self.frequency_penalty[slots], self.presence_penalty[slots]
        if bool(((rep != 1) | (freq != 0) | (pres != 0)).any()):
            logits = apply_penalties(logits, self.counts[slots], self.prompt_mask[slots], rep, freq, pres)
        temp = self.temperature[slots]
        logits = logits / torch.where(temp == 0, 1.0, temp)[:, None]  # division by 1 is exact: rows stay independent
        top_k, top_p, min_p = self.top_k[slots], self.top_p[slots], self.min_p[slots]
        if bool(((top_k > 0) | (top_p < 1) | (min_p > 0)).any()):
            logits = filter_top_k_top_p_min_p(logits, top_k, top_p, min_p)
        return logits

    def sample(self, slots: Tensor, logits: Tensor, return_probs: bool = False) -> SampleOutput:
        """Draw one token for each row. slots [N]; logits [N, V]. `return_probs` adds the sampling distribution
        (e.g. the draft's q for `verify`), except when every row is plain greedy: `verify` then needs none."""
        logits = self._constrain(slots, logits)
        if self.plain_greedy.issuperset(slots.tolist()):
            return SampleOutput(tokens=logits.argmax(dim=-1).to(self.device))
        slots = slots.to(self.device).long()
        proc = self.process(slots, logits)
        greedy = self.temperature[slots] == 0
        tokens = proc.argmax(dim=-1)  # the argmax of the penalised logits: filtering always keeps it
        probs = proc.softmax(dim=-1)
        if not bool(greedy.all()):
            noise = self._exponential(slots, greedy, proc.shape)
            tokens = torch.where(greedy, tokens, (probs / noise).argmax(dim=-1))
        out = self._logprobs(slots, proc, tokens)
        if return_probs:
            one_hot = torch.zeros_like(probs).scatter_(1, tokens[:, None], 1.0)
            out.probs = torch.where(greedy[:, None], one_hot, probs)
        return out

    def verify(
        self, slots: Tensor, draft_tokens: Tensor, draft_probs: Tensor | None, target_logits: Tensor
    ) -> tuple[Tensor, SampleOutput]:
        """Speculative step: accept or replace each row's drafted token against the target model's logits at
        the same position. Returns (accepted [N] bool, output whose tokens are the emitted ones). The caller
        `observe`s emitted tokens before processing the next position, so its penalties see them."""
        target_logits = self._constrain(slots, target_logits)
        if self.plain_greedy.issuperset(slots.tolist()):  # greedy: accept iff the draft is the argmax
            tokens = target_logits.argmax(dim=-1).to(self.device)
            return tokens == draft_tokens.to(self.device), SampleOutput(tokens=tokens)
        slots = slots.to(self.device).long()
        proc = self.process(slots, target_logits)
        greedy = self.temperature[slots] == 0
        uniform = self._uniform(slots, greedy)
        noise = self._exponential(slots, greedy, proc.shape)
        accepted, tokens = speculative_accept(
            draft_tokens.to(self.device), draft_probs.to(self.device), proc.softmax(dim=-1), uniform, noise, greedy
        )
        return accepted, self._logprobs(slots, proc, tokens)

    # -------------------------------------------------------------------------------------- internals
    def _constrain(self, slots: Tensor, logits: Tensor) -> Tensor:
        """Grammar-forbidden tokens at -inf for constrained rows; a no-op (no copy) when no row has a constraint."""
        if not self.constraints:
            return logits
        return mask_logits(logits, [self.constraints.get(s) for s in slots.tolist()])

    def _logprobs(self, slots: Tensor, proc: Tensor, tokens: Tensor) -> SampleOutput:
        out = SampleOutput(tokens=tokens)
        if not bool(self.wants_logprobs[slots].any()):
            return out
        logprobs = proc.log_softmax(dim=-1)
        out.logprobs = logprobs.gather(1, tokens[:, None]).squeeze(1)
        n = int(self.top_logprobs[slots].max())
        if n > 0:
            out.top_logprobs, out.top_ids = logprobs.topk(n, dim=-1)  # sorted descending
        return out

    def _seeded_rows(self, slots: Tensor, greedy: Tensor) -> list[tuple[int, torch.Generator]]:
        """(row, generator) for seeded, non-greedy rows; greedy rows draw nothing, so their streams don't move."""
        rows = zip(slots.tolist(), greedy.tolist())
        return [(i, self.generators[s]) for i, (s, g) in enumerate(rows) if s in self.generators and not g]

    def _exponential(self, slots: Tensor, greedy: Tensor, shape: torch.Size) -> Tensor:
        """Exp(1) noise [N, V]: one batched draw from the global RNG, then each seeded row redrawn from its own
        generator (the only per-row loop: torch has no batched generators)."""
        noise = torch.empty(shape, device=self.device).exponential_()
        for i, g in self._seeded_rows(slots, greedy):
            noise[i].exponential_(generator=g)
        return noise.clamp_min_(torch.finfo(noise.dtype).tiny)  # E == 0 would turn 0 / E into nan

    def _uniform(self, slots: Tensor, greedy: Tensor) -> Tensor:
        """U[0, 1) per row [N], seeded rows from their own generator."""
        u = torch.rand(slots.shape, device=self.device)
        for i, g in self._seeded_rows(slots, greedy):
            u[i] = torch.rand((), device=self.device, generator=g)
        return u
