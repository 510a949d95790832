"""Structured output's cost: three grammar libraries on our vocabularies, and what a constrained decode step adds.

    python -m benchmarks.grammar                              # vocabularies 512 (the speedrun's), 4096, 32768
    python -m benchmarks.grammar --vocab 512 --libraries llguidance

Libraries (each one installed): seconds to build its view of the tokenizer and to compile a schema and
`json_object`; then, walking a valid document token by token with B identical sequences (B = 1, 32), the time per
decode step to fill B token masks and advance every matcher past its token (per token the fastest of --reps walks,
then the median over the document's tokens: on a shared machine the fastest repeat is the one least preempted).
Every document token must be allowed by every library's mask: a check that its vocabulary is right. Engine: a
random `cpu-small` model at that vocabulary (the speedrun's model is `cpu-small` at 512): its unconstrained decode
step at batch B, vs what a constrained step adds (`mask_logits` + `Constraint.accept` for B rows). Tokenizers are
trained here, on the speedrun's corpus (512) or on Python's standard library source (larger): nothing downloaded.
One JSON line.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import platform
import statistics
import sysconfig
import time
from pathlib import Path

import torch

from nanoseek import ModelConfig, Transformer
from nanoseek.infer.engine import Engine, single_thread
from nanoseek.infer.sampling import SamplingParams
from nanoseek.infer.structured import (
    JSON_STYLE,
    compile_schema,
    grammar_vocabulary,
    mask_logits,
    start_constraint,
)
from nanoseek.tasks.problems import builtin_corpus
from nanoseek.tokenizer import SPECIAL_TOKENS, Tokenizer, train_tokenizer

RECORD = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "color", "tags", "address"],
    "additionalProperties": False,
}
DOCUMENT = {
    "name": "Ann Lee, a painter from the north",
    "age": 31,
    "color": "green",
    "tags": ["watercolour", "portraits", "tea", "long walks"],
    "address": {"city": "Paris", "zip": "75001"},
}
TEXT = json.dumps(DOCUMENT)  # ", " and ": " separators: the style every library is asked for


def tokenizer(vocab: int) -> Tokenizer:
    """The speedrun's tokenizer (512), or a BPE on ~8 MB of Python's standard library source."""
    if vocab <= 512:
        from nanoseek.speedrun.stages import TOKENIZER_PROBLEMS, TOKENIZER_SEED

        return train_tokenizer(builtin_corpus(n=TOKENIZER_PROBLEMS, seed=TOKENIZER_SEED), vocab)
    texts, size = [], 0
    for f in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        texts.append(f.read_text(encoding="utf-8", errors="replace"))
        size += len(texts[-1])
        if size > 8e6:
            break
    return train_tokenizer(texts, vocab)


# ------------------------------------------------------------------------------------------------ libraries
class Library:
    """One grammar library behind the same four calls; `fill` writes int32 bitmask rows (bit i = token i)."""

    name = ""

    def __init__(self, tok: Tokenizer, V: int) -> None:
        self.tok, self.V = tok, V
        self.special = {tok._tk.token_to_id(s) for s in SPECIAL_TOKENS} - {None}

    def compile(self, schema: dict):
        raise NotImplementedError

    def matcher(self, compiled):
        raise NotImplementedError

    def fill(self, matchers: list, words: torch.Tensor) -> None:
        raise NotImplementedError

    def advance(self, m, token: int) -> None:
        raise NotImplementedError


class LLGuidance(Library):
    name = "llguidance"

    def __init__(self, tok, V, parallel: bool = False):
        super().__init__(tok, V)
        import llguidance

        self.llg, self.parallel = llguidance, parallel
        self.vocab = grammar_vocabulary(tok, V)  # nanoseek's own path
        self.executor = llguidance.LLExecutor() if parallel else None
        self.name = "llguidance-parallel" if parallel else "llguidance"

    def compile(self, schema):
        return compile_schema(schema, "schema")

    def matcher(self, grammar):
        return self.llg.LLMatcher(self.vocab, grammar)

    def fill(self, matchers, words):
        if self.parallel:
            self.executor.unsafe_compute_mask_ptr(
                [(m, i) for i, m in enumerate(matchers)], words.data_ptr(), words.shape[1] * 4, len(matchers)
            )
            return
        for i, m in enumerate(matchers):
            m.unsafe_compute_mask_ptr(words[i].data_ptr(), words.shape[1] * 4)

    def advance(self, m, token):
        assert m.consume_token(token), m.get_error()


class XGrammar(Library):
    name = "xgrammar"

    def __init__(self, tok, V):
        super().__init__(tok, V)
        import xgrammar

        self.xgr = xgrammar
        # raw bytes per id; special tokens as empty strings, which xgrammar never allows in a grammar
        vocab = [b"" if i in self.special else tok.token_bytes(i) for i in range(tok.vocab_size)]
        vocab += [b""] * (V - len(vocab))
        info = xgrammar.TokenizerInfo(vocab, xgrammar.VocabType.RAW, vocab_size=V, stop_token_ids=[tok.eos_id])
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=2, cache_enabled=False)

    def compile(self, schema):
        return self.compiler.compile_json_schema(schema, any_whitespace=False, separators=(", ", ": "))

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matchers, words):
        for i, m in enumerate(matchers):
            m.fill_next_token_bitmask(words, i)

    def advance(self, m, token):
        assert m.accept_token(token)


class OutlinesCore(Library):
    name = "outlines-core"

    def __init__(self, tok, V):
        super().__init__(tok, V)
        import outlines_core
        from outlines_core.json_schema import build_regex_from_schema

        self.oc, self.regex = outlines_core, build_regex_from_schema
        ids: dict[bytes, list[int]] = {}
        for i in range(tok.vocab_size):
            if i not in self.special:
                ids.setdefault(tok.token_bytes(i), []).append(i)
        self.vocab = outlines_core.Vocabulary(tok.eos_id, ids)

    def compile(self, schema):
        return self.oc.Index(self.regex(json.dumps(schema), whitespace_pattern=r"[ ]?"), self.vocab)

    def matcher(self, index):
        return self.oc.Guide(index)

    def fill(self, matchers, words):
        for i, g in enumerate(matchers):
            g.write_mask_into(words[i].data_ptr(), words.shape[1], 4)

    def advance(self, g, token):
        g.advance(token, None)


LIBRARIES = {"llguidance": LLGuidance, "xgrammar": XGrammar, "outlines-core": OutlinesCore}
MODULES = {"llguidance": "llguidance", "xgrammar": "xgrammar", "outlines-core": "outlines_core"}


def import_seconds(name: str) -> float | str:
    """Seconds to import a library (first import in this process), or why it cannot be."""
    try:
        return round(timed(lambda: importlib.import_module(MODULES[name]))[1], 2)
    except ImportError as e:
        return f"not installed ({e})"


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def allowed(words: torch.Tensor, row: int, token: int) -> bool:
    return bool((int(words[row, token // 32]) >> (token % 32)) & 1)


def fastest_walk(step, ids: list[int], reps: int, reset) -> float:
    """Median over the document's tokens of the fastest of `reps` timings of `step(token)` (seconds)."""
    best = [math.inf] * len(ids)
    for _ in range(reps):
        reset()
        for k, t in enumerate(ids):
            start = time.perf_counter()
            step(t)
            best[k] = min(best[k], time.perf_counter() - start)
    return statistics.median(best)


