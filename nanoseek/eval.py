"""Accuracy on verifiable tasks (`nanoseek eval`): greedy pass@1, sampled pass@k, length, format, per level.

A problem is a `Problem` from `nanoseek.data.tasks` or a dict `{"prompt", "answer"[, "task", "level"]}` (an
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

import argparse
import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from nanoseek.data.tasks import (
    LEVELS,
    THINK_END,
    THINK_START,
    Problem,
    countdown_value,
    extract_answer,
    generate,
    verify,
)
from nanoseek.infer.sampling import SamplingParams

FORMATS = ("pretrain", "chat")
NO_LEVEL = "-"  # level name for problems that carry none (e.g. a user's .jsonl)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:/\d+)?")
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
        numbers = _NUMBER.findall(pred_text[-200:])
        pred = exact_value(numbers[-1]) if numbers else None
    return pred is not None and pred == gold


def has_format(completion: str) -> bool:
    """True iff the completion is exactly one `<think>...</think>` block (possibly empty) followed by a non-empty
    answer. The one rule for the format rate here and GRPO's format reward."""
    text = completion.strip()
    if not text.startswith(THINK_START) or text.count(THINK_START) != 1 or text.count(THINK_END) != 1:
        return False
    return bool(text.split(THINK_END, 1)[1].strip())


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021, eq. 1): 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def prompt_ids(tokenizer, prompt: str, fmt: str) -> list[int]:
    """Token ids of one prompt in the given format (see the module docstring)."""
    if fmt == "pretrain":
        return tokenizer.encode(f"{prompt} ", bos=True)
    if fmt == "chat":
        return tokenizer.encode_chat([{"role": "user", "content": prompt}], add_generation_prompt=True)
    raise ValueError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")


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


# ----------------------------------------------------------------------------- problems


def read_prompt_file(path: str | Path) -> list[dict]:
    """`{prompt, answer}` lines of a .jsonl file (other fields are kept, e.g. for reward functions); errors name the
    file and line."""
    out = []
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg}): each line is {{prompt, answer}}") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or "answer" not in obj:
            raise ValueError(f"{path}:{lineno}: each line needs a string 'prompt' and an 'answer'")
        try:
            to_item(obj)  # a bad 'task' fails here, not mid-run
        except ValueError as e:
            raise ValueError(f"{path}:{lineno}: {e}") from None
        out.append(obj)
    return out


def load_problems(
    task: str, levels: list[str] | None = None, n: int = 200, split: str = "test", seed: int = 0
) -> list[Problem | Item]:
    """Built-in problems (n per level; all levels by default), or every line of a .jsonl file."""
    if task not in LEVELS:
        if levels:
            raise ValueError("--level applies to built-in tasks; a .jsonl file's lines may carry a 'level' field")
        path = Path(task)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file (tasks: {', '.join(LEVELS)}, or a .jsonl file)")
        return [to_item(obj) for obj in read_prompt_file(path)]  # each line checked there (errors name it)
    return [p for level in levels or list(LEVELS[task]) for p in generate(task, n, seed, split, level)]


# ----------------------------------------------------------------------------- CLI


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


def _cmd_eval(args: argparse.Namespace) -> None:
    from nanoseek.checkpoint import resolve_model_dir
    from nanoseek.infer.engine import Engine

    args.model = resolve_model_dir(args.model)  # a run folder means its latest checkpoint
    problems = load_problems(args.task, args.level, args.n, args.split, args.seed)
    engine = Engine.from_pretrained(args.model, max_batch_size=args.batch_size)
    if engine.tokenizer is None:
        raise FileNotFoundError(f"{args.model} has no tokenizer.json: evaluation needs the model's tokenizer")
    result = evaluate(engine, problems, args.format, args.k, args.samples, args.temperature, args.max_tokens, args.seed)
    result.pop("results")
    if args.json:
        info = {"model": str(args.model), "task": args.task, "format": args.format, "split": args.split}
        print(json.dumps({**info, **result, "k": args.k}))
        return
    how = "accuracy greedy"
    if "sampled_accuracy" in result:
        samples = args.samples or args.k
        how += f"; sampled and pass@{args.k} from {samples} samples per problem at temperature {args.temperature}"
    print(f"{args.model}: {args.task} ({args.split} split), format {args.format}, {how}")
    print(format_table(result, args.k))


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="accuracy of a model on arithmetic / countdown / a .jsonl of problems")
    p.add_argument("--model", required=True, help="model directory (HF format, with tokenizer.json)")
    p.add_argument("--task", required=True, help="arithmetic, countdown, or FILE.jsonl with {prompt, answer} lines")
    p.add_argument("--level", nargs="+", help="built-in levels to score (default: all), e.g. 2x1 3x12")
    p.add_argument("--n", type=int, default=200, help="built-in problems per level (default 200)")
    p.add_argument("--split", default="test", help="built-in split: train, val or test (default test)")
    p.add_argument("--seed", type=int, default=0, help="problem generation and sampling seed")
    p.add_argument("--k", type=int, default=1, help="also report pass@k from sampled completions (default 1: off)")
    p.add_argument("--samples", type=int, help="sampled completions per problem (default k when k > 1)")
    p.add_argument("--temperature", type=float, default=1.0, help="temperature of the sampled completions")
    p.add_argument("--max-tokens", type=int, default=128, help="completion length limit (default 128)")
    p.add_argument(
        "--format",
        default="pretrain",
        choices=FORMATS,
        help="pretrain: raw text prefix (any pretrained model, default); chat: chat template (SFT/GRPO models)",
    )
    p.add_argument("--batch-size", type=int, default=64, help="sequences decoded together (default 64)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.set_defaults(func=_cmd_eval)
