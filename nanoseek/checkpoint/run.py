"""Trainer checkpoints: `RUN/checkpoints/step_N/` = an HF model dir + tokenizer files + `trainer_state/`.

A checkpoint is written into a temp dir beside the others (`.tmp-step_N-*`) and renamed into place, so a
`step_N` dir is always complete: a run killed mid-save leaves a temp dir that is never picked and is
removed by the next run. The model is safetensors only; `trainer_state/state.pt` (our own file, loaded
with weights_only=True) holds the optimizer, step, elapsed time, RNG states, loader cursor and the args;
`trainer_state/state.json` repeats the small fields for people.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nanoseek.checkpoint.hf import write_model_files
from nanoseek.io import atomic_dir, atomic_path, atomic_write_text
from nanoseek.model import Transformer

CHECKPOINTS = "checkpoints"
STATE_DIR = "trainer_state"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_TMP_PREFIX = ".tmp-"


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Complete `step_N` checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = _STEP_DIR.match(d.name)
        if m and (d / STATE_DIR / "state.pt").is_file() and (d / "config.json").is_file():
            found.append((int(m.group(1)), d))
    return [d for _, d in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def remove_stale_temp_dirs(run_dir: str | Path) -> list[Path]:
    """Delete half-written checkpoint dirs left by a killed run (one trainer per run dir)."""
    root = Path(run_dir) / CHECKPOINTS
    stale = [d for d in root.iterdir() if d.name.startswith(_TMP_PREFIX)] if root.is_dir() else []
    for d in stale:
        shutil.rmtree(d, ignore_errors=True)
    return stale


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch CPU and CUDA generator states, as tensors and plain containers."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": keys.tolist(), "pos": pos, "has_gauss": has_gauss, "gauss": gauss},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    run_dir: str | Path,
    model: Transformer,
    state: dict[str, Any],
    tokenizer=None,
    keep_last: int = 3,
) -> Path:
    """Write `checkpoints/step_{state['step']}` atomically, then keep only the newest `keep_last` (<= 0: all).

    `state` must hold "step" and may hold tensors and plain containers (optimizer state_dict, RNG states,
    loader cursor, args); `tokenizer` (optional) must have `.save(dir)`.
    """
    final = Path(run_dir) / CHECKPOINTS / f"step_{state['step']}"
    with atomic_dir(final, prefix=f"{_TMP_PREFIX}{final.name}-") as tmp:
        write_model_files(model, tmp)
        if tokenizer is not None:
            tokenizer.save(tmp)
        _write_trainer_state(tmp / STATE_DIR, state)
    if keep_last > 0:
        for old in checkpoint_dirs(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _write_trainer_state(out: Path, state: dict[str, Any]) -> None:
    out.mkdir()
    with atomic_path(out / "state.pt") as tmp:
        torch.save(state, tmp)
    readable = {k: v for k, v in state.items() if isinstance(v, (int, float, str, bool, dict)) and k != "optimizer"}
    readable.pop("rng", None)
    atomic_write_text(out / "state.json", json.dumps(readable, indent=2, default=str) + "\n")


def load_trainer_state(checkpoint_dir: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The dict given to `save_checkpoint` (tensors on map_location)."""
    path = Path(checkpoint_dir) / STATE_DIR / "state.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint_dir} has no {STATE_DIR}/state.pt: it is not a trainer checkpoint")
    return torch.load(path, map_location=map_location, weights_only=True)


def resume_point(run_dir: str | Path, resume: bool) -> tuple[Path | None, dict[str, Any] | None]:
    """(latest checkpoint, the run's saved CLI args) for --resume; (None, None) for a fresh run, which must not
    overwrite a run dir that already holds checkpoints."""
    run_dir = Path(run_dir)
    if not resume:
        if checkpoint_dirs(run_dir):
            raise ValueError(
                f"{run_dir} already holds checkpoints: pass --resume to continue it, or choose another --out"
            )
        return None, None
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise FileNotFoundError(f"--resume: {run_dir} has no complete checkpoint; start without --resume")
    return ckpt, json.loads((ckpt / STATE_DIR / "state.json").read_text())["args"]


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """A model directory, or a run folder's latest complete checkpoint (named on stderr, so users know which)."""
    p = Path(path)
    if (p / "config.json").is_file():
        return p
    latest = latest_checkpoint(p)
    if latest is not None:
        print(f"nanoseek: using {latest}, the latest checkpoint of run {p}", file=sys.stderr)
        return latest
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist: pass a model directory or a run folder with checkpoints/")
    raise FileNotFoundError(f"{p} is neither a model directory (no config.json) nor a run folder with checkpoints")
