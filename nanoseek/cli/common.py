"""What every command shares: one `--set` parser, one torchrun wrapper, one resume-merge, shared options, and
deprecated spellings that keep old scripts working for one release."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
from collections.abc import Callable
from typing import Any

from nanoseek.distributed.process_group import DistEnv, init_distributed, shutdown
from nanoseek.tasks.problems import LEVELS
from nanoseek.train.run import interrupted_hint, rank0_print, resume_settings, saved_run_args
from nanoseek.train.step import NonFiniteLoss

TRUE, FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")
DEVICE_HELP = "cpu, cuda, cuda:N or auto (default: cuda when available, else cpu)"


def parse_bool(text: str) -> bool:
    """The one boolean syntax of the command line: true/false, yes/no, on/off, 1/0 (any case)."""
    t = text.strip().lower()
    if t in TRUE:
        return True
    if t in FALSE:
        return False
    raise ValueError(f"{text!r} is not a boolean: use one of {', '.join(TRUE + FALSE)}")


def _field_kind(tp: Any) -> tuple[type, bool]:
    """(base type, accepts None) of a dataclass field annotation, strings included (`from __future__`)."""
    if isinstance(tp, str):
        optional = "None" in tp
        base = tp.replace("| None", "").replace("None |", "").strip()
        for name, kind in (
            ("bool", bool),
            ("int", int),
            ("float", float),
            ("str", str),
            ("dict", dict),
            ("list", list),
        ):
            if base.startswith(name):
                return kind, optional
        return str, optional
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        kinds = [a for a in args if a is not type(None)]
        return _field_kind(kinds[0])[0], type(None) in args
    return (typing.get_origin(tp) or tp), False


def parse_set(items: list[str], cls: type, skip: tuple[str, ...] = ("extra",)) -> dict[str, Any]:
    """`--set FIELD=VALUE` items -> {field: typed value} for the dataclass `cls` (ModelConfig, Recipe, ...).

    Values take the field's type: int, float, bool (`parse_bool`), dict/list (JSON), `None` where allowed.
    Unknown fields and unparsable values are errors that name the field and what it takes.
    """
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in skip}
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key, text = key.strip().replace("-", "_"), text.strip()
        if not sep or key not in fields:
            hint = f"unknown field {key!r}" if sep else "expected FIELD=VALUE"
            raise ValueError(f"--set {item!r}: {hint}; fields: {', '.join(fields)}")
        kind, optional = _field_kind(fields[key].type)
        try:
            if text == "None" and optional:
                value: Any = None
            elif kind is bool:
                value = parse_bool(text)
            elif kind in (dict, list):
                value = json.loads(text)
            else:
                value = kind(text)
        except ValueError:
            raise ValueError(f"--set {item!r}: {key} takes a {kind.__name__}{' or None' if optional else ''}") from None
        out[key] = value
    return out


def add_device_option(p: argparse.ArgumentParser | argparse._ArgumentGroup, default: str | None = "auto") -> None:
    """`--device`, the same everywhere: auto picks cuda when available, else cpu."""
    p.add_argument("--device", default=default, help=DEVICE_HELP)


def run_distributed(command: Callable[[argparse.Namespace, DistEnv], int], args: argparse.Namespace) -> int:
    """Run a training command in one process or as one rank under torchrun: set up the process group (from
    torchrun's environment, or a single-process stand-in), run, and tear it down (cleanly only on success)."""
    env = init_distributed(getattr(args, "device", None) or "auto")
    rc = 1
    try:
        rc = command(args, env)
        return rc
    finally:
        shutdown(clean=rc == 0)


def merge_resumed(given: dict[str, Any], saved: dict[str, Any] | None, overridable: set[str] | frozenset[str]) -> dict:
    """The options of a resumed run: each given option (not None), else the saved run's value.

    A given option outside `overridable` that differs from the saved value is an error: `--resume` continues
    the run as it was started; a changed hyper-parameter needs a new run. (The library's rule, which each
    stage applies again to the job it is given.)
    """
    return resume_settings(given, saved, frozenset(overridable))


def config_from_options(
    args: argparse.Namespace, defaults: Any, overridable: frozenset[str], world_size: int = 1, **more: Any
) -> tuple[Any, dict[str, Any]]:
    """(the dataclass `defaults` (TrainConfig, GRPOConfig) with the options' values, the `more` settings): each
    option given, else on --resume the run's saved one (batch size per process for `world_size` processes),
    else the default. A given option outside `overridable` that differs from the saved run is an error."""
    saved = saved_run_args(args.out, world_size) if args.resume else None
    names = [f.name for f in dataclasses.fields(defaults)]
    values = merge_resumed({name: getattr(args, name) for name in names} | more, saved, overridable)
    config = dataclasses.replace(defaults, **{k: values[k] for k in names if k in values})
    return config, {k: v for k, v in values.items() if k not in names}


def run_stage(
    command: str, stage: Callable[[Any, DistEnv], dict], job: Any, env: DistEnv, report: Callable[[dict], str]
) -> int:
    """Run a training stage (`run_pretrain`, `run_sft`, `run_grpo`) for a command and print `report(summary)`,
    or why it stopped (rank 0 only). Returns the exit status: 0, 1 (non-finite loss) or 130 (Ctrl-C)."""
    say = rank0_print(env)
    try:
        summary = stage(job, env)
    except NonFiniteLoss as e:
        say(f"nanoseek {command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the step in flight is lost; the last checkpoint is complete
        say(f"\nnanoseek {command}: interrupted; {interrupted_hint(command, job.out)}", file=sys.stderr)
        return 130
    say(report(summary))
    return 0


def train_summary(s: dict[str, Any]) -> str:
    """The line `nanoseek train` and `nanoseek sft` end with."""
    loss = f"loss {s['first_loss']:.4f} -> {s['last_loss']:.4f}" if s["last_loss"] is not None else "no new steps"
    val = f", val {s['val_loss']:.4f}" if s["val_loss"] is not None else ""
    return (
        f"done: step {s['step']} ({s['tokens']:,} tokens, {s['elapsed_s']:.1f} s), {loss}{val}, "
        f"{s['tokens_per_s']:,.0f} tokens/s, MFU {100 * s['mfu']:.2f}%; checkpoint {s['checkpoint']}"
        + (f"; metrics and plots in {s['run_dir']}" if s.get("run_dir") else "")
    )


class Deprecated(argparse.Action):
    """An old spelling of an option: still works (stores into the new `dest`) and says what to write instead."""

    def __init__(self, option_strings, dest, new: str, **kwargs) -> None:
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(f"nanoseek: {option_string} is deprecated and will be removed; use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_builtin_option(p: argparse.ArgumentParser | argparse._ArgumentGroup, what: str) -> None:
    """`--builtin [TASK ...]`, the same in `tokenizer train` and `prepare`: `what` uses the built-in task
    corpus; no names means every task. Stores None when not given, else the task names."""
    tasks = " ".join(LEVELS)
    p.add_argument(
        "--builtin",
        nargs="*",
        metavar="TASK",
        action=BuiltinTasks,
        help=f"{what} the built-in task corpus: these tasks ({tasks}; none named: all)",
    )


class BuiltinTasks(argparse.Action):
    """`--builtin [TASK ...]` -> the task names (none: all). The old comma-separated spelling of `prepare`
    (`--builtin arithmetic,countdown`) still works, with a deprecation message."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        tasks: list[str] = []
        for value in values:
            if "," in value:
                new = " ".join(t.strip() for t in value.split(",") if t.strip())
                print(
                    f"nanoseek: {option_string} {value} (comma-separated) is deprecated and will be removed; "
                    f"use {option_string} {new}",
                    file=sys.stderr,
                )
            tasks += [t.strip() for t in value.split(",") if t.strip()]
        if unknown := [t for t in tasks if t not in LEVELS]:
            parser.error(f"{option_string}: unknown task(s) {', '.join(unknown)}; built-in tasks: {', '.join(LEVELS)}")
        setattr(namespace, self.dest, tasks or list(LEVELS))
