"""Decoding speed: nanoseek's Engine vs transformers' `generate` on the same weights, one process.

    python -m benchmarks.decode --preset cpu-small                 # random weights
    python -m benchmarks.decode --model runs/x/checkpoints/step_N  # a trained model: adds MTP speculation
    python -m benchmarks.decode --model DIR --gguf FILE.gguf       # vs llama.cpp through llama-cpp-python's binding
    python -m benchmarks.decode --model DIR --llama-bench ~/.cache/nanoseek/llama.cpp-0.3.36/bin
                                                                   # vs llama.cpp's own llama-bench (see below)
    python -m benchmarks.decode --v3-vs-v4                         # DeepSeek-V3 vs V4 at equal parameters

Greedy, float32. Decode tokens/s excludes prefill (time(N new tokens) - time(1 new token)); EOS is ignored by
both so every sequence runs N tokens. Prefill tokens/s is one 256-token prompt. KV-cache bytes per token are read
off each cache after generation. With a trained model, MTP self-speculation at batch 1 on built-in arithmetic
prompts: acceptance, speedup, and its factors (tokens per step, step-cost ratio, the step's anatomy). After a warm-up (which compiles every shape with --compile), the two
sides are timed alternately, --reps rounds, and medians reported: this VM's speed drifts over minutes, and
alternating keeps each ratio a same-moment comparison. One JSON line.

`--gguf` drives llama.cpp token by token from Python (llama-cpp-python): what Python users of the binding see.
`--llama-bench PATH` measures llama.cpp on its own runtime instead: its `llama-bench` and `llama-batched-bench`
(built from the sources llama-cpp-python 0.3.36 vendors by `bash benchmarks/build_llama_cpp.sh`; PATH is that bin
dir or the llama-bench binary) against the default `Engine()` on the same f32 GGUF weights, exported by
`nanoseek export`'s writer, and the same thread counts: greedy decode tokens/s at batch 1 (1 thread), batch 16 and
32 (--threads, default 2) and a 256-token prefill (--threads), alternating the two sides --reps rounds.

`--v3-vs-v4` times nanoseek against itself: the default `Engine()` on cpu-small (V3: MLA latent cache) and on
cpu-small-v4 (V4: window + compressed entries, mHC, CSA indexer) resized to the same total parameters as
benchmarks/arch_race.py does, random weights, the same prompt: greedy decode tokens/s at batch 1 and 16 and a
256-token prefill, at --threads torch threads, alternating the two models --reps rounds. llama.cpp on a V4 model:
`--llama-bench` with `--model` a V4 dir that llama.cpp's `deepseek4` runs as we do (compression rates 4 and 128,
head sizes that are multiples of 64: `nanoseek export` refuses others, naming the field).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from nanoseek import ModelConfig, Transformer, load_model, save_model
from nanoseek.infer.engine import Engine, single_thread
from nanoseek.infer.fast_decode import FastDecoder
from nanoseek.infer.sampling import SamplingParams

FAST_STEPS = FastDecoder.steps


def alternate(fns: dict, rounds: int) -> dict[str, list[float]]:
    """Call each fn (which returns seconds) once per round, in turn; returns every fn's durations."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(fn())
    return times


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _timed(fn) -> float:
    _sync()
    t = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - t


def _ratio(times: dict[str, list[float]], slow: str, fast: str) -> float:
    """Median over rounds of time[slow] / time[fast]."""
    return round(statistics.median(a / b for a, b in zip(times[slow], times[fast])), 2)


def _request(engine: Engine, prompt: list[int], params: SamplingParams) -> tuple[float, float, int]:
    """One request through `engine.step()`: (admission seconds, decode seconds, decode steps)."""
    engine.add_request(prompt, params)
    t0 = time.perf_counter()
    engine.step()  # admission: prefill, first token (and, speculative, the MTP prefill + first draft)
    t1 = time.perf_counter()
    steps = 0
    while engine.has_work():
        engine.step()
        steps += 1
    return t1 - t0, time.perf_counter() - t1, steps


