"""`nanoseek distill`: options -> DistillJob -> run_distill (rejection-sample a teacher, SFT the student)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from nanoseek.cli.common import add_device_option
from nanoseek.train.config import TrainConfig
from nanoseek.train.distill import DEFAULT_N, DistillJob, run_distill
from nanoseek.train.run import interrupted_hint
from nanoseek.train.sft import SFT_DEFAULTS

SFT_OPTIONS = ("steps", "time_budget", "lr", "batch_size", "seq_len", "seed", "device")  # passed on to the SFT


def _distill(args: argparse.Namespace) -> int:
    given = {k: getattr(args, k) for k in SFT_OPTIONS if getattr(args, k) is not None}
    keys = ("out", "task", "teacher", "teacher_url", "teacher_model", "concurrency", "gen_batch", "levels", "split")
    keys += (
        "n",
        "seed",
        "samples",
        "temperature",
        "max_tokens",
        "keep_per_prompt",
        "require_think",
        "student",
        "device",
    )
    job = DistillJob(
        **{k: getattr(args, k) for k in keys},
        api_key=os.environ.get(args.api_key_env) if args.api_key_env else None,
        sft=not args.no_sft,
        train=dataclasses.replace(TrainConfig(**SFT_DEFAULTS), **given),
    )
    try:
        run_distill(job)
    except KeyboardInterrupt:
        traces = Path(args.out) / "traces.jsonl"
        where = f"traces in {traces}; the student's SFT: {interrupted_hint('sft', traces.parent / 'sft')}"
        print(f"\nnanoseek distill: interrupted; {where if traces.exists() else 'no traces written'}", file=sys.stderr)
        return 130
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("distill", help="teacher traces -> keep verified-correct ones -> SFT a student")
    p.add_argument("--out", required=True, help="output dir: traces.jsonl, distill.json, sft/")
    t = p.add_argument_group("teacher (one of)")
    t.add_argument("--teacher", help="a nanoseek / HF model dir with its tokenizer")
    t.add_argument("--teacher-url", help="an OpenAI-compatible server, e.g. http://localhost:8000/v1")
    t.add_argument("--teacher-model", help="with --teacher-url: the model name to request")
    t.add_argument("--api-key-env", default="OPENAI_API_KEY", help="with --teacher-url: env var holding the API key")
    t.add_argument("--concurrency", type=int, default=4, help="with --teacher-url: requests in flight (default 4)")
    t.add_argument("--gen-batch", type=int, default=64, help="with --teacher: sequences decoded together (64)")
    d = p.add_argument_group("prompts and rejection sampling")
    d.add_argument("--task", required=True, help="arithmetic | countdown | a .jsonl of {prompt, answer}")
    d.add_argument("--levels", nargs="*", help="built-in task levels (default: all)")
    d.add_argument("--split", default="train", help="built-in split to draw prompts from (default train)")
    d.add_argument("--n", type=int, help=f"prompts: built-in distinct problems ({DEFAULT_N}), file: first N (all)")
    d.add_argument("--seed", type=int, default=0, help="prompt and sampling seed, also the SFT seed (default 0)")
    d.add_argument("--samples", type=int, default=4, help="completions per prompt (default 4)")
    d.add_argument("--temperature", type=float, default=0.7, help="teacher sampling temperature (default 0.7)")
    d.add_argument("--max-tokens", type=int, default=256, help="completion length cap; cut ones are rejected (256)")
    d.add_argument("--keep-per-prompt", type=int, default=1, help="correct traces kept per prompt (default 1)")
    d.add_argument(
        "--no-require-think",
        dest="require_think",
        action="store_false",
        help="also keep correct answers without the <think>...</think> answer format",
    )
    s = p.add_argument_group("student SFT")
    s.add_argument("--no-sft", action="store_true", help="only write the traces")
    s.add_argument("--student", help="model dir to fine-tune (default: a local --teacher itself)")
    s.add_argument("--steps", type=int, help="SFT optimizer steps")
    s.add_argument("--time-budget", type=float, help="SFT seconds")
    s.add_argument("--lr", type=float, help="SFT peak learning rate (sft's default)")
    s.add_argument("--batch-size", type=int, help="SFT sequences per batch (sft's default)")
    s.add_argument("--seq-len", type=int, help="SFT tokens per sequence (default: the longest trace)")
    add_device_option(s)  # the teacher's and the student's
    p.set_defaults(func=_distill)
