"""`nanoseek prepare`: text, .jsonl or built-in tasks -> token shards."""

from __future__ import annotations

import argparse

from nanoseek.cli.common import add_builtin_option
from nanoseek.data.shards import prepare
from nanoseek.tokenizer import Tokenizer


def _cmd_prepare(args: argparse.Namespace) -> None:
    tokenizer = Tokenizer.from_pretrained(args.tokenizer)
    m = prepare(
        tokenizer,
        args.out,
        inputs=args.input,
        builtin=args.builtin or [],
        n=args.n,
        seed=args.seed,
        val_fraction=args.val_fraction,
        tokenizer_path=str(args.tokenizer),
        worked_fraction=args.worked_fraction,
    )
    counts = ", ".join(f"{s}: {v['tokens']:,} tokens / {v['documents']:,} docs" for s, v in m["splits"].items())
    print(f"wrote {args.out} ({m['dtype']}; {counts})")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("prepare", help="tokenize text into token shards + manifest.json")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory or tokenizer.json")
    p.add_argument("--input", nargs="*", default=[], help=".txt (one document each) / .jsonl files or dirs")
    add_builtin_option(p, "tokenize")
    p.add_argument("--n", type=int, default=10000, help="built-in problems per task (default 10000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--worked-fraction",
        type=float,
        default=1.0,
        help="built-in: share of problems written with worked solutions, the rest answer-only (default 1.0)",
    )
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of documents held out for val")
    p.add_argument("--out", required=True, help="output data directory")
    p.set_defaults(func=_cmd_prepare)