def routed_union(model: Transformer, seqs: list[list[int]]) -> float:
    """Mean number of distinct routed experts per MoE layer for two consecutive tokens (what a 2-token verify
    reads), over the main model's MoE layers; a single token reads num_experts_per_tok."""
    picks: list[torch.Tensor] = []
    layers = [layer.mlp for layer in model.layers if hasattr(layer.mlp, "gate")]
    hooks = [m.gate.register_forward_hook(lambda mod, inp, out: picks.append(out[1])) for m in layers]
    counts = []
    with torch.inference_mode():
        for ids in seqs:
            picks.clear()
            model(torch.tensor([ids], device=next(model.parameters()).device))
            for idx in picks:  # [T, K] per layer
                pairs = torch.cat((idx[:-1], idx[1:]), dim=1).sort(dim=1).values
                counts.append(1 + (pairs.diff(dim=1) != 0).sum(dim=1).float())
    for h in hooks:
        h.remove()
    return round(torch.cat(counts).mean().item(), 2)


def speculation(ours: Transformer, args) -> dict:
    """MTP self-speculation vs plain decoding at batch 1 on built-in arithmetic prompts (a trained model).

    decode_speedup = tokens_per_step / step_cost_ratio exactly: with greedy output identical, plain decoding
    takes one step per token and speculation one step per 1 + (accepted drafts) tokens, each step costing
    step_cost_ratio plain steps. step_anatomy_us says where a speculative step's cost comes from."""
    from nanoseek.tasks.problems import generate as make_problems
    from nanoseek.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(args.model)
    problems = make_problems("arithmetic", 16, seed=1, split="test", level="3x12")
    prompts = [tok.encode(pr.pretrain_text().split("<think>")[0] + "<think>", bos=True) for pr in problems]
    params = SamplingParams(max_tokens=48, temperature=0)
    plain = Engine(ours, tok, max_batch_size=1, compile=args.compile)
    spec = Engine(ours, tok, max_batch_size=1, speculative=True, compile=args.compile)
    engines = {"plain": plain, "spec": spec}
    for p in prompts:  # warm-up: compiles every shape either engine meets
        plain.generate([p], params), spec.generate([p], params)
    spec.stats = dict.fromkeys(spec.stats, 0)
    runs: dict[str, list[tuple[float, float, int]]] = {"plain": [], "spec": []}
    for _ in range(args.reps):
        for p in prompts:
            for name, engine in engines.items():
                runs[name].append(_request(engine, p, params))
    total = {name: [a + d for a, d, _ in r] for name, r in runs.items()}
    decode = {name: sum(d for _, d, _ in r) for name, r in runs.items()}
    steps = {name: sum(n for _, _, n in r) for name, r in runs.items()}
    rounds = len(prompts)  # per-round ratios of decode time per step: same-moment comparisons
    per_step = {
        name: [
            sum(d for _, d, _ in r[i : i + rounds]) / max(1, sum(n for _, _, n in r[i : i + rounds]))
            for i in range(0, len(r), rounds)
        ]
        for name, r in runs.items()
    }
    outputs = {name: [e.generate([p], params)[0].token_ids for p in prompts] for name, e in engines.items()}
    return {
        "acceptance_rate": round(spec.acceptance_rate or 0.0, 3),
        "tokens_per_step": round(steps["plain"] / steps["spec"], 2),
        "step_cost_ratio": round(statistics.median(s / p for s, p in zip(per_step["spec"], per_step["plain"])), 2),
        "decode_speedup": round(decode["plain"] / decode["spec"], 2),
        "speedup": round(sum(total["plain"]) / sum(total["spec"]), 2),
        "admission_ms": {name: round(1e3 * statistics.median(a for a, _, _ in r), 2) for name, r in runs.items()},
        "step_anatomy_us": step_anatomy(spec, args.reps),
        "routed_experts_per_layer": {
            "one_token": ours.config.num_experts_per_tok,
            "two_consecutive_tokens": routed_union(ours, [p + o for p, o in zip(prompts, outputs["plain"])]),
        },
        "greedy_output_identical": outputs["plain"] == outputs["spec"],
    }


