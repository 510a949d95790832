"""The speedrun's evaluations: the fixed held-out problem set, each stage's greedy and pass@k accuracy, expert
load and MTP acceptance. Each stage's result is returned to the report and kept in eval/<stage>.json, so a resumed
run reports a stage evaluated before the interruption from its file."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from nanoseek.io import atomic_write_text
from nanoseek.speedrun.recipe import EVAL_SEED, TASK, Recipe, checkpoint_of
from nanoseek.tasks.problems import LEVELS
from nanoseek.tasks.rewards import has_reasoning
from nanoseek.tokenizer import THINK_END, THINK_START

LEVEL_NAMES = list(LEVELS[TASK])
# Levels whose operands have two digits: a product or sum there needs carries, which the worked solutions write
# out step by step, so these are where reasoning should pay; the one-digit levels are one table look-up.
MULTI_DIGIT_LEVELS = [lv for lv in LEVEL_NAMES if LEVELS[TASK][lv][-1] > 9]
STAGES = ("pretrain", "sft", "grpo")  # the stages evaluated, in order
STAGE_TITLES = {"pretrain": "pretrain", "sft": "+ SFT (cold start)", "grpo": "+ GRPO"}
EXAMPLE_LEVELS = ("2x2", "3x12", "4x12")  # one example conversation from each, the same problems at every stage


def eval_problems(eval_n: int) -> list[dict]:
    """The held-out set: up to eval_n distinct `test` problems spread evenly over the levels (fixed seed)."""
    from nanoseek.tasks.sources import task_eval_examples

    return task_eval_examples(TASK, None, eval_n, "test", seed=EVAL_SEED)


def passk_subset(problems: list[dict], n: int) -> list[dict]:
    """The first n / levels problems of each level (the pass@k subset)."""
    per = max(1, n // len(LEVEL_NAMES))
    out, seen = [], {lv: 0 for lv in LEVEL_NAMES}
    for p in problems:
        if seen.get(p["level"], per) < per:
            out.append(p)
            seen[p["level"]] += 1
    return out


@torch.no_grad()
def expert_load(model, tokenizer, problems: list[dict]) -> list[list[float]]:
    """Tokens routed to each expert over the worked pretraining text of `problems`, / the mean: [MoE layer][expert]
    (1.0 everywhere = perfectly balanced)."""
    texts = [f"{p['prompt']} {THINK_START}{THINK_END} {p['answer']}\n" for p in problems[:256]]
    ids = [tokenizer.encode(t, bos=True) for t in texts]
    T = max(len(x) for x in ids)
    batch = torch.full((len(ids), T), tokenizer.pad_id, dtype=torch.long)
    for i, x in enumerate(ids):
        batch[i, : len(x)] = torch.tensor(x)
    model(batch.to(next(model.parameters()).device))
    loads = model.expert_loads().float()
    if loads.numel() == 0:
        return []
    return (loads / loads.mean(dim=1, keepdim=True).clamp(min=1e-9)).tolist()


def reasoning_by_level(rows: list[dict]) -> dict[str, dict[str, list[int]]]:
    """Per level, from `evaluate`'s per-problem rows: [n, correct] of the completions that write steps in <think>
    (`steps`) and of the answer-only ones (`answer_only`); counts, so that stages pool exactly."""
    out: dict[str, dict[str, list[int]]] = {}
    for r in rows:
        lv = out.setdefault(r["level"], {"steps": [0, 0], "answer_only": [0, 0]})
        kind = lv["steps"] if has_reasoning(r["completion"]) else lv["answer_only"]
        kind[0] += 1
        kind[1] += int(r["correct"])
    return out


def evaluate_stage(out: Path, stage: str, model_dir: Path, fmt: str, recipe: Recipe) -> dict[str, Any]:
    """Score one stage's model on the held-out set; returns the result and keeps it in eval/<stage>.json
    (atomically). Per level: accuracy (`levels`), pass@k, the share of greedy completions that reason
    (`think_levels`), their mean length in tokens (`length_levels`) and accuracy with steps vs answer-only
    (`reasoning_levels`)."""
    from nanoseek.eval.evaluate import evaluate
    from nanoseek.infer.engine import Engine

    problems = eval_problems(recipe.eval_n)
    device = None if recipe.device == "auto" else recipe.device
    if device is None and torch.cuda.is_available():
        device = "cuda"
    # fast=False: the fast path's first build (minutes of CPU in a background process) would share the cores
    # with the next training stage inside the speedrun's time budget; these evals take tens of seconds eager
    engine = Engine.from_pretrained(
        model_dir, device=device, max_batch_size=128 if device == "cuda" else 64, fast=False
    )
    t0 = time.time()
    print(f"== eval {stage}: {len(problems)} held-out problems, greedy; pass@{recipe.k} on a subset", flush=True)
    greedy = evaluate(engine, problems, fmt=fmt, max_tokens=recipe.eval_max_tokens)
    subset = passk_subset(problems, recipe.passk_n)
    sampled = evaluate(engine, subset, fmt=fmt, k=recipe.k, max_tokens=recipe.eval_max_tokens, seed=1)
    rows = greedy.pop("results")
    examples = []
    for lv in EXAMPLE_LEVELS:
        row = next((r for r in rows if r["level"] == lv), None)
        if row is not None:
            examples.append({k: row[k] for k in ("level", "prompt", "answer", "completion", "correct")})
    reasoning = reasoning_by_level(rows)
    result = {
        "stage": stage,
        "model": str(model_dir),
        "format": fmt,
        **greedy,
        "think_rate": sum(has_reasoning(r["completion"]) for r in rows) / len(rows),
        f"pass@{recipe.k}": sampled[f"pass@{recipe.k}"],
        "sampled_accuracy": sampled["sampled_accuracy"],
        "passk_n": len(subset),
        "passk_levels": {lv: s[f"pass@{recipe.k}"] for lv, s in sampled["levels"].items()},
        "think_levels": {lv: v["steps"][0] / greedy["levels"][lv]["n"] for lv, v in reasoning.items()},
        "length_levels": {lv: v["mean_length"] for lv, v in greedy["levels"].items()},
        "reasoning_levels": reasoning,
        "correct": [r["correct"] for r in rows],
        "prompts": [r["prompt"] for r in rows],
        "examples": examples,
        "expert_load": expert_load(engine.model, engine.tokenizer, problems),
        "seconds": time.time() - t0,
    }
    (out / "eval").mkdir(exist_ok=True)
    atomic_write_text(out / "eval" / f"{stage}.json", json.dumps(result, indent=1) + "\n")
    print(f"eval {stage}: accuracy {100 * result['accuracy']:.1f}% on {result['n']} problems", flush=True)
    return result


def read_eval(out: Path, stage: str) -> dict[str, Any]:
    """The result `evaluate_stage` kept for a stage that a resumed run does not evaluate again."""
    return json.loads((out / "eval" / f"{stage}.json").read_text())


def mtp_acceptance(out: Path, recipe: Recipe) -> float | None:
    """Share of MTP drafts the pretrained model accepts in self-speculative greedy decoding of 64 prompts."""
    from nanoseek.infer.engine import Engine
    from nanoseek.tasks.sources import prompt_ids

    engine = Engine.from_pretrained(checkpoint_of(out / "pretrain"), speculative=True, max_batch_size=64)
    problems = eval_problems(recipe.eval_n)[:64]
    engine.generate([prompt_ids(engine.tokenizer, p["prompt"], "pretrain") for p in problems], max_tokens=64)
    return engine.acceptance_rate()
