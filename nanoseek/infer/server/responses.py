"""OpenAI's Responses API (`POST /v1/responses`) as nanoseek speaks it: the request, the `response` object and
its event stream. Stateless: the whole conversation comes in `input` (`previous_response_id` is a 400).

A reply is a list of output items in the order the model wrote them: a `reasoning` item holding the `<think>`
part (as `reasoning_text`), a `message` item with one `output_text` part, and with `tools` a `function_call` item
per call the model made, then another `message` if it wrote text after its calls. The stream announces each item
and part before its deltas and closes them after, as OpenAI's does, so `client.responses.create(stream=True)` and
its accumulating helpers follow it; a whole reply's body is built by the same code from the same updates, so it
lists the same items.

Tools, calls and logprobs go the chat path's way: `tools` are checked by `openai.tool_use` (in their flat Responses
shape), `function_call` / `function_call_output` input items become the assistant `tool_calls` and `tool` messages
the chat template renders, the model's calls are found and checked by nanoseek/infer/tools.py (a call that fails
its schema is text), and `output_text` logprobs are chat's logprob entries of the message's own tokens.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import Field

from nanoseek.infer.engine_loop import Update
from nanoseek.infer.reasoning import split_reasoning
from nanoseek.infer.sampling import MAX_TOP_LOGPROBS, SamplingParams
from nanoseek.infer.server.metrics import Timing
from nanoseek.infer.server.openai import MEDIA, APIError, Choice, ToolUse, _Strict, chat_logprobs, tool_use
from nanoseek.infer.structured import StructuredOutputError, grammar_from_text_format
from nanoseek.infer.tools import ToolCall
from nanoseek.tokenizer import Tokenizer

TEXT_PARTS = ("input_text", "output_text", "text")
OUTPUT_LOGPROBS = "message.output_text.logprobs"  # the `include` entry that asks for logprobs


class InputPart(_Strict):
    type: str
    text: str | None = None


class InputItem(_Strict):
    """An item of `input`: a message (the easy form `{role, content}` or `{type: "message", ...}`), an earlier
    `function_call` (call_id, name, arguments) or its `function_call_output` (call_id, output); reasoning items are
    skipped and other types refused by `ResponsesRequest.messages`."""

    type: str = "message"
    role: Literal["user", "assistant", "system", "developer"] | None = None
    content: str | list[InputPart] | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None  # JSON text, as the call was made
    output: str | list[InputPart] | None = None


class Reasoning(_Strict):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    summary: Any = None


class ResponsesRequest(_Strict):
    model: str | None = None
    input: str | Annotated[list[InputItem], Field(min_length=1)]
    instructions: str | None = None
    max_output_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    stream: bool | None = False
    reasoning: Reasoning | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None  # accepted; nothing is stored (the body says store: false)
    text: Any = None  # {"format": ...}: text, json_object or json_schema, checked and compiled by `grammar`
    tools: Any = None  # checked by `tool_use`, whose 400s name the bad field and show the right shape
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    include: list[str] | None = None  # only OUTPUT_LOGPROBS changes the reply; the rest have nothing to add here
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    # read only to refuse them by name
    previous_response_id: Any = None
    conversation: Any = None

    @property
    def thinking(self) -> bool:
        return self.reasoning is None or self.reasoning.effort != "none"

    def unsupported(self) -> None:
        """A 400 naming the first field this stateless, text-only server cannot honour."""
        for name in ("previous_response_id", "conversation"):
            if getattr(self, name) is not None:
                raise APIError(
                    400,
                    f"{name}: this server stores no responses or conversations (it is stateless): send the whole "
                    "conversation in input instead",
                    name,
                )
        if self.top_logprobs and not self.logprobs:
            raise APIError(400, f"top_logprobs needs include: [{OUTPUT_LOGPROBS!r}]", "top_logprobs")

    @property
    def logprobs(self) -> bool:
        return OUTPUT_LOGPROBS in (self.include or [])

    def tool_use(self) -> ToolUse | None:
        """The request's tools, checked as chat's are (None: the reply may not call tools)."""
        return tool_use(self.tools, self.tool_choice, self.parallel_tool_calls, flat=True)

    @property
    def format(self) -> dict | None:
        """`text.format`: the output format asked for (None: text)."""
        return self.text.get("format") if isinstance(self.text, dict) else None

    def grammar(self) -> str | None:
        """The grammar `text.format` asks the reply to follow (None: free text); a 400 naming what is wrong."""
        if self.text is not None and not isinstance(self.text, dict):
            raise APIError(400, "text: must be an object such as {'format': {'type': 'json_object'}}", "text")
        try:
            return grammar_from_text_format(self.format)
        except StructuredOutputError as e:
            raise APIError(400, str(e), e.param) from None

    def messages(self) -> list[dict]:
        """`instructions` and `input` as the chat path's messages ({role, content}, assistant `tool_calls`, `tool`
        results); earlier reasoning items are dropped."""
        out = [{"role": "system", "content": self.instructions}] if self.instructions else []
        if isinstance(self.input, str):
            return [*out, {"role": "user", "content": self.input}]
        for i, item in enumerate(self.input):
            if item.type == "reasoning":
                continue
            if item.type == "function_call":
                _add_call(out, i, item)
            elif item.type == "function_call_output":
                out.append(_tool_result(out, i, item))
            elif item.type != "message" or item.role is None:
                why = (
                    "no role" if item.type == "message" else "send message, function_call or function_call_output items"
                )
                raise APIError(400, f"input.{i}: {item.type!r} items are not supported ({why})", f"input.{i}")
            else:
                role = "system" if item.role == "developer" else item.role
                out.append({"role": role, "content": _text(f"input.{i}.content", item.content or "")})
        return out

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        return SamplingParams(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            max_tokens=max_tokens,
            logprobs=self.logprobs,
            top_logprobs=self.top_logprobs or 0,
        )


def _text(where: str, content: str | list[InputPart]) -> str:
    """A message's content, or a function call's output, as text; a 400 names a part that is not text."""
    if isinstance(content, str):
        return content
    for j, part in enumerate(content):
        if part.type not in TEXT_PARTS or part.text is None:
            why = "this model reads text only" if part.type in MEDIA else "send input_text parts"
            raise APIError(400, f"{where}.{j}: {part.type!r} parts are not supported ({why})", f"{where}.{j}")
    return "".join(p.text for p in content)


def _add_call(out: list[dict], i: int, item: InputItem) -> None:
    """A `function_call` item as chat writes it: a call in the `tool_calls` of an assistant turn, the turn just
    before when it is the assistant's (its text, or its other calls), so the template renders one turn."""
    for name in ("call_id", "name", "arguments"):
        if getattr(item, name) is None:
            raise APIError(400, f"input.{i}.{name}: a function_call item needs its {name}", f"input.{i}.{name}")
    call = {"id": item.call_id, "type": "function", "function": {"name": item.name, "arguments": item.arguments}}
    if out and out[-1]["role"] == "assistant":
        out[-1]["tool_calls"] = [*out[-1].get("tool_calls", []), call]
    else:
        out.append({"role": "assistant", "content": "", "tool_calls": [call]})


