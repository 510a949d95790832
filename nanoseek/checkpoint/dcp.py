"""Distributed checkpoints (torch.distributed.checkpoint) and their export to one HF model dir.

A sharded run (FSDP2, expert parallel) never gathers the model on one rank to save it: every rank writes
its own shards of the model and AdamW state into `step_N/dcp/` (DCP records global shapes and offsets, so
any world size, one process included, can load it). Beside it rank 0 writes config.json, the tokenizer and
`trainer_state/` (step, loader cursor, RNG, args; no optimizer: that is in dcp/). The whole step_N dir is
written under a temp name and renamed by rank 0 after every rank finished, so a rank killed mid-save
leaves the previous checkpoint the latest complete one.

`nanoseek export --checkpoint CKPT --out DIR` turns either kind of checkpoint into an HF model dir.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)

from nanoseek.checkpoint.hf import load_model
from nanoseek.checkpoint.run import _TMP_PREFIX, CHECKPOINTS, STATE_DIR, _write_trainer_state, checkpoint_dirs
from nanoseek.config import ModelConfig
from nanoseek.distributed.process_group import DistEnv, barrier, broadcast_object
from nanoseek.io import replace_dir, temp_dir_beside
from nanoseek.model import Transformer
from nanoseek.tokenizer import Tokenizer

DCP_DIR = "dcp"


def is_distributed_checkpoint(checkpoint_dir: str | Path) -> bool:
    return (Path(checkpoint_dir) / DCP_DIR).is_dir()


def save_distributed_checkpoint(
    run_dir: str | Path,
    model: Transformer,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    env: DistEnv,
    tokenizer: Tokenizer | None = None,
    keep_last: int = 3,
) -> Path:
    """Collective: every rank calls it. Writes `checkpoints/step_{state['step']}` (dcp/ + config + trainer_state)."""
    final = Path(run_dir) / CHECKPOINTS / f"step_{state['step']}"
    tmp = None
    if env.is_main:
        tmp = temp_dir_beside(final, prefix=f"{_TMP_PREFIX}{final.name}-")
    tmp = Path(broadcast_object(str(tmp) if tmp else None, env))
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp / DCP_DIR)  # each rank its shards
    if env.is_main:
        model.config.save_json(tmp / "config.json")
        if tokenizer is not None:
            tokenizer.save(tmp)
        _write_trainer_state(tmp / STATE_DIR, {**state, "format": "dcp"})
    barrier(env)  # every rank's shards are on disk before the rename makes the checkpoint visible
    if env.is_main:
        replace_dir(tmp, final)
        if keep_last > 0:
            for old in checkpoint_dirs(run_dir)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    barrier(env)
    return final


def load_distributed_checkpoint(
    checkpoint_dir: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> None:
    """Load dcp/ into `model` (and `optimizer`), whatever the world size and layout now (plain, DDP'd or
    FSDP2-sharded model); in one process no process group is needed."""
    model_sd, optim_sd = get_state_dict(model, optimizer or [])
    state = {"model": model_sd} if optimizer is None else {"model": model_sd, "optim": optim_sd}
    no_dist = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    with warnings.catch_warnings():  # one process: DCP warns that it assumes so, which is the intent
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=Path(checkpoint_dir) / DCP_DIR, no_dist=no_dist)
    if optimizer is None:
        set_state_dict(model, [], model_state_dict=state["model"], optim_state_dict={})
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def load_full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """A one-process checkpoint's optimizer state_dict (indexed by parameter position) into the optimizer of a
    sharded model: rekeyed by parameter name, then each rank keeps its shards."""
    names = {p: n for n, p in model.named_parameters()}
    order = [names[p] for g in optimizer.param_groups for p in g["params"]]
    full = {
        "state": {order[int(i)]: v for i, v in saved["state"].items()},
        "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in saved["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, full, options=StateDictOptions(full_state_dict=True))


def model_from_checkpoint(checkpoint_dir: str | Path, device: torch.device | str = "cpu") -> Transformer:
    """The model of any trainer checkpoint: an HF dir's safetensors, or a distributed checkpoint's dcp/."""
    checkpoint_dir = Path(checkpoint_dir)
    if not is_distributed_checkpoint(checkpoint_dir):
        return load_model(checkpoint_dir, device=device, dtype=torch.float32)
    with torch.device(device):
        model = Transformer(ModelConfig.from_json(checkpoint_dir))
    load_distributed_checkpoint(checkpoint_dir, model)
    return model
