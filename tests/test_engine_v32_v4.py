"""The Engine on DeepSeek-V3.2 and V4 models, each with its own decode cache (V3.2: MLA latents + indexer keys,
top-k attention; V4: window ring + compressed entries with the open windows + CSA indexer keys): batched and
continuous greedy decoding equals the full forward's argmax per sequence and transformers' generate; MTP
self-speculation on V3.2 and V4; the cache a sequence holds, measured, equals the formula and for V4 is the compressed one."""

from __future__ import annotations

import pytest
import torch
from helpers import make_live

from nanoseek import ModelConfig, Transformer, load_model
from nanoseek.config import CSA, HCA
from nanoseek.infer.cache import CompressedKVCache, LatentCache, kv_cache_bytes
from nanoseek.infer.engine import Engine, single_thread
from nanoseek.infer.sampling import SamplingParams

# lengths straddle V3.2's top-k (8) and V4's window (8), CSA rate (4) and HCA rate (8); 6 prompts through 3 slots
# (a duplicate shares its prefill), so sequences of different lengths share a batch and reuse freed slots
PROMPT_LENGTHS = [3, 13, 6, 21, 9, 13]
NEW_TOKENS = 20


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: hundreds of tiny ops per forward, which stall on a pool of threads on a busy machine."""
    with single_thread():
        yield


def _live(model: Transformer) -> Transformer:
    """make_live from seed 0, in eval mode."""
    torch.manual_seed(0)
    return make_live(model).eval()


@pytest.fixture(scope="module")
def v32() -> Transformer:
    torch.manual_seed(0)
    return _live(Transformer(ModelConfig.from_preset("tiny-v32", index_n_heads=16, max_position_embeddings=128)))


@pytest.fixture(scope="module")
def v4() -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig.from_preset("tiny-v4", index_n_heads=8, initializer_range=0.1, max_position_embeddings=128)
    return _live(Transformer(config))


def _prompts(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(2, 256, (n,), generator=g).tolist() for n in lengths]
    prompts[-1] = prompts[1]  # the duplicate
    return prompts


def _reference(model: Transformer, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    """Greedy by full forwards over the whole sequence each step: tokens and their log-probs."""
    ids, lps = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            logp = model(torch.tensor([ids]))[0, -1].log_softmax(-1)
            ids.append(int(logp.argmax()))
            lps.append(float(logp.max()))
    return ids[len(prompt) :], lps


@pytest.mark.parametrize("family", ["v32", "v4"])
def test_batched_continuous_greedy_equals_full_forward_per_sequence(family, request):
    model = request.getfixturevalue(family)
    prompts = _prompts(PROMPT_LENGTHS)
    engine = Engine(model, max_batch_size=3, max_len=64)
    assert isinstance(engine.cache, CompressedKVCache if family == "v4" else LatentCache)
    if family == "v32":  # long prompts prefill in chunks, selecting over the cache + the chunk
        engine.runner.sparse_prefill_chunk = 5
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True, logprobs=True)
    got = engine.generate(prompts, params)
    for g, p in zip(got, prompts):
        tokens, logprobs = _reference(model, p, NEW_TOKENS)
        assert g.token_ids == tokens
        assert max(abs(a - b) for a, b in zip(g.logprobs, logprobs)) < 1e-4  # the logits, not only their argmax


def test_v4_engine_joins_sequences_mid_window_and_reuses_slots(v4):
    """Two slots, prompts arriving while others decode: a freed slot's stale window, entries and open windows
    are never read by the next sequence, rows at different window offsets decode in one step, and a prompt
    prefilled in chunks continues like one prefilled whole."""
    prompts = _prompts([5, 11, 2, 17])
    engine = Engine(v4, max_batch_size=2, max_len=64)
    engine.runner.prefill_chunk = 5  # long prompts prefill chunk by chunk, across window and entry boundaries
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (7, 19, 26, 9)]
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts[:2], params[:2])]
    done, step = {}, 0
    while engine.has_work() or len(ids) < 4:
        if step == 3:  # both slots busy: these wait and take the slots as they free
            ids += [engine.add_request(p, sp) for p, sp in zip(prompts[2:], params[2:])]
        for seq, _ in engine.step():
            if seq.done:
                done[seq.id] = seq.output_ids
        step += 1
    for i, p, sp in zip(ids, prompts, params):
        assert done[i] == _reference(v4, p, sp.max_tokens)[0]


@pytest.mark.parametrize("family", ["v32", "v4"])
def test_greedy_equals_transformers_generate(family, tmp_path):
    """An unseen model made by transformers (the parity tests' re-randomised tiny configs), loaded by nanoseek."""
    transformers = pytest.importorskip("transformers")
    if family == "v4":
        if not hasattr(transformers, "DeepseekV4ForCausalLM"):
            pytest.skip("transformers >= 5.25 is needed for DeepseekV4ForCausalLM")
        from test_v4 import _hf_v4

        hf = _hf_v4()
        hf.save_pretrained(tmp_path)
    else:
        from test_v32 import _hf_v32

        hf = _hf_v32(tmp_path)
    ours = load_model(tmp_path)
    assert ours.config.model_type == f"deepseek_{family}"
    prompts = _prompts([13, 4, 13])[:2]
    got = Engine(ours, max_batch_size=2, max_len=64).generate(prompts, max_tokens=16, temperature=0)
    for g, p in zip(got, prompts):
        out = hf.generate(torch.tensor([p]), max_new_tokens=16, do_sample=False, eos_token_id=1, pad_token_id=1)
        ref = out[0, len(p) :].tolist()
        assert g.token_ids == (ref[: ref.index(1)] if 1 in ref else ref)


def test_v32_speculative_greedy_is_identical_to_plain_greedy_and_accepts_drafts():
    """V3.2 shares V3's MTP module (with its own indexer): drafts verified over the latent + indexer cache."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny-v32", index_n_heads=16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    pattern = torch.tensor([5, 9, 17, 3, 42, 8, 77, 21, 6])
    for _ in range(40):  # sequences of 20 > index_topk: training and decoding both select
        ids = torch.stack([pattern.roll(-int(o)).repeat(3)[:21] for o in torch.randint(0, 9, (4,))])
        loss = model.compute_loss(ids[:, :-1], ids[:, 1:]).total(1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    prompts = [[5, 9, 17, 3], [42, 8, 77], [6, 5, 9, 17, 3, 42, 8, 77, 21, 6, 5], [21, 6, 5]] + _prompts([4, 7])
    plain = Engine(model, max_batch_size=4).generate(prompts, max_tokens=20, temperature=0)
    spec_engine = Engine(model, max_batch_size=4, speculative=True)
    spec = spec_engine.generate(prompts, max_tokens=20, temperature=0)
    assert [s.token_ids for s in spec] == [p.token_ids for p in plain]
    assert spec_engine.acceptance_rate > 0.5
    assert spec_engine.mtp_cache.kv.shape[-1] == model.config.latent_cache_width  # MTP caches indexer keys too


V4_PATTERN = torch.tensor([5, 9, 17, 3, 42, 8, 77, 21, 6, 11, 60])


@pytest.fixture(scope="module")
def v4_mtp() -> Transformer:
    """tiny-v4 (16 indexer heads: exact ReLU ties at the top-k cut, which the cached step and the full forward
    may break differently, stay rare) trained a little on a period-11 pattern and on noise: its MTP block
    drafts the pattern well and noise badly, so both accepted and rejected drafts occur."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny-v4", index_n_heads=16, max_position_embeddings=128))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with single_thread():  # module fixtures set up before the one-thread fixture applies
        for _ in range(30):
            rows = [V4_PATTERN.roll(-int(o)).repeat(5)[:49] for o in torch.randint(0, 11, (2,))]
            ids = torch.cat((torch.stack(rows), torch.randint(2, 256, (2, 49))))
            loss = model.compute_loss(ids[:, :-1], ids[:, 1:]).total(1.0)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def test_v4_speculative_greedy_is_identical_to_plain_greedy_and_reports_acceptance(v4_mtp):
    """MTP drafts verified over V4's window + compressed caches, a rejected draft's writes left in place (they
    are rewritten before being read): 8 prompts of 2 to 23 tokens (one a duplicate, sharing its prefill) through
    3 slots, 30 new tokens each, so every sequence crosses window (8), CSA (4) and HCA (8) boundaries many times,
    rows accepting and rejecting in the same step."""
    p = V4_PATTERN
    prompts = [p[:4], p.roll(-3).repeat(2)[:13], p.roll(-5)[:2], p.roll(-7).repeat(3)[:23]]
    prompts = [t.tolist() for t in prompts] + _prompts([5, 17, 9, 3], seed=2)
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    plain = Engine(v4_mtp, max_batch_size=3, max_len=64).generate(prompts, params)
    engine = Engine(v4_mtp, max_batch_size=3, max_len=64, speculative=True)
    engine.runner.prefill_chunk = 5  # long prompts prefill in chunks, the MTP block's cache too
    spec = engine.generate(prompts, params)
    assert [s.token_ids for s in spec] == [q.token_ids for q in plain]
    stats = engine.stats
    assert 0.5 < engine.acceptance_rate < 1, stats  # the pattern is drafted well, noise is not: both paths run
    assert stats["drafted"] - stats["accepted"] >= 5, stats
    assert stats["steps"] < sum(len(q.token_ids) for q in plain)  # fewer model steps than tokens
    assert engine.mtp_cache.layers[0].window.shape[0] == 3  # the MTP block's own V4 cache, a slot per row


