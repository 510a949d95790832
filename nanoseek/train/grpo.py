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
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from nanoseek.checkpoint import load_model, resolve_model_dir
from nanoseek.config import atomic_write_text
from nanoseek.data.tasks import LEVELS, THINK_END, THINK_START, generate
from nanoseek.distributed.data_parallel import Parallel
from nanoseek.distributed.process_group import DistEnv, all_reduce, any_rank, barrier, init_distributed, shutdown
from nanoseek.eval import has_format, is_correct, read_prompt_file, to_item
from nanoseek.infer.engine import Completion, Engine
from nanoseek.infer.sampling import SamplingParams
from nanoseek.model import Transformer
from nanoseek.report import MetricsLogger, read_metrics
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
from nanoseek.train.loop import TIME_BAR, resolve_device, seed_everything
from nanoseek.train.optim import build_optimizer, expert_bias_step
from nanoseek.train.schedule import warmup_factor

RewardFn = Callable[[str, str, dict], float]  # (prompt, completion text, example) -> reward


# ================================================================================================ GRPO maths
def group_advantages(rewards: Tensor, std_scaling: bool = True, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Advantages [N, G] from rewards [N, G] (N groups of G samples), and the zero-variance mask [N].

    A = (r - mean) / (std + eps) per group (DeepSeekMath sec. 4.1.2), or r - mean without std scaling
    (Dr. GRPO). A group whose rewards are all equal gets A = 0 exactly (it would otherwise be 0/eps noise).
    """
    rewards = rewards.float()
    zero_var = rewards.amax(dim=1) == rewards.amin(dim=1)
    adv = rewards - rewards.mean(dim=1, keepdim=True)
    if std_scaling and rewards.shape[1] > 1:
        adv = adv / (rewards.std(dim=1, keepdim=True) + eps)  # unbiased std, as TRL and verl
    return adv.masked_fill(zero_var[:, None], 0.0), zero_var


def k3_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref): exp(r - l) - (r - l) - 1 >= 0, zero where they agree."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def token_logprobs(
    model: Transformer | Callable[[Tensor], Tensor], ids: Tensor, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """log pi(ids[:, t+1] | ids[:, :t+1]) from log_softmax(logits / T), fp32: [B, T-1]; and the entropy [B, T-1]
    of that distribution (detached)."""
    logits = model(ids[:, :-1]).float() / temperature
    logp_all = logits.log_softmax(dim=-1)
    logp = logp_all.gather(-1, ids[:, 1:, None]).squeeze(-1)
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def grpo_loss(
    logp: Tensor,
    old_logp: Tensor,
    adv: Tensor,
    mask: Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    beta: float = 0.0,
    ref_logp: Tensor | None = None,
    num_tokens: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate with token-level aggregation. logp, old_logp, mask (1 on completion tokens) [B, T];
    adv [B]; num_tokens: the normaliser (all completion tokens of the batch when it is split in micro-batches;
    default mask.sum()). Returns (loss, stats: summed clip counts low/high, kl sum, tokens).

    Clip-higher (DAPO eq. 10): rho in [1 - clip_low, 1 + clip_high]. A token is "clipped" when the min picks
    the clipped term and its gradient is zero: rho < 1 - eps_low with A < 0, or rho > 1 + eps_high with A > 0.
    """
    mask = mask.to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    a = adv[:, None].to(logp.dtype)
    surrogate = torch.minimum(ratio * a, ratio.clamp(1 - clip_low, 1 + clip_high) * a)
    per_token = -surrogate
    kl = None
    if beta > 0:
        if ref_logp is None:
            raise ValueError("beta > 0 needs the reference log-probs")
        kl = k3_kl(logp, ref_logp)
        per_token = per_token + beta * kl
    n = mask.sum() if num_tokens is None else num_tokens
    loss = (per_token * mask).sum() / max(float(n), 1.0)
    with torch.no_grad():
        stats = {
            "clip_low": (((ratio < 1 - clip_low) & (a < 0)).to(mask.dtype) * mask).sum(),
            "clip_high": (((ratio > 1 + clip_high) & (a > 0)).to(mask.dtype) * mask).sum(),
            "kl": (kl * mask).sum() if kl is not None else mask.new_zeros(()),
            "ratio_dev": ((ratio - 1).abs() * mask).max() if mask.any() else mask.new_zeros(()),
            "tokens": mask.sum(),
        }
    return loss, stats


# ================================================================================================== rewards
def format_reward(prompt: str, completion: str, example: dict) -> float:
    """1 if the completion is exactly one `<think>...</think>` block followed by a non-empty answer, else 0.

    The think block may be empty: `<think></think> 653` is our answer-only format (R1 also leaves it empty
    for trivial questions). A think-only reward would be hackable with junk (recipe sec. 8); use accuracy.
    """
    return float(has_format(completion))


def has_reasoning(completion: str) -> bool:
    """Whether the completion opens a non-empty think block (for the think-rate metric)."""
    if THINK_START not in completion:
        return False
    inner = completion.split(THINK_START, 1)[1].split(THINK_END, 1)[0]
    return bool(inner.strip())


def accuracy_reward(prompt: str, completion: str, example: dict) -> float:
    """1.0 if the completion's answer is right, by the check `nanoseek eval` scores with (`eval.is_correct`):
    the task's verifier for built-in tasks, else `eval.answer_matches`."""
    if "answer" not in example:
        return 0.0
    return float(is_correct(to_item({"prompt": prompt, **example}), completion))


def scaled(fn: RewardFn, weight: float) -> RewardFn:
    """`fn` times `weight`."""
    return lambda prompt, completion, example: weight * fn(prompt, completion, example)


def overlong_penalty(length: int, max_len: int, cache: int) -> float:
    """DAPO soft overlong punishment (eq. 13): 0 up to max_len - cache tokens, then linear down to -1 at
    max_len, -1 beyond."""
    if length <= max_len - cache:
        return 0.0
    if length <= max_len:
        return ((max_len - cache) - length) / cache
    return -1.0


# ================================================================================================== prompts
class TaskPrompts:
    """Endless training prompts of a built-in task: batch k is generated from (seed, k), so the state is a count."""

    def __init__(self, task: str, levels: list[str] | None, seed: int) -> None:
        if task not in LEVELS:
            raise ValueError(f"unknown task {task!r}: choose one of {sorted(LEVELS)} or pass a .jsonl file")
        self.levels = levels or list(LEVELS[task])
        bad = [lv for lv in self.levels if lv not in LEVELS[task]]
        if bad:
            raise ValueError(f"unknown {task} level(s) {bad}: choose from {list(LEVELS[task])}")
        self.task, self.seed, self.drawn = task, seed, 0

    def next(self, n: int) -> list[dict]:
        rng = random.Random(f"grpo:{self.task}:{self.seed}:{self.drawn}")
        self.drawn += 1
        picks = [rng.choice(self.levels) for _ in range(n)]
        out = []
        for level in dict.fromkeys(picks):
            out += [
                p.rl_example() for p in generate(self.task, picks.count(level), rng.randrange(2**31), "train", level)
            ]
        rng.shuffle(out)
        return out

    def state_dict(self) -> dict:
        return {"drawn": self.drawn}

    def load_state_dict(self, state: dict) -> None:
        self.drawn = int(state["drawn"])


class ListPrompts:
    """Prompts from a list of `{prompt, answer, ...}` examples, reshuffled every epoch by (seed, epoch)."""

    def __init__(self, examples: list[dict], seed: int) -> None:
        if not examples:
            raise ValueError("no prompts: the prompt file is empty")
        self.examples, self.seed, self.epoch, self.cursor = examples, seed, 0, 0

    def _order(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.examples))

    def next(self, n: int) -> list[dict]:
        out = []
        while len(out) < n:
            order = self._order()
            take = order[self.cursor : self.cursor + n - len(out)]
            out += [self.examples[i] for i in take]
            self.cursor += len(take)
            if self.cursor >= len(order):
                self.epoch, self.cursor = self.epoch + 1, 0
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])


