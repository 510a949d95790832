"""The speedrun: the whole R1 recipe on a laptop CPU (or one GPU) with nothing downloaded.

tokenizer -> built-in arithmetic corpus -> pretrain -> eval -> cold-start SFT -> eval -> GRPO -> eval, then
`report.md` + `report.json` (see `nanoseek.speedrun.report`). Each stage is a call of the library function its own
command calls (`run_pretrain`, `run_sft`, `run_grpo`), with the typed job that command would build.

Resumable: every finished stage is recorded in `stages.json` (written atomically) and skipped on the next run; a
training stage that was interrupted continues from its latest checkpoint (`resume=True`, exact with the recipes'
step budgets), so a run killed at any point and started again writes the same report. The recipe is stored in
`recipe.json`; a run folder refuses a different recipe.

Recipe (BENCHMARKS.md, "The speedrun"): training stages have step budgets, not wall-clock budgets, so the result
does not depend on how busy the machine is, and a resumed run is exact. The SFT stage is R1's cold start: only a
share of its completions are worked solutions (`<think>steps</think> answer`), the rest answer-only, so the
model writes its steps only sometimes; GRPO, rewarded by the verifier alone, then learns when the steps pay off.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from nanoseek.checkpoint.run import latest_checkpoint
from nanoseek.data.shards import prepare
from nanoseek.distributed.launch import run_on_processes
from nanoseek.io import atomic_write_text
from nanoseek.speedrun.evaluate import evaluate_stage, read_eval
from nanoseek.speedrun.recipe import TASK, Recipe, checkpoint_of, make_recipe
from nanoseek.speedrun.report import write_report
from nanoseek.tasks.problems import builtin_corpus
from nanoseek.tokenizer import Tokenizer, train_tokenizer
from nanoseek.train.grpo import GRPOConfig, GRPOJob, run_grpo
from nanoseek.train.pretrain import PretrainJob, TrainConfig, run_pretrain
from nanoseek.train.sft import SFT_DEFAULTS, SFTJob, run_sft

# The tokenizer's corpus: `nanoseek tokenizer train --builtin` (every built-in task, 20,000 problems each, seed 0)
TOKENIZER_PROBLEMS, TOKENIZER_SEED = 20000, 0


class Progress:
    """`stages.json`: finished stages and what they measured; a stage listed there is not run again."""

    def __init__(self, out: Path) -> None:
        self.path = out / "stages.json"
        self.done: dict[str, dict] = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def finish(self, name: str, info: dict) -> None:
        self.done[name] = info
        atomic_write_text(self.path, json.dumps(self.done, indent=2) + "\n")


def run_speedrun(out: str | Path, preset: str = "cpu", seed: int = 0, overrides: dict[str, Any] | None = None) -> dict:
    """Run (or continue) the speedrun in `out` with the preset's recipe and `overrides` ({Recipe field: value});
    returns the report (report.json's content). Raises ValueError when `out` holds a run of another recipe, and
    lets KeyboardInterrupt through: running it again continues where it stopped."""
    recipe = make_recipe(preset, overrides)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    saved = {"preset": preset, "seed": seed, **dataclasses.asdict(recipe)}
    recipe_path = out / "recipe.json"
    if recipe_path.is_file() and json.loads(recipe_path.read_text()) != saved:
        raise ValueError(
            f"{out} holds a speedrun with another recipe ({recipe_path}): use the same --preset/--set/--seed to "
            "continue it, or another --out"
        )
    atomic_write_text(recipe_path, json.dumps(saved, indent=2) + "\n")
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    progress = Progress(out)
    if progress.done:
        print(f"speedrun: continuing {out}; done already: {', '.join(progress.done)}", flush=True)
    evals = run_stages(out, recipe, seed, progress)
    return write_report(out, recipe, preset, progress.done, evals)


def run_stages(out: Path, r: Recipe, seed: int, progress: Progress) -> dict[str, dict]:
    """Every stage not yet in `progress`, in order; returns each stage's evaluation (by stage name)."""
    tok, data = out / "tokenizer", out / "data"
    pt, sft, grpo = out / "pretrain", out / "sft", out / "grpo"
    evals: dict[str, dict] = {}

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        if name in progress.done:
            print(f"== {name}: done already, skipped", flush=True)
            return None
        t0 = time.time()
        result = fn()
        progress.finish(name, {"wall_s": time.time() - t0})
        return result

    def evaluated(stage: str, run_dir: Path, fmt: str) -> None:
        name = f"eval_{stage}"
        result = timed(name, lambda: evaluate_stage(out, stage, checkpoint_of(run_dir), fmt, r))
        evals[stage] = result if result is not None else read_eval(out, stage)

    def trained(fn: Callable[..., dict], job: Any) -> dict:
        """A training stage on r.processes processes (one process group, both cores of a 2-core machine)."""
        return _trained(run_on_processes(fn, r.processes, job, threads=r.threads, device=r.device))

    timed("tokenizer", lambda: tokenizer_stage(_fresh(tok), r))
    timed("prepare", lambda: prepare_stage(tok, _fresh(data), r))
    timed("pretrain", lambda: trained(run_pretrain, pretrain_job(r, data, pt, seed, _resume("pretrain", pt))))
    evaluated("pretrain", pt, "pretrain")
    timed("sft", lambda: trained(run_sft, sft_job(r, checkpoint_of(pt), sft, seed, _resume("sft", sft))))
    evaluated("sft", sft, "chat")
    timed("grpo", lambda: trained(run_grpo, grpo_job(r, checkpoint_of(sft), grpo, seed, _resume("grpo", grpo))))
    evaluated("grpo", grpo, "chat")
    return evals


# --------------------------------------------------------------------------------- the stages and their jobs
def tokenizer_stage(out: Path, r: Recipe) -> Tokenizer:
    """BPE on the built-in corpus of every task (what `nanoseek tokenizer train --builtin` trains on)."""
    print(f"\n== tokenizer: BPE, vocabulary {r.vocab_size}, on the built-in task corpus -> {out}", flush=True)
    # no tool-call tokens: the task never calls tools, and they would shift every id of the runs in BENCHMARKS.md
    tok = train_tokenizer(builtin_corpus(n=TOKENIZER_PROBLEMS, seed=TOKENIZER_SEED), r.vocab_size, tools=False)
    tok.save(out)
    print(f"saved tokenizer ({tok.vocab_size} tokens, hash {tok.hash()[:12]}) to {out}", flush=True)
    return tok


def prepare_stage(tok_dir: Path, out: Path, r: Recipe) -> dict:
    """Token shards of `r.n` worked problems of the task (`nanoseek prepare --builtin TASK`); returns the manifest."""
    print(f"\n== prepare: {r.n:,} {TASK} problems -> {out}", flush=True)
    m = prepare(
        Tokenizer.from_pretrained(tok_dir),
        out,
        builtin=[TASK],
        n=r.n,
        tokenizer_path=str(tok_dir),
        worked_fraction=r.pretrain_worked_fraction,
    )
    print(", ".join(f"{s}: {v['tokens']:,} tokens / {v['documents']:,} docs" for s, v in m["splits"].items()))
    return m


def pretrain_job(r: Recipe, data: Path, out: Path, seed: int, resume: bool = False) -> PretrainJob:
    """Pretraining: the recipe's step budget, WSD schedule (a high lr held, then decayed)."""
    train = TrainConfig(
        steps=r.pretrain_steps,
        batch_size=r.pretrain_batch,
        lr=r.pretrain_lr,
        optim=r.pretrain_optim,
        schedule="wsd",
        mtp_weight=r.mtp_weight,
        seed=seed,
        device=r.device,
        compile=r.compile,
    )
    return PretrainJob(out=str(out), data=str(data), preset=r.model_preset, resume=resume, train=train)


def sft_job(r: Recipe, model: Path, out: Path, seed: int, resume: bool = False) -> SFTJob:
    """Cold-start SFT on the built-in task: a share `worked_fraction` of completions are worked solutions."""
    train = TrainConfig(
        **{**SFT_DEFAULTS, "steps": r.sft_steps, "batch_size": r.sft_batch, "lr": r.sft_lr},
        seed=seed,
        device=r.device,
        compile=r.compile,
    )
    data = f"builtin:{TASK}"
    return SFTJob(str(model), data, str(out), worked_fraction=r.worked_fraction, resume=resume, train=train)


def grpo_job(r: Recipe, model: Path, out: Path, seed: int, resume: bool = False) -> GRPOJob:
    """GRPO on the task (the verifier's reward only), evaluated and checkpointed 7 times along the way."""
    every = max(1, r.grpo_steps // 7)
    cfg = GRPOConfig(
        steps=r.grpo_steps,
        lr=r.grpo_lr,
        prompts_per_step=r.grpo_prompts,
        group_size=r.grpo_group,
        temperature=r.grpo_temperature,
        max_new_tokens=r.grpo_max_new_tokens,
        dynamic_sampling=r.grpo_dynamic_sampling,
        eval_every=every,
        eval_n=r.grpo_eval_n,
        save_every=every,
        seed=seed,
        device=r.device,
    )
    levels = r.grpo_levels.split() or None  # empty: all levels
    return GRPOJob(str(model), TASK, str(out), levels=levels, resume=resume, grpo=cfg)


def _resume(name: str, run_dir: Path) -> bool:
    """Whether a training stage continues an interrupted run (one that left a checkpoint); a run that saved
    nothing is removed, to start over."""
    resume = (ckpt := latest_checkpoint(run_dir)) is not None
    if resume:
        print(f"\n{name}: continuing the interrupted stage from {ckpt}", flush=True)
    elif run_dir.exists():
        shutil.rmtree(run_dir)
    print(f"\n== {name} -> {run_dir}", flush=True)
    return resume


def _trained(summary: dict) -> dict:
    """Say where a training stage ended (its summary: what `run_pretrain`, `run_sft`, `run_grpo` return)."""
    print(
        f"done: step {summary['step']} ({summary['elapsed_s']:.1f} s); checkpoint {summary['checkpoint']}", flush=True
    )
    return summary


def _fresh(path: Path) -> Path:
    """A stage output that was not recorded as finished is incomplete: remove it before redoing the stage."""
    if path.is_dir():
        shutil.rmtree(path)
    return path
