"""OpenAI's Responses API (`POST /v1/responses`) as nanoseek speaks it: the request, the `response` object and
its event stream. Stateless: the whole conversation comes in `input` (`previous_response_id` is a 400).

A reply is one or two output items: a `reasoning` item holding the `<think>` part (as `reasoning_text`), then a
`message` item with one `output_text` part. The stream announces each item and part before its deltas and closes
them after, as OpenAI's does, so `client.responses.create(stream=True)` and its accumulating helpers follow it.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from pydantic import Field

from nanoseek.infer.engine_loop import Update
from nanoseek.infer.reasoning import split_reasoning
from nanoseek.infer.sampling import SamplingParams
from nanoseek.infer.server.metrics import Timing
from nanoseek.infer.server.openai import MEDIA, APIError, Choice, _Strict
from nanoseek.infer.structured import StructuredOutputError, grammar_from_text_format

TEXT_PARTS = ("input_text", "output_text", "text")


class InputPart(_Strict):
    type: str
    text: str | None = None


class InputItem(_Strict):
    """A message of `input` (the easy form `{role, content}` or `{type: "message", ...}`); other item types are
    refused by `ResponsesRequest.messages`."""

    type: str = "message"
    role: Literal["user", "assistant", "system", "developer"] | None = None
    content: str | list[InputPart] | None = None


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
    # read only to refuse them by name
    previous_response_id: Any = None
    conversation: Any = None
    tools: Any = None
    tool_choice: Any = None

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
        if self.tools:
            raise APIError(400, "tools: tool calling is not supported by this server yet; send no tools", "tools")
        if self.tool_choice not in (None, "none", "auto"):
            raise APIError(400, "tool_choice: tool calling is not supported by this server yet", "tool_choice")

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
        """`instructions` and `input` as chat messages ({role, content}); earlier reasoning items are dropped."""
        out = [{"role": "system", "content": self.instructions}] if self.instructions else []
        if isinstance(self.input, str):
            return [*out, {"role": "user", "content": self.input}]
        for i, item in enumerate(self.input):
            if item.type == "reasoning":
                continue
            if item.type != "message" or item.role is None:
                why = "only message items (role and content) are supported" if item.type != "message" else "no role"
                raise APIError(400, f"input.{i}: {item.type!r} items are not supported ({why})", f"input.{i}")
            parts = (
                [InputPart(type="input_text", text=item.content or "")]
                if not isinstance(item.content, list)
                else item.content
            )
            for j, part in enumerate(parts):
                if part.type not in TEXT_PARTS or part.text is None:
                    why = "this model reads text only" if part.type in MEDIA else "send input_text parts"
                    raise APIError(
                        400,
                        f"input.{i}.content.{j}: {part.type!r} parts are not supported ({why})",
                        f"input.{i}.content.{j}",
                    )
            role = "system" if item.role == "developer" else item.role
            out.append({"role": role, "content": "".join(p.text for p in parts)})
        return out

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        return SamplingParams(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            max_tokens=max_tokens,
        )


# ================================================================================================= bodies
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


def message_item(item_id: str, text: str, status: str) -> dict:
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    return {"id": item_id, "type": "message", "role": "assistant", "status": status, "content": [part]}


def response_object(
    meta: dict, req: ResponsesRequest, output: list[dict], status: str, usage: dict | None, reason: str | None
) -> dict:
    """The `response` object. `meta`: id, created_at, model; `reason`: the finish reason when finished."""
    incomplete = {"reason": "max_output_tokens"} if reason == "length" else None
    return {
        **meta,
        "object": "response",
        "status": "incomplete" if incomplete else status,
        "error": None,
        "incomplete_details": incomplete,
        "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens,
        "metadata": req.metadata or {},
        "output": output,
        "parallel_tool_calls": False,
        "previous_response_id": None,
        "reasoning": {"effort": req.reasoning.effort if req.reasoning else None, "summary": None},
        "store": False,
        "temperature": 1.0 if req.temperature is None else req.temperature,
        "text": {"format": req.format or {"type": "text"}},
        "tool_choice": "none",
        "tools": [],
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


def response_body(meta: dict, req: ResponsesRequest, c: Choice, prompt_tokens: int, think_end_id: int | None) -> dict:
    status = "incomplete" if c.finish_reason == "length" else "completed"
    output = []
    if c.splitter is not None:
        reasoning, content = split_reasoning(c.text, c.splitter.starts_in_think)
        if reasoning is not None:
            output.append(reasoning_item(_item_id("rs"), reasoning, status))
    else:
        content = c.text
    output.append(message_item(_item_id("msg"), content, status))
    usage = response_usage(prompt_tokens, c, reasoning_tokens(c, think_end_id))
    return response_object(meta, req, output, "completed", usage, c.finish_reason)


def response_meta(model: str) -> dict:
    return {"id": _item_id("resp"), "created_at": int(time.time()), "model": model}


# ================================================================================================= stream
class _Events:
    """Numbered `event:`/`data:` pairs; tracks the open output item so deltas land in it."""

    def __init__(self) -> None:
        self.n, self.output, self.open = 0, [], None  # open: (kind, item id, text so far)

    def __call__(self, kind: str, **fields) -> bytes:
        event = {"type": kind, "sequence_number": self.n, **fields}
        self.n += 1
        return f"event: {kind}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n".encode()

    def start(self, kind: str) -> list[bytes]:
        item_id = _item_id("rs" if kind == "reasoning" else "msg")
        self.open = (kind, item_id, "")
        make = reasoning_item if kind == "reasoning" else message_item
        item = make(item_id, "", "in_progress")
        part, item["content"] = item["content"][0], []  # parts are announced by their own event
        at = {"output_index": len(self.output), "item_id": item_id, "content_index": 0}
        return [
            self("response.output_item.added", output_index=len(self.output), item=item),
            self("response.content_part.added", **at, part=part),
        ]

    def delta(self, kind: str, text: str) -> list[bytes]:
        out = [] if self.open and self.open[0] == kind else [*self.close("completed"), *self.start(kind)]
        _, item_id, so_far = self.open
        self.open = (kind, item_id, so_far + text)
        at = {"output_index": len(self.output), "item_id": item_id, "content_index": 0}
        if kind == "reasoning":
            return [*out, self("response.reasoning_text.delta", **at, delta=text)]
        return [*out, self("response.output_text.delta", **at, delta=text, logprobs=[])]

    def close(self, status: str) -> list[bytes]:
        if self.open is None:
            return []
        kind, item_id, text = self.open
        at = {"output_index": len(self.output), "item_id": item_id, "content_index": 0}
        item = (reasoning_item if kind == "reasoning" else message_item)(item_id, text, status)
        if kind == "reasoning":
            done = self("response.reasoning_text.done", **at, text=text)
        else:
            done = self("response.output_text.done", **at, text=text, logprobs=[])
        events = [done, self("response.content_part.done", **at, part=item["content"][0])]
        events.append(self("response.output_item.done", output_index=len(self.output), item=item))
        self.output.append(item)
        self.open = None
        return events


async def response_events(
    meta: dict,
    req: ResponsesRequest,
    c: Choice,
    prompt_tokens: int,
    think_end_id: int | None,
    updates: AsyncIterator[tuple[int, Update]],
    timing: Timing,
) -> AsyncIterator[bytes]:
    """The Responses event stream: created, in_progress, each item's added / delta / done events, then completed
    (incomplete when max_output_tokens cut it); a failed generation ends with an `error` event."""
    ev = _Events()
    yield ev("response.created", response=response_object(meta, req, [], "in_progress", None, None))
    yield ev("response.in_progress", response=response_object(meta, req, [], "in_progress", None, None))
    async for _, up in updates:
        text = c.advance(up)
        timing.on_update(up)
        if c.finish_reason == "error":
            yield ev("error", message=c.error or "generation failed", code="server_error", param=None)
            return
        final = c.finish_reason is not None
        reasoning, content = c.splitter.feed(text, final=final) if c.splitter is not None else ("", text)
        for kind, piece in (("reasoning", reasoning), ("message", content)):
            if piece:
                for event in ev.delta(kind, piece):
                    yield event
    timing.on_finish([c.finished()])
    status = "incomplete" if c.finish_reason == "length" else "completed"
    if ev.open is None or ev.open[0] != "message":  # a reply that only thought still gets its (empty) message
        for event in [*ev.close(status), *ev.start("message")]:
            yield event
    for event in ev.close(status):
        yield event
    usage = response_usage(prompt_tokens, c, reasoning_tokens(c, think_end_id))
    body = response_object(meta, req, ev.output, "completed", usage, c.finish_reason)
    yield ev("response.incomplete" if status == "incomplete" else "response.completed", response=body)
