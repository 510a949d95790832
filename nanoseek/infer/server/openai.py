"""The OpenAI API's request bodies (the fields nanoseek serves), validated strictly, and its error envelope.

Unknown fields are ignored, as OpenAI does; a known field of the wrong type or out of range is an `APIError`
(400) that names the field. Types are strict: `"1"` is not a number and `true` is not an int.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from nanoseek.infer.sampling import MAX_TOP_LOGPROBS, SamplingParams

MAX_N = 16  # choices per request
MAX_STOP = 16  # stop strings per request


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


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    reasoning_content: str | None = None  # accepted on assistant turns; earlier reasoning is not re-sent
    reasoning: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


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
