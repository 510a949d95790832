"""Scale-out on gloo/CPU: 2-process DDP and FSDP2 runs equal a 1-process run with the same global batch, the MoE
bias stays identical on every rank, distributed checkpoints resume on 1 or 2 processes, a failing rank ends the
job. Each torchrun launch costs a few seconds, so one module-scoped set of runs feeds several tests."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nanoseek import ModelConfig, Transformer, save_model
from nanoseek.checkpoint.dcp import is_distributed_checkpoint, model_from_checkpoint
from nanoseek.checkpoint.run import latest_checkpoint
from nanoseek.cli.main import main
from nanoseek.data.shards import prepare
from nanoseek.distributed.plan import count_parameters, make_plan, state_bytes
from nanoseek.model.flops import flops_per_token
from nanoseek.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = Path(__file__).with_name("dist_launch.py")
LAYOUTS = {"ddp": ["--dp", "ddp"], "fsdp": ["--dp", "fsdp"], "ep": ["--dp", "ddp", "--ep", "2"]}
STEPS = 6
LR = 1e-2
COMMON = ["--preset", "tiny", "--seq-len", "32", "--lr", str(LR), "--warmup", "2", "--eval-every", "0"]
COMMON += ["--grad-accum", "2", "--bias-gamma", "1e-2", "--save-every", "3"]

# Runs on another number of processes sum the same gradients in another order. float32 rounding changes a gradient
# by a hair, and AdamW, which divides by the gradient's own running size, can turn a hair on a near-zero gradient
# into a visible part of a step; but it never moves a weight by more than about lr per step. So weights may differ
# by a small fraction (half a percent) of the most AdamW can move them, lr x steps, and losses by what such weights
# change: 3e-4 and 1e-4 here, while a real bug (a batch read twice, gradients not averaged) moves weights by whole
# steps. Runs on the same processes reduce in the same order and must agree to rounding (1e-6).
REDUCTION_ORDER = 5e-3
CROSS_PROCESS_ATOL = REDUCTION_ORDER * LR * STEPS
LOSS_ATOL = 1e-4


def torchrun(
    *argv: str, script: Path = LAUNCH, nproc: int = 2, timeout: float = 120, **env: str
) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node NPROC SCRIPT ARGV` from the repo root."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", str(script)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([*cmd, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def metric(run: Path, key: str) -> list[float]:
    return [r[key] for r in read_metrics(run / "metrics.jsonl")]


def weights(step_dir: Path) -> dict[str, torch.Tensor]:
    return model_from_checkpoint(step_dir).state_dict()


def assert_same_weights(a: Path, b: Path, atol: float = CROSS_PROCESS_ATOL) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=0, msg=k)


@pytest.fixture(scope="module")
def runs(tok, tok_dir, tmp_path_factory) -> dict[str, Path]:
    """The same 6 steps (global batch 8 = 2 micro-batches x 2 sequences x 2 ranks, or 2 x 4 x 1 rank) three ways."""
    root = tmp_path_factory.mktemp("dist")
    prepare(tok, root / "data", builtin=["arithmetic"], n=300, seed=0, tokenizer_path=str(tok_dir))
    data = ["--data", str(root / "data"), "--steps", str(STEPS)]
    out = {"data": root / "data"}
    out["one"] = root / "one"
    assert main(["train", *COMMON, *data, "--batch-size", "4", "--out", str(out["one"])]) == 0
    for dp, layout in LAYOUTS.items():
        out[dp] = root / dp
        probe = root / f"probe-{dp}"
        probe.mkdir()
        argv = ["train", *COMMON, *data, "--batch-size", "2", *layout, "--out", str(out[dp])]
        proc = torchrun(*argv, NANOSEEK_TEST_PROBE=str(probe))
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[f"probe-{dp}"] = probe
    return out


@pytest.mark.parametrize("dp", list(LAYOUTS))
def test_two_processes_match_one_process_with_the_same_global_batch(runs, dp):
    one, two = runs["one"], runs[dp]
    assert metric(two, "step") == list(range(1, STEPS + 1))  # rank 0 alone writes metrics
    assert metric(two, "loss") == pytest.approx(metric(one, "loss"), abs=LOSS_ATOL)
    # gradients are averaged over ranks, not summed: a sum would double the (pre-clipping) norm
    assert metric(two, "grad_norm") == pytest.approx(metric(one, "grad_norm"), rel=1e-4)
    assert metric(two, "tokens")[-1] == metric(one, "tokens")[-1] == STEPS * 8 * 32
    assert_same_weights(one / "checkpoints" / f"step_{STEPS}", two / "checkpoints" / f"step_{STEPS}")
    assert is_distributed_checkpoint(two / "checkpoints" / f"step_{STEPS}") == (dp != "ddp")  # sharded: DCP


@pytest.mark.parametrize("dp", list(LAYOUTS))
def test_expert_bias_is_identical_on_every_rank_and_equals_one_process(runs, dp):
    r0, r1 = (torch.load(runs[f"probe-{dp}"] / f"rank{r}.pt") for r in (0, 1))
    ref = model_from_checkpoint(runs["one"] / "checkpoints" / f"step_{STEPS}")
    for b0, b1, m in zip(r0["biases"], r1["biases"], ref.moe_layers(), strict=True):
        assert b0.abs().sum() > 0, "the bias never moved"
        assert torch.equal(b0, b1)
        assert torch.equal(b0, m.gate.e_score_correction_bias)


def _resume(src: Path, dst: Path, at: int) -> Path:
    shutil.copytree(src, dst)
    for d in (dst / "checkpoints").iterdir():
        if d.name != f"step_{at}":
            shutil.rmtree(d)
    return dst


def test_fsdp_checkpoint_resumes_exactly_on_one_and_on_two_processes(runs, tmp_path):
    full = runs["fsdp"] / "checkpoints" / f"step_{STEPS}"
    one = _resume(runs["fsdp"], tmp_path / "on1", at=3)
    assert main(["train", "--out", str(one), "--resume"]) == 0  # batch size 2 x 2 ranks -> 4 on one process
    assert not is_distributed_checkpoint(one / "checkpoints" / f"step_{STEPS}")  # one process writes an HF dir
    two = _resume(runs["fsdp"], tmp_path / "on2", at=3)
    proc = torchrun("train", "--out", str(two), "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for run, atol in ((one, CROSS_PROCESS_ATOL), (two, 1e-6)):  # on one process: another reduction order
        assert metric(run, "loss") == pytest.approx(metric(runs["fsdp"], "loss"), abs=min(atol, LOSS_ATOL))
        assert_same_weights(full, run / "checkpoints" / f"step_{STEPS}", atol=atol)


def test_a_rank_killed_during_a_distributed_save_leaves_the_previous_checkpoint(runs, tmp_path):
    run = tmp_path / "run"
    argv = ["train", *COMMON, "--data", str(runs["data"]), "--steps", str(STEPS), "--batch-size", "2", *LAYOUTS["fsdp"]]
    proc = torchrun(*argv, "--out", str(run), NANOSEEK_TEST_KILL_IN_SAVE="1")
    assert proc.returncode != 0
    root = run / "checkpoints"
    assert latest_checkpoint(run) == root / "step_3" and not (root / f"step_{STEPS}").exists()
    assert any(d.name.startswith(".tmp-step_6") for d in root.iterdir())  # the half-written save, never picked
    assert main(["train", "--out", str(run), "--resume"]) == 0  # loadable: continue on one process
    assert not any(d.name.startswith(".tmp-") for d in root.iterdir())
    assert_same_weights(runs["fsdp"] / "checkpoints" / f"step_{STEPS}", root / f"step_{STEPS}")


def test_one_process_checkpoint_resumes_on_two_fsdp_processes(runs, tmp_path):
    run = _resume(runs["one"], tmp_path / "grow", at=3)
    proc = torchrun("train", "--out", str(run), "--resume", "--dp", "fsdp")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert metric(run, "loss") == pytest.approx(metric(runs["one"], "loss"), abs=LOSS_ATOL)
    assert_same_weights(runs["one"] / "checkpoints" / f"step_{STEPS}", run / "checkpoints" / f"step_{STEPS}")


def test_export_writes_an_hf_dir_that_eval_reads(runs, tmp_path, capsys):
    out = tmp_path / "model"
    assert main(["export", "--checkpoint", str(runs["fsdp"] / "checkpoints" / f"step_{STEPS}"), "--out", str(out)]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert_same_weights(runs["fsdp"] / "checkpoints" / f"step_{STEPS}", out, atol=0)
    assert main(["eval", "--model", str(out), "--task", "arithmetic", "--n", "2", "--max-tokens", "4", "--json"]) == 0
    assert '"accuracy"' in capsys.readouterr().out
    sharded = str(runs["fsdp"] / "checkpoints" / f"step_{STEPS}")
    assert main(["eval", "--model", sharded, "--task", "arithmetic", "--n", "2"]) == 1  # not a model dir yet
    assert "distributed training checkpoint: `nanoseek export --checkpoint" in capsys.readouterr().err


def test_a_failing_rank_ends_every_rank_with_the_error_named(runs, tmp_path):
    argv = ["train", *COMMON, "--data", str(runs["data"]), "--steps", "50", "--batch-size", "2"]
    t0 = time.monotonic()
    proc = torchrun(*argv, "--out", str(tmp_path / "run"), NANOSEEK_TEST_FAIL_RANK="1", timeout=90)
    assert proc.returncode != 0
    assert time.monotonic() - t0 < 60, "the surviving rank hung"
    assert "injected failure on rank 1" in proc.stderr


def test_plan_predicts_fsdp2_state_bytes_per_rank_within_10_percent(runs):
    """The planner's weights + gradients + AdamW bytes per rank under FSDP2 on 2 ranks vs what each rank held."""
    config = ModelConfig.from_json(runs["fsdp"] / "checkpoints" / f"step_{STEPS}")
    predicted = state_bytes(count_parameters(config), "fsdp", world=2)
    for rank in (0, 1):
        measured = torch.load(runs["probe-fsdp"] / f"rank{rank}.pt")["bytes"]
        assert measured.keys() == predicted.keys()
        for part in predicted:
            assert measured[part] == pytest.approx(predicted[part], rel=0.10), (rank, part)
    ddp = torch.load(runs["probe-ddp"] / "rank0.pt")["bytes"]  # DDP replicates: the whole model on each rank
    assert sum(ddp.values()) == sum(state_bytes(count_parameters(config), "ddp", world=2).values())


