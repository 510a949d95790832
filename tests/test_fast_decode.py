"""The default engine's fast path (nanoseek/infer/fast_decode.py): K greedy steps per call of an AOTInductor graph,
built once per config in a child process and cached; same tokens as the eager engine; eager when it cannot be
built. The conftest turns the path off for every other test (CI caches nothing: a first build takes minutes)."""

from __future__ import annotations

import sys
import time

import pytest
import torch
from helpers import periodic_tiny

from nanoseek import ModelConfig, Transformer
from nanoseek.infer import fast_decode
from nanoseek.infer.engine import Engine
from nanoseek.infer.sampling import SamplingParams


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_preset("tiny")).eval()


@pytest.fixture(scope="module")
def trained() -> Transformer:
    """A tiny model trained for a few seconds on a periodic sequence: confident argmaxes, so a different
    summation order (dense experts) cannot flip a greedy token."""
    return periodic_tiny()


PROMPTS = [[5, 9, 17, 3], [42, 8, 77], [6, 5, 9, 17, 3, 42], [7, 7], [9, 1, 2], [3, 4, 5, 6]]
# lengths that are not multiples of K, and one sequence that outlives the others (batches shrink to one row)
PARAMS = [SamplingParams(max_tokens=n, temperature=0) for n in (5, 3, 9, 4, 6)] + [
    SamplingParams(max_tokens=21, temperature=0)
]


