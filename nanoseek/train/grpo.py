"""GRPO with verifiable rewards (`nanoseek grpo`): Engine rollouts -> rewards -> group advantages -> clipped update.

One step (shared/grpo-recipe.md sec. 0 defaults, each overridable):
1. Rollouts: P prompts x G samples at temperature T from the Engine, which decodes with the policy's own
   weights (no copy) and prefills each prompt once for its G samples. Each sample has its own seed, derived
   from (seed, step, round, prompt, sample), so rollouts do not depend on batch make-up and resume is exact.
2. Rewards: the sum of reward functions `(prompt, completion, example) -> float` (default: task accuracy from
   the verifier, plus `--format-reward W` x format); truncated completions get 0 from them (Dr. GRPO: an answer
   that never ended is not an answer), plus an optional DAPO soft overlong penalty on the token length.
3. Advantages within each group: A_i = (r_i - mean) / std (unbiased std, as TRL and verl), or r_i - mean with
   --no-std-scaling (Dr. GRPO, recipe sec. 3.1). Groups with zero reward variance carry no signal and are
   skipped; --dynamic-sampling samples more prompts until P groups have signal (DAPO, recipe sec. 3.2).
4. Update: mu passes over the rollout batch, one AdamW step each. Per token, rho = pi / pi_old and
   loss = -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A) + beta k3, summed over all completion tokens of
   the batch and divided by their number (DAPO token-level aggregation, recipe sec. 3.2). k3 = exp(r - l) - (r - l)
   - 1 against a frozen reference (DeepSeekMath eq. 4); with beta = 0 (default) no reference is kept.

Log-probs: log_softmax(logits / T), the distribution the sampler drew from (no top-p/top-k: truncation would
need the truncated distribution, recipe sec. 7.3). The policy forward runs in eval mode like the rollouts
(nothing in our model is stochastic; eval mode only skips the unused balance loss), and pi_old is the first
pass's own forward, detached, so rho is exactly 1 on the first pass. The engine's sampled-token log-probs
are compared with it each step (`logp_mismatch_max`: absorbed vs expanded MLA, recipe sec. 7.3).

Under torchrun (DDP): every rank samples its own prompt groups (rank r takes slice r of each draw of
P x world prompts, so the prompt cursor is the same on every rank), scores them and computes advantages within
its groups; the token-level loss is normalised by the completion tokens of all ranks, so the averaged gradient
equals one process's over the union of the rollouts. Rank 0 alone evaluates, logs and saves.

MoE: the aux-loss-free bias update is off by default (--bias-gamma 0): changing the bias changes routing,
so the policy being updated would drift from the one that produced the rollouts. The MTP head is not trained.

Here: the config, the update, the loop and the stage (`run_grpo`); rollouts.py samples, scores and evaluates;
grpo_loss.py holds the tensor maths (advantages, log-probs, the clipped loss).
"""

from __future__ import annotations

import copy
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from nanoseek.checkpoint.hf import load_model
from nanoseek.checkpoint.run import (
    latest_checkpoint,
    resolve_model_dir,
    resume_point,
    save_checkpoint,
)
from nanoseek.distributed.data_parallel import Parallel
from nanoseek.distributed.process_group import DistEnv, all_reduce, any_rank, barrier
from nanoseek.infer.engine import Engine
from nanoseek.model import Transformer
from nanoseek.tasks.rewards import RewardFn, accuracy_reward, format_reward, scaled
from nanoseek.tasks.sources import ListPrompts, TaskPrompts, read_prompt_file, task_eval_examples
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.grpo_loss import group_advantages, grpo_loss, pad_batch, token_logprobs
from nanoseek.train.metrics import MetricsLogger, plot_grpo, write_plots
from nanoseek.train.optim import build_optimizer, expert_bias_step
from nanoseek.train.rollouts import Rollout, evaluate_policy, rollout_metrics, sample_groups, score
from nanoseek.train.run import (
    Clock,
    rank0_print,
    restore_run,
    resumed_job,
    run_state,
    seed_everything,
    start_run,
    training_device,
)
from nanoseek.train.schedule import warmup_factor