def step_anatomy(spec: Engine, reps: int) -> dict[str, float]:
    """Median microseconds per call of the pure step functions behind one decode step at batch 1 (compiled when
    the engine is), at position 20 reading 32 cached positions: a plain step (1 token), the main model verifying
    2 tokens, the MTP block on 2 positions (their cache entries, then attention, MoE and head for the last, as
    a redraft after an accepted draft), and the fused speculative step (verify + MTP redraft)."""
    model, kv, mtp_kv = spec.model, spec.cache.kv, spec.mtp_cache.kv[0]
    mtp, runner = spec.speculator.mtp_fn, spec.runner

    def timed(fn, *args) -> float:
        _sync()
        t = time.perf_counter()
        for _ in range(50):
            runner.call(fn, *args)
        _sync()
        return (time.perf_counter() - t) / 50

    # tensors made under inference_mode, like the engine's (a compiled graph's guards tell the two kinds apart)
    with torch.inference_mode(), single_thread():
        start, slots, one, two, last = (torch.tensor(x, device=spec.device) for x in ([20], [0], [[5]], [[5, 6]], [1]))
        calls = {
            "step_1_token": (runner.step_fn, one, kv, None, start, 32),
            "verify_2_tokens": (runner.step_fn, two, kv, None, start, 32),
            "mtp_2_positions": (mtp, kv.new_zeros(1, 2, model.config.hidden_size), two, mtp_kv, slots, start, 32, last),
        }
        if spec.speculator.greedy_fn is not None:
            calls["speculative_step"] = (spec.speculator.greedy_fn, two, kv, mtp_kv, None, start, 32)
        for call in calls.values():  # compiles what generation did not
            runner.call(*call), runner.call(*call)
        times = alternate({name: (lambda c=call: timed(*c)) for name, call in calls.items()}, 4 * reps)
    return {name: round(1e6 * statistics.median(t), 1) for name, t in times.items()}