def test_v4_speculative_sampling_is_seeded_and_reproducible(v4_mtp):
    engine = Engine(v4_mtp, max_batch_size=2, max_len=64, speculative=True)
    prompts = [[5, 9, 17], _prompts([6, 4], seed=3)[0]]
    a = engine.generate(prompts, max_tokens=20, temperature=1.0, seed=7, ignore_eos=True)
    b = engine.generate(prompts, max_tokens=20, temperature=1.0, seed=7, ignore_eos=True)
    assert [x.token_ids for x in a] == [x.token_ids for x in b] and all(len(x.token_ids) == 20 for x in a)


def test_v4_refuses_what_it_cannot_do_yet_with_clear_errors(v4, v4_mtp):
    with pytest.raises(ValueError, match="drop --compile"):
        Engine(v4, compile=True)
    with pytest.raises(ValueError, match="prefix caching does not work with --speculative"):
        Engine(v4_mtp, speculative=True, prefix_cache_tokens=64)


# ----------------------------------------------------------------------------------------------- prefix cache
@pytest.mark.parametrize(
    "window, rates, cache_tokens",
    [
        (8, {CSA: 4, HCA: 8}, 512),  # window inside a block (16 tokens): one block restores the ring
        (24, {CSA: 4, HCA: 16}, 512),  # window over two blocks; an HCA window ends at every block boundary
        (8, {CSA: 4, HCA: 8}, 48),  # three blocks: least recently used ones evicted as prompts come
    ],
)
def test_v4_prefix_cache_gives_the_same_greedy_tokens_and_logprobs(window, rates, cache_tokens):
    """Prompts sharing prefixes of 1-3 blocks (a cut inside CSA/HCA windows and mid-ring), served one after another
    from the prefix cache: the same greedy tokens and log-probs as an engine without it, and as full forwards."""
    torch.manual_seed(0)
    config = ModelConfig.from_preset(
        "tiny-v4",
        index_n_heads=16,
        initializer_range=0.1,
        max_position_embeddings=128,
        sliding_window=window,
        compress_rates=rates,
    )
    model = _live(Transformer(config))
    g = torch.Generator().manual_seed(5)
    system = torch.randint(2, 256, (37,), generator=g).tolist()  # 2 whole blocks and 5 tokens
    prompts = [system + torch.randint(2, 256, (n,), generator=g).tolist() for n in (6, 14, 30, 1)]
    prompts += [prompts[2][:49], prompts[2] + [7, 8], system[:20]]  # a longer / shorter prompt of one seen
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=True)
    cached = Engine(model, max_batch_size=2, max_len=96, prefix_cache_tokens=cache_tokens)
    plain = Engine(model, max_batch_size=2, max_len=96)
    assert cached.prefix_cache.block_size == 16
    for p in prompts:
        (a,), (b,) = cached.generate([p], params), plain.generate([p], params)
        assert a.token_ids == b.token_ids == _reference(model, p, 12)[0]
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-5
    hits = cached.prefix_cache.hits
    assert hits >= 5 * 32 if cache_tokens > 48 else hits > 0  # unbounded: prompts 2-6 found two blocks or more


