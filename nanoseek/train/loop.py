"""The training loop shared by pretraining and SFT (`train`): resume, wrap for data parallelism, schedule the lr,
step (step.py), evaluate, log, plot and checkpoint.

`train(cfg, model, loader, run_dir, ...)` takes any loader with `next_batch() -> (inputs, targets)`,
`state_dict()` and `load_state_dict()`, so SFT passes its own (targets -100 outside completions).

Resume is exact in --steps mode: the model (incl. the MoE bias buffer), optimizer state, RNG states, loader
cursor and step come back from the checkpoint, and the lr is a pure function of the step. With
--time-budget the schedule follows wall time: the elapsed time is saved in each checkpoint and a resumed
run continues the clock from there (the time between that save and the interruption is not counted),
so it finishes the same budget, but it is not bit-reproducible because step times vary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from nanoseek.checkpoint.dcp import (
    is_distributed_checkpoint,
    load_distributed_checkpoint,
    load_full_optimizer_state,
    save_distributed_checkpoint,
)
from nanoseek.checkpoint.hf import load_model
from nanoseek.checkpoint.run import latest_checkpoint, save_checkpoint
from nanoseek.config import ModelConfig
from nanoseek.distributed.data_parallel import Parallel
from nanoseek.distributed.process_group import DistEnv, all_reduce, barrier
from nanoseek.model import Transformer
from nanoseek.model.flops import flops_per_token
from nanoseek.model.transformer import IGNORE_INDEX
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.config import TrainConfig
from nanoseek.train.indexer_warmup import indexer_stage
from nanoseek.train.metrics import MetricsLogger, write_plots
from nanoseek.train.optim import build_optimizer, max_load_violation
from nanoseek.train.run import Clock, default_peak_flops, restore_run, run_state, start_run, training_device
from nanoseek.train.schedule import lr_at
from nanoseek.train.step import train_step


class Loader(Protocol):
    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


def set_aux_alpha(model: Transformer, alpha: float) -> None:
    """Override the sequence-wise balance loss weight (config and every MoE layer, which copied it)."""
    model.config = model.config.replace(aux_loss_alpha=alpha)
    for m in model.moe_layers():
        m.aux_loss_alpha = alpha


@torch.no_grad()
def evaluate(
    model: Transformer,
    loader: Loader,
    batches: int,
    autocast: contextlib.AbstractContextManager,
    env: DistEnv | None = None,
) -> float:
    """Mean next-token cross-entropy over `batches` batches (eval mode; MTP and aux loss not included); under
    torchrun each rank reads its own batches and the mean is over all ranks."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = torch.zeros((), device=device)
    for _ in range(batches):
        x, y = loader.next_batch()
        x, y = x.to(device), y.to(device)
        with autocast:
            logits = model(x)
        total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX)
    model.train(was_training)
    return all_reduce(total, env or DistEnv(), op="mean").item() / batches


def resumed_model(ckpt: Path, device: torch.device) -> Transformer:
    """The model of a checkpoint to resume: its weights, or for a distributed checkpoint a model of its config
    whose shards `train()` loads into the wrapped model."""
    if not is_distributed_checkpoint(ckpt):
        return load_model(ckpt, device=device, dtype=torch.float32)
    with torch.device(device):
        return Transformer(ModelConfig.from_json(ckpt))


def val_loaders(make: Callable[[], Loader], cfg: TrainConfig, log: Callable[..., None]) -> Callable[[], Loader] | None:
    """`make` (a fresh val loader per evaluation) when evaluation is on and it can build one, else None."""
    if cfg.eval_every <= 0:
        return None
    try:
        make()
    except ValueError as e:
        log(f"warning: no validation: {e}", file=sys.stderr)
        return None
    return make


