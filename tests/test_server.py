"""`nanoseek serve` as OpenAI clients see it: a real server process on 127.0.0.1, the official `openai` package,
a tiny model that has memorised a few `<think>` answers. Chat, streaming with `reasoning_content`, completions,
n, seeds, stop strings, logprobs, usage, every error class, disconnects, and 32 concurrent streaming clients."""

from __future__ import annotations

import concurrent.futures as cf
import json
import threading
import time

import httpx
import pytest
from helpers.shapes import check
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serve_util import KNOWN, ServeProcess, checked_client

from nanoseek import Engine
from nanoseek.infer.reasoning import ReasoningSplitter, split_reasoning

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def model_dir(memorised_dir):
    return memorised_dir


@pytest.fixture(scope="module")
def server(model_dir):
    with ServeProcess(model_dir, "--max-batch", "32") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return checked_client(server.base_url)


@pytest.fixture(scope="module")
def engine(model_dir):
    return Engine.from_pretrained(model_dir, max_batch_size=1)


def greedy(engine, prompt, max_tokens=24, **kw):
    return engine.generate(prompt, temperature=0, max_tokens=max_tokens, **kw)[0]


def chat_prompt(engine, question):
    return engine.tokenizer.encode_chat([{"role": "user", "content": question}], add_generation_prompt=True)


# ------------------------------------------------------------------------------------------------ happy paths
def test_models_health_and_metrics(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny-r1"]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    text = httpx.get(server.url + "/metrics").text
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:inter_token_latency_seconds_bucket",
        "vllm:e2e_request_latency_seconds_bucket",
        "vllm:request_queue_time_seconds_bucket",
    ):
        assert name in text, name


def test_chat_puts_the_thinking_in_reasoning_content(client):
    for question, answer in KNOWN.items():
        r = client.chat.completions.create(
            model="tiny-r1", messages=[{"role": "user", "content": question}], temperature=0, max_tokens=30
        )
        reasoning, content = split_reasoning(answer)
        msg = r.choices[0].message
        assert (msg.content, msg.reasoning_content, msg.reasoning) == (content, reasoning, reasoning)
        assert r.choices[0].finish_reason == "stop" and r.object == "chat.completion" and r.id.startswith("chatcmpl-")
        assert (
            r.usage.completion_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        )


def test_streaming_chat_reasoning_content_and_usage(client):
    stream = client.chat.completions.create(
        model="tiny-r1",
        messages=[{"role": "system", "content": ""}, {"role": "user", "content": "What is 4*2?"}],
        temperature=0,
        max_tokens=30,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    content = "".join(d.content or "" for d in deltas)
    assert (reasoning, content) == ("4*2=8", "8")
    assert all("<think>" not in (d.content or "") + (getattr(d, "reasoning", None) or "") for d in deltas)
    assert deltas[0].role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])


def test_earlier_reasoning_in_messages_is_accepted_and_dropped(client, engine):
    history = [
        {"role": "user", "content": "What is 2+3?"},
        {"role": "assistant", "content": "5", "reasoning_content": "2+3=5"},
        {"role": "user", "content": "What is 9-7?"},
    ]
    r = client.chat.completions.create(model="tiny-r1", messages=history, temperature=0, max_tokens=30)
    with_think = [*history[:1], {"role": "assistant", "content": "<think>2+3=5</think>5"}, history[2]]
    ids = engine.tokenizer.encode_chat(with_think, add_generation_prompt=True)
    expected = greedy(engine, ids, 30)
    assert r.usage.prompt_tokens == len(ids)  # the template dropped the earlier think block either way
    msg = r.choices[0].message
    assert (msg.reasoning_content, msg.content or "") == split_reasoning(expected.text)


