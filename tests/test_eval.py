"""Evaluation: pass@k estimator, answer and format checks, prompt formats, per-level summaries, the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from nanoseek import load_model
from nanoseek.cli.main import main
from nanoseek.eval.evaluate import compare, evaluate, pass_at_k
from nanoseek.infer.engine import Completion, Engine
from nanoseek.tasks.problems import generate
from nanoseek.tasks.rewards import accuracy_reward
from nanoseek.tasks.sources import load_problems, prompt_ids
from nanoseek.tasks.verify import Item, has_format, is_correct, to_item


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # A tiny model is all per-op overhead: a second thread only adds synchronisation, and stalls on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tok) -> Engine:
    return Engine(load_model(tiny_model_dir), tok, max_batch_size=32)


class OracleEngine:
    """Stands in for the Engine: answers every known prompt correctly, in the given format, with `<think>`."""

    def __init__(self, tokenizer, problems, fmt):
        self.tokenizer = tokenizer
        self.answers = {tuple(prompt_ids(tokenizer, p.prompt, fmt)): p for p in problems}
        self.calls = []

    def generate(self, prompts, params=None, **kwargs):
        self.calls.append((len(prompts), params, kwargs))
        out = []
        for ids in prompts:
            p = self.answers[tuple(ids)]
            text = p.completion()
            out.append(Completion(text, self.tokenizer.encode(text), "stop", len(ids)))
        return out


def test_pass_at_k_matches_hand_computed_values():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(4, 1, 4) == 1.0  # every draw of 4 from 4 includes the correct one
    assert pass_at_k(8, 8, 1) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def test_format_rate_needs_a_closed_think_block_and_an_answer():
    assert has_format("<think>79*9=711 8+711=719</think> 719")
    assert has_format("<think></think> 653")
    assert has_format(" <think>a\nb</think>\n 5")
    assert not has_format("653")  # no think block
    assert not has_format("<think>79*9=711")  # never closed
    assert not has_format("<think>1+2=3</think>  ")  # no answer after it
    assert not has_format("so <think>x</think> 3")  # does not open with the think block
    assert not has_format("<think>a</think> 3 <think>b</think> 4")  # one think block only (as GRPO's reward)


def test_answers_are_checked_by_task_verifier_or_exactly():
    arith = to_item(generate("arithmetic", 1, seed=0, split="test")[0])
    assert is_correct(arith, f"<think>work</think> {arith.answer}")
    assert not is_correct(arith, f"<think>{arith.answer}")  # think not closed: no answer
    number = to_item({"prompt": "Half of 5?", "answer": 2.5})
    assert number.task == "exact"
    assert is_correct(number, "<think></think> = 2.50") and not is_correct(number, "<think></think> 2")
    half = to_item({"prompt": "7 halves?", "answer": "7/2"})  # a fraction reference (was a crash)
    assert is_correct(half, "<think></think> 3.5") and not is_correct(half, "<think></think> 3")
    text = to_item({"prompt": "Capital of France?", "answer": "Paris"})  # no value: exact text, any case/spacing
    assert is_correct(text, "<think>France</think>  paris ") and not is_correct(text, "<think></think> Lyon")
    # without a task an expression reference is a value; with task=countdown its numbers must be the ones used
    expr = {"prompt": "Make 16 from 3 5 2.", "answer": "(3+5)*2"}
    assert is_correct(to_item(expr), "<think></think> 16")
    cd = to_item({**expr, "task": "countdown"})
    assert is_correct(cd, "<think>3+5=8 8*2=16</think> 2*(5+3)")
    assert not is_correct(cd, "<think></think> 16")  # does not use the numbers
    with pytest.raises(ValueError, match="unknown task 'algebra'"):
        to_item({**expr, "task": "algebra"})
    with pytest.raises(ValueError, match="an arithmetic answer is an integer"):
        to_item({"prompt": "q", "answer": "seven", "task": "arithmetic"})
    with pytest.raises(ValueError, match="not a valid integer expression"):
        to_item({"prompt": "q", "answer": "7/2", "task": "countdown"})


def test_eval_and_grpo_reward_use_one_answer_rule():
    cases = [
        ({"answer": "653", "task": "arithmetic"}, ["<think></think> 653", "<think></think> 652", "653"]),
        ({"answer": "(3+5)*2", "task": "countdown"}, ["<think></think> 2*(5+3)", "<think></think> 16"]),
        ({"answer": "(3+5)*2"}, ["<think></think> 16", "<think></think> 2**4"]),
        ({"answer": "7/2"}, ["<think></think> 3.50", "<think></think> 7 / 2", "<think></think> 4"]),
        ({"answer": "Paris"}, ["<think></think> PARIS", "<think></think> Paris, France"]),
    ]
    for example, completions in cases:
        for c in completions:
            assert accuracy_reward("q", c, example) == float(is_correct(to_item({"prompt": "q", **example}), c))


def test_oracle_engine_scores_accuracy_and_format_one(tok):
    problems = load_problems("arithmetic", ["2x1", "3x12"], n=5)
    for fmt in ("pretrain", "chat"):
        r = evaluate(OracleEngine(tok, problems, fmt), problems, fmt, k=2, temperature=1.0)
        assert r["accuracy"] == r["format_rate"] == r["sampled_accuracy"] == r["pass@2"] == 1.0
        assert {name: s["n"] for name, s in r["levels"].items()} == {"2x1": 5, "3x12": 5}
        assert all(row["correct"] and row["n_correct"] == 2 for row in r["results"])
        assert r["mean_length"] == pytest.approx(sum(row["length"] for row in r["results"]) / 10)


def test_greedy_is_batched_and_samples_are_seeded_per_request(tok):
    problems = load_problems("arithmetic", ["2x1"], n=4)
    oracle = OracleEngine(tok, problems, "pretrain")
    evaluate(oracle, problems, "pretrain", k=3, temperature=0.7, seed=5)
    (n_greedy, _, greedy_kwargs), (n_sampled, params, _) = oracle.calls
    assert n_greedy == 4 and greedy_kwargs["temperature"] == 0.0 and greedy_kwargs["stop"] == ["\n"]
    assert n_sampled == 12 and len({p.seed for p in params}) == 12 and params[0].temperature == 0.7


def test_prompt_formats(tok):
    text = "What is 1+2?"
    assert tok.decode(prompt_ids(tok, text, "pretrain")) == f"{tok.bos_token}{text} "
    chat = tok.decode(prompt_ids(tok, text, "chat"))
    assert chat.startswith(tok.bos_token) and chat.endswith(f"{text}<｜Assistant｜>")
    with pytest.raises(ValueError):
        prompt_ids(tok, text, "plain")


def test_random_tiny_model_gives_valid_summary(engine):
    problems = load_problems("arithmetic", ["2x1", "4x2"], n=3)
    r = evaluate(engine, problems, "pretrain", k=2, max_tokens=6)
    for s in (r, *r["levels"].values()):
        assert 0 <= s["accuracy"] <= 1 and 0 <= s["format_rate"] <= 1 and 0 <= s["pass@2"] <= 1
        assert 0 < s["mean_length"] <= 6
    assert r["n"] == 6 and [s["n"] for s in r["levels"].values()] == [3, 3]
    assert [row["level"] for row in r["results"]] == ["2x1"] * 3 + ["4x2"] * 3
    again = evaluate(engine, problems, "pretrain", k=2, max_tokens=6)
    assert [row["completion"] for row in again["results"]] == [row["completion"] for row in r["results"]]
    assert [row["n_correct"] for row in again["results"]] == [row["n_correct"] for row in r["results"]]


def test_compare_counts_flips_with_a_sign_test():
    c = compare([False] * 10 + [True], [True] * 10 + [True])
    assert (c["wrong_to_right"], c["right_to_wrong"]) == (10, 0)
    assert c["p_value"] == pytest.approx(2 / 2**10)
    assert compare([True, False], [False, True])["p_value"] == 1.0
    assert compare([True], [True])["p_value"] == 1.0


def test_load_problems_builtin_and_jsonl(tmp_path):
    problems = load_problems("countdown", n=4, split="val")
    assert len(problems) == 8 and {p.meta["level"] for p in problems} == {"3", "4"}
    f = tmp_path / "probs.jsonl"
    f.write_text('{"prompt": "What is 2+3?", "answer": 5, "level": "easy"}\n\n{"prompt": "Make 6", "answer": "1+5"}\n')
    assert load_problems(str(f)) == [Item("What is 2+3?", "5", "exact", "easy"), Item("Make 6", "1+5", "exact")]
    f.write_text('{"prompt": "x", "answer": 1}\n{"prompt": "y", "answer": 2, "task": "algebra"}\n')
    with pytest.raises(ValueError, match="probs.jsonl:2: unknown task 'algebra'"):
        load_problems(str(f))
    f.write_text('{"prompt": "x"}\n')
    with pytest.raises(ValueError, match="probs.jsonl:1"):
        load_problems(str(f))
    with pytest.raises(FileNotFoundError):
        load_problems("arithmetik")


def test_cli_prints_json_and_table(tiny_model_dir, capsys):
    args = ["eval", "--model", str(tiny_model_dir), "--task", "arithmetic", "--max-tokens", "4"]
    assert main([*args, "--levels", "2x1", "3x1", "--n", "3", "--k", "2", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert {"accuracy", "format_rate", "mean_length", "n", "levels", "pass@2", "sampled_accuracy"} <= set(r)
    assert r["n"] == 6 and r["levels"]["3x1"]["n"] == 3 and "results" not in r
    assert main([*args, "--levels", "2x1", "--n", "2", "--format", "chat"]) == 0
    table = capsys.readouterr().out
    assert "2x1" in table and "all" in table and "accuracy" in table
    assert main([*args, "--task", "nope.jsonl"]) == 1  # a user error, not a traceback
    assert math.isfinite(r["mean_length"])


def test_cli_old_level_spelling_still_works_with_a_deprecation_message(tiny_model_dir, capsys):
    args = ["eval", "--model", str(tiny_model_dir), "--task", "arithmetic", "--max-tokens", "2", "--n", "2", "--json"]
    assert main([*args, "--level", "2x1", "3x1", "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["levels"].keys() == {"2x1", "3x1"}
    assert "--level is deprecated" in err and "use --levels" in err
