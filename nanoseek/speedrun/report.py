"""The speedrun's report: `report.json`, `report.md` and `plots/*.png`, from the stages' evaluations.

Every stage is scored greedily on the same fixed set of distinct held-out `test` problems (>= 1,000 with the cpu
recipe), so two stages can be compared problem by problem: wrong->right vs right->wrong flips and an exact
two-sided sign test. pass@k comes from k samples at T = 1 on a per-level subset. report.md is rendered from
report.json, so the two always hold the same numbers.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from nanoseek.io import atomic_write_text
from nanoseek.speedrun.evaluate import LEVEL_NAMES, mtp_acceptance
from nanoseek.speedrun.recipe import Recipe, checkpoint_of
from nanoseek.train.metrics import read_metrics

STAGES = ("pretrain", "sft", "grpo")
STAGE_TITLES = {"pretrain": "pretrain", "sft": "+ SFT (cold start)", "grpo": "+ GRPO"}


# ------------------------------------------------------------------------------------------------ report
def _machine(device: str) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__}
    info["python"] = platform.python_version()
    if device != "cpu" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _train_stage_stats(run_dir: Path, wall_s: float) -> dict[str, Any]:
    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if "step" in r]
    last = records[-1]
    vals = [r["val_loss"] for r in records if isinstance(r.get("val_loss"), (int, float))]
    mfus = [r["mfu"] for r in records if isinstance(r.get("mfu"), (int, float))]
    loads = last.get("max_load_violation") or []
    return {
        "steps": last["step"],
        "tokens": last["tokens"],
        "train_s": last["elapsed_s"],
        "wall_s": wall_s,
        "tokens_per_s": last["tokens"] / max(last["elapsed_s"], 1e-9),
        "mfu": sum(mfus) / len(mfus) if mfus else None,
        "train_loss": last["loss"],
        "val_loss": vals[-1] if vals else None,
        "expert_max_over_mean": [1 + v for v in loads],
    }


def _grpo_stats(run_dir: Path, wall_s: float, recipe: Recipe) -> dict[str, Any]:
    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if "reward_mean" in r]
    per_step = recipe.grpo_prompts * recipe.grpo_group
    tokens = sum(r["response_len"] * per_step * r.get("rounds", 1) for r in records)
    roll = sum(r["rollout_s"] for r in records)
    upd = sum(r["update_s"] for r in records)
    head, tail = records[: max(1, len(records) // 10)], records[-max(1, len(records) // 10) :]

    def mean(rows: list[dict], key: str) -> float:
        return sum(r[key] for r in rows) / len(rows)

    return {
        "steps": records[-1]["step"],
        "train_s": records[-1]["elapsed_s"],
        "wall_s": wall_s,
        "rollout_tokens": int(tokens),
        "tokens_per_s": tokens / max(records[-1]["elapsed_s"], 1e-9),
        "rollout_share": roll / max(roll + upd, 1e-9),
        "reward_first_10pct": mean(head, "reward_mean"),
        "reward_last_10pct": mean(tail, "reward_mean"),
        "zero_variance_groups_first_10pct": mean(head, "frac_zero_std"),
        "zero_variance_groups_last_10pct": mean(tail, "frac_zero_std"),
        "response_len_first_10pct": mean(head, "response_len"),
        "response_len_last_10pct": mean(tail, "response_len"),
        "entropy_first_10pct": mean(head, "entropy") if all("entropy" in r for r in head) else None,
    }


def build_report(
    out: Path, recipe: Recipe, preset: str, stages: dict[str, dict], evals: dict[str, dict]
) -> dict[str, Any]:
    """report.json's content: the stages' wall times (`stages`), their evaluations (`evals`, by stage) and the
    training curves. Training numbers come from each run's metrics.jsonl: a resumed stage's returned summary
    covers only the steps after the interruption."""
    from nanoseek.checkpoint.hf import load_model
    from nanoseek.eval.evaluate import compare

    model = load_model(checkpoint_of(out / "pretrain"), device="meta")
    c = model.config
    k = recipe.k
    rows: dict[str, Any] = {}
    prev = None
    for s in STAGES:
        e = evals[s]
        row = {
            "accuracy": e["accuracy"],
            "n": e["n"],
            "levels": {lv: {"n": v["n"], "accuracy": v["accuracy"]} for lv, v in e["levels"].items()},
            f"pass@{k}": e[f"pass@{k}"],
            "passk_n": e["passk_n"],
            "passk_levels": e["passk_levels"],
            "sampled_accuracy": e["sampled_accuracy"],
            "format_rate": e["format_rate"],
            "think_rate": e["think_rate"],
            "mean_length": e["mean_length"],
            "examples": e["examples"],
            "expert_load": e["expert_load"],
        }
        if prev is not None:
            if evals[prev]["prompts"] != e["prompts"]:
                raise RuntimeError("the stages were evaluated on different problems: delete eval/ and rerun")
            row["vs_previous"] = {"stage": prev, **compare(evals[prev]["correct"], e["correct"])}
        rows[s] = row
        prev = s
    train = {
        "pretrain": _train_stage_stats(out / "pretrain", stages["pretrain"]["wall_s"]),
        "sft": _train_stage_stats(out / "sft", stages["sft"]["wall_s"]),
        "grpo": _grpo_stats(out / "grpo", stages["grpo"]["wall_s"], recipe),
    }
    total_s = sum(v["wall_s"] for v in stages.values())
    return {
        "date": time.strftime("%Y-%m-%d"),
        "preset": preset,
        "recipe": {k2: v for k2, v in vars(recipe).items()},
        "machine": _machine(recipe.device),
        "model": {
            "preset": recipe.model_preset,
            "params_total": model.num_parameters(),
            "params_activated": model.num_parameters(activated=True),
            "params_mtp": model.num_parameters(include_mtp=True) - model.num_parameters(),
            "layers": c.num_hidden_layers,
            "dense_layers": c.first_k_dense_replace,
            "routed_experts": c.n_routed_experts,
            "experts_per_token": c.num_experts_per_tok,
            "shared_experts": c.n_shared_experts,
            "hidden_size": c.hidden_size,
            "vocab_size": c.vocab_size,
        },
        "mtp": {"enabled": recipe.mtp_weight > 0, "weight": recipe.mtp_weight},
        "stage_seconds": {k2: v["wall_s"] for k2, v in stages.items()},
        "total_minutes": total_s / 60,
        "cost_usd": total_s / 3600 * recipe.usd_per_hour,
        "usd_per_hour": recipe.usd_per_hour,
        "training": train,
        "eval_n": rows["grpo"]["n"],
        "k": k,
        "stages": rows,
        "figures": FIGURES,
    }


FIGURES = {
    "accuracy_by_stage.png": "Held-out greedy accuracy per level after each stage (the same problems for every bar).",
    "grpo.png": "GRPO: training reward (sampled, smoothed) and the periodic held-out greedy accuracy; response length "
    "and the share of completions that write steps in <think>.",
    "loss.png": "Training and validation loss (nats/token): pretraining, then SFT (completion tokens only).",
    "expert_load.png": "Expert load after each stage, per MoE layer: tokens routed to each expert / the layer's mean "
    "(1 = balanced), over the prompts and answers of 256 held-out problems.",
}


def write_report(
    out: Path, recipe: Recipe, preset: str, stages: dict[str, dict], evals: dict[str, dict]
) -> dict[str, Any]:
    """report.json, report.md and plots/ in the run folder; returns the report (report.json's content)."""
    report = build_report(out, recipe, preset, stages, evals)
    mtp = None
    if report["mtp"]["enabled"]:
        mtp = mtp_acceptance(out, recipe)
        report["mtp"]["acceptance_rate"] = mtp
    atomic_write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
    try:
        plot_report(out, report)
    except Exception as e:  # a plotting problem must not hide the result
        print(f"warning: could not draw the report's plots: {e}")
    atomic_write_text(out / "report.md", render_markdown(report))
    return report


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def render_markdown(r: dict[str, Any]) -> str:
    s, m, t, k = r["stages"], r["model"], r["training"], r["k"]
    g = s["grpo"]["vs_previous"]
    lines = [
        "# nanoseek speedrun",
        "",
        f"{r['date']}, preset `{r['preset']}`: **{r['total_minutes']:.1f} minutes** on {r['machine']['cpu']} "
        f"({r['machine']['cores']} cores{', ' + r['machine']['gpu'] if 'gpu' in r['machine'] else ''}), "
        f"torch {r['machine']['torch']}; estimated cost ${r['cost_usd']:.3f} at ${r['usd_per_hour']:.2f}/hour.",
        "",
        f"Held-out greedy accuracy on {r['eval_n']:,} distinct `test` problems: "
        + " -> ".join(f"{STAGE_TITLES[x].lstrip('+ ')} **{_pct(s[x]['accuracy'])}%**" for x in STAGES)
        + f". GRPO vs the SFT model: {g['wrong_to_right']} problems wrong->right, {g['right_to_wrong']} right->wrong, "
        f"sign test p = {g['p_value']:.2g}.",
        "",
        f"![accuracy by stage](plots/accuracy_by_stage.png)\n\n*{FIGURES['accuracy_by_stage.png']}*",
        "",
        "## What was trained",
        "",
        f"A DeepSeek-V3-architecture model (`{m['preset']}`): {m['params_total'] / 1e6:.2f}M parameters, "
        f"{m['params_activated'] / 1e6:.2f}M activated per token; {m['layers']} layers ({m['dense_layers']} dense, "
        f"{m['layers'] - m['dense_layers']} MoE with {m['routed_experts']} routed experts, top-{m['experts_per_token']}, "
        f"+ {m['shared_experts']} shared), hidden {m['hidden_size']}, MLA, vocabulary {m['vocab_size']}; MTP "
        + (
            f"on (weight {r['mtp']['weight']})."
            if r["mtp"]["enabled"]
            else "off (not worth it at this size and length)."
        ),
        "",
        "| stage | what | steps | tokens | wall time | tokens/s | MFU | final loss | val loss |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    rec = r["recipe"]
    what = {
        "pretrain": f"worked solutions of all levels, batch {rec['pretrain_batch']}, lr {rec['pretrain_lr']}, WSD",
        "sft": f"chat format; {100 * rec['worked_fraction']:.0f}% of completions worked, the rest answer-only "
        f"(R1's cold start), lr {rec['sft_lr']}",
        "grpo": f"{rec['grpo_prompts']} prompts x {rec['grpo_group']} samples, T {rec['grpo_temperature']}, "
        f"lr {rec['grpo_lr']}, reward = the verifier's 0/1 only",
    }
    for name in ("pretrain", "sft"):
        x = t[name]
        lines.append(
            f"| {name} | {what[name]} | {x['steps']:,} | {x['tokens'] / 1e6:.2f}M{'*' if name == 'sft' else ''} | "
            f"{x['wall_s']:.0f} s | {x['tokens_per_s']:,.0f} | {_pct(x['mfu'])}% | {x['train_loss']:.3f} | "
            f"{_num(x['val_loss'])} |"
        )
    x = t["grpo"]
    lines.append(
        f"| grpo | {what['grpo']} | {x['steps']:,} | {x['rollout_tokens'] / 1e6:.2f}M sampled | {x['wall_s']:.0f} s | "
        f"{x['tokens_per_s']:,.0f} sampled | - | - | - |"
    )
    other = {k2: v for k2, v in r["stage_seconds"].items() if k2 not in ("pretrain", "sft", "grpo")}
    lines += [
        "",
        "\\* SFT tokens are nominal (padded rows). Other stages: "
        + ", ".join(f"{k2} {v:.0f} s" for k2, v in other.items())
        + f". GRPO: rollouts took {100 * x['rollout_share']:.0f}% of the step time; mean reward "
        f"{x['reward_first_10pct']:.3f} -> {x['reward_last_10pct']:.3f} (first / last 10% of steps), groups with no "
        f"reward variance {100 * x['zero_variance_groups_first_10pct']:.0f}% -> "
        f"{100 * x['zero_variance_groups_last_10pct']:.0f}%, sampled length {x['response_len_first_10pct']:.1f} -> "
        f"{x['response_len_last_10pct']:.1f} tokens.",
        "",
        "## Held-out accuracy per stage",
        "",
        f"Greedy accuracy (%) per level; pass@{k} from {k} samples at T = 1 on a subset of "
        f"{s['grpo']['passk_n']} problems; format = one `<think>...</think>` block then an answer; "
        "steps = writes something inside `<think>`; sign test: flips against the previous stage on the same problems.",
    ]
    for name in STAGES:
        e = s[name]
        lines += ["", f"### {STAGE_TITLES[name]}", ""]
        if "vs_previous" in e:
            v = e["vs_previous"]
            lines += [
                f"vs {v['stage']}: {v['wrong_to_right']} wrong->right, {v['right_to_wrong']} right->wrong, "
                f"sign test p = {v['p_value']:.2g}.",
                "",
            ]
        lines += ["| level | n | accuracy | pass@" + str(k) + " |", "|---|---|---|---|"]
        for lv in LEVEL_NAMES:
            if lv in e["levels"]:
                lines.append(
                    f"| {lv} | {e['levels'][lv]['n']} | {_pct(e['levels'][lv]['accuracy'])} | "
                    f"{_pct(e['passk_levels'].get(lv))} |"
                )
        lines.append(f"| **all** | {e['n']} | **{_pct(e['accuracy'])}** | {_pct(e[f'pass@{k}'])} |")
        lines += [
            "",
            f"Format rate {_pct(e['format_rate'])}%, writes steps {_pct(e['think_rate'])}%, mean length "
            f"{e['mean_length']:.1f} tokens, sampled accuracy {_pct(e['sampled_accuracy'])}%.",
        ]
    lines += [
        "",
        "## Training curves",
        "",
        f"![GRPO](plots/grpo.png)\n\n*{FIGURES['grpo.png']}*",
        "",
        f"![loss](plots/loss.png)\n\n*{FIGURES['loss.png']}*",
        "",
        "## Expert load",
        "",
        f"![expert load](plots/expert_load.png)\n\n*{FIGURES['expert_load.png']}*",
        "",
        "Max / mean tokens per expert, per MoE layer (1.00 = balanced): "
        + "; ".join(f"{name} " + ", ".join(f"{max(row):.2f}" for row in s[name]["expert_load"]) for name in STAGES)
        + ". During pretraining (last step, aux-loss-free bias update): "
        + ", ".join(f"{v:.2f}" for v in t["pretrain"]["expert_max_over_mean"])
        + ".",
        "",
        "MTP: "
        + (
            f"acceptance rate {_pct(r['mtp'].get('acceptance_rate'))}% in self-speculative greedy decoding."
            if r["mtp"]["enabled"]
            else "off in this recipe (`--set mtp_weight=0.3` turns it on; the report then gives its acceptance rate)."
        ),
        "",
        "## Example conversations",
        "",
    ]
    for name in STAGES:
        lines += [f"### {STAGE_TITLES[name]}", ""]
        for ex in s[name]["examples"]:
            mark = "right" if ex["correct"] else f"wrong (answer {ex['answer']})"
            lines += [
                f"- **{ex['prompt']}** ({ex['level']}, {mark})",
                "",
                "  ```",
                f"  {ex['completion'].strip()}",
                "  ```",
                "",
            ]
    lines += [
        "## Reproduce",
        "",
        "```bash",
        f"nanoseek speedrun --preset {r['preset']} --out runs/speedrun   # the recipe: recipe.json; stages: stages.json",
        "```",
        "",
        "Per-stage runs (metrics.jsonl, their own plots, checkpoints) are in `pretrain/`, `sft/`, `grpo/`; the "
        "per-problem results in `eval/`.",
    ]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------- plots
def _save(fig, path: Path) -> None:
    from nanoseek.train.metrics import save_figure

    save_figure(fig, path)


def _smooth(v: list[float], k: int = 15) -> list[float]:
    return [sum(v[max(0, i - k + 1) : i + 1]) / len(v[max(0, i - k + 1) : i + 1]) for i in range(len(v))]


def plot_report(out: Path, report: dict[str, Any]) -> None:
    """The four captioned figures of report.md, in out/plots/."""
    from matplotlib.figure import Figure

    plots = out / "plots"
    s = report["stages"]
    # 1. accuracy by stage
    fig = Figure(figsize=(9, 3.8))
    ax = fig.add_subplot()
    names = [lv for lv in LEVEL_NAMES if lv in s["grpo"]["levels"]] + ["all"]
    width = 0.8 / len(STAGES)
    for i, st in enumerate(STAGES):
        vals = [100 * (s[st]["accuracy"] if lv == "all" else s[st]["levels"][lv]["accuracy"]) for lv in names]
        ax.bar([j + (i - 1) * width for j in range(len(names))], vals, width, label=STAGE_TITLES[st])
    ax.set_xticks(range(len(names)), names)
    ax.set(ylabel="greedy accuracy (%)", xlabel="level (operands x digits)", ylim=(0, 100))
    ax.set_title(f"held-out accuracy, {report['eval_n']:,} test problems")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    _save(fig, plots / "accuracy_by_stage.png")

    # 2. GRPO over steps
    rows = read_metrics(out / "grpo" / "metrics.jsonl")
    train = [r for r in rows if "reward_mean" in r]
    evals = [r for r in rows if "eval_accuracy" in r]
    fig = Figure(figsize=(12, 3.6))
    ax = fig.subplots(1, 2)
    steps = [r["step"] for r in train]
    ax[0].plot(steps, _smooth([r["reward_mean"] for r in train]), label="train reward (sampled, T=1)")
    ax[0].plot([r["step"] for r in evals], [r["eval_accuracy"] for r in evals], "o-", label="held-out greedy accuracy")
    ax[0].set(xlabel="GRPO step", ylabel="reward / accuracy", title="reward and accuracy")
    ax[1].plot(steps, _smooth([r["response_len"] for r in train]), label="sampled response length (tokens)")
    ax[1].set(xlabel="GRPO step", ylabel="tokens", title="response length and reasoning")
    twin = ax[1].twinx()
    twin.plot(steps, _smooth([r["think_rate"] for r in train]), color="C2", label="writes steps in <think> (share)")
    twin.set_ylim(0, 1)
    for a in (ax[0], ax[1], twin):
        a.legend(fontsize=8, loc="lower right" if a is twin else "upper left")
    ax[0].grid(alpha=0.3)
    ax[1].grid(alpha=0.3)
    _save(fig, plots / "grpo.png")

    # 3. loss curves
    fig = Figure(figsize=(12, 3.6))
    ax = fig.subplots(1, 2)
    for a, name in zip(ax, ("pretrain", "sft")):
        recs = [r for r in read_metrics(out / name / "metrics.jsonl") if "step" in r]
        a.plot([r["step"] for r in recs], _smooth([r["loss"] for r in recs], 20), label="train (smoothed)")
        if any(r.get("mtp_loss") for r in recs):  # drawn only when MTP trained (a flat 0 would mislead)
            a.plot([r["step"] for r in recs], _smooth([r["mtp_loss"] for r in recs], 20), label="MTP (token t+2)")
        val = [(r["step"], r["val_loss"]) for r in recs if isinstance(r.get("val_loss"), (int, float))]
        if val:
            a.plot(*zip(*val), "o-", markersize=3, label="validation")
        a.set(xlabel="step", ylabel="cross-entropy (nats/token)", title=name)
        a.grid(alpha=0.3)
        a.legend()
    _save(fig, plots / "loss.png")

    # 4. expert load heatmap
    mats = [(st, s[st]["expert_load"]) for st in STAGES if s[st]["expert_load"]]
    if mats:
        fig = Figure(figsize=(8, 1.2 + 0.9 * len(mats) * len(mats[0][1])))
        ax = fig.add_subplot()
        data = [row for _, m in mats for row in m]
        labels = [f"{st}, MoE layer {i + 1}" for st, m in mats for i in range(len(m))]
        im = ax.imshow(data, cmap="coolwarm", vmin=0, vmax=max(2.0, max(max(r) for r in data)), aspect="auto")
        ax.set_yticks(range(len(labels)), labels)
        ax.set_xticks(range(len(data[0])), [str(i) for i in range(len(data[0]))])
        ax.set(xlabel="routed expert", title="tokens per expert / layer mean (1 = balanced)")
        for i, row in enumerate(data):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
        fig.colorbar(im, ax=ax)
        _save(fig, plots / "expert_load.png")
