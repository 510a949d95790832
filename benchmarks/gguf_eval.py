"""What GGUF weight types cost: the built-in eval run through llama.cpp on each export, next to our engine.

    python -m benchmarks.gguf_eval --model runs/speedrun/grpo/checkpoints/step_N [--format chat] [--n 100]

The speedrun's held-out test problems (n per arithmetic level, duplicates dropped), greedy, max 96 tokens, scored by
`nanoseek eval`'s checker. For each dtype (with llama.cpp's default f16 KV cache, and f32 also with an f32 cache): accuracy, the share of completions identical to our engine's, file
size and speed (llama.cpp, generated tokens/s over the whole run; one thread for generation, as our engine decodes
batch 1, all torch threads for prompts). One JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from nanoseek.eval.evaluate import evaluate
from nanoseek.export.gguf import DTYPES, export_gguf
from nanoseek.infer.engine import Engine
from nanoseek.tasks.problems import LEVELS, generate
from nanoseek.tasks.sources import prompt_ids
from nanoseek.tasks.verify import is_correct, to_item


def last_logits(llm) -> np.ndarray:
    """The logits llama.cpp computed for the last evaluated token (without logits_all, llama-cpp-python keeps none)."""
    import llama_cpp

    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))


def llama_greedy(llm, ids: list[int], max_tokens: int, eos: int, stop_newline: bool, newline_ids: set[int]):
    """Greedy completion through llama.cpp's own KV cache; stops at EOS (not returned) or, for the pretrain
    format, after a token containing a newline (the engine's stop string; the text is cut at it)."""
    llm.reset()
    llm.eval(ids)
    out: list[int] = []
    for _ in range(max_tokens):
        tok = int(np.argmax(last_logits(llm)))
        if tok == eos:
            break
        out.append(tok)
        if stop_newline and tok in newline_ids:
            break
        llm.eval([tok])
    return out


def main() -> None:
    import llama_cpp

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--format", default="chat", choices=("chat", "pretrain"))
    p.add_argument("--n", type=int, default=100, help="problems per level (the speedrun evaluates 100)")
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--dtypes", default=",".join(DTYPES))
    args = p.parse_args()

    problems = [
        p for lvl in LEVELS["arithmetic"] for p in generate("arithmetic", args.n, seed=0, split="test", level=lvl)
    ]
    items = [to_item(p) for p in {p.prompt: p for p in problems}.values()]
    engine = Engine.from_pretrained(args.model, max_batch_size=64)
    tok = engine.tokenizer
    t = time.perf_counter()
    ref = evaluate(engine, items, args.format, max_tokens=args.max_tokens)
    ref_s = time.perf_counter() - t
    ref_text = [r["completion"] for r in ref["results"]]
    newline_ids = {i for i in range(engine.config.vocab_size) if "\n" in tok.decode([i])}
    threads = torch.get_num_threads()
    result = {
        "bench": "gguf_eval",
        "model": args.model,
        "format": args.format,
        "problems": len(items),
        "nanoseek_f32": {"accuracy": round(ref["accuracy"], 4), "seconds": round(ref_s, 1)},
    }
    # each weight dtype with llama.cpp's default f16 KV cache (how it is usually run), and f32 with an f32 cache
    runs = [("f32", "f32")] + [(dtype, "f16") for dtype in args.dtypes.split(",")]
    with tempfile.TemporaryDirectory() as d:
        for dtype, cache in runs:
            path = Path(d) / f"model-{dtype}.gguf"
            if not path.exists():
                export_gguf(args.model, path, dtype=dtype)
            kv = {"f32": 0, "f16": 1}[cache]  # GGML_TYPE_F32 / GGML_TYPE_F16
            llm = llama_cpp.Llama(
                str(path), n_ctx=512, n_threads=1, n_threads_batch=threads, type_k=kv, type_v=kv, verbose=False
            )
            t, n_tokens, correct, same = time.perf_counter(), 0, 0, 0
            for item, reference in zip(items, ref_text):
                ids = prompt_ids(tok, item.prompt, args.format)
                out = llama_greedy(llm, ids, args.max_tokens, tok.eos_id, args.format == "pretrain", newline_ids)
                n_tokens += len(out)
                text = tok.decode(out)
                if args.format == "pretrain" and "\n" in text:
                    text = text[: text.index("\n")]
                correct += is_correct(item, text)
                same += text == reference
            seconds = time.perf_counter() - t
            llm.close()
            result[f"{dtype}_kv_{cache}"] = {
                "accuracy": round(correct / len(items), 4),
                "same_completion_as_nanoseek": round(same / len(items), 4),
                "file_mib": round(path.stat().st_size / 2**20, 2),
                "seconds": round(seconds, 1),
                "llama_tokens_per_s": round(n_tokens / seconds, 1),
            }
    result.update(
        llama_cpp_python=llama_cpp.__version__,
        machine=f"{platform.machine()} {threads} threads",
        date=time.strftime("%Y-%m-%d"),
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
