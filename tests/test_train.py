import json
import math
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from nanoseek import ModelConfig, Transformer, load_model
from nanoseek.cli import main
from nanoseek.data.shards import TokenLoader, load_manifest, prepare
from nanoseek.data.tasks import builtin_corpus
from nanoseek.report import read_metrics
from nanoseek.tokenizer import train_tokenizer
from nanoseek.train.checkpointing import checkpoint_dirs, latest_checkpoint
from nanoseek.train.optim import build_optimizer, expert_bias_step, max_load_violation
from nanoseek.train.schedule import cosine_decay, lr_at, warmup_factor, wsd_decay

REQUIRED_KEYS = {"step", "loss", "lr", "tokens_per_s", "mtp_loss", "aux_loss", "grad_norm", "mfu"}
REQUIRED_KEYS |= {"max_load_violation", "elapsed_s"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    tok = train_tokenizer(builtin_corpus(200, seed=0), vocab_size=320)
    tok.save(root / "tok")
    prepare(tok, root / "data", builtin=["arithmetic", "countdown"], n=400, seed=0, tokenizer_path=str(root / "tok"))
    return root / "data"


def run_train(data, out, *extra: str) -> int:
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
    assert run_train(data, run, "--steps", "30", "--save-every", "5", "--keep-last", "2", "--eval-every", "10") == 0
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


def test_resume_after_interruption_is_exact(data, tmp_path, monkeypatch):
    args = ("--steps", "40", "--save-every", "20", "--grad-accum", "2")
    assert run_train(data, tmp_path / "full", *args) == 0

    calls = {"n": 0}
    next_batch = TokenLoader.next_batch

    def interrupt_after_step_20(self):
        calls["n"] += 1
        if calls["n"] > 40:  # 20 steps x 2 micro-batches
            raise KeyboardInterrupt
        return next_batch(self)

    monkeypatch.setattr(TokenLoader, "next_batch", interrupt_after_step_20)
    assert run_train(data, tmp_path / "split", *args) == 130  # Ctrl-C
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path / "split").name == "step_20"
    assert main(["train", "--out", str(tmp_path / "split"), "--resume"]) == 0

    full, split = tmp_path / "full" / "checkpoints" / "step_40", tmp_path / "split" / "checkpoints" / "step_40"
    assert loss_at(tmp_path / "split", 40) == loss_at(tmp_path / "full", 40)
    a, b = weights(full), weights(split)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert any(n.endswith("e_score_correction_bias") and a[n].abs().sum() > 0 for n in a)


def test_set_overrides_preset_fields_and_names_bad_ones(data, tmp_path, capsys):
    run = tmp_path / "deeper"
    sets = ["--set", "num_hidden_layers=3", "--set", "q_lora_rank=None", "--set", "norm_topk_prob=false"]
    assert run_train(data, run, "--steps", "2", *sets) == 0
    c = ModelConfig.from_json(run / "checkpoints" / "step_2")
    assert (c.num_hidden_layers, c.q_lora_rank, c.norm_topk_prob) == (3, None, False)
    assert json.loads((run / "args.json").read_text())["set"] == sets[1::2]
    assert ModelConfig.parse_overrides(["routed_scaling_factor=2.5", 'rope_scaling={"type": "yarn", "factor": 4}']) == {
        "routed_scaling_factor": 2.5,
        "rope_scaling": {"type": "yarn", "factor": 4},
    }
    for bad, message in [
        ("num_layers=3", "unknown field 'num_layers'"),
        ("num_hidden_layers=three", "num_hidden_layers takes a value of type int"),
        ("vocab_size=99", "decided by the data's tokenizer"),
        ("hidden_size", "expected KEY=VALUE"),
    ]:
        assert run_train(data, tmp_path / "bad", "--steps", "1", "--set", bad) == 1
        assert message in capsys.readouterr().err


def test_resume_refuses_changed_hyperparameters(data, tmp_path):
    assert run_train(data, tmp_path / "run", "--steps", "2") == 0
    assert main(["train", "--out", str(tmp_path / "run"), "--resume", "--lr", "5e-3"]) == 1
    assert run_train(data, tmp_path / "run", "--steps", "2") == 1  # existing checkpoints need --resume
    assert main(["train", "--out", str(tmp_path / "run"), "--resume", "--steps", "3"]) == 0  # extend the run
    assert latest_checkpoint(tmp_path / "run").name == "step_3"


KILL_DURING_SECOND_SAVE = textwrap.dedent(
    """
    import os, signal, sys
    import nanoseek.train.checkpointing as ck
    from nanoseek.cli import main

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


def test_nonfinite_loss_stops_with_message_and_keeps_last_good_checkpoint(data, tmp_path, monkeypatch, capsys):
    compute_loss, calls = Transformer.compute_loss, {"n": 0}

    def nan_at_step_8(self, inputs, targets, **kwargs):
        calls["n"] += 1
        losses = compute_loss(self, inputs, targets, **kwargs)
        if calls["n"] == 8:
            losses.main = losses.main * math.nan
        return losses

    monkeypatch.setattr(Transformer, "compute_loss", nan_at_step_8)
    run = tmp_path / "run"
    assert run_train(data, run, "--steps", "10", "--save-every", "5") == 1
    err = capsys.readouterr().err
    assert "step 8: non-finite loss" in err and "step_5" in err
    assert [d.name for d in checkpoint_dirs(run)] == ["step_5"]
    assert all(torch.isfinite(t).all() for t in weights(run / "checkpoints" / "step_5").values())
    assert max(r["step"] for r in read_metrics(run / "metrics.jsonl")) == 7


def test_bias_update_balances_expert_loads(data, tmp_path):
    def late_violation(gamma: str) -> float:
        run = tmp_path / f"gamma{gamma}"
        assert run_train(data, run, "--steps", "40", "--bias-gamma", gamma, "--aux-alpha", "0") == 0
        records = read_metrics(run / "metrics.jsonl")[-10:]
        return sum(sum(r["max_load_violation"]) for r in records) / len(records)

    assert late_violation("0.01") < late_violation("0")


def test_time_budget_sizes_the_run_and_the_schedule(data, tmp_path):
    run = tmp_path / "run"
    assert run_train(data, run, "--time-budget", "1.5", "--warmup", "0", "--min-lr-ratio", "0") == 0
    records = read_metrics(run / "metrics.jsonl")
    assert len(records) > 5 and records[-1]["elapsed_s"] >= 1.5
    lrs = [r["lr"] for r in records]
    assert lrs == sorted(lrs, reverse=True) and lrs[0] > 0.9e-2  # cosine over the elapsed time, not the steps
    for r in records:  # a step's lr is set at its start, a bit before the elapsed_s logged at its end
        assert r["lr"] >= 1e-2 * cosine_decay(r["elapsed_s"] / 1.5, min_ratio=0.0) - 1e-12
    state = json.loads((latest_checkpoint(run) / "trainer_state" / "state.json").read_text())
    assert state["elapsed_s"] >= 1.5 and state["step"] == records[-1]["step"]
