import dataclasses
import json
import math
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from nanoseek import ModelConfig, Transformer, load_model
from nanoseek.checkpoint.run import checkpoint_dirs, latest_checkpoint
from nanoseek.cli.common import parse_set, run_stage
from nanoseek.cli.main import build_parser, main
from nanoseek.data.shards import TokenLoader, load_manifest
from nanoseek.distributed.process_group import DistEnv
from nanoseek.train.distill import DistillJob
from nanoseek.train.grpo import GRPOConfig, GRPOJob
from nanoseek.train.metrics import read_metrics
from nanoseek.train.optim import build_optimizer, expert_bias_step, max_load_violation
from nanoseek.train.pretrain import PretrainJob, TrainConfig, run_pretrain
from nanoseek.train.schedule import cosine_decay, lr_at, warmup_factor, wsd_decay
from nanoseek.train.sft import SFTJob
from nanoseek.train.step import NonFiniteLoss

REQUIRED_KEYS = {"step", "loss", "lr", "tokens_per_s", "mtp_loss", "aux_loss", "grad_norm", "mfu"}
REQUIRED_KEYS |= {"max_load_violation", "elapsed_s"}


@pytest.fixture(scope="module")
def data(builtin_data):
    """Token shards of the built-in tasks (conftest's, read-only)."""
    return builtin_data


def job(data, out, **train) -> PretrainJob:
    """A tiny-preset pretraining job: batch 4 x 32 tokens, lr 1e-2, no val loss unless asked."""
    cfg = TrainConfig(**{"batch_size": 4, "seq_len": 32, "lr": 1e-2, "warmup": 5, "eval_every": 0, **train})
    return PretrainJob(out=str(out), data=str(data), preset="tiny", train=cfg)


def run_train(data, out, *extra: str) -> int:
    """`nanoseek train` with the same settings as `job`, for the tests of the command line itself."""
    argv = ["train", "--preset", "tiny", "--data", str(data), "--out", str(out), "--batch-size", "4"]
    argv += ["--seq-len", "32", "--lr", "1e-2", "--warmup", "5", "--eval-every", "0", *extra]
    return main(argv)


def weights(step_dir) -> dict[str, torch.Tensor]:
    return load_model(step_dir).state_dict()


def loss_at(run_dir, step: int) -> float:
    return next(r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r["step"] == step)


