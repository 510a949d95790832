"""Everything nanoseek writes gets the modes the umask allows, like a file the user's shell would create: 0644
files and 0755 dirs under umask 022 (another user can read a model we wrote), 0600/0700 under umask 077 (we
honour the umask, we do not force 0644). Temp files and dirs (mkstemp/mkdtemp: 0600/0700) must not leak theirs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers import tiny_model

from nanoseek import save_model
from nanoseek.checkpoint.dcp import save_distributed_checkpoint
from nanoseek.checkpoint.run import save_checkpoint
from nanoseek.cli.main import main
from nanoseek.data.shards import prepare
from nanoseek.distributed.process_group import DistEnv


@pytest.fixture(params=[0o022, 0o077], ids=["umask022", "umask077"])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def wrong_modes(root: Path, umask: int) -> list[str]:
    """`path mode (want mode)` for root and every file and dir below it whose mode the umask does not explain."""
    bad = []
    for p in [root, *sorted(root.rglob("*"))]:
        want = (0o777 if p.is_dir() else 0o666) & ~umask
        mode = p.stat().st_mode & 0o777
        if mode != want:
            bad.append(f"{p.relative_to(root.parent)} {mode:o} (want {want:o})")
    return bad


def test_saved_model_dir_and_data_dir(umask, tok, tmp_path):
    model = tiny_model(tok)
    save_model(model, tmp_path / "m", tokenizer=tok)
    save_model(model, tmp_path / "sharded", max_shard_bytes=50_000)  # + model.safetensors.index.json
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    prepare(tok, tmp_path / "data", builtin=["arithmetic"], n=20)
    for d in ("m", "sharded", "data"):
        assert not wrong_modes(tmp_path / d, umask), wrong_modes(tmp_path / d, umask)


def test_checkpoints_and_hf_export(umask, tok, tmp_path):
    model = tiny_model(tok)
    optimizer = torch.optim.AdamW(model.parameters())
    state = {"step": 1, "args": {"preset": "tiny"}}
    plain = save_checkpoint(tmp_path / "run", model, state, tokenizer=tok)
    with pytest.warns(UserWarning, match="single process"):  # one process: no process group needed
        sharded = save_distributed_checkpoint(tmp_path / "dist", model, optimizer, {**state, "step": 2}, DistEnv(), tok)
    assert (sharded / "dcp").is_dir()
    for ckpt, out in ((plain, "exported"), (sharded, "exported-dcp")):
        assert main(["export", "--format", "hf", "--checkpoint", str(ckpt), "--out", str(tmp_path / out)]) == 0
    for d in ("run", "dist", "exported", "exported-dcp"):
        assert not wrong_modes(tmp_path / d, umask), wrong_modes(tmp_path / d, umask)


def test_gguf_export_and_modelfile(umask, tiny_model_dir, tmp_path):
    pytest.importorskip("gguf")
    out = tmp_path / "out" / "m.gguf"
    assert main(["export", "--format", "gguf", "--model", str(tiny_model_dir), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["Modelfile", "m.gguf"]
    assert not wrong_modes(out.parent, umask), wrong_modes(out.parent, umask)


def test_training_run_folder(umask, builtin_data, tmp_path):
    run = tmp_path / "run"
    argv = ["train", "--preset", "tiny", "--data", str(builtin_data), "--out", str(run), "--batch-size", "2"]
    argv += ["--seq-len", "16", "--steps", "4", "--save-every", "2", "--eval-every", "2", "--warmup", "1"]
    assert main(argv) == 0
    names = {p.relative_to(run).as_posix() for p in run.rglob("*")}
    expected = {"metrics.jsonl", "args.json", "plots/loss.png", "checkpoints/step_4/model.safetensors"}
    expected |= {"checkpoints/step_4/config.json", "checkpoints/step_4/trainer_state/state.pt"}
    assert expected <= names, sorted(names)
    assert not wrong_modes(run, umask), wrong_modes(run, umask)
