import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoseek.tasks.problems import (
    ARITHMETIC_LEVELS,
    COUNTDOWN_LEVELS,
    builtin_corpus,
    generate,
    split_of,
    worked_step,
)
from nanoseek.tasks.verify import countdown_value, extract_answer, verify, verify_arithmetic, verify_countdown


def test_arithmetic_worked_example_multiplies_first():
    p = next(p for p in generate("arithmetic", 500, seed=0, level="3x12") if "*" in p.prompt and "+" in p.prompt)
    expr = p.meta["canonical"]
    assert p.prompt == f"What is {expr}?"
    assert p.steps[0].split("=")[0].count("*") == 1  # multiplication is the first step
    assert int(p.answer) == eval(expr)  # test-only cross-check on a digits-and-operators string
    text = p.pretrain_text()
    assert text == f"{p.prompt} <think>{' '.join(p.steps)}</think> {p.answer}\n"


@pytest.mark.parametrize("level", list(ARITHMETIC_LEVELS))
def test_arithmetic_levels_shape_and_range(level):
    n_ops, lo, hi = ARITHMETIC_LEVELS[level]
    for p in generate("arithmetic", 50, seed=3, level=level):
        operands = [int(x) for x in re.findall(r"\d+", p.meta["canonical"])]
        assert len(operands) == n_ops and all(lo <= x <= hi for x in operands)
        assert len(p.steps) == n_ops - 1
        values = [int(s.rsplit("=", 1)[1]) for s in p.steps]
        assert all(0 <= v <= 9999 for v in values) and values[-1] == int(p.answer)


@pytest.mark.parametrize("level", list(ARITHMETIC_LEVELS))
def test_arithmetic_steps_are_true_place_value_chains(level):
    """Every `=` of a worked step is true; an expansion splits into place values (one nonzero digit each), and
    each `=` after it combines exactly the first two terms, so every `=` asks for one digit fact or one carry."""
    place = re.compile(r"^(0|[1-9]0*)$")
    for p in generate("arithmetic", 100, seed=5, level=level):
        for step in p.steps:
            sides = step.split("=")
            assert len({eval(side) for side in sides}) == 1, step  # test-only: digits and + - * only
            if len(sides) == 2:
                continue
            if "*" in sides[0]:
                factors = [f for term in sides[1].split("+") for f in term.split("*")]
            else:
                factors = re.split(r"[+-]", sides[1])[1:]
            assert all(place.match(f) for f in factors), step
            terms = [len(re.split(r"[+-]", side)) for side in sides[1:]]
            assert terms[-1] == 1 and all(b == a - 1 for a, b in zip(terms[1:], terms[2:])), step


def test_arithmetic_steps_work_in_place_values():
    steps = {
        (79, "*", 9): "79*9=70*9+9*9=630+81=711",
        (45, "*", 67): "45*67=40*60+40*7+5*60+5*7=2400+280+300+35=2680+300+35=2980+35=3015",
        (719, "-", 66): "719-66=719-60-6=659-6=653",
        (8, "+", 711): "8+711=8+700+10+1=708+10+1=718+1=719",
        (7, "*", 8): "7*8=56",
        (90, "*", 3): "90*3=270",
        (0, "*", 45): "0*45=0",
        (30, "+", 40): "30+40=70",
    }
    for (a, op, b), text in steps.items():
        assert worked_step(a, op, b) == text


@pytest.mark.parametrize("level", list(COUNTDOWN_LEVELS))
def test_countdown_reference_uses_each_number_once_and_hits_target(level):
    for p in generate("countdown", 100, seed=1, level=level):
        numbers, target = p.meta["numbers"], p.meta["target"]
        assert len(numbers) == COUNTDOWN_LEVELS[level][0] and len(p.steps) == len(numbers) - 1
        assert countdown_value(p.answer, numbers) == target
        assert verify("countdown", p.completion(), p)
        assert verify("countdown", p.completion(), p.rl_example())
        assert verify("countdown", p.completion(), p.answer)  # the reference string alone is enough


def test_generation_is_deterministic_by_seed():
    a = [p.prompt for p in generate("countdown", 20, seed=7)]
    assert a == [p.prompt for p in generate("countdown", 20, seed=7)]
    assert a != [p.prompt for p in generate("countdown", 20, seed=8)]


@pytest.mark.parametrize("task", ["arithmetic", "countdown"])
def test_splits_do_not_overlap(task):
    seen = {s: {p.meta["canonical"] for p in generate(task, 300, seed=0, split=s)} for s in ("train", "val", "test")}
    assert not seen["train"] & seen["val"] and not seen["train"] & seen["test"] and not seen["val"] & seen["test"]
    assert all(split_of(c) == s for s, cs in seen.items() for c in cs)


