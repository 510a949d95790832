"""Verifiable rewards for GRPO: `(prompt, completion, example) -> float`, built on `tasks.verify`."""

from __future__ import annotations

from collections.abc import Callable

from nanoseek.tasks.problems import THINK_END, THINK_START
from nanoseek.tasks.verify import has_format, is_correct, to_item

RewardFn = Callable[[str, str, dict], float]  # (prompt, completion text, example) -> reward


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
