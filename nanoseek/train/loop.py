"""The training loop (`nanoseek train`), shared by pretraining and SFT: step, evaluate, log, checkpoint, resume.

One optimizer step: for each of grad_accum micro-batches, forward with MTP (`compute_loss`), backward
total(mtp_weight) / grad_accum and sum the expert loads; then clip the grad norm, set the scheduled lr,
AdamW step, aux-loss-free bias update from the summed loads, zero grads. bf16 autocast on CUDA, fp32 on CPU.

`train(cfg, model, loader, run_dir, ...)` takes any loader with `next_batch() -> (inputs, targets)`,
`state_dict()` and `load_state_dict()`, so SFT passes its own (targets -100 outside completions).

Resume is exact in --steps mode: the model (incl. the MoE bias buffer), AdamW state, RNG states, loader
cursor and step come back from the checkpoint, and the lr is a pure function of the step. With
--time-budget the schedule follows wall time: the elapsed time is saved in each checkpoint and a resumed
run continues the clock from there (the time between that save and the interruption is not counted),
so it finishes the same budget, but it is not bit-reproducible because step times vary.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from nanoseek.checkpoint import load_model, resolve_model_dir
from nanoseek.config import ModelConfig, atomic_write_text
from nanoseek.data.shards import TokenLoader, load_manifest
from nanoseek.distributed.checkpoint import (
    is_distributed_checkpoint,
    load_distributed_checkpoint,
    load_full_optimizer_state,
    save_distributed_checkpoint,
)
from nanoseek.distributed.data_parallel import DP_MODES, Parallel
from nanoseek.distributed.process_group import DistEnv, all_reduce, barrier, init_distributed, shutdown
from nanoseek.flops import flops_per_token
from nanoseek.model import Transformer
from nanoseek.model.transformer import IGNORE_INDEX
from nanoseek.report import MetricsLogger, plot_metrics
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.checkpointing import (
    latest_checkpoint,
    load_trainer_state,
    remove_stale_temp_dirs,
    resume_point,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from nanoseek.train.optim import build_optimizer, expert_bias_step, max_load_violation
from nanoseek.train.schedule import SCHEDULES, lr_at

# Peak dense FLOP/s for MFU. CPU: measured with fp32 matmuls on the 2-core dev machine. CUDA: bf16 dense
# tensor-core peak from the vendor sheets (H100/H200 SXM 989 TFLOP/s, A100 312); unknown GPUs use H100's.
CPU_PEAK_FLOPS = 205e9
GPU_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "L4": 121e12, "4090": 165e12}
DEFAULT_GPU_PEAK_FLOPS = 989e12

# Options a --resume may change; every other one must match the run's saved arguments.
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
    seq_len: int = 256
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: int = 50  # steps
    schedule: str = "cosine"  # cosine | wsd
    decay_frac: float = 0.2  # wsd: share of the run spent decaying
    weight_decay: float = 0.1
    clip: float = 1.0  # max grad norm (0: no clipping)
    mtp_weight: float = 0.3
    bias_gamma: float = 1e-3  # aux-loss-free bias update speed
    aux_alpha: float | None = None  # sequence-wise balance loss weight (None: the model config's)
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
        for name in ("batch_size", "seq_len", "grad_accum", "log_every", "eval_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"--device must be cpu, cuda or auto, got {self.device!r}")
        if self.ep < 1:
            raise ValueError(f"--ep must be >= 1, got {self.ep}")
        if self.dp not in DP_MODES:
            raise ValueError(f"--dp must be one of {', '.join(DP_MODES)}, got {self.dp!r}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("--device cuda but no CUDA device is available: use --device cpu")


# ----------------------------------------------------------------------------------------------- helpers
# tqdm format for a wall-clock budget: "train:  40%|####  | 120/300 s of the time budget, loss=..." (tqdm's default
# rate for unit "s" would read "1.00s/s")
TIME_BAR = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} s of the time budget{postfix}"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def default_peak_flops(device: torch.device) -> float:
    if device.type != "cuda":
        return CPU_PEAK_FLOPS
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in GPU_PEAK_FLOPS.items() if k in name), DEFAULT_GPU_PEAK_FLOPS)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds CUDA too


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
    env = env or DistEnv(device=resolve_device(cfg.device))
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = env.device if env.distributed else resolve_device(cfg.device)
    model.to(device).train()
    if cfg.aux_alpha is not None:
        set_aux_alpha(model, cfg.aux_alpha)
    par = Parallel(model, env, cfg.dp, mtp=cfg.mtp_weight > 0, ep=cfg.ep if env.distributed else 1)
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay)
    step, elapsed0 = 0, 0.0
    if resume_from is not None:
        state = load_trainer_state(resume_from)
        if is_distributed_checkpoint(resume_from):  # weights and optimizer, resharded to this layout
            load_distributed_checkpoint(resume_from, model, optimizer)
        elif par.sharded:
            load_full_optimizer_state(model, optimizer, state["optimizer"])
        else:
            optimizer.load_state_dict(state["optimizer"])
        loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"])
        step, elapsed0 = int(state["step"]), float(state["elapsed_s"])
    run_args = {**(run_args or {}), **dataclasses.asdict(cfg), "world_size": env.world_size}
    if env.is_main:
        remove_stale_temp_dirs(run_dir)
        atomic_write_text(run_dir / "args.json", json.dumps(run_args, indent=2) + "\n")
    barrier(env)  # no rank starts saving before stale temp dirs are gone

    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    compute_loss = torch.compile(par.compute_loss) if cfg.compile else par.compute_loss
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * env.world_size  # all ranks
    flops_tok = flops_per_token(model.config, cfg.seq_len)
    peak = (cfg.peak_flops or default_peak_flops(device)) * env.world_size
    logger = MetricsLogger(run_dir / "metrics.jsonl", keep_until_step=step) if env.is_main else None
    t_start = time.perf_counter()
    first_step, train_time, last_saved = step, 0.0, step if resume_from is not None else -1
    first_loss = last_loss = val_loss = None

    agreed: list[float] = []  # torchrun + --time-budget: the step's clock, the same on every rank

    def elapsed() -> float:
        return agreed[0] if agreed else elapsed0 + time.perf_counter() - t_start

    def agree_on_time() -> None:
        """Under torchrun with --time-budget every rank must read the same clock: the lr follows it and it decides
        which step is the last (ranks stopping at different steps would wait on each other forever)."""
        if env.distributed and cfg.time_budget:
            agreed.clear()
            now = torch.tensor([elapsed0 + time.perf_counter() - t_start], dtype=torch.float64)
            agreed.append(all_reduce(now, env, op="max").item())

    def finished() -> bool:
        return (cfg.steps is not None and step >= cfg.steps) or (
            cfg.time_budget is not None and elapsed() >= cfg.time_budget
        )

    def progress(at_step: int) -> float:
        return elapsed() / cfg.time_budget if cfg.time_budget else (at_step + 1) / cfg.steps

    def save() -> Path:
        state = {
            "step": step,
            "elapsed_s": elapsed(),
            "tokens": step * tokens_per_step,
            "loader": loader.state_dict(),
            "rng": rng_state(),
            "schedule": {"kind": cfg.schedule, "next_step": step, "progress": progress(step)},
            "args": run_args,
        }
        if par.sharded:  # every rank writes its shards
            return save_distributed_checkpoint(run_dir, model, optimizer, state, env, tokenizer, cfg.keep_last)
        if env.is_main:  # one process or DDP: rank 0 holds the whole model and optimizer state
            save_checkpoint(run_dir, model, {**state, "optimizer": optimizer.state_dict()}, tokenizer, cfg.keep_last)
        barrier(env)
        return run_dir / "checkpoints" / f"step_{step}"

    quiet = not env.is_main
    if cfg.time_budget:
        # a time bar: "120/300 s" of the budget (tqdm's default rate would read "1.00s/s")
        bar = tqdm(
            total=int(cfg.time_budget),
            initial=int(min(elapsed0, cfg.time_budget)),
            unit="s",
            bar_format=TIME_BAR,
            disable=quiet,
        )
    else:
        bar = tqdm(total=cfg.steps, initial=step, unit="step", disable=quiet)
    bar.set_description("train")
    try:
        agree_on_time()
        while not finished():
            t0 = time.perf_counter()
            lr = lr_at(step, progress(step), cfg.lr, cfg.schedule, cfg.warmup, cfg.min_lr_ratio, cfg.decay_frac)
            for group in optimizer.param_groups:
                group["lr"] = lr
            sums = torch.zeros(3, device=device)  # main, mtp, aux (averaged over micro-batches)
            loads = None
            for micro in range(cfg.grad_accum):
                x, y = loader.next_batch()
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with par.accumulate(last=micro == cfg.grad_accum - 1):  # one gradient sync per step
                    with autocast:
                        losses = compute_loss(x, y, mtp=cfg.mtp_weight > 0)
                    (losses.total(cfg.mtp_weight) / cfg.grad_accum).backward()
                sums += torch.stack([losses.main, losses.mtp, losses.aux]).detach().float() / cfg.grad_accum
                step_loads = model.expert_loads()
                loads = step_loads if loads is None else loads + step_loads
            if loads is not None:  # the same counts, hence the same bias update, on every rank
                loads = all_reduce(loads, env)
            par.reduce_gradients()
            gnorm = par.clip_grad_norm(cfg.clip)
            main, mtp, aux = all_reduce(sums, env, op="mean").tolist()
            total = main + cfg.mtp_weight * mtp + aux
            if not (math.isfinite(total) and math.isfinite(gnorm)):
                good = latest_checkpoint(run_dir)
                raise NonFiniteLoss(
                    f"step {step + 1}: non-finite {'loss' if not math.isfinite(total) else 'gradient norm'} "
                    f"(loss {main}, mtp {mtp}, aux {aux}, grad norm {gnorm}); stopped without applying or saving "
                    f"this step. Last good checkpoint: {good or 'none'}"
                    + (" (continue with --resume, e.g. after lowering --lr)" if good else "")
                )
            optimizer.step()
            expert_bias_step(model, loads, cfg.bias_gamma)
            optimizer.zero_grad(set_to_none=True)
            step += 1
            agree_on_time()
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
            if step % cfg.log_every == 0 or is_eval or finished():
                record = {
                    "step": step,
                    "loss": main,
                    "mtp_loss": mtp,
                    "aux_loss": aux,
                    "lr": lr,
                    "grad_norm": gnorm,
                    "tokens_per_s": tokens_per_s,
                    "mfu": flops_tok * tokens_per_s / peak,
                    "max_load_violation": max_load_violation(loads) if loads is not None and loads.numel() else [],
                    "tokens": step * tokens_per_step,
                    "elapsed_s": elapsed(),
                }
                if is_eval:
                    record["val_loss"] = val_loss
                if logger is not None:
                    logger.log(record)
            if is_eval and env.is_main:  # tqdm.write prints even with the bar disabled
                bar.write(f"step {step}: loss {main:.4f}, val {val_loss:.4f}, lr {lr:.2e}, {tokens_per_s:,.0f} tok/s")
            bar.set_postfix(loss=f"{main:.4f}", tok_s=f"{tokens_per_s:,.0f}", step=step, refresh=False)
            bar.update(1 if not cfg.time_budget else int(min(elapsed(), cfg.time_budget)) - bar.n)
            if cfg.save_every > 0 and step % cfg.save_every == 0 and not finished():
                save()
                last_saved = step
        if step != last_saved:
            save()
            last_saved = step
    except NonFiniteLoss:
        if env.is_main:
            _plot(run_dir)
        raise
    finally:
        bar.close()
        if logger is not None:
            logger.close()
    if env.is_main:
        _plot(run_dir)

    steps_done = step - first_step
    summary = {
        "step": step,
        "steps_this_session": steps_done,
        "tokens": step * tokens_per_step,
        "elapsed_s": elapsed(),
        "tokens_per_s": steps_done * tokens_per_step / train_time if train_time else 0.0,
        "first_loss": first_loss,
        "last_loss": last_loss,
        "val_loss": val_loss,
        "checkpoint": str(latest_checkpoint(run_dir)),
        "run_dir": str(run_dir),
    }
    summary["mfu"] = flops_tok * summary["tokens_per_s"] / peak
    return summary


def _plot(run_dir: Path) -> None:
    try:
        plot_metrics(run_dir / "metrics.jsonl", run_dir / "plots")
    except Exception as e:  # a plotting problem must not hide the run's result
        print(f"warning: could not write plots: {e}", file=sys.stderr)


def format_summary(s: dict[str, Any]) -> str:
    loss = f"loss {s['first_loss']:.4f} -> {s['last_loss']:.4f}" if s["last_loss"] is not None else "no new steps"
    val = f", val {s['val_loss']:.4f}" if s["val_loss"] is not None else ""
    return (
        f"done: step {s['step']} ({s['tokens']:,} tokens, {s['elapsed_s']:.1f} s), {loss}{val}, "
        f"{s['tokens_per_s']:,.0f} tokens/s, MFU {100 * s['mfu']:.2f}%; checkpoint {s['checkpoint']}"
        + (f"; metrics and plots in {s['run_dir']}" if s.get("run_dir") else "")
    )


# ------------------------------------------------------------------------------------------------- CLI
def add_train_options(p: argparse.ArgumentParser) -> None:
    """The options of TrainConfig (shared with SFT). Defaults are None here, so a --resume can tell which
    options were given; `train_config_from_args` fills in TrainConfig's defaults."""
    d = TrainConfig()
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, help="optimizer steps")
    g.add_argument("--time-budget", type=float, help="seconds of training; the lr schedule follows wall time")
    g.add_argument("--batch-size", type=int, help=f"sequences per micro-batch (default {d.batch_size})")
    g.add_argument("--seq-len", type=int, help=f"tokens per sequence (default {d.seq_len})")
    g.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default 1)")
    g.add_argument("--lr", type=float, help=f"peak learning rate (default {d.lr})")
    g.add_argument("--min-lr-ratio", type=float, help=f"final lr / peak lr (default {d.min_lr_ratio})")
    g.add_argument("--warmup", type=int, help=f"linear warmup steps (default {d.warmup})")
    g.add_argument("--schedule", choices=SCHEDULES, help="cosine (default) or wsd (warmup-stable-decay)")
    g.add_argument("--decay-frac", type=float, help=f"wsd: share of the run spent decaying (default {d.decay_frac})")
    g.add_argument("--weight-decay", type=float, help=f"AdamW weight decay on matrices (default {d.weight_decay})")
    g.add_argument("--clip", type=float, help=f"max gradient norm, 0 = off (default {d.clip})")
    g.add_argument("--mtp-weight", type=float, help=f"MTP loss weight lambda (default {d.mtp_weight})")
    g.add_argument("--bias-gamma", type=float, help=f"MoE bias update speed, 0 = off (default {d.bias_gamma})")
    g.add_argument("--aux-alpha", type=float, help="sequence-wise balance loss weight (default: model config's)")
    g.add_argument("--seed", type=int, help="seed for init and data order (default 0)")
    g.add_argument("--save-every", type=int, help=f"checkpoint every N steps, 0 = only at the end ({d.save_every})")
    g.add_argument("--keep-last", type=int, help=f"checkpoints to keep, 0 = all (default {d.keep_last})")
    g.add_argument("--eval-every", type=int, help=f"val loss every N steps, 0 = never (default {d.eval_every})")
    g.add_argument("--eval-batches", type=int, help=f"val batches per evaluation (default {d.eval_batches})")
    g.add_argument("--log-every", type=int, help="metrics.jsonl record every N steps (default 1)")
    g.add_argument("--compile", action="store_true", default=None, help="torch.compile the loss computation")
    g.add_argument("--device", help="cpu, cuda or auto (default)")
    g.add_argument("--peak-flops", type=float, help="peak FLOP/s for MFU (default: 205e9 on CPU, 989e12 on H100)")
    g.add_argument("--ep", type=int, help="under torchrun: split routed experts over this many processes (default 1)")
    g.add_argument(
        "--dp", choices=DP_MODES, help="under torchrun: ddp (default; replicated) or fsdp (FSDP2, sharded weights)"
    )