def library_walk(lib: Library, compiled, ids: list[int], B: int, reps: int) -> float:
    """Seconds per decode step for B matchers: fill their masks (checking the document's token is allowed), advance."""
    words = torch.zeros(B, math.ceil(lib.V / 32), dtype=torch.int32)
    matchers = []

    def reset():
        matchers[:] = [lib.matcher(compiled) for _ in range(B)]

    def step(t):
        lib.fill(matchers, words)
        assert allowed(words, B - 1, t), f"{lib.name}: document token {t} {lib.tok.token_bytes(t)!r} masked out"
        for m in matchers:
            lib.advance(m, t)

    return fastest_walk(step, ids, reps, reset)


def library_costs(lib_cls, tok: Tokenizer, V: int, batches: list[int], reps: int = 5, **kw) -> dict:
    """Setup and compile seconds, and per-step mask + advance milliseconds for each batch size."""
    lib, setup = timed(lambda: lib_cls(tok, V, **kw))
    compiled, compile_s = timed(lambda: lib.compile(RECORD))
    out = {"setup_s": round(setup, 4), "compile_record_s": round(compile_s, 4)}
    if lib.name == "outlines-core" and V > 512:  # its regex index of any object takes ~30 s at 322 ids already
        out["compile_json_object_s"] = "skipped: grows with the vocabulary"
    else:
        out["compile_json_object_s"] = round(timed(lambda: lib.compile({"type": "object"}))[1], 4)
    ids = tok.encode(TEXT)
    for B in batches:
        sec = library_walk(lib, compiled, ids, B, reps)
        out[f"mask_ms_b{B}"] = round(sec * 1e3, 4)
        out[f"mask_us_per_seq_token_b{B}"] = round(sec * 1e6 / B, 2)
    out["document_tokens"] = len(ids)
    return out