def _tool_result(out: list[dict], i: int, item: InputItem) -> dict:
    """A `function_call_output` item as chat's `tool` message; like chat, it must answer a call made just
    before it (or follow another result)."""
    before = out[-1] if out else None
    if before is None or not (before["role"] == "tool" or before.get("tool_calls")):
        raise APIError(400, f"input.{i}: a function_call_output must follow the function_call it answers", f"input.{i}")
    for name in ("call_id", "output"):
        if getattr(item, name) is None:
            raise APIError(400, f"input.{i}.{name}: a function_call_output item needs its {name}", f"input.{i}.{name}")
    return {"role": "tool", "tool_call_id": item.call_id, "content": _text(f"input.{i}.output", item.output)}


class TextTokens:
    """Which generated tokens the message's text came from: not the think block, not a tool-call section. Fed
    token by token (whole replies and streams alike), so `output_text` logprobs line up with its text."""

    def __init__(self, tok: Tokenizer, thinks: bool, starts_in_think: bool, tools: bool, in_call: bool) -> None:
        """thinks: the reply may open a think block; tools: it may call tools; in_call: it starts inside a
        forced call (the prompt holds the call's opening)."""
        self.think = (tok.think_start_id, tok.think_end_id)
        self.calls = (tok.tool_calls_begin_id, tok.tool_calls_end_id) if tools else (None, None)
        self.state = "calls" if in_call else "think" if starts_in_think else "start" if thinks else "text"

    def take(self, entries: list) -> list:
        """The entries (token id, logprob, top logprobs) of the message's tokens."""
        kept = []
        for entry in entries:
            t = entry[0]
            if self.state == "start":  # a thinking reply opens with `<think>`, or not at all
                self.state = "think" if t == self.think[0] else "text"
                if self.state == "think":
                    continue
            if self.state == "think":
                self.state = "text" if t == self.think[1] else "think"
            elif self.state == "calls":
                self.state = "text" if t == self.calls[1] else "calls"
            elif t == self.calls[0] and t is not None:
                self.state = "calls"
            else:
                kept.append(entry)
        return kept