def test_completions_match_the_engine_and_echo(client, engine):
    r = client.completions.create(model="tiny-r1", prompt=["hello world", "the quick"], max_tokens=12, temperature=0)
    for choice, prompt in zip(r.choices, ["hello world", "the quick"]):
        assert choice.text == greedy(engine, prompt, 12).text
    assert r.object == "text_completion" and [c.index for c in r.choices] == [0, 1]
    e = client.completions.create(model="tiny-r1", prompt="hello world", max_tokens=4, temperature=0, echo=True)
    assert e.choices[0].text == "hello world" + greedy(engine, "hello world", 4).text
    ids = engine.tokenizer.encode("hello world", bos=True)
    t = client.completions.create(model="tiny-r1", prompt=ids, max_tokens=12, temperature=0)
    assert t.choices[0].text == r.choices[0].text and t.usage.prompt_tokens == len(ids)
    t = client.completions.create(model="tiny-r1", prompt=ids, max_tokens=4, temperature=0, echo=True)
    assert t.choices[0].text == e.choices[0].text  # token-id prompts echo as text too


def test_n_choices_and_seeds_reproduce(client):
    def ask(seed):
        r = client.chat.completions.create(
            model="tiny-r1",
            messages=[{"role": "user", "content": "hello"}],
            n=4,
            temperature=1.0,
            seed=seed,
            max_tokens=16,
        )
        assert [c.index for c in r.choices] == [0, 1, 2, 3]
        return [(c.message.reasoning_content, c.message.content) for c in r.choices]

    first = ask(7)
    assert ask(7) == first
    # choice i samples with seed + i: the choices are different draws, and each one is reproducible on its own
    # (asserted as an identity, not as "the samples happen to differ", which a peaked model may not do)
    assert ask(8)[:3] == first[1:]


def test_stop_strings_cut_the_text_in_full_and_streamed_replies(client, engine):
    ids = chat_prompt(engine, "What is 2+3?")  # a memorised answer, so the text is known whatever the CPU
    full = greedy(engine, ids, 24).text
    assert full == KNOWN["What is 2+3?"]
    stop = "+3="
    cut = full[: full.find(stop)]
    r = client.completions.create(model="tiny-r1", prompt=ids, max_tokens=24, temperature=0, stop=[stop, "zzz"])
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    stream = client.completions.create(
        model="tiny-r1", prompt=ids, max_tokens=24, temperature=0, stop=stop, stream=True
    )
    chunks = [c.choices[0] for c in stream if c.choices]
    assert "".join(c.text for c in chunks) == cut and chunks[-1].finish_reason == "stop"


