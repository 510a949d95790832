"""DeepSeek-V4 under torchrun on gloo, with Muon: 2-process DDP and FSDP2 runs equal a 1-process run with the
same global batch (mHC, compressed attention, hash routing and Newton-Schulz on gathered FSDP shards)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanoseek.checkpoint.dcp import model_from_checkpoint
from nanoseek.cli.main import main
from nanoseek.data.shards import prepare
from nanoseek.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
STEPS, LR = 4, 1e-2
COMMON = ["--preset", "tiny-v4", "--seq-len", "32", "--lr", str(LR), "--warmup", "2", "--eval-every", "0"]
COMMON += ["--optim", "muon", "--steps", str(STEPS), "--save-every", str(STEPS)]


@pytest.fixture(scope="module")
def one(tok, tok_dir, tmp_path_factory) -> Path:
    """The 1-process run (global batch 4); its data in ../data."""
    root = tmp_path_factory.mktemp("v4dist")
    prepare(tok, root / "data", builtin=["arithmetic"], n=200, seed=0, tokenizer_path=str(tok_dir))
    assert main(["train", *COMMON, "--data", str(root / "data"), "--batch-size", "4", "--out", str(root / "one")]) == 0
    return root / "one"


@pytest.mark.parametrize("dp", ["ddp", "fsdp"])
def test_v4_with_muon_on_two_processes_matches_one(one, tmp_path, dp):
    common = [*COMMON, "--data", str(one.parent / "data")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    cmd += [str(ROOT / "tests" / "dist_launch.py"), "train", *common, "--batch-size", "2", "--dp", dp]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*cmd, "--out", str(tmp_path / "two")], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [[r["loss"] for r in read_metrics(run / "metrics.jsonl")] for run in (one, tmp_path / "two")]
    assert losses[1] == pytest.approx(losses[0], abs=1e-4)
    a, b = (
        model_from_checkpoint(run / "checkpoints" / f"step_{STEPS}").state_dict() for run in (one, tmp_path / "two")
    )
    for name in a:  # reduction order differs: a hair of rounding, far below one step (lr)
        torch.testing.assert_close(a[name], b[name], atol=1e-2 * LR, rtol=0, msg=name)


@pytest.mark.parametrize("preset", ["tiny-v32", "tiny-v4"])
def test_indexer_warmup_on_two_processes_matches_one(one, tmp_path, preset):
    """--indexer-warmup under DDP: the indexer's KL loss reaches the wrapper's output, so 2 processes fit the
    indexer (dense warm-up, then sparse) exactly as 1 process does; V3.2's indexer over tokens, V4's over CSA
    entries."""
    common = ["--preset", preset, "--seq-len", "32", "--lr", str(LR), "--warmup", "2", "--eval-every", "0"]
    common += ["--steps", str(STEPS), "--save-every", str(STEPS), "--indexer-warmup", "2"]
    common += ["--data", str(one.parent / "data")]
    assert main(["train", *common, "--batch-size", "4", "--out", str(tmp_path / "one")]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    cmd += [str(ROOT / "tests" / "dist_launch.py"), "train", *common, "--batch-size", "2", "--dp", "ddp"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*cmd, "--out", str(tmp_path / "two")], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = (tmp_path / "one", tmp_path / "two")
    for key in ("loss", "indexer_loss"):
        values = [[r[key] for r in read_metrics(run / "metrics.jsonl")] for run in runs]
        assert values[1] == pytest.approx(values[0], abs=1e-4), key
        assert all(v > 0 for v in values[0]) if key == "indexer_loss" else True
    a, b = (model_from_checkpoint(run / "checkpoints" / f"step_{STEPS}").state_dict() for run in runs)
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-2 * LR, rtol=0, msg=name)
