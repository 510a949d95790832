"""Does GRPO teach what imitation did not? GRPO vs a same-minutes SFT control, from one pretrained model.

    python -m benchmarks.grpo_evidence --pretrained RUN/checkpoints/step_N --out runs/grpo_evidence

The recipe of shared/cpu-feasibility.md's second experiment: the pretraining text holds worked solutions;
a short "cold start" SFT teaches the chat format with mostly answer-only completions (`<think></think> 143`,
a few worked ones), so the model rarely writes its steps; then
  - GRPO (correctness reward only) for --rl-s seconds on the hard levels, and
  - the control: the same SFT data for the same seconds,
both from the cold-start checkpoint. All three are scored greedily on the same --n distinct held-out problems
of those levels; wrong->right vs right->wrong flips get an exact sign test. Writes evidence.json, evidence.md
and the runs' plots under --out; prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks import run_command
from nanoseek.eval.evaluate import compare, evaluate
from nanoseek.infer.engine import Engine
from nanoseek.io import atomic_write_text
from nanoseek.speedrun.recipe import checkpoint_of
from nanoseek.tasks.rewards import has_reasoning
from nanoseek.tasks.sources import task_eval_examples


def score(model_dir: Path, problems: list[dict]) -> dict:
    engine = Engine.from_pretrained(model_dir, max_batch_size=64)
    return evaluate(engine, problems, fmt="chat", max_tokens=96)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained", required=True, help="a pretrained model dir (e.g. `nanoseek train` output)")
    p.add_argument("--out", default="runs/grpo_evidence")
    p.add_argument("--levels", nargs="+", default=["3x12", "4x12"])
    p.add_argument("--cold-start-s", type=float, default=150, help="cold-start SFT seconds (150)")
    p.add_argument("--worked-fraction", type=float, default=0.25, help="worked solutions in the SFT data (0.25)")
    p.add_argument("--rl-s", type=float, default=420, help="GRPO seconds, and the control's SFT seconds (420)")
    p.add_argument("--lr", type=float, default=3e-5, help="GRPO learning rate (3e-5)")
    p.add_argument("--n", type=int, default=1000, help="distinct held-out test problems (1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rescore", action="store_true", help="reuse the runs already in --out; only evaluate again")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cold, grpo, control = out / "cold_start", out / "grpo", out / "control"
    t0 = time.time()
    if not args.rescore:
        seed = ["--seed", str(args.seed)]
        sft_data = ["--data", "builtin:arithmetic", "--worked-fraction", str(args.worked_fraction)]
        run_command("cold-start SFT", ["sft", "--model", args.pretrained, *sft_data, "--out", str(cold), "--time-budget", str(args.cold_start_s), *seed])  # fmt: skip
        start = str(checkpoint_of(cold))
        run_command("GRPO", ["grpo", "--model", start, "--task", "arithmetic", "--levels", *args.levels, "--out", str(grpo), "--time-budget", str(args.rl_s), "--lr", str(args.lr), "--eval-every", "20", "--eval-n", "100", *seed])  # fmt: skip
        run_command("control SFT", ["sft", "--model", start, *sft_data, "--out", str(control), "--time-budget", str(args.rl_s), *seed])  # fmt: skip

    # distinct problems spread over the levels; ask for a few more, as duplicates are dropped
    problems = task_eval_examples("arithmetic", args.levels, args.n + 20, "test", seed=args.seed + 777)[: args.n]
    models = {"cold start": checkpoint_of(cold), "GRPO": checkpoint_of(grpo), "control": checkpoint_of(control)}
    evals = {name: score(d, problems) for name, d in models.items()}
    correct = {name: [r["correct"] for r in e["results"]] for name, e in evals.items()}
    result = {
        "bench": "grpo_evidence",
        "levels": args.levels,
        "n_problems": len(problems),
        "rl_seconds": args.rl_s,
        "accuracy": {k: round(100 * v["accuracy"], 1) for k, v in evals.items()},
        "accuracy_by_level": {
            k: {lv: round(100 * s["accuracy"], 1) for lv, s in v["levels"].items()} for k, v in evals.items()
        },
        "think_rate": {k: round(100 * _think_rate(v["results"]), 1) for k, v in evals.items()},
        "mean_length": {k: round(v["mean_length"], 1) for k, v in evals.items()},
        "grpo_vs_cold_start": compare(correct["cold start"], correct["GRPO"]),
        "control_vs_cold_start": compare(correct["cold start"], correct["control"]),
        "grpo_vs_control": compare(correct["control"], correct["GRPO"]),
        "minutes": round((time.time() - t0) / 60, 1),
        "date": time.strftime("%Y-%m-%d"),
    }
    atomic_write_text(out / "evidence.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(out / "evidence.md", _table(result, evals))
    plot(out / "grpo" / "metrics.jsonl", out / "grpo_evidence.png")
    print(json.dumps(result))


def plot(metrics: Path, png: Path) -> None:
    """Training reward, think rate and response length per step (smoothed), and the periodic greedy eval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    train = [r for r in rows if "reward_mean" in r]
    evals = [r for r in rows if "eval_accuracy" in r]

    def smooth(key: str, k: int = 20) -> list[float]:
        v = [r[key] for r in train]
        return [sum(v[max(0, i - k + 1) : i + 1]) / len(v[max(0, i - k + 1) : i + 1]) for i in range(len(v))]

    steps = [r["step"] for r in train]
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
    ax[0].plot(steps, smooth("reward_mean"), label="train reward (sampled, T=1)")
    ax[0].plot([r["step"] for r in evals], [r["eval_accuracy"] for r in evals], "o-", label="held-out greedy accuracy")
    ax[1].plot(steps, smooth("think_rate"), label="train: writes steps in <think>")
    ax[1].plot([r["step"] for r in evals], [r["eval_think_rate"] for r in evals], "o-", label="held-out (greedy)")
    ax[2].plot(steps, smooth("response_len"), label="mean response length (tokens)")
    for a, title in zip(ax, ("reward / accuracy", "think rate", "response length")):
        a.set_xlabel("GRPO step")
        a.set_title(title)
        a.legend(fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def _think_rate(rows: list[dict]) -> float:
    """Share of completions that write something inside <think>...</think>."""
    return sum(has_reasoning(r["completion"]) for r in rows) / max(len(rows), 1)


def _table(result: dict, evals: dict) -> str:
    lines = [
        f"# GRPO evidence ({result['date']}, {result['n_problems']} distinct held-out problems, "
        f"levels {' '.join(result['levels'])}, {result['rl_seconds']:.0f} s of GRPO or of SFT)",
        "",
        "| model | greedy accuracy | writes steps in <think> | mean length |",
        "|---|---|---|---|",
    ]
    for name in evals:
        lines.append(
            f"| {name} | {result['accuracy'][name]}% | {result['think_rate'][name]}% | {result['mean_length'][name]} |"
        )
    lines.append("")
    for key in ("grpo_vs_cold_start", "control_vs_cold_start", "grpo_vs_control"):
        c = result[key]
        lines.append(
            f"- {key}: {c['wrong_to_right']} wrong->right, {c['right_to_wrong']} right->wrong, "
            f"sign test p = {c['p_value']:.2g}"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
