"""DeepSeek-V4 decoding: token-by-token and chunked incremental forwards over the V4 cache (window ring,
compressed entries with the open windows carried over, indexer keys) equal the full forward; the cache's size
follows the formula that compares V3's latent cache with V4's."""

from __future__ import annotations

import pytest
import torch
from helpers import make_live

from nanoseek import ModelConfig, Transformer
from nanoseek.config import CSA, HCA, SLIDING
from nanoseek.infer.cache import CompressedKVCache, LatentCache, kv_bytes_per_token, kv_cache_bytes

# window 8, CSA rate 4 (top-3 of up to 12 entries), HCA rate 8: 48 tokens cross every boundary several times
LENGTH = 48


def _model(**overrides) -> Transformer:
    settings = dict(layer_types=[SLIDING, CSA, HCA, CSA], index_n_heads=8, initializer_range=0.1)
    config = ModelConfig.from_preset("tiny-v4", max_position_embeddings=128, **{**settings, **overrides})
    torch.manual_seed(0)
    return make_live(Transformer(config).eval())


def _ids(vocab: int, n: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, n), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("heads", [8, 1])
@pytest.mark.parametrize("schedule", [(13,) + (1,) * 35, (5, 7, 3, 1, 1, 9, 2, 12, 8), (48,)])
def test_incremental_forward_equals_full_forward(schedule, heads):
    """Row 0 runs LAG tokens ahead of row 1 (different lengths, different window offsets in one batch); the
    cache rows start as noise, which must never be read before it is written. One indexer head ties many
    entries at exactly 0: the earliest-entry rule must choose alike at every length."""
    model, lag = _model(index_n_heads=heads), 3
    c = model.config
    ids = _ids(c.vocab_size, lag + sum(schedule))
    cache = CompressedKVCache(c, n_slots=3, max_len=64)
    for layer in cache.layers:
        for t in layer.tensors():
            t.normal_()
    slots = torch.tensor([2, 0])
    with torch.no_grad():
        full = model(ids)
        model.forward_cached(ids[:1, :lag], cache.layers, slots[:1], torch.tensor([0]))  # row 0's head start
        pos, worst = 0, 0.0
        for n in schedule:
            start = torch.tensor([lag + pos, pos])
            chunk = torch.stack([ids[r, int(start[r]) : int(start[r]) + n] for r in range(2)])
            logits, _ = model.forward_cached(chunk, cache.layers, slots, start)
            for r in range(2):
                s = int(start[r])
                worst = max(worst, (logits[r] - full[r, s : s + n]).abs().max().item())
            pos += n
    assert worst < 1e-5, worst


def test_cached_decoding_without_compressed_entries_is_window_attention():
    """Sequences shorter than a window have no entries: decoding reads the ring alone."""
    model = _model(sliding_window=4)
    ids = _ids(model.config.vocab_size, 7)
    cache = CompressedKVCache(model.config, n_slots=2, max_len=7)
    slots, got = torch.tensor([0, 1]), []
    with torch.no_grad():
        for t in range(7):
            got.append(model.forward_cached(ids[:, t : t + 1], cache.layers, slots, torch.tensor([t, t]))[0])
        assert torch.allclose(torch.cat(got, dim=1), model(ids), atol=1e-5)


def test_a_wrong_cache_breaks_decoding():
    """Guard the guard: dropping the carried-over open window (as if the partial block were not kept) must
    change the logits."""
    model = _model()
    ids = _ids(model.config.vocab_size, 16)
    cache = CompressedKVCache(model.config, n_slots=2, max_len=16)
    slots = torch.tensor([0, 1])
    with torch.no_grad():
        full = model(ids)
        model.forward_cached(ids[:, :6], cache.layers, slots, torch.tensor([0, 0]))
        for layer in cache.layers:
            if layer.compressor is not None:
                layer.compressor.kv.zero_()
        logits, _ = model.forward_cached(ids[:, 6:], cache.layers, slots, torch.tensor([6, 6]))
    assert (logits - full[:, 6:]).abs().max() > 1e-3


@pytest.mark.parametrize("preset", ["tiny-v4", "cpu-small-v4"])
@pytest.mark.parametrize("length", [1, 7, 40, 129])
def test_cache_bytes_formula_equals_the_allocated_cache(preset, length):
    config = ModelConfig.from_preset(preset)
    cache = CompressedKVCache(config, n_slots=1, max_len=length, dtype=torch.bfloat16)
    assert cache.nbytes() == kv_cache_bytes(config, length, dtype_bytes=2)
    v3 = ModelConfig.from_preset("tiny")
    assert LatentCache(v3, 1, length).kv.nbytes == kv_cache_bytes(v3, length, dtype_bytes=4)


def test_v4_cache_per_token_falls_with_context_and_beats_v3_at_long_context():
    v3, flash = ModelConfig.from_preset("deepseek-v3"), ModelConfig.from_preset("deepseek-v4-flash")
    assert kv_bytes_per_token(v3, 1024) == kv_bytes_per_token(v3, 2**20) == 576 * 61 * 2
    per_token = [kv_bytes_per_token(flash, n) for n in (1024, 32768, 2**20)]
    assert per_token[0] > per_token[1] > per_token[2]
    assert per_token[2] < 0.1 * kv_bytes_per_token(v3, 2**20)


def test_a_copied_slot_continues_like_its_source():
    """copy_slot shares a prefilled prompt (G samples of one prompt): the copy holds the open windows too."""
    model = _model()
    ids = _ids(model.config.vocab_size, 23)[:1]
    cache = CompressedKVCache(model.config, n_slots=2, max_len=32)
    with torch.no_grad():
        full = model(ids)
        model.forward_cached(ids[:, :13], cache.layers, torch.tensor([0]), torch.tensor([0]))
        cache.copy_slot(0, 1)
        for layer in cache.layers:  # the source moves on: the copy must not depend on it
            for t in layer.tensors():
                t[0].normal_()
        logits, _ = model.forward_cached(ids[:, 13:], cache.layers, torch.tensor([1]), torch.tensor([13]))
    assert torch.allclose(logits, full[:, 13:], atol=1e-5)
