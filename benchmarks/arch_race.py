"""V3 vs V4 (and V3 with Muon) at equal wall clock on the speedrun corpus: one process, the arms alternating.

    python -m benchmarks.arch_race --data RUN/data --tokenizer RUN/tokenizer --minutes 3.5 --out runs/arch-race
    python -m benchmarks.arch_race --smoke --out /tmp/race      # tiny presets, seconds: the pipeline, not the result

Arms: `v3` (cpu-small, AdamW), `v4` (cpu-small-v4, AdamW), `v3-muon` (cpu-small, Muon). Same parameter budget:
when cpu-small-v4's total differs from cpu-small's by more than 10%, the V4 arm's moe_intermediate_size is set to
the value that brings it closest (V4 has no dense first layer, so its experts take the difference). No MTP in any
arm (the speedrun pretrains with mtp_weight 0 too), so every parameter counted
is trained. Every arm starts from the same seed and reads the same batches (its own TokenLoader, same seed).

Why alternating: the arms take turns in one process, `--chunk` steps each, so load from elsewhere on the machine
hits every arm alike. Equal wall clock: each arm's own step time (data, forward, backward, optimizer) is summed,
nothing else. WSD must know its step count in advance, so a probe (`--probe-chunks` turns of every arm, the start
of training: the lr is the same whatever the budget while WSD is still stable) measures each arm's steps/s, and
its budget is probe steps + (minutes - probe time) x steps/s (the probe's first chunk, with one-off costs, left
out of the rate), re-estimated from the arm's rate so far after each of its turns until its decay phase starts
(so load at the probe does not skew the budgets). Then each turn goes to the arm furthest behind in its budget, so the arms progress together
and finish together. The wall time each arm really used is reported beside the target.

Afterwards, per arm: val loss on the same val tokens, greedy accuracy on the speedrun's held-out test problems
(pretraining format), and the training cost per token on this CPU. Models the Engine cannot decode (V4 until it
can) are decoded greedily through the model's own incremental forward instead, and the output says so. Prints
one JSON line per arm and a summary line (also in OUT/race.jsonl), and draws OUT/val_loss.png.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks.machine import cpu_name
from nanoseek import ModelConfig, Transformer
from nanoseek.data.shards import TokenLoader, find_tokenizer, load_manifest
from nanoseek.distributed.data_parallel import Parallel
from nanoseek.distributed.process_group import DistEnv
from nanoseek.eval.evaluate import evaluate as evaluate_accuracy
from nanoseek.infer.cache import CompressedKVCache
from nanoseek.infer.sequence import Completion
from nanoseek.io import atomic_write_text
from nanoseek.model.flops import flops_per_token
from nanoseek.speedrun.evaluate import eval_problems
from nanoseek.speedrun.recipe import make_recipe
from nanoseek.speedrun.stages import prepare_stage, tokenizer_stage
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.config import TrainConfig
from nanoseek.train.loop import evaluate as evaluate_loss
from nanoseek.train.optim import build_optimizer, expert_bias_step
from nanoseek.train.schedule import lr_at

# arm -> (preset, optimizer); --smoke swaps each preset for its tiny counterpart
ARMS = {"v3": ("cpu-small", "adamw"), "v4": ("cpu-small-v4", "adamw"), "v3-muon": ("cpu-small", "muon")}
SMOKE_PRESETS = {"cpu-small": "tiny", "cpu-small-v4": "tiny-v4"}
PARAM_TOLERANCE = 0.10  # the V4 arm is resized when its total differs from V3's by more


# ----------------------------------------------------------------------------------------------- the arms
@dataclass
class Arm:
    """One contestant: its model, optimizer and loader, and what it has done so far."""

    name: str
    preset: str
    optim: str
    overrides: dict[str, Any]
    model: Transformer
    optimizer: torch.optim.Optimizer
    loader: TokenLoader
    par: Parallel
    cfg: TrainConfig
    step: int = 0
    budget: int | None = None  # optimizer steps; None during the probe
    train_s: float = 0.0  # this arm's own step time
    losses: list[float] = field(default_factory=list)  # train loss per step
    chunks: list[tuple[int, float]] = field(default_factory=list)  # (steps, seconds) of each chunk
    curve: list[dict[str, float]] = field(default_factory=list)  # val loss vs train_s
    probe: dict[str, float] = field(default_factory=dict)


def model_config(preset: str, manifest: dict, overrides: dict[str, Any]) -> ModelConfig:
    """The preset at the data's vocabulary, without MTP (no arm trains one)."""
    return ModelConfig.from_preset(
        preset,
        **overrides,
        vocab_size=manifest["vocab_size"],
        bos_token_id=manifest["bos_id"],
        eos_token_id=manifest["eos_id"],
        num_nextn_predict_layers=0,
    )