# ================================================================================================= bodies
@dataclass
class Reply:
    """What the body and the event stream of one request are made from."""

    meta: dict  # id, created_at, model
    req: ResponsesRequest
    choice: Choice
    prompt_tokens: int
    tok: Tokenizer
    text_tokens: TextTokens


def _item_id(kind: str) -> str:
    return f"{kind}_{uuid.uuid4().hex}"


def reasoning_item(item_id: str, text: str, status: str) -> dict:
    return {
        "id": item_id,
        "type": "reasoning",
        "summary": [],
        "content": [{"type": "reasoning_text", "text": text}],
        "status": status,
    }


def message_item(item_id: str, text: str, status: str, logprobs: list | None = None) -> dict:
    """logprobs: chat's logprob entries (token, logprob, bytes, top_logprobs), the shape `output_text` takes."""
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}
    return {"id": item_id, "type": "message", "role": "assistant", "status": status, "content": [part]}


def function_call_item(item_id: str, call: ToolCall, status: str, arguments: str | None = None) -> dict:
    """A call the model made; `call_id` is what the client's `function_call_output` names."""
    return {
        "id": item_id,
        "type": "function_call",
        "call_id": call.id,
        "name": call.name,
        "arguments": call.arguments if arguments is None else arguments,
        "status": status,
    }


def delta_logprobs(entries: list[dict]) -> list[dict]:
    """Logprob entries as the `output_text` delta and done events take them (no bytes)."""
    return [
        {
            "token": e["token"],
            "logprob": e["logprob"],
            "top_logprobs": [{"token": t["token"], "logprob": t["logprob"]} for t in e["top_logprobs"]],
        }
        for e in entries
    ]


def response_object(r: Reply, output: list[dict], status: str, usage: dict | None, reason: str | None) -> dict:
    """The `response` object, echoing the request's settings; `reason`: the finish reason when finished."""
    req = r.req
    incomplete = {"reason": "max_output_tokens"} if reason == "length" else None
    tools = [
        {k: t.get(k) for k in ("type", "name", "description", "parameters", "strict")}
        for t in req.tools or []
        if isinstance(t, dict)
    ]
    return {
        **r.meta,
        "object": "response",
        "status": "incomplete" if incomplete else status,
        "error": None,
        "incomplete_details": incomplete,
        "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens,
        "metadata": req.metadata or {},
        "output": output,
        "parallel_tool_calls": req.parallel_tool_calls is not False,
        "previous_response_id": None,
        "reasoning": {"effort": req.reasoning.effort if req.reasoning else None, "summary": None},
        "store": False,
        "temperature": 1.0 if req.temperature is None else req.temperature,
        "text": {"format": req.format or {"type": "text"}},
        "tool_choice": "auto" if req.tool_choice is None else req.tool_choice,
        "tools": tools,
        "top_logprobs": req.top_logprobs,
        "top_p": 1.0 if req.top_p is None else req.top_p,
        "truncation": "disabled",
        "usage": usage,
    }


