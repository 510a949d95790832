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
    "tokenizer": "nanoseek.cli.tokenizer",
    "prepare": "nanoseek.cli.prepare",
    "train": "nanoseek.cli.train",
    "sft": "nanoseek.cli.sft",
    "grpo": "nanoseek.cli.grpo",
    "distill": "nanoseek.cli.distill",
    "eval": "nanoseek.cli.eval",
    "generate": "nanoseek.cli.chat",
    "chat": "nanoseek.cli.chat",
    "serve": "nanoseek.cli.serve",
    "speedrun": "nanoseek.cli.speedrun",
    "export": "nanoseek.cli.export",
    "plan": "nanoseek.cli.plan",
}


# An example for every command's --help (commands that set their own epilog keep it). A model argument takes a
# model dir or a run folder (its latest checkpoint).
EXAMPLES: dict[str, str] = {
    "tokenizer": "nanoseek tokenizer train --builtin --out tok --vocab-size 512",
    "tokenizer train": "nanoseek tokenizer train --builtin --out tok --vocab-size 512",
    "tokenizer info": "nanoseek tokenizer info tok",
    "prepare": "nanoseek prepare --tokenizer tok --builtin arithmetic --n 150000 --out data",
    "train": "nanoseek train --preset cpu-small --data data --out runs/pt --time-budget 300\n"
    "  nanoseek train --out runs/pt --resume",
    "sft": "nanoseek sft --model runs/pt --data builtin:arithmetic --out runs/sft --steps 600",
    "grpo": "nanoseek grpo --model runs/sft --task arithmetic --out runs/grpo --steps 175",
    "distill": "nanoseek distill --teacher runs/grpo --student runs/sft --task arithmetic --out runs/distill --steps 200",
    "eval": "nanoseek eval --model runs/grpo --task arithmetic --format chat --k 8",
    "generate": "nanoseek generate --model runs/pt --prompt 'What is 12+7*3? '",
    "chat": "nanoseek chat --model runs/speedrun/grpo",
    "serve": "nanoseek serve --model runs/speedrun/grpo --port 8000",
    "speedrun": "nanoseek speedrun --out runs/speedrun",
    "plan": "nanoseek plan --preset deepseek-v3 --gpus 2048 --gpu h800 --tokens 14.8T",
}


def _add_examples(sub: argparse._SubParsersAction, prefix: str = "") -> None:
    for name, p in sub.choices.items():
        key = f"{prefix}{name}"
        if not p.epilog and key in EXAMPLES:
            p.epilog = "example: " + EXAMPLES[key]
            p.formatter_class = argparse.RawDescriptionHelpFormatter
        for action in p._actions:  # nested sub-commands (`tokenizer train`)
            if isinstance(action, argparse._SubParsersAction):
                _add_examples(action, f"{key} ")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nanoseek",
        description="DeepSeek-V3 / R1 recipe in compact PyTorch.",
        epilog="example: nanoseek speedrun --out runs/speedrun   (nanoseek COMMAND --help: each command's options)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in dict.fromkeys(COMMANDS.values()):
        importlib.import_module(module).add_parser(sub)
    _add_examples(sub)
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