def test_chat_and_rl_renderings():
    p = generate("arithmetic", 1, seed=0, level="4x12")[0]
    user, assistant = p.chat()
    assert user == {"role": "user", "content": p.prompt}
    assert assistant["content"] == f"<think>{' '.join(p.steps)}</think> {p.answer}"
    assert p.chat(worked=False)[1]["content"] == f"<think></think> {p.answer}"
    rl = p.rl_example()
    assert rl["prompt"] == p.prompt and rl["answer"] == p.answer and rl["task"] == "arithmetic"


def test_pretraining_corpus_mixes_worked_and_answer_only_texts():
    """`worked_fraction` decides each problem's rendering by the seed: the same problems in the same order, a
    share of them answer-only, reproducibly; 1.0 (the default) keeps every worked solution."""
    full = builtin_corpus(400, seed=3, tasks=("arithmetic",))
    mixed = builtin_corpus(400, seed=3, tasks=("arithmetic",), worked_fraction=0.7)
    assert mixed == builtin_corpus(400, seed=3, tasks=("arithmetic",), worked_fraction=0.7)
    assert all("<think></think>" not in t for t in full)
    bare = [m for m in mixed if "<think></think>" in m]
    assert 0.2 < len(bare) / len(mixed) < 0.4
    for f, m in zip(full, mixed):
        assert m == f or m == f.split("<think>")[0] + "<think></think> " + f.split("</think> ")[1]
    with pytest.raises(ValueError, match="worked_fraction"):
        builtin_corpus(10, worked_fraction=1.5)


def test_unknown_task_level_or_split_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown task"):
        generate("poetry", 1, 0)
    with pytest.raises(ValueError, match="level"):
        generate("arithmetic", 1, 0, level="9x9")
    with pytest.raises(ValueError, match="split"):
        generate("arithmetic", 1, 0, split="dev")


@pytest.mark.parametrize(
    "completion, ok",
    [
        ("653", True),
        (" 653 ", True),
        ("= 653", True),
        ("The answer is 653", True),
        ("653.0", True),
        ("<think>79*9=711 8+711=719 719-66=653</think> 653<｜end▁of▁sentence｜>", True),
        ("<think>653</think> 652", False),  # only the text after </think> counts
        ("<think>79*9=711 8+711=719 719-66=653", False),  # unfinished reasoning has no answer
        ("653.5", False),
        ("6530", False),
        ("", False),
        ("no idea", False),
    ],
)
def test_verify_arithmetic_answer_rule(completion, ok):
    assert verify_arithmetic(completion, "653") is ok


@pytest.mark.parametrize(
    "answer, ok",
    [
        ("(25-5)*4/2", True),
        ("4*(25-5)/2 = 40", True),
        ("(25-5)*4/2 = 41", False),
        ("(25-5)*4", False),  # unused number
        ("(25-5)*4/2+2-2", False),  # repeated number
        ("(25-5)*4/2*1", False),  # number not given
        ("(25-5)**4/2", False),
        ("__import__('os')", False),
        ("abs(-40)", False),
        ("40.0", False),
        ("25/(5-5)*4*2", False),  # division by zero
        ("9999999-9999959+25-5+4-2-2", False),  # huge literal
    ],
)
def test_verify_countdown_rules(answer, ok):
    assert verify_countdown(f"<think>x</think> {answer}", [25, 5, 4, 2], 40) is ok


def test_countdown_division_is_exact_not_integer():
    assert verify_countdown("7/2*2+3-3", [7, 2, 2, 3, 3], 7)  # 7/2 = 3.5 exactly, no flooring


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.text())
def test_arithmetic_verifier_never_crashes_and_needs_the_answer(s):
    result = verify_arithmetic(s, "653")
    if result:
        assert "653" in s
    assert not verify_arithmetic(re.sub(r"\d", "", s), "653")


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.text(), st.integers(0, 9999))
def test_correct_arithmetic_answer_always_passes(prefix, answer):
    assert verify_arithmetic(f"{prefix.replace('</think>', '')}</think> {answer}", str(answer))


@settings(max_examples=500, deadline=None, derandomize=True)
@given(st.text(alphabet="0123456789+-*/() ", max_size=30) | st.text(max_size=30))
def test_countdown_verifier_never_crashes_or_accepts_wrong(expr):
    numbers, target = [25, 5, 4, 2], 40
    if verify_countdown(expr, numbers, target):
        # test-only cross-check: the string is digits/operators only, so eval is safe here
        assert sorted(int(x) for x in re.findall(r"\d+", expr)) == sorted(numbers)
        assert abs(eval(expr) - target) < 1e-9


@settings(max_examples=100, deadline=None, derandomize=True)
@given(st.integers(0, 10**6))
def test_generated_problems_always_verify(seed):
    for task in ("arithmetic", "countdown"):
        p = generate(task, 1, seed=seed)[0]
        assert verify(task, p.completion(), p) and verify(task, p.completion(worked=False), p)
        assert extract_answer(p.completion()) == p.answer