def response_usage(prompt_tokens: int, c: Choice, reasoning_tokens: int) -> dict:
    return {
        "input_tokens": prompt_tokens,
        "input_tokens_details": {"cached_tokens": c.cached_tokens, "cache_write_tokens": 0},
        "output_tokens": c.tokens,
        "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
        "total_tokens": prompt_tokens + c.tokens,
    }


def reasoning_tokens(c: Choice, think_end_id: int | None) -> int:
    """Tokens up to and including `</think>` (all of them when the reply never stopped thinking)."""
    if c.splitter is None or not c.ids:
        return 0
    if think_end_id is not None and think_end_id in c.ids:
        return c.ids.index(think_end_id) + 1
    return len(c.ids) if split_reasoning(c.text, c.splitter.starts_in_think)[0] is not None else 0


def _usage(r: Reply) -> dict:
    return response_usage(r.prompt_tokens, r.choice, reasoning_tokens(r.choice, r.tok.think_end_id))


def response_meta(model: str) -> dict:
    return {"id": _item_id("resp"), "created_at": int(time.time()), "model": model}


# ================================================================================================= stream
@dataclass
class _Open:
    """The output item the stream is writing into."""

    kind: str  # "reasoning" or "message"
    item_id: str
    text: str = ""
    logprobs: list[dict] = field(default_factory=list)  # a message's, in the `output_text` part's shape


class _Events:
    """Numbered `event:`/`data:` pairs; tracks the open output item so deltas land in it. The stream sends the
    events; the whole body keeps only `output`, so both list the same items in generation order."""

    def __init__(self, r: Reply) -> None:
        self.r, self.n, self.output, self.open = r, 0, [], None
        self.pending: list[dict] = []  # logprobs of message tokens whose text is not out yet

    def __call__(self, kind: str, **fields) -> bytes:
        event = {"type": kind, "sequence_number": self.n, **fields}
        self.n += 1
        return f"event: {kind}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n".encode()

    def _at(self) -> dict:
        return {"output_index": len(self.output), "item_id": self.open.item_id, "content_index": 0}

    def start(self, kind: str) -> list[bytes]:
        self.open = _Open(kind, _item_id("rs" if kind == "reasoning" else "msg"))
        make = reasoning_item if kind == "reasoning" else message_item
        item = make(self.open.item_id, "", "in_progress")
        part, item["content"] = item["content"][0], []  # parts are announced by their own event
        return [
            self("response.output_item.added", output_index=len(self.output), item=item),
            self("response.content_part.added", **self._at(), part=part),
        ]

    def delta(self, kind: str, text: str, logprobs: list[dict] | None = None) -> list[bytes]:
        """Text for a `kind` item (opening one if another is open); a message's delta carries `logprobs`."""
        out = [] if self.open and self.open.kind == kind else [*self.close("completed"), *self.start(kind)]
        self.open.text += text
        if kind == "reasoning":
            return [*out, self("response.reasoning_text.delta", **self._at(), delta=text)]
        self.open.logprobs += logprobs or []
        lp = delta_logprobs(logprobs or [])
        return [*out, self("response.output_text.delta", **self._at(), delta=text, logprobs=lp)]

    def close(self, status: str) -> list[bytes]:
        if self.open is None:
            return []
        o, at = self.open, self._at()
        if o.kind == "reasoning":
            item = reasoning_item(o.item_id, o.text, status)
            done = self("response.reasoning_text.done", **at, text=o.text)
        else:
            item = message_item(o.item_id, o.text, status, o.logprobs)
            done = self("response.output_text.done", **at, text=o.text, logprobs=delta_logprobs(o.logprobs))
        events = [done, self("response.content_part.done", **at, part=item["content"][0])]
        events.append(self("response.output_item.done", output_index=len(self.output), item=item))
        self.output.append(item)
        self.open = None
        return events

    def call(self, call: ToolCall) -> list[bytes]:
        """A checked call as its own item: added, its arguments in the pieces they were generated in, done."""
        events, index, item_id = self.close("completed"), len(self.output), _item_id("fc")
        item = function_call_item(item_id, call, "in_progress", arguments="")
        events.append(self("response.output_item.added", output_index=index, item=item))
        at = {"output_index": index, "item_id": item_id}
        events += [self("response.function_call_arguments.delta", **at, delta=p) for p in call.pieces]
        events.append(self("response.function_call_arguments.done", **at, arguments=call.arguments))
        item = function_call_item(item_id, call, "completed")
        events.append(self("response.output_item.done", output_index=index, item=item))
        self.output.append(item)
        return events

    def update(self, up: Update) -> list[bytes]:
        """Record one update (the choice advances); the events of what it completed, in the order it was
        written: reasoning, text, calls, text after them. Message tokens' logprobs go with the next text that
        comes out, so text after the calls gets its own tokens' logprobs, as long as no single update holds text
        from both sides of a call (one or two tokens per update never do)."""
        c, r = self.r.choice, self.r
        n_lp = len(c.logprobs)
        text = c.advance(up)
        if c.finish_reason == "error":
            return []
        final = c.finish_reason is not None
        if r.req.logprobs:
            self.pending += chat_logprobs(r.tok, r.text_tokens.take(c.logprobs[n_lp:]))["content"]
        pieces = c.tools.feed_in_order(text, final) if c.tools is not None else [text]
        if final and (not pieces or isinstance(pieces[-1], ToolCall)):
            pieces.append("")  # the reasoning splitter may hold back text until it hears the end
        events = []
        for i, piece in enumerate(pieces):
            if isinstance(piece, ToolCall):
                events += self.call(piece)
                continue
            last = final and i == len(pieces) - 1
            reasoning, content = c.splitter.feed(piece, last) if c.splitter is not None else ("", piece)
            events += self.delta("reasoning", reasoning) if reasoning else []
            if content:
                events += self.delta("message", content, self.pending)
                self.pending = []
        return events

    def finish(self) -> list[bytes]:
        """Close the reply after its last update: a reply that called nothing has a message, empty if it only
        thought; logprobs of tokens that added no text join the open message."""
        c = self.r.choice
        status = "incomplete" if c.finish_reason == "length" else "completed"
        called = c.tools is not None and bool(c.tools.calls)
        events = []
        if not called and (self.open is None or self.open.kind != "message"):
            events += [*self.close(status), *self.start("message")]
        if self.pending and self.open is not None and self.open.kind == "message":
            events += self.delta("message", "", self.pending)
            self.pending = []
        return events + self.close(status)

    def body(self) -> dict:
        """The finished `response` object."""
        return response_object(self.r, self.output, "completed", _usage(self.r), self.r.choice.finish_reason)