# --------------------------------------------------------------------------------------------------- engine
def constraint_walk(new, ids: list[int], V: int, reps: int) -> float:
    """Seconds per decode step for the constraints `new()` makes: mask random logits [B, V], advance each."""
    constraints = new()
    logits = torch.randn(len(constraints), V)

    def reset():
        constraints[:] = new()

    def step(t):
        mask_logits(logits, constraints)
        for c in constraints:
            c.accept(t)

    return fastest_walk(step, ids, reps, reset)


def engine_costs(tok: Tokenizer, V: int, batches: list[int], steps: int = 24, reps: int = 5) -> dict:
    """A random cpu-small model's unconstrained decode step vs the mask work a constrained step adds (with the
    engine's thread count: one thread below `single_thread_below` rows). Fastest of `reps` per step, median."""
    torch.manual_seed(0)
    config = ModelConfig.from_preset("cpu-small", vocab_size=V, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    engine = Engine(Transformer(config), tok, max_batch_size=max(batches))
    grammar = compile_schema(RECORD, "schema")
    vocab = grammar_vocabulary(tok, V)
    closed = tok.encode(tok.apply_chat_template([{"role": "user", "content": "hi"}], True, thinking=False))
    ids = tok.encode(TEXT)
    out = {}
    for B in batches:
        best = [math.inf] * steps
        for _ in range(reps):
            for _ in range(B):
                engine.add_request(closed, SamplingParams(max_tokens=steps + 1, ignore_eos=True))
            engine.step()  # admission and first tokens
            best = [min(b, timed(engine.step)[1]) for b in best]
            assert not engine.has_work()
        with single_thread(B < engine.single_thread_below):
            mask = constraint_walk(
                lambda B=B: [start_constraint(vocab, grammar, tok, closed) for _ in range(B)], ids, V, reps
            )
        step = statistics.median(best)
        out[f"b{B}"] = {
            "decode_step_ms": round(step * 1e3, 3),
            "mask_ms": round(mask * 1e3, 3),
            "mask_share_of_step": round(mask / step, 3),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", default="512,4096,32768", help="comma-separated vocabulary sizes")
    ap.add_argument("--batch", default="1,32", help="comma-separated batch sizes")
    ap.add_argument("--libraries", default=",".join(LIBRARIES), help="comma-separated: " + ", ".join(LIBRARIES))
    args = ap.parse_args()
    batches = [int(b) for b in args.batch.split(",")]
    result = {
        "benchmark": "grammar",
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "json_style": JSON_STYLE,
        "vocabularies": {},
    }
    names = args.libraries.split(",")
    result["import_s"] = {name: import_seconds(name) for name in names}
    for v in [int(x) for x in args.vocab.split(",")]:
        tok, train_s = timed(lambda v=v: tokenizer(v))
        V = tok.vocab_size
        row = {"tokenizer_train_s": round(train_s, 1), "libraries": {}}
        for name in names:
            if isinstance(result["import_s"][name], float):
                row["libraries"][name] = library_costs(LIBRARIES[name], tok, V, batches)
            if name == "llguidance" and max(batches) > 1:
                par = library_costs(LLGuidance, tok, V, [max(batches)], parallel=True)
                row["libraries"]["llguidance-parallel"] = {k: v for k, v in par.items() if "_b" in k}
        row["engine_cpu_small"] = engine_costs(tok, V, batches)
        result["vocabularies"][str(V)] = row
    print(json.dumps(result))


if __name__ == "__main__":
    main()