def count_params(config: ModelConfig) -> tuple[int, int]:
    """(total, activated) parameters, counted on the meta device (no memory, no init)."""
    with torch.device("meta"):
        m = Transformer(config)
    return m.num_parameters(), m.num_parameters(activated=True)


def match_v4(v3_total: int, preset: str, manifest: dict) -> dict[str, Any]:
    """Overrides that bring the V4 preset within PARAM_TOLERANCE of v3_total parameters: {} when it already is,
    else the moe_intermediate_size (multiple of 8, at most the preset's) whose total is closest."""
    base = model_config(preset, manifest, {})
    if abs(count_params(base)[0] / v3_total - 1) <= PARAM_TOLERANCE:
        return {}
    sizes = range(8, base.moe_intermediate_size + 1, 8)
    best = min(sizes, key=lambda s: abs(count_params(base.replace(moe_intermediate_size=s))[0] - v3_total))
    return {"moe_intermediate_size": best}


def build_arm(name: str, preset: str, optim: str, overrides: dict, manifest: dict, data: Path, cfg: TrainConfig) -> Arm:
    """A fresh arm: weights from cfg.seed (the two V3 arms start identical), its optimizer, a train loader at cfg.seed."""
    cfg = dataclasses.replace(cfg, optim=optim)
    cfg.validate()
    torch.manual_seed(cfg.seed)
    model = Transformer(model_config(preset, manifest, overrides)).train()
    par = Parallel(model, DistEnv(), cfg.dp, mtp=False)
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, optim=optim)
    loader = TokenLoader(data, "train", cfg.batch_size, cfg.seq_len, seed=cfg.seed)
    return Arm(name, preset, optim, overrides, model, optimizer, loader, par, cfg)


# ------------------------------------------------------------------------------------------- training
def train_step(arm: Arm) -> float:
    """One optimizer step as `nanoseek train` takes it in one process (pretrain.train, grad_accum 1, no MTP):
    scheduled lr, loss, backward, clip, optimizer, aux-loss-free bias update. Returns the main loss."""
    c = arm.cfg
    progress = arm.step / arm.budget if arm.budget else 0.0  # the probe: WSD's stable phase, as for any budget
    lr = lr_at(arm.step, progress, c.lr, c.schedule, c.warmup, c.min_lr_ratio, c.decay_frac)
    for group in arm.optimizer.param_groups:
        group["lr"] = lr
    x, y = arm.loader.next_batch()
    losses = arm.par.compute_loss(x, y, mtp=False)
    losses.total(0.0).backward()
    loads = arm.model.expert_loads()
    gnorm = arm.par.clip_grad_norm(c.clip)
    main = losses.main.item()
    if not (math.isfinite(main) and math.isfinite(gnorm)):
        raise FloatingPointError(f"arm {arm.name}, step {arm.step + 1}: loss {main}, grad norm {gnorm}: lower --lr")
    arm.optimizer.step()
    expert_bias_step(arm.model, loads, c.bias_gamma)
    arm.optimizer.zero_grad(set_to_none=True)
    arm.step += 1
    return main


def run_chunk(arm: Arm, steps: int) -> None:
    """`steps` steps of one arm, each timed on its own: only the arm's steps count toward its wall clock."""
    spent = 0.0
    for _ in range(steps):
        t0 = time.perf_counter()
        arm.losses.append(train_step(arm))
        spent += time.perf_counter() - t0
    arm.train_s += spent
    arm.chunks.append((steps, spent))


