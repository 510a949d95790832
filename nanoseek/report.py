"""Run reports: the metrics log (`metrics.jsonl`, one JSON object per logged step) and its PNG plots.

Plots use matplotlib's Agg canvas directly (no pyplot, no global backend switch), so they work headless.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from nanoseek.config import atomic_write_text


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


def save_figure(fig, path: Path) -> Path:
    """Write a matplotlib figure as a PNG atomically (temp file + rename): a reader never sees half a plot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # matplotlib loads only when plotting

    FigureCanvasAgg(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=100, bbox_inches="tight")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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
