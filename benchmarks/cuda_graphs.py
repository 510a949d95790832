"""Greedy decoding replayed from CUDA graphs vs the eager step, per batch bucket (issue 23, item 6).

    python -m benchmarks.cuda_graphs --preset gpu-small --device cuda            # on a lent GPU (benchmarks/gpu.sh)
    python -m benchmarks.cuda_graphs --preset tiny --device cpu --dtype float32  # the static loop, no capture

A decode step at batch 1 on a GPU is a few hundred small kernels: the launch overhead and Python, not the GPU, set
its time. A CUDA graph records the whole step once per batch bucket and replays it with one launch. What makes the
step capturable is that it has fixed shapes and no host work: the token fed back, the positions advanced and the
output column chosen all happen on the device (`StaticDecoder.step`), and every step reads the cache to the same
length (`max_len`, the unwritten tail masked), so one graph serves every step of a bucket. The eager baseline is
the engine's own eager step (`cached_step` reading the exact cached length, then `write_latents`), driven from
Python a token at a time.

Per batch size, one JSON line: ms per step and decode tokens/s for eager and graph, capture time, and whether the
two decoded the same tokens (bf16 may flip a near-tie: the graph reads a longer, masked cache). On a device other
than CUDA the same static loop runs without capture: that checks the loop (tests/test_cuda_graphs.py), not a
speed.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from benchmarks.machine import cpu_name
from nanoseek import ModelConfig, Transformer, load_model
from nanoseek.infer.cache import LatentCache
from nanoseek.model.mla import write_latents


class StaticDecoder:
    """Greedy decoding of `batch` rows at fixed shapes, with the next token, the positions and the output column
    kept on the device, so a step is capturable; rows use cache slots 0..batch-1."""

    def __init__(self, model: Transformer, cache: LatentCache, batch: int, new_tokens: int) -> None:
        self.model, self.cache, dev = model, cache, cache.kv.device
        self.slots = torch.arange(batch, device=dev)
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=dev)  # the token each row feeds next
        self.start = torch.zeros(batch, dtype=torch.long, device=dev)  # its position
        self.col = torch.zeros(1, dtype=torch.long, device=dev)  # the output column of this step
        self.out = torch.zeros(batch, new_tokens, dtype=torch.long, device=dev)

    def reset(self, first: torch.Tensor, start: torch.Tensor) -> None:
        """After the prefill: the first new token [batch] (column 0) at positions `start` [batch]."""
        self.ids.copy_(first[:, None])
        self.start.copy_(start)
        self.out.zero_()
        self.out[:, 0] = first
        self.col.fill_(1)

    def step(self) -> None:
        """One greedy token for every row, device-side only."""
        logits, _, new = self.model.cached_step(self.ids, self.cache.kv, self.slots, self.start, self.cache.max_len)
        write_latents(self.cache.kv, self.slots, self.start, new)
        nxt = logits[:, -1].argmax(-1)
        self.out.index_copy_(1, self.col, nxt[:, None])
        self.ids.copy_(nxt[:, None])
        self.start.add_(1)
        self.col.add_(1)


def prefill(model: Transformer, cache: LatentCache, prompts: torch.Tensor) -> torch.Tensor:
    """Write the prompts [B, P] into cache rows 0..B-1; their first greedy tokens [B]."""
    B, P = prompts.shape
    slots, zero = torch.arange(B, device=prompts.device), torch.zeros(B, dtype=torch.long, device=prompts.device)
    logits, _ = model.forward_cached(prompts, cache.kv, slots, zero, last_only=True)
    return logits[:, -1].argmax(-1)


def eager_decode(model: Transformer, cache: LatentCache, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """The engine's eager loop: one `cached_step` over the exact cached length per token, from Python."""
    B, P = prompts.shape
    tok, slots = prefill(model, cache, prompts), torch.arange(B, device=prompts.device)
    out = [tok]
    for t in range(1, new_tokens):
        start = torch.full((B,), P + t - 1, dtype=torch.long, device=prompts.device)
        logits, _, new = model.cached_step(tok[:, None], cache.kv, slots, start, P + t - 1)
        write_latents(cache.kv, slots, start, new)
        tok = logits[:, -1].argmax(-1)
        out.append(tok)
    return torch.stack(out, dim=1)