def test_plan_counts_v3_and_picks_a_layout_that_fits(capsys):
    v3 = ModelConfig.from_preset("deepseek-v3")
    p = make_plan(v3, gpus=2048, gpu="h800", tokens=14.8e12, seq_len=1024, gpu_hours=2.664e6, price_per_hour=2.0)
    assert p["params_activated"] / 1e9 == pytest.approx(37.6, abs=0.1)
    assert p["flops_per_token"] == flops_per_token(v3, 1024)
    layouts = {lay["layout"]: lay for lay in p["layouts"]}
    assert not layouts["ddp"]["fits"] and not layouts["fsdp"]["fits"]  # all 256 experts of a layer gathered
    assert p["best"] and p["best"].startswith("fsdp+ep") and layouts[p["best"]]["fits"]
    assert 0.2 < p["implied_mfu"] < 0.6
    assert p["cost"] == pytest.approx(p["gpu_hours"] * 2.0)
    small = make_plan(ModelConfig.from_preset("gpu-small"), gpus=8, gpu="h100", tokens=1e10)
    assert small["best"] == "ddp"  # everything fits; replication moves the fewest bytes
    with pytest.raises(ValueError, match="unknown --gpu"):
        make_plan(v3, gpus=8, gpu="h9000")
    argv = ["plan", "--preset", "gpu-small", "--gpus", "8", "--gpu", "H100", "--gpu-mem", "40GB", "--tokens", "10B"]
    assert main([*argv, "--json"]) == 0
    cli = json.loads(capsys.readouterr().out)
    assert (cli["gpu_mem_gb"], cli["tokens"], cli["best"]) == (40.0, 1e10, "ddp")
    assert main(argv) == 0 and "best layout: ddp" in capsys.readouterr().out


