"""`nanoseek serve`: an OpenAI-compatible HTTP server on the Engine (FastAPI + uvicorn). This file is its routes.

Endpoints: `GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions`, `POST /v1/responses`,
`GET /health`, `GET /metrics` (Prometheus, vLLM's names), `GET /openapi.json` and a chat page at `/`. One `EngineLoop` thread runs continuous batching for every
request; handlers only validate, tokenize, submit, and hand the loop's updates to `openai.py`, which shapes them
into OpenAI responses or server-sent events. A client that disconnects has its sequences aborted at once.
"""

from __future__ import annotations

import asyncio
import hmac
import importlib.metadata
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from nanoseek.infer.engine import Engine
from nanoseek.infer.engine_loop import EngineLoop, QueueFull, Update
from nanoseek.infer.reasoning import ReasoningSplitter, close_think, prompt_opens_think
from nanoseek.infer.sampling import SamplingParams
from nanoseek.infer.server.metrics import ServerMetrics, Timing
from nanoseek.infer.server.openai import (
    APIError,
    ChatRequest,
    Choice,
    CompletionRequest,
    ToolUse,
    chat_response,
    chat_stream,
    completion_response,
    completion_stream,
    parse_body,
    sse_events,
    validate,
)
from nanoseek.infer.server.responses import (
    Reply,
    ResponsesRequest,
    TextTokens,
    response_body,
    response_events,
    response_meta,
)
from nanoseek.infer.tools import call_style, prefill

STATIC = Path(__file__).parent / "static"
REQUEST_BODIES = {
    "/v1/chat/completions": ChatRequest,
    "/v1/completions": CompletionRequest,
    "/v1/responses": ResponsesRequest,
}
MAX_PROMPTS = 64  # prompts in one /v1/completions request


