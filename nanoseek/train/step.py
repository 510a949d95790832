"""One optimizer step of the training loop (loop.py), the same for pretraining and SFT.

For each of grad_accum micro-batches: forward with MTP (`compute_loss`), backward total(mtp_weight) / grad_accum
and sum the expert loads; then reduce what the wrappers did not, clip the gradient norm (the lightning indexers'
separately when they are trained: their KL loss is detached from the LM loss), refuse a non-finite loss or norm,
step the optimizer (AdamW or Muon) and the aux-loss-free bias update from the summed loads. In the indexer
warm-up (indexer_warmup.py) only the indexers learn.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from nanoseek.checkpoint.run import latest_checkpoint
from nanoseek.distributed.data_parallel import Parallel
from nanoseek.distributed.process_group import DistEnv, all_reduce
from nanoseek.model import Transformer
from nanoseek.model.transformer import Losses
from nanoseek.train.config import TrainConfig
from nanoseek.train.indexer_warmup import indexer_stage, keep_only_indexer_grads, split_indexer_parameters
from nanoseek.train.optim import expert_bias_step


class Batches(Protocol):
    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]: ...


class NonFiniteLoss(RuntimeError):
    """The loss or gradient norm became NaN/inf; the step was not applied and nothing was saved."""


@dataclass
class StepResult:
    """A step's losses (averaged over micro-batches and ranks), gradient norms before clipping, and expert loads."""

    main: float
    mtp: float
    aux: float
    indexer: float  # 0 unless the indexers are trained
    grad_norm: float  # the language model's (every parameter's when the indexers are not trained)
    indexer_grad_norm: float  # 0 unless the indexers are trained
    loads: torch.Tensor | None  # [n_moe_layers, E], summed over micro-batches and ranks


def train_step(
    cfg: TrainConfig,
    model: Transformer,
    par: Parallel,
    optimizer: torch.optim.Optimizer,
    loader: Batches,
    compute_loss: Callable[..., Losses],
    autocast: contextlib.AbstractContextManager,
    step: int,
    env: DistEnv,
    run_dir: Path,
) -> StepResult:
    """Optimizer step number step + 1 (the lr is already set). Raises NonFiniteLoss, naming the last good
    checkpoint in run_dir, before anything is applied when the loss or a gradient norm is NaN/inf."""
    device = next(model.parameters()).device
    warmup_stage = indexer_stage(model, step, cfg.indexer_warmup)  # True: only the indexer learns
    sums = torch.zeros(4, device=device)  # main, mtp, aux, indexer (averaged over micro-batches)
    loads = None
    for micro in range(cfg.grad_accum):
        x, y = loader.next_batch()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with par.accumulate(last=micro == cfg.grad_accum - 1):  # one gradient sync per step
            with autocast:
                losses = compute_loss(x, y, mtp=cfg.mtp_weight > 0)
            (losses.total(cfg.mtp_weight) / cfg.grad_accum).backward()
        index_loss = losses.main.new_zeros(()) if losses.indexer is None else losses.indexer
        sums += torch.stack([losses.main, losses.mtp, losses.aux, index_loss]).detach().float() / cfg.grad_accum
        step_loads = model.expert_loads()
        loads = step_loads if loads is None else loads + step_loads
    if loads is not None:  # the same counts, hence the same bias update, on every rank
        loads = all_reduce(loads, env)
    par.reduce_gradients()
    if warmup_stage:
        keep_only_indexer_grads(model)
    gnorm, index_gnorm = clip_gradients(par, model, cfg.clip, cfg.indexer_warmup is not None)
    main, mtp, aux, index_loss = all_reduce(sums, env, op="mean").tolist()
    total = main + cfg.mtp_weight * mtp + aux + index_loss
    if not (math.isfinite(total) and math.isfinite(gnorm) and math.isfinite(index_gnorm)):
        good = latest_checkpoint(run_dir)
        raise NonFiniteLoss(
            f"step {step + 1}: non-finite {'loss' if not math.isfinite(total) else 'gradient norm'} "
            f"(loss {main}, mtp {mtp}, aux {aux}, grad norm {gnorm}); stopped without applying or saving "
            f"this step. Last good checkpoint: {good or 'none'}"
            + (" (continue with --resume, e.g. after lowering --lr)" if good else "")
        )
    optimizer.step()
    expert_bias_step(model, loads, 0.0 if warmup_stage else cfg.bias_gamma)
    optimizer.zero_grad(set_to_none=True)
    return StepResult(main, mtp, aux, index_loss, gnorm, index_gnorm, loads)


def clip_gradients(par: Parallel, model: Transformer, max_norm: float, indexer: bool) -> tuple[float, float]:
    """(LM norm, indexer norm) before clipping; with indexer training each group is clipped by its own norm."""
    if not indexer:
        return par.clip_grad_norm(max_norm), 0.0
    lm_params, indexer_params = split_indexer_parameters(model)
    return par.clip_grad_norm(max_norm, lm_params), par.clip_grad_norm(max_norm, indexer_params)
