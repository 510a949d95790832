"""Inference engine: cached decoding equals a full forward; greedy matches transformers; speculative greedy
equals plain greedy; batching, seeds, stops and errors."""

from __future__ import annotations

import pytest
import torch
from helpers import MIXED, periodic_tiny

from nanoseek import ModelConfig, Transformer, save_model
from nanoseek.infer.cache import LatentCache
from nanoseek.infer.engine import Engine, single_thread
from nanoseek.infer.sampling import SamplingParams
from nanoseek.infer.sequence import Sequence


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_preset("tiny")).eval()


@pytest.fixture(scope="module")
def trained() -> Transformer:
    """A tiny model trained for a few seconds on a periodic sequence, so that its MTP head drafts well."""
    return periodic_tiny()


def _prompts(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 256, (n,), generator=g).tolist() for n in lengths]


def _naive_greedy(model, prompt, n):
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            t = int(model(torch.tensor([ids]))[0, -1].argmax())
            if t == model.config.eos_token_id:
                break
            out.append(t)
            ids.append(t)
    return out


def test_cached_decoding_matches_full_forward_for_ragged_batches(model):
    c = model.config
    ids = torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(0))
    full = model(ids)
    cache = LatentCache(c, n_slots=5, max_len=64)
    slots, lens = torch.tensor([4, 0, 2]), [7, 12, 3]
    outs = [[] for _ in range(3)]
    with torch.no_grad():
        for n, length in enumerate(lens):  # prefill each prompt alone
            logits, _ = model.forward_cached(ids[n : n + 1, :length], cache.kv, slots[n : n + 1], torch.tensor([0]))
            outs[n].append(logits[0])
        pos = torch.tensor(lens)
        for _ in range(6):  # then decode all three together, each at its own position
            tok = ids[torch.arange(3), pos].view(3, 1)
            logits, _ = model.forward_cached(tok, cache.kv, slots, pos)
            for n in range(3):
                outs[n].append(logits[n])
            pos = pos + 1
        for n in range(3):
            got = torch.cat(outs[n])
            assert (got - full[n, : got.shape[0]]).abs().max() < 1e-4
        # several new tokens per row at different offsets (speculative verification) and a long chunk
        cache.kv.zero_()
        model.forward_cached(ids[:, :5], cache.kv, slots, torch.zeros(3, dtype=torch.long))
        logits, _ = model.forward_cached(ids[:, 5:7], cache.kv, slots, torch.full((3,), 5))
        assert (logits - full[:, 5:7]).abs().max() < 1e-4
        logits, _ = model.forward_cached(ids[:, 7:20], cache.kv, slots, torch.full((3,), 7))
        assert (logits - full[:, 7:20]).abs().max() < 1e-4


def test_cached_step_only_reads_the_cache_and_pads_safely(model):
    """cached_step is pure (the engine compiles it); a longer cache read (masked) changes nothing."""
    cache = LatentCache(model.config, n_slots=3, max_len=64)
    ids = torch.randint(2, 256, (2, 9), generator=torch.Generator().manual_seed(3))
    slots, zero = torch.tensor([2, 0]), torch.zeros(2, dtype=torch.long)
    with torch.no_grad():
        model.forward_cached(ids[:, :8], cache.kv, slots, zero)
        before = cache.kv.clone()
        exact = model.cached_step(ids[:, 8:], cache.kv, slots, torch.full((2,), 8), cache_len=8)
        padded = model.cached_step(ids[:, 8:], cache.kv, slots, torch.full((2,), 8), cache_len=32)
    assert torch.equal(cache.kv, before)
    for a, b in zip(exact, padded):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(exact[0][:, -1], model(ids)[:, -1], atol=1e-4, rtol=1e-4)