# ================================================================================================== config
# Settings a resume may change; the others must match the run's saved arguments.
RESUME_OVERRIDABLE = frozenset(
    {"steps", "time_budget", "save_every", "keep_last", "eval_every", "eval_n", "log_every", "device"}
)


@dataclass
class GRPOConfig:
    """GRPO hyper-parameters (defaults: grpo-recipe.md sec. 0 and the cpu-small runs of cpu-feasibility.md)."""

    steps: int | None = None
    time_budget: float | None = None  # seconds
    prompts_per_step: int = 16
    group_size: int = 8
    temperature: float = 1.0
    max_new_tokens: int = 64
    lr: float = 3e-5
    warmup: int = 10  # steps, then constant (DAPO)
    weight_decay: float = 0.0
    optim: str = "adamw"  # adamw | muon
    max_grad_norm: float = 1.0
    beta: float = 0.0  # KL coefficient; 0 => no reference model
    clip_low: float = 0.2
    clip_high: float = 0.28
    mu: int = 1  # optimisation passes per rollout batch
    std_scaling: bool = True  # False => Dr. GRPO advantages
    dynamic_sampling: bool = False
    max_rounds: int = 4  # dynamic sampling: rollout rounds per step at most
    format_reward: float = 0.0  # weight of the format reward
    zero_truncated: bool = True  # truncated completions get 0 from reward_fns (Dr. GRPO, recipe sec. 0.6)
    length_penalty: list[int] | None = None  # [max_len, cache] in tokens: DAPO soft overlong penalty
    bias_gamma: float = 0.0  # MoE bias update during GRPO (off: keep routing as in the rollouts)
    micro_batch: int = 64  # sequences per forward/backward
    eval_every: int = 50  # steps (0: never)
    eval_n: int = 200
    seed: int = 0
    save_every: int = 100  # steps (0: only at the end)
    keep_last: int = 3
    log_every: int = 1
    device: str = "auto"

    def validate(self) -> None:
        if self.steps is None and self.time_budget is None:
            raise ValueError("say how long to train: pass --steps N and/or --time-budget SECONDS")
        for name in ("prompts_per_step", "group_size", "max_new_tokens", "mu", "micro_batch", "max_rounds"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ValueError("--temperature must be > 0: GRPO needs sampled, diverse rollouts")
        if not (0 <= self.clip_low < 1 and self.clip_high >= 0 and self.beta >= 0):
            raise ValueError("need 0 <= --clip-low < 1, --clip-high >= 0 and --beta >= 0")
        if self.length_penalty is not None:
            max_len, cache = self.length_penalty
            if not 0 < cache <= max_len:
                raise ValueError("--length-penalty MAX CACHE needs 0 < CACHE <= MAX")


# ================================================================================================== update
def policy_update(
    model: Transformer,
    optimizer: torch.optim.Optimizer,
    rollouts: list[Rollout],
    advantages: list[float],
    cfg: GRPOConfig,
    pad_id: int,
    ref_model: Transformer | None = None,
    par: Parallel | None = None,
) -> dict[str, float]:
    """mu passes of the clipped GRPO update over `rollouts` (one optimizer step per pass). Returns metrics;
    `first_pass_ratio_dev` is max |rho - 1| on the first pass (exactly 0: pi_old is that pass's forward).

    par: the DDP-wrapped policy under torchrun (None: one process). Every rank must call this, with or without
    rollouts of its own: gradients are averaged and the metrics summed over all ranks.
    """
    par = par or Parallel(model, DistEnv())
    env = par.env
    device = next(model.parameters()).device
    model.eval()  # the mode the rollouts ran in (section note in the module docstring)
    order = sorted(range(len(rollouts)), key=lambda i: len(rollouts[i].completion_ids))  # less padding
    chunks = [order[i : i + cfg.micro_batch] for i in range(0, len(order), cfg.micro_batch)]
    batches = []
    for chunk in chunks:
        ids, mask = pad_batch([rollouts[i] for i in chunk], pad_id)
        batches.append((ids.to(device), mask.to(device), torch.tensor([advantages[i] for i in chunk], device=device)))
    n_tokens = float(all_reduce(torch.tensor(float(sum(m.sum() for _, m, _ in batches))), env).item())
    # DDP averages over ranks: normalising each rank's token sum by (all tokens / ranks) makes the averaged
    # gradient that of the token-level loss over every rank's rollouts
    norm = n_tokens / env.world_size
    dummy = not batches  # a rank without rollouts still joins every gradient all-reduce, with a zero loss
    if dummy:
        ids = torch.full((1, 2), pad_id, device=device)
        batches, chunks = [(ids, torch.zeros(1, 1, device=device), torch.zeros(1, device=device))], [[]]
    old: list[Tensor] = []
    ref: list[Tensor | None] = []
    totals: dict[str, float] = {"clip_low": 0.0, "clip_high": 0.0, "kl": 0.0, "entropy": 0.0, "loss": 0.0}
    first_dev, mismatch, grad_norm = 0.0, [], 0.0
    for p in range(cfg.mu):
        loads = None
        for k, (ids, mask, adv) in enumerate(batches):
            with par.accumulate(last=k == len(batches) - 1):  # one gradient all-reduce per pass
                loss, st, logp, entropy = _micro_step(par, ref_model, ids, mask, adv, k, p, old, ref, cfg, norm)
            if p == 0:
                totals["entropy"] += float((entropy * mask).sum())
                first_dev = max(first_dev, float(st["ratio_dev"]))
                mismatch += _logp_mismatch([rollouts[i] for i in chunks[k]], logp.detach(), mask)
            if p == cfg.mu - 1:  # report the last pass: clipping only happens once rollouts are reused
                for key in ("clip_low", "clip_high", "kl"):
                    totals[key] += float(st[key])
                totals["loss"] += float(loss.detach())
            step_loads = model.expert_loads() if not dummy else torch.zeros_like(model.expert_loads())
            loads = step_loads if loads is None else loads + step_loads
        if loads is not None:
            loads = all_reduce(loads, env)
        grad_norm = par.clip_grad_norm(cfg.max_grad_norm)
        if not math.isfinite(grad_norm):
            optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError("non-finite gradient norm in the GRPO update: lower --lr")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        expert_bias_step(model, loads, cfg.bias_gamma)
    keys = ("loss", "clip_low", "clip_high", "kl", "entropy")
    summed = all_reduce(torch.tensor([totals[k] for k in keys], dtype=torch.float64), env).tolist()
    totals = dict(zip(keys, summed))
    totals["loss"] /= env.world_size  # each rank's loss carried the factor world_size (see norm)
    worst = all_reduce(torch.tensor([first_dev, max(mismatch) if mismatch else 0.0]), env, op="max").tolist()
    return {
        "loss": totals["loss"],
        "clip_frac_low": totals["clip_low"] / n_tokens,
        "clip_frac_high": totals["clip_high"] / n_tokens,
        "kl": totals["kl"] / n_tokens,
        "entropy": totals["entropy"] / n_tokens,
        "grad_norm": grad_norm,
        "first_pass_ratio_dev": worst[0],
        "logp_mismatch_max": worst[1],
        "tokens": n_tokens,
    }


def _micro_step(
    par: Parallel,
    ref_model: Transformer | None,
    ids: Tensor,
    mask: Tensor,
    adv: Tensor,
    k: int,
    p: int,
    old: list[Tensor],
    ref: list[Tensor | None],
    cfg: GRPOConfig,
    norm: float,
) -> tuple[Tensor, dict[str, Tensor], Tensor, Tensor]:
    """Forward and backward of micro-batch k on pass p (the first pass records pi_old and the reference)."""
    logp, entropy = token_logprobs(par, ids, cfg.temperature)
    if p == 0:
        old.append(logp.detach())
        if ref_model is not None:
            with torch.no_grad():
                ref.append(token_logprobs(ref_model, ids, cfg.temperature)[0])
        else:
            ref.append(None)
    loss, st = grpo_loss(logp, old[k], adv, mask, cfg.clip_low, cfg.clip_high, cfg.beta, ref[k], num_tokens=norm)
    loss.backward()
    return loss, st, logp, entropy


def _logp_mismatch(rollouts: list[Rollout], logp: Tensor, mask: Tensor) -> list[float]:
    """max |logp_engine - logp_train| per rollout over its sampled (non-EOS) tokens."""
    out = []
    for b, r in enumerate(rollouts):
        n = len(r.engine_logprobs)
        if n:
            start = int(mask[b].nonzero()[0])
            train = logp[b, start : start + n].cpu()
            out.append(float((train - torch.tensor(r.engine_logprobs)).abs().max()))
    return out


# ================================================================================================= the loop
def grpo(
    cfg: GRPOConfig,
    model: Transformer,
    tokenizer: Tokenizer,
    prompts: TaskPrompts | ListPrompts,
    run_dir: str | Path,
    reward_fns: list[RewardFn] | None = None,
    eval_examples: list[dict] | None = None,
    resume_from: str | Path | None = None,
    run_args: dict[str, Any] | None = None,
    ref_model: Transformer | None = None,
    env: DistEnv | None = None,
) -> dict[str, Any]:
    """Train `model` in place with GRPO; metrics, plots and checkpoints go to run_dir. Returns a summary.

    reward_fns default to [accuracy_reward] (+ format_reward x cfg.format_reward). resume_from: a checkpoint
    whose weights `model` already holds (optimizer, step, prompt cursor and RNG come from its trainer_state).
    ref_model: the frozen reference for beta > 0 (default: a copy of `model` as given). env: the torchrun
    process group (None: one process); the policy is then DDP-wrapped (the engine needs whole weights on each
    rank, so no FSDP2 or expert parallelism here).
    """
    cfg.validate()
    env = env or DistEnv()
    run_dir = Path(run_dir)
    device = training_device(env, cfg.device)
    model.to(device)
    if reward_fns is None:
        reward_fns = [accuracy_reward] + ([scaled(format_reward, cfg.format_reward)] if cfg.format_reward else [])
    if cfg.beta > 0:
        ref_model = copy.deepcopy(model) if ref_model is None else ref_model.to(device)
        ref_model.eval().requires_grad_(False)
    else:
        ref_model = None  # beta = 0: no reference kept in memory (recipe sec. 0.3)
    par = Parallel(model, env, "ddp", mtp=False)  # one process: a pass-through
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, optim=cfg.optim, replicas=par.replicas)
    step, elapsed0 = 0, 0.0
    if resume_from is not None:
        step, elapsed0, state = restore_run(resume_from, prompts, "prompts")
        optimizer.load_state_dict(state["optimizer"])
    run_args = {**(run_args or {}), **asdict(cfg), "world_size": env.world_size}
    start_run(run_dir, run_args, env)
    # fast=False: rollouts sample, and the fast path is greedy only; its first build (minutes of CPU, started by the
    # greedy eval) would compete with training for the cores inside GRPO's time budget
    engine = Engine(model, tokenizer, max_batch_size=min(cfg.prompts_per_step * cfg.group_size, 256), fast=False)
    logger = MetricsLogger(run_dir / "metrics.jsonl", keep_until_step=step) if env.is_main else None
    clock = Clock(cfg.steps, cfg.time_budget, elapsed0, env)
    last_eval: dict[str, Any] = {}
    last_saved = step if resume_from is not None else -1

    def save() -> None:
        state = run_state(step, clock, "prompts", prompts, run_args) | {"optimizer": optimizer.state_dict()}
        if env.is_main:  # DDP: every rank holds the same policy and optimizer state
            save_checkpoint(run_dir, model, state, tokenizer=tokenizer, keep_last=cfg.keep_last)
        barrier(env)

    def next_prompts() -> list[dict]:
        """This rank's prompts: slice `rank` of a draw for all ranks (the cursor stays the same everywhere)."""
        P = cfg.prompts_per_step
        return prompts.next(P * env.world_size)[env.rank * P : (env.rank + 1) * P]

    if eval_examples and cfg.eval_every > 0 and resume_from is None and env.is_main:
        last_eval = evaluate_policy(engine, eval_examples, cfg.max_new_tokens)
        logger.log({"step": 0, "elapsed_s": clock.elapsed(), **last_eval})
        print(f"step 0: eval accuracy {last_eval['eval_accuracy']:.3f}", file=sys.stderr)
    bar = clock.bar(step, "grpo", disable=not env.is_main)
    try:
        clock.agree()
        while not clock.finished(step):
            t0 = time.perf_counter()
            lr = cfg.lr * warmup_factor(step, cfg.warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr
            kept: list[list[Rollout]] = []
            kept_adv: list[Tensor] = []
            sampled: list[Rollout] = []
            groups_sampled = zero_groups = rounds = 0
            max_rounds = cfg.max_rounds if cfg.dynamic_sampling else 1
            # every rank draws as many rounds as the neediest one, so the prompt cursors stay equal
            while rounds < max_rounds and any_rank(len(kept) < cfg.prompts_per_step, env):
                key = (cfg.seed, step, rounds) if not env.distributed else (cfg.seed, step, rounds, env.rank)
                groups = sample_groups(
                    engine, tokenizer, next_prompts(), cfg.group_size, cfg.temperature, cfg.max_new_tokens, key
                )
                rounds += 1
                for g in groups:
                    score(g, reward_fns, cfg.zero_truncated, cfg.length_penalty)
                adv, zero = group_advantages(torch.tensor([[r.reward for r in g] for g in groups]), cfg.std_scaling)
                groups_sampled += len(groups)
                zero_groups += int(zero.sum())
                sampled += [r for g in groups for r in g]
                for g, a, z in zip(groups, adv, zero):
                    if not z and len(kept) < cfg.prompts_per_step:
                        kept.append(g)
                        kept_adv.append(a)
            t_roll = time.perf_counter() - t0
            record: dict[str, Any] = {"step": step + 1, "lr": lr}
            if any_rank(bool(kept), env):
                flat = [r for g in kept for r in g]
                advs = torch.cat(kept_adv).tolist() if kept_adv else []
                record.update(policy_update(model, optimizer, flat, advs, cfg, tokenizer.pad_id, ref_model, par))
            step += 1
            clock.agree()
            record |= rollout_metrics(sampled, groups_sampled, zero_groups, len(kept), env)
            record |= {"rounds": rounds, "rollout_s": t_roll, "update_s": time.perf_counter() - t0 - t_roll}
            record["elapsed_s"] = clock.elapsed()
            is_eval = eval_examples and cfg.eval_every > 0 and (step % cfg.eval_every == 0 or clock.finished(step))
            if is_eval and env.is_main:  # greedy held-out eval on rank 0; the others wait at the next collective
                last_eval = evaluate_policy(engine, eval_examples, cfg.max_new_tokens)
                record.update(last_eval)
                bar.write(
                    f"step {step}: reward {record['reward_mean']:.3f}, eval accuracy {last_eval['eval_accuracy']:.3f}"
                )
            if logger is not None and (step % cfg.log_every == 0 or is_eval or clock.finished(step)):
                logger.log(record)
            bar.set_postfix(reward=f"{record['reward_mean']:.3f}", kept=len(kept), refresh=False)
            clock.advance(bar)
            if cfg.save_every > 0 and step % cfg.save_every == 0 and not clock.finished(step):
                save()
                last_saved = step
        if step != last_saved:
            save()
    finally:
        bar.close()
        if logger is not None:
            logger.close()
            write_plots(run_dir, plot_grpo)
    summary = {"step": step, "elapsed_s": clock.elapsed(), "checkpoint": str(latest_checkpoint(run_dir))}
    return {**summary, "run_dir": str(run_dir), **last_eval}


# ================================================================================================ the stage
@dataclass
class GRPOJob:
    """One GRPO run: the policy `model` (a model dir or run folder) on `task` (arithmetic | countdown | a .jsonl
    of {prompt, answer}) into the run folder `out`; resume continues the run in `out` (model and task may be
    None then: the run's)."""

    model: str | None
    task: str | None
    out: str
    levels: list[str] | None = None  # built-in task levels to train on (None: all)
    eval_split: str = "val"  # held-out split for the periodic evaluation (val | test)
    eval_data: str | None = None  # with a .jsonl task: a .jsonl of {prompt, answer} to evaluate on
    resume: bool = False
    grpo: GRPOConfig = field(default_factory=GRPOConfig)


def run_grpo(job: GRPOJob, env: DistEnv | None = None) -> dict[str, Any]:
    """Run (or resume) a GRPO job: load the policy (and the reference for beta > 0), the prompts and the held-out
    set, then `grpo()`. Returns its summary. env: the torchrun process group (None: one process). Raises
    ValueError for bad settings, and lets KeyboardInterrupt through (the last checkpoint is complete)."""
    env = env or DistEnv()
    run_dir = Path(job.out)
    ckpt, saved = resume_point(run_dir, job.resume)
    settings = {"model": job.model and str(resolve_model_dir(job.model)), "task": job.task, "levels": job.levels}
    settings |= {"eval_split": job.eval_split, "eval_data": job.eval_data}
    if job.task and job.task.endswith(".jsonl"):
        settings["task"] = str(Path(job.task).resolve())
    elif job.task:
        settings["eval_data"] = None  # a built-in task evaluates on its own held-out split
    cfg, settings = resumed_job(job.grpo, settings, saved, RESUME_OVERRIDABLE)
    cfg.validate()
    model_dir, task, levels = settings.get("model"), settings.get("task"), settings.get("levels")
    if not model_dir or not task:
        raise ValueError("pass --model MODEL_DIR and --task arithmetic|countdown|FILE.jsonl")
    device = training_device(env, cfg.device)
    tokenizer = Tokenizer.from_pretrained(ckpt or model_dir)
    if ckpt is None:
        seed_everything(cfg.seed)
    model = load_model(ckpt or model_dir, device=device, dtype=torch.float32)
    ref = load_model(model_dir, device=device, dtype=torch.float32) if cfg.beta > 0 else None  # the start policy
    if task.endswith(".jsonl"):
        prompts: TaskPrompts | ListPrompts = ListPrompts(read_prompt_file(task), cfg.seed)
        eval_data = settings["eval_data"]
        eval_examples = read_prompt_file(eval_data)[: cfg.eval_n] if eval_data else None
    else:
        prompts = TaskPrompts(task, levels, cfg.seed)
        eval_examples = task_eval_examples(task, levels, cfg.eval_n, settings["eval_split"])
    procs = f" x {env.world_size} processes" if env.distributed else ""
    rank0_print(env)(
        f"grpo: {model.num_parameters() / 1e6:.2f}M params, task {task}, {cfg.prompts_per_step} prompts x "
        f"{cfg.group_size} samples/step{procs}, device {device}" + (f"; resuming from {ckpt.name}" if ckpt else "")
    )
    run_args = {**settings, "out": str(run_dir)}
    return grpo(cfg, model, tokenizer, prompts, run_dir, None, eval_examples, ckpt, run_args, ref, env)