def train_config_from_args(
    args: argparse.Namespace, saved: dict[str, Any] | None = None, world_size: int = 1
) -> TrainConfig:
    """TrainConfig from parsed options: given options, else the saved run's (on resume), else the defaults.

    On resume an option outside RESUME_OVERRIDABLE that differs from the saved run is an error. --batch-size is
    per process: a run resumed on another number of processes keeps its global batch (saved batch size x saved
    world size), so the data order and the schedule continue exactly.
    """
    saved = _per_rank_batch(saved, world_size) if saved is not None else None
    values = {}
    for f in dataclasses.fields(TrainConfig):
        given = getattr(args, f.name, None)
        if saved is not None and f.name in saved:
            if given is not None and given != saved[f.name] and f.name not in RESUME_OVERRIDABLE:
                raise ValueError(
                    f"--{f.name.replace('_', '-')} {given} differs from the run's {saved[f.name]}: --resume continues "
                    "with the saved arguments; start a new run (e.g. --init-from a checkpoint) to change it"
                )
            values[f.name] = saved[f.name] if given is None else given
        elif given is not None:
            values[f.name] = given
    return TrainConfig(**values)


def _per_rank_batch(saved: dict[str, Any], world_size: int) -> dict[str, Any]:
    """The saved args with batch_size rescaled to world_size processes (same global batch)."""
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