class Job:
    """A request's sequences in the engine loop: updates arrive on an asyncio queue; `close` aborts leftovers."""

    def __init__(self, server: Server, prompts: list[list[int]], params: list[SamplingParams]) -> None:
        self.server, self.queue = server, asyncio.Queue()
        loop = asyncio.get_running_loop()
        self.keys = server.loop.submit(
            prompts, params, lambda k, u: loop.call_soon_threadsafe(self.queue.put_nowait, (k, u))
        )
        self.index = {k: i for i, k in enumerate(self.keys)}
        self.pending = set(self.keys)

    async def updates(self, request=None) -> AsyncIterator[tuple[int, Update]]:
        """(choice index, update) until every sequence finished. With `request` (non-streaming requests), a client
        that disconnects ends it early: checked every half second. Streams need no check: Starlette cancels them."""
        next_check = time.monotonic() + 0.5
        while self.pending:
            if request is None:
                item = await self.queue.get()
            else:
                try:
                    item = await asyncio.wait_for(self.queue.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    item = None
                if time.monotonic() >= next_check:
                    next_check = time.monotonic() + 0.5
                    if await request.is_disconnected():
                        return
            if item is None:
                continue
            key, up = item
            if up.finish_reason is not None:
                self.pending.discard(key)
            yield self.index[key], up

    def close(self) -> None:
        """Abort what is still running (the client left, or the request failed); counted as `abort`."""
        if self.pending:
            self.server.loop.abort(list(self.pending))
            self.server.metrics.finished("abort", len(self.pending))
            self.pending.clear()


class Server:
    """The app's state: engine loop, tokenizer, metrics and settings. `app` is the ASGI application."""

    def __init__(
        self,
        engine: Engine,
        model_name: str,
        api_key: str | None = None,
        max_queue: int = 256,
        max_body_bytes: int = 2 * 2**20,
    ) -> None:
        if engine.tokenizer is None:
            raise ValueError("the server needs the model's tokenizer (tokenizer.json in the model directory)")
        self.engine, self.tok, self.model_name = engine, engine.tokenizer, model_name
        self.api_key, self.max_body_bytes = api_key, max_body_bytes
        self.created = int(time.time())
        self.metrics = ServerMetrics(model_name)
        self.loop = EngineLoop(engine, max_queue, on_step=self._on_step)
        self.reasoning = self.tok.think_end_id is not None
        self.context_limit = engine.max_len - (2 if engine.speculative else 1)  # prompt + output tokens
        self.app = build_app(self)

    def _on_step(self, loop: EngineLoop) -> None:
        self.metrics.update_load(len(self.engine.running), loop.waiting, self.engine.cache.n_slots)
        if (pc := self.engine.prefix_cache) is not None:
            self.metrics.update_prefix(pc.queries, pc.hits)

    def check_auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'", code="invalid_api_key")

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(
                404,
                f"model {name!r} does not exist; this server serves {self.model_name!r}",
                "model",
                "model_not_found",
            )

    async def read_body(self, request: Request) -> dict:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            raise APIError(413, f"request body is {length} bytes; the limit is {self.max_body_bytes}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise APIError(413, f"request body is over the {self.max_body_bytes}-byte limit")
            chunks.append(chunk)
        return parse_body(b"".join(chunks))

    def max_tokens(self, asked: int | None, prompt_len: int, name: str = "max_tokens") -> int:
        room = self.context_limit - prompt_len
        if room < 1:
            raise APIError(
                400,
                f"the prompt has {prompt_len} tokens but this model's context holds {self.engine.max_len} "
                f"(at most {self.context_limit - 1} prompt tokens, to leave room for one new token): shorten it",
                "messages",
                "context_length_exceeded",
            )
        if asked is not None and asked > room:
            raise APIError(
                400,
                f"this model's context holds {self.engine.max_len} tokens: the prompt has {prompt_len}, so "
                f"{name} can be at most {room}, got {asked}",
                name,
                "context_length_exceeded",
            )
        return asked or room

    def start_job(self, prompts: list[list[int]], params: list[SamplingParams]) -> Job:
        if self.loop.error is not None:
            raise APIError(503, f"the engine stopped: {self.loop.error!r}; restart the server")
        try:
            job = Job(self, prompts, params)
        except QueueFull as e:
            raise APIError(429, f"the server is at capacity ({e}); retry later", code="queue_full") from None
        m = self.metrics
        m.of(m.prompt_tokens).inc(sum(len(p) for p in prompts))
        for p in prompts:
            m.of(m.request_prompt).observe(len(p))
        return job

    def chat_prompt(
        self, messages: list[dict], thinking: bool, kwargs: dict | None = None, tools: ToolUse | None = None
    ) -> tuple[str, list[int], str]:
        """Messages ({role, content, ...}) rendered by the chat template: (text, token ids, the prefill a forced
        tool call opens the reply with). With thinking off the prompt ends in a closed, empty think block,
        whatever the template knows of the switch."""
        if all(m["role"] == "system" for m in messages):
            raise APIError(400, "messages has no user or assistant turn: add a user message", "messages")
        kwargs = {**(kwargs or {}), "thinking": thinking}
        kwargs.pop("enable_thinking", None)
        uses_tools = tools is not None or any(m.get("tool_calls") or m["role"] == "tool" for m in messages)
        if uses_tools and not self.tok.renders_tool_calls:
            raise APIError(
                400,
                "this model's chat template cannot render tool calls (it predates them): re-save the model's "
                "tokenizer with a current nanoseek, or send no tools",
                "tools",
            )
        if tools is not None and self.tok.renders_tools:
            kwargs["tools"] = tools.tools
        elif tools is not None:  # DeepSeek's own templates expect the tools at the end of the system prompt
            defs = self.tok.render_tools(tools.tools)
            last = max((i for i, m in enumerate(messages) if m["role"] == "system"), default=None)
            if last is None:
                messages = [{"role": "system", "content": defs}, *messages]
            else:
                system = {**messages[last], "content": f"{messages[last]['content']}\n\n{defs}"}
                messages = [*messages[:last], system, *messages[last + 1 :]]
        try:
            text = self.tok.apply_chat_template(messages, add_generation_prompt=True, **kwargs)
        except ValueError as e:
            raise APIError(400, f"messages cannot be rendered: {e}", "messages") from None
        except Exception as e:  # a template variable the client set broke the template
            raise APIError(400, f"the chat template fails with these kwargs: {e!r}", "chat_template_kwargs") from None
        if self.reasoning and not thinking:
            text = close_think(text)
        forced = ""
        if tools is not None and tools.forced is not None:
            name = None if tools.forced == "required" else tools.forced
            forced = prefill(call_style(self.tok.chat_template), name)
        return text + forced, self.tok.encode(text + forced), forced

    def completion_prompts(self, req: CompletionRequest) -> tuple[list[list[int]], list[str]]:
        """The request's prompts as token ids, and as the text an echo shows."""
        p = req.prompt
        prompts = list(p) if not isinstance(p, str) and isinstance(p[0], (str, list)) else [p]
        if len(prompts) > MAX_PROMPTS:
            raise APIError(400, f"prompt: at most {MAX_PROMPTS} prompts per request, got {len(prompts)}", "prompt")
        V, ids_list = self.engine.config.vocab_size, []
        for x in prompts:
            if isinstance(x, str):
                ids = self.tok.encode(x, bos=True)
            else:
                bad = [t for t in x if not 0 <= t < V]
                if bad:
                    raise APIError(400, f"prompt: token id {bad[0]} is outside the vocabulary [0, {V})", "prompt")
                ids = list(x)
            if len(ids) == 0:
                raise APIError(400, "prompt: empty prompt", "prompt")
            ids_list.append(ids)
        texts = [x if isinstance(x, str) else self.tok.decode(x).removeprefix(self.tok.bos_token) for x in prompts]
        return ids_list, texts


# ================================================================================================== handlers
async def _collect(job: Job, choices: list[Choice], timing: Timing, request: Request) -> None:
    """Run a non-streaming request to the end (or until its client leaves); 500 if generation failed."""
    try:
        async for i, up in job.updates(request):
            choices[i].advance(up)
            timing.on_update(up)
    finally:
        job.close()
    for c in choices:
        if c.finish_reason == "error":
            raise APIError(500, c.error or "generation failed")
    timing.on_finish([c.finished() for c in choices])


def _event_stream(job: Job, events: AsyncIterator[bytes]) -> StreamingResponse:
    """A server-sent events response; the job's sequences are aborted when it ends or its client leaves."""

    async def body() -> AsyncIterator[bytes]:
        try:
            async for event in events:
                yield event
        finally:
            job.close()

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _meta(prefix: str, server: Server) -> dict:
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": server.model_name}


async def chat_completions(server: Server, request: Request) -> Response:
    timing = Timing(server.metrics)  # from arrival: time to first token includes validation and queueing
    server.check_auth(request)
    req: ChatRequest = validate(ChatRequest, await server.read_body(request))
    server.check_model(req.model)
    req.unsupported()
    tools = req.tool_use()
    grammar = req.grammar()
    if tools is not None and grammar is not None:
        raise APIError(
            400, "response_format: a JSON reply and tool calls exclude each other; send one", "response_format"
        )
    messages = [m.for_template() for m in req.messages]
    prompt_text, ids, forced = server.chat_prompt(messages, req.thinking, req.chat_template_kwargs, tools)
    if req.top_logprobs and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    n_tokens = server.max_tokens(asked, len(ids))
    params = [req.sampling_params(n_tokens, i, req.top_logprobs or 0, bool(req.logprobs)) for i in range(req.n)]
    params = [replace(p, grammar=grammar) for p in params]
    opens_think, split = prompt_opens_think(prompt_text), server.reasoning and req.thinking
    choices = [Choice(i, ReasoningSplitter(opens_think) if split else None, params[i].stop) for i in range(req.n)]
    for c in choices if tools is not None else []:
        c.tools = tools.parser(prefix=forced)
    job = server.start_job([ids] * req.n, params)
    meta = _meta("chatcmpl", server)
    if req.stream:
        fmt = chat_stream(meta, len(ids), req, server.tok)
        return _event_stream(job, sse_events(fmt, choices, job.updates(), timing))
    await _collect(job, choices, timing, request)
    return JSONResponse(chat_response(meta, choices, len(ids), server.tok, bool(req.logprobs)))


async def completions(server: Server, request: Request) -> Response:
    timing = Timing(server.metrics)
    server.check_auth(request)
    req: CompletionRequest = validate(CompletionRequest, await server.read_body(request))
    server.check_model(req.model)
    ids_list, texts = server.completion_prompts(req)
    n_tokens = [server.max_tokens(req.max_tokens, len(ids)) for ids in ids_list]
    want = req.logprobs is not None
    prompts = [ids for ids in ids_list for _ in range(req.n)]  # choice k answers prompt k // n
    params = [
        req.sampling_params(n_tokens[k // req.n], k % req.n, req.logprobs or 0, want) for k in range(len(prompts))
    ]
    echo = [texts[k // req.n] if req.echo else "" for k in range(len(prompts))]
    choices = [Choice(k, None, params[k].stop) for k in range(len(prompts))]
    job = server.start_job(prompts, params)
    meta, prompt_tokens = _meta("cmpl", server), sum(len(ids) for ids in ids_list)
    if req.stream:
        fmt = completion_stream(meta, prompt_tokens, req, server.tok, echo)
        return _event_stream(job, sse_events(fmt, choices, job.updates(), timing))
    await _collect(job, choices, timing, request)
    return JSONResponse(completion_response(meta, choices, prompt_tokens, server.tok, echo, want))


async def responses(server: Server, request: Request) -> Response:
    """`POST /v1/responses`: one reply to `instructions` + `input`, as a `response` object or its event stream;
    tools, calls and logprobs go through the chat path's code."""
    timing = Timing(server.metrics)
    server.check_auth(request)
    req: ResponsesRequest = validate(ResponsesRequest, await server.read_body(request))
    server.check_model(req.model)
    req.unsupported()
    tools = req.tool_use()
    grammar = req.grammar()
    if tools is not None and grammar is not None:
        raise APIError(400, "text.format: a JSON reply and tool calls exclude each other; send one", "text.format")
    prompt_text, ids, forced = server.chat_prompt(req.messages(), req.thinking, tools=tools)
    params = req.sampling_params(server.max_tokens(req.max_output_tokens, len(ids), "max_output_tokens"))
    params = replace(params, grammar=grammar)
    split, opens_think = server.reasoning and req.thinking, prompt_opens_think(prompt_text)
    choice = Choice(0, ReasoningSplitter(opens_think) if split else None, [])
    if tools is not None:
        choice.tools = tools.parser(prefix=forced)
    text_tokens = TextTokens(server.tok, split, split and opens_think, tools is not None, bool(forced))
    job = server.start_job([ids], [params])
    reply = Reply(response_meta(server.model_name), req, choice, len(ids), server.tok, text_tokens)
    if req.stream:
        return _event_stream(job, response_events(reply, job.updates(), timing))
    try:  # the stream's items, built the same way: both list text written after the calls as its own message
        body = await response_body(reply, job.updates(request), timing)
    finally:
        job.close()
    return JSONResponse(body)


# ==================================================================================================== routes
def build_app(server: Server) -> FastAPI:
    app = FastAPI(title="nanoseek", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        headers = {"Retry-After": "1"} if e.status == 429 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, e: HTTPException):
        message = f"no route {request.method} {request.url.path}" if e.status_code in (404, 405) else str(e.detail)
        if e.status_code == 405 and e.headers and "Allow" in e.headers:
            message += f": use {e.headers['Allow']}"
        return JSONResponse(APIError(e.status_code, message).body(), status_code=e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        return JSONResponse(APIError(500, f"internal error: {e!r}").body(), status_code=500)

    @app.get("/health")
    async def health():
        if server.loop.error is not None:
            raise APIError(503, f"the engine stopped: {server.loop.error!r}")
        if not server.loop.ready.is_set():
            raise APIError(503, "loading: the model is warming up")
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        server.metrics.update_load(len(server.engine.running), server.loop.waiting, server.engine.cache.n_slots)
        return Response(server.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi():
        return openapi_document(app)

    @app.get("/")
    async def page():
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    @app.get("/v1/models")
    async def models(request: Request):
        server.check_auth(request)
        card = {
            "id": server.model_name,
            "object": "model",
            "created": server.created,
            "owned_by": "nanoseek",
            "max_model_len": server.engine.max_len,
        }
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request):
        server.check_auth(request)
        server.check_model(name)
        return (await models(request))["data"][0]

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await chat_completions(server, request)

    @app.post("/v1/completions")
    async def complete(request: Request):
        return await completions(server, request)

    @app.post("/v1/responses")
    async def respond(request: Request):
        return await responses(server, request)

    return app


def openapi_document(app: FastAPI) -> dict:
    """The OpenAPI document, with the request bodies our handlers validate themselves (they read the raw body
    to answer in OpenAI's error envelope, so FastAPI cannot see them): for client generators and fuzzers."""
    if app.openapi_schema is None:
        try:
            version = importlib.metadata.version("nanoseek")
        except importlib.metadata.PackageNotFoundError:  # run from a checkout
            version = "0"
        doc = get_openapi(title="nanoseek", version=version, routes=app.routes, summary="OpenAI-compatible API")
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        for path, model in REQUEST_BODIES.items():
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(schema.pop("$defs", {}))
            schemas[model.__name__] = schema
            ref = {"$ref": f"#/components/schemas/{model.__name__}"}
            doc["paths"][path]["post"]["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": ref}},
            }
        app.openapi_schema = doc
    return app.openapi_schema


# ================================================================================================= start-up
def warm_up(engine: Engine) -> None:
    """Run the shapes the first requests will hit, so they do not pay for first calls (or, compiled, for
    compiling): batches of 1, 2, 4, ... up to the engine's slots, short prompts, a few dozen tokens."""
    sizes = [1]
    if engine.compiled:
        while sizes[-1] * 2 <= engine.cache.n_slots:
            sizes.append(sizes[-1] * 2)
    for n in sizes:
        engine.generate([[engine.config.bos_token_id or 0] * 4] * n, SamplingParams(temperature=0, max_tokens=20))