# ------------------------------------------------------------------------------------------- schedules
def test_warmup_is_linear_then_flat():
    assert [warmup_factor(s, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_factor(0, 0) == 1.0


def test_cosine_runs_from_peak_to_min_ratio():
    assert cosine_decay(0.0, 0.1) == 1.0
    assert cosine_decay(0.5, 0.1) == pytest.approx(0.55)
    assert cosine_decay(1.0, 0.1) == pytest.approx(0.1)
    assert cosine_decay(1.7, 0.1) == pytest.approx(0.1)  # a time-budget run may overshoot progress 1
    assert lr_at(99, 1.0, 2e-3, "cosine", warmup=10, min_ratio=0.1) == pytest.approx(2e-4)


def test_wsd_is_flat_then_decays_linearly_to_min():
    f = [wsd_decay(p, min_ratio=0.0, decay_frac=0.2) for p in (0.0, 0.5, 0.8, 0.9, 1.0)]
    assert f == pytest.approx([1.0, 1.0, 1.0, 0.5, 0.0])
    assert lr_at(2, 0.3, 1.0, "wsd", warmup=4) == pytest.approx(0.75)  # still warming up
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_at(0, 0.0, 1.0, "linear")


# ------------------------------------------------------------------------------------------- optimizer
def test_weight_decay_only_on_matrices_and_embeddings():
    model = Transformer(ModelConfig.from_preset("tiny"))
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert any(p is model.embed_tokens.weight for p in decay["params"])
    assert any(p is model.norm.weight for p in no_decay["params"])
    n = sum(1 for p in model.parameters())
    assert len(decay["params"]) + len(no_decay["params"]) == n


def test_bias_update_follows_the_sign_rule():
    model = Transformer(ModelConfig.from_preset("tiny"))
    n_layers, E = len(model.moe_layers()), model.config.n_routed_experts
    loads = torch.arange(n_layers * E).view(n_layers, E) % E  # expert e got e tokens: mean 3.5
    expert_bias_step(model, loads, gamma=0.01)
    expected = 0.01 * torch.sign(3.5 - torch.arange(E).float())
    for m in model.moe_layers():
        assert torch.equal(m.gate.e_score_correction_bias, expected)
    assert max_load_violation(loads) == pytest.approx([7 / 3.5 - 1] * n_layers)


# ----------------------------------------------------------------------------------------- end to end
def test_run_writes_metrics_plots_and_keeps_last_k_while_loss_falls(data, tmp_path):
    run = tmp_path / "run"
    summary = run_pretrain(job(data, run, steps=30, save_every=5, keep_last=2, eval_every=10))
    assert summary["step"] == 30 and summary["checkpoint"] == str(run / "checkpoints" / "step_30")
    assert summary["run_dir"] == str(run) and summary["val_loss"] < summary["first_loss"] - 1.5
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 31))
    assert all(REQUIRED_KEYS <= r.keys() for r in records)
    assert [r["step"] for r in records if "val_loss" in r] == [10, 20, 30]
    assert len(records[0]["max_load_violation"]) == 2  # one MoE layer + the MTP block's
    assert records[-1]["loss"] < records[0]["loss"] - 1.5, "loss did not fall"
    assert records[-1]["val_loss"] < records[0]["loss"] - 1.5
    assert sorted(p.name for p in (run / "plots").iterdir()) == [
        "expert_load.png",
        "loss.png",
        "lr.png",
        "throughput.png",
    ]
    assert [d.name for d in checkpoint_dirs(run)] == ["step_25", "step_30"]
    last = run / "checkpoints" / "step_30"
    assert {"config.json", "model.safetensors", "tokenizer.json", "trainer_state"} <= {p.name for p in last.iterdir()}
    assert not list(last.glob("*.bin")) and not list(last.glob("*.pt"))  # the model is safetensors only
    assert ModelConfig.from_json(last).vocab_size == load_manifest(data)["vocab_size"]
    assert json.loads((run / "args.json").read_text())["steps"] == 30
    biases = torch.stack([m.gate.e_score_correction_bias for m in load_model(last).moe_layers()])
    assert biases.abs().sum() > 0 and torch.allclose(biases / 1e-3, (biases / 1e-3).round(), atol=1e-3)


def test_resume_after_interruption_is_exact(data, tmp_path, monkeypatch, capsys):
    settings = dict(steps=40, save_every=20, grad_accum=2)
    run_pretrain(job(data, tmp_path / "full", **settings))

    calls = {"n": 0}
    next_batch = TokenLoader.next_batch

    def interrupt_after_step_20(self):
        calls["n"] += 1
        if calls["n"] > 40:  # 20 steps x 2 micro-batches
            raise KeyboardInterrupt
        return next_batch(self)

    monkeypatch.setattr(TokenLoader, "next_batch", interrupt_after_step_20)
    assert run_train(data, tmp_path / "split", "--steps", "40", "--save-every", "20", "--grad-accum", "2") == 130
    split = tmp_path / "split"
    assert f"interrupted; continue from step_20 with `nanoseek train --out {split} --resume`" in capsys.readouterr().err
    monkeypatch.undo()
    assert latest_checkpoint(split).name == "step_20"
    assert main(["train", "--out", str(split), "--resume"]) == 0  # the saved settings, filled in by the CLI

    full, split = tmp_path / "full" / "checkpoints" / "step_40", tmp_path / "split" / "checkpoints" / "step_40"
    assert loss_at(tmp_path / "split", 40) == loss_at(tmp_path / "full", 40)
    a, b = weights(full), weights(split)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert any(n.endswith("e_score_correction_bias") and a[n].abs().sum() > 0 for n in a)


