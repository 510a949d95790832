"""`nanoseek <command>`: one entry point; each command lives in the module that owns its concept.

A command module exposes `add_parser(subparsers)` that registers its sub-command and sets
`func=<callable taking the parsed args>`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command name -> module that owns it; a module may register several commands
COMMANDS: dict[str, str] = {
    "tokenizer": "nanoseek.tokenizer",
    "prepare": "nanoseek.data.shards",
    "train": "nanoseek.train.loop",
    "sft": "nanoseek.train.sft",
    "grpo": "nanoseek.train.grpo",
    "distill": "nanoseek.train.distill",
    "eval": "nanoseek.eval",
    "generate": "nanoseek.infer.chat",
    "chat": "nanoseek.infer.chat",
    "serve": "nanoseek.infer.server",
    "speedrun": "nanoseek.speedrun",
    "export": "nanoseek.export",
    "plan": "nanoseek.distributed.plan",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanoseek", description="DeepSeek-V3 / R1 recipe in compact PyTorch.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in dict.fromkeys(COMMANDS.values()):
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except (ValueError, FileNotFoundError) as e:  # user errors: a clear message, no traceback
        print(f"nanoseek {args.command}: error: {e}", file=sys.stderr)
        return 1
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