def set_budget(arm: Arm, target_s: float) -> None:
    """Steps for the whole race from the arm's measured rate (its first chunk, with one-off costs, left out
    unless it is the only one): the steps taken + the time left x steps/s. Called after the probe and again after
    each of the arm's turns while it is in WSD's stable phase (where the lr does not depend on the budget), so a
    rate the probe mismeasured (load from elsewhere at the start) is corrected before the decay starts. The
    budget never drops below the fewest steps that keep the steps taken in the stable phase; when the probe alone
    needs more, a warning says this arm will overrun --minutes (its train_s shows by how much)."""
    timed = arm.chunks[1:] or arm.chunks
    rate = sum(n for n, _ in timed) / sum(s for _, s in timed)
    fits = arm.step + max(0, round((target_s - arm.train_s) * rate))
    first = arm.budget is None
    arm.budget = max(fits, min_budget(arm.step, arm.cfg.decay_frac))
    if first:
        arm.probe = {"steps": arm.step, "s": arm.train_s, "steps_per_s": rate, "budget": fits}
    if first and arm.budget > fits:
        print(
            f"warning: arm {arm.name}: {fits} steps fit the time, but the probe's {arm.step} must stay in WSD's "
            f"stable phase: {arm.budget} steps, more time than --minutes (raise it, or lower --chunk/--probe-chunks)",
            file=sys.stderr,
            flush=True,
        )


def stable(arm: Arm) -> bool:
    """Whether the arm's next step is still in WSD's stable phase, where its budget may still change."""
    return arm.step < (1 - arm.cfg.decay_frac) * arm.budget


def min_budget(probe_steps: int, decay_frac: float) -> int:
    """The fewest steps whose WSD schedule keeps `probe_steps` in its stable phase (they ran before it was known)."""
    return math.ceil(probe_steps / (1 - decay_frac))


def val_batches(data: Path, cfg: TrainConfig, wanted: int) -> int:
    """Val batches there are to read, at most `wanted`."""
    return min(wanted, TokenLoader(data, "val", cfg.batch_size, cfg.seq_len, seed=0).batches_per_epoch)


def val_loss(arm: Arm, data: Path, batches: int) -> float:
    """Mean next-token loss over the first `batches` val batches: the same tokens for every arm, every time."""
    loader = TokenLoader(data, "val", arm.cfg.batch_size, arm.cfg.seq_len, seed=0)
    return evaluate_loss(arm.model, loader, val_batches(data, arm.cfg, batches), contextlib.nullcontext())


