"""`nanoseek speedrun`: the whole R1 recipe, resumable, ending in report.md."""

from __future__ import annotations

import argparse

from nanoseek.speedrun.recipe import RECIPES
from nanoseek.speedrun.stages import run


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "speedrun",
        help="tokenizer -> pretrain -> SFT -> GRPO, each evaluated, then report.md (resumable)",
        epilog="example: nanoseek speedrun --out runs/speedrun      (again after a stop: continues where it was)\n"
        "         nanoseek speedrun --preset smoke --out runs/smoke  (a one-minute check of the pipeline)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="runs/speedrun", help="run folder (default runs/speedrun)")
    p.add_argument("--preset", default="cpu", choices=sorted(RECIPES), help="recipe: cpu (default), gpu, smoke")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a recipe field, e.g. --set grpo_lr=1e-5 (fields: see nanoseek/speedrun.py Recipe)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)
