"""Tool calling end to end: a tiny model fine-tuned by `run_sft` on the built-in calculator task, served by a real
`nanoseek serve`, driven by the `openai` client (every body and chunk validated against its types): the model
calls the calculator, the client runs it and sends the result back, the model answers with it; on
/v1/chat/completions and on /v1/responses (`client.responses.create`, function_call items and events)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from helpers import tiny_model
from openai.types.responses import (
    ResponseFunctionCallArgumentsDeltaEvent,
    ResponseFunctionCallArgumentsDoneEvent,
    ResponseFunctionToolCall,
    ResponseOutputItemDoneEvent,
)
from serve_util import ServeProcess, checked_client

from nanoseek import save_model
from nanoseek.data.chat import builtin_conversations
from nanoseek.infer.tools import check_call, prefill, split_call
from nanoseek.tasks.calculator import TOOL, calculate
from nanoseek.tasks.problems import builtin_corpus
from nanoseek.tokenizer import TOOL_CALL_BEGIN as CALL_BEGIN
from nanoseek.tokenizer import TOOL_CALL_END as CALL_END
from nanoseek.tokenizer import Tokenizer, train_tokenizer
from nanoseek.train.pretrain import TrainConfig
from nanoseek.train.sft import SFT_DEFAULTS, SFTJob, run_sft

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]
TRAIN = builtin_conversations(["calculator"], 16, seed=0, split="train", worked_fraction=1.0, levels=["2x1"])


@pytest.fixture(scope="module")
def calculator_dir(tmp_path_factory) -> Path:
    """`nanoseek sft --data builtin:calculator` on a fresh tiny model: 16 one-digit problems, 250 steps, seed 0."""
    d = tmp_path_factory.mktemp("calculator")
    render = train_tokenizer(["x"], vocab_size=300)  # any tokenizer renders the texts the real one learns from
    shown = builtin_conversations(["calculator"], 40, seed=0, split="train", worked_fraction=1.0)
    texts = [render.apply_chat_template(c["messages"], tools=c["tools"]) for c in shown]
    tok = train_tokenizer(texts + builtin_corpus(100, seed=0), vocab_size=400)
    save_model(tiny_model(tok, max_position_embeddings=256), d / "base", tokenizer=tok)
    cfg = TrainConfig(**{**SFT_DEFAULTS, "steps": 250, "batch_size": 8, "lr": 1e-2, "warmup": 10, "eval_every": 0})
    job = SFTJob(str(d / "base"), "builtin:calculator", str(d / "run"), n=16, levels=["2x1"], train=cfg)
    return Path(run_sft(job)["checkpoint"])


@pytest.fixture(scope="module")
def server(calculator_dir):
    with ServeProcess(calculator_dir, "--max-batch", "4") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return checked_client(server.base_url)


@pytest.fixture(scope="module")
def model(client) -> str:
    return client.models.list().data[0].id


def question(k: int = 0) -> tuple[list[dict], str]:
    """A training question as the client sends it, and its expression."""
    user, asked = TRAIN[k]["messages"][:2]
    return [user], json.loads(asked["tool_calls"][0]["function"]["arguments"])["expression"]


def test_calculator_round_trip_with_the_openai_client(client, model):
    messages, expression = question()
    r = client.chat.completions.create(model=model, messages=messages, tools=[TOOL], temperature=0, max_tokens=60)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "calculator"
    args = json.loads(call.function.arguments)
    assert args == {"expression": expression}
    result = calculate(args["expression"])  # the client runs the tool
    messages += [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": result},
    ]
    r = client.chat.completions.create(model=model, messages=messages, tools=[TOOL], temperature=0, max_tokens=20)
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.tool_calls is None
    assert r.choices[0].message.content == result


def test_tool_calls_stream_as_fragments_that_rebuild_the_call(client, model):
    messages, expression = question(1)
    kw = dict(model=model, messages=messages, tools=[TOOL], temperature=0, max_tokens=60)
    whole = client.chat.completions.create(**kw).choices[0].message.tool_calls[0]
    chunks = [c for c in client.chat.completions.create(**kw, stream=True) if c.choices]
    fragments = [f for c in chunks for f in c.choices[0].delta.tool_calls or []]
    assert fragments[0].id.startswith("call_") and fragments[0].function.name == "calculator"
    assert {f.index for f in fragments} == {0} and all(f.id is None for f in fragments[1:])
    arguments = "".join(f.function.arguments or "" for f in fragments)
    assert (arguments, fragments[0].function.name) == (whole.function.arguments, whole.function.name)
    assert json.loads(arguments) == {"expression": expression}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not any(c.choices[0].delta.content for c in chunks)


def test_tool_choice_none_required_and_named(client, model, calculator_dir):
    tok = Tokenizer.from_pretrained(calculator_dir)
    messages, expression = question(2)
    kw = dict(model=model, messages=messages, temperature=0, max_tokens=40)
    none = client.chat.completions.create(**kw, tools=[TOOL], tool_choice="none")
    assert none.choices[0].message.tool_calls is None and none.choices[0].finish_reason != "tool_calls"
    assert none.usage.prompt_tokens == len(tok.encode_chat(messages, add_generation_prompt=True))  # no tools shown
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tools=[TOOL])
    named = {"type": "function", "function": {"name": "calculator"}}
    for choice, forced in (("required", prefill("v3")), (named, prefill("v3", "calculator"))):
        r = client.chat.completions.create(**kw, tools=[TOOL], tool_choice=choice)
        assert r.usage.prompt_tokens == len(tok.encode(prompt + forced))  # the reply starts inside a call
        assert r.choices[0].finish_reason == "tool_calls"
        assert json.loads(r.choices[0].message.tool_calls[0].function.arguments) == {"expression": expression}


def test_a_call_that_does_not_fit_the_schema_comes_back_as_text(client, model):
    strict = json.loads(json.dumps(TOOL))
    strict["function"]["parameters"]["required"].append("precision")  # the model never writes one
    messages, _ = question()
    kw = dict(model=model, messages=messages, tools=[strict], temperature=0, max_tokens=60)
    r = client.chat.completions.create(**kw)
    message = r.choices[0].message
    assert message.tool_calls is None and r.choices[0].finish_reason == "stop"
    assert (
        message.content.startswith("<｜tool▁call▁begin｜>function<｜tool▁sep｜>calculator")
        and '"expression"' in message.content
    )
    streamed = "".join(
        c.choices[0].delta.content or "" for c in client.chat.completions.create(**kw, stream=True) if c.choices
    )
    assert streamed == message.content


def test_malformed_tools_get_a_400_naming_the_field(server):
    body = {
        "messages": [{"role": "user", "content": "hi"}],
        "tools": [{"type": "function", "function": {"name": "a b"}}],
    }
    r = httpx.post(server.base_url + "/chat/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "tools.0.function.name" and "1-64 letters" in error["message"]
    assert error["type"] == "invalid_request_error"


# --------------------------------------------------------------------------------------------- the Responses API
FLAT = {"type": "function", **TOOL["function"]}  # the calculator in the Responses API's flat shape


def test_responses_calculator_round_trip_with_the_openai_client(client, model):
    messages, expression = question()
    kw = dict(model=model, tools=[FLAT], temperature=0)
    r = client.responses.create(**kw, input=messages, max_output_tokens=60)
    (call,) = r.output  # only the call: the model wrote no text
    assert isinstance(call, ResponseFunctionToolCall) and call.status == "completed" and r.status == "completed"
    assert call.id.startswith("fc_") and call.call_id.startswith("call_") and call.name == "calculator"
    assert json.loads(call.arguments) == {"expression": expression}
    assert r.tools[0].name == "calculator" and r.tool_choice == "auto" and r.parallel_tool_calls
    result = calculate(expression)  # the client runs the tool
    output = {"type": "function_call_output", "call_id": call.call_id, "output": result}
    r = client.responses.create(
        **kw, input=[*messages, call.model_dump(exclude_none=True), output], max_output_tokens=20
    )
    assert r.output_text == result and [item.type for item in r.output] == ["message"]
    asked = {"id": call.call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
    history = [
        *messages,
        {"role": "assistant", "tool_calls": [asked]},
        {"role": "tool", "tool_call_id": call.call_id, "content": result},
    ]
    chat = client.chat.completions.create(model=model, messages=history, tools=[TOOL], temperature=0, max_tokens=20)
    assert (chat.usage.prompt_tokens, chat.choices[0].message.content) == (r.usage.input_tokens, r.output_text)


def test_responses_stream_a_call_as_item_and_argument_events(client, model):
    messages, expression = question(1)
    kw = dict(model=model, input=messages, tools=[FLAT], temperature=0, max_output_tokens=60)
    whole = client.responses.create(**kw).output[0]
    events = list(client.responses.create(**kw, stream=True))
    kinds = [e.type for e in events]
    n = kinds.count("response.function_call_arguments.delta")
    assert n >= 1 and kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        *["response.function_call_arguments.delta"] * n,
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    added, deltas, done, item_done = events[2], events[3 : 3 + n], events[3 + n], events[4 + n]
    assert isinstance(added.item, ResponseFunctionToolCall) and (added.item.status, added.item.arguments) == (
        "in_progress",
        "",
    )
    assert all(isinstance(e, ResponseFunctionCallArgumentsDeltaEvent) and e.item_id == added.item.id for e in deltas)
    assert isinstance(done, ResponseFunctionCallArgumentsDoneEvent) and isinstance(
        item_done, ResponseOutputItemDoneEvent
    )
    assert "".join(e.delta for e in deltas) == done.arguments == item_done.item.arguments == whole.arguments
    assert json.loads(done.arguments) == {"expression": expression} and item_done.item.status == "completed"
    assert events[-1].response.output == [item_done.item]
    with client.responses.stream(**kw) as s:  # the SDK's accumulating helper rebuilds the call
        assert s.get_final_response().output[0].arguments == whole.arguments


def test_responses_tool_choice_and_a_call_that_fails_its_nested_schema(client, model, calculator_dir):
    tok = Tokenizer.from_pretrained(calculator_dir)
    messages, expression = question(2)
    kw = dict(model=model, input=messages, temperature=0, max_output_tokens=40)
    none = client.responses.create(**kw, tools=[FLAT], tool_choice="none")
    assert all(item.type != "function_call" for item in none.output)
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tools=[TOOL])
    named = {"type": "function", "name": "calculator"}
    for choice, forced in (("required", prefill("v3")), (named, prefill("v3", "calculator"))):
        r = client.responses.create(**kw, tools=[FLAT], tool_choice=choice, parallel_tool_calls=False)
        assert r.usage.input_tokens == len(tok.encode(prompt + forced))  # the reply starts inside a call
        assert [item.type for item in r.output] == ["function_call"] and not r.parallel_tool_calls
        assert json.loads(r.output[0].arguments) == {"expression": expression}
    nested = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}
    strict = json.loads(json.dumps(FLAT))
    strict["parameters"]["properties"]["expression"] = nested  # the model writes a string there, never an object
    kw["input"] = question(0)[0]
    r = client.responses.create(**kw, tools=[strict])
    assert [item.type for item in r.output] == ["message"]  # the call came back as the text it was, as on chat
    (text,) = [part.text for part in r.output[0].content]
    assert text.startswith(CALL_BEGIN) and text.endswith(CALL_END)
    name, arguments, _ = split_call(text[len(CALL_BEGIN) : -len(CALL_END)])
    assert check_call(name, arguments, {name: FLAT["parameters"]}) is None  # a good call for the plain schema
    assert "arguments.expression" in check_call(name, arguments, {name: strict["parameters"]})  # not the nested one
    events = list(client.responses.create(**kw, tools=[strict], stream=True))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == text
    assert not any(e.type.startswith("response.function_call") for e in events)
