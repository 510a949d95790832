"""Structured output: OpenAI's `response_format` (`json_object`, `json_schema`) through constrained decoding.

`grammar_from_response_format` compiles the request's format to an llguidance grammar (a JSON schema compiler
and an Earley parser over bytes, in Rust; vLLM, SGLang and llama.cpp use it too), or names what it cannot compile.
Each constrained sequence gets a `Constraint`: before every sampling step it writes the bitmask of tokens that
keep the output a prefix of some valid document, and the sampler sets the other logits to -inf (`mask_logits`).
Sequences without one pay nothing. Output is compact one-line JSON (`", "` and `": "` separators, no free
whitespace), so a model cannot loop on blank lines; an answer cut by `max_tokens` ends with finish_reason `length`,
and stop strings still apply (one that occurs inside the JSON cuts it, as the client asked). Once the document is
complete the sequence ends at once (finish_reason `stop`), without a step to sample the EOS that is all that's left.

Reasoning models: as DeepSeek's API and vLLM do, the constraint holds for the answer, not for the thinking. A
sequence whose prompt opened `<think>` thinks freely until `</think>`; one whose prompt closed it (thinking off)
is constrained from its first token; otherwise its first token either opens `<think>` or starts the answer. A
thinking sequence may not end (EOS) before it closes the block, since it would then have no answer at all.
"""

from __future__ import annotations

import json
import math
import re
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from nanoseek.tokenizer import SPECIAL_TOKENS, THINK_END, THINK_START, Tokenizer

if TYPE_CHECKING:
    import llguidance

# One-line JSON as `json.dumps` writes it; whitespace inside strings is still free.
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
JSON_OBJECT = {"type": "object"}  # what `json_object` promises: some JSON object


class StructuredOutputError(ValueError):
    """A response format this server cannot honour; `param` names the request field (OpenAI's error `param`)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def _llguidance():
    try:
        import llguidance
    except ImportError:  # a runtime dependency; only a hand-pruned environment lacks it
        raise StructuredOutputError(
            "structured output needs the llguidance package: pip install llguidance", "response_format"
        ) from None
    return llguidance


# ------------------------------------------------------------------------------------------------- grammars
def grammar_from_response_format(response_format: Any, param: str = "response_format") -> str | None:
    """The llguidance grammar of a chat `response_format` (None for `text`): `{"type": "json_object"}` or
    `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`. Raises StructuredOutputError naming
    the offending field: a malformed format, or a schema feature the grammar compiler does not support."""
    kind = _kind(response_format, param)
    if kind != "json_schema":
        return None if kind == "text" else compile_schema(JSON_OBJECT, param)
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict):
        raise StructuredOutputError(
            f"{param}.json_schema: required, an object with 'name' and 'schema'", f"{param}.json_schema"
        )
    return compile_schema(json_schema_of(spec, f"{param}.json_schema"), f"{param}.json_schema.schema")


def grammar_from_text_format(fmt: Any, param: str = "text.format") -> str | None:
    """The same for the Responses API's `text.format`, where name, schema and strict sit beside `type`."""
    kind = _kind(fmt, param)
    if kind != "json_schema":
        return None if kind == "text" else compile_schema(JSON_OBJECT, param)
    return compile_schema(json_schema_of(fmt, param), f"{param}.schema")


def _kind(fmt: Any, param: str) -> str:
    if fmt is None:
        return "text"
    if not isinstance(fmt, dict):
        raise StructuredOutputError(f"{param}: must be an object such as {{'type': 'json_object'}}", param)
    kind = fmt.get("type")
    if kind not in ("text", "json_object", "json_schema"):
        raise StructuredOutputError(
            f"{param}.type: {json.dumps(kind)[:40]} is not an output format; use 'text', 'json_object' or "
            "'json_schema'",
            f"{param}.type",
        )
    return kind


def json_schema_of(spec: dict, param: str) -> dict:
    """The schema of a `json_schema` format ({name, schema, strict, description}), its other fields checked."""
    name = spec.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
        raise StructuredOutputError(
            f"{param}.name: required, 1-64 letters, digits, '_' or '-', got {json.dumps(name)[:70]}", f"{param}.name"
        )
    if spec.get("strict") not in (None, True, False):
        raise StructuredOutputError(f"{param}.strict: must be a boolean", f"{param}.strict")
    schema = spec.get("schema", {})  # OpenAI: optional; absent means any JSON value
    if not isinstance(schema, dict):
        raise StructuredOutputError(f"{param}.schema: must be a JSON Schema object", f"{param}.schema")
    return schema


def compile_schema(schema: dict, param: str) -> str:
    """A JSON schema as an llguidance grammar, checked: an error names the unsupported keyword and where it is."""
    llg = _llguidance()
    try:
        grammar = llg.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_STYLE)
    except (ValueError, TypeError) as e:
        raise StructuredOutputError(f"{param}: not a JSON schema ({e})", param) from None
    failed, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar)
    if failed:
        raise StructuredOutputError(_explain(messages[0] if messages else "cannot compile", schema, param), param)
    return grammar


def _explain(message: str, schema: dict, param: str) -> str:
    """llguidance's compile error as a client can act on it: which keyword, where, and what to do."""
    first = message.strip().splitlines()[0]
    keys = re.match(r"Unimplemented keys: \[(.*)\]", first)
    if keys:
        names = [k.strip().strip('"') for k in keys.group(1).split(",")]
        where = _find_key(schema, names[0])
        at = f" (at {param}.{where})" if where else ""
        listed = ", ".join(repr(n) for n in names)
        return (
            f"{param}: JSON Schema keyword{'s' if len(names) > 1 else ''} {listed}{at} not supported: constrained "
            "decoding cannot enforce it; remove it (and check that constraint after parsing the reply)"
        )
    return f"{param}: the schema cannot be compiled for constrained decoding: {message.strip()[:300]}"