def gguf_bench(args) -> dict:
    """What Python users of llama-cpp-python see: the same greedy workload through llama.cpp's binding and our engine, eager and compiled: batch-1
    decode (EOS ignored, tokens/s excluding prefill) and one 256-token prefill (+ its first token), alternately
    timed. Threads as ours: our engine decodes batch 1 on one thread and prefills on all torch threads, so llama.cpp
    gets n_threads=1 (generation) and n_threads_batch=torch threads (prompt processing)."""
    import llama_cpp
    import numpy as np

    from benchmarks.gguf_eval import last_logits
    from nanoseek.export.gguf import export_gguf

    if not args.model:
        raise SystemExit("--gguf needs --model DIR: the model the GGUF file was (or will be) exported from")
    if not Path(args.gguf).exists():
        export_gguf(args.model, args.gguf, dtype="f32")
    ours = load_model(args.model, dtype=torch.float32)
    threads = torch.get_num_threads()
    llm = llama_cpp.Llama(args.gguf, n_ctx=512, n_batch=512, n_threads=threads, n_threads_batch=threads, verbose=False)
    N, V = args.new_tokens, ours.config.vocab_size
    prompt = torch.randint(3, V, (args.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    long_prompt = torch.randint(3, V, (256,), generator=torch.Generator().manual_seed(1)).tolist()
    engines = {
        "nanoseek_eager": Engine(ours, max_batch_size=1),
        "nanoseek_compiled": Engine(ours, max_batch_size=1, compile=True),
    }
    for e in engines.values():
        e.eos_ids = set()

    def llama_greedy(ids: list[int], n: int) -> list[int]:
        llm.reset()
        llm.eval(ids)
        out = []
        for _ in range(n):
            out.append(int(np.argmax(last_logits(llm))))
            if len(out) < n:
                llm.eval([out[-1]])
        return out

    def ours_greedy(engine: Engine, ids: list[int], n: int) -> list[int]:
        return engine.generate([ids], SamplingParams(max_tokens=n, temperature=0))[0].token_ids

    gens = {"llama.cpp": lambda ids, n: llama_greedy(ids, n)}
    gens.update({name: (lambda ids, n, e=e: ours_greedy(e, ids, n)) for name, e in engines.items()})
    outputs = {name: g(prompt, N) for name, g in gens.items()}  # warm-up: compiles every decode shape
    for g in gens.values():
        g(long_prompt, 1)
    # both timings of a round are kept: decode = time(N) - time(1) excludes prefill but breaks down when a stall
    # lands in either run on a busy machine; whole requests (N new tokens / time(N)) do not subtract
    runs = {
        name: (lambda g=g: (_timed(lambda: g(prompt, N)), _timed(lambda: g(prompt, 1)))) for name, g in gens.items()
    }
    times = alternate(runs, args.reps)
    dec = {name: round((N - 1) / statistics.median(a - b for a, b in t), 1) for name, t in times.items()}
    whole = {name: round(N / statistics.median(a for a, _ in t), 1) for name, t in times.items()}
    prefill = {name: (lambda g=g: _timed(lambda: g(long_prompt, 1))) for name, g in gens.items()}
    times = alternate(prefill, 3 * args.reps)
    pre = {name: round(256 / statistics.median(t)) for name, t in times.items()}
    # what bounds llama.cpp here: its own C-side time per decoded token (llama_decode, from its perf counters)
    # against the wall time per token through the Python binding
    llama_cpp.llama_perf_context_reset(llm.ctx)
    wall = _timed(lambda: llama_greedy(prompt, N))
    perf = llama_cpp.llama_perf_context(llm.ctx)
    llama_ms = {
        "decode_c_side_ms_per_token": round(perf.t_eval_ms / max(1, perf.n_eval), 3),
        "decode_wall_ms_per_token": round(1e3 * wall / N, 3),
    }
    return {
        "bench": "decode_gguf",
        "model": args.model,
        "gguf": args.gguf,
        "params": ours.num_parameters(),
        "decode_tokens_per_s_batch1": dec,
        "request_tokens_per_s_batch1": whole,
        "prefill_tokens_per_s_256": pre,
        "greedy_identical": len({tuple(o) for o in outputs.values()}) == 1,
        "llama.cpp_time": llama_ms,
        "threads": {"decode": 1, "prefill": threads},
        "llama_cpp_python": llama_cpp.__version__,
        "torch": torch.__version__,
        "machine": f"{platform.machine()} {threads} threads",
        "date": time.strftime("%Y-%m-%d"),
    }


LLAMA_BUILD = "bash benchmarks/build_llama_cpp.sh"


def llama_binaries(path: str, names: tuple[str, ...]) -> dict[str, Path]:
    """llama.cpp binaries in PATH (their bin dir, or one binary in it); missing ones say how to build them."""
    p = Path(path).expanduser()
    bin_dir = p.parent if p.name.startswith("llama-") and not p.is_dir() else p
    found = {name: bin_dir / name for name in names}
    missing = [str(f) for f in found.values() if not (f.is_file() and os.access(f, os.X_OK))]
    if missing:
        raise SystemExit(
            f"no llama.cpp binary at {', '.join(missing)}: build llama-bench, llama-batched-bench and llama-server "
            f"from llama-cpp-python 0.3.36's vendored sources with `{LLAMA_BUILD}` (it prints their bin dir, "
            "~/.cache/nanoseek/llama.cpp-0.3.36/bin by default) and pass that dir"
        )
    return found


def run_json(cmd: list[str]) -> list[dict]:
    """Run a llama.cpp tool and parse its JSON output (llama-bench: one array; llama-batched-bench: JSON lines)."""
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed with exit code {r.returncode}:\n{r.stderr[-3000:]}")
    out = r.stdout.strip()
    if out.startswith("["):
        return json.loads(out)
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    if not rows:
        raise RuntimeError(f"{' '.join(cmd)} printed no JSON:\n{out[-2000:]}\n{r.stderr[-2000:]}")
    return rows


def model_and_gguf(args, work: Path) -> tuple[Path, Path]:
    """(model dir, its f32 GGUF): --model (or a random-weight --preset model with the built-in tokenizer), exported
    by nanoseek's GGUF writer unless --gguf names an existing file."""
    from benchmarks.serve import make_model
    from nanoseek.checkpoint.run import resolve_model_dir
    from nanoseek.export.gguf import export_gguf

    model = resolve_model_dir(args.model) if args.model else make_model(work / args.preset, preset=args.preset)
    gguf = Path(args.gguf) if args.gguf else work / "model-f32.gguf"
    if not gguf.exists():
        export_gguf(model, gguf, dtype="f32")
    return model, gguf


def llama_bench(args) -> dict:
    """llama.cpp's own runtime vs the default `Engine()` on the same GGUF weights and threads (see the docstring).

    Both sides decode N tokens after a P-token prompt (llama-bench: `-d P -n N`; llama-batched-bench: `-npp P
    -ntg N`, one prompt per sequence); llama.cpp decodes random tokens with no sampling, we decode greedily, EOS
    ignored, tokens/s over the decode steps after the prefill. Each round runs every llama.cpp measurement once
    (`-r 1`, after its own warm-up) alternately with ours; medians over rounds, ratio = nanoseek / llama.cpp per
    round, then the median."""
    tools = llama_binaries(args.llama_bench, ("llama-bench", "llama-batched-bench"))
    work = Path(tempfile.mkdtemp(prefix="decode-llama-"))
    model_dir, gguf = model_and_gguf(args, work)
    ours = load_model(model_dir, dtype=torch.float32)
    P, N, T, batches = args.prompt_len, args.new_tokens, args.threads, (16, 32)
    V = ours.config.vocab_size
    t0 = time.perf_counter()
    engine = Engine(ours, max_batch_size=max(batches), compile=args.compile)
    fast = engine.fast  # the default path: AOT-compiled greedy steps, built once per config and cached
    fast_ready = fast.wait() if fast is not None else False
    fast_wait_s = time.perf_counter() - t0
    engine.eos_ids = set()  # every sequence runs N tokens, as llama.cpp's do
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, V, (P,), generator=g).tolist() for _ in range(max(batches))]
    long_prompt = torch.randint(3, V, (256,), generator=g).tolist()
    name = "nanoseek_compiled" if args.compile else "nanoseek"

    def ours_decode(bs: int, threads: int, n: int = N) -> float:
        """Seconds for the n - 1 decode steps of `bs` sequences after their admission step (prefill, first token).
        Each measured run follows a short one of the same shape, untimed, as llama.cpp's tools warm up before
        each of theirs: the other side's process ran in between, and a 64-token run is only 8 fast-path calls."""
        torch.set_num_threads(threads)
        if n == N:
            ours_decode(bs, threads, 2 + FAST_STEPS)
        for p in prompts[:bs]:
            engine.add_request(p, SamplingParams(max_tokens=n, temperature=0))
        engine.step()  # admits all of them: the engine has a slot for each
        _sync()
        t = time.perf_counter()
        while engine.has_work():
            engine.step()
        _sync()
        return time.perf_counter() - t

    @torch.inference_mode()
    def ours_prefill() -> float:
        torch.set_num_threads(T)
        slot = engine.cache.allocate()
        try:
            return _timed(lambda: engine.runner.prefill(long_prompt, torch.tensor([slot]), 0))
        finally:
            engine.cache.release(slot)

    base = [str(tools["llama-bench"]), "-m", str(gguf), "-r", "1", "-o", "json"]
    batched = [str(tools["llama-batched-bench"]), "-m", str(gguf), "-c", str(max(batches) * (P + N)), "-b", "2048"]
    batched += ["-ub", "512", "-npp", str(P), "-ntg", str(N), "-npl", ",".join(map(str, batches))]
    batched += ["-t", str(T), "-tb", str(T), "--output-format", "jsonl"]
    llama: dict[str, list] = {"batch1": [], "prefill": [], **{f"batch{b}": [] for b in batches}}
    mine: dict[str, list] = {k: [] for k in llama}
    info: dict = {}

    ours_decode(1, 1), [ours_decode(b, T) for b in batches], ours_prefill()  # warm-up (compiles every shape)
    load_before = os.getloadavg()
    for _ in range(args.reps):
        (row,) = run_json([*base, "-p", "0", "-n", str(N), "-d", str(P), "-t", "1"])
        info = {k: row.get(k) for k in ("build_commit", "build_number", "cpu_info", "model_type")}
        llama["batch1"].append(row["avg_ts"])
        mine["batch1"].append((N - 1) / ours_decode(1, 1))
        for _ in range(8):  # it sometimes prints no row for the last batch size (exit code 0): run it again
            rows = {r["pl"]: r for r in run_json(batched)}
            if all(b in rows for b in batches):
                break
        else:
            raise RuntimeError(f"llama-batched-bench printed no row for some of {batches}: {sorted(rows)}")
        for b in batches:
            llama[f"batch{b}"].append(rows[b]["speed_tg"])
            mine[f"batch{b}"].append(b * (N - 1) / ours_decode(b, T))
        (row,) = run_json([*base, "-p", "256", "-n", "0", "-t", str(T)])
        llama["prefill"].append(row["avg_ts"])
        mine["prefill"].append(256 / ours_prefill())

    def side_by_side(key: str, threads: int) -> dict:
        return {
            "llama.cpp": round(statistics.median(llama[key]), 1),
            name: round(statistics.median(mine[key]), 1),
            "ratio": round(statistics.median(o / t for o, t in zip(mine[key], llama[key])), 2),
            "threads": threads,
        }

    return {
        "bench": "decode_llama_cpp",
        "model": str(model_dir),
        "gguf": str(gguf),
        "params": ours.num_parameters(),
        "prompt_len": P,
        "new_tokens": N,
        "rounds": args.reps,
        "decode_tokens_per_s": {
            "batch1": side_by_side("batch1", 1),
            **{f"batch{b}": side_by_side(f"batch{b}", T) for b in batches},
        },
        "prefill_tokens_per_s_256": side_by_side("prefill", T),
        "nanoseek_engine": {
            "compiled": engine.compiled,
            "fast_path": sorted(fast.runners) if fast_ready else None,
            "fast_steps_per_call": fast.steps if fast is not None else None,
            "fast_build_s": {k: round(v, 1) for k, v in fast.build_s.items()} if fast is not None else None,
            "fast_load_s": {k: round(v, 2) for k, v in fast.load_s.items()} if fast is not None else None,
            "engine_ready_s": round(fast_wait_s, 1),
        },
        "llama.cpp": {"tools": "llama-bench, llama-batched-bench", "bin": str(tools["llama-bench"].parent), **info},
        "loadavg_1m": {"before": round(load_before[0], 2), "after": round(os.getloadavg()[0], 2)},
        "torch": torch.__version__,
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d"),
    }


