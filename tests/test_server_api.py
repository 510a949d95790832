"""`nanoseek serve` against the `openai` package's own types and OpenAI's answers to what it does not serve:
every body and stream event validated (helpers/shapes.py), unsupported fields named in 400s, the OpenAPI
document, thinking control, the Responses API and prefix caching."""

from __future__ import annotations

import time

import httpx
import pytest
import torch
from helpers.shapes import CheckedTransport, check
from openai.types.responses import ResponseOutputText, ResponseTextDeltaEvent, ResponseTextDoneEvent
from pydantic import ValidationError
from serve_util import ServeProcess, checked_client

from nanoseek import Engine
from nanoseek.infer.prefix_cache import PrefixCache
from nanoseek.infer.reasoning import split_reasoning

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


# ------------------------------------------------------------------------------- what is not served, said so
UNIQUE = {"type": "array", "uniqueItems": True}  # a JSON Schema keyword constrained decoding cannot enforce


def test_unsupported_fields_and_parts_get_a_400_naming_them(server):
    url = server.base_url + "/chat/completions"
    ok = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    cases = [
        (
            {**ok, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": UNIQUE}}},
            "response_format.json_schema.schema",
        ),
        ({**ok, "messages": [{"role": "user", "content": [image]}]}, "messages.0.content.0"),
        ({**ok, "messages": [{"role": "user", "content": [{"type": "refusal", "refusal": "x"}]}]}, None),
    ]
    for body, param in cases:
        err = error_of(httpx.post(url, json=body, timeout=30), 400)
        assert err["param"] == (param or "messages.0.content.0") and "not supported" in err["message"], err
    assert "reads text only" in error_of(httpx.post(url, json=cases[1][0], timeout=30), 400)["message"]


def test_the_other_shapes_the_spec_allows_are_accepted(client):
    messages = [
        {"role": "developer", "content": ""},
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": "What is 2+3?", "name": "ann"},
        {"role": "assistant", "content": None, "refusal": None},
        {"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]},
        {"role": "user", "content": [{"type": "text", "text": "What is 2+3?"}]},
    ]
    r = client.chat.completions.create(
        model="tiny-r1", messages=messages, max_tokens=4, response_format={"type": "text"}, tool_choice="none"
    )
    assert r.choices[0].finish_reason in ("stop", "length")


def test_405_says_which_methods_and_openapi_json_describes_the_bodies(server):
    r = httpx.get(server.base_url + "/chat/completions")
    assert r.headers["allow"] == "POST" and "use POST" in error_of(r, 405)["message"]
    doc = httpx.get(server.url + "/openapi.json").json()
    assert doc["openapi"].startswith("3.")
    body = doc["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/ChatRequest"}
    assert "messages" in doc["components"]["schemas"]["ChatRequest"]["properties"]
    assert "/v1/completions" in doc["paths"] and "/v1/models" in doc["paths"]


def test_requests_whose_client_left_are_counted_as_aborted(server):
    def aborted() -> float:
        for line in httpx.get(server.url + "/metrics").text.splitlines():
            if line.startswith("vllm:request_success_total{") and 'finished_reason="abort"' in line:
                return float(line.rsplit(" ", 1)[1])
        raise KeyError("no abort series")

    before = aborted()
    body = {"prompt": "hello", "max_tokens": 100, "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=30) as h, h.stream("POST", server.base_url + "/completions", json=body) as r:
        next(r.iter_lines())
    deadline = time.monotonic() + 20
    while aborted() == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert aborted() == before + 1


# ------------------------------------------------------------------------------------------ thinking control
@pytest.fixture(scope="module")
def engine(memorised_dir):
    return Engine.from_pretrained(memorised_dir, max_batch_size=1)


def test_thinking_off_closes_the_think_block_and_returns_no_reasoning(client, engine):
    question = [{"role": "user", "content": "What is 2+3?"}]
    ids = engine.tokenizer.encode_chat(question, add_generation_prompt=True)
    closed = engine.tokenizer.encode(engine.tokenizer.apply_chat_template(question, True, thinking=False))
    assert closed[: len(ids)] == ids and engine.tokenizer.decode(closed[len(ids) :]) == "<think></think>"
    expected = engine.generate(closed, temperature=0, max_tokens=12)[0].text
    for off in ({"extra_body": {"chat_template_kwargs": {"thinking": False}}}, {"reasoning_effort": "none"}):
        kw = dict(model="tiny-r1", messages=question, temperature=0, max_tokens=12, **off)
        r = client.chat.completions.create(**kw)
        msg = r.choices[0].message
        assert r.usage.prompt_tokens == len(closed) and msg.content == expected
        assert getattr(msg, "reasoning_content", None) is None and getattr(msg, "reasoning", None) is None
        deltas = [c.choices[0].delta for c in client.chat.completions.create(**kw, stream=True) if c.choices]
        assert "".join(d.content or "" for d in deltas) == expected
        assert not any(getattr(d, "reasoning_content", None) for d in deltas)
    on = client.chat.completions.create(
        model="tiny-r1", messages=question, temperature=0, max_tokens=12, reasoning_effort="high"
    )
    assert on.choices[0].message.reasoning_content == "2+3=5"  # on (the default) keeps today's behaviour


# --------------------------------------------------------------------------------------------- Responses API
def test_responses_create_answers_with_reasoning_and_message_items(client):
    r = client.responses.create(model="tiny-r1", input="What is 2+3?", temperature=0, max_output_tokens=30)
    assert r.status == "completed" and r.output_text == "5" and r.id.startswith("resp_")
    assert [item.type for item in r.output] == ["reasoning", "message"]
    assert r.output[0].content[0].text == "2+3=5"
    u = r.usage
    assert (
        0 < u.output_tokens_details.reasoning_tokens < u.output_tokens
        and u.total_tokens == u.input_tokens + u.output_tokens
    )
    history = [
        {"role": "user", "content": "What is 2+3?"},
        {"role": "assistant", "content": [{"type": "output_text", "text": "5"}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "What is 9-7?"}]},
    ]
    r = client.responses.create(
        model="tiny-r1", input=history, instructions="Be brief.", temperature=0, max_output_tokens=30
    )
    messages = [{"role": "system", "content": "Be brief."}, history[0], {"role": "assistant", "content": "5"}]
    chat = client.chat.completions.create(
        model="tiny-r1", messages=[*messages, {"role": "user", "content": "What is 9-7?"}], temperature=0, max_tokens=30
    )
    assert r.output_text == (chat.choices[0].message.content or "") and r.usage.input_tokens == chat.usage.prompt_tokens
    off = client.responses.create(
        model="tiny-r1", input="What is 2+3?", temperature=0, max_output_tokens=30, reasoning={"effort": "none"}
    )
    assert [item.type for item in off.output] == ["message"]
    cut = client.responses.create(model="tiny-r1", input="What is 2+3?", temperature=0, max_output_tokens=3)
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"


def test_responses_stream_events_in_order(client):
    events = list(
        client.responses.create(model="tiny-r1", input="What is 4*2?", temperature=0, max_output_tokens=30, stream=True)
    )
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    reasoning = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert (reasoning, text) == ("4*2=8", "8") and events[-1].response.output_text == "8"
    assert kinds.count("response.output_item.added") == kinds.count("response.output_item.done") == 2
    with client.responses.stream(model="tiny-r1", input="What is 9-7?", temperature=0, max_output_tokens=30) as s:
        assert s.get_final_response().output_text == "2"


def test_responses_logprobs_are_the_message_tokens_as_chat_gives_them(client):
    kw = dict(model="tiny-r1", input="What is 2+3?", temperature=0, max_output_tokens=30)
    asked = dict(include=["message.output_text.logprobs"], top_logprobs=2)
    r = client.responses.create(**kw, **asked)
    part = r.output[-1].content[0]
    assert isinstance(part, ResponseOutputText) and r.top_logprobs == 2
    chat = client.chat.completions.create(
        model="tiny-r1", messages=[{"role": "user", "content": kw["input"]}], temperature=0, max_tokens=30,
        logprobs=True, top_logprobs=2,
    )  # fmt: skip
    every = chat.choices[0].logprobs.content
    answer = every[[e.token for e in every].index("</think>") + 1 :]  # the message's tokens: after the thinking
    assert [(e.token, e.bytes) for e in part.logprobs] == [(e.token, e.bytes) for e in answer]
    assert [e.logprob for e in part.logprobs] == pytest.approx([e.logprob for e in answer], abs=1e-4)
    assert all(len(e.top_logprobs) == 2 for e in part.logprobs)
    assert "".join(e.token for e in part.logprobs).strip() == r.output_text == "5"
    events = list(client.responses.create(**kw, **asked, stream=True))
    deltas = [lp for e in events if isinstance(e, ResponseTextDeltaEvent) for lp in e.logprobs]
    (done,) = [e for e in events if isinstance(e, ResponseTextDoneEvent)]
    for streamed in (deltas, done.logprobs, events[-1].response.output[-1].content[0].logprobs):
        assert [(x.token, len(x.top_logprobs)) for x in streamed] == [(x.token, 2) for x in part.logprobs]
    assert client.responses.create(**kw).output[-1].content[0].logprobs == []  # not asked: none


def test_responses_refuses_what_it_cannot_do_by_name(server):
    url = server.base_url + "/responses"
    cases = [
        ({"input": "hi", "previous_response_id": "resp_1"}, "previous_response_id", "stateless"),
        ({"input": "hi", "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools.0.name", "tools are flat"),
        ({"input": "hi", "text": {"format": {"type": "json_schema", "name": "x", "schema": UNIQUE}}}, "text.format.schema", "uniqueItems"),
        ({"input": [{"type": "function_call_output", "call_id": "c", "output": "1"}]}, "input.0", "must follow the function_call"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input.0", "not supported"),
        ({"input": "hi", "top_logprobs": 2}, "top_logprobs", "include"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input.0.content.0", "text only"),
        ({"input": "hi", "max_output_tokens": 10**6}, "max_output_tokens", "context holds"),
    ]  # fmt: skip
    for body, param, words in cases:
        err = error_of(httpx.post(url, json=body, timeout=30), 400)
        assert err["param"] == param and words in err["message"], err


# ---------------------------------------------------------------------------------------------- prefix cache
SYSTEM = "hello world, the quick brown fox " * 6  # a shared system prompt of several blocks


def test_prefix_cache_blocks_chain_evict_lru_and_keep_the_last_token(engine):
    kv = torch.randn(2, 3, 64, 4)
    pc = PrefixCache(kv, max_blocks=3, block_size=4)
    ids = list(range(12))
    assert pc.load(ids, kv, 1) == 0
    pc.save(ids, kv, 0)
    assert pc.load(ids, kv, 1) == 8  # whole blocks, never the last token: the model must compute it
    assert torch.equal(kv[:, 1, :8], kv[:, 0, :8]) and (pc.queries, pc.hits) == (24, 8)
    assert pc.load([*ids[:4], 99, *ids[5:]], kv, 2) == 4  # a changed token ends the match: keys chain
    pc.save(list(range(100, 108)), kv, 2)  # two new blocks evict the two least recently used
    assert pc.load(ids + [0], kv, 1) == 4 and pc.n_tokens == 12


def test_prefix_cache_gives_the_same_greedy_output(engine, memorised_dir):
    cached = Engine.from_pretrained(memorised_dir, max_batch_size=2, prefix_cache_tokens=512)
    prompts = [
        engine.tokenizer.encode_chat([{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}], True)
        for q in ["What is 2+3?", "What is 9-7?", "hello", "What is 2+3?"]
    ]
    for ids in prompts:
        want = engine.generate(ids, temperature=0, max_tokens=12, logprobs=True)[0]
        got = cached.generate(ids, temperature=0, max_tokens=12, logprobs=True)[0]
        assert got.token_ids == want.token_ids and got.logprobs == pytest.approx(want.logprobs, abs=1e-4)
    shared = next(i for i, column in enumerate(zip(*prompts[:3])) if len(set(column)) > 1)
    assert shared >= 32 and cached.prefix_cache.hits >= 2 * (shared // 16 * 16) + (len(prompts[3]) - 1) // 16 * 16


def test_server_reuses_a_shared_system_prompt(server, client, engine):
    q0, h0 = server.metric("vllm:prefix_cache_queries_total"), server.metric("vllm:prefix_cache_hits_total")
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is 4*2?"}]
    kw = dict(model="tiny-r1", messages=messages, temperature=0, max_tokens=12)
    replies = [client.chat.completions.create(**kw).choices[0].message for _ in range(2)]
    ids = engine.tokenizer.encode_chat(messages, True)
    want = split_reasoning(engine.generate(ids, temperature=0, max_tokens=12)[0].text)
    assert all((m.reasoning_content, m.content or "") == want for m in replies)
    assert server.metric("vllm:prefix_cache_queries_total") - q0 == 2 * len(ids)
    assert server.metric("vllm:prefix_cache_hits_total") - h0 >= (len(ids) - 1) // 16 * 16
    second = client.chat.completions.create(**kw).usage.prompt_tokens_details.cached_tokens
    assert second == (len(ids) - 1) // 16 * 16
    r = client.responses.create(model="tiny-r1", input="What is 4*2?", instructions=SYSTEM, max_output_tokens=4)
    assert r.usage.input_tokens_details.cached_tokens == second
