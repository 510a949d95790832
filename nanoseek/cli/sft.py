"""`nanoseek sft`: options -> SFTJob -> run_sft, in one process or under torchrun."""

from __future__ import annotations

import argparse

from nanoseek.cli.common import config_from_options, run_distributed, run_stage, train_summary
from nanoseek.cli.train import add_train_options
from nanoseek.distributed.process_group import DistEnv
from nanoseek.train.config import RESUME_OVERRIDABLE, TrainConfig
from nanoseek.train.sft import SFT_DEFAULTS, SFTJob, run_sft


def _sft(args: argparse.Namespace, env: DistEnv) -> int:
    data = {k: getattr(args, k) for k in ("worked_fraction", "n", "data_seed", "val_fraction")}
    cfg, data = config_from_options(args, TrainConfig(**SFT_DEFAULTS), RESUME_OVERRIDABLE, env.world_size, **data)
    # model, data and levels may be None: the library takes the run's on --resume
    job = SFTJob(args.model, args.data, args.out, levels=args.levels, resume=args.resume, train=cfg, **data)
    return run_stage("sft", run_sft, job, env, train_summary)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    d = SFTJob(None, None, "")
    p = subparsers.add_parser("sft", help="supervised fine-tuning on chat data, loss on assistant tokens only")
    p.add_argument("--model", help="model dir or run folder to fine-tune (with its tokenizer)")
    p.add_argument(
        "--data",
        help="a .jsonl of {'messages': [...]} (OpenAI chat format, tool calls too), a dir of them, or "
        "builtin:arithmetic,countdown,calculator",
    )
    p.add_argument("--out", required=True, help="run dir: metrics.jsonl, plots/, checkpoints/step_N/")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--worked-fraction", type=float, help=f"built-in: share of worked solutions ({d.worked_fraction})")
    p.add_argument(
        "--n", "--problems", dest="n", type=int, help=f"built-in: problems per task (and per level) ({d.n})"
    )  # --problems: under torchrun, whose parser takes --n for an abbreviation of its own options
    p.add_argument("--levels", nargs="*", help="built-in: only these levels, e.g. 2x1 3x12 4x12")
    p.add_argument("--data-seed", type=int, help=f"built-in: problem generation seed ({d.data_seed})")
    p.add_argument("--val-fraction", type=float, help=f"jsonl: share held out for val loss ({d.val_fraction})")
    add_train_options(p, d.train)
    p.set_defaults(func=lambda args: run_distributed(_sft, args))