# --------------------------------------------------------------------------------------------------- memory
@pytest.mark.parametrize("preset", ["cpu-small", "tiny-v32", "cpu-small-v4", "tiny-v4"])
def test_measured_cache_bytes_per_sequence_equal_the_formula(preset):
    """The tensors the engine holds for one sequence of max_len tokens, after decoding into them."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset(preset, max_position_embeddings=256)).eval()
    engine = Engine(model, max_batch_size=2, max_len=200)
    before = engine.cache.nbytes()
    engine.generate(_prompts([150, 30]), max_tokens=40, temperature=0, ignore_eos=True)
    assert engine.cache.nbytes() == before  # preallocated: decoding allocates no cache
    assert engine.cache.bytes_per_sequence() == kv_cache_bytes(model.config, 200, dtype_bytes=4)


def test_v4_cache_is_the_compressed_one_and_smaller_than_v3_at_equal_hidden_size():
    v3, v4 = (ModelConfig.from_preset(p, max_position_embeddings=8192) for p in ("cpu-small", "cpu-small-v4"))
    assert v3.hidden_size == v4.hidden_size
    n = 8192
    measured = CompressedKVCache(v4, n_slots=1, max_len=n).bytes_per_sequence()
    assert measured == kv_cache_bytes(v4, n, dtype_bytes=4)
    # keeping every token's key (= value) in every layer would be n x head_dim per layer: V4 holds a window and
    # an entry per `rate` tokens (CSA: + the indexer key), never the expanded keys
    expanded = n * v4.head_dim * v4.num_hidden_layers * 4
    assert measured < expanded / 3
    assert measured < LatentCache(v3, n_slots=1, max_len=n).bytes_per_sequence() / 3


@pytest.mark.slow
def test_v32_compiled_engine_matches_eager_engine(v32):
    """The compiled fixed-shape step (prompts padded to a power of two, rows read in place or gathered) selects
    the same top-k over the padded cache reads: same greedy tokens as eager."""
    prompts = _prompts([3, 13, 6, 21])
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    eager = Engine(v32, max_batch_size=4, max_len=64).generate(prompts, params)
    compiled = Engine(v32, max_batch_size=4, max_len=64, compile=True).generate(prompts, params)
    assert [c.token_ids for c in compiled] == [e.token_ids for e in eager]