def v3_vs_v4(args) -> dict:
    """Decode tokens/s at batch 1 and 16 and prefill tokens/s of V3 (cpu-small) and V4 (cpu-small-v4 at the same
    total parameters), each through its own default Engine, timed alternately, at --threads torch threads (the
    Engine decodes batches under 8 rows single-threaded whatever the setting)."""
    torch.set_num_threads(args.threads)
    from benchmarks.arch_race import count_params, match_v4
    from benchmarks.machine import cpu_name
    from nanoseek.infer.cache import kv_bytes_per_token

    v3_config = ModelConfig.from_preset("cpu-small")
    manifest = {"vocab_size": v3_config.vocab_size, "bos_id": v3_config.bos_token_id, "eos_id": v3_config.eos_token_id}
    v3_total = count_params(v3_config.replace(num_nextn_predict_layers=0))[0]
    resized = match_v4(v3_total, "cpu-small-v4", manifest)
    configs = {
        "v3": v3_config,
        "v4": ModelConfig.from_preset("cpu-small-v4", vocab_size=v3_config.vocab_size, **resized),
    }
    engines = {}
    for name, config in configs.items():
        torch.manual_seed(0)
        model = Transformer(config).to(args.device).eval()
        engines[name] = Engine(model, max_batch_size=16, max_len=512)
        engines[name].eos_ids = set()  # every sequence runs the whole N tokens
    prompt = torch.randint(3, v3_config.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(0))
    long_prompt = torch.randint(3, v3_config.vocab_size, (256,), generator=torch.Generator().manual_seed(1)).tolist()
    N = args.new_tokens
    result: dict = {
        "bench": "decode_v3_vs_v4",
        "params": {
            n: dict(zip(("total", "activated"), count_params(c.replace(num_nextn_predict_layers=0))))
            for n, c in configs.items()
        },
        "v4_resized": resized,
        "new_tokens": N,
        "prompt_len": args.prompt_len,
    }

    def gen(engine: Engine, bs: int, n: int) -> None:
        engine.generate([prompt.tolist()] * bs, SamplingParams(max_tokens=n, temperature=0))

    for bs in (1, 16):
        for e in engines.values():  # warm-up
            gen(e, bs, N)
        decode = {
            name: (lambda e=e, bs=bs: _timed(lambda: gen(e, bs, N)) - _timed(lambda: gen(e, bs, 1)))
            for name, e in engines.items()
        }
        times = alternate(decode, args.reps)
        row = {name: round(bs * (N - 1) / statistics.median(t), 1) for name, t in times.items()}
        row["v4_over_v3_time"] = _ratio(times, "v4", "v3")
        result[f"decode_tokens_per_s_batch{bs}"] = row

    def prefill(engine: Engine) -> float:
        slot = engine.cache.allocate()
        try:
            with torch.inference_mode():
                return _timed(lambda: engine.runner.prefill(long_prompt, torch.tensor([slot], device=args.device)))
        finally:
            engine.cache.release(slot)

    fns = {name: (lambda e=e: prefill(e)) for name, e in engines.items()}
    alternate(fns, 3)  # warm-up
    times = alternate(fns, 5 * args.reps)
    result["prefill_tokens_per_s"] = {name: round(256 / statistics.median(t)) for name, t in times.items()}
    result["prefill_tokens_per_s"]["v4_over_v3_time"] = _ratio(times, "v4", "v3")
    result["kv_bytes_per_token_at_512"] = {n: round(kv_bytes_per_token(c, 512, 4)) for n, c in configs.items()}
    result.update(
        torch=torch.__version__,
        machine=cpu_name() if args.device == "cpu" else torch.cuda.get_device_name(),
        threads=torch.get_num_threads(),
        load_avg_1min=round(os.getloadavg()[0], 2),
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    )
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu-small")
    p.add_argument("--model", default=None, help="a trained model dir (enables the MTP speculation figures)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--reps", type=int, default=5, help="alternating timing rounds")
    p.add_argument("--compile", action="store_true", help="decode with the torch.compile'd step (Engine(compile=True))")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--gguf", default=None, help="compare with llama.cpp on this GGUF file (exported from --model)")
    p.add_argument(
        "--llama-bench",
        default=None,
        metavar="PATH",
        help=f"compare with llama.cpp's own llama-bench / llama-batched-bench in PATH (built by `{LLAMA_BUILD}`)",
    )
    p.add_argument("--threads", type=int, default=2, help="threads for batch 16/32 and prefill (--llama-bench)")
    p.add_argument("--v3-vs-v4", action="store_true", help="cpu-small vs cpu-small-v4 at equal parameters")
    args = p.parse_args()
    if args.llama_bench:
        print(json.dumps(llama_bench(args)))
        return
    if args.gguf:
        print(json.dumps(gguf_bench(args)))
        return
    if args.v3_vs_v4:
        print(json.dumps(v3_vs_v4(args)))
        return
    import transformers

    torch.manual_seed(0)
    if args.model:
        ours = load_model(args.model, dtype=torch.float32, device=args.device)
    else:
        ours = Transformer(ModelConfig.from_preset(args.preset)).to(args.device).eval()
    config = ours.config
    with tempfile.TemporaryDirectory() as d:
        save_model(ours, d)
        hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).to(args.device).eval()
    prompt = torch.randint(3, config.vocab_size, (1, args.prompt_len), device=args.device)
    N = args.new_tokens
    result: dict = {"bench": "decode", "preset": args.model or args.preset, "new_tokens": N, "compile": args.compile}

    engine = Engine(ours, max_batch_size=16, compile=args.compile)
    engine.eos_ids = set()  # run every sequence to N tokens, like min_new_tokens for transformers

    def ours_gen(bs: int, n: int):
        engine.generate([prompt[0].tolist()] * bs, SamplingParams(max_tokens=n, temperature=0))

    @torch.inference_mode()
    def hf_gen(bs: int, n: int):
        ids = prompt.repeat(bs, 1)
        hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False)

    for bs in (1, 16):
        gens = {"nanoseek": ours_gen, "transformers": hf_gen}
        for gen in gens.values():  # warm-up: every decode shape compiles here
            gen(bs, N)
        decode = {
            name: (lambda g=g, bs=bs: _timed(lambda: g(bs, N)) - _timed(lambda: g(bs, 1))) for name, g in gens.items()
        }
        times = alternate(decode, args.reps)
        row = {name: round(bs * (N - 1) / statistics.median(t), 1) for name, t in times.items()}
        row["ratio"] = _ratio(times, "transformers", "nanoseek")
        result[f"decode_tokens_per_s_batch{bs}"] = row

    long_prompt = torch.randint(3, config.vocab_size, (1, 256), device=args.device)
    slot, zero = torch.tensor([0], device=args.device), torch.tensor([0], device=args.device)
    with torch.inference_mode():
        prefill = {
            "nanoseek": lambda: _timed(
                lambda: ours.forward_cached(long_prompt, engine.cache.kv, slot, zero, last_only=True)
            ),
            "transformers": lambda: _timed(lambda: hf(long_prompt, use_cache=True, logits_to_keep=1)),
        }
        times = alternate(prefill, 3)  # warm-up
        times = alternate(prefill, 5 * args.reps)
    result["prefill_tokens_per_s"] = {name: round(256 / statistics.median(t)) for name, t in times.items()}
    result["prefill_tokens_per_s"]["ratio"] = _ratio(times, "transformers", "nanoseek")

    with torch.inference_mode():
        out = hf(prompt, use_cache=True)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    hf_bytes = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    result["kv_bytes_per_token"] = {
        "nanoseek": engine.cache.bytes_per_token(),
        "formula": (config.kv_lora_rank + config.qk_rope_head_dim) * config.num_hidden_layers * 4,
        "transformers": hf_bytes // args.prompt_len,
    }

    if args.model and ours.mtp:
        result["mtp_speculation_batch1"] = speculation(ours, args)
    result.update(
        torch=torch.__version__,
        transformers=transformers.__version__,
        machine=torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else f"{platform.machine()} {torch.get_num_threads()} threads",
        date=time.strftime("%Y-%m-%d"),
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
