"""Structured output (`response_format`, `text.format`): constrained decoding makes every reply parse and validate.

The model here has no preference at all: its output head is zero, so every logit is exactly 0 and it samples
uniformly among the tokens the grammar allows. Whatever it writes is the grammar's doing alone, and seeded draws
are the same on every machine. Its tokenizer has seen some JSON, so many tokens close a string or an object and
uniform replies end within a few hundred tokens."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest
import torch
from helpers import tiny_model
from helpers.shapes import check
from serve_util import ServeProcess, checked_client

from nanoseek import Engine, save_model
from nanoseek.infer.sampling import SamplingParams
from nanoseek.infer.structured import (
    StructuredOutputError,
    grammar_from_response_format,
    grammar_from_text_format,
    grammar_vocabulary,
    mask_logits,
    start_constraint,
)
from nanoseek.tokenizer import SPECIAL_TOKENS, THINK_END, THINK_START, train_tokenizer

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

DOCS = [
    {"name": "Ann", "age": 31, "tags": ["cat", "tea"], "ok": True, "pet": None},
    {"city": "Paris", "zip": "75001", "pos": [48.85, 2.35]},
    {"a": {"b": [1, 2, {"c": "d"}]}, "e": -0.5},
]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
    },
    "required": ["name", "age", "color", "tags"],
    "additionalProperties": False,
}
SCHEMAS = {
    "person": PERSON,
    "nested": {
        "type": "object",
        "properties": {"owner": {"$ref": "#/$defs/who"}, "count": {"type": "integer"}, "ok": {"type": "boolean"}},
        "required": ["owner", "count", "ok"],
        "additionalProperties": False,
        "$defs": {
            "who": {"type": "object", "properties": {"id": {"type": "string", "maxLength": 12}}, "required": ["id"]}
        },
    },
    "choices": {
        "type": "object",
        "properties": {"answer": {"anyOf": [{"type": "number"}, {"type": "null"}]}, "unit": {"const": "kg"}},
        "required": ["answer", "unit"],
    },
}


def json_schema(schema: dict, name: str = "reply") -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


@pytest.fixture(scope="module")
def json_tok():
    texts = [json.dumps(d) for d in DOCS] * 30 + ["What is 2+3? <think>2+3=5</think> 5"] * 10
    return train_tokenizer(texts, vocab_size=400)


@pytest.fixture(scope="module")
def indifferent(json_tok):
    """A tiny model whose every logit is 0 (MTP shares the zero head, so its drafts are uniform too)."""
    model = tiny_model(json_tok, max_position_embeddings=1024)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    return model


@pytest.fixture(scope="module")
def engine(indifferent, json_tok):
    return Engine(indifferent, json_tok, max_batch_size=16)


def prompt(tok, thinking: bool = False) -> str:
    return tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, thinking=thinking)


# ------------------------------------------------------------------------------------------------ grammars
def test_the_grammar_vocabulary_spells_each_token_as_its_bytes(json_tok):
    vocab = grammar_vocabulary(json_tok, json_tok.vocab_size + 5)  # a model's padded rows too
    ordinary = [i for i in range(json_tok.vocab_size) if not vocab.is_special_token(i)]
    assert all(vocab.decode_bytes([i]) == json_tok.token_bytes(i) for i in ordinary)
    specials = [json_tok.bos_id, json_tok.eos_id, json_tok.think_start_id, json_tok.think_end_id]
    assert all(vocab.is_special_token(i) for i in specials) and vocab.eos_token == json_tok.eos_id
    # kept out of grammars: the special tokens, and byte 0xFF (llguidance's special-token marker; never UTF-8)
    n_special = sum(len(json_tok.encode(t)) == 1 for t in SPECIAL_TOKENS)
    byte_ff = next(i for i in range(json_tok.vocab_size) if json_tok.token_bytes(i) == b"\xff")
    assert n_special == len(SPECIAL_TOKENS) and vocab.is_special_token(byte_ff)
    assert len(ordinary) == json_tok.vocab_size - n_special - 1


def test_unsupported_schema_features_are_named_with_where_they_are():
    schema = {"type": "object", "properties": {"ids": {"type": "array", "uniqueItems": True}}}
    with pytest.raises(StructuredOutputError, match="'uniqueItems' .at response_format.json_schema.schema"):
        grammar_from_response_format(json_schema(schema))
    try:
        grammar_from_response_format(json_schema(schema))
    except StructuredOutputError as e:
        assert e.param == "response_format.json_schema.schema" and "properties.ids.uniqueItems" in str(e)
    bad = [
        ({"type": "xml"}, "response_format.type"),
        ("json_object", "response_format"),
        ({"type": "json_schema"}, "response_format.json_schema"),
        ({"type": "json_schema", "json_schema": {"schema": {}}}, "response_format.json_schema.name"),
        (json_schema({"type": "strin"}), "response_format.json_schema.schema"),
        (json_schema({"$ref": "#/$defs/none"}), "response_format.json_schema.schema"),
    ]
    for fmt, param in bad:
        with pytest.raises(StructuredOutputError) as e:
            grammar_from_response_format(fmt)
        assert e.value.param == param, (fmt, e.value)
    assert grammar_from_response_format({"type": "text"}) is None and grammar_from_response_format(None) is None
    with pytest.raises(StructuredOutputError, match="text.format.schema"):
        grammar_from_text_format({"type": "json_schema", "name": "x", "schema": {"not": {}}})


# ------------------------------------------------------------------------------------------------ decoding
@pytest.mark.parametrize("name", list(SCHEMAS))
def test_json_schema_replies_validate(engine, json_tok, name):
    grammar = grammar_from_response_format(json_schema(SCHEMAS[name]))
    params = [SamplingParams(grammar=grammar, max_tokens=400, seed=s) for s in range(6)]
    for c in engine.generate([prompt(json_tok)] * 6, params):
        assert c.finish_reason == "stop", c
        jsonschema.validate(json.loads(c.text), SCHEMAS[name])


def test_greedy_replies_validate(engine, json_tok):
    """Greedy over equal logits takes the lowest allowed id: a bounded schema still ends, and validates."""
    grammar = grammar_from_response_format(json_schema(PERSON))
    c = engine.generate(prompt(json_tok), grammar=grammar, temperature=0, max_tokens=200)[0]
    assert c.finish_reason == "stop", c
    jsonschema.validate(json.loads(c.text), PERSON)


def test_json_object_replies_parse_as_objects_also_with_mtp_drafts(indifferent, json_tok):
    grammar = grammar_from_response_format({"type": "json_object"})
    for speculative in (False, True):
        engine = Engine(indifferent, json_tok, max_batch_size=8, speculative=speculative)
        params = [SamplingParams(grammar=grammar, max_tokens=600, seed=s) for s in range(8)]
        replies = engine.generate([prompt(json_tok)] * 8, params)
        assert all(c.finish_reason == "stop" and isinstance(json.loads(c.text), dict) for c in replies), replies


def test_sequences_without_a_grammar_are_untouched(engine, json_tok):
    logits = torch.randn(3, engine.config.vocab_size)
    assert mask_logits(logits, [None, None, None]) is logits
    grammar = grammar_from_response_format(json_schema(PERSON))
    c = start_constraint(
        grammar_vocabulary(json_tok, logits.shape[1]), grammar, json_tok, json_tok.encode(prompt(json_tok))
    )
    out = mask_logits(logits, [None, c, None])
    assert torch.equal(out[[0, 2]], logits[[0, 2]])
    allowed = torch.nonzero(out[1].isfinite()).flatten().tolist()
    assert allowed and all(json_tok.token_bytes(i).startswith(b'{"') for i in allowed)  # `{"name"` is forced
    free = engine.generate(prompt(json_tok), max_tokens=5, seed=0, ignore_eos=True)[0]
    assert len(free.token_ids) == 5 and not engine.sampler.constraints


def test_the_answer_is_constrained_and_the_thinking_is_not(json_tok):
    """Thinking (after the prompt's or the model's own `<think>`) is free but may not end the reply; from
    `</think>` on, the grammar holds. A prompt that closed the block (thinking off) is constrained at once."""
    grammar = grammar_from_response_format({"type": "json_object"})
    vocab = grammar_vocabulary(json_tok, json_tok.vocab_size)
    V, tok = json_tok.vocab_size, json_tok

    def allowed(c) -> set[int]:
        return set(torch.nonzero(mask_logits(torch.zeros(1, V), [c])[0].isfinite()).flatten().tolist())

    opened = start_constraint(vocab, grammar, tok, tok.encode(prompt(tok) + THINK_START))
    assert allowed(opened) == set(range(V)) - {tok.eos_id}
    opened.accept(tok.encode("2+3")[0])
    opened.accept(tok.think_end_id)
    closed = start_constraint(vocab, grammar, tok, tok.encode(prompt(tok, thinking=False)))
    assert prompt(tok, thinking=False).endswith(THINK_START + THINK_END)
    json_start = allowed(closed)
    assert allowed(opened) == json_start and tok.encode("{")[0] in json_start
    assert all(tok.token_bytes(i).startswith(b"{") for i in json_start)
    either = start_constraint(vocab, grammar, tok, tok.encode(prompt(tok, thinking=True)))
    assert allowed(either) == json_start | {tok.think_start_id}
    either.accept(tok.think_start_id)
    assert tok.eos_id not in allowed(either) and tok.think_end_id in allowed(either)
    assert not closed.accept(tok.encode("{")[0]) and closed.accept(tok.encode("}")[0])  # complete: nothing follows


# -------------------------------------------------------------------------------------------------- server
@pytest.fixture(scope="module")
def server(indifferent, json_tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("structured") / "tiny-json"
    save_model(indifferent, d, tokenizer=json_tok)
    with ServeProcess(d, "--max-batch", "8") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return checked_client(server.base_url)


NO_THINKING = {"reasoning_effort": "none"}


def test_the_openai_client_gets_replies_that_validate(client):
    messages = [{"role": "user", "content": "Who is Ann?"}]
    r = client.chat.completions.create(
        model="tiny-json", messages=messages, response_format=json_schema(PERSON), n=3, seed=1, max_tokens=400,
        extra_body=NO_THINKING,
    )  # fmt: skip
    for choice in r.choices:
        assert choice.finish_reason == "stop" and choice.message.refusal is None
        jsonschema.validate(json.loads(choice.message.content), PERSON)
    r = client.chat.completions.create(
        model="tiny-json", messages=messages, response_format={"type": "json_object"}, seed=2, max_tokens=600,
        extra_body=NO_THINKING,
    )  # fmt: skip
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_streamed_replies_validate_when_concatenated(client):
    stream = client.chat.completions.create(
        model="tiny-json", messages=[{"role": "user", "content": "Who?"}], response_format=json_schema(PERSON),
        stream=True, seed=3, max_tokens=400, extra_body=NO_THINKING, stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), PERSON)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop" and chunks[-1].usage is not None


def test_a_reasoning_reply_thinks_freely_then_answers_in_json(client):
    """Thinking on: the indifferent model may open `<think>` (then it writes anything until it happens to close
    the block) or answer at once; either way the content is the JSON. Seeds are exact here (uniform draws)."""
    r = client.chat.completions.create(
        model="tiny-json", messages=[{"role": "user", "content": "Who?"}], response_format={"type": "json_object"},
        n=4, seed=0, max_tokens=900,
    )  # fmt: skip
    for c in r.choices:
        if c.finish_reason == "stop":
            assert isinstance(json.loads(c.message.content), dict)
    assert any(c.message.reasoning_content for c in r.choices if c.finish_reason == "stop")


def test_responses_text_format_is_honoured_and_echoed(client):
    fmt = {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}
    r = client.responses.create(model="tiny-json", input="Who?", text={"format": fmt}, reasoning={"effort": "none"},
                                max_output_tokens=400, temperature=1.0)  # fmt: skip
    jsonschema.validate(json.loads(r.output_text), PERSON)
    assert r.text.format.type == "json_schema" and r.text.format.name == "person"


def test_a_schema_the_grammar_cannot_enforce_gets_a_400_naming_it(server):
    bad = {"type": "object", "properties": {"when": {"type": "string"}}, "if": {"required": ["when"]}, "then": {}}
    body = {"messages": [{"role": "user", "content": "hi"}], "response_format": json_schema(bad)}
    r = httpx.post(server.base_url + "/chat/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    check("/v1/chat/completions", 400, r.json())
    err = r.json()["error"]
    assert err["param"] == "response_format.json_schema.schema" and "'if'" in err["message"], err
    body = {"input": "hi", "text": {"format": {"type": "json_schema", "schema": PERSON}}}  # no name
    r = httpx.post(server.base_url + "/responses", json=body, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "text.format.name", r.text