def test_cached_step_reads_rows_in_place_as_if_gathered(model):
    """slots=None (rows are cache rows 0..N-1, read without a gather) equals passing those rows' slots."""
    cache = LatentCache(model.config, n_slots=3, max_len=32)
    ids = torch.randint(2, 256, (3, 8), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        model.forward_cached(ids[:, :6], cache.kv, torch.arange(3), torch.tensor([0, 0, 0]))
        start = torch.tensor([6, 3, 0])  # row 2 is idle: it sees only its own token
        for T in (1, 2):
            gathered = model.cached_step(ids[:, 6 : 6 + T], cache.kv, torch.arange(3), start, cache_len=16)
            in_place = model.cached_step(ids[:, 6 : 6 + T], cache.kv, None, start, cache_len=16)
            for a, b in zip(gathered, in_place):
                torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.slow
def test_compiled_engine_matches_eager_engine(trained):
    """Engine(compile=True): rows read in place or gathered and padded, rounded cache reads, dense experts, prompts
    padded to a power of two; same greedy tokens (and the speculative path too)."""
    prompts = [[5, 9, 17, 3], [42, 8, 77], [6, 5, 9, 17, 3, 42], [7, 7], [9, 1, 2], [3, 4, 5, 6]]
    # the last sequence outlives the others in slot 5: its late steps gather it (1 row), not 8 cache rows
    params = [SamplingParams(max_tokens=4, temperature=0)] * 5 + [SamplingParams(max_tokens=12, temperature=0)]
    eager = Engine(trained, max_batch_size=8).generate(prompts, params)
    moes = trained.moe_layers()
    limits = [m.gather_max_tokens for m in moes]
    try:
        for m in moes:  # no gathered-expert path: eager sorts tokens (grouped GEMM), compiled runs dense experts
            m.gather_max_tokens = 0
        engine, modes = Engine(trained, max_batch_size=8, compile=True), []
        step_fn = engine.runner.step_fn
        engine.runner.step_fn = lambda ids, kv, slots, *a: (
            modes.append((ids.shape[1], slots is None)) or step_fn(ids, kv, slots, *a)
        )
        compiled = engine.generate(prompts, params)
        assert (1, True) in modes and (1, False) in modes  # decoding: both the in-place and the gathered rows ran
        assert (16, False) in modes  # prefill: prompts padded to 16
        with torch.inference_mode():  # compiled prefill = eager prefill: logits, hidden states, cache entries
            got = engine.runner.prefill([5, 9, 17, 3, 42], torch.tensor([2])), engine.cache.kv[:, 2, :5].clone()
            engine.runner.compiled = False
            want = engine.runner.prefill([5, 9, 17, 3, 42], torch.tensor([2])), engine.cache.kv[:, 2, :5].clone()
            engine.runner.compiled = True
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        spec = Engine(trained, max_batch_size=8, speculative=True, compile=True)
        speculative = spec.generate(prompts, params)
        # logits too, not only argmaxes: a decode step over a random cache, at a shape the engine compiled
        kv = torch.randn_like(engine.cache.kv)
        with torch.inference_mode(), single_thread():
            ids, start = (
                torch.tensor([[5], [9], [17], [3], [42], [8], [77], [21]]),
                torch.tensor([3, 7, 0, 12, 1, 5, 9, 15]),
            )
            got, want = step_fn(ids, kv, None, start, 16)[0], trained.cached_step(ids, kv, None, start, 16)[0]
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    finally:
        for m, limit in zip(moes, limits):
            m.gather_max_tokens = limit
    assert [c.token_ids for c in compiled] == [e.token_ids for e in eager]
    assert [c.token_ids for c in speculative] == [e.token_ids for e in eager]


def test_cache_stores_only_the_latent():
    c = ModelConfig.from_preset("cpu-small")
    cache = LatentCache(c, n_slots=2, max_len=8)
    assert cache.bytes_per_token() == (c.kv_lora_rank + c.qk_rope_head_dim) * c.num_hidden_layers * 4


def test_greedy_matches_naive_recompute_and_transformers_generate(model, tmp_path):
    transformers = pytest.importorskip("transformers")
    prompts = _prompts([5, 11, 3, 8])
    got = Engine(model, max_batch_size=3).generate(prompts, max_tokens=12, temperature=0)
    for g, p in zip(got, prompts):
        assert g.token_ids == _naive_greedy(model, p, 12)
    save_model(model, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    for g, p in zip(got, prompts):
        out = hf.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=1, pad_token_id=1)
        ref = out[0, len(p) :].tolist()
        ref = ref[: ref.index(1)] if 1 in ref else ref
        assert g.token_ids == ref


def test_speculative_greedy_is_identical_to_plain_greedy_and_accepts_drafts(trained):
    prompts = [[5, 9, 17, 3], [42, 8, 77], [6, 5, 9, 17, 3, 42], [21, 6, 5]] + _prompts([4, 7])
    plain = Engine(trained, max_batch_size=4).generate(prompts, max_tokens=20, temperature=0)
    spec_engine = Engine(trained, max_batch_size=4, speculative=True)
    spec = spec_engine.generate(prompts, max_tokens=20, temperature=0)
    assert [s.token_ids for s in spec] == [p.token_ids for p in plain]
    stats = spec_engine.stats
    assert stats["accepted"] / stats["drafted"] > 0.5  # the MTP head learned the pattern
    assert stats["steps"] < sum(len(p.token_ids) for p in plain)  # fewer model steps than tokens


@pytest.mark.parametrize("T, start, cache_len", [(2, [4, 0, 9], 16), (6, [0, 0, 0], 0)])
def test_mtp_step_for_one_position_matches_every_position(trained, T, start, cache_len):
    """query_rows: attention, MoE and head of the MTP block for one position per row (a redraft needs only the last
    kept position, a prompt's first draft only its last) = that position of the full computation; every
    position's cache entry is still made."""
    torch.manual_seed(0)
    kv = LatentCache(trained.config, n_slots=3, max_len=32, n_layers=1).kv[0].normal_()
    h, nxt = torch.randn(3, T, trained.config.hidden_size), torch.randint(2, 100, (3, T))
    slots, start, rows = torch.arange(3), torch.tensor(start), torch.tensor([T - 1, 0, T // 2])
    with torch.inference_mode():
        full, new_full = trained.mtp_cached_step(h, nxt, kv, slots, start, cache_len)
        one, new_one = trained.mtp_cached_step(h, nxt, kv, slots, start, cache_len, query_rows=rows)
    assert one.shape == (3, 1, trained.config.vocab_size)
    torch.testing.assert_close(one[:, 0], full[slots, rows], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(new_one, new_full)


def test_speculative_sampling_is_seeded_and_reproducible(trained):
    prompts = [[5, 9, 17], [42, 8, 77]]
    e = Engine(trained, max_batch_size=2, speculative=True)
    a = e.generate(prompts, max_tokens=15, temperature=1.0, seed=7)
    b = e.generate(prompts, max_tokens=15, temperature=1.0, seed=7)
    assert [x.token_ids for x in a] == [x.token_ids for x in b]


def test_seeds_reproduce_regardless_of_batch(model):
    p = _prompts([6])[0]
    e = Engine(model, max_batch_size=4)
    alone = e.generate([p], max_tokens=10, temperature=1.0, seed=3)[0].token_ids
    crowd = e.generate(
        [_prompts([4], seed=9)[0], p, _prompts([9], seed=5)[0]],
        [SamplingParams(max_tokens=10, temperature=1.0), SamplingParams(max_tokens=10, temperature=1.0, seed=3)]
        + [SamplingParams(max_tokens=10, temperature=0.7)],
    )[1].token_ids
    assert alone == crowd
    other = e.generate([p], max_tokens=10, temperature=1.0, seed=4)[0].token_ids
    assert other != alone


def test_continuous_batching_serves_more_prompts_than_slots(model):
    prompts = _prompts([3, 9, 4, 12, 5, 7, 2])
    batched = Engine(model, max_batch_size=2).generate(prompts, max_tokens=8, temperature=0)
    single = [Engine(model, max_batch_size=1).generate([p], max_tokens=8, temperature=0)[0] for p in prompts]
    assert [b.token_ids for b in batched] == [s.token_ids for s in single]
    assert all(b.finish_reason in ("length", "stop") for b in batched)


def test_max_tokens_and_logprobs(model):
    out = Engine(model).generate(_prompts([5]), max_tokens=4, temperature=0, logprobs=True, top_logprobs=3)[0]
    assert len(out.token_ids) <= 4 and (out.finish_reason == "length") == (len(out.token_ids) == 4)
    assert len(out.logprobs) == len(out.token_ids) and all(lp <= 0 for lp in out.logprobs)
    assert all(len(t) == 3 for t in out.top_logprobs)


def test_prompt_longer_than_context_is_a_clear_error(model):
    e = Engine(model, max_len=16)
    with pytest.raises(ValueError, match="context holds 16"):
        e.generate([list(range(2, 30))], max_tokens=2)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        e.generate([[1, 2, 9999]], max_tokens=2)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        e.generate("hello", max_tokens=2)


def test_context_full_stops_with_length(model):
    e = Engine(model, max_len=12)
    out = e.generate([list(range(2, 10))], max_tokens=50, temperature=1.0, seed=0)[0]
    assert out.finish_reason in ("length", "stop") and 8 + len(out.token_ids) <= 12


def test_stop_strings_and_streaming_with_a_tokenizer():
    from nanoseek.tokenizer import train_tokenizer

    tok = train_tokenizer(["abc def ghi " * 20, "12+34=46"] * 5, vocab_size=300)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size)).eval()
    e = Engine(model, tokenizer=tok)
    free = e.generate("abc", max_tokens=12, temperature=0, ignore_eos=True)[0]  # 12 tokens, whatever they are
    assert free.text == tok.decode(free.token_ids) and len(free.text) >= 4
    stop = free.text[1:3]
    cut = e.generate("abc", max_tokens=12, temperature=0, ignore_eos=True, stop=[stop])[0]
    assert cut.finish_reason == "stop" and stop not in cut.text and free.text.startswith(cut.text)
    streamed = "".join(e.stream("abc", max_tokens=12, temperature=0, ignore_eos=True))
    assert streamed == free.text


def test_text_grows_token_by_token_and_equals_a_whole_decode(wide_tok):
    """Each token's bytes are decoded alone (the first bytes of a character wait for the rest): at every step the
    text is the complete characters of tokenizer.decode(output so far), and at the end all of it."""
    g = torch.Generator().manual_seed(0)
    cases = [wide_tok.encode(MIXED), torch.randint(0, wide_tok.vocab_size, (400,), generator=g).tolist()]
    cases.append([t for c in "你好½ok" for t in wide_tok.encode(c)])  # multi-byte characters, maybe split
    for ids in cases:
        seq = Sequence(0, [1], SamplingParams())
        for n in range(1, len(ids) + 1):
            assert not seq.add_text(wide_tok.token_bytes(ids[n - 1]), [])
            whole = wide_tok.decode(ids[:n])
            assert whole.startswith(seq.text) and set(whole[len(seq.text) :]) <= {"\ufffd"}
        seq.finish_text()
        assert seq.text == wide_tok.decode(ids)


def test_a_stop_string_split_over_tokens_cuts_the_text_before_it():
    seq = Sequence(0, [1], SamplingParams())
    assert not seq.add_text(b"12+3", ["+34=", "zz"]) and not seq.add_text(b"4", ["+34=", "zz"])
    assert seq.add_text(b"=46", ["+34=", "zz"]) and seq.text == "12"
    seq = Sequence(0, [1], SamplingParams())
    assert not seq.add_text("你".encode()[:2], ["好"]) and seq.text == ""  # half a character waits
    assert seq.add_text("你".encode()[2:] + "好".encode(), ["好"]) and seq.text == "你"
