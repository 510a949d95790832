"""The speedrun (smoke recipe): the whole pipeline, its report, resuming after Ctrl-C or kill -9, and its CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import nanoseek.speedrun.stages as stages
from nanoseek.cli.common import parse_set
from nanoseek.cli.main import main
from nanoseek.speedrun.recipe import Recipe, make_recipe
from nanoseek.speedrun.stages import run_speedrun

ROOT = Path(__file__).resolve().parents[1]


def _results(run: Path) -> dict:
    """What must not depend on interruptions: every number of report.json except timings and the machine."""
    r = json.loads((run / "report.json").read_text())
    per_stage = {}
    for name, s in r["stages"].items():
        per_stage[name] = {k: v for k, v in s.items()}
    train = {
        name: {k: v for k, v in t.items() if k in ("steps", "tokens", "train_loss", "val_loss", "rollout_tokens")}
        for name, t in r["training"].items()
    }
    correct = {name: json.loads((run / "eval" / f"{name}.json").read_text())["correct"] for name in r["stages"]}
    signature = r["reasoning_signature"]
    return {"stages": per_stage, "training": train, "correct": correct, "model": r["model"], "signature": signature}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One uninterrupted smoke speedrun."""
    out = tmp_path_factory.mktemp("speedrun") / "ref"
    report = run_speedrun(out, "smoke")
    assert report == json.loads((out / "report.json").read_text())  # what it returns is what it wrote
    return out


@pytest.mark.slow
def test_speedrun_writes_report_json_md_and_captioned_plots(reference):
    r = json.loads((reference / "report.json").read_text())
    md = (reference / "report.md").read_text()
    assert set(r["stages"]) == {"pretrain", "sft", "grpo"}
    for name in ("sft", "grpo"):  # each stage is compared with the previous one, problem by problem
        v = r["stages"][name]["vs_previous"]
        assert 0 <= v["p_value"] <= 1 and v["wrong_to_right"] >= 0 and v["right_to_wrong"] >= 0
    assert r["model"]["params_total"] > r["model"]["params_activated"] > 0
    assert r["training"]["pretrain"]["steps"] == 12 and r["training"]["grpo"]["steps"] == 3
    assert r["machine"]["torch"] and r["cost_usd"] >= 0
    # report.md holds report.json's numbers and links exactly the chosen figures, each with its caption
    acc = f"**{100 * r['stages']['grpo']['accuracy']:.1f}**"
    assert acc in md and f"{r['eval_n']} distinct" in md
    for png, caption in r["figures"].items():
        assert (reference / "plots" / png).stat().st_size > 1000
        assert f"(plots/{png})" in md and caption in md
    assert md.count("](plots/") == len(r["figures"])
    assert "MTP: off" in md and md.count("<think>") >= 1
    examples = r["stages"]["grpo"]["examples"]
    assert len(examples) == 3 and all(ex["prompt"] in md for ex in examples)


@pytest.mark.slow
def test_speedrun_report_shows_reasoning_and_length_per_level_and_over_grpo_steps(reference):
    r = json.loads((reference / "report.json").read_text())
    md = (reference / "report.md").read_text()
    for name, stage in r["stages"].items():
        kept = json.loads((reference / "eval" / f"{name}.json").read_text())
        for lv, row in stage["levels"].items():
            assert row["think_rate"] == kept["think_levels"][lv] and 0 <= row["think_rate"] <= 1
            assert row["mean_length"] == kept["length_levels"][lv] > 0
            assert row["steps"][0] + row["answer_only"][0] == row["n"]  # every completion reasons or does not
            assert row["steps"][1] + row["answer_only"][1] == round(row["accuracy"] * row["n"])
    sig = r["reasoning_signature"]
    assert set(sig["multi_digit"]["levels"]) == {"2x2", "3x12", "4x12", "4x2"}
    assert set(sig["one_digit"]["levels"]) == {"2x1", "3x1", "4x1"}
    assert "## R1's signature" in md and sig["sentence"] in md and "R1's signature" in sig["sentence"]
    assert "| 4x2 (multi-digit) |" in md and "| 2x1 (one-digit) |" in md
    assert "grpo_reasoning_by_level.png" in r["figures"]
    # GRPO's periodic evals log reasoning and length per level beside accuracy: the figure's data
    evals = [
        x for x in map(json.loads, (reference / "grpo" / "metrics.jsonl").read_text().splitlines()) if "eval_n" in x
    ]
    assert len(evals) >= 2
    for x in evals:
        assert x["eval_think_rate_by_level"].keys() == x["eval_response_len_by_level"].keys()
        assert x["eval_think_rate_by_level"].keys() == x["eval_accuracy_by_level"].keys()


@pytest.mark.slow
def test_ctrl_c_in_grpo_then_rerun_continues_and_reports_the_same(reference, tmp_path, monkeypatch, capsys):
    import nanoseek.train.grpo as grpo

    out = tmp_path / "run"
    real, calls = grpo.sample_groups, []

    def interrupt_second(*args, **kwargs):  # Ctrl-C during GRPO's second rollout (step 1 is checkpointed)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(grpo, "sample_groups", interrupt_second)
    with pytest.raises(KeyboardInterrupt):
        run_speedrun(out, "smoke")
    assert not (out / "report.json").exists()
    done = json.loads((out / "stages.json").read_text())
    assert "sft" in done and "grpo" not in done
    monkeypatch.setattr(grpo, "sample_groups", real)
    capsys.readouterr()
    run_speedrun(out, "smoke")
    log = capsys.readouterr().out
    assert "== pretrain: done already, skipped" in log and "grpo: continuing the interrupted stage" in log
    assert _results(out) == _results(reference)


