"""The speedrun report's figures: each one drawn from report.json and the stages' metrics.jsonl into plots/, and
captioned in FIGURES (report.md shows each with its caption)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nanoseek.speedrun.evaluate import LEVEL_NAMES, MULTI_DIGIT_LEVELS, STAGE_TITLES, STAGES
from nanoseek.train.metrics import read_metrics, save_figure

FIGURES = {
    "accuracy_by_stage.png": "Held-out greedy accuracy per level after each stage (the same problems for every bar).",
    "grpo.png": "GRPO: training reward (sampled, smoothed) and the periodic held-out greedy accuracy; response length "
    "and the share of completions that write steps in <think>.",
    "grpo_reasoning_by_level.png": "R1's signature over GRPO steps: per level, the share of the periodic held-out "
    "greedy completions that write steps in <think>, and their mean length in tokens (solid lines: multi-digit "
    "levels, dashed: one-digit).",
    "loss.png": "Training and validation loss (nats/token): pretraining, then SFT (completion tokens only).",
    "expert_load.png": "Expert load after each stage, per MoE layer: tokens routed to each expert / the layer's mean "
    "(1 = balanced), over the prompts and answers of 256 held-out problems.",
}


def _smooth(v: list[float], k: int = 15) -> list[float]:
    return [sum(v[max(0, i - k + 1) : i + 1]) / len(v[max(0, i - k + 1) : i + 1]) for i in range(len(v))]


def plot_report(out: Path, report: dict[str, Any]) -> None:
    """The captioned figures of report.md (FIGURES), in out/plots/."""
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
    save_figure(fig, plots / "accuracy_by_stage.png")

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
    save_figure(fig, plots / "grpo.png")

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
    save_figure(fig, plots / "loss.png")

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
        save_figure(fig, plots / "expert_load.png")

    # 5. reasoning per level over GRPO steps
    plot_reasoning_by_level(rows, plots / "grpo_reasoning_by_level.png")


def plot_reasoning_by_level(rows: list[dict], path: Path) -> None:
    """R1's signature over GRPO steps, from the periodic eval records of grpo/metrics.jsonl: per level, the share of
    greedy completions that write steps and their mean length (solid: multi-digit levels, dashed: one-digit)."""
    from matplotlib.figure import Figure

    evals = [r for r in rows if "eval_think_rate_by_level" in r]
    fig = Figure(figsize=(12, 3.8))
    ax = fig.subplots(1, 2)
    steps = [r["step"] for r in evals]
    for i, lv in enumerate(lv for lv in LEVEL_NAMES if evals and lv in evals[0]["eval_think_rate_by_level"]):
        style = {"color": f"C{i}", "ls": "-" if lv in MULTI_DIGIT_LEVELS else "--", "marker": "o", "ms": 3, "label": lv}
        ax[0].plot(steps, [100 * r["eval_think_rate_by_level"][lv] for r in evals], **style)
        ax[1].plot(steps, [r["eval_response_len_by_level"][lv] for r in evals], **style)
    ax[0].set(xlabel="GRPO step", ylabel="writes steps in <think> (%)", ylim=(-3, 103), title="reasoning share")
    ax[1].set(xlabel="GRPO step", ylabel="tokens", title="mean response length")
    ax[1].set_ylim(bottom=0)
    for a in ax:
        a.grid(alpha=0.3)
    ax[1].legend(fontsize=8, ncol=2, title="level", title_fontsize=8)
    save_figure(fig, path)
