"""`nanoseek plan`: memory, time and cost of a training run on N GPUs, before renting them."""

from __future__ import annotations

import argparse
import json

from nanoseek.cli.common import parse_set
from nanoseek.config import ModelConfig
from nanoseek.distributed.plan import GPUS, format_plan, make_plan


def _cmd_plan(args: argparse.Namespace) -> int:
    config = ModelConfig.from_preset(args.preset, **parse_set(args.set, ModelConfig))
    mem = _parse_gb(args.gpu_mem) if args.gpu_mem else None
    p = make_plan(
        config,
        args.gpus,
        args.gpu.lower(),
        mem,
        args.tokens,
        args.seq_len,
        args.micro_batch,
        args.batch_tokens,
        args.mfu,
        args.price_per_hour,
        args.gpu_hours,
    )
    print(json.dumps(p) if args.json else format_plan(p, args.preset))
    return 0


def _parse_gb(text: str) -> float:
    t = text.strip().lower().removesuffix("b").removesuffix("g")
    try:
        return float(t)
    except ValueError:
        raise ValueError(f"--gpu-mem {text!r}: give GB, e.g. 80GB or 80") from None


def _number(text: str) -> float:
    """1e9, 14.8T, 500B, 2M -> float."""
    scale = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}.get(text[-1:].lower(), 1)
    try:
        return float(text[:-1] if scale != 1 else text) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r} (e.g. 1e9, 14.8T, 500B)") from None


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("plan", help="memory, layout, time and cost of a training run on N GPUs")
    p.add_argument("--preset", required=True, help="model preset: tiny, cpu-small, gpu-small, deepseek-v3, ...")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--gpus", type=int, required=True, help="number of GPUs (processes)")
    p.add_argument("--gpu", default="h100", help=f"GPU kind: {', '.join(GPUS)} (default h100)")
    p.add_argument("--gpu-mem", help="memory per GPU, e.g. 80GB (default: the GPU kind's)")
    p.add_argument("--tokens", type=_number, default=1e9, help="training tokens, e.g. 14.8T (default 1e9)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default min(4096, max_position_embeddings))")
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per GPU per micro-batch (default 1)")
    p.add_argument("--batch-tokens", type=lambda s: int(_number(s)), help="global batch in tokens (default: 1 step)")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation to assume (default 0.4)")
    p.add_argument("--price-per-hour", type=float, help="price of one GPU-hour, for the cost")
    p.add_argument("--gpu-hours", type=_number, help="a reported GPU-hour budget: print the MFU it implies")
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    p.set_defaults(func=_cmd_plan)
