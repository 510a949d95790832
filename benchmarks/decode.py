"""Decoding speed: nanoseek's Engine vs transformers' `generate` on the same weights, one process.

    python -m benchmarks.decode --preset cpu-small                 # random weights
    python -m benchmarks.decode --model runs/x/checkpoints/step_N  # a trained model: adds MTP speculation

Greedy, float32. Decode tokens/s excludes prefill (time(N new tokens) - time(1 new token)); EOS is ignored by
both so every sequence runs N tokens. Prefill tokens/s is one 256-token prompt. KV-cache bytes per token are read
off each cache after generation. With a trained model, MTP self-speculation's acceptance rate and speedup at
batch 1 on built-in arithmetic prompts. After a warm-up (which compiles every shape with --compile), the two
sides are timed alternately, --reps rounds, and medians reported: this VM's speed drifts over minutes, and
alternating keeps each ratio a same-moment comparison. One JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time

import torch

from nanoseek import ModelConfig, Transformer, load_model, save_model
from nanoseek.infer.engine import Engine
from nanoseek.infer.sampling import SamplingParams


def alternate(fns: dict, rounds: int) -> dict[str, list[float]]:
    """Call each fn (which returns seconds) once per round, in turn; returns every fn's durations."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(fn())
    return times


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _ratio(times: dict[str, list[float]], slow: str, fast: str) -> float:
    """Median over rounds of time[slow] / time[fast]."""
    return round(statistics.median(a / b for a, b in zip(times[slow], times[fast])), 2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu-small")
    p.add_argument("--model", default=None, help="a trained model dir (enables the MTP speculation figures)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--reps", type=int, default=5, help="alternating timing rounds")
    p.add_argument("--compile", action="store_true", help="decode with the torch.compile'd step (Engine(compile=True))")
    args = p.parse_args()
    import transformers

    torch.manual_seed(0)
    if args.model:
        ours = load_model(args.model, dtype=torch.float32)
    else:
        ours = Transformer(ModelConfig.from_preset(args.preset)).eval()
    config = ours.config
    with tempfile.TemporaryDirectory() as d:
        save_model(ours, d)
        hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    prompt = torch.randint(3, config.vocab_size, (1, args.prompt_len))
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

    long_prompt = torch.randint(3, config.vocab_size, (1, 256))
    slot, zero = torch.tensor([0]), torch.tensor([0])
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
        from nanoseek.data.tasks import generate as make_problems
        from nanoseek.tokenizer import Tokenizer

        tok = Tokenizer.from_pretrained(args.model)
        problems = make_problems("arithmetic", 16, seed=1, split="test", level="3x12")
        prompts = [tok.encode(pr.pretrain_text().split("<think>")[0] + "<think>", bos=True) for pr in problems]
        params = SamplingParams(max_tokens=48, temperature=0)
        plain = Engine(ours, tok, max_batch_size=1, compile=args.compile)
        spec = Engine(ours, tok, max_batch_size=1, speculative=True, compile=args.compile)
        for p in prompts:  # warm-up: compiles every shape either engine meets
            plain.generate([p], params), spec.generate([p], params)
        t_plain, t_spec = [], []
        for p in prompts:
            t = alternate(
                {
                    "plain": lambda p=p: _timed(lambda: plain.generate([p], params)),
                    "spec": lambda p=p: _timed(lambda: spec.generate([p], params)),
                },
                args.reps,
            )
            t_plain.append(statistics.median(t["plain"]))
            t_spec.append(statistics.median(t["spec"]))
        spec.stats = dict.fromkeys(spec.stats, 0)
        for p in prompts:
            spec.generate([p], params)
        same = all(plain.generate([p], params)[0].token_ids == spec.generate([p], params)[0].token_ids for p in prompts)
        result["mtp_speculation_batch1"] = {
            "acceptance_rate": round(spec.stats["accepted"] / max(spec.stats["drafted"], 1), 3),
            "speedup": round(sum(t_plain) / sum(t_spec), 2),
            "greedy_output_identical": same,
        }
    result.update(
        torch=torch.__version__,
        transformers=transformers.__version__,
        machine=f"{platform.machine()} {torch.get_num_threads()} threads",
        date=time.strftime("%Y-%m-%d"),
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