class GraphDecode:
    """StaticDecoder's step captured in a CUDA graph (replayed) or, off CUDA, called as it is."""

    def __init__(self, model: Transformer, cache: LatentCache, prompts: torch.Tensor, new_tokens: int) -> None:
        self.model, self.cache, self.prompts, self.new_tokens = model, cache, prompts, new_tokens
        self.dec = StaticDecoder(model, cache, prompts.shape[0], new_tokens)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.capture_s = 0.0
        if prompts.device.type == "cuda":
            self._capture()

    def _reset(self) -> None:
        B, P = self.prompts.shape
        first = prefill(self.model, self.cache, self.prompts)
        self.dec.reset(first, torch.full((B,), P, dtype=torch.long, device=self.prompts.device))

    def _capture(self) -> None:
        t = time.perf_counter()
        self._reset()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture (allocator, cuBLAS handles, lazy inits)
            for _ in range(3):
                self.dec.step()
        torch.cuda.current_stream().wait_stream(side)
        self._reset()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.dec.step()
        torch.cuda.synchronize()
        self.capture_s = time.perf_counter() - t

    def __call__(self) -> torch.Tensor:
        self._reset()
        for _ in range(self.new_tokens - 1):
            self.graph.replay() if self.graph is not None else self.dec.step()
        return self.dec.out.clone()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(device: torch.device, fn) -> tuple[float, torch.Tensor]:
    _sync(device)
    t = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t, out


def measure(model: Transformer, batch: int, prompt_len: int, new_tokens: int, reps: int, seed: int = 0) -> dict:
    """Eager and graph decoding of the same prompts, alternating `reps` rounds; medians. Decode time excludes
    the prefill (timed on its own and subtracted), so ms per step is the decode step alone."""
    c, device = model.config, next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, c.vocab_size, (batch, prompt_len), generator=g).to(device)
    cache = LatentCache(c, n_slots=batch, max_len=prompt_len + new_tokens, dtype=dtype, device=device)
    with torch.no_grad():
        graph = GraphDecode(model, cache, prompts, new_tokens)
        runs = {"eager": lambda: eager_decode(model, cache, prompts, new_tokens), "graph": graph}
        pre = lambda: prefill(model, cache, prompts)  # noqa: E731
        for fn in (*runs.values(), pre):  # warm-up
            fn()
        times: dict[str, list[float]] = {"eager": [], "graph": [], "prefill": []}
        outs = {}
        for _ in range(reps):
            for name, fn in (*runs.items(), ("prefill", pre)):
                s, outs[name] = _timed(device, fn)
                times[name].append(s)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    steps = new_tokens - 1
    row: dict = {"bench": "cuda_graphs" if device.type == "cuda" else "static_decode", "batch": batch}
    for name in ("eager", "graph"):
        decode_s = max(med[name] - med["prefill"], 1e-9)
        row[f"{name}_ms_per_step"] = round(1000 * decode_s / steps, 4)
        row[f"{name}_tok_s"] = round(batch * steps / decode_s, 1)
    row["speedup"] = round(row["eager_ms_per_step"] / row["graph_ms_per_step"], 3)
    row["capture_s"] = round(graph.capture_s, 3)
    same = outs["eager"] == outs["graph"]
    row["identical"] = bool(same.all())
    row["first_difference"] = None if row["identical"] else int((~same).any(0).nonzero()[0])
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="gpu-small")
    p.add_argument("--model", help="a model dir (else --preset with random weights)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32], help="batch buckets, one graph each")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    if args.model:
        model = load_model(args.model)
    else:
        model = Transformer(ModelConfig.from_preset(args.preset, num_nextn_predict_layers=0))
    if model.config.model_type == "deepseek_v4":
        raise SystemExit("cuda_graphs: V4's decode step updates its cache in place; this benchmark runs V3/V3.2")
    model = model.to(device=args.device, dtype=getattr(torch, args.dtype)).eval()
    meta = {"preset": args.model or args.preset, "device": args.device, "dtype": args.dtype, "torch": torch.__version__}
    meta["gpu"] = torch.cuda.get_device_name() if args.device == "cuda" else None
    meta["cpu"] = cpu_name()
    for b in args.batch:
        row = measure(model, b, args.prompt_len, args.new_tokens, args.reps)
        print(json.dumps({**row, **meta, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens}), flush=True)


if __name__ == "__main__":
    main()
