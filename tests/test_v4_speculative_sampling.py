"""Speculative sampling on DeepSeek-V4 keeps the model's distribution (Leviathan et al. 2023, Thm 1): with
temperature and top-k, the first three tokens of many seeded generations through the MTP speculator are
distributed as the model's exact joint probabilities from full forwards, as plain sampling's are; an acceptance
rule that always accepts the draft, or that resamples a rejection from p instead of max(0, p - q), fails the
same check. V3's acceptance rule is tested on its own in test_sampling.py; here the whole V4 path runs: the
first draft from the prompt's streams, verification over the window + compressed caches, and the second token
of an accepted pair."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from helpers import make_live
from helpers.stats import chi2_ok

from nanoseek import ModelConfig, Transformer
from nanoseek.infer import sampling
from nanoseek.infer.engine import Engine, single_thread
from nanoseek.infer.sampling import SamplingParams

PROMPT = [5, 9, 17, 3, 42, 8]
TOP_K, TEMPERATURE = 4, 1.0
N_TOKENS = 3  # t1 from the prefill, t2 verified against the first draft, t3 after an accepted or rejected t2
SAMPLES = 600  # seeds 0 .. SAMPLES - 1, so the counts and the verdict are the same on every run


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: hundreds of tiny ops per forward, which stall on a pool of threads on a busy machine."""
    with single_thread():
        yield


@pytest.fixture(scope="module")
def model() -> Transformer:
    """tiny-v4 with small weights, so its layers barely move the last token's embedding, and an MTP block that
    reads that embedding alone (e_proj = I, h_proj = 0): the draft's top-k overlaps the model's in part, so
    drafts are both accepted and rejected and p != q where they overlap (a random MTP block's top-k shares
    almost nothing with the model's: every draft rejected, and a wrong residual would go unseen)."""
    torch.manual_seed(0)
    config = ModelConfig.from_preset("tiny-v4", index_n_heads=8, initializer_range=0.05, max_position_embeddings=64)
    model = make_live(Transformer(config)).eval()
    with torch.no_grad():
        model.mtp[0].e_proj.weight.copy_(torch.eye(config.hidden_size))
        model.mtp[0].h_proj.weight.zero_()
    return model


def exact_joint(model: Transformer) -> dict[tuple[int, ...], float]:
    """P(t1 .. t_N_TOKENS | PROMPT) under top-k sampling at TEMPERATURE, from full forwards without a cache."""
    joint = {(): 1.0}
    for _ in range(N_TOKENS):
        prefixes = list(joint)
        with torch.no_grad():
            logits = model(torch.tensor([PROMPT + list(p) for p in prefixes]))[:, -1] / TEMPERATURE  # [B, V]
        top = logits.topk(TOP_K, dim=-1)
        probs = top.values.softmax(dim=-1)
        joint = {
            prefix + (tok,): joint[prefix] * pr
            for prefix, toks, prs in zip(prefixes, top.indices.tolist(), probs.tolist())
            for tok, pr in zip(toks, prs)
        }
    return joint


def sample(model: Transformer, speculative: bool) -> tuple[Counter, Engine]:
    """Counts of (t1 .. t_N_TOKENS) over SAMPLES seeded generations from PROMPT, all in one batch."""
    engine = Engine(model, max_batch_size=SAMPLES, max_len=16, speculative=speculative)
    params = [
        SamplingParams(max_tokens=N_TOKENS, temperature=TEMPERATURE, top_k=TOP_K, seed=s, ignore_eos=True)
        for s in range(SAMPLES)
    ]
    return Counter(tuple(c.token_ids) for c in engine.generate([PROMPT] * SAMPLES, params)), engine


def fits(counts: Counter, exact: dict[tuple[int, ...], float]) -> bool:
    """No sequence outside the support, and Pearson's chi-square at the 0.999 level over the sequences, those
    expected fewer than 5 times pooled into one cell (the approximation needs about 5 per cell)."""
    if not set(counts) <= set(exact):
        return False
    n = sum(counts.values())
    cells = [[s] for s in exact if exact[s] * n >= 5]
    rare = [s for s in exact if exact[s] * n < 5]
    cells += [rare] if rare else []
    observed = torch.tensor([sum(counts[s] for s in cell) for cell in cells])
    return chi2_ok(observed, torch.tensor([sum(exact[s] for s in cell) for cell in cells]))


@pytest.mark.parametrize("speculative", [False, True], ids=["plain", "speculative"])
def test_sampled_tokens_follow_the_models_exact_distribution(model, speculative):
    counts, engine = sample(model, speculative)
    assert fits(counts, exact_joint(model))
    if speculative:  # both branches ran: t2 kept as drafted and t2 redrawn from the residual
        assert 0.2 < engine.acceptance_rate < 0.9, engine.stats


def _always_accept(draft_tokens, draft_probs, target_probs, uniform, noise, greedy=None):
    return torch.ones_like(draft_tokens, dtype=torch.bool), draft_tokens


def _resample_from_p(draft_tokens, draft_probs, target_probs, uniform, noise, greedy=None):
    """The right acceptance test, but a rejection redrawn from p: tokens where q > p come out too often."""
    x = draft_tokens[:, None]
    accepted = uniform * draft_probs.gather(1, x).squeeze(1) < target_probs.gather(1, x).squeeze(1)
    return accepted, torch.where(accepted, draft_tokens, (target_probs / noise).argmax(dim=-1))


@pytest.mark.parametrize("broken", [_always_accept, _resample_from_p], ids=["always-accept", "resample-from-p"])
def test_a_wrong_acceptance_rule_fails_the_same_check(model, broken, monkeypatch):
    monkeypatch.setattr(sampling, "speculative_accept", broken)
    counts, _ = sample(model, speculative=True)
    assert not fits(counts, exact_joint(model))
