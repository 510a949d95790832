"""Where problems come from: built-in task prompts (endless training streams, fixed held-out sets), a user's
.jsonl of `{prompt, answer}`, and the token ids of a prompt in the pretrain or chat format."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

from nanoseek.tasks.problems import LEVELS, Problem, generate
from nanoseek.tasks.verify import Item, to_item

FORMATS = ("pretrain", "chat")  # prompt formats: see `prompt_ids`


def prompt_ids(tokenizer, prompt: str, fmt: str = "chat") -> list[int]:
    """Token ids of one prompt in the given format (see the module docstring)."""
    if fmt == "pretrain":
        return tokenizer.encode(f"{prompt} ", bos=True)
    if fmt == "chat":
        return tokenizer.encode_chat([{"role": "user", "content": prompt}], add_generation_prompt=True)
    raise ValueError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")


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
            raise ValueError("--levels applies to built-in tasks; a .jsonl file's lines may carry a 'level' field")
        path = Path(task)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file (tasks: {', '.join(LEVELS)}, or a .jsonl file)")
        return [to_item(obj) for obj in read_prompt_file(path)]  # each line checked there (errors name it)
    return [p for level in levels or list(LEVELS[task]) for p in generate(task, n, seed, split, level)]


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