def train(
    cfg: TrainConfig,
    model: Transformer,
    loader: Loader,
    run_dir: str | Path,
    tokenizer: Tokenizer | None = None,
    make_val_loader: Callable[[], Loader] | None = None,
    resume_from: str | Path | None = None,
    run_args: dict[str, Any] | None = None,
    env: DistEnv | None = None,
) -> dict[str, Any]:
    """Train `model` in place; metrics, plots and checkpoints go to run_dir. Returns a summary dict.

    resume_from: a checkpoint dir whose weights `model` already holds (a distributed checkpoint's are loaded
    here, into the wrapped model); the optimizer, step, elapsed time, RNG states and loader cursor are restored
    from its trainer_state. make_val_loader builds a fresh val loader for each evaluation (the same batches
    every time). run_args are stored with each checkpoint. env: the torchrun process group (None: one
    process); `loader` then serves this rank's batches, the model is wrapped per cfg.dp / cfg.ep, and rank 0
    alone logs and plots (checkpoints: rank 0, or every rank its shards when the model is sharded).
    Raises NonFiniteLoss (nothing saved for that step) when the loss or grad norm is NaN/inf.
    """
    cfg.validate()
    if cfg.seq_len > model.config.max_position_embeddings:
        raise ValueError(
            f"--seq-len {cfg.seq_len} exceeds max_position_embeddings {model.config.max_position_embeddings}"
        )
    env = env or DistEnv()
    run_dir = Path(run_dir)
    device = training_device(env, cfg.device)
    model.to(device).train()
    if cfg.aux_alpha is not None:
        set_aux_alpha(model, cfg.aux_alpha)
    indexer_stage(model, 0, cfg.indexer_warmup)  # before the wrappers and the optimizer: V4's indexers unfreeze
    ep = cfg.ep if env.distributed else 1
    par = Parallel(model, env, cfg.dp, mtp=cfg.mtp_weight > 0, ep=ep, indexer=cfg.indexer_warmup is not None)
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, optim=cfg.optim, replicas=par.replicas)
    step, elapsed0 = 0, 0.0
    if resume_from is not None:
        step, elapsed0, state = restore_run(resume_from, loader, "loader")
        if is_distributed_checkpoint(resume_from):  # weights and optimizer, resharded to this layout
            load_distributed_checkpoint(resume_from, model, optimizer)
        elif par.sharded:
            load_full_optimizer_state(model, optimizer, state["optimizer"])
        else:
            optimizer.load_state_dict(state["optimizer"])
    run_args = {**(run_args or {}), **dataclasses.asdict(cfg), "world_size": env.world_size}
    start_run(run_dir, run_args, env)

    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    compute_loss = torch.compile(par.compute_loss) if cfg.compile else par.compute_loss
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * env.world_size  # all ranks
    flops_tok = flops_per_token(model.config, cfg.seq_len)
    peak = (cfg.peak_flops or default_peak_flops(device)) * env.world_size
    logger = MetricsLogger(run_dir / "metrics.jsonl", keep_until_step=step) if env.is_main else None
    clock = Clock(cfg.steps, cfg.time_budget, elapsed0, env)
    first_step, train_time, last_saved = step, 0.0, step if resume_from is not None else -1
    first_loss = last_loss = val_loss = None

    def save() -> Path:
        state = run_state(step, clock, "loader", loader, run_args) | {"tokens": step * tokens_per_step}
        state["schedule"] = {"kind": cfg.schedule, "next_step": step, "progress": clock.progress(step)}
        if par.sharded:  # every rank writes its shards
            return save_distributed_checkpoint(run_dir, model, optimizer, state, env, tokenizer, cfg.keep_last)
        if env.is_main:  # one process or DDP: rank 0 holds the whole model and optimizer state
            save_checkpoint(run_dir, model, {**state, "optimizer": optimizer.state_dict()}, tokenizer, cfg.keep_last)
        barrier(env)
        return run_dir / "checkpoints" / f"step_{step}"

    bar = clock.bar(step, "train", disable=not env.is_main)
    try:
        clock.agree()
        while not clock.finished(step):
            t0 = time.perf_counter()
            progress = clock.progress(step)
            lr = lr_at(step, progress, cfg.lr, cfg.schedule, cfg.warmup, cfg.min_lr_ratio, cfg.decay_frac)
            for group in optimizer.param_groups:
                group["lr"] = lr
            result = train_step(cfg, model, par, optimizer, loader, compute_loss, autocast, step, env, run_dir)
            main, mtp, aux, index_loss, loads = result.main, result.mtp, result.aux, result.indexer, result.loads
            step += 1
            clock.agree()
            dt = time.perf_counter() - t0
            train_time += dt
            tokens_per_s = tokens_per_step / dt
            first_loss = main if first_loss is None else first_loss
            last_loss = main

            is_eval = make_val_loader is not None and cfg.eval_every > 0 and step % cfg.eval_every == 0
            if is_eval:
                val_loader = make_val_loader()
                n = min(cfg.eval_batches, getattr(val_loader, "batches_per_epoch", cfg.eval_batches))
                val_loss = evaluate(model, val_loader, n, autocast, env)
            if logger is not None and (step % cfg.log_every == 0 or is_eval or clock.finished(step)):
                record = dict(step=step, loss=main, mtp_loss=mtp, aux_loss=aux, lr=lr, grad_norm=result.grad_norm)
                if cfg.indexer_warmup is not None:
                    record |= {"indexer_loss": index_loss, "indexer_grad_norm": result.indexer_grad_norm}
                record |= {"tokens_per_s": tokens_per_s, "mfu": flops_tok * tokens_per_s / peak}
                record["max_load_violation"] = max_load_violation(loads) if loads is not None and loads.numel() else []
                record |= {"tokens": step * tokens_per_step, "elapsed_s": clock.elapsed()}
                logger.log(record | ({"val_loss": val_loss} if is_eval else {}))
            if is_eval and env.is_main:  # tqdm.write prints even with the bar disabled
                bar.write(f"step {step}: loss {main:.4f}, val {val_loss:.4f}, lr {lr:.2e}, {tokens_per_s:,.0f} tok/s")
            bar.set_postfix(loss=f"{main:.4f}", tok_s=f"{tokens_per_s:,.0f}", step=step, refresh=False)
            clock.advance(bar)
            if cfg.save_every > 0 and step % cfg.save_every == 0 and not clock.finished(step):
                save()
                last_saved = step
        if step != last_saved:
            save()
            last_saved = step
    finally:  # plots on success and on a non-finite loss alike
        bar.close()
        if logger is not None:
            logger.close()
            write_plots(run_dir)

    steps_done = step - first_step
    summary = {
        "step": step,
        "steps_this_session": steps_done,
        "tokens": step * tokens_per_step,
        "elapsed_s": clock.elapsed(),
        "tokens_per_s": steps_done * tokens_per_step / train_time if train_time else 0.0,
        "first_loss": first_loss,
        "last_loss": last_loss,
        "val_loss": val_loss,
        "checkpoint": str(latest_checkpoint(run_dir)),
        "run_dir": str(run_dir),
    }
    summary["mfu"] = flops_tok * summary["tokens_per_s"] / peak
    return summary