def find_tokenizer(data_dir: Path, manifest: dict, path: str | Path | None = None) -> Tokenizer:
    """The tokenizer the data was prepared with: `path`, else the data dir, else the manifest's recorded path
    (as written, then relative to the data dir and to its parent); its hash must match the manifest's."""
    recorded = manifest.get("tokenizer")
    candidates = [Path(path)] if path else [data_dir]
    if not path and recorded:
        candidates += [Path(recorded), data_dir / recorded, data_dir.parent / recorded]
    for c in candidates:
        file = c / "tokenizer.json" if c.is_dir() else c
        if not file.is_file():
            continue
        tok = Tokenizer.from_pretrained(c)
        if tok.hash() == manifest.get("tokenizer_hash"):
            return tok
        if path:
            raise ValueError(f"tokenizer {path} is not the one {data_dir} was prepared with (hash differs)")
    raise FileNotFoundError(
        f"cannot find the tokenizer of {data_dir} (manifest records {recorded!r}): pass --tokenizer DIR "
        "so checkpoints carry it"
    )


def _cmd_train(args: argparse.Namespace) -> int:
    """`nanoseek train`, in one process or under torchrun (one call per rank)."""
    env = init_distributed(args.device or "auto")
    rc = 1
    try:
        rc = _train_command(args, env)
        return rc
    finally:
        shutdown(clean=rc == 0)


