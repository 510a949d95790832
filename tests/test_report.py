"""The speedrun report's "R1's signature": the measured sentence on hand-built per-level numbers, and its figure."""

from __future__ import annotations

import json

from nanoseek.speedrun.figures import plot_reasoning_by_level
from nanoseek.speedrun.report import reasoning_signature

HARD = ["2x2", "4x2"]  # multi-digit levels


def level(think: float, steps: tuple[int, int], answer_only: tuple[int, int], length: float = 10.0) -> dict:
    """One level's row of report.json: think rate, mean length, [n, correct] with steps and answer-only."""
    return {"think_rate": think, "mean_length": length, "steps": list(steps), "answer_only": list(answer_only)}


def test_reasoning_that_grows_where_it_pays_is_r1s_signature():
    sft = {
        "2x1": level(0.2, (20, 18), (80, 76), 6.0),
        "2x2": level(0.2, (20, 10), (80, 8)),
        "4x2": level(0.3, (30, 6), (70, 0)),
    }
    grpo = {
        "2x1": level(0.2, (20, 18), (80, 76), 6.0),
        "2x2": level(0.6, (60, 30), (40, 4), 14.0),
        "4x2": level(0.7, (70, 14), (30, 0), 16.0),
    }
    sig = reasoning_signature(sft, grpo, HARD)
    hard, easy = sig["multi_digit"], sig["one_digit"]
    assert hard["levels"] == HARD and easy["levels"] == ["2x1"]
    assert round(100 * hard["think_change"], 6) == 40 and easy["think_change"] == 0 and hard["length_change"] == 5
    assert hard["steps_accuracy"] == 60 / 180 and hard["answer_only_accuracy"] == 12 / 220 and hard["pays"]
    s = sig["sentence"]
    assert "by +40.0 points on the multi-digit levels (2x2, 4x2) and by +0.0 on the one-digit ones (2x1)" in s
    assert "reasoning pays on the multi-digit levels" in s and "right 33.3% of the time, answer-only ones 5.5%" in s
    assert "one-digit levels: 90.0% vs 95.0%" in s
    assert s.endswith(
        "GRPO raised reasoning more on the multi-digit levels than on the one-digit ones: R1's signature."
    )


def test_reasoning_that_collapses_everywhere_is_not_r1s_signature():
    # the run: GRPO taught the model to stop reasoning, on every level alike
    sft = {
        "2x1": level(0.3, (30, 3), (70, 10)),
        "2x2": level(0.3, (30, 3), (70, 1)),
        "4x2": level(0.2, (20, 1), (80, 0)),
    }
    grpo = {
        "2x1": level(0.0, (0, 0), (100, 10)),
        "2x2": level(0.0, (0, 0), (100, 3)),
        "4x2": level(0.0, (0, 0), (100, 0)),
    }
    s = reasoning_signature(sft, grpo, HARD)["sentence"]
    assert "by -25.0 points on the multi-digit levels (2x2, 4x2) and by -30.0 on the one-digit ones (2x1)" in s
    assert "reasoning pays on the multi-digit levels" in s  # 4/50 right with steps vs 4/350 answer-only
    assert s.endswith(
        "reasoning did not grow on the multi-digit levels, it only fell less there than on the one-digit "
        "ones: not R1's signature."
    )
    grpo["2x1"] = level(0.05, (5, 0), (95, 10))  # -25 points: the same fall on both kinds of level
    s = reasoning_signature(sft, grpo, HARD)["sentence"]
    assert s.endswith("GRPO moved the share that reasons about equally on both kinds of level: not R1's signature.")


def test_reasoning_that_grows_where_it_does_not_pay_is_not_r1s_signature():
    sft = {"2x1": level(0.5, (50, 40), (50, 40)), "2x2": level(0.1, (10, 1), (90, 45))}
    grpo = {"2x1": level(0.5, (50, 40), (50, 40)), "2x2": level(0.9, (90, 9), (10, 5))}
    sig = reasoning_signature(sft, grpo, ["2x2"])
    assert sig["multi_digit"]["pays"] is False and sig["one_digit"]["pays"] is False
    assert "reasoning does not pay on the multi-digit levels" in sig["sentence"]
    assert sig["sentence"].endswith("than on the one-digit ones: not R1's signature.")


def test_the_payoff_is_unmeasured_when_one_kind_of_completion_is_missing():
    sft = {"2x1": level(0.0, (0, 0), (10, 9)), "2x2": level(1.0, (10, 5), (0, 0))}
    grpo = {"2x1": level(0.0, (0, 0), (10, 9)), "2x2": level(1.0, (10, 6), (0, 0))}
    sig = reasoning_signature(sft, grpo, ["2x2"])
    assert sig["multi_digit"]["pays"] is None and sig["one_digit"]["steps_accuracy"] is None
    assert (
        "whether reasoning pays on the multi-digit levels is not measured (no answer-only completion there)"
        in (sig["sentence"])
    )
    assert sig["sentence"].endswith("about equally on both kinds of level: not R1's signature.")
    json.dumps(sig)  # report.json holds it as it is


def test_reasoning_by_level_figure_draws_grpo_eval_records(tmp_path):
    rows = [{"step": 1, "loss": 1.0}]  # train records without per-level evals are skipped
    for step, think in ((0, 0.2), (5, 0.5), (10, 0.8)):
        by_level = {"2x1": think / 2, "2x2": think, "4x2": think}
        rows.append({"step": step, "eval_think_rate_by_level": by_level, "eval_response_len_by_level": by_level})
    plot_reasoning_by_level(rows, tmp_path / "plots" / "grpo_reasoning_by_level.png")
    assert (tmp_path / "plots" / "grpo_reasoning_by_level.png").stat().st_size > 1000
