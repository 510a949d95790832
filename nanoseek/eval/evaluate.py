"""Accuracy on verifiable tasks (`nanoseek eval`): greedy pass@1, sampled pass@k, length, format, per level.

A problem is a `Problem` from `nanoseek.tasks.problems` or a dict `{"prompt", "answer"[, "task", "level"]}` (an
`rl_example()`, or a line of a user's .jsonl). Two prompt formats:
- `pretrain`: BOS + `"{prompt} "`, the pretraining text up to where the worked solution `<think>...` starts, so
  a model that has only been pretrained can be scored; generation stops at the end of the line.
- `chat`: the chat template with the generation prompt (`<｜User｜>{prompt}<｜Assistant｜>`), for SFT/GRPO models.

Every problem gets one greedy completion (accuracy, format rate, mean length). With `k > 1` (or `samples > 0`)
it also gets `samples` completions at `temperature`, scored with the unbiased pass@k estimator of Chen et al.
2021 and their mean success (sampled accuracy). Per-problem results are returned so that two evaluations of
the same problems can be compared flip by flip (`compare`).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

from nanoseek.infer.sampling import SamplingParams
from nanoseek.tasks.problems import Problem
from nanoseek.tasks.sources import prompt_ids
from nanoseek.tasks.verify import NO_LEVEL, Item, has_format, is_correct, to_item


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021, eq. 1): 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def _summary(rows: list[dict], k: int) -> dict[str, Any]:
    n = len(rows)
    out: dict[str, Any] = {
        "n": n,
        "accuracy": sum(r["correct"] for r in rows) / n,
        "format_rate": sum(r["format"] for r in rows) / n,
        "mean_length": sum(r["length"] for r in rows) / n,
    }
    if rows and "n_correct" in rows[0]:
        out["sampled_accuracy"] = sum(r["n_correct"] / r["n_samples"] for r in rows) / n
        out[f"pass@{k}"] = sum(pass_at_k(r["n_samples"], r["n_correct"], k) for r in rows) / n
    return out


def evaluate(
    engine,
    problems: list[Problem | dict | Item],
    fmt: str = "pretrain",
    k: int = 1,
    samples: int | None = None,
    temperature: float = 1.0,
    max_tokens: int = 128,
    seed: int = 0,
) -> dict[str, Any]:
    """Score `engine` (an `Engine` with a tokenizer) on problems; returns the summary as a dict.

    Keys: n, accuracy (greedy), format_rate, mean_length (completion tokens), per-level `levels` {name: same
    keys}, `results` (per problem: prompt, answer, level, correct, format, length, completion), and with
    sampling (samples > 0, default k when k > 1): sampled_accuracy, pass@k, and per result n_correct/n_samples.
    """
    if not problems:
        raise ValueError("no problems to evaluate")
    if engine.tokenizer is None:
        raise ValueError("evaluation needs the model's tokenizer (tokenizer.json in the model dir)")
    samples = (k if k > 1 else 0) if samples is None else samples
    if k < 1 or (k > 1 and samples < k):
        raise ValueError(f"pass@{k} needs at least k samples per problem, got {samples}")
    items = [to_item(p) for p in problems]
    prompts = [prompt_ids(engine.tokenizer, it.prompt, fmt) for it in items]
    # A pretraining document is one line: the model writes "\n" after the answer, then starts a new document.
    stop = ["\n"] if fmt == "pretrain" else []
    greedy = engine.generate(prompts, max_tokens=max_tokens, temperature=0.0, stop=stop)
    rows = [
        {
            "prompt": it.prompt,
            "answer": it.answer,
            "level": it.level,
            "correct": is_correct(it, c.text),
            "format": has_format(c.text),
            "length": len(c.token_ids),
            "completion": c.text,
        }
        for it, c in zip(items, greedy)
    ]
    if samples:
        # One seed per (problem, sample): the draws do not depend on batch composition or slot.
        params = [
            SamplingParams(temperature=temperature, max_tokens=max_tokens, stop=stop, seed=seed * 1_000_003 + j)
            for j in range(len(items) * samples)
        ]
        sampled = engine.generate([p for p in prompts for _ in range(samples)], params)
        for i, (it, row) in enumerate(zip(items, rows)):
            group = sampled[i * samples : (i + 1) * samples]
            row["n_samples"] = samples
            row["n_correct"] = sum(is_correct(it, c.text) for c in group)
    by_level: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_level[row["level"]].append(row)
    result = _summary(rows, k)
    result["levels"] = {name: _summary(group, k) for name, group in by_level.items()}
    result["results"] = rows
    return result


def compare(before: list[bool], after: list[bool]) -> dict[str, Any]:
    """Per-problem flips between two evaluations of the same problems, with a two-sided exact sign test."""
    if len(before) != len(after):
        raise ValueError(f"compare needs the same problems: {len(before)} vs {len(after)} results")
    gained = sum(not a and b for a, b in zip(before, after))
    lost = sum(a and not b for a, b in zip(before, after))
    n = gained + lost
    tail = sum(math.comb(n, i) for i in range(min(gained, lost) + 1))
    return {"wrong_to_right": gained, "right_to_wrong": lost, "p_value": min(1.0, 2 * tail / 2**n) if n else 1.0}


# ----------------------------------------------------------------------------- printing


def format_table(result: dict[str, Any], k: int) -> str:
    """Per-level rows and a total row: n, greedy accuracy, format rate, mean length (+ sampled metrics)."""
    sampled = "sampled_accuracy" in result
    head = f"{'level':<8}{'n':>6}{'accuracy':>10}{'format':>8}{'mean len':>10}"
    head += f"{'sampled':>9}{f'pass@{k}':>9}" if sampled else ""
    lines = [head]

    def row(name: str, s: dict) -> str:
        line = (
            f"{name:<8}{s['n']:>6}{100 * s['accuracy']:>9.1f}%{100 * s['format_rate']:>7.1f}%{s['mean_length']:>10.1f}"
        )
        if sampled:
            line += f"{100 * s['sampled_accuracy']:>8.1f}%{100 * s[f'pass@{k}']:>8.1f}%"
        return line

    levels = result["levels"]
    if len(levels) > 1 or NO_LEVEL not in levels:
        lines += [row(name, s) for name, s in levels.items()]
    lines.append(row("all", result))
    return "\n".join(lines)
