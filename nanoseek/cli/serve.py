"""`nanoseek serve`: the OpenAI-compatible server from the command line."""

from __future__ import annotations

import argparse
import os
import sys
import threading
from pathlib import Path

import torch

from nanoseek.cli.common import add_device_option
from nanoseek.infer.engine import Engine
from nanoseek.infer.server.app import Server, warm_up


def add_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser(
        "serve",
        help="an OpenAI-compatible HTTP server (chat page at /)",
        description="Serve a model directory over the OpenAI API: /v1/chat/completions, /v1/completions, "
        "/v1/models, /health, /metrics, and a chat page at /.",
        epilog="example: nanoseek serve --model runs/speedrun/grpo --port 8000",
    )
    s.add_argument("--model", required=True, help="model directory (HF format, with tokenizer.json)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes")
    s.add_argument("--max-batch", type=int, default=32, help="sequences decoded together (cache slots)")
    s.add_argument("--max-queue", type=int, default=256, help="sequences that may wait for a slot; more get 429")
    s.add_argument("--max-len", type=int, default=None, help="context length (default: the model's)")
    s.add_argument("--compile", action="store_true", help="compiled decode steps (warmed up before /health is 200)")
    s.add_argument("--speculative", action="store_true", help="MTP self-speculative decoding")
    s.add_argument(
        "--prefix-cache-tokens",
        type=int,
        default=None,
        help="prompt-prefix cache state kept for reuse, LRU (default: 4 contexts; 0: off; off with --speculative)",
    )
    s.add_argument(
        "--served-model-name", default=None, help="the model name clients send (default: the directory name)"
    )
    s.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for decoding (default: all cores but one, which is left to HTTP and tokenizing)",
    )
    add_device_option(s)
    s.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from nanoseek.checkpoint.run import resolve_model_dir
    from nanoseek.train.run import resolve_device

    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    model_dir = resolve_model_dir(args.model)
    if not (model_dir / "tokenizer.json").exists():
        raise FileNotFoundError(f"{model_dir} has no tokenizer.json: the server needs the model's tokenizer")
    if args.max_batch < 1 or args.max_queue < 0:
        raise ValueError("--max-batch must be >= 1 and --max-queue >= 0")
    # The engine's thread pool shares the cores with uvicorn's event loop and the tokenizer: a pool that spans every
    # core stalls at its barriers whenever another thread takes one of them (BENCHMARKS.md, "Serving").
    torch.set_num_threads(args.threads or default_threads())
    engine = Engine.from_pretrained(
        model_dir,
        device=resolve_device(args.device),
        max_batch_size=args.max_batch,
        max_len=args.max_len,
        speculative=args.speculative,
        compile=args.compile,
        prefix_cache_tokens=args.prefix_cache_tokens,
    )
    name = args.served_model_name or Path(args.model).resolve().name  # the run folder's name, not step_N
    server = Server(engine, name, api_key=args.api_key, max_queue=args.max_queue)
    server.loop.start(warmup=warm_up)
    url = f"http://{args.host}:{args.port}"
    print(f"nanoseek serve: {model_dir} as {name!r} at {url}/v1 (chat page {url}/)", file=sys.stderr, flush=True)
    threading.Thread(target=_announce_ready, args=(server, url), daemon=True).start()
    uvicorn.run(server.app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5)
    server.loop.stop()
    return 0


def default_threads() -> int:
    """All cores this process may use but one, at least one."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores - 1, torch.get_num_threads()))


def _announce_ready(server: Server, url: str) -> None:
    server.loop.ready.wait()
    if server.loop.error is None:
        print(f"nanoseek serve: ready ({url}/health is 200)", file=sys.stderr, flush=True)