def test_engine_stays_eager_when_the_fast_path_cannot_be_built(model, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NANOSEEK_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(sys, "executable", "/bin/false")  # the build's child process fails at once
    eager = Engine(model, max_batch_size=8, max_len=64, fast=False).generate(PROMPTS, PARAMS)
    engine = Engine(model, max_batch_size=8, max_len=64, fast=True)
    assert engine.fast is not None
    assert not engine.fast.wait(timeout=60)  # both builds failed: nothing loaded
    assert engine.fast.failed == {"b1", "bn"}
    assert [c.token_ids for c in engine.generate(PROMPTS, PARAMS)] == [c.token_ids for c in eager]
    assert "decoding eagerly" in capsys.readouterr().err


def test_fast_path_is_off_where_it_does_not_apply(model, monkeypatch):
    monkeypatch.setenv(fast_decode.ENV_SWITCH, "1")
    assert Engine(model, max_batch_size=2, max_len=64, compile=True).fast is None  # compile=True: its own path
    assert Engine(model, max_batch_size=2, max_len=64, speculative=True).fast is None
    monkeypatch.setenv(fast_decode.ENV_SWITCH, "0")
    assert Engine(model, max_batch_size=2, max_len=64).fast is None
    v32 = Transformer(ModelConfig.from_preset("tiny-v32"))
    assert fast_decode.supported(v32, Engine(v32, max_batch_size=2, max_len=64, fast=False).cache) is not None


def test_artifacts_are_keyed_by_config_cache_shape_and_threads():
    c = ModelConfig.from_preset("tiny")
    key = fast_decode.artifact_path
    base = key(c, "bn", 8, (2, 4, 64, 40), 2)
    assert base == key(c, "bn", 8, (2, 4, 64, 40), 2)
    assert base.parent == fast_decode.cache_dir()
    others = [
        key(c.replace(hidden_size=c.hidden_size * 2), "bn", 8, (2, 4, 64, 40), 2),
        key(c, "b1", 8, (2, 4, 64, 40), 2),
        key(c, "bn", 4, (2, 4, 64, 40), 2),
        key(c, "bn", 8, (2, 8, 64, 40), 2),
        key(c, "bn", 8, (2, 4, 64, 40), 1),
        key(c, "bn", 8, (2, 4, 64, 40), 2, out_in=True),
    ]
    assert len({base, *others}) == 7


@pytest.mark.slow
def test_fast_path_matches_eager_and_loads_from_its_cache(trained, tmp_path, monkeypatch):
    """Built once (two AOTInductor artifacts, K = 4), the fast path gives the eager engine's greedy tokens at
    batch 1 and batched, with sequences finishing inside a K-step block and others joining; a second engine
    (as a later process would) loads the artifacts from the cache at once."""
    monkeypatch.setenv("NANOSEEK_CACHE_DIR", str(tmp_path))
    eager_engine = Engine(trained, max_batch_size=8, max_len=64, fast=False)
    moes = trained.moe_layers()
    eager = eager_engine.generate(PROMPTS, PARAMS)
    [eager_one] = eager_engine.generate(PROMPTS[0], PARAMS[-1])
    monkeypatch.setattr(fast_decode.FastDecoder, "steps", 4)
    engine = Engine(trained, max_batch_size=8, max_len=64, fast=True)
    assert engine.fast.wait(timeout=1800), engine.fast.failed
    calls = []
    decode = engine.fast.decode
    engine.fast.decode = lambda slots, *a: calls.append(len(slots)) or decode(slots, *a)
    fast = engine.generate(PROMPTS, PARAMS)
    [fast_one] = engine.generate(PROMPTS[0], PARAMS[-1])
    assert 1 in calls and max(calls) > 1  # both artifacts ran
    assert [c.token_ids for c in fast] == [c.token_ids for c in eager]
    assert fast_one.token_ids == eager_one.token_ids
    assert all(m.gather_max_tokens > 0 for m in moes)  # the build changed a copy, not this model
    t = time.perf_counter()
    again = Engine(trained, max_batch_size=8, max_len=64, fast=True)
    assert set(again.fast.runners) == {"b1", "bn"} and time.perf_counter() - t < 30
    assert [c.token_ids for c in again.generate(PROMPTS, PARAMS)] == [c.token_ids for c in eager]
    # both graphs read the routed experts from [out, in] copies: an in-place change of the weights (GRPO's
    # optimizer step) reaches them at the next call. Scale the experts' down projections by 64 (a power of two: undone
    # exactly), decode, then scale them back.
    assert again.fast.out_in and len(again.fast.out_in_copies()) == 2 * len(fast_decode.routed_experts(trained))

    def scale(by: float) -> None:
        with torch.no_grad():
            for m in moes:
                m.experts.w2.mul_(by)

    scale(64.0)
    try:
        assert not all(torch.equal(copy, w.transpose(1, 2)) for w, copy, _ in again.fast._out_in)  # w2: stale
        [changed] = eager_engine.generate(PROMPTS[0], PARAMS[-1])
        assert again.generate(PROMPTS[0], PARAMS[-1])[0].token_ids == changed.token_ids
        assert all(torch.equal(copy, w.transpose(1, 2)) for w, copy, _ in again.fast._out_in)  # refreshed
        changed_all = eager_engine.generate(PROMPTS, PARAMS)  # batched ("bn") too
        assert [c.token_ids for c in again.generate(PROMPTS, PARAMS)] == [c.token_ids for c in changed_all]
    finally:
        scale(1 / 64)
    assert again.generate(PROMPTS[0], PARAMS[-1])[0].token_ids == eager_one.token_ids


def test_background_builds_run_at_the_lowest_priority(model, tmp_path, monkeypatch):
    """A first build is minutes of CPU: it must not slow what the user runs meanwhile (training, serving)."""
    monkeypatch.setenv("NANOSEEK_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv(fast_decode.ENV_SWITCH, "1")
    seen = {}

    class FakePopen:
        def __init__(self, cmd, **kwargs):
            seen.update(kwargs)

        def poll(self):
            return None

        def kill(self):
            pass

    monkeypatch.setattr(fast_decode.subprocess, "Popen", FakePopen)
    engine = Engine(model, max_batch_size=2, max_len=64)
    assert not engine.fast.ready(1)  # starts the "b1" build
    engine.fast.close()
    assert seen["preexec_fn"] is fast_decode._lowest_priority
    monkeypatch.setattr(fast_decode.os, "nice", lambda inc: seen.setdefault("nice", inc))
    fast_decode._lowest_priority()
    assert seen["nice"] == 19


@pytest.mark.skipif(fast_decode.fcntl is None, reason="lock files need POSIX fcntl")
def test_concurrent_builds_of_one_artifact_build_it_once(tmp_path, monkeypatch):
    """Two engines asking for the same artifact at once (a server and a chat, two ranks): the second build process
    waits on the artifact's lock, then finds it built by the first and exits without building."""
    import json
    import threading

    out = tmp_path / "b1-k8-key.pt2"
    built = []
    monkeypatch.setattr(fast_decode, "build", lambda *a: built.append(a) or a[5].write_bytes(b"artifact"))
    spec = {"config": ModelConfig.from_preset("tiny").to_dict(), "kind": "b1", "steps": 8, "kv_shape": [2, 2, 8, 4]}
    spec |= {"threads": 1, "out": str(out)}

    def build_process(name: str) -> threading.Thread:
        (tmp_path / name).write_text(json.dumps(spec))
        return threading.Thread(target=fast_decode._main, args=(str(tmp_path / name),))

    with open(out.with_suffix(".lock"), "a") as lock:
        fast_decode.fcntl.flock(lock, fast_decode.fcntl.LOCK_EX)  # the first build, still running
        waiting = build_process("second.json")
        waiting.start()
        time.sleep(0.5)
        assert waiting.is_alive() and not built  # queued on the lock, building nothing
        out.write_bytes(b"artifact")  # the first build lands, then lets go of its lock
    waiting.join(timeout=10)
    assert not waiting.is_alive() and not built
    out.unlink()
    first = build_process("third.json")  # no artifact and no one building it: this one builds
    first.start()
    first.join(timeout=10)
    assert len(built) == 1 and out.read_bytes() == b"artifact"


def test_batched_graph_reads_weights_per_row_only_for_few_rows_of_small_matrices():
    """The batched graph's multiply-and-sum (and the MoE's per-pair products) re-read each weight matrix per row: faster than
    BLAS while a matrix stays in L2 between rows, so larger matrices or more rows keep BLAS and the padded MoE."""
    with torch.device("meta"):
        small = Transformer(ModelConfig.from_preset("cpu-medium"))
        wide = Transformer(ModelConfig.from_preset("cpu-medium", hidden_size=1024, moe_intermediate_size=1024))
    assert fast_decode.small_rows_fit(small, 32)
    assert not fast_decode.small_rows_fit(small, 64)
    assert not fast_decode.small_rows_fit(wide, 16)