@pytest.mark.slow
def test_kill_9_then_rerun_continues_and_reports_the_same(reference, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "nanoseek", "speedrun", "--preset", "smoke", "--out", str(out)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    try:  # kill -9 once pretraining is recorded as done (mid-way through the run)
        while time.time() < deadline and proc.poll() is None:
            path = out / "stages.json"
            if path.exists() and "pretrain" in json.loads(path.read_text() or "{}"):
                break
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (out / "report.json").exists(), "the run finished before it could be killed"
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "tokenizer: done already, skipped" in done.stdout
    assert _results(out) == _results(reference)


def test_a_run_folder_refuses_another_recipe(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "recipe.json").write_text(json.dumps({"preset": "smoke", "seed": 0, "grpo_lr": 1.0}))
    with pytest.raises(ValueError, match="holds a speedrun with another recipe"):
        run_speedrun(out, "smoke", seed=0, overrides={})


def test_recipe_overrides_are_checked():
    r = make_recipe("cpu", {"grpo_lr": 1e-5, "worked_fraction": 0.25, "grpo_dynamic_sampling": True})
    assert r.grpo_lr == 1e-5 and r.worked_fraction == 0.25 and r.grpo_dynamic_sampling is True
    with pytest.raises(ValueError, match="unknown recipe field"):
        make_recipe("cpu", {"no_such_field": 1})
    with pytest.raises(ValueError, match="worked_fraction"):
        make_recipe("cpu", {"worked_fraction": 2})
    with pytest.raises(ValueError, match="processes: must be >= 1"):
        make_recipe("cpu", {"processes": 0})
    with pytest.raises(ValueError, match="pretrain_optim: must be one of adamw, muon"):
        make_recipe("cpu", {"pretrain_optim": "sgd"})
    with pytest.raises(ValueError, match="unknown speedrun preset"):
        make_recipe("laptop")
    assert make_recipe("gpu").model_preset == "gpu-small"


def test_set_values_take_the_recipe_fields_types_with_one_boolean_syntax():
    items = ["grpo_lr=1e-5", "grpo_steps=7", "grpo_dynamic_sampling=yes", "compile=off", "grpo_levels=3x12 4x12"]
    assert parse_set(items, Recipe) == {
        "grpo_lr": 1e-5,
        "grpo_steps": 7,
        "grpo_dynamic_sampling": True,
        "compile": False,
        "grpo_levels": "3x12 4x12",
    }
    for word, value in (("true", True), ("No", False), ("1", True), ("0", False), ("ON", True)):
        assert parse_set([f"compile={word}"], Recipe) == {"compile": value}
    with pytest.raises(ValueError, match="compile takes a bool"):
        parse_set(["compile=maybe"], Recipe)


def test_cli_speedrun_parses_set_booleans_and_ctrl_c_prints_how_to_continue(tmp_path, monkeypatch, capsys):
    def interrupted(*args):  # Ctrl-C once recipe.json is written, before any stage
        raise KeyboardInterrupt

    monkeypatch.setattr(stages, "run_stages", interrupted)
    out = tmp_path / "run"
    argv = ["speedrun", "--preset", "smoke", "--out", str(out), "--set", "grpo_dynamic_sampling=yes"]
    assert main([*argv, "--set", "compile=no"]) == 130
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["grpo_dynamic_sampling"] is True and recipe["compile"] is False and recipe["preset"] == "smoke"
    hint = capsys.readouterr().out
    assert "run the same command again to continue" in hint
    assert f"--out {out} --preset smoke --seed 0 --set grpo_dynamic_sampling=yes --set compile=no" in hint
    assert main([*argv, "--set", "compile=maybe"]) == 1  # a user error, no traceback
    assert "compile takes a bool" in capsys.readouterr().err


def test_loss_plot_leaves_out_mtp_when_it_is_off(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    from nanoseek.train.metrics import plot_metrics

    labels: list[str] = []
    real = Axes.plot
    monkeypatch.setattr(Axes, "plot", lambda self, *a, **k: labels.append(k.get("label")) or real(self, *a, **k))
    for mtp, expect in ((0.0, False), (0.7, True)):
        labels.clear()
        metrics = tmp_path / f"m{mtp}.jsonl"
        rows = [{"step": s, "loss": 2.0 / s, "mtp_loss": mtp, "lr": 1e-3, "tokens_per_s": 1.0} for s in (1, 2, 3)]
        metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
        plot_metrics(metrics, tmp_path / f"plots{mtp}")
        assert "train" in labels and ("MTP" in labels) is expect


@pytest.mark.slow
def test_run_folders_work_wherever_a_model_is_expected(reference, tmp_path, capsys):
    # the example: `nanoseek sft --model runs/speedrun/pretrain` failed with "no tokenizer at ..."
    argv = ["sft", "--model", str(reference / "pretrain"), "--data", "builtin:arithmetic", "--n", "40"]
    assert main([*argv, "--out", str(tmp_path / "sft"), "--steps", "1", "--batch-size", "4"]) == 0
    err = capsys.readouterr().err
    assert f"using {reference / 'pretrain' / 'checkpoints' / 'step_12'}, the latest checkpoint" in err
    assert (
        main(["eval", "--model", str(reference / "grpo"), "--task", "arithmetic", "--n", "1", "--max-tokens", "4"]) == 0
    )
    assert "the latest checkpoint of run" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path / "nothing"), "--task", "arithmetic"]) == 1
    assert "does not exist: pass a model directory or a run folder" in capsys.readouterr().err
