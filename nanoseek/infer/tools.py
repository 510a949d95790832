"""Tool calls in DeepSeek-V3's format: find them in generated text (whole or streaming), check them against the
tools' schemas, and the prefill that forces a call.

The chat template (nanoseek/tokenizer.py) writes a turn's calls as DeepSeek-V3-0324 does:

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\nARGS\\n```<｜tool▁call▁end｜>
    \\n<｜tool▁call▁begin｜>...<｜tool▁call▁end｜><｜tool▁calls▁end｜>

DeepSeek-V3.1 drops the type and the fence: `<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGS<｜tool▁call▁end｜>`. The
parser reads both, so DeepSeek's own checkpoints work too. A call is released only once its `<｜tool▁call▁end｜>`
has arrived and it passed `check_call`: a call that names no offered tool, or whose arguments are not a JSON
object valid against the tool's schema (checked whole by `jsonschema`), goes to the content as the text the model
wrote, never out as a broken call.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError, best_match
from jsonschema.validators import validator_for

from nanoseek.infer.reasoning import partial_suffix
from nanoseek.tokenizer import TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_SEP

MARKERS = (TOOL_CALLS_BEGIN, TOOL_CALL_BEGIN, TOOL_CALLS_END)  # what opens or closes a calls section


def call_style(chat_template: str) -> str:
    """ "v3" (`function<｜tool▁sep｜>NAME` + a ```json fence) or "v3.1" (`NAME<｜tool▁sep｜>ARGS`): how the
    model's template writes calls, so a forced call starts the way the model learned."""
    return "v3.1" if "tool_calls" in chat_template and "```json" not in chat_template else "v3"


def prefill(style: str, name: str | None = None) -> str:
    """The text a forced call starts with (`tool_choice` "required", or a named function): the model continues
    from inside the call, after the name when it is given."""
    head = TOOL_CALLS_BEGIN + TOOL_CALL_BEGIN
    if style == "v3.1":
        return head + (f"{name}{TOOL_SEP}" if name else "")
    return head + "function" + TOOL_SEP + (f"{name}\n```json\n" if name else "")


def schema_error(schema: dict) -> str | None:
    """Why a tool's `parameters` cannot check arguments (None: it can): it is not valid JSON Schema, or a `$ref`
    points outside it (remote schemas are never fetched) or does not resolve."""
    if (ref := _remote_ref(schema)) is not None:
        return f"$ref {ref!r}: only references within the schema ('#/...') are supported"
    try:
        validator = validator_for(schema, default=Draft202012Validator)
        validator.check_schema(schema)
        best_match(validator(schema).iter_errors({}))  # follows the top-level references
    except SchemaError as e:
        return f"{_path('', e.absolute_path) or 'the schema'}: {e.message}"
    except Exception as e:  # an unhashable $schema, a reference to nowhere or to itself, ...
        return f"it cannot be used ({type(e).__name__}: {str(e)[:200]})"
    return None


def _remote_ref(node) -> str | None:
    """The first `$ref` in a schema that is not a pointer into the schema itself."""
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and not ref.startswith("#"):
            return ref
        node = list(node.values())
    if isinstance(node, list):
        return next((r for r in map(_remote_ref, node) if r is not None), None)
    return None


def _path(head: str, parts) -> str:
    return ".".join([head, *map(str, parts)]).strip(".")


def _not_json(constant: str):
    raise ValueError(f"{constant} is not JSON")


def check_call(name: str, arguments: str, tools: dict[str, dict | None]) -> str | None:
    """Why a generated call is not a usable one (None: it is): the name must be an offered tool, the arguments a
    JSON object valid against the tool's whole parameters schema (nested objects, arrays, enums, required keys,
    `$ref`s: what `jsonschema` checks, so a client can trust a call it gets as it trusts its own validator)."""
    if name not in tools:
        return f"no tool named {name!r}"
    try:
        args = json.loads(arguments, parse_constant=_not_json)  # NaN and Infinity are Python's, not JSON
    except ValueError as e:
        return f"arguments are not JSON ({e})"
    if not isinstance(args, dict):
        return "arguments are not a JSON object"
    schema = tools[name] or {}
    try:
        error = best_match(validator_for(schema, default=Draft202012Validator)(schema).iter_errors(args))
    except Exception as e:  # a reference deeper in the schema that does not resolve, or never ends
        return f"arguments cannot be checked against the schema ({type(e).__name__})"
    if error is None:
        return None
    return f"{_path('arguments', error.absolute_path)}: {error.message}"


def split_call(body: str) -> tuple[str, str, int] | None:
    """(name, arguments, where the arguments start in body) of a call's text between `<｜tool▁call▁begin｜>` and
    `<｜tool▁call▁end｜>`, in either style; None if it has no `<｜tool▁sep｜>`."""
    if TOOL_SEP not in body:
        return None
    head, rest = body.split(TOOL_SEP, 1)
    offset = len(head) + len(TOOL_SEP)
    if head.strip() == "function" and "\n" in rest:  # V3: function<sep>NAME\n```json\nARGS\n```
        name, args = rest.split("\n", 1)
        offset += len(name) + 1
    else:  # V3.1: NAME<sep>ARGS
        name, args = head, rest
    stripped = args.lstrip()
    if stripped.startswith("```"):  # the fence and its language tag
        stripped = stripped.split("\n", 1)[1] if "\n" in stripped else ""
    offset += len(args) - len(stripped)
    args = stripped.rstrip()
    if args.endswith("```"):
        args = args[:-3].rstrip()
    return name.strip(), args, offset


@dataclass
class ToolCall:
    """A complete, checked call, as `message.tool_calls` shows it."""

    id: str
    name: str
    arguments: str  # JSON text, as the model wrote it
    pieces: list[str] = field(default_factory=list)  # the arguments as they arrived (stream fragments)

    def message(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


class ToolCallParser:
    """Feed generated text in pieces; get back (content text, newly completed calls). Text outside calls and
    every call that fails `check_call` come back as content; the section markers are never shown.

    tools: offered tool name -> its parameters schema. max_calls: calls after this many become content
    (`parallel_tool_calls: false` is 1). prefix: text the prompt already holds of the output (a forced call's
    prefill): parsed as if generated, never shown."""

    def __init__(self, tools: dict[str, dict | None], max_calls: int | None = None, prefix: str = "") -> None:
        self.tools, self.max_calls = tools, max_calls
        self.state = "text"  # text -> section (between calls) -> call -> section ... -> text
        self.pending = ""  # text not decided yet: a marker may be arriving, or a call is open
        self.cuts: list[int] = []  # where fed pieces ended inside the open call
        self.calls: list[ToolCall] = []
        self.errors: list[str] = []  # why calls were rejected (for logs and tests)
        if prefix:
            self.feed(prefix)

    def feed(self, piece: str, final: bool = False) -> tuple[str, list[ToolCall]]:
        """The content and the calls that `piece` completes (`final`: no more text comes)."""
        out = self.feed_in_order(piece, final)
        return "".join(p for p in out if isinstance(p, str)), [p for p in out if isinstance(p, ToolCall)]

    def feed_in_order(self, piece: str, final: bool = False) -> list[str | ToolCall]:
        """What `piece` completes as content texts and calls in the order they were written: a reply may write
        text after its calls, and /v1/responses lists that text as a message after them."""
        self.pending += piece
        if self.state == "call":
            self.cuts.append(len(self.pending))
        out: list[str | ToolCall] = []
        while self.pending:
            if self.state == "call":
                end = self.pending.find(TOOL_CALL_END)
                if end < 0:
                    if final:  # cut off inside a call: what was written is text
                        out.append(TOOL_CALL_BEGIN + self.pending)
                        self.pending = ""
                    break
                body, self.pending = self.pending[:end], self.pending[end + len(TOOL_CALL_END) :]
                call = self._complete(body)
                if call is None:
                    out.append(TOOL_CALL_BEGIN + body + TOOL_CALL_END)
                else:
                    out.append(call)
                    self.calls.append(call)
                self.state = "section"
                continue
            found = [(self.pending.find(m), m) for m in MARKERS if m in self.pending]
            if not found:
                keep = 0 if final else max(partial_suffix(self.pending, m) for m in MARKERS)
                text = self.pending[: len(self.pending) - keep]
                if self.state == "section" and text.strip() == "":
                    self.pending = "" if final else self.pending
                    break  # whitespace between calls: dropped, or wait for what follows
                out.append(text)
                self.pending = self.pending[len(text) :]
                break
            at, marker = min(found)
            before = self.pending[:at]
            if self.state == "text" or before.strip():
                out.append(before)
            self.pending = self.pending[at + len(marker) :]
            if marker == TOOL_CALL_BEGIN:
                self.state, self.cuts = "call", [len(self.pending)] if self.pending else []
            else:
                self.state = "section" if marker == TOOL_CALLS_BEGIN else "text"
        return [p for p in out if p != ""]

    def _complete(self, body: str) -> ToolCall | None:
        parts = split_call(body)
        if parts is None:
            self.errors.append(f"no {TOOL_SEP} in the call")
            return None
        name, arguments, start = parts
        why = check_call(name, arguments, self.tools)
        if why is None and self.max_calls is not None and len(self.calls) >= self.max_calls:
            why = f"more than {self.max_calls} call(s) with parallel_tool_calls false"
        if why is not None:
            self.errors.append(why)
            return None
        # the arguments as they arrived: cut where the fed pieces ended
        stop = start + len(arguments)
        cuts = [start] + [c for c in self.cuts if start < c < stop] + [stop]
        pieces = [body[a:b] for a, b in zip(cuts, cuts[1:]) if b > a]
        return ToolCall(f"call_{uuid.uuid4().hex[:24]}", name, arguments, pieces)


def parse_tool_calls(text: str, tools: dict[str, dict | None], max_calls: int | None = None, prefix: str = ""):
    """(content, calls) of a whole completion: what `ToolCallParser` gives fed it at once."""
    parser = ToolCallParser(tools, max_calls, prefix)
    content, _ = parser.feed(text, final=True)
    return content, parser.calls


def stream_fragments(index: int, call: ToolCall) -> list[dict]:
    """`delta.tool_calls` entries for one call: its id, type and name first, then its arguments piece by piece."""
    head = {"index": index, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}}
    return [head] + [{"index": index, "function": {"arguments": p}} for p in call.pieces]
