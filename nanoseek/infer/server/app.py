"""`nanoseek serve`: an OpenAI-compatible HTTP server on the Engine (FastAPI + uvicorn).

Endpoints: `GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions`, `GET /health`, `GET /metrics`
(Prometheus, vLLM's names) and a chat page at `/`. One `EngineLoop` thread runs continuous batching for every
request; handlers only validate, tokenize, submit, and turn the loop's updates into OpenAI responses or
server-sent events. The thinking part of `<think>` models goes to `reasoning_content` (DeepSeek's API, SGLang)
and `reasoning` (vLLM), never to `content`. A client that disconnects has its sequences aborted at once.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from nanoseek.infer.engine import Engine
from nanoseek.infer.engine_loop import EngineLoop, QueueFull, Update
from nanoseek.infer.reasoning import ReasoningSplitter, partial_suffix, prompt_opens_think, split_reasoning
from nanoseek.infer.sampling import SamplingParams
from nanoseek.infer.server.metrics import ServerMetrics
from nanoseek.infer.server.openai import APIError, ChatRequest, CompletionRequest, parse_body, validate

STATIC = Path(__file__).parent / "static"
MAX_PROMPTS = 64  # prompts in one /v1/completions request


@dataclass
class Choice:
    """One sequence of a request, as the client sees it: text released so far, reasoning split, counts."""

    index: int
    splitter: ReasoningSplitter | None
    stops: list[str]
    shown: int = 0  # characters of the completion released to the client
    tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None
    text: str = ""
    logprobs: list = field(default_factory=list)  # per token: (id, logprob, {id: logprob})

    def advance(self, up: Update) -> str:
        """Record an update; return the newly released text. Text that may still become a stop string, or is
        half a multi-byte character, is held back until the next update decides it."""
        self.tokens += len(up.token_ids)
        tops = up.top_logprobs or [{}] * len(up.token_ids)
        self.logprobs += list(zip(up.token_ids, up.logprobs, tops))
        self.finish_reason, self.error = up.finish_reason, up.error
        if up.finish_reason in ("abort", "error"):
            return ""
        text, cut = up.text, len(up.text)
        if up.finish_reason is None:
            cut -= max((partial_suffix(text, s) for s in self.stops), default=0)
            while cut > self.shown and text[cut - 1] == "\ufffd":
                cut -= 1
        new = text[self.shown : cut] if cut > self.shown else ""
        self.shown, self.text = max(self.shown, cut), text[: max(self.shown, cut)]
        return new


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
        if self.pending:
            self.server.loop.abort(list(self.pending))
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

    # ------------------------------------------------------------------------------ helpers
    def _on_step(self, loop: EngineLoop) -> None:
        self.metrics.update_load(len(self.engine.running), loop.waiting, self.engine.cache.n_slots)

    def check_auth(self, request) -> None:
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

    async def read_body(self, request) -> dict:
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

    def max_tokens(self, asked: int | None, prompt_len: int) -> int:
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
                f"max_tokens can be at most {room}, got {asked}",
                "max_tokens",
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

    def token_text(self, i: int) -> tuple[str, list[int]]:
        b = self.tok.token_bytes(i)
        return b.decode("utf-8", errors="replace"), list(b)


class Timing:
    """Per-request latency metrics: time to first token, inter-token latency, queue time, end to end."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.m, self.start, self.last = metrics, time.perf_counter(), None

    def on_update(self, up: Update) -> None:
        m, now, n = self.m, time.perf_counter(), len(up.token_ids)
        if up.queue_time is not None:
            m.of(m.queue_time).observe(up.queue_time)
        if not n:
            return
        m.of(m.generation_tokens).inc(n)
        if self.last is None:
            m.of(m.ttft).observe(now - self.start)
            gaps, gap = n - 1, 0.0  # tokens that came with the first (an accepted MTP draft)
        else:
            gaps, gap = n, (now - self.last) / n
        for _ in range(gaps):
            m.of(m.itl).observe(gap)
        self.last = now

    def on_finish(self, choices: list[Choice]) -> None:
        m = self.m
        m.of(m.e2e).observe(time.perf_counter() - self.start)
        for c in choices:
            if c.finish_reason in ("stop", "length"):
                m.success.labels(model_name=m.model_name, finished_reason=c.finish_reason).inc()
            m.of(m.request_generation).observe(c.tokens)


