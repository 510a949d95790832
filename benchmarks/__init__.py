"""Measured comparisons (see BENCHMARKS.md); run one as `python -m benchmarks.NAME`."""

from __future__ import annotations


def run_command(name: str, argv: list[str]) -> None:
    """Run `nanoseek ARGV` in this process, as a user would type it; a failing command stops the benchmark."""
    from nanoseek.cli.main import main

    print(f"\n== {name}: nanoseek {' '.join(argv)}", flush=True)
    code = main(argv)
    if code == 130:
        raise KeyboardInterrupt
    if code != 0:
        raise RuntimeError(f"{name} failed: nanoseek {' '.join(argv)}")
