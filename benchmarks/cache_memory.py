"""Decode-cache memory per sequence: measured vs formula, V3's latent cache vs V3.2's vs V4's compressed cache.

    python -m benchmarks.cache_memory                          # 1k / 8k / 32k measured, 128k by formula
    python -m benchmarks.cache_memory --lengths 1024 8192      # fewer
    python -m benchmarks.cache_memory --lengths 32768 --fill 1024   # a 32k slot, 1k tokens in it (quicker)

Measured: an Engine (one slot, max_len = n) prefills a prompt of n - 2 random tokens and decodes 2 more, then the
bytes of the cache tensors it holds for that sequence are summed (`bytes_per_sequence`); the formula is
`kv_cache_bytes(config, n)`. Small models at equal hidden size (cpu-small, its V3.2 twin with an indexer, and
cpu-small-v4: hidden 128, 4 layers), float32 as they run here; the full-size models (DeepSeek-V3, V3.2 and
V4-Pro, all hidden 7168) by formula in bfloat16. Prints a markdown table, then one JSON line.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time

import torch

from nanoseek import ModelConfig, Transformer
from nanoseek.infer.cache import kv_cache_bytes
from nanoseek.infer.engine import Engine
from nanoseek.infer.sampling import SamplingParams

SMALL = {
    "V3 cpu-small": dict(preset="cpu-small"),
    "V3.2 cpu-small + indexer": dict(
        preset="cpu-small", model_type="deepseek_v32", index_n_heads=4, index_head_dim=64, index_topk=256
    ),
    "V4 cpu-small-v4": dict(preset="cpu-small-v4"),
}
FULL = {"V3 deepseek-v3": "deepseek-v3", "V3.2 deepseek-v32": "deepseek-v32", "V4 deepseek-v4-pro": "deepseek-v4-pro"}


def measure(name: str, spec: dict, n: int, fill: int | None = None) -> dict:
    """One sequence of n tokens through the Engine (a prompt of `fill` tokens, default n - 2, when that takes too
    long: the slot is allocated for max_len = n either way); the cache bytes it holds vs the formula."""
    spec = dict(spec)
    config = ModelConfig.from_preset(spec.pop("preset"), max_position_embeddings=max(n, 1024), **spec)
    torch.manual_seed(0)
    model = Transformer(config).eval()
    engine = Engine(model, max_batch_size=1, max_len=n)
    P = n - 2 if fill is None else min(fill, n - 2)
    prompt = torch.randint(2, config.vocab_size, (P,), generator=torch.Generator().manual_seed(0)).tolist()
    t = time.perf_counter()
    engine.generate([prompt], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    seconds = time.perf_counter() - t
    measured, formula = engine.cache.bytes_per_sequence(), kv_cache_bytes(config, n, dtype_bytes=4)
    return dict(model=name, tokens=n, filled=P + 2, measured=measured, formula=formula, seconds=round(seconds, 1))


def mib(b: float) -> str:
    return f"{b / 2**20:,.2f}" if b < 2**30 else f"{b / 2**30:,.2f} Gi"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 8192, 32768], help="measured context lengths")
    p.add_argument("--fill", type=int, default=None, help="prompt tokens at most (default: the whole length)")
    p.add_argument("--formula-lengths", type=int, nargs="+", default=[1024, 8192, 32768, 131072])
    args = p.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    rows = []
    for n in args.lengths:
        for name, spec in SMALL.items():
            rows.append(measure(name, spec, n, args.fill))
            print(json.dumps(rows[-1]), flush=True)  # progress: long prefills take minutes on a busy CPU
    for r in rows:
        assert r["measured"] == r["formula"], r
    full = [
        dict(model=name, tokens=n, formula=kv_cache_bytes(ModelConfig.from_preset(preset), n, dtype_bytes=2))
        for n in args.formula_lengths
        for name, preset in FULL.items()
    ]
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {datetime.date.today()}")
    print("\n| tokens | " + " | ".join(f"{m} MiB measured (= formula)" for m in SMALL) + " | V4 / V3 |")
    print("|---" * (len(SMALL) + 2) + "|")
    for n in args.lengths:
        by = {r["model"]: r for r in rows if r["tokens"] == n}
        v3, v4 = by["V3 cpu-small"]["measured"], by["V4 cpu-small-v4"]["measured"]
        print(f"| {n:,} | " + " | ".join(mib(by[m]["measured"]) for m in SMALL) + f" | {v4 / v3:.3f} |")
    print("\n| tokens | " + " | ".join(f"{m} MiB (formula, bf16)" for m in FULL) + " | V4 / V3 |")
    print("|---" * (len(FULL) + 2) + "|")
    for n in args.formula_lengths:
        by = {r["model"]: r["formula"] for r in full if r["tokens"] == n}
        ratio = by["V4 deepseek-v4-pro"] / by["V3 deepseek-v3"]
        print(f"| {n:,} | " + " | ".join(mib(by[m]) for m in FULL) + f" | {ratio:.3f} |")
    print(json.dumps({"measured": rows, "formula": full}))


if __name__ == "__main__":
    main()
