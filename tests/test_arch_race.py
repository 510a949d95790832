"""benchmarks/arch_race.py: the V3 / V4 / V3-Muon race runs end to end in smoke mode, and its V4 greedy decoder is the
model's own greedy continuation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.arch_race import CachedGreedy, min_budget
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
        # raised only where the probe would otherwise reach past WSD's stable phase (a very busy machine)
        assert a["step_budget"] == max(a["probe_budget"], min_budget(a["probe_steps"], 0.2)) == a["steps"]
        assert a["tokens"] == a["steps"] * 4 * 64 and 0 <= a["accuracy"] <= 1
    assert arms[0]["params"] == arms[2]["params"]  # V3 with AdamW and with Muon: the same model
    assert summary["summary"] and (out / "val_loss.png").stat().st_size > 0
    assert summary["by_val_loss"] and sorted(summary["by_val_loss"]) == sorted(a["arm"] for a in arms)
