"""What every training stage shares (pretrain, SFT, GRPO, distill): device, seeding, rank-0 logging, the run
folder, the settings a resumed run must keep, and the wall clock with its progress bar."""

from __future__ import annotations

import dataclasses
import json
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from nanoseek.checkpoint.run import (
    latest_checkpoint,
    load_trainer_state,
    remove_stale_temp_dirs,
    resume_point,
    rng_state,
    set_rng_state,
)
from nanoseek.distributed.process_group import DistEnv, all_reduce, barrier
from nanoseek.io import atomic_write_text

# tqdm format for a wall-clock budget: "train:  40%|####  | 120/300 s of the time budget, loss=..." (tqdm's default
# rate for unit "s" would read "1.00s/s")
TIME_BAR = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} s of the time budget{postfix}"

# Peak dense FLOP/s for MFU. CPU: measured with fp32 matmuls on the 2-core dev machine. CUDA: bf16 dense
# tensor-core peak from the vendor sheets (H100/H200 SXM 989 TFLOP/s, A100 312); unknown GPUs use H100's.
CPU_PEAK_FLOPS = 205e9
GPU_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "L4": 121e12, "4090": 165e12}
DEFAULT_GPU_PEAK_FLOPS = 989e12


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def training_device(env: DistEnv, name: str) -> torch.device:
    """The device a process trains on: its rank's under torchrun, else `name` (auto: cuda when available)."""
    return env.device if env.distributed else resolve_device(name)


def default_peak_flops(device: torch.device) -> float:
    if device.type != "cuda":
        return CPU_PEAK_FLOPS
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in GPU_PEAK_FLOPS.items() if k in name), DEFAULT_GPU_PEAK_FLOPS)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds CUDA too


def rank0_print(env: DistEnv) -> Callable[..., None]:
    """`print` on rank 0, a no-op on the others: one line per job, not one per process."""
    return print if env.is_main else (lambda *a, **k: None)


def start_run(run_dir: Path, run_args: dict[str, Any], env: DistEnv) -> None:
    """Create the run folder, drop half-written checkpoints of a killed run and record the run's arguments
    (rank 0); no rank goes on to save before the stale temp dirs are gone."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if env.is_main:
        remove_stale_temp_dirs(run_dir)
        atomic_write_text(run_dir / "args.json", json.dumps(run_args, indent=2) + "\n")
    barrier(env)


# ------------------------------------------------------------------------------------------------- resume
def per_process_batch(saved: dict[str, Any], world_size: int) -> dict[str, Any]:
    """Saved args with batch_size rescaled to world_size processes: the global batch (saved batch size x saved
    world size) stays, so the data order and the schedule continue exactly on another number of processes."""
    saved_world = int(saved.get("world_size", 1))
    if saved_world == world_size or "batch_size" not in saved:
        return saved
    global_batch = saved["batch_size"] * saved_world
    if global_batch % world_size:
        raise ValueError(
            f"the run's global batch is {global_batch} sequences ({saved_world} processes x {saved['batch_size']}): "
            f"it does not split over {world_size} processes; resume on a number of processes that divides it"
        )
    return {**saved, "batch_size": global_batch // world_size, "world_size": world_size}


def saved_run_args(out: str | Path, world_size: int = 1) -> dict[str, Any] | None:
    """The arguments the run in `out` was started with (None: no checkpoint yet), read without loading weights;
    batch_size per process for `world_size` processes."""
    if latest_checkpoint(out) is None:
        return None
    return per_process_batch(resume_point(out, resume=True)[1], world_size)


def resume_settings(given: dict[str, Any], saved: dict[str, Any] | None, overridable: frozenset[str]) -> dict:
    """The settings of a resumed run: each given one (not None), else the saved run's value.

    A given setting outside `overridable` that differs from the saved value is an error: a resume continues the
    run as it was started; a changed hyper-parameter needs a new run.
    """
    if saved is None:
        return {k: v for k, v in given.items() if v is not None}
    out = {}
    for name, value in given.items():
        if name in saved:
            if value is not None and value != saved[name] and name not in overridable:
                raise ValueError(
                    f"--{name.replace('_', '-')} {value!r} differs from the run's saved {saved[name]!r}: --resume "
                    "continues with the saved arguments; start a new run to change it"
                )
            out[name] = saved[name] if value is None else value
        elif value is not None:
            out[name] = value
    return out


def resumed_job(
    config: Any,
    settings: dict[str, Any],
    saved: dict[str, Any] | None,
    overridable: frozenset[str],
    world_size: int = 1,
) -> tuple[Any, dict[str, Any]]:
    """A job's dataclass `config` (TrainConfig, GRPOConfig; copied) and other `settings` (model, data, ...) for a
    run resumed from its `saved` args (None: a new run, both as given). None values take the saved ones (batch
    size per process for `world_size` processes); a given value that differs from the saved one is an error,
    except for the config's `overridable` fields."""
    if saved is None:
        return dataclasses.replace(config), settings
    saved = per_process_batch(saved, world_size)
    config = type(config)(**resume_settings(dataclasses.asdict(config), saved, overridable))
    return config, resume_settings(settings, saved, frozenset())


