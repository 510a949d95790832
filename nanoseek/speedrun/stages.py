"""`nanoseek speedrun`: the whole R1 recipe on a laptop CPU (or one GPU) with nothing downloaded.

tokenizer -> built-in arithmetic corpus -> pretrain -> eval -> cold-start SFT -> eval -> GRPO -> eval, then
`report.md` + `report.json` (see `nanoseek.speedrun_report`). Each stage is the same code as its own command
(`nanoseek train`, `sft`, `grpo`), run in-process.

Resumable: every finished stage is recorded in `stages.json` (written atomically) and skipped on the next run; a
training stage that was interrupted continues from its latest checkpoint (`--resume`, exact with the recipes'
step budgets), so a run killed at any point and started again writes the same report. The recipe is stored in
`recipe.json`; a run folder refuses a different recipe.

Recipe (BENCHMARKS.md, "The speedrun"): training stages have step budgets, not wall-clock budgets, so the result
does not depend on how busy the machine is, and a resumed run is exact. The SFT stage is R1's cold start: only a
share of its completions are worked solutions (`<think>steps</think> answer`), the rest answer-only, so the
model writes its steps only sometimes; GRPO, rewarded by the verifier alone, then learns when the steps pay off.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path

from nanoseek.checkpoint.run import latest_checkpoint
from nanoseek.io import atomic_write_text
from nanoseek.speedrun.recipe import TASK, Recipe, make_recipe


# ------------------------------------------------------------------------------------------------ stages
class Progress:
    """`stages.json`: finished stages and what they measured; a stage listed there is not run again."""

    def __init__(self, out: Path) -> None:
        self.path = out / "stages.json"
        self.done: dict[str, dict] = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def finish(self, name: str, info: dict) -> None:
        self.done[name] = info
        atomic_write_text(self.path, json.dumps(self.done, indent=2) + "\n")


def _command(name: str, argv: list[str]) -> None:
    from nanoseek.cli.main import main

    print(f"\n== {name}: nanoseek {' '.join(argv)}", flush=True)
    code = main(argv)
    if code == 130:
        raise KeyboardInterrupt
    if code != 0:
        raise RuntimeError(f"speedrun stage '{name}' failed (command: nanoseek {' '.join(argv)})")


def _checkpoint(run_dir: Path) -> Path:
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise RuntimeError(f"{run_dir} has no checkpoint")
    return ckpt


def _train_stage(name: str, run_dir: Path, argv: list[str]) -> None:
    """Run a training command; continue it (--resume) when an interrupted run left a checkpoint."""
    if latest_checkpoint(run_dir) is not None:
        print(f"\n{name}: continuing the interrupted stage from {latest_checkpoint(run_dir)}", flush=True)
        argv = [*argv, "--resume"]
    elif run_dir.exists():
        shutil.rmtree(run_dir)  # started but nothing saved: start over
    _command(name, argv)


def _fresh(path: Path) -> Path:
    """A stage output that was not recorded as finished is incomplete: remove it before redoing the stage."""
    if path.is_dir():
        shutil.rmtree(path)
    return path


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    recipe = make_recipe(args.preset, args.set)
    saved = {"preset": args.preset, "seed": args.seed, **dataclasses.asdict(recipe)}
    recipe_path = out / "recipe.json"
    if recipe_path.is_file() and json.loads(recipe_path.read_text()) != saved:
        raise ValueError(
            f"{out} holds a speedrun with another recipe ({recipe_path}): use the same --preset/--set/--seed to "
            "continue it, or another --out"
        )
    atomic_write_text(recipe_path, json.dumps(saved, indent=2) + "\n")
    if recipe.threads:
        import torch

        torch.set_num_threads(recipe.threads)
    progress = Progress(out)
    if progress.done:
        print(f"speedrun: continuing {out}; done already: {', '.join(progress.done)}", flush=True)
    try:
        _run_stages(out, recipe, args.seed, progress)
    except KeyboardInterrupt:
        print(f"\nnanoseek speedrun: interrupted; run the same command again to continue: {_again(args)}")
        return 130
    from nanoseek.speedrun.report import write_report

    report = write_report(out, recipe, args.preset, progress.done)
    print("\n" + report)
    final = _checkpoint(out / "grpo")
    print(f"Wrote {out / 'report.md'}, {out / 'report.json'} and {out / 'plots'}/")
    print(f"Chat with it:  nanoseek chat --model {out / 'grpo'}")
    print(f"Evaluate it:   nanoseek eval --model {final} --task arithmetic --format chat")
    print(
        f"Serve it:      nanoseek serve --model {out / 'grpo'}   # OpenAI API at http://127.0.0.1:8000/v1, chat page at /"
    )
    return 0


def _again(args: argparse.Namespace) -> str:
    extra = "".join(f" --set {s}" for s in args.set)
    return f"nanoseek speedrun --out {args.out} --preset {args.preset} --seed {args.seed}{extra}"


def _run_stages(out: Path, r: Recipe, seed: int, progress: Progress) -> None:
    from nanoseek.speedrun.evaluate import evaluate_stage

    tok, data = out / "tokenizer", out / "data"
    pt, sft, grpo = out / "pretrain", out / "sft", out / "grpo"
    seed_args = ["--seed", str(seed)]
    device = ["--device", r.device]
    compiled = ["--compile"] if r.compile else []

    def timed(name: str, fn, info: callable = lambda: {}) -> None:  # noqa: B008
        if name in progress.done:
            print(f"== {name}: done already, skipped", flush=True)
            return
        t0 = time.time()
        fn()
        progress.finish(name, {"wall_s": time.time() - t0, **info()})

    timed("tokenizer", lambda: _command("tokenizer", ["tokenizer", "train", "--builtin", "--out", str(_fresh(tok)), "--vocab-size", str(r.vocab_size)]))  # fmt: skip
    timed("prepare", lambda: _command("prepare", ["prepare", "--tokenizer", str(tok), "--builtin", TASK, "--n", str(r.n), "--out", str(_fresh(data))]))  # fmt: skip
    pt_argv = ["train", "--preset", r.model_preset, "--data", str(data), "--out", str(pt), "--steps", str(r.pretrain_steps), "--batch-size", str(r.pretrain_batch), "--lr", str(r.pretrain_lr), "--schedule", "wsd", "--mtp-weight", str(r.mtp_weight), *seed_args, *device, *compiled]  # fmt: skip
    timed("pretrain", lambda: _train_stage("pretrain", pt, pt_argv))
    timed("eval_pretrain", lambda: evaluate_stage(out, "pretrain", _checkpoint(pt), "pretrain", r))
    sft_argv = lambda: ["sft", "--model", str(_checkpoint(pt)), "--data", f"builtin:{TASK}", "--worked-fraction", str(r.worked_fraction), "--out", str(sft), "--steps", str(r.sft_steps), "--batch-size", str(r.sft_batch), "--lr", str(r.sft_lr), *seed_args, *device, *compiled]  # fmt: skip  # noqa: E731
    timed("sft", lambda: _train_stage("sft", sft, sft_argv()))
    timed("eval_sft", lambda: evaluate_stage(out, "sft", _checkpoint(sft), "chat", r))
    levels = ["--levels", *r.grpo_levels.split()] if r.grpo_levels.strip() else []
    dyn = ["--dynamic-sampling"] if r.grpo_dynamic_sampling else []
    every = max(1, r.grpo_steps // 7)
    grpo_argv = lambda: ["grpo", "--model", str(_checkpoint(sft)), "--task", TASK, *levels, "--out", str(grpo), "--steps", str(r.grpo_steps), "--lr", str(r.grpo_lr), "--prompts-per-step", str(r.grpo_prompts), "--group-size", str(r.grpo_group), "--temperature", str(r.grpo_temperature), "--max-new-tokens", str(r.grpo_max_new_tokens), *dyn, "--eval-every", str(every), "--eval-n", str(r.grpo_eval_n), "--save-every", str(every), *seed_args, *device]  # fmt: skip  # noqa: E731
    timed("grpo", lambda: _train_stage("grpo", grpo, grpo_argv()))
    timed("eval_grpo", lambda: evaluate_stage(out, "grpo", _checkpoint(grpo), "chat", r))