async def response_events(r: Reply, updates: AsyncIterator[tuple[int, Update]], timing: Timing) -> AsyncIterator[bytes]:
    """The Responses event stream: created, in_progress, each item's added / delta / done events, then completed
    (incomplete when max_output_tokens cut it); a failed generation ends with an `error` event."""
    c, ev = r.choice, _Events(r)
    yield ev("response.created", response=response_object(r, [], "in_progress", None, None))
    yield ev("response.in_progress", response=response_object(r, [], "in_progress", None, None))
    async for _, up in updates:
        events = ev.update(up)
        timing.on_update(up)
        if c.finish_reason == "error":
            yield ev("error", message=c.error or "generation failed", code="server_error", param=None)
            return
        for event in events:
            yield event
    timing.on_finish([c.finished()])
    for event in ev.finish():
        yield event
    kind = "response.incomplete" if c.finish_reason == "length" else "response.completed"
    yield ev(kind, response=ev.body())


async def response_body(r: Reply, updates: AsyncIterator[tuple[int, Update]], timing: Timing) -> dict:
    """The finished `response` of a whole (non-streamed) reply: the items the stream would send for the same
    updates, [reasoning], message, function_call ..., message (text written after the calls); a 500 if
    generation failed."""
    c, ev = r.choice, _Events(r)
    async for _, up in updates:
        ev.update(up)
        timing.on_update(up)
        if c.finish_reason == "error":
            raise APIError(500, c.error or "generation failed")
    timing.on_finish([c.finished()])
    ev.finish()
    return ev.body()
