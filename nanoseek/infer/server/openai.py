"""The OpenAI API as nanoseek speaks it: request bodies, the error envelope, responses and server-sent events.

Requests: unknown fields are ignored, as OpenAI does; a known field of the wrong type or out of range is an
`APIError` (400) that names the field. Types are strict: `"1"` is not a number and `true` is not an int.

Responses: each sequence of a request is a `Choice` fed the engine loop's updates; it becomes a chat message or a
completion's text (`chat_response`, `completion_response`), or a stream of chunks (`sse_events`; the two
endpoints' chunks differ only as their `StreamFormat` says). The thinking part of `<think>` models goes to
`reasoning_content` (DeepSeek's API, SGLang) and `reasoning` (vLLM), never to `content`. With `tools`, calls the
model writes become `message.tool_calls` / `delta.tool_calls` (nanoseek/infer/tools.py finds and checks them).
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from nanoseek.infer.engine_loop import Update
from nanoseek.infer.reasoning import ReasoningSplitter, partial_suffix, split_reasoning
from nanoseek.infer.sampling import MAX_TOP_LOGPROBS, SamplingParams
from nanoseek.infer.server.metrics import Timing
from nanoseek.infer.structured import StructuredOutputError, grammar_from_response_format
from nanoseek.infer.tools import ToolCallParser, schema_error, stream_fragments
from nanoseek.tokenizer import Tokenizer

MAX_N = 16  # choices per request
MAX_STOP = 16  # stop strings per request
MEDIA = ("image_url", "input_audio", "file", "input_image", "input_file")  # content parts we cannot read
TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # OpenAI's rule for function names
TOOL_SHAPE = '{"type": "function", "function": {"name": "...", "description": "...", "parameters": {JSON Schema}}}'
RESPONSES_TOOL_SHAPE = '{"type": "function", "name": "...", "description": "...", "parameters": {JSON Schema}}'


class APIError(Exception):
    """An error the client caused (or a refusal): becomes `{"error": {message, type, param, code}}`."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = self.TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        if self.status == 429:
            kind = "rate_limit_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False


class ContentPart(_Strict):
    """A part of a message's content; only text (and an assistant's refusal) can be read (`unsupported`)."""

    type: str
    text: str | None = None
    refusal: str | None = None


class FunctionCall(_Strict):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class MessageToolCall(_Strict):
    """A call an earlier assistant turn made (sent back in the history)."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    reasoning_content: str | None = None  # accepted on assistant turns; earlier reasoning is not re-sent
    reasoning: str | None = None
    tool_calls: list[MessageToolCall] | None = None  # assistant turns
    tool_call_id: str | None = None  # tool turns: the call this result answers

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text or p.refusal or "" for p in self.content)
        return self.content or ""

    def for_template(self) -> dict:
        """The message as the chat template reads it (`developer` is `system`)."""
        out = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


@dataclass
class ToolUse:
    """What a request's `tools`, `tool_choice` and `parallel_tool_calls` ask of one reply."""

    tools: list[dict]  # rendered into the prompt
    schemas: dict[str, dict | None]  # name -> parameters schema: what generated calls are checked against
    forced: str | None  # "required", a function name (tool_choice), or None ("auto")
    max_calls: int | None  # 1 with parallel_tool_calls false

    def parser(self, prefix: str = "") -> ToolCallParser:
        return ToolCallParser(self.schemas, self.max_calls, prefix)


Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]