# ================================================================================================ responses
def _usage(prompt_tokens: int, choices: list[Choice]) -> dict:
    completion = sum(c.tokens for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def _chat_logprobs(server: Server, entries: list) -> dict:
    content = []
    for tid, lp, top in entries:
        text, b = server.token_text(tid)
        alts = [dict(zip(("token", "bytes"), server.token_text(t)), logprob=v) for t, v in top.items()]
        content.append({"token": text, "logprob": lp, "bytes": b, "top_logprobs": alts})
    return {"content": content}


def _completion_logprobs(server: Server, entries: list, offset: int) -> dict:
    tokens, lps, tops, offsets = [], [], [], []
    for tid, lp, top in entries:
        text = server.token_text(tid)[0]
        tokens.append(text)
        lps.append(lp)
        tops.append({server.token_text(t)[0]: v for t, v in top.items()})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def _sse(obj: dict | str) -> bytes:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n".encode()


async def _collect(job: Job, choices: list[Choice], timing: Timing, request) -> None:
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
    timing.on_finish(choices)


def _event_stream(stream: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


# ================================================================================================== the app
def build_app(server: Server) -> FastAPI:
    app = FastAPI(title="nanoseek", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        headers = {"Retry-After": "1"} if e.status == 429 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, e: HTTPException):
        message = f"no route {request.method} {request.url.path}" if e.status_code in (404, 405) else str(e.detail)
        return JSONResponse(APIError(e.status_code, message).body(), status_code=e.status_code)

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
        timing = Timing(server.metrics)  # from arrival: time to first token includes validation and queueing
        server.check_auth(request)
        req: ChatRequest = validate(ChatRequest, await server.read_body(request))
        server.check_model(req.model)
        messages = []
        for m in req.messages:
            role = "system" if m.role == "developer" else m.role
            messages.append({"role": role, "content": m.text()})
        if all(m["role"] == "system" for m in messages):
            raise APIError(400, "messages has no user or assistant turn: add a user message", "messages")
        try:
            prompt_text = server.tok.apply_chat_template(messages, add_generation_prompt=True)
        except ValueError as e:
            raise APIError(400, f"messages cannot be rendered: {e}", "messages") from None
        ids = server.tok.encode(prompt_text)
        if req.top_logprobs and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        n_tokens = server.max_tokens(asked, len(ids))
        top = req.top_logprobs or 0
        params = [req.sampling_params(n_tokens, i, top, bool(req.logprobs)) for i in range(req.n)]
        opens_think = prompt_opens_think(prompt_text)
        choices = [
            Choice(i, ReasoningSplitter(opens_think) if server.reasoning else None, params[i].stop)
            for i in range(req.n)
        ]
        job = server.start_job([ids] * req.n, params)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": server.model_name}
        if req.stream:
            stream = _stream_chat(server, job, choices, timing, meta, len(ids), req)
            return _event_stream(stream)
        await _collect(job, choices, timing, request)
        out = []
        for c in choices:
            if c.splitter is not None:
                reasoning, content = split_reasoning(c.text, opens_think)
            else:
                reasoning, content = None, c.text
            message = {"role": "assistant", "content": content if (content or reasoning is None) else None}
            if server.reasoning:
                message.update(reasoning_content=reasoning, reasoning=reasoning)
            out.append(
                {
                    "index": c.index,
                    "message": message,
                    "logprobs": _chat_logprobs(server, c.logprobs) if req.logprobs else None,
                    "finish_reason": c.finish_reason,
                }
            )
        body = {**meta, "object": "chat.completion", "choices": out, "usage": _usage(len(ids), choices)}
        return JSONResponse(body)

    @app.post("/v1/completions")
    async def completions(request: Request):
        timing = Timing(server.metrics)
        server.check_auth(request)
        req: CompletionRequest = validate(CompletionRequest, await server.read_body(request))
        server.check_model(req.model)
        p = req.prompt
        if isinstance(p, str):
            prompts = [p]
        elif isinstance(p[0], (str, list)):
            prompts = list(p)
        else:
            prompts = [p]
        if len(prompts) > MAX_PROMPTS:
            raise APIError(400, f"prompt: at most {MAX_PROMPTS} prompts per request, got {len(prompts)}", "prompt")
        V = server.engine.config.vocab_size
        ids_list = []
        for x in prompts:
            if isinstance(x, str):
                ids = server.tok.encode(x, bos=True)
            else:
                bad = [t for t in x if not 0 <= t < V]
                if bad:
                    raise APIError(400, f"prompt: token id {bad[0]} is outside the vocabulary [0, {V})", "prompt")
                ids = list(x)
            if len(ids) == 0:
                raise APIError(400, "prompt: empty prompt", "prompt")
            ids_list.append(ids)
        n_tokens = [server.max_tokens(req.max_tokens, len(ids)) for ids in ids_list]
        top = req.logprobs or 0
        want = req.logprobs is not None
        seqs, params = [], []
        for j, ids in enumerate(ids_list):
            for i in range(req.n):
                seqs.append(ids)
                params.append(req.sampling_params(n_tokens[j], i, top, want))
        bos = server.tok.bos_token
        echo = [x if isinstance(x, str) else server.tok.decode(x).removeprefix(bos) for x in prompts]
        echo = echo if req.echo else [""] * len(prompts)
        choices = [Choice(k, None, params[k].stop) for k in range(len(seqs))]
        job = server.start_job(seqs, params)
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": server.model_name}
        prompt_tokens = sum(len(ids) for ids in ids_list)
        if req.stream:
            stream = _stream_completion(server, job, choices, timing, meta, prompt_tokens, req, echo)
            return _event_stream(stream)
        await _collect(job, choices, timing, request)
        out = []
        for c in choices:
            head = echo[c.index // req.n]
            lp = _completion_logprobs(server, c.logprobs, len(head)) if want else None
            out.append({"index": c.index, "text": head + c.text, "logprobs": lp, "finish_reason": c.finish_reason})
        body = {**meta, "object": "text_completion", "choices": out, "usage": _usage(prompt_tokens, choices)}
        return JSONResponse(body)

    return app


async def _stream_chat(server, job, choices, timing, meta, prompt_tokens, req) -> AsyncIterator[bytes]:
    usage_field = {"usage": None} if req.include_usage else {}

    def chunk(index: int, delta: dict, finish: str | None = None, logprobs=None) -> bytes:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return _sse({**meta, "object": "chat.completion.chunk", "choices": [choice], **usage_field})

    try:
        for c in choices:
            yield chunk(c.index, {"role": "assistant", "content": ""})
        async for i, up in job.updates():
            c = choices[i]
            n_lp = len(c.logprobs)
            text = c.advance(up)
            timing.on_update(up)
            if c.finish_reason == "error":
                yield _sse(APIError(500, c.error or "generation failed").body())
                break
            delta = {}
            if c.splitter is not None:
                reasoning, content = c.splitter.feed(text, final=c.finish_reason is not None)
                if reasoning:
                    delta.update(reasoning_content=reasoning, reasoning=reasoning)
                if content:
                    delta["content"] = content
            elif text:
                delta["content"] = text
            logprobs = _chat_logprobs(server, c.logprobs[n_lp:]) if req.logprobs and len(c.logprobs) > n_lp else None
            if delta or logprobs:
                yield chunk(i, delta, logprobs=logprobs)
            if c.finish_reason is not None:
                yield chunk(i, {}, c.finish_reason)
        else:
            timing.on_finish(choices)
            if req.include_usage:
                yield _sse(
                    {**meta, "object": "chat.completion.chunk", "choices": [], "usage": _usage(prompt_tokens, choices)}
                )
        yield _sse("[DONE]")
    finally:
        job.close()


async def _stream_completion(server, job, choices, timing, meta, prompt_tokens, req, echo) -> AsyncIterator[bytes]:
    usage_field = {"usage": None} if req.include_usage else {}

    def chunk(index: int, text: str, finish: str | None = None, logprobs=None) -> bytes:
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
        return _sse({**meta, "object": "text_completion", "choices": [choice], **usage_field})

    try:
        for c in choices:
            if echo[c.index // req.n]:
                yield chunk(c.index, echo[c.index // req.n])
        async for i, up in job.updates():
            c = choices[i]
            n_lp, offset = len(c.logprobs), c.shown
            text = c.advance(up)
            timing.on_update(up)
            if c.finish_reason == "error":
                yield _sse(APIError(500, c.error or "generation failed").body())
                break
            want = req.logprobs is not None and len(c.logprobs) > n_lp
            logprobs = _completion_logprobs(server, c.logprobs[n_lp:], offset) if want else None
            if text or logprobs:
                yield chunk(i, text, logprobs=logprobs)
            if c.finish_reason is not None:
                yield chunk(i, "", c.finish_reason)
        else:
            timing.on_finish(choices)
            if req.include_usage:
                yield _sse(
                    {**meta, "object": "text_completion", "choices": [], "usage": _usage(prompt_tokens, choices)}
                )
        yield _sse("[DONE]")
    finally:
        job.close()


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