def test_set_overrides_preset_fields_and_names_bad_ones(data, tmp_path, capsys):
    run = tmp_path / "deeper"
    sets = ["--set", "num_hidden_layers=3", "--set", "q_lora_rank=None", "--set", "norm_topk_prob=no"]
    assert run_train(data, run, "--steps", "2", *sets) == 0
    c = ModelConfig.from_json(run / "checkpoints" / "step_2")
    assert (c.num_hidden_layers, c.q_lora_rank, c.norm_topk_prob) == (3, None, False)
    overrides = {"num_hidden_layers": 3, "q_lora_rank": None, "norm_topk_prob": False}
    assert json.loads((run / "args.json").read_text())["overrides"] == overrides
    assert parse_set(["routed_scaling_factor=2.5", 'rope_scaling={"type": "yarn", "factor": 4}'], ModelConfig) == {
        "routed_scaling_factor": 2.5,
        "rope_scaling": {"type": "yarn", "factor": 4},
    }
    for bad, message in [
        ("num_layers=3", "unknown field 'num_layers'"),
        ("num_hidden_layers=three", "num_hidden_layers takes a int"),
        ("norm_topk_prob=maybe", "norm_topk_prob takes a bool"),
        ("vocab_size=99", "decided by the data's tokenizer"),
        ("hidden_size", "expected FIELD=VALUE"),
    ]:
        assert run_train(data, tmp_path / "bad", "--steps", "1", "--set", bad) == 1
        assert message in capsys.readouterr().err
    with pytest.raises(ValueError, match="--set changes a new model's config"):  # a resumed run keeps its config
        run_pretrain(dataclasses.replace(job(data, run, steps=3), resume=True, overrides={"num_hidden_layers": 3}))


def test_resume_refuses_changed_hyperparameters(data, tmp_path, capsys):
    run = tmp_path / "run"
    run_pretrain(job(data, run, steps=2))
    with pytest.raises(ValueError, match="--lr 0.005 differs from the run's saved 0.01"):
        run_pretrain(dataclasses.replace(job(data, run, steps=2, lr=5e-3), resume=True))
    assert main(["train", "--out", str(run), "--resume", "--lr", "5e-3"]) == 1
    assert "--lr 0.005 differs from the run's saved 0.01" in capsys.readouterr().err
    with pytest.raises(ValueError, match="pass --resume"):  # existing checkpoints need --resume
        run_pretrain(job(data, run, steps=2))
    assert run_train(data, run, "--steps", "2") == 1
    assert main(["train", "--out", str(run), "--resume", "--steps", "3"]) == 0  # extend the run
    assert latest_checkpoint(run).name == "step_3"
    run_pretrain(dataclasses.replace(job(data, run, steps=4, log_every=2), resume=True))  # overridable settings
    assert latest_checkpoint(run).name == "step_4"
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        run_pretrain(dataclasses.replace(job(data, tmp_path / "none", steps=1), resume=True))


KILL_DURING_SECOND_SAVE = textwrap.dedent(
    """
    import os, signal, sys
    import nanoseek.checkpoint.run as ck
    from nanoseek.cli.main import build_parser, main

    write, saves = ck._write_trainer_state, []

    def write_then_die(out, state):
        saves.append(state["step"])
        if len(saves) == 2:  # model files are already in the temp dir: die before the rename
            os.kill(os.getpid(), signal.SIGKILL)
        write(out, state)

    ck._write_trainer_state = write_then_die
    sys.exit(main(sys.argv[1:]))
    """
)


def test_sigkill_during_save_keeps_previous_checkpoint_and_resume_works(data, tmp_path):
    run = tmp_path / "run"
    argv = ["train", "--preset", "tiny", "--data", str(data), "--out", str(run), "--steps", "20", "--save-every"]
    argv += ["10", "--batch-size", "4", "--seq-len", "32", "--eval-every", "0"]
    proc = subprocess.run(
        [sys.executable, "-c", KILL_DURING_SECOND_SAVE, *argv], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    root = run / "checkpoints"
    assert any(d.name.startswith(".tmp-step_20") for d in root.iterdir())  # the half-written save
    assert not (root / "step_20").exists()
    assert latest_checkpoint(run) == root / "step_10"
    model = load_model(root / "step_10")
    assert all(torch.isfinite(t).all() for t in model.state_dict().values())

    assert main(["train", "--out", str(run), "--resume"]) == 0
    assert not any(d.name.startswith(".tmp-") for d in root.iterdir())  # the stale temp dir is cleaned up
    assert latest_checkpoint(run).name == "step_20"
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == list(range(1, 21))


def test_nonfinite_loss_stops_with_message_and_keeps_last_good_checkpoint(data, tmp_path, monkeypatch):
    compute_loss, calls = Transformer.compute_loss, {"n": 0}

    def nan_at_step_8(self, inputs, targets, **kwargs):
        calls["n"] += 1
        losses = compute_loss(self, inputs, targets, **kwargs)
        if calls["n"] == 8:
            losses.main = losses.main * math.nan
        return losses

    monkeypatch.setattr(Transformer, "compute_loss", nan_at_step_8)
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLoss, match="step 8: non-finite loss") as e:
        run_pretrain(job(data, run, steps=10, save_every=5))
    assert "step_5" in str(e.value)
    assert [d.name for d in checkpoint_dirs(run)] == ["step_5"]
    assert all(torch.isfinite(t).all() for t in weights(run / "checkpoints" / "step_5").values())
    assert max(r["step"] for r in read_metrics(run / "metrics.jsonl")) == 7
    assert (run / "plots" / "loss.png").is_file()  # the plots show what happened


