"""What decides a speedrun's result: the `Recipe` (every knob), its presets and overrides, and where each stage's
model is (`checkpoint_of`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nanoseek.checkpoint.run import latest_checkpoint
from nanoseek.train.optim import OPTIMIZERS

TASK = "arithmetic"


EVAL_SEED = 777  # the held-out problem set (test split): fixed, the same for every stage


@dataclass
class Recipe:
    """Everything that decides a speedrun's result. `--set FIELD=VALUE` overrides any field."""

    model_preset: str = "cpu-small"
    vocab_size: int = 512
    n: int = 150_000  # pretraining problems (worked in place values: ~9M tokens, more than pretraining reads)
    # share of pretraining problems worked (the rest answer-only, as web text holds both). At 0.4 the base answers
    # without steps (greedy skips them on every problem) yet has read enough worked text for SFT to turn the steps
    # on: pretrain < SFT < GRPO, R1's story (0.7-1.0 left a base that already reasons, which SFT's cold start could
    # only lower). BENCHMARKS.md, issue 19
    pretrain_worked_fraction: float = 0.4
    # pretraining on both cores (2 processes x batch 4 x 256 tokens a step, 3.7M tokens) with Muon, which reached
    # AdamW's 3,750-step validation loss in ~1,800 steps at 1.7x the time per step (BENCHMARKS.md, issue 19)
    pretrain_steps: int = 1800
    pretrain_batch: int = 4  # per process
    pretrain_lr: float = 4e-3
    pretrain_optim: str = "muon"  # muon (Newton-Schulz on the hidden matrices, AdamW on the rest) | adamw
    mtp_weight: float = 0.0
    # cold-start SFT: chat format; a few answer-only completions (`<think></think> answer`) so that the SFT policy
    # skips its steps on some problems and GRPO, rewarded by the verifier alone, learns where the steps pay
    sft_steps: int = 600
    sft_batch: int = 8  # per process
    sft_lr: float = 1e-3
    worked_fraction: float = 0.9  # greedy then skips its steps on ~40% of problems (0.95-1.0: on 0-2%)
    # GRPO (correctness reward only)
    grpo_steps: int = 40
    grpo_lr: float = 6e-5
    grpo_prompts: int = 8  # per process: 16 a step on 2 processes
    grpo_group: int = 8
    grpo_temperature: float = 1.0
    grpo_max_new_tokens: int = 256  # the longest worked solution (4x2) is ~230 tokens
    grpo_levels: str = ""  # space-separated; empty = all levels
    grpo_dynamic_sampling: bool = False
    grpo_eval_n: int = 100  # val problems for GRPO's periodic greedy eval (its curve in the report)
    # evaluation: >= 1,000 distinct held-out problems for the sign test; pass@k on a subset
    eval_n: int = 1400  # problems asked for, spread over the levels (duplicates of small levels dropped)
    passk_n: int = 140
    k: int = 8
    eval_max_tokens: int = 256
    device: str = "auto"
    # CPU threads per process (0: torch's default). 1 for the cpu recipe: one process per core; the thread count is
    # part of what makes a run reproduce the numbers in BENCHMARKS.md (floating-point sums depend on it)
    threads: int = 1
    processes: int = 2  # training processes (data parallel, gloo on CPU): 2 uses both cores of a 2-core machine
    compile: bool = False  # torch.compile the pretraining and SFT loss (pays off on a GPU, not in minutes on a CPU)
    usd_per_hour: float = 0.10  # the machine's price, for the cost estimate

    def validate(self) -> None:
        for f in ("pretrain_steps", "sft_steps", "grpo_steps", "eval_n", "k", "processes"):
            if getattr(self, f) < 1:
                raise ValueError(f"--set {f}: must be >= 1, got {getattr(self, f)}")
        for f in ("worked_fraction", "pretrain_worked_fraction"):
            if not 0 <= getattr(self, f) <= 1:
                raise ValueError(f"--set {f}: must be in [0, 1], got {getattr(self, f)}")
        if self.pretrain_optim not in OPTIMIZERS:
            raise ValueError(
                f"--set pretrain_optim: must be one of {', '.join(OPTIMIZERS)}, got {self.pretrain_optim!r}"
            )


RECIPES: dict[str, Recipe] = {
    # ~12 minutes on a quiet 2-core CPU (BENCHMARKS.md has the pilots that chose it)
    "cpu": Recipe(),
    # about one hour on one H100/H200: a 10x bigger model, bf16 autocast (automatic on CUDA), longer stages
    "gpu": Recipe(  # not yet run on a GPU: kept at the AdamW recipe it was sized with
        model_preset="gpu-small",
        pretrain_worked_fraction=1.0,
        pretrain_optim="adamw",
        n=1_000_000,
        pretrain_steps=20_000,
        pretrain_batch=32,
        pretrain_lr=3e-3,
        mtp_weight=0.3,
        sft_steps=3000,
        sft_batch=64,
        sft_lr=5e-4,
        grpo_steps=600,
        grpo_lr=1e-5,
        grpo_prompts=64,
        grpo_group=16,
        eval_n=7000,
        passk_n=700,
        compile=True,
        threads=0,
        processes=1,
        usd_per_hour=2.50,
    ),
    # CI and tests: a tiny model, a few steps of every stage, a few problems (the pipeline, not the result)
    "smoke": Recipe(
        model_preset="tiny",
        n=3000,
        pretrain_steps=12,
        pretrain_batch=4,
        sft_steps=6,
        sft_batch=8,
        grpo_steps=3,
        grpo_prompts=4,
        grpo_group=4,
        grpo_max_new_tokens=16,
        grpo_eval_n=8,
        eval_n=28,
        passk_n=7,
        k=2,
        eval_max_tokens=16,
        threads=0,
        processes=1,
    ),
}


def make_recipe(preset: str, overrides: dict[str, Any] | None = None) -> Recipe:
    """The preset's recipe with `overrides` ({field: value}, already typed: the CLI parses `--set` with
    `parse_set(items, Recipe)`), checked."""
    if preset not in RECIPES:
        raise ValueError(f"unknown speedrun preset {preset!r}: choose one of {', '.join(RECIPES)}")
    fields = {f.name for f in dataclasses.fields(Recipe)}
    if unknown := sorted(set(overrides or {}) - fields):
        raise ValueError(f"unknown recipe field(s) {', '.join(unknown)}; fields: {', '.join(fields)}")
    recipe = dataclasses.replace(RECIPES[preset], **(overrides or {}))
    recipe.validate()
    return recipe


def checkpoint_of(run_dir: Path) -> Path:
    """The latest checkpoint of a stage's run folder: the model the next stage, the evaluation and the report
    use. A finished stage always has one, so its absence is an error, not a case to handle."""
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise FileNotFoundError(f"{run_dir} has no checkpoint: delete its entry from stages.json and run again")
    return ckpt
