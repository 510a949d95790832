"""GRPO's rollouts: G sampled completions per prompt from the Engine, their rewards, what they say about the
policy (train metrics, summed over ranks) and a greedy held-out evaluation. The update on them is in grpo.py."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from nanoseek.distributed.process_group import DistEnv, all_reduce
from nanoseek.infer.engine import Completion, Engine
from nanoseek.infer.sampling import SamplingParams
from nanoseek.tasks.rewards import RewardFn, accuracy_reward, format_reward, has_reasoning, overlong_penalty
from nanoseek.tasks.sources import prompt_ids
from nanoseek.tokenizer import Tokenizer


@dataclass
class Rollout:
    example: dict
    prompt_ids: list[int]
    completion_ids: list[int]  # sampled tokens, with the closing EOS when the model stopped
    text: str
    truncated: bool
    reward: float = 0.0
    engine_logprobs: list[float] = field(default_factory=list)  # the sampler's log-probs (EOS excluded)


def sample_groups(
    engine: Engine,
    tokenizer: Tokenizer,
    examples: list[dict],
    group_size: int,
    temperature: float,
    max_new_tokens: int,
    seed_key: tuple,
) -> list[list[Rollout]]:
    """`group_size` sampled completions per example; sample (i, g) is seeded by hash(seed_key, i, g), so a
    rollout does not depend on the batch it was drawn in."""
    G = group_size
    prompts = [prompt_ids(tokenizer, ex["prompt"]) for ex in examples]
    params = [
        SamplingParams(
            temperature=temperature,
            max_tokens=max_new_tokens,
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


def score(
    rollouts: list[Rollout],
    reward_fns: list[RewardFn],
    zero_truncated: bool = True,
    length_penalty: list[int] | None = None,
) -> None:
    """Set each rollout's reward: the sum of reward_fns (0 for truncated ones when zero_truncated), plus the DAPO
    overlong penalty when length_penalty is [max_len, cache]."""
    for r in rollouts:
        ex = r.example
        r.reward = 0.0 if r.truncated and zero_truncated else sum(fn(ex["prompt"], r.text, ex) for fn in reward_fns)
        if length_penalty is not None:
            r.reward += overlong_penalty(len(r.completion_ids), *length_penalty)


def rollout_metrics(sampled: list[Rollout], groups: int, zero_groups: int, kept: int, env: DistEnv) -> dict[str, Any]:
    """A step's train metrics over every rank's sampled rollouts: reward, accuracy, format and think rates,
    lengths, and the share of groups without signal (zero reward variance)."""
    lengths = [len(r.completion_ids) for r in sampled]
    rewards = [r.reward for r in sampled]
    sums = {
        "reward": sum(rewards),
        "reward_sq": sum(x * x for x in rewards),
        "accuracy": sum(0.0 if r.truncated else accuracy_reward("", r.text, r.example) for r in sampled),
        "format": sum(format_reward("", r.text, {}) for r in sampled),
        "think": sum(float(has_reasoning(r.text)) for r in sampled),
        "truncated": sum(float(r.truncated) for r in sampled),
        "length": float(sum(lengths)),
        "n": float(len(sampled)),
        "zero_groups": float(zero_groups),
        "groups": float(groups),
        "kept": float(kept),
    }
    if env.distributed:
        reduced = all_reduce(torch.tensor(list(sums.values()), dtype=torch.float64), env).tolist()
        sums = dict(zip(sums, reduced))
    n = sums["n"]
    return {
        "reward_mean": sums["reward"] / n,
        "reward_std": math.sqrt(max(sums["reward_sq"] / n - (sums["reward"] / n) ** 2, 0.0)),
        "accuracy": sums["accuracy"] / n,
        "format_rate": sums["format"] / n,
        "think_rate": sums["think"] / n,
        "frac_zero_std": sums["zero_groups"] / sums["groups"],
        "groups_kept": int(sums["kept"]),
        "response_len": sums["length"] / n,
        "response_len_max": int(all_reduce(torch.tensor(max(lengths)), env, op="max").item()),
        "frac_truncated": sums["truncated"] / n,
    }


def evaluate_policy(engine: Engine, examples: list[dict], max_new_tokens: int) -> dict[str, Any]:
    """Held-out greedy accuracy, mean response length (tokens), format rate and think rate, from
    `nanoseek.eval.evaluate` (chat format), as flat `eval_*` metrics; with several levels, accuracy, think rate
    and response length per level too (`eval_*_by_level`: {level: value})."""
    from nanoseek.eval.evaluate import evaluate

    res = evaluate(engine, examples, fmt="chat", max_tokens=max_new_tokens)
    thinks: dict[str, list[bool]] = {}
    for r in res["results"]:
        thinks.setdefault(r["level"], []).append(has_reasoning(r["completion"]))
    out: dict[str, Any] = {
        "eval_accuracy": res["accuracy"],
        "eval_response_len": res["mean_length"],
        "eval_format_rate": res["format_rate"],
        "eval_think_rate": float(np.mean([t for group in thinks.values() for t in group])),
        "eval_n": res["n"],
    }
    if len(res["levels"]) > 1:
        levels = sorted(res["levels"].items())
        out["eval_accuracy_by_level"] = {name: lv["accuracy"] for name, lv in levels}
        out["eval_think_rate_by_level"] = {name: float(np.mean(thinks[name])) for name, _ in levels}
        out["eval_response_len_by_level"] = {name: lv["mean_length"] for name, lv in levels}
    return out
