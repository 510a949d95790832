"""`nanoseek speedrun`: the whole R1 recipe, resumable, ending in report.md (`run_speedrun`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nanoseek.cli.common import parse_set
from nanoseek.speedrun.recipe import RECIPES, Recipe, checkpoint_of
from nanoseek.speedrun.stages import run_speedrun
from nanoseek.train.step import NonFiniteLoss


def run(args: argparse.Namespace) -> int:
    """Run (or continue) the speedrun, then print its report and how to use the model."""
    out = Path(args.out)
    try:
        run_speedrun(out, args.preset, args.seed, parse_set(args.set, Recipe))
    except KeyboardInterrupt:  # finished stages are recorded; an interrupted training stage resumes
        print(f"\nnanoseek speedrun: interrupted; run the same command again to continue: {_again(args)}")
        return 130
    except NonFiniteLoss as e:
        print(f"nanoseek speedrun: error: {e}", file=sys.stderr)
        return 1
    print("\n" + (out / "report.md").read_text())
    print(f"Wrote {out / 'report.md'}, {out / 'report.json'} and {out / 'plots'}/")
    print(f"Chat with it:  nanoseek chat --model {out / 'grpo'}")
    print(f"Evaluate it:   nanoseek eval --model {checkpoint_of(out / 'grpo')} --task arithmetic --format chat")
    print(
        f"Serve it:      nanoseek serve --model {out / 'grpo'}   # OpenAI API at http://127.0.0.1:8000/v1, chat page at /"
    )
    return 0


def _again(args: argparse.Namespace) -> str:
    extra = "".join(f" --set {s}" for s in args.set)
    return f"nanoseek speedrun --out {args.out} --preset {args.preset} --seed {args.seed}{extra}"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "speedrun",
        help="tokenizer -> pretrain -> SFT -> GRPO, each evaluated, then report.md (resumable)",
        epilog="example: nanoseek speedrun --out runs/speedrun      (again after a stop: continues where it was)\n"
        "         nanoseek speedrun --preset smoke --out runs/smoke  (a one-minute check of the pipeline)\n"
        "         nanoseek speedrun --set grpo_steps=400 --set grpo_dynamic_sampling=yes --out runs/long",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="runs/speedrun", help="run folder (default runs/speedrun)")
    p.add_argument("--preset", default="cpu", choices=sorted(RECIPES), help="recipe: cpu (default), gpu, smoke")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a recipe field, e.g. --set grpo_lr=1e-5 (repeatable; fields: the Recipe in "
        "nanoseek/speedrun/recipe.py and recipe.json; booleans true/false/yes/no/on/off/1/0)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of every training stage (default 0)")
    p.set_defaults(func=run)