class _Sampling(_Strict):
    model: str | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None  # -1 or 0 = off
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    seed: Annotated[int, Field(ge=-(2**63), lt=2**64)] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0, le=10.0)] | None = None
    ignore_eos: bool | None = False  # vLLM's extension: generate max_tokens whatever the model says
    stream: bool | None = False
    stream_options: StreamOptions | None = None

    def sampling_params(self, max_tokens: int, choice: int, top_logprobs: int, logprobs: bool) -> SamplingParams:
        """The engine's parameters for choice `choice` of this request (seeded choices differ by choice)."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        seed = None if self.seed is None else (self.seed + choice) % 2**63
        return SamplingParams(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=max(0, self.top_k or 0),
            min_p=self.min_p or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            frequency_penalty=self.frequency_penalty or 0.0,
            presence_penalty=self.presence_penalty or 0.0,
            seed=seed,
            logprobs=logprobs,
            top_logprobs=top_logprobs,
            max_tokens=max_tokens,
            stop=[s for s in stop if s],
            ignore_eos=bool(self.ignore_eos),
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class ChatRequest(_Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # passed to the template; {"thinking": false} skips thinking
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None  # "none": no thinking
    tools: Any = None  # checked by `tool_use`, whose 400s name the bad field and show the right shape
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    response_format: Any = None  # text, json_object or json_schema: checked and compiled by `grammar`

    @property
    def thinking(self) -> bool:
        """Whether the reply may think: off with reasoning_effort "none" or chat_template_kwargs thinking false
        (DeepSeek-V3.1's name; Qwen's `enable_thinking` too)."""
        kwargs = self.chat_template_kwargs or {}
        off = kwargs.get("thinking", kwargs.get("enable_thinking", True)) is False
        return not off and self.reasoning_effort != "none"

    def tool_use(self) -> ToolUse | None:
        """The request's tools, checked (a 400 names the field, the problem and the fix); None when the reply
        may not call tools: no tools, or `tool_choice: "none"`."""
        self._check_tool_turns()
        return tool_use(self.tools, self.tool_choice, self.parallel_tool_calls, flat=False)

    def _check_tool_turns(self) -> None:
        """Tool results answer calls, as OpenAI insists: each `tool` message follows an assistant turn with
        `tool_calls` (or another result) and names the call it answers."""
        for i, m in enumerate(self.messages):
            if m.role != "tool":
                continue
            before = self.messages[i - 1] if i else None
            if before is None or not (before.role == "tool" or (before.role == "assistant" and before.tool_calls)):
                raise APIError(
                    400,
                    f"messages.{i}: a 'tool' message must answer a preceding assistant message with 'tool_calls'",
                    f"messages.{i}",
                )
            if m.tool_call_id is None:
                raise APIError(
                    400,
                    f"messages.{i}.tool_call_id: a 'tool' message needs the id of the call it answers",
                    f"messages.{i}.tool_call_id",
                )

    def grammar(self) -> str | None:
        """The grammar `response_format` asks the reply to follow (None: free text); a 400 naming what is wrong."""
        try:
            return grammar_from_response_format(self.response_format)
        except StructuredOutputError as e:
            raise APIError(400, str(e), e.param) from None

    def unsupported(self) -> None:
        """A 400 naming the first field or content part this server cannot honour yet, as OpenAI names them."""
        for i, m in enumerate(self.messages):
            for j, part in enumerate(m.content if isinstance(m.content, list) else []):
                where, allowed = (
                    f"messages.{i}.content.{j}",
                    ("text", "refusal") if m.role == "assistant" else ("text",),
                )
                if part.type not in allowed:
                    why = "this model reads text only" if part.type in MEDIA else f"{m.role} messages take text parts"
                    raise APIError(400, f"{where}: {part.type!r} content parts are not supported ({why})", where)
                if getattr(part, part.type) is None:
                    raise APIError(400, f"{where}: a {part.type!r} part needs a string {part.type!r}", where)


def tool_use(tools: Any, choice: Any, parallel: bool | None, flat: bool) -> ToolUse | None:
    """`tools`, `tool_choice` and `parallel_tool_calls` checked and turned into a `ToolUse` (None when the reply may
    not call tools); a 400 names the bad field and shows the right shape. `flat`: the Responses API's shapes
    (`{"type": "function", "name": ...}`, `tool_choice: {"type": "function", "name": ...}`) instead of chat's,
    where the function sits under "function"; the prompt gets chat's shape either way."""
    shape = RESPONSES_TOOL_SHAPE if flat else TOOL_SHAPE
    if tools is None:
        if choice not in (None, "none", "auto"):
            raise APIError(400, "tool_choice: a tool must be called but no tools were sent; add tools", "tool_choice")
        return None
    if not isinstance(tools, list) or not tools:
        raise APIError(400, f"tools: must be a non-empty list of {shape}; or omit tools", "tools")
    schemas: dict[str, dict | None] = {}
    rendered = []
    for i, tool in enumerate(tools):
        name, params, fn = _tool_function(f"tools.{i}", tool, schemas, flat)
        schemas[name] = params
        rendered.append({"type": "function", "function": fn} if flat else tool)
    forced = None
    if isinstance(choice, dict):
        fn = choice if flat else choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if choice.get("type") != "function" or not isinstance(name, str):
            named = (
                '{"type": "function", "name": "..."}' if flat else '{"type": "function", "function": {"name": "..."}}'
            )
            raise APIError(400, f'tool_choice: must be "none", "auto", "required" or {named}', "tool_choice")
        if name not in schemas:
            raise APIError(
                400, f"tool_choice: no tool named {name!r} in tools (they are {sorted(schemas)})", "tool_choice"
            )
        forced = name
    elif choice == "required":
        forced = "required"
    elif choice not in (None, "auto", "none"):
        raise APIError(
            400,
            f'tool_choice: must be "none", "auto", "required" or a named function, got {json.dumps(choice)[:40]}',
            "tool_choice",
        )
    if choice == "none":
        return None
    return ToolUse(rendered, schemas, forced, 1 if parallel is False else None)