def task_eval_examples(task: str, levels: list[str] | None, n: int, split: str, seed: int = 1234) -> list[dict]:
    """Up to n distinct held-out problems spread evenly over the levels (fixed by seed: the same set at every
    evaluation). Small levels have few distinct problems per split (2x1: ~15 in test), so duplicates are dropped
    rather than counted again, and such a level contributes fewer problems."""
    levels = levels or list(LEVELS[task])
    per = [n // len(levels) + (i < n % len(levels)) for i in range(len(levels))]
    out: dict[str, dict] = {}
    for lv, k in zip(levels, per):
        for p in generate(task, k, seed, split, lv) if k else []:
            out.setdefault(p.prompt, p.rl_example())
    return list(out.values())


# ================================================================================================== config
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


# ================================================================================================ rollouts
@dataclass
class Rollout:
    example: dict
    prompt_ids: list[int]
    completion_ids: list[int]  # sampled tokens, with the closing EOS when the model stopped
    text: str
    truncated: bool
    reward: float = 0.0
    engine_logprobs: list[float] = field(default_factory=list)  # the sampler's log-probs (EOS excluded)


def prompt_ids(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """The chat-template prompt: BOS, user turn, then the assistant tag the model continues after."""
    return tokenizer.encode_chat([{"role": "user", "content": prompt}], add_generation_prompt=True)


def sample_groups(
    engine: Engine, tokenizer: Tokenizer, examples: list[dict], cfg: GRPOConfig, seed_key: tuple
) -> list[list[Rollout]]:
    """G sampled completions per example; sample (i, g) is seeded by hash(seed_key, i, g)."""
    G = cfg.group_size
    prompts = [prompt_ids(tokenizer, ex["prompt"]) for ex in examples]
    params = [
        SamplingParams(
            temperature=cfg.temperature,
            max_tokens=cfg.max_new_tokens,
            seed=random.Random(f"{seed_key}:{i}:{g}").randrange(2**62),
            logprobs=True,
        )
        for i in range(len(examples))
        for g in range(G)
    ]
    outs: list[Completion] = engine.generate([p for p in prompts for _ in range(G)], params)
    groups = []
    for i, ex in enumerate(examples):
        group = []
        for c in outs[i * G : (i + 1) * G]:
            stopped = c.finish_reason == "stop"
            ids = c.token_ids + ([tokenizer.eos_id] if stopped else [])
            group.append(Rollout(ex, prompts[i], ids, c.text, not stopped, engine_logprobs=c.logprobs or []))
        groups.append(group)
    return groups


def score(rollouts: list[Rollout], reward_fns: list[RewardFn], cfg: GRPOConfig) -> None:
    """Set each rollout's reward: sum of reward_fns (0 for truncated ones unless cfg.zero_truncated is off), plus
    the overlong penalty."""
    for r in rollouts:
        ex = r.example
        r.reward = 0.0 if r.truncated and cfg.zero_truncated else sum(fn(ex["prompt"], r.text, ex) for fn in reward_fns)
        if cfg.length_penalty is not None:
            r.reward += overlong_penalty(len(r.completion_ids), *cfg.length_penalty)


# ================================================================================================== update
def pad_batch(rollouts: list[Rollout], pad_id: int) -> tuple[Tensor, Tensor]:
    """ids [B, L] (prompt + completion, right-padded) and the completion mask [B, L-1] over next-token positions."""
    L = max(len(r.prompt_ids) + len(r.completion_ids) for r in rollouts)
    ids = torch.full((len(rollouts), L), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rollouts), L - 1)
    for b, r in enumerate(rollouts):
        seq = r.prompt_ids + r.completion_ids
        ids[b, : len(seq)] = torch.tensor(seq)
        mask[b, len(r.prompt_ids) - 1 : len(seq) - 1] = 1.0  # position t predicts token t+1
    return ids, mask


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


# ================================================================================================ evaluation
def evaluate_policy(engine: Engine, examples: list[dict], max_new_tokens: int) -> dict[str, Any]:
    """Held-out greedy accuracy, mean response length (tokens), format rate, think rate and accuracy per level,
    from `nanoseek.eval.evaluate` (chat format), as flat `eval_*` metrics."""
    from nanoseek.eval import evaluate

    res = evaluate(engine, examples, fmt="chat", max_tokens=max_new_tokens)
    out: dict[str, Any] = {
        "eval_accuracy": res["accuracy"],
        "eval_response_len": res["mean_length"],
        "eval_format_rate": res["format_rate"],
        "eval_think_rate": float(np.mean([has_reasoning(r["completion"]) for r in res["results"]])),
        "eval_n": res["n"],
    }
    if len(res["levels"]) > 1:
        out["eval_accuracy_by_level"] = {name: lv["accuracy"] for name, lv in sorted(res["levels"].items())}
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
    env = env or DistEnv(device=resolve_device(cfg.device))
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = env.device if env.distributed else resolve_device(cfg.device)
    model.to(device)
    if reward_fns is None:
        reward_fns = [accuracy_reward] + ([scaled(format_reward, cfg.format_reward)] if cfg.format_reward else [])
    if cfg.beta > 0:
        ref_model = copy.deepcopy(model) if ref_model is None else ref_model.to(device)
        ref_model.eval().requires_grad_(False)
    else:
        ref_model = None  # beta = 0: no reference kept in memory (recipe sec. 0.3)
    par = Parallel(model, env, "ddp", mtp=False)  # one process: a pass-through
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay)
    step, elapsed0 = 0, 0.0
    if resume_from is not None:
        state = load_trainer_state(resume_from)
        optimizer.load_state_dict(state["optimizer"])
        prompts.load_state_dict(state["prompts"])
        set_rng_state(state["rng"])
        step, elapsed0 = int(state["step"]), float(state["elapsed_s"])
    run_args = {**(run_args or {}), **asdict(cfg), "world_size": env.world_size}
    if env.is_main:
        remove_stale_temp_dirs(run_dir)
        atomic_write_text(run_dir / "args.json", json.dumps(run_args, indent=2) + "\n")
    barrier(env)
    engine = Engine(model, tokenizer, max_batch_size=min(cfg.prompts_per_step * cfg.group_size, 256))
    logger = MetricsLogger(run_dir / "metrics.jsonl", keep_until_step=step) if env.is_main else None
    t_start = time.perf_counter()
    last_eval: dict[str, Any] = {}
    last_saved = step if resume_from is not None else -1

    agreed: list[float] = []  # torchrun + --time-budget: the step's clock, the same on every rank

    def elapsed() -> float:
        return agreed[0] if agreed else elapsed0 + time.perf_counter() - t_start

    def agree_on_time() -> None:
        """Under torchrun with --time-budget every rank must decide the same last step (see train.loop)."""
        if env.distributed and cfg.time_budget:
            agreed.clear()
            now = torch.tensor([elapsed0 + time.perf_counter() - t_start], dtype=torch.float64)
            agreed.append(all_reduce(now, env, op="max").item())

    def finished() -> bool:
        return (cfg.steps is not None and step >= cfg.steps) or (
            cfg.time_budget is not None and elapsed() >= cfg.time_budget
        )

    def run_eval() -> dict[str, Any]:
        return evaluate_policy(engine, eval_examples, cfg.max_new_tokens)

    def save() -> None:
        state = {
            "step": step,
            "elapsed_s": elapsed(),
            "optimizer": optimizer.state_dict(),
            "prompts": prompts.state_dict(),
            "rng": rng_state(),
            "args": run_args,
        }
        if env.is_main:  # DDP: every rank holds the same policy and optimizer state
            save_checkpoint(run_dir, model, state, tokenizer=tokenizer, keep_last=cfg.keep_last)
        barrier(env)

    def next_prompts() -> list[dict]:
        """This rank's prompts: slice `rank` of a draw for all ranks (the cursor stays the same everywhere)."""
        if not env.distributed:
            return prompts.next(cfg.prompts_per_step)
        P = cfg.prompts_per_step
        return prompts.next(P * env.world_size)[env.rank * P : (env.rank + 1) * P]

    if eval_examples and cfg.eval_every > 0 and resume_from is None and env.is_main:
        last_eval = run_eval()
        logger.log({"step": 0, "elapsed_s": elapsed(), **last_eval})
        print(f"step 0: eval accuracy {last_eval['eval_accuracy']:.3f}", file=sys.stderr)
    if not env.is_main:
        bar = None
    elif cfg.steps:
        bar = tqdm(total=cfg.steps, initial=step, unit="step", desc="grpo")
    else:
        bar = tqdm(total=int(cfg.time_budget), initial=int(min(elapsed(), cfg.time_budget)), desc="grpo")
        bar.bar_format = TIME_BAR
    try:
        agree_on_time()
        while not finished():
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
                examples = next_prompts()
                key = (cfg.seed, step, rounds) if not env.distributed else (cfg.seed, step, rounds, env.rank)
                groups = sample_groups(engine, tokenizer, examples, cfg, key)
                rounds += 1
                for g in groups:
                    score(g, reward_fns, cfg)
                rewards = torch.tensor([[r.reward for r in g] for g in groups])
                adv, zero = group_advantages(rewards, cfg.std_scaling)
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
            agree_on_time()
            lengths = [len(r.completion_ids) for r in sampled]
            rewards = [r.reward for r in sampled]
            sums = {  # over every rank's rollouts
                "reward": sum(rewards),
                "reward_sq": sum(x * x for x in rewards),
                "accuracy": sum(0.0 if r.truncated else accuracy_reward("", r.text, r.example) for r in sampled),
                "format": sum(format_reward("", r.text, {}) for r in sampled),
                "think": sum(float(has_reasoning(r.text)) for r in sampled),
                "truncated": sum(float(r.truncated) for r in sampled),
                "length": float(sum(lengths)),
                "n": float(len(sampled)),
                "zero_groups": float(zero_groups),
                "groups": float(groups_sampled),
                "kept": float(len(kept)),
            }
            if env.distributed:
                reduced = all_reduce(torch.tensor(list(sums.values()), dtype=torch.float64), env).tolist()
                sums = dict(zip(sums, reduced))
            n = sums["n"]
            record.update(
                {
                    "reward_mean": sums["reward"] / n,
                    "reward_std": math.sqrt(max(sums["reward_sq"] / n - (sums["reward"] / n) ** 2, 0.0)),
                    "accuracy": sums["accuracy"] / n,
                    "format_rate": sums["format"] / n,
                    "think_rate": sums["think"] / n,
                    "frac_zero_std": sums["zero_groups"] / sums["groups"],
                    "groups_kept": int(sums["kept"]),
                    "rounds": rounds,
                    "response_len": sums["length"] / n,
                    "response_len_max": int(all_reduce(torch.tensor(max(lengths)), env, op="max").item()),
                    "frac_truncated": sums["truncated"] / n,
                    "rollout_s": t_roll,
                    "update_s": time.perf_counter() - t0 - t_roll,
                    "elapsed_s": elapsed(),
                }
            )
            is_eval = eval_examples and cfg.eval_every > 0 and (step % cfg.eval_every == 0 or finished())
            if is_eval and env.is_main:  # greedy held-out eval on rank 0; the others wait at the next collective
                last_eval = run_eval()
                record.update(last_eval)
                msg = f"step {step}: reward {record['reward_mean']:.3f}, eval accuracy {last_eval['eval_accuracy']:.3f}"
                (bar.write if bar else print)(msg)
            if logger is not None and (step % cfg.log_every == 0 or is_eval or finished()):
                logger.log(record)
            if bar:
                bar.set_postfix(reward=f"{record['reward_mean']:.3f}", kept=len(kept), refresh=False)
                bar.update(1 if cfg.steps else int(min(elapsed(), cfg.time_budget)) - bar.n)
            if cfg.save_every > 0 and step % cfg.save_every == 0 and not finished():
                save()
                last_saved = step
        if step != last_saved:
            save()
    finally:
        if bar:
            bar.close()
        if logger is not None:
            logger.close()
            _plot(run_dir)
    return {"step": step, "elapsed_s": elapsed(), "checkpoint": str(latest_checkpoint(run_dir)), **last_eval}


