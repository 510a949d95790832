"""Tool calling end to end: a tiny model fine-tuned by `run_sft` on the built-in calculator task, served by a real
`nanoseek serve`, driven by the `openai` client (every body and chunk validated against its types): the model
calls the calculator, the client runs it and sends the result back, the model answers with it."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from helpers import tiny_model
from serve_util import ServeProcess, checked_client

from nanoseek import save_model
from nanoseek.data.chat import builtin_conversations
from nanoseek.infer.tools import prefill
from nanoseek.tasks.calculator import TOOL, calculate
from nanoseek.tasks.problems import builtin_corpus
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