def test_the_cli_turns_a_stopped_stage_into_a_message_and_an_exit_status(tmp_path, capsys):
    def stopped(error: BaseException):
        def stage(job, env):
            raise error

        return stage

    job = PretrainJob(out=str(tmp_path / "run"))
    assert run_stage("train", stopped(NonFiniteLoss("step 3: non-finite loss")), job, DistEnv(), str) == 1
    assert "nanoseek train: error: step 3: non-finite loss" in capsys.readouterr().err
    assert run_stage("sft", stopped(KeyboardInterrupt()), job, DistEnv(), str) == 130
    assert "nanoseek sft: interrupted; no checkpoint was written" in capsys.readouterr().err
    assert run_stage("grpo", lambda job, env: {"step": 3}, job, DistEnv(), lambda s: f"done {s['step']}") == 0
    assert capsys.readouterr().out == "done 3\n"
    assert run_stage("train", lambda job, env: {}, job, DistEnv(rank=1, world_size=2), lambda s: "done") == 0
    assert capsys.readouterr().out == ""  # rank 0 alone speaks


def test_bias_update_balances_expert_loads(data, tmp_path):
    def late_violation(gamma: float) -> float:
        run = tmp_path / f"gamma{gamma}"
        run_pretrain(job(data, run, steps=80, bias_gamma=gamma, aux_alpha=0.0))  # 40 steps: too close to call
        records = read_metrics(run / "metrics.jsonl")[-10:]
        return sum(sum(r["max_load_violation"]) for r in records) / len(records)

    assert late_violation(0.01) < late_violation(0.0) * 0.75  # after 40 steps the two were too close to call


def test_time_budget_sizes_the_run_and_the_schedule(data, tmp_path):
    run = tmp_path / "run"
    run_pretrain(job(data, run, time_budget=1.5, warmup=0, min_lr_ratio=0.0))
    records = read_metrics(run / "metrics.jsonl")
    assert len(records) > 5 and records[-1]["elapsed_s"] >= 1.5
    lrs = [r["lr"] for r in records]
    assert lrs == sorted(lrs, reverse=True) and lrs[0] > 0.9e-2  # cosine over the elapsed time, not the steps
    for r in records:  # a step's lr is set at its start, a bit before the elapsed_s logged at its end
        assert r["lr"] >= 1e-2 * cosine_decay(r["elapsed_s"] / 1.5, min_ratio=0.0) - 1e-12
    state = json.loads((latest_checkpoint(run) / "trainer_state" / "state.json").read_text())
    assert state["elapsed_s"] >= 1.5 and state["step"] == records[-1]["step"]


def test_every_setting_of_a_stage_is_an_option_of_its_command():
    """The commands build their jobs from the options by field name: each config field needs its option."""
    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    options = {name: {a.dest for a in commands[name]._actions} for name in ("train", "sft", "grpo", "distill")}
    for name, config in (("train", TrainConfig), ("sft", TrainConfig), ("grpo", GRPOConfig)):
        assert {f.name for f in dataclasses.fields(config)} <= options[name], name
    assert {"preset", "set", "init_from", "data", "tokenizer", "out", "resume"} <= options["train"]
    assert {f.name for f in dataclasses.fields(SFTJob)} - {"train"} <= options["sft"]
    assert {f.name for f in dataclasses.fields(GRPOJob)} - {"grpo"} <= options["grpo"]
    distill = {f.name for f in dataclasses.fields(DistillJob)} - {"api_key", "sft", "train"}
    assert (
        distill | {"api_key_env", "no_sft", "steps", "time_budget", "lr", "batch_size", "seq_len"} <= options["distill"]
    )