def test_expert_parallel_forward_and_gradients_equal_one_process(tmp_path):
    proc = torchrun(str(tmp_path), script=Path(__file__).with_name("dist_ep_check.py"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        errors = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert errors["local_experts"] == [4, 4]  # 8 experts of the MoE layer and of the MTP block, split in two
        for case in (errors, errors["skewed"]):  # the second: every token routed to rank 0's experts
            for key in ("loss", "logits", "grads", "expert_grads"):
                assert case[key] <= 1e-5, (rank, key, case[key])


def test_expert_parallel_checkpoint_resumes_on_one_process(runs, tmp_path):
    run = _resume(runs["ep"], tmp_path / "on1", at=3)
    assert main(["train", "--out", str(run), "--resume"]) == 0  # saved with --ep 2: one process runs all experts
    assert metric(run, "loss") == pytest.approx(metric(runs["ep"], "loss"), abs=LOSS_ATOL)
    assert_same_weights(runs["ep"] / "checkpoints" / f"step_{STEPS}", run / "checkpoints" / f"step_{STEPS}")


def test_grpo_under_ddp_equals_one_process_update_and_keeps_ranks_in_step(tok_dir, tmp_path):
    proc = torchrun(str(tok_dir), str(tmp_path), script=Path(__file__).with_name("dist_grpo_check.py"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        # each rank's own rollouts, averaged = one process over all of them: the same bound as above, for one update
        # of mu = 2 passes at lr 1e-3 (the loss and gradient norm of the second pass follow the first's weights)
        assert r["update_max_diff"] <= REDUCTION_ORDER * 1e-3 * 2
        assert r["tokens"][0] == r["tokens"][1]  # normalised by every rank's completion tokens
        assert r["loss"][0] == pytest.approx(r["loss"][1], abs=1e-5)
        assert r["grad_norm"][0] == pytest.approx(r["grad_norm"][1], rel=1e-4)
        assert r["ranks_differ_by"] == 0.0  # after a grpo() run both ranks hold the same policy
    assert [m["step"] for m in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3, 4]  # rank 0 logs


@pytest.mark.slow
def test_fsdp2_with_expert_parallel_on_a_2d_mesh_matches_one_process(runs, tmp_path):
    """4 processes, EP 2 x 2 FSDP2 shards of each expert slice: the replicas' reduction and the 2-D sharding."""
    argv = ["train", *COMMON, "--data", str(runs["data"]), "--steps", str(STEPS), "--batch-size", "1"]
    proc = torchrun(*argv, "--dp", "fsdp", "--ep", "2", "--out", str(tmp_path / "run"), nproc=4, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert metric(tmp_path / "run", "loss") == pytest.approx(metric(runs["one"], "loss"), abs=LOSS_ATOL)
    assert metric(tmp_path / "run", "grad_norm") == pytest.approx(metric(runs["one"], "grad_norm"), rel=1e-4)
    assert_same_weights(
        runs["one"] / "checkpoints" / f"step_{STEPS}", tmp_path / "run" / "checkpoints" / f"step_{STEPS}"
    )


def test_sft_under_torchrun_with_a_time_budget_ends_every_rank_together_and_resumes_on_one_process(tok, tmp_path):
    """SFT through the shared loop, FSDP2, a distributed checkpoint; --time-budget: every rank reads the same
    clock, so all stop after the same step (one stopping early would leave the other waiting forever)."""
    torch.manual_seed(0)
    config = ModelConfig.from_preset(
        "tiny", vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id
    )
    save_model(Transformer(config), tmp_path / "base", tokenizer=tok)
    run = tmp_path / "sft"
    argv = ["sft", "--model", str(tmp_path / "base"), "--data", "builtin:arithmetic", "--problems", "200"]
    argv += ["--time-budget", "3", "--warmup", "0", "--min-lr-ratio", "0", "--batch-size", "2", "--eval-every", "0"]
    proc = torchrun(*argv, "--dp", "fsdp", "--out", str(run))
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps, lrs = metric(run, "step"), metric(run, "lr")
    assert len(steps) >= 2 and lrs == sorted(lrs, reverse=True) and metric(run, "elapsed_s")[-1] >= 3
    assert is_distributed_checkpoint(run / "checkpoints" / f"step_{steps[-1]}")
    n = steps[-1] + 1
    assert main(["sft", "--out", str(run), "--resume", "--steps", str(n), "--time-budget", "1000"]) == 0
    assert metric(run, "step") == list(range(1, n + 1)) and all(math.isfinite(x) for x in metric(run, "loss"))
    assert metric(run, "tokens")[0] * n == metric(run, "tokens")[-1]  # batch 2 x 2 ranks, then 4 on one process