# ==================================================================================================== plots
PLOTS = {
    "reward.png": ("reward", "mean reward", [("reward_mean", "train (sampled)")]),
    "accuracy.png": ("accuracy", "accuracy", [("accuracy", "train (sampled)"), ("eval_accuracy", "held-out (greedy)")]),
    "response_length.png": (
        "response length",
        "tokens",
        [("response_len", "train (sampled)"), ("eval_response_len", "held-out (greedy)")],
    ),
    "kl.png": ("KL to reference (k3)", "nats/token", [("kl", "kl")]),
    "clip_fraction.png": (
        "clipped tokens",
        "fraction",
        [("clip_frac_low", "low (A<0)"), ("clip_frac_high", "high (A>0)")],
    ),
    "think_rate.png": (
        "non-empty <think>",
        "fraction",
        [("think_rate", "train (sampled)"), ("eval_think_rate", "held-out")],
    ),
}


def plot_grpo(metrics_path: str | Path, out_dir: str | Path) -> list[Path]:
    """reward, accuracy, response length, KL, clip fraction and think-rate PNGs from a GRPO metrics.jsonl."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = read_metrics(metrics_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, (title, ylabel, lines) in PLOTS.items():
        fig = Figure(figsize=(7, 4))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        drawn = 0
        for key, label in lines:
            pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
            if pts:
                ax.plot(*zip(*pts), label=label, marker="o" if key.startswith("eval_") else None, markersize=3)
                drawn += 1
        ax.set(title=title, xlabel="step", ylabel=ylabel)
        ax.grid(alpha=0.3)
        if len(lines) > 1 and drawn:
            ax.legend()
        fig.savefig(out / name, dpi=100, bbox_inches="tight")
        paths.append(out / name)
    return paths


def _plot(run_dir: Path) -> None:
    try:
        plot_grpo(run_dir / "metrics.jsonl", run_dir / "plots")
    except Exception as e:  # a plotting problem must not hide the run's result
        print(f"warning: could not write plots: {e}", file=sys.stderr)


# ====================================================================================================== CLI
# Options a --resume may change; the others must match the run's saved arguments.
RESUME_OVERRIDABLE = {"steps", "time_budget", "save_every", "keep_last", "eval_every", "eval_n", "log_every", "device"}


def _cmd_grpo(args: argparse.Namespace) -> int:
    """`nanoseek grpo`, in one process or under torchrun (one call per rank)."""
    env = init_distributed(args.device or "auto")
    rc = 1
    try:
        rc = _grpo_command(args, env)
        return rc
    finally:
        shutdown(clean=rc == 0)


def _grpo_command(args: argparse.Namespace, env: DistEnv) -> int:
    log = print if env.is_main else (lambda *a, **k: None)
    run_dir = Path(args.out)
    ckpt, saved = resume_point(run_dir, args.resume)
    values = {}
    for f in GRPOConfig.__dataclass_fields__:
        given = getattr(args, f, None)
        if saved is not None and f in saved:
            if given is not None and given != saved[f] and f not in RESUME_OVERRIDABLE:
                raise ValueError(f"--{f.replace('_', '-')} differs from the run's saved value {saved[f]!r}")
            values[f] = saved[f] if given is None else given
        elif given is not None:
            values[f] = given
    cfg = GRPOConfig(**values)
    cfg.validate()
    model_dir = (saved or {}).get("model") or (args.model and str(resolve_model_dir(args.model)))
    task = (saved or {}).get("task") or args.task
    levels = (saved or {}).get("levels") if saved else args.levels
    eval_split = (saved or {}).get("eval_split") or args.eval_split
    if not model_dir or not task:
        raise ValueError("pass --model MODEL_DIR and --task arithmetic|countdown|FILE.jsonl")
    device = env.device if env.distributed else resolve_device(cfg.device)
    tokenizer = Tokenizer.from_pretrained(ckpt or model_dir)
    if ckpt is None:
        seed_everything(cfg.seed)
    model = load_model(ckpt or model_dir, device=device, dtype=torch.float32)
    ref = load_model(model_dir, device=device, dtype=torch.float32) if cfg.beta > 0 else None  # the start policy
    if task.endswith(".jsonl"):
        task = str(Path(task).resolve())
        prompts: TaskPrompts | ListPrompts = ListPrompts(read_prompt_file(task), cfg.seed)
        eval_data = (saved or {}).get("eval_data") or args.eval_data
        eval_examples = read_prompt_file(eval_data)[: cfg.eval_n] if eval_data else None
    else:
        prompts = TaskPrompts(task, levels, cfg.seed)
        eval_examples = task_eval_examples(task, levels, cfg.eval_n, eval_split)
        eval_data = None
    run_args = {"model": str(model_dir), "task": task, "levels": levels, "eval_split": eval_split}
    run_args |= {"eval_data": eval_data, "out": str(run_dir)}
    procs = f" x {env.world_size} processes" if env.distributed else ""
    log(
        f"grpo: {model.num_parameters() / 1e6:.2f}M params, task {task}, {cfg.prompts_per_step} prompts x "
        f"{cfg.group_size} samples/step{procs}, device {device}" + (f"; resuming from {ckpt.name}" if ckpt else "")
    )
    try:
        summary = grpo(cfg, model, tokenizer, prompts, run_dir, None, eval_examples, ckpt, run_args, ref, env)
    except KeyboardInterrupt:
        log(f"\nnanoseek grpo: interrupted; continue with `nanoseek grpo --out {run_dir} --resume`", file=sys.stderr)
        return 130
    acc = f", eval accuracy {summary['eval_accuracy']:.3f}" if "eval_accuracy" in summary else ""
    log(
        f"done: step {summary['step']} ({summary['elapsed_s']:.1f} s){acc}; checkpoint {summary['checkpoint']}; "
        f"metrics and plots in {run_dir}"
    )
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    d = GRPOConfig()
    p = subparsers.add_parser("grpo", help="GRPO reinforcement learning with verifiable rewards (resumable)")
    p.add_argument("--model", help="policy to start from (HF model dir with tokenizer)")
    p.add_argument("--task", help="arithmetic | countdown | a .jsonl of {prompt, answer}")
    p.add_argument("--out", required=True, help="run dir: metrics.jsonl, plots/, checkpoints/step_N/")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--levels", nargs="*", help="built-in task levels to train on (default: all)")
    p.add_argument("--eval-split", default="val", help="held-out split for periodic evaluation (val | test)")
    p.add_argument("--eval-data", help="a .jsonl of {prompt, answer} for evaluation (with a .jsonl --task)")
    g = p.add_argument_group("GRPO (defaults: grpo-recipe.md sec. 0)")
    g.add_argument("--steps", type=int, help="GRPO steps (rollout + update)")
    g.add_argument("--time-budget", type=float, help="seconds of training")
    g.add_argument("--prompts-per-step", type=int, help=f"prompts per step (default {d.prompts_per_step})")
    g.add_argument("--group-size", type=int, help=f"G, samples per prompt (default {d.group_size})")
    g.add_argument("--temperature", type=float, help=f"sampling temperature (default {d.temperature})")
    g.add_argument("--max-new-tokens", type=int, help=f"completion length cap (default {d.max_new_tokens})")
    g.add_argument("--lr", type=float, help=f"AdamW learning rate, constant after warmup (default {d.lr})")
    g.add_argument("--warmup", type=int, help=f"linear warmup steps (default {d.warmup})")
    g.add_argument("--weight-decay", type=float, help=f"AdamW weight decay (default {d.weight_decay})")
    g.add_argument("--max-grad-norm", type=float, help=f"gradient clipping (default {d.max_grad_norm})")
    g.add_argument("--beta", type=float, help="k3 KL coefficient; 0 = no reference model (default 0)")
    g.add_argument("--clip-low", type=float, help=f"eps_low (default {d.clip_low})")
    g.add_argument("--clip-high", type=float, help=f"eps_high, clip-higher (default {d.clip_high})")
    g.add_argument("--mu", type=int, help="optimisation passes per rollout batch (default 1)")
    g.add_argument("--no-std-scaling", dest="std_scaling", action="store_false", default=None, help="Dr. GRPO")
    g.add_argument("--dynamic-sampling", action="store_true", default=None, help="resample zero-variance groups")
    g.add_argument("--max-rounds", type=int, help=f"dynamic sampling: rollout rounds per step (default {d.max_rounds})")
    g.add_argument("--format-reward", type=float, help="weight of the <think>...</think> answer format reward (0)")
    g.add_argument(
        "--reward-truncated",
        dest="zero_truncated",
        action="store_false",
        default=None,
        help="score truncated completions too (default: they get 0)",
    )
    g.add_argument("--length-penalty", type=int, nargs=2, metavar=("MAX", "CACHE"), help="DAPO overlong penalty")
    g.add_argument("--bias-gamma", type=float, help="MoE bias update speed during GRPO (default 0 = off)")
    g.add_argument("--micro-batch", type=int, help=f"sequences per forward/backward (default {d.micro_batch})")
    g.add_argument("--eval-every", type=int, help=f"held-out greedy eval every N steps, 0 = never ({d.eval_every})")
    g.add_argument("--eval-n", type=int, help=f"held-out problems per evaluation (default {d.eval_n})")
    g.add_argument("--seed", type=int, help="seed for prompts and rollouts (default 0)")
    g.add_argument("--save-every", type=int, help=f"checkpoint every N steps, 0 = only at the end ({d.save_every})")
    g.add_argument("--keep-last", type=int, help=f"checkpoints to keep (default {d.keep_last})")
    g.add_argument("--log-every", type=int, help="metrics record every N steps (default 1)")
    g.add_argument("--device", help="cpu, cuda or auto (default)")
    p.set_defaults(func=_cmd_grpo)