def _train_command(args: argparse.Namespace, env: DistEnv) -> int:
    log = print if env.is_main else (lambda *a, **k: None)
    run_dir = Path(args.out)
    ckpt, saved = resume_point(run_dir, args.resume)
    cfg = train_config_from_args(args, saved, env.world_size)
    cfg.validate()
    if (args.ep or 1) > 1 and not env.distributed:
        raise ValueError(f"--ep {args.ep} needs several processes: launch with torchrun --nproc-per-node N")
    overrides = ModelConfig.parse_overrides(args.set)
    fixed = {"vocab_size", "bos_token_id", "eos_token_id"} & set(overrides)
    if fixed:
        raise ValueError(f"--set {', '.join(sorted(fixed))}: decided by the data's tokenizer, not settable")
    if overrides and ckpt is not None:
        raise ValueError("--set changes a new model's config; a resumed run keeps its checkpoint's config")
    data = args.data or (saved or {}).get("data")
    if not data:
        raise ValueError("pass --data DATA_DIR (a directory made by `nanoseek prepare`)")
    data = Path(data).resolve()
    manifest = load_manifest(data)
    device = env.device if env.distributed else resolve_device(cfg.device)

    if ckpt is not None and is_distributed_checkpoint(ckpt):  # its weights are loaded by train()
        with torch.device(device):
            model = Transformer(ModelConfig.from_json(ckpt))
        tokenizer = Tokenizer.from_pretrained(ckpt)
        log(f"resuming {run_dir} from {ckpt.name} (distributed checkpoint)")
    elif ckpt is not None:
        model = load_model(ckpt, device=device)
        tokenizer = Tokenizer.from_pretrained(ckpt) if (ckpt / "tokenizer.json").is_file() else None
        if tokenizer is not None and tokenizer.hash() != manifest["tokenizer_hash"]:
            raise ValueError(f"{data} was prepared with a different tokenizer than the run in {run_dir}")
        if tokenizer is None:
            tokenizer = find_tokenizer(data, manifest, args.tokenizer)
        log(f"resuming {run_dir} from {ckpt.name}")
    else:
        tokenizer = find_tokenizer(data, manifest, args.tokenizer)
        seed_everything(cfg.seed)
        if args.init_from:
            if args.preset or args.set:
                raise ValueError("pass --preset [--set KEY=VALUE] (new model) or --init-from MODEL_DIR, not both")
            args.init_from = str(resolve_model_dir(args.init_from))  # a run folder: its latest checkpoint
            model = load_model(args.init_from, device=device, dtype=torch.float32)
            if model.config.vocab_size < manifest["vocab_size"]:
                raise ValueError(
                    f"{args.init_from} has vocab_size {model.config.vocab_size} but the data's tokenizer has "
                    f"{manifest['vocab_size']} tokens: use data prepared with that model's tokenizer"
                )
            init_tok = Path(args.init_from) / "tokenizer.json"
            if init_tok.is_file() and Tokenizer.from_pretrained(init_tok).hash() != manifest["tokenizer_hash"]:
                raise ValueError(f"{data} was prepared with a different tokenizer than {args.init_from} has")
        else:
            if not args.preset:
                raise ValueError("pass --preset NAME (e.g. cpu-small) or --init-from MODEL_DIR")
            config = ModelConfig.from_preset(
                args.preset,
                **overrides,
                vocab_size=manifest["vocab_size"],  # the data's tokenizer decides the vocabulary
                bos_token_id=manifest["bos_id"],
                eos_token_id=manifest["eos_id"],
            )
            with torch.device(device):
                model = Transformer(config)
    if cfg.seq_len > model.config.max_position_embeddings:
        raise ValueError(
            f"--seq-len {cfg.seq_len} exceeds the model's max_position_embeddings "
            f"{model.config.max_position_embeddings}"
        )

    shard = dict(rank=env.rank, world_size=env.world_size, seed=cfg.seed)  # each rank its own windows
    loader = TokenLoader(data, "train", cfg.batch_size, cfg.seq_len, **shard)
    make_val = None
    if cfg.eval_every > 0:
        try:
            TokenLoader(data, "val", cfg.batch_size, cfg.seq_len, **shard)
            make_val = lambda: TokenLoader(data, "val", cfg.batch_size, cfg.seq_len, **shard)  # noqa: E731
        except ValueError as e:
            log(f"warning: no validation: {e}", file=sys.stderr)
    n_params = model.num_parameters(include_mtp=True)
    layout = cfg.dp + (f" + ep {cfg.ep}" if cfg.ep > 1 else "")
    procs = f", {env.world_size} processes ({layout})" if env.distributed else ""
    log(
        f"model: {n_params / 1e6:.2f}M params ({model.num_parameters(activated=True) / 1e6:.2f}M activated, "
        f"main), vocab {model.config.vocab_size}, device {device}{procs}; data {data}"
    )
    run_args = {
        "preset": (saved or {}).get("preset", args.preset),
        "set": (saved or {}).get("set", args.set),
        "init_from": (saved or {}).get("init_from", args.init_from),
        "data": str(data),
        "tokenizer": args.tokenizer,
        "out": str(run_dir),
    }
    try:
        summary = train(cfg, model, loader, run_dir, tokenizer, make_val, resume_from=ckpt, run_args=run_args, env=env)
    except NonFiniteLoss as e:
        log(f"nanoseek train: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the step in flight is lost; the last checkpoint is complete
        last = latest_checkpoint(run_dir)
        hint = f"continue from {last.name} with `nanoseek train --out {run_dir} --resume`" if last else "no checkpoint"
        log(f"\nnanoseek train: interrupted; {hint}", file=sys.stderr)
        return 130
    log(format_summary(summary))
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="pretrain a model on token shards (resumable)")
    p.add_argument("--preset", help="model preset for a new model: tiny, cpu-small, gpu-small, ...")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a preset's config field, e.g. --set num_hidden_layers=12 (repeatable; config.json names)",
    )
    p.add_argument("--init-from", help="start from this HF model dir instead of a preset (fresh optimizer)")
    p.add_argument("--data", help="data dir from `nanoseek prepare` (on --resume: the run's)")
    p.add_argument("--tokenizer", help="tokenizer dir, if the manifest's recorded path is not reachable")
    p.add_argument("--out", required=True, help="run dir: metrics.jsonl, plots/, checkpoints/step_N/")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    add_train_options(p)
    p.set_defaults(func=_cmd_train)
