"""Run reports: the metrics log (`metrics.jsonl`, one JSON object per logged step) and its PNG plots.

Plots use matplotlib's Agg canvas directly (no pyplot, no global backend switch), so they work headless.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nanoseek.io import atomic_path, atomic_write_text


class MetricsLogger:
    """Appends one JSON line per record to `path`, flushed at once so a killed run keeps what it logged.

    `keep_until_step` drops records after that step first (a resumed run rewrites the steps it redoes).
    """

    def __init__(self, path: str | Path, keep_until_step: int | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if keep_until_step is not None and self.path.exists():
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= keep_until_step]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._file = open(self.path, "a", encoding="utf-8")

    def log(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, allow_nan=True) + "\n")  # one write: no interleaved half lines
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl; a torn last line (killed mid-write) is skipped."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def save_figure(fig, path: str | Path) -> Path:
    """Write a matplotlib figure as a PNG atomically (temp file + rename): a reader never sees half a plot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # matplotlib loads only when plotting

    FigureCanvasAgg(fig)
    with atomic_path(path, suffix=".png") as tmp:  # savefig picks the format from the suffix
        fig.savefig(tmp, dpi=100, bbox_inches="tight")
    return Path(path)


def plot_metrics(metrics_path: str | Path, out_dir: str | Path) -> list[Path]:
    """loss.png (train + val loss), lr.png, throughput.png and expert_load.png (max/mean per MoE layer)."""
    from matplotlib.figure import Figure

    records = [r for r in read_metrics(metrics_path) if "step" in r]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def series(key: str) -> tuple[list[int], list[float]]:
        pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        return [s for s, _ in pts], [v for _, v in pts]

    def save(fig: Figure, name: str) -> Path:
        return save_figure(fig, out / name)

    def single(title: str, ylabel: str, lines: list[tuple[str, str]], log_y: bool = False) -> Figure:
        fig = Figure(figsize=(7, 4))
        ax = fig.add_subplot()
        for key, label in lines:
            x, y = series(key)
            if key == "mtp_loss" and not any(y):  # MTP off: its loss is logged as 0, a flat line would mislead
                continue
            if x:
                ax.plot(x, y, label=label, marker="o" if key == "val_loss" else None, markersize=3)
        ax.set(title=title, xlabel="step", ylabel=ylabel)
        if log_y:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend()
        return fig

    paths = [
        save(
            single("loss", "cross-entropy (nats/token)", [("loss", "train"), ("mtp_loss", "MTP"), ("val_loss", "val")]),
            "loss.png",
        ),
        save(single("learning rate", "lr", [("lr", "lr")]), "lr.png"),
        save(single("throughput", "tokens/s", [("tokens_per_s", "tokens/s")]), "throughput.png"),
    ]
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    loads = [(r["step"], r["max_load_violation"]) for r in records if r.get("max_load_violation")]
    for layer in range(len(loads[0][1]) if loads else 0):
        ax.plot([s for s, _ in loads], [1 + v[layer] for _, v in loads], label=f"MoE layer {layer}", linewidth=1)
    ax.axhline(1.0, color="gray", linestyle="--", linewidth=0.8)
    ax.set(title="expert load balance", xlabel="step", ylabel="max load / mean load")
    ax.grid(alpha=0.3)
    if loads:
        ax.legend(fontsize="small")
    paths.append(save(fig, "expert_load.png"))
    return paths


PLOTS = {
    "reward.png": ("reward", "mean reward", [("reward_mean", "train (sampled)")]),
    "accuracy.png": ("accuracy", "accuracy", [("accuracy", "train (sampled)"), ("eval_accuracy", "held-out (greedy)")]),
    "response_length.png": (
        "response length",
        "tokens",
        [("response_len", "train (sampled)"), ("eval_response_len", "held-out (greedy)")],
    ),
    "kl.png": ("KL to reference (k3)", "nats/token", [("kl", "kl")]),
    "clip_fraction.png": (
        "clipped tokens",
        "fraction",
        [("clip_frac_low", "low (A<0)"), ("clip_frac_high", "high (A>0)")],
    ),
    "think_rate.png": (
        "non-empty <think>",
        "fraction",
        [("think_rate", "train (sampled)"), ("eval_think_rate", "held-out")],
    ),
}


def plot_grpo(metrics_path: str | Path, out_dir: str | Path) -> list[Path]:
    """reward, accuracy, response length, KL, clip fraction and think-rate PNGs from a GRPO metrics.jsonl."""
    from matplotlib.figure import Figure

    records = read_metrics(metrics_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, (title, ylabel, lines) in PLOTS.items():
        fig = Figure(figsize=(7, 4))
        ax = fig.add_subplot()
        drawn = 0
        for key, label in lines:
            pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
            if pts:
                ax.plot(*zip(*pts), label=label, marker="o" if key.startswith("eval_") else None, markersize=3)
                drawn += 1
        ax.set(title=title, xlabel="step", ylabel=ylabel)
        ax.grid(alpha=0.3)
        if len(lines) > 1 and drawn:
            ax.legend()
        paths.append(save_figure(fig, out / name))
    return paths


def write_plots(run_dir: str | Path, plot: Callable[[Path, Path], list[Path]] = plot_metrics) -> None:
    """`plot(RUN/metrics.jsonl, RUN/plots)`; a failure is only a warning: a plot must not hide the run's result."""
    try:
        plot(Path(run_dir) / "metrics.jsonl", Path(run_dir) / "plots")
    except Exception as e:
        print(f"warning: could not write plots: {e}", file=sys.stderr)
