"""Data- and expert-parallel scaling: tokens/s per process at 1 and 2 processes, and the all-to-all's share of an EP step.

    python -m benchmarks.scaling --preset cpu-small --batch-size 8 --seq-len 256 --steps 6
    python -m benchmarks.scaling --nproc 8 --device cuda --preset gpu-small --layouts ddp fsdp ep   # a GPU box

Each layout runs under `torchrun --standalone` (1 process for the baseline, --nproc for the others; torchrun sets
one thread per process on CPU) and times what `nanoseek train` does each step: forward with MTP, backward,
gradient sync, clip, AdamW, bias update, on random tokens (throughput does not depend on the data). Weak scaling:
every process keeps --batch-size, so efficiency = (tokens/s of all N processes) / (N x tokens/s of one).
EP: the routed experts are split over the processes (--ep N with DDP); the all-to-all time is measured around
the dispatch's collectives, forward (counts + rows, both directions) and backward (marked by autograd nodes
placed around each exchange). One JSON line per layout, then a summary line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------- one worker
class _A2ATimer:
    """Seconds spent in the EP dispatch's collectives this step, forward and backward."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._bwd_start: list[float] = []

    def install(self) -> None:
        import torch.distributed as dist
        import torch.distributed._functional_collectives as funcol

        timer, a2a_rows, a2a_counts = self, funcol.all_to_all_single_autograd, dist.all_to_all_single

        class Mark(torch.autograd.Function):
            """Identity; its backward stamps the time the gradient passes (before / after the reverse a2a)."""

            @staticmethod
            def forward(ctx, x, after):
                ctx.after = after
                return x.view_as(x)

            @staticmethod
            def backward(ctx, g):
                if ctx.after:  # reached first in backward: the reverse all-to-all starts now
                    timer._bwd_start.append(time.perf_counter())
                elif timer._bwd_start:
                    timer.seconds += time.perf_counter() - timer._bwd_start.pop()
                return g, None

        def rows(x, *args, **kwargs):
            t0 = time.perf_counter()
            y = a2a_rows(Mark.apply(x, False), *args, **kwargs)
            y = Mark.apply(y.wait() if hasattr(y, "wait") else y, True)
            timer.seconds += time.perf_counter() - t0
            return y

        def counts(*args, **kwargs):
            t0 = time.perf_counter()
            out = a2a_counts(*args, **kwargs)
            timer.seconds += time.perf_counter() - t0
            return out

        funcol.all_to_all_single_autograd = rows
        dist.all_to_all_single = counts


def worker(args: argparse.Namespace) -> None:
    """One process of a layout: time args.steps steps after a warm-up step; rank 0 prints one JSON line."""
    from nanoseek import ModelConfig, Transformer
    from nanoseek.distributed.data_parallel import Parallel
    from nanoseek.distributed.process_group import all_reduce, init_distributed, shutdown
    from nanoseek.model.flops import flops_per_token
    from nanoseek.train.optim import build_optimizer, expert_bias_step

    env = init_distributed(args.device)
    timer = _A2ATimer()
    if args.layout == "ep":
        timer.install()
    torch.manual_seed(0)
    config = ModelConfig.from_preset(args.preset)
    with torch.device(env.device):
        model = Transformer(config)
    dp = "fsdp" if args.layout == "fsdp" else "ddp"
    par = Parallel(model, env, dp, mtp=True, ep=env.world_size if args.layout == "ep" else 1)
    opt = build_optimizer(model, 1e-3)
    g = torch.Generator().manual_seed(env.rank)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if env.device.type == "cuda"
        else torch.autocast("cpu", enabled=False)
    )
    times, a2a = [], []
    for i in range(args.steps + 1):
        ids = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len + 1), generator=g).to(env.device)
        if env.device.type == "cuda":
            torch.cuda.synchronize()
        t0, timer.seconds = time.perf_counter(), 0.0
        with autocast:
            losses = par.compute_loss(ids[:, :-1], ids[:, 1:], mtp=True)
        losses.total(0.3).backward()
        loads = all_reduce(model.expert_loads(), env)
        par.reduce_gradients()
        par.clip_grad_norm(1.0)
        opt.step()
        expert_bias_step(model, loads, 1e-3)
        opt.zero_grad(set_to_none=True)
        if env.device.type == "cuda":
            torch.cuda.synchronize()
        if i > 0:  # the first step warms up allocators and collectives
            times.append(time.perf_counter() - t0)
            a2a.append(timer.seconds)
    step_s = torch.tensor([statistics.median(times)], dtype=torch.float64)
    step_s = all_reduce(step_s, env, op="max").item()  # the slowest rank sets the pace
    tokens = args.batch_size * args.seq_len
    if env.is_main:
        record = {
            "bench": "scaling",
            "layout": args.layout,
            "processes": env.world_size,
            "preset": args.preset,
            "device": env.device.type,
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "step_s": step_s,
            "tokens_per_s_per_process": tokens / step_s,
            "tokens_per_s": env.world_size * tokens / step_s,
            "mfu_per_process": flops_per_token(config, args.seq_len) * tokens / step_s / args.peak_flops,
        }
        if args.layout == "ep":
            record["all_to_all_s"] = statistics.median(a2a)
            record["all_to_all_share"] = statistics.median(a2a) / statistics.median(times)
        print(json.dumps(record), flush=True)
    shutdown()


# ------------------------------------------------------------------------------------------------ driver
def launch(layout: str, nproc: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd += ["-m", "benchmarks.scaling", "--worker", "--layout", layout, "--preset", args.preset]
    cmd += ["--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--steps", str(args.steps)]
    cmd += ["--device", args.device, "--peak-flops", str(args.peak_flops)]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        errors = [ln for ln in proc.stderr.splitlines() if "Error" in ln or "terminate" in ln or "what()" in ln]
        return {"bench": "scaling", "layout": layout, "processes": nproc, "failed": errors[-5:] or proc.stderr[-500:]}
    return json.loads(lines[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu-small")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per process per step")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=6, help="timed steps (after one warm-up step)")
    p.add_argument("--nproc", type=int, default=2, help="processes of the parallel layouts")
    p.add_argument("--layouts", nargs="*", default=["ddp", "fsdp", "ep"], choices=["ddp", "fsdp", "ep"])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--peak-flops", type=float, default=205e9, help="per-process peak FLOP/s for MFU (CPU: 205e9)")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--layout", default="single", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    base = launch("single", 1, args)
    print(json.dumps(base), flush=True)
    summary = {"bench": "scaling_summary", "preset": args.preset, "device": args.device, "processes": args.nproc}
    for layout in args.layouts:
        r = launch(layout, args.nproc, args)
        if "tokens_per_s" in r and "tokens_per_s" in base:
            r["scaling_efficiency"] = r["tokens_per_s"] / (args.nproc * base["tokens_per_s"])
            summary[f"{layout}_efficiency"] = r["scaling_efficiency"]
        if "all_to_all_share" in r:
            summary["ep_all_to_all_share"] = r["all_to_all_share"]
        print(json.dumps(r), flush=True)
    summary["single_tokens_per_s"] = base.get("tokens_per_s")
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
