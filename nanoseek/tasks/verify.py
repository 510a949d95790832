"""Is this answer right? Answer extraction, the built-in tasks' verifiers and the format check: the one
place `nanoseek eval`, GRPO's rewards, distillation and the speedrun's report ask."""

from __future__ import annotations

import ast
import re
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction

from nanoseek.tasks.problems import _GENERATORS, EOS_TEXT, LEVELS, THINK_END, THINK_START, VERIFY_LIMIT, Problem

MAX_ANSWER_CHARS = 200  # bounds parser work on adversarial completions


def extract_answer(completion: str) -> str | None:
    """The final-answer text of a completion (see the module docstring), stripped; None if absent."""
    text = completion.replace(EOS_TEXT, "")
    if THINK_END in text:
        text = text.rsplit(THINK_END, 1)[1]
    elif THINK_START in text:
        return None  # reasoning never finished
    text = text.strip()
    return text or None


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def verify_arithmetic(completion_or_answer: str, reference: str | int) -> bool:
    """True iff the last number in the final answer equals the integer reference."""
    answer = extract_answer(completion_or_answer)
    if answer is None:
        return False
    numbers = _NUMBER.findall(answer[-MAX_ANSWER_CHARS:])
    if not numbers:
        return False
    last = numbers[-1]
    if "." in last:
        whole, frac = last.split(".")
        if frac.strip("0"):
            return False  # 653.5 is not an integer answer
        last = whole
    return int(last) == int(reference)


_EXPR_CHARS = re.compile(r"[\d\s+\-*/()]+")


_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}


def _evaluate(node: ast.AST, used: list[int]) -> Fraction:
    """Exact value of a whitelisted expression tree; raises ValueError on anything else."""
    if isinstance(node, ast.Constant) and type(node.value) is int:
        if node.value > VERIFY_LIMIT:
            raise ValueError("number too large")
        used.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_evaluate(node.operand, used)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        a, b = _evaluate(node.left, used), _evaluate(node.right, used)
        op = _OPS[type(node.op)]
        if op == "/" and b == 0:
            raise ValueError("division by zero")
        v = a + b if op == "+" else a - b if op == "-" else a * b if op == "*" else a / b
        if abs(v) > VERIFY_LIMIT:
            raise ValueError("intermediate value too large")
        return v
    raise ValueError(f"not allowed: {type(node).__name__}")


def countdown_value(expr: str, numbers: list[int]) -> Fraction | None:
    """Exact value of expr if it uses + - * / ( ) and each of numbers exactly once, else None."""
    if len(expr) > MAX_ANSWER_CHARS or not _EXPR_CHARS.fullmatch(expr):
        return None  # also rules out names, calls, `**` is caught below, floats, hex, underscores
    try:
        tree = ast.parse(expr.strip(), mode="eval")
        used: list[int] = []
        value = _evaluate(tree.body, used)
    except (SyntaxError, ValueError, RecursionError, MemoryError, ZeroDivisionError):
        return None
    return value if Counter(used) == Counter(numbers) else None


def verify_countdown(completion_or_answer: str, numbers: list[int], target: int) -> bool:
    """True iff the final answer is an expression over numbers (each exactly once) equal to target."""
    answer = extract_answer(completion_or_answer)
    if answer is None:
        return False
    if "=" in answer:  # allow `expr = target`
        answer, _, rhs = answer.partition("=")
        if rhs.strip() != str(target):
            return False
    value = countdown_value(answer.strip(), numbers)
    return value is not None and value == target


def verify(task: str, completion: str, problem_or_answer: Problem | dict | str) -> bool:
    """Reward check for any task: against a Problem, an rl_example dict or a reference answer string.

    A countdown reference answer string is enough on its own: its numbers are the given numbers
    and its value is the target.
    """
    p = problem_or_answer
    reference = p.answer if isinstance(p, Problem) else p["answer"] if isinstance(p, dict) else str(p)
    if task == "arithmetic":
        return verify_arithmetic(completion, reference)
    if task == "countdown":
        numbers = [int(x) for x in re.findall(r"\d+", reference)]
        target = countdown_value(reference, numbers)
        if target is None or target.denominator != 1:
            raise ValueError(f"countdown reference {reference!r} is not a valid integer expression")
        return verify_countdown(completion, numbers, int(target))
    raise ValueError(f"unknown task {task!r}: choose one of {sorted(_GENERATORS)}")


