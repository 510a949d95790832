"""Built-in verifiable reasoning tasks: multi-step arithmetic and countdown.

Every problem renders three ways: pretraining text with a worked solution, a chat SFT example and
an RL prompt with its reference answer. Problems are deterministic by seed, and each belongs to
exactly one split (train / val / test) by a stable hash of its canonical form, so held-out
problems never leak into training data.

Answer rule (all tasks): the final answer is the text after the last `</think>`; a completion
without think tags is taken whole, and one that opens `<think>` but never closes it has no answer.
Arithmetic then reads the last number in that text (`653`, `= 653`, `The answer is 653`, `653.0`);
countdown reads it as one expression, optionally followed by `= target`.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

THINK_START, THINK_END = "<think>", "</think>"
EOS_TEXT = "<｜end▁of▁sentence｜>"

# Split by sha1(canonical) % 100: [0, 90) train, [90, 95) val, [95, 100) test.
SPLITS = {"train": (0, 90), "val": (90, 95), "test": (95, 100)}

# Arithmetic levels: name -> (operands, lowest operand, highest operand); "12" means 1-2 digits.
ARITHMETIC_LEVELS = {
    "2x1": (2, 0, 9),
    "2x2": (2, 10, 99),
    "3x1": (3, 0, 9),
    "3x12": (3, 0, 99),
    "4x1": (4, 0, 9),
    "4x12": (4, 0, 99),
    "4x2": (4, 10, 99),
}
ARITH_MAX = 9999  # every intermediate value stays in 0..9999 (resampled otherwise)

# Countdown levels: name -> (how many numbers, highest number); the target is at most COUNTDOWN_MAX.
COUNTDOWN_LEVELS = {"3": (3, 25), "4": (4, 25)}
COUNTDOWN_MAX = 999
VERIFY_LIMIT = 10**6  # verifier rejects any literal or intermediate larger than this

LEVELS: dict[str, dict[str, tuple[int, int, int] | tuple[int, int]]] = {
    "arithmetic": ARITHMETIC_LEVELS,
    "countdown": COUNTDOWN_LEVELS,
}


@dataclass(frozen=True)
class Problem:
    task: str
    prompt: str
    steps: tuple[str, ...]  # worked solution, e.g. ("79*9=70*9+9*9=630+81=711", "8+711=8+700+11=...=719")
    answer: str  # reference answer: an integer for arithmetic, an expression for countdown
    meta: dict = field(default_factory=dict, compare=False)  # level, canonical form, numbers, target

    def completion(self, worked: bool = True) -> str:
        """`<think>steps</think> answer`, or `<think></think> answer` when worked is False."""
        steps = " ".join(self.steps) if worked else ""
        return f"{THINK_START}{steps}{THINK_END} {self.answer}"

    def pretrain_text(self, worked: bool = True) -> str:
        return f"{self.prompt} {self.completion(worked)}\n"

    def chat(self, worked: bool = True) -> list[dict]:
        return [
            {"role": "user", "content": self.prompt},
            {"role": "assistant", "content": self.completion(worked)},
        ]

    def rl_example(self) -> dict:
        return {
            "prompt": self.prompt,
            "answer": self.answer,
            "task": self.task,
            "level": self.meta.get("level"),
        }


def split_of(canonical: str) -> str:
    """The split a problem belongs to, from a stable hash of its canonical string."""
    bucket = int(hashlib.sha1(canonical.encode("utf-8")).hexdigest(), 16) % 100
    return next(name for name, (lo, hi) in SPLITS.items() if lo <= bucket < hi)


# ----------------------------------------------------------------------------- arithmetic


def _places(x: int) -> list[int]:
    """x as its nonzero place values, highest first: 4075 -> [4000, 70, 5] (0 -> [0])."""
    parts = [int(d) * 10**k for k, d in enumerate(reversed(str(x))) if d != "0"][::-1]
    return parts or [0]


def _chain(terms: list[int], op: str) -> str:
    """Reduce `t0 op t1 op t2 ...` left to right, one pair per `=`: `2400+280+35=2680+35=2715`."""
    out, terms = "+".join(map(str, terms)) if op == "+" else op.join(map(str, terms)), list(terms)
    while len(terms) > 1:
        v = terms[0] + terms[1] if op == "+" else terms[0] - terms[1]
        terms[:2] = [v]
        out += "=" + op.join(map(str, terms))
    return out


def worked_step(a: int, op: str, b: int) -> str:
    """One operation, worked in place values so that every `=` asks for one digit fact or one carry.

    `79*9=70*9+9*9=630+81=711`, `45*67=40*60+40*7+5*60+5*7=2400+280+300+35=2680+300+35=...=3015`,
    `719-66=719-60-6=659-6=653`, `8+711=711+8`... A small model cannot multiply two digits' worth of places
    in one token, but it can look up a digit product, append zeros and add one place at a time."""
    if op == "*":
        if (a < 10 and b < 10) or a == 0 or b == 0:
            return f"{a}*{b}={a * b}"
        pairs = [(x, y) for x in _places(a) for y in _places(b)]
        products = [x * y for x, y in pairs]
        expanded = "+".join(f"{x}*{y}" for x, y in pairs)
        head = f"{a}*{b}={expanded}" if len(pairs) > 1 else f"{a}*{b}"
        return f"{head}={_chain(products, '+')}" if len(pairs) > 1 else f"{head}={products[0]}"
    parts = _places(b)
    if len(parts) == 1:
        return f"{a}{op}{b}={a + b if op == '+' else a - b}"
    return f"{a}{op}{b}={_chain([a, *parts], op)}"


def _arith_steps(nums: list[int], ops: list[str]) -> tuple[list[str], int] | None:
    """Evaluate with `*` first, then `+ -` left to right, each operation worked in place values (`worked_step`);
    None if a value leaves 0..ARITH_MAX (the problem is then resampled: which problems exist depends only on
    this check, never on how the steps are written)."""
    nums, ops, steps = list(nums), list(ops), []
    for prec in ("*", "+-"):
        i = 0
        while i < len(ops):
            if ops[i] not in prec:
                i += 1
                continue
            a, b, op = nums[i], nums[i + 1], ops[i]
            v = a * b if op == "*" else a + b if op == "+" else a - b
            if not 0 <= v <= ARITH_MAX:
                return None
            steps.append(worked_step(a, op, b))
            nums[i : i + 2] = [v]
            del ops[i]
    return steps, nums[0]


def _arithmetic(rng: random.Random, level: str) -> Problem | None:
    n, lo, hi = ARITHMETIC_LEVELS[level]
    nums = [rng.randint(lo, hi) for _ in range(n)]
    ops = [rng.choice("+-*") for _ in range(n - 1)]
    solved = _arith_steps(nums, ops)
    if solved is None:
        return None
    steps, value = solved
    expr = "".join(f"{x}{op}" for x, op in zip(nums, ops)) + str(nums[-1])
    meta = {"level": level, "canonical": expr}
    return Problem("arithmetic", f"What is {expr}?", tuple(steps), str(value), meta)


# ----------------------------------------------------------------------------- countdown

_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}


def _join(left: tuple[str, int], op: str, right: tuple[str, int]) -> tuple[str, int]:
    """Combine (expression, precedence) pairs with the fewest parentheses that keep the value."""
    (ls, lp), (rs, rp), p = left, right, _PREC[op]
    if lp < p:
        ls = f"({ls})"
    if rp < p or (rp == p and op in "-/"):
        rs = f"({rs})"
    return f"{ls}{op}{rs}", p


def _countdown(rng: random.Random, level: str) -> Problem | None:
    count, hi = COUNTDOWN_LEVELS[level]
    numbers = [rng.randint(1, hi) for _ in range(count)]
    pool = [(x, (str(x), 3)) for x in numbers]  # (value, (expression, precedence)); atoms bind tightest
    steps = []
    while len(pool) > 1:  # combine two random entries, as a person solving countdown would
        (a, ea), (b, eb) = pool.pop(rng.randrange(len(pool))), pool.pop(rng.randrange(len(pool)))
        if a < b:
            (a, ea), (b, eb) = (b, eb), (a, ea)
        choices = ["+", "*"] + (["-"] if a > b else []) + (["/"] if b > 1 and a % b == 0 else [])
        op = rng.choice(choices)
        v = {"+": a + b, "-": a - b, "*": a * b, "/": a // b if b else 0}[op]
        if v > VERIFY_LIMIT:
            return None
        steps.append(f"{a}{op}{b}={v}")
        pool.append((v, _join(ea, op, eb)))
    target, (expr, _) = pool[0]
    if not 1 <= target <= COUNTDOWN_MAX or target in numbers:
        return None
    shown = " ".join(map(str, numbers))
    canonical = f"countdown {','.join(map(str, sorted(numbers)))}->{target}"
    meta = {"level": level, "canonical": canonical, "numbers": numbers, "target": target}
    prompt = f"Make {target} from {shown} using + - * / and each number once."
    return Problem("countdown", prompt, tuple(steps), expr, meta)


_GENERATORS = {"arithmetic": _arithmetic, "countdown": _countdown}


def generate(task: str, n: int, seed: int, split: str = "train", level: str | None = None) -> list[Problem]:
    """n problems of one task from one split; level None mixes all levels uniformly.

    Problems may repeat (small levels such as 2x1 hold only a few hundred problems).
    """
    if task not in _GENERATORS:
        raise ValueError(f"unknown task {task!r}: choose one of {sorted(_GENERATORS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: choose one of {list(SPLITS)}")
    levels = list(LEVELS[task])
    if level is not None and level not in LEVELS[task]:
        raise ValueError(f"unknown {task} level {level!r}: choose one of {levels}")
    rng = random.Random(f"{task}:{seed}:{split}:{level}")
    out: list[Problem] = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 1000 * n + 10000:
            raise RuntimeError(f"could not generate {n} {task} problems for split {split}")
        p = _GENERATORS[task](rng, level or rng.choice(levels))
        if p is not None and split_of(p.meta["canonical"]) == split:
            out.append(p)
    return out


def builtin_corpus(
    n: int,
    seed: int = 0,
    tasks: tuple[str, ...] = ("arithmetic", "countdown"),
    split: str = "train",
    worked_fraction: float = 1.0,
) -> list[str]:
    """Pretraining texts: n problems per task, all levels mixed, tasks interleaved; each worked with probability
    `worked_fraction`, else answer-only (`<think></think> answer`), as a web corpus holds both kinds."""
    if not 0 <= worked_fraction <= 1:
        raise ValueError(f"worked_fraction (--worked-fraction) must be in [0, 1], got {worked_fraction}")
    per_task = [generate(t, n, seed, split) for t in tasks]
    rng = random.Random(f"pretrain-worked:{seed}:{split}")
    return [p.pretrain_text(worked=rng.random() < worked_fraction) for group in zip(*per_task) for p in group]


# ----------------------------------------------------------------------------- verifiers
