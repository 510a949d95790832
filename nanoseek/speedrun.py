"""`nanoseek speedrun`: the whole recipe on a laptop CPU with nothing downloaded.

tokenizer -> built-in arithmetic corpus -> pretrain cpu-small -> eval -> SFT on chat-formatted worked solutions
-> eval -> GRPO with a verifiable reward -> eval, then `report.md` (tables + the runs' PNG plots) in the run
folder. Each stage is the same code as its own command (`nanoseek train`, `sft`, `grpo`, `eval`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from nanoseek.config import atomic_write_text
from nanoseek.data.tasks import LEVELS, generate
from nanoseek.train.checkpointing import latest_checkpoint

LEVEL_NAMES = list(LEVELS["arithmetic"])


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("speedrun", help="tokenizer -> pretrain -> SFT -> GRPO -> eval -> report.md, on the CPU")
    p.add_argument("--out", default="runs/speedrun", help="run folder (default runs/speedrun)")
    p.add_argument("--pretrain-s", type=float, default=300, help="pretraining seconds (300)")
    p.add_argument("--sft-s", type=float, default=180, help="SFT seconds (180)")
    p.add_argument("--grpo-s", type=float, default=240, help="GRPO seconds (240)")
    p.add_argument("--eval-n", type=int, default=100, help="held-out test problems per level (100)")
    p.add_argument("--n", type=int, default=150000, help="pretraining problems (150000)")
    p.add_argument("--preset", default="cpu-small")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def _stage(name: str, argv: list[str]) -> None:
    from nanoseek.cli import main

    print(f"\n== {name}: nanoseek {' '.join(argv)}", flush=True)
    if main(argv) != 0:
        raise RuntimeError(f"speedrun stage '{name}' failed (command: nanoseek {' '.join(argv)})")


def _checkpoint(run_dir: Path) -> Path:
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise RuntimeError(f"{run_dir} has no checkpoint")
    return ckpt


def _evaluate(model_dir: Path, fmt: str, n: int, seed: int) -> dict:
    from nanoseek.eval import evaluate
    from nanoseek.infer.engine import Engine

    problems = [p for lvl in LEVEL_NAMES for p in generate("arithmetic", n, seed=seed, split="test", level=lvl)]
    problems = list({p.prompt: p for p in problems}.values())  # small levels repeat problems: count each once
    engine = Engine.from_pretrained(model_dir, max_batch_size=64)
    result = evaluate(engine, problems, fmt=fmt, max_tokens=96)
    result.pop("results")
    return result


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    tok, data = out / "tokenizer", out / "data"
    _stage("tokenizer", ["tokenizer", "train", "--builtin", "--out", str(tok), "--vocab-size", "512"])
    _stage("prepare", ["prepare", "--tokenizer", str(tok), "--builtin", "arithmetic", "--n", str(args.n), "--out", str(data)])  # fmt: skip
    pt, sft, grpo = out / "pretrain", out / "sft", out / "grpo"
    seed = ["--seed", str(args.seed)]
    # the 5-minute recipe of BENCHMARKS.md: more, smaller steps, a higher lr held until a final decay, no MTP
    recipe = ["--batch-size", "4", "--lr", "4e-3", "--schedule", "wsd", "--mtp-weight", "0"]
    _stage("pretrain", ["train", "--preset", args.preset, "--data", str(data), "--out", str(pt), "--time-budget", str(args.pretrain_s), *recipe, *seed])  # fmt: skip
    evals = {"pretrain": _evaluate(_checkpoint(pt), "pretrain", args.eval_n, args.seed)}
    _stage("sft", ["sft", "--model", str(_checkpoint(pt)), "--data", "builtin:arithmetic", "--out", str(sft), "--time-budget", str(args.sft_s), *seed])  # fmt: skip
    evals["sft"] = _evaluate(_checkpoint(sft), "chat", args.eval_n, args.seed)
    _stage("grpo", ["grpo", "--model", str(_checkpoint(sft)), "--task", "arithmetic", "--out", str(grpo), "--time-budget", str(args.grpo_s), *seed])  # fmt: skip
    evals["grpo"] = _evaluate(_checkpoint(grpo), "chat", args.eval_n, args.seed)
    atomic_write_text(out / "eval.json", json.dumps(evals, indent=2) + "\n")
    report = write_report(out, evals, time.time() - t0)
    print("\n" + report)
    final = _checkpoint(grpo)
    print(f"Chat with it:  nanoseek chat --model {final}")
    print(f"Evaluate it:   nanoseek eval --model {final} --task arithmetic --format chat")
    print(f"Serve it:      nanoseek serve --model {grpo}   # OpenAI API at http://127.0.0.1:8000/v1, chat page at /")
    return 0


def write_report(out: Path, evals: dict, seconds: float) -> str:
    """report.md: accuracy per stage and level, and links to every plot the stages wrote."""
    lines = [
        "# nanoseek speedrun",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M')}, {seconds / 60:.1f} minutes, torch {torch.__version__}.",
        "",
        "Greedy accuracy (%) on held-out `test` problems (pretrain: raw text prompt; SFT/GRPO: chat template).",
        "",
        "| stage | all | " + " | ".join(LEVEL_NAMES) + " | format | mean length |",
        "|---" * (len(LEVEL_NAMES) + 4) + "|",
    ]
    for stage, r in evals.items():
        per = [f"{100 * r['levels'][lvl]['accuracy']:.1f}" if lvl in r["levels"] else "-" for lvl in LEVEL_NAMES]
        lines.append(
            f"| {stage} | {100 * r['accuracy']:.1f} | " + " | ".join(per) + f" | {100 * r['format_rate']:.0f}% | "
            f"{r['mean_length']:.1f} |"
        )
    lines += ["", "## Plots", ""]
    for png in sorted(out.glob("*/plots/*.png")):
        rel = png.relative_to(out)
        lines.append(f"![{rel}]({rel})")
    text = "\n".join(lines) + "\n"
    atomic_write_text(out / "report.md", text)
    return text