NO_LEVEL = "-"  # level name for problems that carry none (e.g. a user's .jsonl)


_EXACT_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:/\d+)?")


EXACT = "exact"  # the task of `{prompt, answer}` data without one: see `answer_matches`


@dataclass(frozen=True)
class Item:
    """One problem as the evaluator sees it. task: arithmetic | countdown (the built-in verifiers) | exact."""

    prompt: str
    answer: str
    task: str
    level: str = NO_LEVEL


def to_item(problem: Problem | dict | Item) -> Item:
    """Normalise a Problem or a `{prompt, answer[, task, level]}` dict; without a task, the answer is checked by
    `answer_matches` (exact value, or exact text)."""
    if isinstance(problem, Item):
        return problem
    if isinstance(problem, Problem):
        return Item(problem.prompt, problem.answer, problem.task, str(problem.meta.get("level") or NO_LEVEL))
    if not isinstance(problem, dict) or "prompt" not in problem or "answer" not in problem:
        raise ValueError(f"a problem needs 'prompt' and 'answer', got {problem!r:.200}")
    task = problem.get("task") or EXACT
    if task != EXACT and task not in LEVELS:
        raise ValueError(f"unknown task {task!r}: choose one of {sorted(LEVELS)}, or leave it out")
    answer, level = str(problem["answer"]).strip(), problem.get("level")
    if task == "arithmetic" and not re.fullmatch(r"-?\d+", answer):
        raise ValueError(f"an arithmetic answer is an integer, got {answer!r}")
    if task == "countdown":
        verify(task, "", answer)  # raises on a reference that is not an integer-valued expression
    return Item(str(problem["prompt"]), answer, task, NO_LEVEL if level is None else str(level))


def is_correct(item: Item, completion: str) -> bool:
    """Check a completion's final answer: the task's verifier (see `nanoseek.data.tasks`), else `answer_matches`.
    GRPO's accuracy reward is this same check."""
    if item.task in LEVELS:
        return verify(item.task, completion, item.answer)
    return answer_matches(completion, item.answer)


def exact_value(text: str) -> Fraction | None:
    """Exact value of a number (`12`, `-3.5`, `7/2`) or a + - * / ( ) expression (AST whitelist, never eval)."""
    text = text.strip().replace(",", "").replace("\u2212", "-")
    if not text:
        return None
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        pass
    literals = [int(x) for x in re.findall(r"\d+", text)]
    return countdown_value(text, literals)  # whitelisted evaluator of tasks.py; literals = its own numbers


def answer_matches(completion: str, answer: str) -> bool:
    """The check for `{prompt, answer}` data: the final answer (text after `</think>`) must have the exact value
    of a numeric or expression reference (read as one expression, `... = value`, or else its last number:
    `3.50` matches `7/2`); a reference without a value (text) must equal the final answer up to case and spacing."""
    pred_text = extract_answer(completion)
    if pred_text is None:
        return False
    gold = exact_value(str(answer))
    if gold is None:
        return " ".join(pred_text.split()).casefold() == " ".join(str(answer).split()).casefold()
    pred_text = pred_text.split("=")[-1] if "=" in pred_text else pred_text  # `3*4 = 12` -> 12
    pred = exact_value(pred_text)
    if pred is None:
        numbers = _EXACT_NUMBER.findall(pred_text[-200:])
        pred = exact_value(numbers[-1]) if numbers else None
    return pred is not None and pred == gold


def has_format(completion: str) -> bool:
    """True iff the completion is exactly one `<think>...</think>` block (possibly empty) followed by a non-empty
    answer. The one rule for the format rate here and GRPO's format reward."""
    text = completion.strip()
    if not text.startswith(THINK_START) or text.count(THINK_START) != 1 or text.count(THINK_END) != 1:
        return False
    return bool(text.split(THINK_END, 1)[1].strip())