def race(arms: list[Arm], args: argparse.Namespace, data: Path) -> None:
    """Probe (turns in order), set budgets, then turns of `--chunk` steps, each to the arm furthest behind in
    its budget (so the faster arms take more turns and none runs alone at the end), until every arm has taken
    its budget; val loss along the way for the plot."""
    target_s = 60 * args.minutes

    def point(arm: Arm) -> None:
        arm.curve.append(
            {"step": arm.step, "train_s": arm.train_s, "val_loss": val_loss(arm, data, args.curve_batches)}
        )

    for arm in arms:
        point(arm)
    for _ in range(args.probe_chunks):
        for arm in arms:
            run_chunk(arm, args.chunk)
    for arm in arms:
        set_budget(arm, target_s)
        p = arm.probe
        print(
            f"probe {arm.name}: {p['steps_per_s']:.2f} steps/s -> budget {arm.budget} steps "
            f"({p['steps']} done in {p['s']:.1f} s)",
            flush=True,
        )
    every = {a.name: max(args.chunk, a.budget // args.curve_points) for a in arms}
    while running := [a for a in arms if a.step < a.budget]:
        arm = min(running, key=lambda a: a.step / a.budget)  # the furthest behind: all arms finish together
        run_chunk(arm, min(args.chunk, arm.budget - arm.step))
        if stable(arm):
            set_budget(arm, target_s)
        if arm.step >= arm.curve[-1]["step"] + every[arm.name] or arm.step == arm.budget:
            point(arm)
            state = ", ".join(f"{a.name} {a.step}/{a.budget} ({a.train_s:.0f} s)" for a in arms)
            print(f"race: {state}; val {arm.name} {arm.curve[-1]['val_loss']:.3f}", flush=True)


# ------------------------------------------------------------------------------------------- accuracy
class CachedGreedy:
    """Greedy decoding through the model's own incremental forward (TransformerV4.forward_cached), for a model the
    Engine cannot decode yet; `evaluate` needs only `.tokenizer` and `.generate`. Rows are prefilled one by one
    (prompts differ in length), then decoded together a token a step, each at its own position."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, batch_size: int = 64) -> None:
        self.model, self.tokenizer, self.batch_size = model.eval(), tokenizer, batch_size

    def generate(
        self, prompts: list[list[int]], max_tokens: int = 128, temperature: float = 0.0, stop: list[str] | None = None
    ) -> list[Completion]:
        if temperature != 0.0:
            raise ValueError("CachedGreedy decodes greedily only (temperature 0)")
        out: list[Completion] = []
        for i in range(0, len(prompts), self.batch_size):
            out += self._batch(prompts[i : i + self.batch_size], max_tokens, stop or [])
        return out

    @torch.no_grad()
    def _batch(self, prompts: list[list[int]], max_tokens: int, stop: list[str]) -> list[Completion]:
        n, model = len(prompts), self.model
        cache = CompressedKVCache(model.config, n, max(map(len, prompts)) + max_tokens)
        token = torch.empty(n, dtype=torch.long)
        for i, p in enumerate(prompts):
            logits, _ = model.forward_cached(
                torch.tensor([p]), cache.layers, torch.tensor([i]), torch.tensor([0]), True
            )
            token[i] = logits[0, -1].argmax()
        pos = torch.tensor([len(p) for p in prompts])
        ids: list[list[int]] = [[] for _ in range(n)]
        done: dict[int, Completion] = {}
        active = list(range(n))
        while active:
            still = []
            for i in active:
                ids[i].append(int(token[i]))
                text = self.tokenizer.decode(ids[i])
                cut = min((text.find(s) for s in stop if s in text), default=-1)
                if ids[i][-1] == self.tokenizer.eos_id or cut >= 0 or len(ids[i]) == max_tokens:
                    reason = "length" if cut < 0 and ids[i][-1] != self.tokenizer.eos_id else "stop"
                    text = text[:cut] if cut >= 0 else self.tokenizer.decode(ids[i], skip_special_tokens=True)
                    done[i] = Completion(text, ids[i], reason, len(prompts[i]))
                else:
                    still.append(i)
            active = still
            if active:
                rows = torch.tensor(active)
                logits, _ = model.forward_cached(token[rows].unsqueeze(1), cache.layers, rows, pos[rows], True)
                pos[rows] += 1
                token[rows] = logits[:, -1].argmax(-1)
        return [done[i] for i in range(n)]


def decoder(model: Transformer, tokenizer: Tokenizer) -> tuple[Any, str]:
    """(the Engine, "engine") when it decodes this model; for a V4 model it cannot decode yet, (CachedGreedy, a
    note saying why)."""
    from nanoseek.infer.engine import Engine

    if not model.config.is_v4:
        return Engine(model, tokenizer, max_batch_size=64), "engine"
    try:
        engine = Engine(model, tokenizer, max_batch_size=64)
        engine.generate([[tokenizer.bos_id]], max_tokens=2, temperature=0.0)
        return engine, "engine"
    except Exception as e:  # noqa: BLE001 - any failure means: decode it another way, and say so
        return CachedGreedy(model, tokenizer), f"greedy via forward_cached (the Engine failed: {type(e).__name__}: {e})"


def accuracy(arm: Arm, tokenizer: Tokenizer, problems: list[dict], max_tokens: int) -> dict[str, Any]:
    """Greedy accuracy on the held-out problems, pretraining format (as the speedrun scores its pretrained model)."""
    t0 = time.perf_counter()
    dec, how = decoder(arm.model, tokenizer)
    r = evaluate_accuracy(dec, problems, fmt="pretrain", max_tokens=max_tokens)
    levels = {lv: round(s["accuracy"], 4) for lv, s in r["levels"].items()}
    arm.model.train()
    return {"accuracy": r["accuracy"], "levels": levels, "decoder": how, "eval_s": time.perf_counter() - t0}


# ----------------------------------------------------------------------------------------------- report
def arm_result(arm: Arm, target_s: float, final_val: float, acc: dict[str, Any], params: tuple[int, int]) -> dict:
    """The arm's JSON line."""
    tokens = arm.step * arm.cfg.batch_size * arm.cfg.seq_len
    k = max(1, min(len(arm.losses) // 10, 50))  # train loss: mean of the first / last k steps
    return {
        "bench": "race",
        "arm": arm.name,
        "preset": arm.preset,
        "optim": arm.optim,
        "overrides": arm.overrides,
        "params": params[0],
        "params_activated": params[1],
        "steps": arm.step,
        "step_budget": arm.budget,
        "probe_steps": arm.probe["steps"],
        "probe_s": round(arm.probe["s"], 3),
        "probe_steps_per_s": round(arm.probe["steps_per_s"], 4),
        "probe_budget": arm.probe["budget"],  # the steps that fit --minutes at the probe's rate
        "target_s": target_s,
        "train_s": round(arm.train_s, 2),
        "tokens": tokens,
        "tokens_per_s": round(tokens / arm.train_s, 1),
        "ms_per_token": round(1000 * arm.train_s / tokens, 5),
        "train_flops_per_token": flops_per_token(arm.model.config, arm.cfg.seq_len, include_mtp=False),
        "first_loss": round(sum(arm.losses[:k]) / k, 4),
        "final_loss": round(sum(arm.losses[-k:]) / k, 4),
        "val_loss": round(final_val, 4),
        "accuracy": round(acc["accuracy"], 4),
        "accuracy_levels": acc["levels"],
        "decoder": acc["decoder"],
        "eval_s": round(acc["eval_s"], 1),
        "curve": [{k: round(v, 4) for k, v in p.items()} for p in arm.curve],
    }


def plot(rows: list[dict], path: Path) -> Path:
    """Val loss vs the arm's own training wall time: one colour per arm, one line per arm and race (seed)."""
    from matplotlib.figure import Figure

    from nanoseek.train.metrics import save_figure

    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    colors: dict[str, str] = {}
    for r in rows:
        label = None if r["arm"] in colors else r["arm"]
        color = colors.setdefault(r["arm"], f"C{len(colors)}")
        x, y = [p["train_s"] for p in r["curve"]], [p["val_loss"] for p in r["curve"]]
        ax.plot(x, y, marker=".", color=color, label=label)
    ax.set(
        xlabel="training wall time of the arm (s)", ylabel="val loss (log scale)", title="V3 vs V4 at equal wall clock"
    )
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


# ------------------------------------------------------------------------------------------------- data
def corpus(args: argparse.Namespace) -> tuple[Path, Tokenizer]:
    """The speedrun corpus: --data (+ --tokenizer), else the recipe's tokenizer and shards built once into --cache
    (`cpu` recipe; `smoke` with --smoke) by the speedrun's own stages."""
    if args.data:
        data = Path(args.data)
        return data, find_tokenizer(data, load_manifest(data), args.tokenizer)
    recipe_name = "smoke" if args.smoke else "cpu"
    cache = Path(args.cache) / recipe_name
    tok_dir, data = cache / "tokenizer", cache / "data"
    if not (data / "manifest.json").is_file():  # prepare writes the manifest last: without it, start over
        r = make_recipe(recipe_name)
        if not (tok_dir / "tokenizer.json").is_file():
            shutil.rmtree(tok_dir, ignore_errors=True)
            tokenizer_stage(tok_dir, r)
        shutil.rmtree(data, ignore_errors=True)
        prepare_stage(tok_dir, data, r)
    return data, find_tokenizer(data, load_manifest(data), tok_dir)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="token shards of the speedrun corpus (a speedrun run's data/); default: build")
    p.add_argument("--tokenizer", help="their tokenizer dir, if the manifest's path is not reachable")
    p.add_argument("--cache", default="runs/race-cache", help="where the corpus is built when --data is not given")
    p.add_argument("--out", default="runs/arch-race")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
    p.add_argument("--minutes", type=float, default=3.5, help="training wall time of each arm")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8, help="the cpu speedrun's global batch (2 x 4)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=4e-3, help="the cpu speedrun's pretraining lr")
    p.add_argument("--warmup", type=int, default=TrainConfig.warmup, help="lr warmup steps (nanoseek train's)")
    p.add_argument("--chunk", type=int, default=25, help="steps an arm takes per turn")
    p.add_argument("--probe-chunks", type=int, default=3, help="turns per arm that measure its steps/s")
    p.add_argument("--curve-points", type=int, default=12, help="val-loss points per arm for the plot")
    p.add_argument("--curve-batches", type=int, default=4, help="val batches per plot point")
    p.add_argument("--val-batches", type=int, default=40, help="val batches for the final val loss")
    p.add_argument("--eval-n", type=int, default=1400, help="held-out problems (the speedrun's eval_n)")
    p.add_argument("--eval-max-tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny presets and sizes: runs in seconds")
    p.add_argument("--replot", nargs="+", metavar="RACE_JSONL", help="only draw OUT/val_loss.png from these races")
    args = p.parse_args(argv)
    if args.smoke:  # sizes not given on the command line shrink
        given = {a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]) if a.startswith("--")}
        smoke = dict(minutes=0.2, threads=1, batch_size=4, seq_len=64, chunk=2, probe_chunks=2, curve_points=4)
        smoke |= dict(warmup=4, curve_batches=2, val_batches=2, eval_n=14, eval_max_tokens=16)
        for k, v in smoke.items():
            if f"--{k.replace('_', '-')}" not in given:
                setattr(args, k, v)
    unknown = sorted(set(args.arms.split(",")) - set(ARMS))
    if unknown:
        p.error(f"unknown arm(s) {', '.join(unknown)}: choose from {', '.join(ARMS)}")
    for name in ("minutes", "threads", "chunk", "probe_chunks", "curve_points", "curve_batches", "val_batches"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be > 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.replot:  # one figure from several races' JSON lines (e.g. one per seed)
        rows = [json.loads(line) for f in args.replot for line in Path(f).read_text().splitlines()]
        print(plot([r for r in rows if not r.get("summary")], Path(args.out) / "val_loss.png"))
        return
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    data, tokenizer = corpus(args)
    manifest = load_manifest(data)
    cfg = TrainConfig(  # the rest (decay, clip, weight decay, bias gamma): `nanoseek train`'s defaults
        time_budget=60 * args.minutes,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        warmup=args.warmup,
        schedule="wsd",
        mtp_weight=0.0,
        seed=args.seed,
        device="cpu",
    )

    names = args.arms.split(",")
    presets = {n: SMOKE_PRESETS[ARMS[n][0]] if args.smoke else ARMS[n][0] for n in names}
    v3_preset = SMOKE_PRESETS["cpu-small"] if args.smoke else "cpu-small"
    v3_params = count_params(model_config(v3_preset, manifest, {}))
    overrides: dict[str, dict] = {}
    for n in names:
        overrides[n] = match_v4(v3_params[0], presets[n], manifest) if presets[n] != v3_preset else {}
        base = count_params(model_config(presets[n], manifest, {}))
        used = count_params(model_config(presets[n], manifest, overrides[n]))
        note = f" (preset {base[0]:,}; with {overrides[n]})" if overrides[n] else ""
        off = used[0] / v3_params[0] - 1
        warn = f"; {off:+.0%} vs V3: the budgets are NOT matched" if abs(off) > PARAM_TOLERANCE else ""
        print(f"arm {n}: {presets[n]}, {ARMS[n][1]}: {used[0]:,} params{note}, {used[1]:,} activated{warn}")
    arms = [build_arm(n, presets[n], ARMS[n][1], overrides[n], manifest, data, cfg) for n in names]
    print(
        f"race: {len(arms)} arms x {args.minutes} min, batch {args.batch_size} x {args.seq_len}, lr {args.lr} "
        f"(WSD, warmup {args.warmup}), {args.threads} threads, {args.chunk} steps a turn; data {data}",
        flush=True,
    )

    race(arms, args, data)
    problems = eval_problems(args.eval_n)
    rows = []
    for arm in arms:
        final_val = val_loss(arm, data, args.val_batches)
        acc = accuracy(arm, tokenizer, problems, args.eval_max_tokens)
        params = (arm.model.num_parameters(), arm.model.num_parameters(activated=True))
        rows.append(arm_result(arm, 60 * args.minutes, final_val, acc, params))
        if acc["decoder"] != "engine":
            print(f"note: arm {arm.name} decoded by {acc['decoder']}", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    png = plot(rows, out / "val_loss.png")
    summary = {
        "bench": "race",
        "summary": True,
        "minutes": args.minutes,
        "threads": args.threads,
        "batch": [args.batch_size, args.seq_len],
        "lr": args.lr,
        "chunk": args.chunk,
        "eval_n": len(problems),
        "val_tokens": val_batches(data, cfg, args.val_batches) * args.batch_size * args.seq_len,
        "by_val_loss": [r["arm"] for r in sorted(rows, key=lambda r: r["val_loss"])],
        "plot": str(png),
        "data": str(data),
        "wall_s": round(time.perf_counter() - t_start, 1),
        "torch": torch.__version__,
        "machine": cpu_name(),
        "date": time.strftime("%Y-%m-%d"),
        "smoke": args.smoke,
    }
    lines = [json.dumps(r) for r in rows] + [json.dumps(summary)]
    atomic_write_text(out / "race.jsonl", "\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