def _tool_function(where: str, tool, seen: dict, flat: bool) -> tuple[str, dict | None, dict]:
    """(name, parameters schema, the function as chat nests it) of one entry of `tools`, or a 400 naming what is
    wrong with it. `flat`: the Responses API's shape, the function's fields beside "type"."""
    fix = f"each tool is {RESPONSES_TOOL_SHAPE if flat else TOOL_SHAPE}"
    fn = tool if flat else (tool.get("function") if isinstance(tool, dict) else None)
    if not isinstance(tool, dict) or not isinstance(fn, dict):
        raise APIError(400, f"{where}: not a function tool; {fix}", where)
    if tool.get("type") != "function":
        raise APIError(
            400,
            f"{where}.type: only 'function' tools are supported, got {json.dumps(tool.get('type'))}",
            f"{where}.type",
        )
    at = where if flat else f"{where}.function"
    name = fn.get("name")
    if flat and name is None and isinstance(tool.get("function"), dict):  # chat's shape sent to /v1/responses
        raise APIError(400, f"{where}.name: Responses API tools are flat, {RESPONSES_TOOL_SHAPE}", f"{where}.name")
    if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
        raise APIError(
            400, f"{at}.name: must be 1-64 letters, digits, '_' or '-', got {json.dumps(name)[:80]}", f"{at}.name"
        )
    if name in seen:
        raise APIError(400, f"{at}.name: {name!r} is defined twice; give each tool its own name", f"{at}.name")
    if fn.get("description") is not None and not isinstance(fn["description"], str):
        raise APIError(400, f"{at}.description: must be a string", f"{at}.description")
    if fn.get("strict") is not None and not isinstance(fn["strict"], bool):
        raise APIError(400, f"{at}.strict: must be true or false", f"{at}.strict")
    params = fn.get("parameters")
    if params is not None and (not isinstance(params, dict) or params.get("type", "object") != "object"):
        raise APIError(
            400,
            f"{at}.parameters: must be a JSON Schema object, e.g. "
            '{"type": "object", "properties": {...}, "required": [...]}',
            f"{at}.parameters",
        )
    if params is not None and (why := schema_error(params)) is not None:
        raise APIError(400, f"{at}.parameters: not a valid JSON Schema ({why})", f"{at}.parameters")
    keep = ("name", "description", "parameters", "strict")
    return name, params, {k: fn[k] for k in keep if k in fn}