def _find_key(node: Any, key: str, path: str = "") -> str | None:
    """Dotted path of the first occurrence of `key` in a schema (depth first), or None."""
    if isinstance(node, dict):
        if key in node:
            return f"{path}.{key}".lstrip(".")
        items = node.items()
    elif isinstance(node, list):
        items = ((str(i), v) for i, v in enumerate(node))
    else:
        return None
    for k, v in items:
        found = _find_key(v, key, f"{path}.{k}")
        if found:
            return found
    return None


# ---------------------------------------------------------------------------------------------- vocabulary
def grammar_vocabulary(tok: Tokenizer, vocab_size: int) -> llguidance.LLTokenizer:
    """The tokenizer as llguidance sees it: each id's bytes (byte-level pieces mapped back to raw bytes), special
    tokens marked so no grammar can spell them (EOS ends an accepted document), ids past the tokenizer's own
    vocabulary (a model's padded rows) empty so they are never allowed. Built once per engine (~ms per 1k ids)."""
    llg = _llguidance()
    n = tok.vocab_size
    if vocab_size < n:
        raise ValueError(f"the model's vocab_size {vocab_size} is smaller than its tokenizer's ({n})")
    special = sorted({i for s in SPECIAL_TOKENS if (i := tok._tk.token_to_id(s)) is not None} | {tok.eos_id})

    class Vocabulary:  # what llguidance.TokenizerWrapper reads
        tokens = [tok.token_bytes(i) for i in range(n)] + [b""] * (vocab_size - n)
        eos_token_id, bos_token_id, special_token_ids = tok.eos_id, tok.bos_id, special

        def __call__(self, text: bytes | str) -> list[int]:  # for llguidance's own tokenizing (not our masks)
            return tok.encode(text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text)

    return llg.LLTokenizer(llg.TokenizerWrapper(Vocabulary()))


# ------------------------------------------------------------------------------------------------ sequences
class Constraint:
    """One sequence's place in its grammar, and in its reasoning block: `fill` writes the allowed tokens,
    `accept` advances past the sampled one."""

    def __init__(self, matcher: llguidance.LLMatcher, eos_id: int, think: tuple[int, int] | None, state: str):
        self.matcher, self.eos_id, self.think, self.state = matcher, eos_id, think, state  # start | think | answer

    def fill(self, words: Tensor) -> None:
        """Write the allowed-token bitmask (int32 [ceil(V / 32)], bit i of word w allows id 32 w + i)."""
        if self.state == "think":  # free text, but not the end: a reply must still come
            words.fill_(-1)
            _set_bit(words, self.eos_id, False)
            return
        self.matcher.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * 4)
        if self.state == "start":
            _set_bit(words, self.think[0], True)

    def accept(self, token: int) -> bool:
        """Advance past the sampled `token`; returns whether the answer is complete (nothing but EOS may follow)."""
        if self.state == "start":
            self.state = "think" if token == self.think[0] else "answer"
        elif self.state == "think":
            if token == self.think[1]:
                self.state = "answer"
            return False
        if self.state == "answer":
            if not self.matcher.consume_token(token):
                raise RuntimeError(f"token {token} broke the grammar: {self.matcher.get_error()}")
            return self.matcher.is_stopped()
        return False


def start_constraint(vocab: llguidance.LLTokenizer, grammar: str, tok: Tokenizer, prompt_ids: list[int]) -> Constraint:
    """A sequence's constraint: its reasoning state read from how the prompt ends (see the module docstring)."""
    llg = _llguidance()
    matcher = llg.LLMatcher(vocab, grammar, log_level=0)
    if matcher.is_error():  # the server checked the grammar; this is an engine caller's bad grammar
        raise ValueError(f"grammar does not compile: {matcher.get_error()}")
    think = (tok.think_start_id, tok.think_end_id)
    state = "answer"
    if None not in think:
        tail = tok.decode(prompt_ids[-4:]).rstrip()
        state = "answer" if tail.endswith(THINK_END) else "think" if tail.endswith(THINK_START) else "start"
    return Constraint(matcher, tok.eos_id, think if None not in think else None, state)


def _set_bit(words: Tensor, token: int, on: bool) -> None:
    view = words.numpy().view(np.uint32)  # torch has no unsigned 32-bit bit ops on CPU
    bit = np.uint32(1 << (token % 32))
    view[token // 32] = view[token // 32] | bit if on else view[token // 32] & ~bit


_SHIFTS = torch.arange(32, dtype=torch.int32)


def mask_logits(logits: Tensor, constraints: list[Constraint | None]) -> Tensor:
    """logits [N, V] with the tokens each row's constraint forbids at -inf (rows without one unchanged)."""
    rows = [i for i, c in enumerate(constraints) if c is not None]
    if not rows:
        return logits
    N, V = logits.shape
    words = torch.empty(len(rows), math.ceil(V / 32), dtype=torch.int32)
    for j, i in enumerate(rows):
        constraints[i].fill(words[j])
    allowed = ((words.unsqueeze(-1) >> _SHIFTS) & 1).view(len(rows), -1)[:, :V].bool()  # [R, V]
    for j in torch.nonzero(~allowed.any(dim=1)).flatten().tolist():  # a grammar in an error state: end, not NaN
        allowed[j, constraints[rows[j]].eos_id] = True
    idx = torch.tensor(rows, device=logits.device)
    out = logits.clone()
    out[idx] = logits[idx].masked_fill(~allowed.to(logits.device), -math.inf)
    return out