def restore_run(ckpt: str | Path, source: Any, key: str) -> tuple[int, float, dict[str, Any]]:
    """Continue a run from checkpoint `ckpt`: the RNG states and the cursor of `source` (the loader or prompt
    source, saved under `key`) come back. Returns (step, elapsed seconds, the trainer state: the optimizer's too)."""
    state = load_trainer_state(ckpt)
    source.load_state_dict(state[key])
    set_rng_state(state["rng"])
    return int(state["step"]), float(state["elapsed_s"]), state


def run_state(step: int, clock: Clock, key: str, source: Any, run_args: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint's trainer state holds besides the optimizer: step, elapsed time, the cursor of `source`
    (under `key`), the RNG states and the run's arguments."""
    return {"step": step, "elapsed_s": clock.elapsed(), key: source.state_dict(), "rng": rng_state(), "args": run_args}


def interrupted_hint(command: str, out: str | Path) -> str:
    """What to run after a Ctrl-C: the step in flight is lost, the last checkpoint is complete."""
    last = latest_checkpoint(out)
    if last is None:
        return "no checkpoint was written"
    return f"continue from {last.name} with `nanoseek {command} --out {out} --resume`"


# -------------------------------------------------------------------------------------------------- clock
class Clock:
    """A run's wall clock and its end: `steps` and/or `time_budget` seconds, whichever comes first.

    A resumed run continues from the checkpoint's elapsed time (the time between that save and the interruption
    is not counted). The clock is read once per step, by `agree()`, and `elapsed()` returns that reading until
    the next one: the step's logged time, its checkpoint and the decision that it is the last then agree (a
    later reading could end the run on a step whose record says the budget was not reached). Under torchrun
    every rank must read the same clock: the lr follows it and it decides which step is the last (ranks stopping
    at different steps would wait on each other forever), so `agree()` takes the maximum over ranks.
    """

    def __init__(
        self, steps: int | None, time_budget: float | None, elapsed0: float = 0.0, env: DistEnv | None = None
    ) -> None:
        self.steps, self.time_budget, self.elapsed0 = steps, time_budget, elapsed0
        self.env = env or DistEnv()
        self.t_start = time.perf_counter()
        self._agreed: float | None = None

    def _now(self) -> float:
        return self.elapsed0 + time.perf_counter() - self.t_start

    def elapsed(self) -> float:
        return self._now() if self._agreed is None else self._agreed

    def agree(self) -> None:
        if self.env.distributed and self.time_budget:
            self._agreed = all_reduce(torch.tensor([self._now()], dtype=torch.float64), self.env, op="max").item()
        else:
            self._agreed = self._now()

    def finished(self, step: int) -> bool:
        return (self.steps is not None and step >= self.steps) or (
            self.time_budget is not None and self.elapsed() >= self.time_budget
        )

    def progress(self, step: int) -> float:
        """Share of the run done once step `step` + 1 ends: what the lr schedule follows."""
        return self.elapsed() / self.time_budget if self.time_budget else (step + 1) / self.steps

    def bar(self, step: int, desc: str, disable: bool = False) -> tqdm:
        """Seconds of the budget ("120/300 s of the time budget") with a budget, else steps."""
        if self.time_budget:
            initial = int(min(self.elapsed(), self.time_budget))
            bar = tqdm(total=int(self.time_budget), initial=initial, unit="s", bar_format=TIME_BAR, disable=disable)
        else:
            bar = tqdm(total=self.steps, initial=step, unit="step", disable=disable)
        bar.set_description(desc)
        return bar

    def advance(self, bar: tqdm) -> None:
        """Move `bar` on by the step just done."""
        bar.update(1 if not self.time_budget else int(min(self.elapsed(), self.time_budget)) - bar.n)
