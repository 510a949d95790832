"""Sampling: penalties, filters, temperature, seeds, log-probs, validation, speculative acceptance."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.stats import chi2_ok
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoseek.infer.sampling import (
    Sampler,
    SamplingParams,
    apply_penalties,
    filter_top_k_top_p_min_p,
    probs_from_logits,
    speculative_accept,
)

INF = math.inf


def t(*xs) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float32)


def kept(logits: torch.Tensor) -> list[list[int]]:
    return [torch.nonzero(row > -INF).flatten().tolist() for row in logits]


# ---------------------------------------------------------------------------------------------- penalties
def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    logits = t(2.0, -2.0, 2.0, -2.0)[None]
    prompt = torch.tensor([[True, False, False, False]])
    counts = torch.tensor([[0, 1, 0, 0]])
    out = apply_penalties(logits, counts, prompt, t(2.0), t(0.0), t(0.0))
    assert out.tolist() == [[1.0, -4.0, 2.0, -2.0]]  # unseen tokens 2 and 3 untouched


def test_frequency_and_presence_penalties_use_output_counts_only():
    logits = torch.zeros(1, 4)
    prompt = torch.tensor([[True, True, False, False]])
    counts = torch.tensor([[0, 3, 1, 0]])
    out = apply_penalties(logits, counts, prompt, t(1.0), t(0.5), t(1.0))
    assert out.tolist() == [[0.0, -2.5, -1.5, 0.0]]  # prompt-only token 0 not penalised


def test_neutral_penalties_leave_logits_bit_identical():
    logits = torch.randn(2, 7)
    out = apply_penalties(
        logits, torch.ones(2, 7, dtype=torch.int32), torch.ones(2, 7, dtype=torch.bool), t(1, 1), t(0, 0), t(0, 0)
    )
    assert torch.equal(out, logits)


def test_sampler_counts_observed_tokens_and_applies_penalties():
    s = Sampler(vocab_size=4, max_slots=2)
    s.add(1, SamplingParams(temperature=0, frequency_penalty=1.0), prompt_ids=[])
    slots = torch.tensor([1])
    s.observe(slots, torch.tensor([[2, 2, -1]]))  # two accepted tokens plus padding
    assert s.counts[1].tolist() == [0, 0, 2, 0]
    out = s.sample(slots, t(0.0, 0.0, 1.5, 0.0)[None])
    assert out.tokens.item() == 0  # token 2 fell to -0.5; ties resolve to the first index


# ---------------------------------------------------------------------------------------------- filters
def filt(logits, k=0, p=1.0, m=0.0):
    n = logits.size(0)
    return filter_top_k_top_p_min_p(logits, torch.full((n,), k), torch.full((n,), p), torch.full((n,), m))


def test_top_k_keeps_the_k_largest():
    assert kept(filt(t(1, 5, 3, 4, 2)[None], k=2)) == [[1, 3]]
    assert kept(filt(t(1, 5, 3)[None], k=10)) == [[0, 1, 2]]


def test_top_p_keeps_smallest_set_with_mass_at_least_p():
    logits = torch.log(t(0.1, 0.5, 0.15, 0.25))[None]
    assert kept(filt(logits, p=0.5)) == [[1]]  # 0.5 alone reaches 0.5
    assert kept(filt(logits, p=0.6)) == [[1, 3]]  # 0.75
    assert kept(filt(logits, p=0.8)) == [[1, 2, 3]]  # 0.9
    assert kept(filt(logits, p=1.0)) == [[0, 1, 2, 3]]  # off
    assert kept(filt(logits, p=1e-6)) == [[1]]  # never empty


def test_top_p_applies_to_the_distribution_left_by_top_k():
    logits = torch.log(t(0.4, 0.3, 0.2, 0.1))[None]
    assert kept(filt(logits, k=2, p=0.6)) == [[0, 1]]  # 0.4/0.7 < 0.6, so both survive


def test_min_p_keeps_tokens_above_fraction_of_max():
    logits = torch.log(t(0.5, 0.3, 0.15, 0.05))[None]
    assert kept(filt(logits, m=0.3)) == [[0, 1, 2]]  # threshold 0.15
    assert kept(filt(logits, m=1.0)) == [[0]]


def test_filters_are_per_row():
    logits = t(1, 2, 3)[None].repeat(2, 1)
    out = filter_top_k_top_p_min_p(logits, torch.tensor([1, 0]), t(1, 1), t(0, 0))
    assert kept(out) == [[2], [0, 1, 2]]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(-20, 20), min_size=1, max_size=12),
    st.integers(0, 15),
    st.floats(1e-3, 1.0),
    st.floats(0.0, 1.0),
)
def test_filtering_keeps_argmax_and_a_sorted_prefix(values, k, p, m):
    logits = torch.tensor([values])
    out = filt(logits, k=k, p=p, m=m)
    keep = out[0] > -INF
    assert keep[logits.argmax()]
    assert torch.equal(out[0][keep], logits[0][keep])  # kept logits unchanged
    if (~keep).any():  # whatever was removed is no larger than anything kept
        assert logits[0][~keep].max() <= logits[0][keep].min()
    if k > 0:
        assert keep.sum() <= k


# -------------------------------------------------------------------------------------------- sampler
@settings(max_examples=40, deadline=None)
@given(
    st.floats(0.0, 3.0),
    st.integers(0, 12),
    st.floats(1e-3, 1.0),
    st.floats(0.0, 1.0),
    st.floats(0.5, 2.0),
    st.integers(0, 2**31),
)
def test_sampled_token_is_in_vocab_and_survives_filtering(temperature, k, p, m, rep, seed):
    params = SamplingParams(temperature=temperature, top_k=k, top_p=p, min_p=m, repetition_penalty=rep, seed=seed)
    s = Sampler(vocab_size=10, max_slots=1)
    s.add(0, params, prompt_ids=[3, 4])
    slots, logits = torch.tensor([0]), torch.randn(1, 10, generator=torch.Generator().manual_seed(seed)) * 5
    token = s.sample(slots, logits).tokens.item()
    assert 0 <= token < 10
    assert s.process(slots, logits)[0, token] > -INF


def make(params: list[SamplingParams], vocab: int = 6, slots: list[int] | None = None) -> tuple[Sampler, torch.Tensor]:
    slots = slots or list(range(len(params)))
    s = Sampler(vocab_size=vocab, max_slots=max(slots) + 1)
    for slot, p in zip(slots, params):
        s.add(slot, p, prompt_ids=[])
    return s, torch.tensor(slots)


def test_temperature_zero_is_argmax():
    logits = torch.randn(8, 50)
    s, slots = make([SamplingParams(temperature=0, top_k=5)] * 8, vocab=50)
    assert torch.equal(s.sample(slots, logits).tokens, logits.argmax(-1))


def test_probs_from_logits_is_one_hot_for_greedy_rows():
    logits = t(1, 3, 2)[None].repeat(2, 1)
    probs = probs_from_logits(logits, t(0.0, 2.0))
    assert probs[0].tolist() == [0, 1, 0]
    assert torch.allclose(probs[1], (logits[1] / 2).softmax(-1))


def test_sampled_frequencies_match_softmax_over_temperature():
    torch.manual_seed(0)
    logits = t(1.0, 0.0, -1.0, 2.0, 0.5)
    n = 20_000
    s, slots = make([SamplingParams(temperature=0.7)], vocab=5)
    tokens = s.sample(slots.repeat(n), logits[None].repeat(n, 1)).tokens
    assert chi2_ok(torch.bincount(tokens, minlength=5), (logits / 0.7).softmax(-1))


def test_sampled_tokens_respect_filters():
    torch.manual_seed(0)
    logits = torch.log(t(0.1, 0.5, 0.15, 0.25))
    s, slots = make([SamplingParams(top_p=0.6)], vocab=4)
    tokens = s.sample(slots.repeat(2000), logits[None].repeat(2000, 1)).tokens
    assert set(tokens.tolist()) == {1, 3}


def run_seeded(params: SamplingParams, slot: int, others: list[SamplingParams], steps: int = 5) -> list[int]:
    """Tokens of a seeded request in `slot`, sharing each step with `others` in the remaining slots."""
    torch.manual_seed(len(others))  # the global RNG differs between runs too
    s = Sampler(vocab_size=30, max_slots=8)
    s.add(slot, params, prompt_ids=[])
    other_slots = [i for i in range(8) if i != slot][: len(others)]
    for i, p in zip(other_slots, others):
        s.add(i, p, prompt_ids=[])
    slots = torch.tensor(other_slots[:1] + [slot] + other_slots[1:])  # the seeded row is not first
    logits = torch.linspace(-1, 1, 30).repeat(len(slots), 1)
    row = slots.tolist().index(slot)
    out = []
    for _ in range(steps):
        tokens = s.sample(slots, logits).tokens
        s.observe(slots, tokens)
        out.append(tokens[row].item())
    return out


def test_seed_reproduces_regardless_of_batch_and_slot():
    p = SamplingParams(seed=1234, top_k=20)
    alone = run_seeded(p, slot=0, others=[])
    crowded = [SamplingParams(), SamplingParams(seed=7), SamplingParams(temperature=0), SamplingParams(top_p=0.5)]
    assert run_seeded(p, slot=5, others=crowded) == alone
    assert run_seeded(p, slot=3, others=crowded[:2]) == alone


def test_different_seeds_differ():
    a = run_seeded(SamplingParams(seed=1), slot=0, others=[], steps=8)
    b = run_seeded(SamplingParams(seed=2), slot=0, others=[], steps=8)
    assert a != b


def test_logprobs_are_log_softmax_of_processed_logits():
    torch.manual_seed(0)
    logits = torch.randn(3, 40)
    params = [
        SamplingParams(temperature=0.8, top_k=10, logprobs=True, top_logprobs=5),
        SamplingParams(temperature=0, logprobs=True),
        SamplingParams(temperature=1.3, min_p=0.05, top_logprobs=3),
    ]
    s, slots = make(params, vocab=40)
    out = s.sample(slots, logits)
    proc = torch.stack(
        [
            filt(logits[:1] / 0.8, k=10)[0],
            logits[1],  # greedy rows report temperature-1 log-probs
            filt(logits[2:] / 1.3, m=0.05)[0],
        ]
    )
    expected = proc.log_softmax(-1)
    assert torch.allclose(out.logprobs, expected.gather(1, out.tokens[:, None]).squeeze(1))
    assert out.top_ids.shape == (3, 5)
    assert torch.all(out.top_logprobs[:, :-1] >= out.top_logprobs[:, 1:])  # sorted
    assert torch.allclose(out.top_logprobs, expected.gather(1, out.top_ids))
    assert torch.isfinite(out.logprobs).all()  # the chosen token was never filtered


def test_no_logprobs_unless_asked():
    s, slots = make([SamplingParams()])
    out = s.sample(slots, torch.randn(1, 6))
    assert out.logprobs is None and out.top_ids is None


def test_slots_are_reusable_and_reset():
    s = Sampler(vocab_size=4, max_slots=1)
    s.add(0, SamplingParams(presence_penalty=2.0), prompt_ids=[1])
    s.observe(torch.tensor([0]), torch.tensor([2]))
    with pytest.raises(ValueError, match="in use"):
        s.add(0, SamplingParams(), prompt_ids=[])
    s.remove(0)
    s.add(0, SamplingParams(temperature=0), prompt_ids=[])
    assert s.counts[0].sum() == 0 and not s.prompt_mask[0].any() and s.presence_penalty[0] == 0


@pytest.mark.parametrize(
    "kw,field",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(min_p=1.5), "min_p"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(frequency_penalty=3.0), "frequency_penalty"),
        (dict(top_logprobs=21), "top_logprobs"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(seed=-1), "seed"),
    ],
)
def test_invalid_params_name_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kw)


# ---------------------------------------------------------------------------------------- speculative
def test_speculative_output_follows_target_distribution():
    torch.manual_seed(0)
    n = 50_000
    p = t(0.1, 0.4, 0.05, 0.3, 0.15)
    q = t(0.3, 0.1, 0.3, 0.2, 0.1)
    draft = torch.multinomial(q, n, replacement=True)
    accepted, tokens = speculative_accept(
        draft, q.repeat(n, 1), p.repeat(n, 1), torch.rand(n), torch.empty(n, 5).exponential_()
    )
    assert chi2_ok(torch.bincount(tokens, minlength=5), p)
    # acceptance rate is sum_x min(p, q) (Leviathan et al., Thm 3.5)
    assert abs(accepted.float().mean().item() - torch.minimum(p, q).sum().item()) < 0.01


def test_speculative_greedy_accepts_iff_draft_is_target_argmax():
    target = torch.softmax(torch.randn(4, 9), -1)
    best = target.argmax(-1)
    draft = torch.stack([best[0], (best[1] + 1) % 9, best[2], (best[3] + 3) % 9])
    q = torch.full((4, 9), 1 / 9)
    accepted, tokens = speculative_accept(
        draft, q, target, torch.rand(4), torch.empty(4, 9).exponential_(), greedy=torch.ones(4, dtype=torch.bool)
    )
    assert accepted.tolist() == [True, False, True, False]
    assert torch.equal(tokens, best)


def test_sampler_verify_emits_the_target_distribution():
    torch.manual_seed(0)
    n, v = 20_000, 4
    draft_logits, target_logits = t(0.0, 1.0, 0.0, -1.0), t(1.0, 0.0, 0.5, 0.0)
    s, slots = make([SamplingParams()], vocab=v)
    slots = slots.repeat(n)
    draft = s.sample(slots, draft_logits.repeat(n, 1), return_probs=True)
    accepted, out = s.verify(slots, draft.tokens, draft.probs, target_logits.repeat(n, 1))
    assert chi2_ok(torch.bincount(out.tokens, minlength=v), target_logits.softmax(-1))
    assert torch.equal(out.tokens[accepted], draft.tokens[accepted])
