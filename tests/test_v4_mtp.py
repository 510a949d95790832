"""DeepSeek-V4's MTP block (DeepSeek's reference MTPBlock; transformers 5.25 has none): depth 1 at position i
reads the main model's streams and Emb(t_{i+1}) and predicts t_{i+2}; it trains with mtp_weight as V3's does;
its config slot is DeepSeek's compress_ratios tail; on disk it is `mtp.0.*` in the hub layout, which transformers
ignores on load and so never saves."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from helpers import make_live
from helpers.selections import assert_decisive, recorded_selections
from safetensors import safe_open

from nanoseek import ModelConfig, Transformer, load_model, save_model
from nanoseek.config import CSA, HCA, SLIDING
from nanoseek.infer.cache import CompressedKVCache, mtp_decode_cache
from nanoseek.infer.runner import single_thread


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: hundreds of tiny ops per forward, which stall on a pool of threads on a busy machine."""
    with single_thread():
        yield


def _model(**overrides) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_preset("tiny-v4", initializer_range=0.1, **overrides)).eval()


def _ids(seq: int = 20) -> torch.Tensor:
    return torch.randint(0, 256, (2, seq), generator=torch.Generator().manual_seed(1))


def test_mtp_loss_is_the_cross_entropy_of_token_i_plus_2():
    model = _model()
    ids = _ids()
    x, y = ids[:, :-1], ids[:, 1:]
    with torch.no_grad():
        losses = model.compute_loss(x, y)
        logits = model.mtp_logits(x, y)  # position i reads t_{i+1} = y[i]
    expected = F.cross_entropy(logits[:, :-1].flatten(0, 1), y[:, 1:].flatten())
    assert torch.allclose(losses.mtp, expected, atol=1e-6)


def test_mtp_prediction_sees_no_token_after_i_plus_1():
    model = _model()
    ids = _ids()
    changed = ids.clone()
    changed[:, 12:] = (changed[:, 12:] + 7) % 256
    with torch.no_grad():
        a = model.mtp_logits(ids[:, :-1], ids[:, 1:])
        b = model.mtp_logits(changed[:, :-1], changed[:, 1:])
    assert torch.equal(a[:, :11], b[:, :11])  # position 10 reads t_11; t_12 is what it predicts
    assert not torch.allclose(a[:, 11], b[:, 11])


def test_mtp_trains_with_mtp_weight_and_is_skipped_without():
    model = _model().train()
    ids = _ids()
    model.compute_loss(ids[:, :-1], ids[:, 1:]).total(0.3).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if n.startswith("mtp.")}
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "experts" not in n), grads.keys()
    assert model.mtp[0].block.mlp.gate.tid2eid is None  # MTP routes by score and bias, never by hash
    model.zero_grad(set_to_none=True)
    losses = model.compute_loss(ids[:, :-1], ids[:, 1:], mtp=False)
    losses.total().backward()
    assert losses.mtp.item() == 0 and all(p.grad is None for n, p in model.named_parameters() if n.startswith("mtp."))


def test_mtp_attention_type_lives_in_compress_ratios_tail(tmp_path):
    """DeepSeek's config lists one compress ratio per layer, then one per MTP block (0 for V4-Flash's)."""
    c = ModelConfig.from_preset("tiny-v4")
    assert c.mtp_layer_types == [SLIDING] and c.to_dict()["compress_ratios"] == [0, 4, 8, 4, 0]
    csa = c.replace(mtp_layer_types=[CSA])
    d = csa.to_dict()
    assert d["compress_ratios"][-1] == 4 and "mtp_layer_types" not in d
    hub = {k: v for k, v in d.items() if k not in ("layer_types", "mlp_layer_types")}
    assert ModelConfig.from_dict(hub).mtp_layer_types == [CSA] and ModelConfig.from_dict(d).to_dict() == d
    model = Transformer(csa)
    assert model.mtp[0].block.self_attn.indexer is not None and model.mtp[0].block.rope_set == "compress"
    save_model(model, tmp_path)
    assert load_model(tmp_path).config.mtp_layer_types == [CSA]


