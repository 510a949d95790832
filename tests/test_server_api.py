"""`nanoseek serve` against the `openai` package's own types and OpenAI's answers to what it does not serve:
every body and stream event validated (helpers/shapes.py), unsupported fields named in 400s, the OpenAPI
document, thinking control, the Responses API and prefix caching."""

from __future__ import annotations

import httpx
import pytest
from helpers.shapes import CheckedTransport, check
from pydantic import ValidationError
from serve_util import ServeProcess, checked_client

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def server(memorised_dir):
    with ServeProcess(memorised_dir, "--max-batch", "8") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return checked_client(server.base_url)


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    check(response.request.url.path, status, response.json())
    return response.json()["error"]


# ------------------------------------------------------------------------------------------- response shapes
def test_every_body_and_event_matches_the_openai_types(client):
    transport: CheckedTransport = client._client._transport
    before = transport.checked
    chat = dict(model="tiny-r1", messages=[{"role": "user", "content": "What is 2+3?"}], max_tokens=12)
    r = client.chat.completions.create(**chat, n=2, logprobs=True, top_logprobs=2)
    assert r.choices[0].message.refusal is None and r.choices[0].logprobs.refusal is None
    chunks = list(
        client.chat.completions.create(
            **chat, stream=True, logprobs=True, top_logprobs=1, stream_options={"include_usage": True}
        )
    )
    assert chunks[-1].usage is not None
    client.completions.create(model="tiny-r1", prompt=["hello", "the"], n=2, max_tokens=4, logprobs=2, echo=True)
    list(client.completions.create(model="tiny-r1", prompt="hello", max_tokens=4, logprobs=1, stream=True))
    client.models.list()
    assert transport.checked - before >= 5 + len(chunks)


def test_the_checker_fails_a_message_without_refusal():
    body = {
        "id": "x",
        "object": "chat.completion",
        "created": 0,
        "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
    }
    with pytest.raises(AssertionError, match="refusal"):
        check("/v1/chat/completions", 200, body)
    with pytest.raises(ValidationError):
        check("/v1/chat/completions", 200, {**body, "choices": [{"index": 0, "message": {}}]})
