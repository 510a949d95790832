"""Serving: `nanoseek serve` vs `transformers serve` (transformers 5.x) on the same checkpoint, same prompts, same
lengths, streaming clients over HTTP on 127.0.0.1.

    python -m benchmarks.serve                       # a cpu-small model with random weights and the built-in tokenizer
    python -m benchmarks.serve --model runs/speedrun/grpo --clients 1 8 32

Both servers run side by side for the whole benchmark, each loaded and warmed once; for every client count the
two are measured alternately (--rounds times), so each ratio is a same-moment comparison on a VM whose speed
drifts. Each client sends --requests streaming chat requests one after another; every request asks for
--max-tokens tokens with `ignore_eos` (transformers ignores the field: its lengths are whatever the model
stops at, counted from the stream). Reported per server and client count: requests/s, output tokens/s, time to
first token p50/p99 and inter-token latency p50/p99 (gaps between streamed chunks). One JSON line per client count
and a summary line with the ratios.

    python -m benchmarks.serve --model DIR --llama-server ~/.cache/nanoseek/llama.cpp-0.3.36/bin --skip-transformers

`--llama-server PATH` adds llama.cpp's own `llama-server` (built by `bash benchmarks/build_llama_cpp.sh` from the
sources llama-cpp-python 0.3.36 vendors; PATH is its bin dir or the binary) on the same weights: the model exported
by nanoseek's GGUF writer (f32, or `--gguf FILE`), `--parallel` 32 slots of the model's context each, continuous
batching (`-cb`), its own chat template and prompt cache, `-t --threads` (default: every core). `nanoseek serve`
keeps its own default (all cores but one for decoding; pass `--nanoseek-args "--threads N"` to change it): each
server gets the same cores and spends them its own way. Same prompts, same `max_tokens` with `ignore_eos` (both honour it), measured alternately
with the others; each line adds `over_llama_server`: nanoseek / llama.cpp per round (median) of output tokens/s
(above 1: nanoseek faster) and of TTFT p50 (below 1: nanoseek answers sooner).

    python -m benchmarks.serve --prefix                # prefix caching: TTFT with a 1,000-token shared system prompt

`--prefix` instead runs two `nanoseek serve` processes side by side, prefix cache on (the default) and off
(`--prefix-cache-tokens 0`), and sends each, alternately and one at a time, chat requests that share a
1,000-token system prompt and differ in the question: time to first token on vs off, whether the greedy answers
are identical, and the server's prefix-cache hit counters.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from benchmarks.machine import cpu_name

REPO = Path(__file__).resolve().parents[1]


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def make_model(out: Path, preset: str = "cpu-small", **overrides) -> Path:
    """A `preset` model (cpu-small: what the speedrun trains) with random weights and the built-in-corpus tokenizer."""
    from nanoseek import ModelConfig, Transformer, save_model
    from nanoseek.tasks.problems import builtin_corpus
    from nanoseek.tokenizer import train_tokenizer

    tok = train_tokenizer(builtin_corpus(2000, seed=0), vocab_size=512)
    torch.manual_seed(0)
    c = ModelConfig.from_preset(
        preset, vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, **overrides
    )
    save_model(Transformer(c), out, tokenizer=tok)
    return out


class Server:
    def __init__(
        self, name: str, cmd: list[str], port: int, log: Path, health: str = "/health", env: dict | None = None
    ) -> None:
        self.name, self.url = name, f"http://127.0.0.1:{port}"
        env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env or {})}
        self._log = open(log, "w")
        self.log = log
        self.proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT)
        self.health = health

    def wait(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + self.health, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{self.name} not ready after {timeout} s")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()


async def one_request(
    client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int, extra: dict
) -> dict:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        **extra,
    }
    t0 = time.perf_counter()
    first, stamps, chunks, usage, text = None, [], 0, None, ""
    async with _stream(client, url + "/v1/chat/completions", body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices") or []:
                d = choice.get("delta") or {}
                text += (d.get("reasoning_content") or "") + (d.get("content") or "")
                if d.get("content") or d.get("reasoning_content") or d.get("reasoning"):
                    now = time.perf_counter()
                    first = first or now
                    stamps.append(now)
                    chunks += 1
    end = time.perf_counter()
    tokens = usage["completion_tokens"] if usage else chunks
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return {
        "ttft": (first or end) - t0,
        "gaps": gaps,
        "tokens": tokens,
        "latency": end - t0,
        "text": text,
        "usage": usage,
    }


@contextlib.asynccontextmanager
async def _stream(client: httpx.AsyncClient, url: str, body: dict):
    """POST a streaming request; once more if the connection failed before any answer (seen with 8-32 streaming
    clients, a kept-alive connection closed under the request; said on stderr, naming the server)."""
    request = client.build_request("POST", url, json=body)
    try:
        r = await client.send(request, stream=True)
    except (httpx.RemoteProtocolError, httpx.ReadError) as e:
        print(f"{url}: {type(e).__name__} before any answer; sending the request once more", file=sys.stderr)
        r = await client.send(request, stream=True)
    try:
        yield r
    finally:
        await r.aclose()


async def load(
    url: str, model: str, clients: int, requests: int, prompts: list[str], max_tokens: int, extra: dict
) -> dict:
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(900.0), limits=limits) as client:

        async def worker(i: int) -> list[dict]:
            return [
                await one_request(client, url, model, prompts[(i * requests + j) % len(prompts)], max_tokens, extra)
                for j in range(requests)
            ]

        t0 = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(worker(i) for i in range(clients))) for r in rs]
        wall = time.perf_counter() - t0
    ttft = [r["ttft"] for r in results]
    gaps = [g for r in results for g in r["gaps"]]
    tokens = sum(r["tokens"] for r in results)
    return {
        "requests_per_s": round(len(results) / wall, 3),
        "output_tokens_per_s": round(tokens / wall, 1),
        "ttft_p50_ms": round(1e3 * percentile(ttft, 50), 1),
        "ttft_p99_ms": round(1e3 * percentile(ttft, 99), 1),
        "itl_p50_ms": round(1e3 * percentile(gaps, 50), 2),
        "itl_p99_ms": round(1e3 * percentile(gaps, 99), 2),
        "output_tokens": tokens,
        "wall_s": round(wall, 2),
    }


def metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return float("nan")


def prefix_bench(work: Path, model: Path | None, requests: int, max_tokens: int) -> None:
    """Time to first token with a 1,000-token shared system prompt, prefix cache on vs off (see the docstring)."""
    from nanoseek.tasks.problems import builtin_corpus
    from nanoseek.tokenizer import Tokenizer

    model = model or make_model(work / "cpu-small-2k", max_position_embeddings=2048)
    tok = Tokenizer.from_pretrained(model)
    corpus = tok.encode(" ".join(line.split("<think>")[0] for line in builtin_corpus(400, seed=2)))
    system = tok.decode(corpus[:1000])
    questions = [line.split("<think>")[0].strip()[:80] for line in builtin_corpus(requests + 1, seed=3)][: requests + 1]
    servers = {
        mode: Server(
            mode,
            [sys.executable, "-m", "nanoseek", "serve", "--model", str(model), "--port", str(port),
             "--served-model-name", "m", *([] if mode == "on" else ["--prefix-cache-tokens", "0"])],
            port,
            work / f"prefix-{mode}.log",
        )
        for mode, port in (("on", 8813), ("off", 8814))
    }  # fmt: skip

    async def ask(url: str, messages: list[dict]) -> dict:
        async with httpx.AsyncClient(timeout=900) as client:
            return await one_request(client, url, "m", "", max_tokens, {"messages": messages, "ignore_eos": True})

    try:
        for s in servers.values():
            s.wait()
        results: dict[str, list[dict]] = {mode: [] for mode in servers}
        for i, question in enumerate(questions):  # the first request of each server primes its cache (not timed)
            for mode, s in servers.items():
                messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
                r = asyncio.run(ask(s.url, messages))
                if i:
                    results[mode].append(r)
        on, off = results["on"], results["off"]
        line = {
            "bench": "serve-prefix-cache",
            "prompt_tokens": on[0]["usage"]["prompt_tokens"],
            "requests": len(on),
            "max_tokens": max_tokens,
            "ttft_p50_ms_on": round(1e3 * percentile([r["ttft"] for r in on], 50), 1),
            "ttft_p50_ms_off": round(1e3 * percentile([r["ttft"] for r in off], 50), 1),
            "identical_output": [r["text"] for r in on] == [r["text"] for r in off],
            "prefix_cache_hits": metric(servers["on"].url, "vllm:prefix_cache_hits_total"),
            "prefix_cache_queries": metric(servers["on"].url, "vllm:prefix_cache_queries_total"),
            "machine": f"{cpu_name()}, torch {torch.__version__}",
        }
        line["ttft_speedup"] = round(line["ttft_p50_ms_off"] / max(1e-9, line["ttft_p50_ms_on"]), 2)
        print(json.dumps(line), flush=True)
    finally:
        for s in servers.values():
            s.close()


def llama_server_cmd(path: str, gguf: Path | None, model: Path, work: Path, parallel: int, threads: int) -> list[str]:
    """The `llama-server` command for `model`'s f32 GGUF (exported unless given): `parallel` slots with the model's
    whole context each, continuous batching, `threads` threads. Fails before any server starts."""
    from benchmarks.decode import llama_binaries
    from nanoseek.checkpoint.run import resolve_model_dir
    from nanoseek.config import ModelConfig
    from nanoseek.export.gguf import export_gguf

    exe = llama_binaries(path, ("llama-server",))["llama-server"]
    model = resolve_model_dir(model)
    if gguf is None:
        gguf = work / "model-f32.gguf"
        export_gguf(model, gguf, dtype="f32")
    ctx = ModelConfig.from_json(model).max_position_embeddings
    cmd = [str(exe), "-m", str(gguf), "--host", "127.0.0.1", "--port", "8815", "--parallel", str(parallel), "-cb"]
    return cmd + ["-c", str(parallel * ctx), "-t", str(threads), "-tb", str(threads), "--no-webui"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model dir (default: a random-weight cpu-small model)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests", type=int, default=2, help="requests per client, one after another")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=1, help="alternating rounds per client count")
    ap.add_argument("--nanoseek-args", default="", help="extra `nanoseek serve` flags, e.g. '--compile'")
    ap.add_argument(
        "--transformers-args",
        default="",
        help="extra `transformers serve` flags (its --continuous-batching fails on MLA in 5.24: index_copy_ shape error)",
    )
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--llama-server", metavar="PATH", help="also run llama.cpp's llama-server from PATH (see above)")
    ap.add_argument("--gguf", help="the f32 GGUF of --model for llama-server (default: exported into a temp dir)")
    ap.add_argument("--parallel", type=int, default=32, help="llama-server slots (nanoseek serve: --max-batch 32)")
    ap.add_argument(
        "--threads", type=int, default=torch.get_num_threads(), help="llama-server's threads (nanoseek: its default)"
    )
    ap.add_argument("--prefix", action="store_true", help="only the prefix-cache TTFT benchmark (see above)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    if args.prefix:
        prefix_bench(work, Path(args.model).resolve() if args.model else None, 2 * args.requests + 4, 8)
        return
    model = Path(args.model).resolve() if args.model else make_model(work / "cpu-small")
    from nanoseek.tasks.problems import builtin_corpus

    prompts = [line.split("<think>")[0].strip()[:120] for line in builtin_corpus(200, seed=1)]
    llama_cmd = None
    if args.llama_server:
        gguf = Path(args.gguf).resolve() if args.gguf else None
        llama_cmd = llama_server_cmd(args.llama_server, gguf, model, work, args.parallel, args.threads)
    servers = {
        "nanoseek": Server(
            "nanoseek",
            [sys.executable, "-m", "nanoseek", "serve", "--model", str(model), "--port", "8811",
             "--served-model-name", "m", *args.nanoseek_args.split()],
            8811,
            work / "nanoseek.log",
        ),
    }  # fmt: skip
    if llama_cmd is not None:
        servers["llama.cpp"] = Server("llama.cpp", llama_cmd, 8815, work / "llama-server.log")
    if not args.skip_transformers:
        exe = shutil.which("transformers") or "transformers"
        cmd = [exe, "serve", str(model), "--port", "8812", "--device", "cpu", *args.transformers_args.split()]
        servers["transformers"] = Server("transformers", cmd, 8812, work / "transformers.log")
    names = {"nanoseek": "m", "transformers": str(model), "llama.cpp": "m"}
    # transformers refuses unknown fields
    extra = {"nanoseek": {"ignore_eos": True}, "transformers": {}, "llama.cpp": {"ignore_eos": True}}
    try:
        for s in servers.values():
            s.wait()
        for s in servers.values():  # warm-up: first-call costs (and compiles) out of the measurement
            asyncio.run(load(s.url, names[s.name], 2, 1, prompts, 8, extra[s.name]))
        summary = {}
        for clients in args.clients:
            rows: dict[str, list[dict]] = {name: [] for name in servers}
            for _ in range(args.rounds):
                for name, s in servers.items():
                    rows[name].append(
                        asyncio.run(
                            load(s.url, names[name], clients, args.requests, prompts, args.max_tokens, extra[name])
                        )
                    )
            line = {
                "bench": "serve",
                "clients": clients,
                "requests_per_client": args.requests,
                "max_tokens": args.max_tokens,
            }
            for name, rs in rows.items():
                line[name] = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
            if "transformers" in rows:
                ratio = line["nanoseek"]["output_tokens_per_s"] / max(1e-9, line["transformers"]["output_tokens_per_s"])
                line["tokens_per_s_ratio"] = round(ratio, 2)
                summary.setdefault("nanoseek_over_transformers_tokens_per_s", {})[clients] = line["tokens_per_s_ratio"]
            if "llama.cpp" in rows:
                ours, theirs = rows["nanoseek"], rows["llama.cpp"]  # per-round ratios: same-moment comparisons
                line["over_llama_server"] = {
                    "output_tokens_per_s": round(
                        statistics.median(
                            a["output_tokens_per_s"] / max(1e-9, b["output_tokens_per_s"]) for a, b in zip(ours, theirs)
                        ),
                        2,
                    ),
                    "ttft_p50": round(
                        statistics.median(a["ttft_p50_ms"] / max(1e-9, b["ttft_p50_ms"]) for a, b in zip(ours, theirs)),
                        2,
                    ),
                }
                summary.setdefault("nanoseek_over_llama_server", {})[clients] = line["over_llama_server"]
            line["llama_server_threads"] = args.threads
            line["nanoseek_args"] = args.nanoseek_args
            line["loadavg_1m"] = round(os.getloadavg()[0], 2)
            line["machine"] = f"{cpu_name()}, torch {torch.__version__}"
            print(json.dumps(line), flush=True)
        print(json.dumps({"bench": "serve-summary", **summary}), flush=True)
    finally:
        for s in servers.values():
            s.close()


if __name__ == "__main__":
    main()
