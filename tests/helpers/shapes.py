"""Every body and stream event the server sends, validated against the `openai` package's own types.

`CheckedTransport` sits under an `httpx.Client` (and so under `openai.OpenAI(http_client=...)`): it tees each
response's bytes and validates them as they arrive, so a shape drift fails the test that caused it, mid-stream too.
The SDK's types mark fields that OpenAI's OpenAPI spec requires (nullable) as optional; `REQUIRED_NULLABLE` names
the ones we must still send.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
from openai.types import Completion, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.responses import Response, ResponseStreamEvent
from openai.types.shared import ErrorObject
from pydantic import BaseModel, TypeAdapter

BODY = {
    "/v1/chat/completions": TypeAdapter(ChatCompletion),
    "/v1/completions": TypeAdapter(Completion),
    "/v1/responses": TypeAdapter(Response),
}
EVENT = {
    "/v1/chat/completions": TypeAdapter(ChatCompletionChunk),
    "/v1/completions": TypeAdapter(Completion),
    "/v1/responses": TypeAdapter(ResponseStreamEvent),
}
ERROR = TypeAdapter(ErrorObject)


class _ModelList(BaseModel):
    object: str
    data: list[Model]


def _required_nullable(path: str, obj: dict) -> None:
    """Fields the spec requires though they may be null: `message.refusal`, and `refusal` beside `content` in chat
    logprobs (the SDK's types would accept them missing)."""
    if path != "/v1/chat/completions":
        return
    for choice in obj.get("choices", []):
        if "message" in choice:
            assert "refusal" in choice["message"], f"message without refusal: {choice}"
        if choice.get("logprobs") is not None:
            assert "refusal" in choice["logprobs"], f"logprobs without refusal: {choice['logprobs']}"


def check(path: str, status: int, obj, stream: bool = False) -> None:
    """Validate one JSON body or event of `path` (raises AssertionError or pydantic's ValidationError)."""
    if status >= 400 or (isinstance(obj, dict) and set(obj) == {"error"}):
        assert isinstance(obj, dict) and set(obj) == {"error"}, obj
        ERROR.validate_python(obj["error"])
        return
    if path == "/v1/models":
        _ModelList.model_validate(obj)
        return
    adapter = EVENT if stream else BODY
    if stream and path == "/v1/completions":  # OpenAI's own streams send null until the last chunk; its type says
        obj = {**obj, "choices": [{**c, "finish_reason": c["finish_reason"] or "stop"} for c in obj["choices"]]}
    adapter[path].validate_python(obj)
    _required_nullable(path, obj)


class _Tee(httpx.SyncByteStream):
    """The response's bytes, passed on unchanged; validated body by body (JSON) or event by event (SSE)."""

    def __init__(self, inner: httpx.SyncByteStream, path: str, status: int, sse: bool, owner: CheckedTransport):
        self.inner, self.path, self.status, self.sse, self.owner = inner, path, status, sse, owner
        self.buf = b""

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.inner:
            self.buf += chunk
            if self.sse:
                self._events()
            yield chunk
        if not self.sse and self.path in (*BODY, "/v1/models") and self.buf:
            self.owner.validate(self.path, self.status, json.loads(self.buf), stream=False)

    def _events(self) -> None:
        while b"\n\n" in self.buf:
            event, self.buf = self.buf.split(b"\n\n", 1)
            data = [line[6:] for line in event.split(b"\n") if line.startswith(b"data: ")]
            if data and data[0] != b"[DONE]":
                self.owner.validate(self.path, self.status, json.loads(b"\n".join(data)), stream=True)

    def close(self) -> None:
        self.inner.close()


class CheckedTransport(httpx.BaseTransport):
    """An httpx transport that validates what the server answers; `checked` counts the objects validated."""

    def __init__(self) -> None:
        self.inner, self.checked = httpx.HTTPTransport(), 0

    def validate(self, path: str, status: int, obj, stream: bool) -> None:
        check(path, status, obj, stream)
        self.checked += 1

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        r = self.inner.handle_request(request)
        sse = r.headers.get("content-type", "").startswith("text/event-stream")
        stream = _Tee(r.stream, request.url.path, r.status_code, sse, self)
        return httpx.Response(r.status_code, headers=r.headers, stream=stream, extensions=r.extensions)

    def close(self) -> None:
        self.inner.close()
