"""benchmarks/arch_race.py: the V3 / V4 / V3-Muon race runs end to end in smoke mode, and its V4 greedy decoder is the
model's own greedy continuation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from benchmarks.arch_race import CachedGreedy, main, min_budget, set_budget, stable
from nanoseek import ModelConfig, Transformer

ROOT = Path(__file__).resolve().parents[1]
FIELDS = {
    "arm",
    "params",
    "probe_budget",
    "params_activated",
    "steps",
    "step_budget",
    "tokens",
    "tokens_per_s",
    "ms_per_token",
}
FIELDS |= {"train_s", "target_s", "val_loss", "accuracy", "decoder", "first_loss", "final_loss", "curve"}


def test_cached_greedy_continues_as_the_full_forward_does(tok):
    """Rows of different lengths, decoded together through forward_cached past several compression blocks, get
    the tokens a full forward picks one at a time."""
    torch.manual_seed(0)
    config = ModelConfig.from_preset("tiny-v4", vocab_size=tok.vocab_size, eos_token_id=tok.eos_id)
    model = Transformer(config).eval()
    prompts = [tok.encode(p, bos=True) for p in ("12 + 7 =", "3 * 45 + 6 - 2 =", "9 =")]
    got = CachedGreedy(model, tok, batch_size=2).generate(prompts, max_tokens=20)
    for prompt, completion in zip(prompts, got):
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(20):
                ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
                if ids[-1] == tok.eos_id:
                    break
        assert completion.token_ids == ids[len(prompt) :]


@pytest.mark.slow
def test_smoke_race_trains_every_arm_to_its_probed_budget(builtin_data, tok_dir, tmp_path):
    out = tmp_path / "race"
    cmd = [sys.executable, "-m", "benchmarks.arch_race", "--smoke", "--data", str(builtin_data), "--out", str(out)]
    run = subprocess.run([*cmd, "--tokenizer", str(tok_dir)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    *arms, summary = [json.loads(line) for line in (out / "race.jsonl").read_text().splitlines()]
    assert [a["arm"] for a in arms] == ["v3", "v4", "v3-muon"]
    for a in arms:
        assert FIELDS <= set(a), FIELDS - set(a)
        assert a["final_loss"] < a["first_loss"] and a["val_loss"] < a["curve"][0]["val_loss"], a["arm"]
        left = round((a["target_s"] - a["probe_s"]) * a["probe_steps_per_s"])  # the steps the probe's rate fits
        assert abs(a["probe_budget"] - a["probe_steps"] - left) <= 1
        # re-estimated from the arm's own rate until its decay, never below what keeps the probe in the stable phase
        assert a["steps"] == a["step_budget"] >= min_budget(a["probe_steps"], 0.2)
        assert a["tokens"] == a["steps"] * 4 * 64 and 0 <= a["accuracy"] <= 1
    assert arms[0]["params"] == arms[2]["params"]  # V3 with AdamW and with Muon: the same model
    assert summary["summary"] and (out / "val_loss.png").stat().st_size > 0
    assert summary["by_val_loss"] and sorted(summary["by_val_loss"]) == sorted(a["arm"] for a in arms)


def test_budgets_follow_the_measured_rate_until_the_decay():
    """A probe slowed by load elsewhere gives too small a budget: later turns at the true rate raise it (while WSD
    is stable, where the lr does not depend on the budget), and the decay phase freezes it."""
    arm = SimpleNamespace(name="v3", step=0, train_s=0.0, budget=None, chunks=[], cfg=SimpleNamespace(decay_frac=0.2))

    def turn(steps: int, seconds: float) -> None:
        arm.step, arm.train_s = arm.step + steps, arm.train_s + seconds
        arm.chunks.append((steps, seconds))

    for _ in range(3):
        turn(10, 10.0)  # the probe: 1 step/s (a busy machine)
    set_budget(arm, target_s=100.0)
    assert arm.budget == 30 + 70 and arm.probe["budget"] == 100
    while stable(arm):
        turn(10, 5.0)  # the machine is quiet again: 2 steps/s
        set_budget(arm, target_s=100.0)
    frozen = arm.budget
    assert frozen > 100 and arm.step >= 0.8 * frozen  # more steps fit than the probe said; now in the decay
    assert arm.train_s + (frozen - arm.step) / 2 == pytest.approx(100, abs=10)  # the arm ends near the target
    assert arm.probe["budget"] == 100  # the probe's own estimate is kept for the report


def test_replot_draws_several_races_in_one_figure(tmp_path):
    rows = [
        {"arm": a, "curve": [{"train_s": 0, "val_loss": 5.0}, {"train_s": 1, "val_loss": 2.0 + s}]}
        for s in range(3)
        for a in ("v3", "v4")
    ]
    (tmp_path / "race.jsonl").write_text("\n".join(json.dumps(r) for r in [*rows, {"summary": True}]))
    main(["--replot", str(tmp_path / "race.jsonl"), "--out", str(tmp_path / "fig")])
    assert (tmp_path / "fig" / "val_loss.png").stat().st_size > 0