class CompletionRequest(_Sampling):
    prompt: (
        str
        | Annotated[list[str], Field(min_length=1)]
        | Annotated[list[int], Field(min_length=1)]
        | Annotated[list[Annotated[list[int], Field(min_length=1)]], Field(min_length=1)]
    )
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    echo: bool | None = False


def parse_body(raw: bytes) -> dict:
    """The request's JSON object; 400 for anything else (bad JSON, invalid UTF-8, too deep, not an object)."""
    try:
        body = json.loads(raw.decode("utf-8"))
        json.dumps(body, ensure_ascii=False).encode("utf-8")  # lone surrogates ("\ud800") cannot be text
    except RecursionError:
        raise APIError(400, "request body is nested too deeply") from None
    except UnicodeError as e:
        raise APIError(400, f"request body is not valid UTF-8 text ({e.reason})") from None
    except ValueError as e:
        raise APIError(400, f"request body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise APIError(400, f"request body must be a JSON object, got {type(body).__name__}")
    return body


def validate(model: type[_Strict], body: dict) -> _Strict:
    """`model(**body)`, or a 400 naming the first bad field."""
    try:
        return model.model_validate(body)
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        loc = [str(x) for x in first["loc"] if not _is_union_branch(x)]
        param = ".".join(loc) or None
        value = first.get("input")
        shown = json.dumps(value)[:80] if isinstance(value, (int, float, str, bool)) or value is None else None
        got = f", got {shown}" if shown is not None and first["type"] != "missing" else ""
        raise APIError(400, f"{param or 'body'}: {first['msg']}{got}", param=param) from None
    except RecursionError:
        raise APIError(400, "request body is nested too deeply") from None


def _is_union_branch(part) -> bool:
    """Pydantic names union branches in error locations (`str`, `list[str]`, ...); the client's field does not."""
    return isinstance(part, str) and (
        part in ("str", "int", "float", "bool") or "[" in part or part.startswith("function")
    )


# ================================================================================================ responses
@dataclass
class Choice:
    """One sequence of a request, as the client sees it: text released so far, reasoning split, counts."""

    index: int
    splitter: ReasoningSplitter | None  # chat replies of a `<think>` model
    stops: list[str]
    shown: int = 0  # characters of the completion released to the client
    tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None
    text: str = ""
    logprobs: list = field(default_factory=list)  # per token: (id, logprob, {id: logprob})
    ids: list[int] = field(default_factory=list)  # the tokens generated
    cached_tokens: int = 0  # of its prompt, from the prefix cache
    tools: ToolCallParser | None = None  # finds tool calls in the text (chat requests with tools)

    def advance(self, up: Update) -> str:
        """Record an update; return the newly released text. Text that may still become a stop string is held
        back until the next update decides it (the engine's text never ends in half a character)."""
        self.tokens += len(up.token_ids)
        self.ids += up.token_ids
        self.cached_tokens += up.cached_tokens
        tops = up.top_logprobs or [{}] * len(up.token_ids)
        self.logprobs += list(zip(up.token_ids, up.logprobs, tops))
        self.finish_reason, self.error = up.finish_reason, up.error
        if up.finish_reason in ("abort", "error"):
            return ""
        text, cut = up.text, len(up.text)
        if up.finish_reason is None:
            cut -= max((partial_suffix(text, s) for s in self.stops), default=0)
        new = text[self.shown : cut] if cut > self.shown else ""
        self.shown, self.text = max(self.shown, cut), text[: max(self.shown, cut)]
        return new

    @property
    def reason(self) -> str | None:
        """The finish reason the client sees: "tool_calls" when the model stopped after calling tools."""
        if self.finish_reason == "stop" and self.tools is not None and self.tools.calls:
            return "tool_calls"
        return self.finish_reason

    def finished(self) -> tuple[str | None, int]:
        """(finish reason, tokens generated): what the request metrics record."""
        return self.finish_reason, self.tokens


def token_text(tok: Tokenizer, i: int) -> tuple[str, list[int]]:
    """A token as logprobs show it: its text (lossy for part of a character) and its bytes."""
    b = tok.token_bytes(i)
    return b.decode("utf-8", errors="replace"), list(b)


def usage(prompt_tokens: int, choices: list[Choice]) -> dict:
    """Token counts; `prompt_tokens_details.cached_tokens`: prompt tokens the prefix cache served (OpenAI's name)."""
    completion, cached = sum(c.tokens for c in choices), sum(c.cached_tokens for c in choices)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def chat_logprobs(tok: Tokenizer, entries: list) -> dict:
    content = []
    for tid, lp, top in entries:
        text, b = token_text(tok, tid)
        alts = [dict(zip(("token", "bytes"), token_text(tok, t)), logprob=v) for t, v in top.items()]
        content.append({"token": text, "logprob": lp, "bytes": b, "top_logprobs": alts})
    return {"content": content, "refusal": None}  # the spec requires `refusal` beside `content` (nullable)


def completion_logprobs(tok: Tokenizer, entries: list, offset: int) -> dict:
    tokens, lps, tops, offsets = [], [], [], []
    for tid, lp, top in entries:
        text = token_text(tok, tid)[0]
        tokens.append(text)
        lps.append(lp)
        tops.append({token_text(tok, t)[0]: v for t, v in top.items()})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def chat_response(meta: dict, choices: list[Choice], prompt_tokens: int, tok: Tokenizer, logprobs: bool) -> dict:
    """The `chat.completion` body. `meta`: id, created, model."""
    out = []
    for c in choices:
        text = c.tools.feed(c.text, final=True)[0] if c.tools is not None else c.text
        opens_think = c.splitter is not None and c.splitter.starts_in_think
        reasoning, content = split_reasoning(text, opens_think) if c.splitter is not None else (None, text)
        shown = content if (content or (reasoning is None and not (c.tools and c.tools.calls))) else None
        message = {"role": "assistant", "content": shown, "refusal": None}
        if c.splitter is not None:
            message.update(reasoning_content=reasoning, reasoning=reasoning)
        if c.tools is not None and c.tools.calls:
            message["tool_calls"] = [call.message() for call in c.tools.calls]
        lp = chat_logprobs(tok, c.logprobs) if logprobs else None
        out.append({"index": c.index, "message": message, "logprobs": lp, "finish_reason": c.reason})
    return {**meta, "object": "chat.completion", "choices": out, "usage": usage(prompt_tokens, choices)}


def completion_response(
    meta: dict, choices: list[Choice], prompt_tokens: int, tok: Tokenizer, echo: list[str], logprobs: bool
) -> dict:
    """The `text_completion` body; echo[k]: the text choice k starts with (its prompt, or "")."""
    out = []
    for c in choices:
        lp = completion_logprobs(tok, c.logprobs, len(echo[c.index])) if logprobs else None
        out.append({"index": c.index, "text": echo[c.index] + c.text, "logprobs": lp, "finish_reason": c.finish_reason})
    return {**meta, "object": "text_completion", "choices": out, "usage": usage(prompt_tokens, choices)}


# ================================================================================================== streams
@dataclass
class StreamFormat:
    """What tells the chat stream from the completions stream: the chunk object, and each choice's payloads
    (`{"delta": ...}` or `{"text": ...}`, then `"logprobs"`)."""

    object: str  # "chat.completion.chunk" or "text_completion"
    meta: dict  # id, created, model
    prompt_tokens: int
    include_usage: bool
    opening: Callable[[Choice], dict | None]  # the chunk each choice starts with, if any
    piece: Callable[[Choice, str, list, int], list[dict]]  # (choice, new text, new logprob entries, text offset)
    closing: dict  # the payload of the chunk that carries the finish reason


def chat_stream(meta: dict, prompt_tokens: int, req: ChatRequest, tok: Tokenizer) -> StreamFormat:
    """Chat chunks: the role first, then deltas with the reasoning split from the content, and each tool call
    as `delta.tool_calls` fragments once it is complete and checked."""

    def piece(c: Choice, text: str, entries: list, offset: int) -> list[dict]:
        final, delta, calls = c.finish_reason is not None, {}, []
        if c.tools is not None:
            text, calls = c.tools.feed(text, final)
        if c.splitter is not None:
            reasoning, content = c.splitter.feed(text, final)
            if reasoning:
                delta.update(reasoning_content=reasoning, reasoning=reasoning)
            if content:
                delta["content"] = content
        elif text:
            delta["content"] = text
        lp = chat_logprobs(tok, entries) if req.logprobs and entries else None
        out = [{"delta": delta, "logprobs": lp}] if delta or lp else []
        first = len(c.tools.calls) - len(calls) if calls else 0
        for k, call in enumerate(calls):
            out += [{"delta": {"tool_calls": [f]}, "logprobs": None} for f in stream_fragments(first + k, call)]
        return out

    role = {"delta": {"role": "assistant", "content": ""}, "logprobs": None}
    return StreamFormat(
        object="chat.completion.chunk",
        meta=meta,
        prompt_tokens=prompt_tokens,
        include_usage=req.include_usage,
        opening=lambda c: role,
        piece=piece,
        closing={"delta": {}, "logprobs": None},
    )


def completion_stream(
    meta: dict, prompt_tokens: int, req: CompletionRequest, tok: Tokenizer, echo: list[str]
) -> StreamFormat:
    """Completion chunks: the echoed prompt first (when asked), then text."""

    def piece(c: Choice, text: str, entries: list, offset: int) -> list[dict]:
        lp = completion_logprobs(tok, entries, offset) if req.logprobs is not None and entries else None
        return [{"text": text, "logprobs": lp}] if text or lp else []

    def opening(c: Choice) -> dict | None:
        return {"text": echo[c.index], "logprobs": None} if echo[c.index] else None

    return StreamFormat(
        object="text_completion",
        meta=meta,
        prompt_tokens=prompt_tokens,
        include_usage=req.include_usage,
        opening=opening,
        piece=piece,
        closing={"text": "", "logprobs": None},
    )


def sse(obj: dict | str) -> bytes:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n".encode()


async def sse_events(
    fmt: StreamFormat, choices: list[Choice], updates: AsyncIterator[tuple[int, Update]], timing: Timing
) -> AsyncIterator[bytes]:
    """The server-sent events of a streaming request: a chunk per choice and update with something new, a
    closing chunk per choice, the usage chunk when asked, `[DONE]`. A failed generation ends the stream with an
    error event (the 200 status is already sent)."""
    usage_field = {"usage": None} if fmt.include_usage else {}

    def chunk(index: int, payload: dict, finish: str | None = None) -> bytes:
        choice = {"index": index, **payload, "finish_reason": finish}
        return sse({**fmt.meta, "object": fmt.object, "choices": [choice], **usage_field})

    for c in choices:
        if (payload := fmt.opening(c)) is not None:
            yield chunk(c.index, payload)
    async for i, up in updates:
        c = choices[i]
        n_lp, offset = len(c.logprobs), c.shown
        text = c.advance(up)
        timing.on_update(up)
        if c.finish_reason == "error":
            yield sse(APIError(500, c.error or "generation failed").body())
            break
        for payload in fmt.piece(c, text, c.logprobs[n_lp:], offset):
            yield chunk(i, payload)
        if c.finish_reason is not None:
            yield chunk(i, fmt.closing, c.reason)
    else:
        timing.on_finish([c.finished() for c in choices])
        if fmt.include_usage:
            yield sse({**fmt.meta, "object": fmt.object, "choices": [], "usage": usage(fmt.prompt_tokens, choices)})
    yield sse("[DONE]")
