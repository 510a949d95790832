"""Run a function on N local processes as torchrun would run a command: torchrun's own launcher
(`torch.distributed.launcher.elastic_launch`), called from Python, so a library caller such as the speedrun can
train on both cores of a laptop without turning its typed job back into a command line."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import torch

from nanoseek.distributed.process_group import init_distributed, shutdown


def _worker(fn: Callable[..., Any], threads: int, device: str, args: tuple) -> Any:
    if threads:
        torch.set_num_threads(threads)
    env = init_distributed(device)
    ok = False
    try:
        result = fn(*args, env=env)
        ok = True
        return result
    finally:
        shutdown(clean=ok)


def run_on_processes(fn: Callable[..., Any], nprocs: int, *args: Any, threads: int = 1, device: str = "auto") -> Any:
    """`fn(*args, env=DistEnv)` on `nprocs` processes joined in one process group (torchrun's environment and
    `init_distributed`, as a `nanoseek train` under torchrun gets it); returns rank 0's result. `fn` must be importable (a
    module-level function) because the workers are spawned. nprocs 1 runs `fn` here. A failing rank ends every
    rank and raises here with its error (torchrun's ChildFailedError), nothing restarts."""
    if nprocs <= 1:
        return fn(*args)
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nprocs,
        run_id=uuid.uuid4().hex,
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",  # a free port, as torchrun --standalone picks one
        max_restarts=0,
    )
    results = elastic_launch(config, _worker)(fn, threads, device, args)
    return results[0]
