"""Pretraining (`nanoseek train`) and the training loop it shares with SFT: step, evaluate, log, checkpoint, resume.

One optimizer step: for each of grad_accum micro-batches, forward with MTP (`compute_loss`), backward
total(mtp_weight) / grad_accum and sum the expert loads; then clip the grad norm (the indexers' separately when
they are trained), set the scheduled lr,
AdamW (or Muon) step, aux-loss-free bias update from the summed loads, zero grads. bf16 autocast on CUDA, fp32
on CPU. V3.2 (and V4's CSA layers) with --indexer-warmup N: the indexer's KL loss joins the total; the first N
steps update the indexer alone, over dense attention (optim.indexer_stage).

`train(cfg, model, loader, run_dir, ...)` takes any loader with `next_batch() -> (inputs, targets)`,
`state_dict()` and `load_state_dict()`, so SFT passes its own (targets -100 outside completions).
`run_pretrain(PretrainJob)` is the stage: it builds (or resumes) the model and the token loaders, then calls it.

Resume is exact in --steps mode: the model (incl. the MoE bias buffer), optimizer state, RNG states, loader
cursor and step come back from the checkpoint, and the lr is a pure function of the step. With
--time-budget the schedule follows wall time: the elapsed time is saved in each checkpoint and a resumed
run continues the clock from there (the time between that save and the interruption is not counted),
so it finishes the same budget, but it is not bit-reproducible because step times vary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
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
from nanoseek.checkpoint.run import latest_checkpoint, resolve_model_dir, resume_point, save_checkpoint
from nanoseek.config import ModelConfig
from nanoseek.data.shards import TokenLoader, find_tokenizer, load_manifest
from nanoseek.distributed.data_parallel import DP_MODES, Parallel
from nanoseek.distributed.process_group import DistEnv, all_reduce, barrier
from nanoseek.model import Transformer
from nanoseek.model.flops import flops_per_token
from nanoseek.model.transformer import IGNORE_INDEX
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.metrics import MetricsLogger, write_plots
from nanoseek.train.optim import (
    OPTIMIZERS,
    build_optimizer,
    expert_bias_step,
    indexer_stage,
    keep_only_indexer_grads,
    max_load_violation,
    split_indexer_parameters,
)
from nanoseek.train.run import (
    Clock,
    default_peak_flops,
    rank0_print,
    restore_run,
    resumed_job,
    run_state,
    seed_everything,
    start_run,
    training_device,
)
from nanoseek.train.schedule import SCHEDULES, lr_at

# Settings a resume may change; every other one must match the run's saved arguments.
RESUME_OVERRIDABLE = frozenset(
    {"steps", "time_budget", "save_every", "keep_last", "eval_every", "eval_batches", "log_every", "compile"}
    | {"device", "peak_flops", "data", "tokenizer", "dp", "ep"}
)


class Loader(Protocol):
    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class NonFiniteLoss(RuntimeError):
    """The loss or gradient norm became NaN/inf; the step was not applied and nothing was saved."""


@dataclass
class TrainConfig:
    """Hyper-parameters of one run (defaults: the 2-core CPU recipe of shared/cpu-feasibility.md)."""

    steps: int | None = None  # optimizer steps; with time_budget as well, whichever ends first
    time_budget: float | None = None  # seconds of wall time; the lr schedule then follows elapsed time
    batch_size: int = 8  # sequences per micro-batch
    seq_len: int | None = 256  # None (SFT only): the longest example
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: int = 50  # steps
    schedule: str = "cosine"  # cosine | wsd
    decay_frac: float = 0.2  # wsd: share of the run spent decaying
    weight_decay: float = 0.1
    optim: str = "adamw"  # adamw | muon (Newton-Schulz orthogonalised momentum on hidden matrices)
    clip: float = 1.0  # max grad norm (0: no clipping)
    mtp_weight: float = 0.3
    bias_gamma: float = 1e-3  # aux-loss-free bias update speed
    aux_alpha: float | None = None  # sequence-wise balance loss weight (None: the model config's)
    indexer_warmup: int | None = None  # V3.2 / V4 CSA: train the indexer by KL, after this many dense warm-up steps
    seed: int = 0
    save_every: int = 1000  # steps (0: only at the end)
    keep_last: int = 3
    eval_every: int = 200  # steps (0: never)
    eval_batches: int = 10
    log_every: int = 1
    compile: bool = False
    device: str = "auto"  # auto | cpu | cuda
    peak_flops: float | None = None  # for MFU; None: by device
    dp: str = "ddp"  # data parallel under torchrun: ddp | fsdp (ignored in one process)
    ep: int = 1  # expert parallel degree under torchrun (routed experts split over ep processes)

    def validate(self) -> None:
        if self.steps is None and self.time_budget is None:
            raise ValueError("say how long to train: pass --steps N and/or --time-budget SECONDS")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {self.steps}")
        if self.time_budget is not None and self.time_budget <= 0:
            raise ValueError(f"--time-budget must be > 0 seconds, got {self.time_budget}")
        if self.seq_len is None:
            raise ValueError("pass --seq-len N (tokens per sequence)")
        for name in ("batch_size", "seq_len", "grad_accum", "log_every", "eval_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.optim not in OPTIMIZERS:
            raise ValueError(f"--optim must be one of {', '.join(OPTIMIZERS)}, got {self.optim!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"--device must be cpu, cuda or auto, got {self.device!r}")
        if self.indexer_warmup is not None and self.indexer_warmup < 0:
            raise ValueError(f"--indexer-warmup must be >= 0 steps, got {self.indexer_warmup}")
        if self.ep < 1:
            raise ValueError(f"--ep must be >= 1, got {self.ep}")
        if self.dp not in DP_MODES:
            raise ValueError(f"--dp must be one of {', '.join(DP_MODES)}, got {self.dp!r}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("--device cuda but no CUDA device is available: use --device cpu")


# ----------------------------------------------------------------------------------------------- helpers
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


# -------------------------------------------------------------------------------------------- the loop
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
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, optim=cfg.optim)
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
            if cfg.indexer_warmup is None:
                gnorm, index_gnorm = par.clip_grad_norm(cfg.clip), 0.0
            else:  # two objectives: the LM loss and the indexer's detached KL loss, each clipped by its own norm
                lm_params, indexer_params = split_indexer_parameters(model)
                gnorm, index_gnorm = (
                    par.clip_grad_norm(cfg.clip, lm_params),
                    par.clip_grad_norm(cfg.clip, indexer_params),
                )
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
                record = dict(step=step, loss=main, mtp_loss=mtp, aux_loss=aux, lr=lr, grad_norm=gnorm)
                if cfg.indexer_warmup is not None:
                    record |= {"indexer_loss": index_loss, "indexer_grad_norm": index_gnorm}
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


# --------------------------------------------------------------------------------------------- the stage
@dataclass
class PretrainJob:
    """One pretraining run: a new model (preset + overrides) or one to continue (init_from), on token shards
    from `nanoseek prepare`, into the run folder `out`; resume continues the run in `out`."""

    out: str
    data: str | None = None  # on resume: the run's
    preset: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields over the preset's
    init_from: str | None = None  # a model dir or run folder (fresh optimizer)
    tokenizer: str | None = None  # where the data's tokenizer is, if the manifest's path is not reachable
    resume: bool = False
    train: TrainConfig = field(default_factory=TrainConfig)


def run_pretrain(job: PretrainJob, env: DistEnv | None = None) -> dict[str, Any]:
    """Run (or resume) a pretraining job: build the model and the token loaders, then `train()`. Returns its
    summary. env: the torchrun process group (None: one process). Raises ValueError for bad settings, and lets
    NonFiniteLoss and KeyboardInterrupt through (the last checkpoint is complete)."""
    env = env or DistEnv()
    log = rank0_print(env)
    run_dir = Path(job.out)
    ckpt, saved = resume_point(run_dir, job.resume)
    if saved is not None and job.overrides:
        raise ValueError("--set changes a new model's config; a resumed run keeps its checkpoint's config")
    model_args = {"preset": job.preset, "overrides": job.overrides or None, "init_from": job.init_from}
    cfg, model_args = resumed_job(job.train, model_args, saved, RESUME_OVERRIDABLE, env.world_size)
    cfg.validate()
    if cfg.ep > 1 and not env.distributed and cfg.ep != (saved or {}).get("ep"):  # a resume may run all experts
        raise ValueError(f"--ep {cfg.ep} needs several processes: launch with torchrun --nproc-per-node N")
    if fixed := sorted({"vocab_size", "bos_token_id", "eos_token_id"} & set(job.overrides)):
        raise ValueError(f"--set {', '.join(fixed)}: decided by the data's tokenizer, not settable")
    data = job.data or (saved or {}).get("data")
    if not data:
        raise ValueError("pass --data DATA_DIR (a directory made by `nanoseek prepare`)")
    data = Path(data).resolve()
    manifest = load_manifest(data)
    device = training_device(env, cfg.device)
    if ckpt is None:
        seed_everything(cfg.seed)
    model, tokenizer, init_from = _model_and_tokenizer(job, ckpt, data, manifest, device)
    if ckpt is not None:
        log(f"resuming {run_dir} from {ckpt.name}")

    shard = dict(rank=env.rank, world_size=env.world_size, seed=cfg.seed)  # each rank its own windows
    loader = TokenLoader(data, "train", cfg.batch_size, cfg.seq_len, **shard)
    make_val = val_loaders(lambda: TokenLoader(data, "val", cfg.batch_size, cfg.seq_len, **shard), cfg, log)
    layout = cfg.dp + (f" + ep {cfg.ep}" if cfg.ep > 1 else "")
    procs = f", {env.world_size} processes ({layout})" if env.distributed else ""
    log(
        f"model: {model.num_parameters(include_mtp=True) / 1e6:.2f}M params "
        f"({model.num_parameters(activated=True) / 1e6:.2f}M activated, main), vocab {model.config.vocab_size}, "
        f"device {device}{procs}; data {data}"
    )
    run_args = {"preset": model_args.get("preset"), "overrides": model_args.get("overrides") or {}}
    run_args["init_from"] = init_from or model_args.get("init_from")  # resolved: a run folder's checkpoint
    run_args |= {"data": str(data), "tokenizer": job.tokenizer, "out": str(run_dir)}
    return train(cfg, model, loader, run_dir, tokenizer, make_val, resume_from=ckpt, run_args=run_args, env=env)


def _model_and_tokenizer(
    job: PretrainJob, ckpt: Path | None, data: Path, manifest: dict, device: torch.device
) -> tuple[Transformer, Tokenizer, str | None]:
    """(model, the data's tokenizer, the resolved init_from) for a resumed run, a continued model or a preset."""
    if ckpt is not None:
        if not (ckpt / "tokenizer.json").is_file():
            return resumed_model(ckpt, device), find_tokenizer(data, manifest, job.tokenizer), None
        tokenizer = Tokenizer.from_pretrained(ckpt)
        if tokenizer.hash() != manifest["tokenizer_hash"]:
            raise ValueError(f"{data} was prepared with a different tokenizer than the run in {job.out}")
        return resumed_model(ckpt, device), tokenizer, None
    tokenizer = find_tokenizer(data, manifest, job.tokenizer)
    if job.init_from:
        if job.preset or job.overrides:
            raise ValueError("pass --preset [--set KEY=VALUE] (new model) or --init-from MODEL_DIR, not both")
        init_from = resolve_model_dir(job.init_from)  # a run folder: its latest checkpoint
        model = load_model(init_from, device=device, dtype=torch.float32)
        if model.config.vocab_size < manifest["vocab_size"]:
            raise ValueError(
                f"{init_from} has vocab_size {model.config.vocab_size} but the data's tokenizer has "
                f"{manifest['vocab_size']} tokens: use data prepared with that model's tokenizer"
            )
        init_tok = init_from / "tokenizer.json"
        if init_tok.is_file() and Tokenizer.from_pretrained(init_tok).hash() != manifest["tokenizer_hash"]:
            raise ValueError(f"{data} was prepared with a different tokenizer than {init_from} has")
        return model, tokenizer, str(init_from)
    if not job.preset:
        raise ValueError("pass --preset NAME (e.g. cpu-small) or --init-from MODEL_DIR")
    config = ModelConfig.from_preset(
        job.preset,
        **job.overrides,
        vocab_size=manifest["vocab_size"],  # the data's tokenizer decides the vocabulary
        bos_token_id=manifest["bos_id"],
        eos_token_id=manifest["eos_id"],
    )
    with torch.device(device):
        return Transformer(config), tokenizer, None
