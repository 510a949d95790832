"""What a benchmark's numbers were measured on: every JSON line carries the CPU's name (numbers from different
CPUs are not comparable, ratios measured side by side in one run are)."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name and core count, e.g. "AMD EPYC 7B13, 2 cores"."""
    cpuinfo = Path("/proc/cpuinfo")
    names = (
        [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines() if ln.startswith("model name")]
        if cpuinfo.is_file()
        else []
    )
    return f"{names[0] if names else platform.processor() or platform.machine()}, {os.cpu_count()} cores"