def test_mtp_block_saves_in_the_hub_layout_and_loads_back(tmp_path):
    model = _model()
    save_model(model, tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
    own = {"e_proj.weight", "h_proj.weight", "enorm.weight", "hnorm.weight", "norm.weight", "hc_head_fn"}
    block = {"attn.wq_a.weight", "attn_norm.weight", "hc_attn_fn", "ffn.gate.bias", "ffn.experts.7.w2.weight"}
    assert {f"mtp.0.{n}" for n in own | block} <= names
    assert not any(n.startswith("mtp.0.") and ("embed" in n or "head.weight" in n) for n in names)  # shared
    loaded = load_model(tmp_path)
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(loaded.mtp_logits(ids, ids), model.mtp_logits(ids, ids))


def test_transformers_ignores_mtp_on_load_and_so_saves_none(tmp_path):
    """transformers 5.25 drops `mtp.*` on load (no warning, logits unchanged): a round trip through it loses the
    MTP block, and nanoseek then builds the model without one (num_nextn_predict_layers 0)."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "DeepseekV4ForCausalLM"):
        pytest.skip("transformers >= 5.25 is needed for DeepseekV4ForCausalLM")
    model = _model(index_n_heads=16)  # a decisive indexer top-k, where transformers' answer is defined (P9)
    save_model(model, tmp_path / "ours")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    ids = _ids()
    with torch.no_grad(), recorded_selections() as selections:
        assert (hf(ids).logits - model(ids)).abs().max() < 1e-4
    assert_decisive(selections)
    hf.save_pretrained(tmp_path / "theirs")
    with safe_open(str(tmp_path / "theirs" / "model.safetensors"), framework="pt") as f:
        assert not any(n.startswith("mtp.") for n in f.keys())
    assert json.loads((tmp_path / "theirs" / "config.json").read_text())["num_nextn_predict_layers"] == 1
    back = load_model(tmp_path / "theirs")
    assert len(back.mtp) == 0 and back.config.num_nextn_predict_layers == 0
    with torch.no_grad():
        assert (back(ids) - model(ids)).abs().max() < 1e-4


# ------------------------------------------------------------------------------------------------- decoding
_live = make_live


def _noise(cache: CompressedKVCache) -> CompressedKVCache:
    """Cache rows start as noise: a state read before it is written breaks the equality."""
    for layer in cache.layers:
        for t in layer.tensors():
            t.normal_()
    return cache


@pytest.mark.parametrize("mtp_type", [SLIDING, CSA, HCA])
def test_cached_mtp_drafts_token_by_token_equal_the_full_forward(mtp_type):
    """The MTP block's incremental step over its own cache (window 8, CSA entries of 4 with top-3, HCA of 8), fed
    the streams of the main model's own cached step: two rows at different lengths, a chunked prompt, then one
    token at a time to position 46; every position's logits equal mtp_logits of the whole sequence."""
    model = _live(_model(mtp_layer_types=[mtp_type], index_n_heads=8, max_position_embeddings=128))
    c = model.config
    ids = torch.randint(0, c.vocab_size, (2, 48), generator=torch.Generator().manual_seed(3))
    x, nxt = ids[:, :-1], ids[:, 1:]  # MTP position i reads t_{i+1} and predicts t_{i+2}
    main, mtp = _noise(CompressedKVCache(c, 3, 64)), _noise(mtp_decode_cache(c, 3, 64))
    assert (mtp.layers[0].compressor is None) == (mtp_type == SLIDING)
    slots, lag, worst = torch.tensor([2, 0]), 5, 0.0
    # {row: its first new position}, new tokens: row 0 runs `lag` tokens ahead of row 1
    plan = [({0: 0}, lag), ({0: lag, 1: 0}, 9)] + [({0: lag + p, 1: p}, 1) for p in range(9, 47 - lag)]
    with torch.no_grad():
        full = model.mtp_logits(x, nxt)
        for starts, T in plan:
            rows, start = list(starts), torch.tensor(list(starts.values()))
            new_x, new_nxt = (torch.stack([t[r, s : s + T] for r, s in starts.items()]) for t in (x, nxt))
            _, streams = model.forward_cached(new_x, main.layers, slots[rows], start)
            before = copy.deepcopy(mtp.layers[0])
            logits = model.mtp_forward_cached(streams, new_nxt, mtp.layers[0], slots[rows], start)
            for j, (r, s) in enumerate(starts.items()):
                worst = max(worst, (logits[j] - full[r, s : s + T]).abs().max().item())
            if T == 9:  # the same step for one position per row (a draft reads only the last kept one)
                pick = torch.tensor([8, 3])
                one = model.mtp_forward_cached(streams, new_nxt, before, slots, start, query_rows=pick)
                assert torch.allclose(one[:, 0], logits[[0, 1], pick], atol=1e-6)
    assert worst < 1e-5, worst


def test_a_rejected_draft_needs_no_cache_undo():
    """Speculative steps on the main and MTP caches as the engine takes them: verify [t_L, draft] at positions
    L, L + 1 and keep both (draft right) or only L (draft wrong: its writes stay in both caches, the length
    advances by one). Drafts are wrong at random, per row of a batch at different lengths, over 45 positions
    (window 8, CSA 4, HCA 8, a CSA MTP block): every kept position's logits, main and MTP, equal the full
    forward's. Guard: cut back by two positions instead, and they do not."""
    model = _live(_model(mtp_layer_types=[CSA], index_n_heads=16, max_position_embeddings=128))
    c = model.config
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, c.vocab_size, (2, 50), generator=g)
    main, mtp = _noise(CompressedKVCache(c, 2, 64)), _noise(mtp_decode_cache(c, 2, 64))
    slots, length, kept = torch.tensor([1, 0]), torch.tensor([7, 2]), {True: 0, False: 0}

    def step(tokens: torch.Tensor, mtp_next: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, streams = model.forward_cached(tokens, main.layers, slots, length)
        return logits, model.mtp_forward_cached(streams, mtp_next, mtp.layers[0], slots, length)

    with torch.no_grad():
        full, full_mtp = model(ids[:, :-1]), model.mtp_logits(ids[:, :-1], ids[:, 1:])
        for r in range(2):  # the prompts
            n = int(length[r])
            _, streams = model.forward_cached(ids[r : r + 1, :n], main.layers, slots[r : r + 1], torch.tensor([0]))
            model.mtp_forward_cached(
                streams, ids[r : r + 1, 1 : n + 1], mtp.layers[0], slots[r : r + 1], torch.tensor([0])
            )
        while int(length.max()) < 45:
            right = torch.rand(2, generator=g) < 0.5
            at = length[:, None] + torch.arange(3)  # positions L, L + 1, L + 2
            truth = ids.gather(1, at)
            draft = torch.where(right, truth[:, 1], (truth[:, 1] + 1) % c.vocab_size)
            # MTP position L + 1 reads the token after the draft: the true one if kept, else whatever (the engine's t_L)
            mtp_next = torch.stack((truth[:, 1], torch.where(right, truth[:, 2], truth[:, 1])), dim=1)
            logits, mtp_logits = step(torch.stack((truth[:, 0], draft), dim=1), mtp_next)
            for r in range(2):
                n, L = 2 if right[r] else 1, int(length[r])
                torch.testing.assert_close(logits[r, :n], full[r, L : L + n], atol=1e-5, rtol=0)
                torch.testing.assert_close(mtp_logits[r, :n], full_mtp[r, L : L + n], atol=1e-5, rtol=0)
                kept[bool(right[r])] += 1
            length = length + 1 + right.long()
        assert min(kept.values()) >= 5  # both kinds of step, many times
        at = length[:, None] + torch.arange(3)
        step(ids.gather(1, at), ids.gather(1, at + 1))  # three positions written, only the first kept
        logits, _ = step(ids.gather(1, at[:, 1:2]), ids.gather(1, at[:, 1:2] + 1))
        assert (logits[:, 0] - full[[0, 1], at[:, 1]]).abs().max() > 1e-3