def test_logprobs_in_chat_and_completions(client, engine):
    r = client.chat.completions.create(
        model="tiny-r1",
        messages=[{"role": "user", "content": "What is 2+3?"}],
        temperature=0,
        max_tokens=30,
        logprobs=True,
        top_logprobs=3,
    )
    entries = r.choices[0].logprobs.content
    assert len(entries) == r.usage.completion_tokens
    for e in entries:
        assert len(e.top_logprobs) == 3 and e.logprob <= 0
        assert e.top_logprobs[0].token == e.token and e.top_logprobs[0].logprob == pytest.approx(e.logprob)
        assert [t.logprob for t in e.top_logprobs] == sorted((t.logprob for t in e.top_logprobs), reverse=True)
    assert bytes(b for e in entries for b in e.bytes).decode() == "<think>2+3=5</think> 5"
    c = client.completions.create(model="tiny-r1", prompt="hello world", max_tokens=6, temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    assert "".join(lp.tokens) == c.choices[0].text and len(lp.token_logprobs) == 6
    assert all(len(t) == 2 for t in lp.top_logprobs) and lp.text_offset[0] == 0
    expected = greedy(engine, "hello world", 6, logprobs=True).logprobs
    assert lp.token_logprobs == pytest.approx(expected, abs=1e-4)


# ------------------------------------------------------------------------------------------------- errors
def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    check(response.request.url.path, status, body)
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


@pytest.mark.parametrize("stream", [False, True])
def test_bad_requests_are_400_with_the_openai_envelope(server, stream):
    url = server.base_url + "/chat/completions"
    ok = {"model": "tiny-r1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": stream}
    cases = [
        (b"{not json", None, "not valid JSON"),
        (b"\xff\xfe{}", None, "UTF-8"),
        (b"[1, 2]", None, "JSON object"),
        (b"[" * 50000 + b"]" * 50000, None, None),
        ({**ok, "temperature": "hot"}, "temperature", "valid number"),
        ({**ok, "temperature": 5}, "temperature", "less than or equal to 2"),
        ({**ok, "max_tokens": -1}, "max_tokens", "greater than or equal to 1"),
        ({**ok, "max_tokens": 10**30}, "max_tokens", "context holds"),
        ({**ok, "n": True}, "n", "valid integer"),
        ({**ok, "top_logprobs": 2}, "top_logprobs", "logprobs: true"),
        ({**ok, "messages": []}, "messages", "at least 1"),
        ({**ok, "messages": [{"role": "robot", "content": "x"}]}, "messages.0.role", None),
        ({**ok, "messages": [{"role": "tool", "content": "x"}]}, "messages.0", "must answer a preceding assistant"),
        ({**ok, "messages": [{"role": "user", "content": "x " * 400}]}, "messages", "context holds 128"),
        ({**ok, "stop": [""] * 40}, "stop", None),
    ]
    for body, param, words in cases:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        err = error_of(httpx.post(url, content=data, timeout=30), 400)
        assert err["type"] == "invalid_request_error" and err["param"] == param, (body if param else data[:20], err)
        assert words is None or words in err["message"], err
    # unknown fields are ignored, as OpenAI does
    assert httpx.post(url, json={**ok, "stream": False, "frobnicate": {"x": 1}}, timeout=30).status_code == 200


def test_unknown_model_path_method_and_oversized_body(server):
    body = {"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}
    err = error_of(httpx.post(server.base_url + "/chat/completions", json=body), 404)
    assert err["code"] == "model_not_found" and "tiny-r1" in err["message"]
    error_of(httpx.get(server.base_url + "/nothing/here"), 404)
    error_of(httpx.get(server.base_url + "/chat/completions"), 405)
    huge = {"prompt": "x" * (3 * 2**20), "max_tokens": 1}
    error_of(httpx.post(server.base_url + "/completions", json=huge, timeout=30), 413)


def test_api_key_and_a_full_queue(model_dir):
    with ServeProcess(model_dir, "--api-key", "s3cret", "--max-batch", "1", "--max-queue", "1") as s:
        url = s.base_url + "/completions"
        body = {"prompt": "hello", "max_tokens": 100, "temperature": 1.0, "stop": []}
        assert error_of(httpx.post(url, json=body), 401)["type"] == "authentication_error"
        error_of(httpx.post(url, json=body, headers={"Authorization": "Bearer wrong"}), 401)
        error_of(httpx.get(s.base_url + "/models", headers={"Authorization": "s3cret"}), 401)
        auth = {"Authorization": "Bearer s3cret"}
        assert httpx.get(s.base_url + "/models", headers=auth).status_code == 200
        assert httpx.get(s.url + "/health").status_code == 200  # health and metrics need no key
        # two long sequences fill the slot and the queue; a third request (even streaming) gets 429 at once
        busy = {**body, "n": 2, "max_tokens": 120, "ignore_eos": True}
        with cf.ThreadPoolExecutor(1) as pool:
            first = pool.submit(httpx.post, url, json=busy, headers=auth, timeout=60)
            deadline = time.monotonic() + 30
            while s.metric("vllm:num_requests_running") < 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            full = httpx.post(url, json={**body, "stream": True}, headers=auth, timeout=30)
            err = error_of(full, 429)
            assert err["code"] == "queue_full" and full.headers["retry-after"] == "1"
            assert first.result().status_code == 200
        assert httpx.post(url, json={**body, "max_tokens": 2}, headers=auth).status_code == 200


# --------------------------------------------------------------------------------------- load and disconnects
def test_32_disconnects_mid_stream_free_every_slot(server, client):
    body = {"model": "tiny-r1", "prompt": "hello world", "max_tokens": 100, "stream": True, "ignore_eos": True}

    def read_two_chunks_and_hang_up(i):
        with httpx.Client(timeout=30) as h, h.stream("POST", server.base_url + "/completions", json=body) as r:
            assert r.status_code == 200
            seen = 0
            for line in r.iter_lines():
                seen += line.startswith("data: {")
                if seen == 2:
                    return True  # leaving the block closes the connection mid-stream
        return False

    with cf.ThreadPoolExecutor(32) as pool:
        assert all(pool.map(read_two_chunks_and_hang_up, range(32)))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if server.metric("vllm:num_requests_running") == 0 and server.metric("vllm:num_requests_waiting") == 0:
            break
        time.sleep(0.1)
    assert server.metric("vllm:num_requests_running") == 0 and server.metric("vllm:num_requests_waiting") == 0
    r = client.chat.completions.create(
        model="tiny-r1", messages=[{"role": "user", "content": "What is 2+3?"}], temperature=0, max_tokens=30
    )
    assert r.choices[0].message.content == "5"


def test_32_concurrent_streams_get_the_sequential_answers_faster(server):
    prompts = [f"hello world {i}" if i % 3 else list(KNOWN)[i % 3] for i in range(32)]
    aclient = checked_client(server.base_url, 120)

    def stream(prompt):
        chunks = aclient.chat.completions.create(
            model="tiny-r1", messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=24, stream=True
        )
        parts = [(c.choices[0].delta, c.choices[0].finish_reason) for c in chunks if c.choices]
        text = "".join((getattr(d, "reasoning_content", None) or "") + "|" + (d.content or "") for d, _ in parts)
        return text, parts[-1][1]

    t0 = time.perf_counter()
    sequential = [stream(p) for p in prompts]
    t1 = time.perf_counter()
    with cf.ThreadPoolExecutor(32) as pool:
        concurrent = list(pool.map(stream, prompts))
    t2 = time.perf_counter()
    assert concurrent == sequential
    assert all(reason in ("stop", "length") for _, reason in concurrent)
    assert t2 - t1 < t1 - t0, f"32 concurrent streams took {t2 - t1:.2f} s, one by one {t1 - t0:.2f} s"


# ------------------------------------------------------------------------------------------------- pieces
def test_reasoning_splitter_streams_what_the_whole_text_splits():
    text = "  <think>\n2+3 = 5\n</think>\n\nThe answer is 5"
    for cuts in ([], [1, 4, 9, 20, 23, 30], list(range(1, len(text)))):
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        s = ReasoningSplitter()
        parts = [s.feed(p) for p in pieces] + [s.feed("", final=True)]
        assert ("".join(r for r, _ in parts), "".join(c for _, c in parts)) == split_reasoning(text)
    assert split_reasoning(text) == ("2+3 = 5\n", "The answer is 5")
    assert split_reasoning("just an answer") == (None, "just an answer")
    assert split_reasoning("still thinking", starts_in_think=True) == ("still thinking", "")
    assert split_reasoning("<think>cut off") == ("cut off", "")


def test_engine_abort_frees_the_slot(engine):
    sid = engine.add_request("hello world", None)
    engine.step()
    assert engine.running and engine.abort(sid)
    assert not engine.running and not engine.waiting and engine.cache.n_free == engine.cache.n_slots
    assert not engine.abort(sid)
    queued = [engine.add_request("hello") for _ in range(3)]
    assert engine.abort(queued[1]) and len(engine.waiting) == 2
    engine.generate("hello", max_tokens=2)  # the rest still run
    assert not engine.has_work()


def test_engine_loop_reports_every_token_and_stops_cleanly(engine):
    from nanoseek.infer.server.app import Server

    s = Server(engine, "m")
    s.loop.start()
    assert s.loop.ready.wait(30)
    got, done = [], threading.Event()

    def sink(key, update):
        got.append(update)
        if update.finish_reason:
            done.set()

    s.loop.submit([engine.tokenizer.encode("hello", bos=True)], [engine_params()], sink)
    assert done.wait(30)
    assert got[-1].finish_reason == "length" and sum(len(u.token_ids) for u in got) == 5
    s.loop.stop()
    assert not s.loop._thread.is_alive()


def engine_params():
    from nanoseek.infer.sampling import SamplingParams

    return SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)


# -------------------------------------------------------------------------------------------------- fuzzing
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
FIELDS = [
    "model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p",
    "n", "stop", "seed", "presence_penalty", "frequency_penalty", "repetition_penalty", "logprobs", "top_logprobs",
    "stream", "stream_options", "echo", "ignore_eos", "tools", "tool_choice", "response_format",
    "chat_template_kwargs", "reasoning_effort", "input", "instructions", "max_output_tokens", "reasoning",
    "previous_response_id", "text",
]  # fmt: skip
ODD = st.sampled_from(
    [-1, 0, 10**12, -(10**12), 2**64, 1e308, -1e308, 0.5, "", "x" * 5000, [], {}, [[[[[]]]]], True, None, "\ud800"]
)
BASE = {
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
    "/v1/completions": {"prompt": "hi", "max_tokens": 3},
    "/v1/responses": {"input": "hi", "max_output_tokens": 3},
}


@st.composite
def bodies(draw) -> bytes:
    kind = draw(st.sampled_from(["mutated", "mutated", "json", "bytes", "nested"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "nested":
        depth = draw(st.integers(1, 200000))
        return b'{"messages": ' + b"[" * depth + b"]" * depth + b"}"
    if kind == "json":
        return json.dumps(draw(JSON)).encode()
    body = dict(BASE[draw(st.sampled_from(sorted(BASE)))])
    for name in draw(st.lists(st.sampled_from(FIELDS), min_size=1, max_size=4)):
        body[name] = draw(ODD | JSON)
    try:
        return json.dumps(body).encode("utf-8", "surrogatepass")
    except ValueError:
        return json.dumps(body, allow_nan=True).encode()


@settings(max_examples=250, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(path=st.sampled_from([*BASE, "/v1/models"]), body=bodies())
def test_fuzzed_bodies_never_break_the_server(server, path, body):
    r = httpx.post(server.url + path, content=body, timeout=60)
    assert r.status_code < 500, (r.status_code, r.text[:300], body[:200])
    if r.status_code != 200:
        error_of(r, r.status_code)


def test_a_normal_request_succeeds_after_fuzzing(client):
    r = client.chat.completions.create(
        model="tiny-r1", messages=[{"role": "user", "content": "What is 9-7?"}], temperature=0, max_tokens=30
    )
    assert (r.choices[0].message.reasoning_content, r.choices[0].message.content) == ("9-7=2", "2")


# ---------------------------------------------------------------------------------- --speculative, --compile
def same_answers(base_url: str, client) -> None:
    other = checked_client(base_url, 120)
    for question in [*KNOWN, "hello world"]:
        kw = dict(messages=[{"role": "user", "content": question}], temperature=0, max_tokens=24)
        a = other.chat.completions.create(model="tiny-r1", **kw).choices[0].message
        b = client.chat.completions.create(model="tiny-r1", **kw).choices[0].message
        assert (a.reasoning_content, a.content) == (b.reasoning_content, b.content)


def test_speculative_server_answers_as_the_plain_one(model_dir, client):
    with ServeProcess(model_dir, "--speculative", "--max-batch", "4") as s:
        same_answers(s.base_url, client)


@pytest.mark.slow
def test_compiled_server_is_healthy_after_warm_up_and_answers_the_same(model_dir, client):
    with ServeProcess(model_dir, "--compile", "--max-batch", "2", timeout=900) as s:
        assert "ready" in s.log.read_text()
        same_answers(s.base_url, client)
