"""Forward+backward and forward-only tokens/s: nanoseek vs transformers' DeepseekV3 on the same weights.

    python benchmarks/model_throughput.py --preset cpu-small --batch-size 8 --seq-len 256
    python -m benchmarks.model_throughput --preset gpu-small --device cuda --dtype bfloat16 --seq-len 1024

Prints one JSON line. Both models run the main next-token path only (HF has no MTP), in one process,
alternating rounds so that machine noise hits both alike. MFU uses the FLOPs of nanoseek.flops against a
matmul peak of the same dtype measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from nanoseek import ModelConfig, Transformer, save_model
from nanoseek.model.flops import flops_per_token


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(dtype: torch.dtype = torch.float32, n: int = 2048, reps: int = 20, device: str = "cpu") -> float:
    """Measured dense matmul FLOP/s (the machine's practical peak for this dtype)."""
    dev = torch.device(device)
    n = 8192 if dev.type == "cuda" else n
    a, b = torch.randn(n, n, dtype=dtype, device=dev), torch.randn(n, n, dtype=dtype, device=dev)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(3):
        _sync(dev)
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        _sync(dev)
        best = min(best, (time.perf_counter() - t) / reps)
    return 2 * n**3 / best


def step_time(fn, warmup: int, iters: int, device: torch.device | None = None) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu-small")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = p.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    torch.manual_seed(0)
    config = ModelConfig.from_preset(args.preset, num_nextn_predict_layers=0)
    ours = Transformer(config)
    with tempfile.TemporaryDirectory() as d:
        save_model(ours, d)
        hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=dtype).to(device)
    ours = ours.to(device=device, dtype=dtype)
    ids = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len + 1), device=device)
    x, y = ids[:, :-1], ids[:, 1:]
    V = config.vocab_size

    with torch.no_grad():
        diff = (hf(x).logits - ours(x)).abs().max().item()

    def train_ours():
        loss = F.cross_entropy(ours(x).view(-1, V), y.reshape(-1))
        loss.backward()

    def train_hf():
        loss = F.cross_entropy(hf(x).logits.view(-1, V), y.reshape(-1))
        loss.backward()

    @torch.no_grad()
    def fwd_ours():
        ours(x)

    @torch.no_grad()
    def fwd_hf():
        hf(x)

    peak = matmul_peak(dtype, device=args.device)
    results: dict[str, list[float]] = {k: [] for k in ("train_ours", "train_hf", "fwd_ours", "fwd_hf")}
    ours.train()
    hf.train()
    for _ in range(args.rounds):  # alternate so drift hits both
        results["train_ours"] += step_time(train_ours, 2, args.iters, device)
        results["train_hf"] += step_time(train_hf, 2, args.iters, device)
    ours.eval()
    hf.eval()
    for _ in range(args.rounds):
        results["fwd_ours"] += step_time(fwd_ours, 2, args.iters, device)
        results["fwd_hf"] += step_time(fwd_hf, 2, args.iters, device)
    tokens = args.batch_size * args.seq_len
    tps = {k: tokens / statistics.median(v) for k, v in results.items()}
    f_train = flops_per_token(config, args.seq_len, training=True, include_mtp=False)
    f_fwd = flops_per_token(config, args.seq_len, training=False, include_mtp=False)
    out = {
        "bench": "model_throughput",
        "preset": args.preset,
        "params": ours.num_parameters(),
        "batch": args.batch_size,
        "seq_len": args.seq_len,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "logits_max_abs_diff": diff,
        "train_tokens_per_s": {"nanoseek": round(tps["train_ours"]), "transformers": round(tps["train_hf"])},
        "train_ratio": round(tps["train_ours"] / tps["train_hf"], 3),
        "forward_tokens_per_s": {"nanoseek": round(tps["fwd_ours"]), "transformers": round(tps["fwd_hf"])},
        "forward_ratio": round(tps["fwd_ours"] / tps["fwd_hf"], 3),
        "matmul_peak_gflops": round(peak / 1e9, 1),
        "mfu_train": {
            "nanoseek": round(f_train * tps["train_ours"] / peak, 3),
            "transformers": round(f_train * tps["train_hf"] / peak, 3),
        },
        "mfu_forward": {
            "nanoseek": round(f_fwd * tps["fwd_ours"] / peak, 3),
            "transformers": round(f_fwd * tps["fwd_hf"] / peak, 3),
        },
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{platform.machine()} {torch.get_num_threads()} threads",
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
