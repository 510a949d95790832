"""Tool calling, piece by piece: the chat template's DeepSeek-V3 tool format (byte-exact), the tool tokens, the
parser (whole text = streamed pieces; a bad call is text), the request checks, SFT masks and the calculator task."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator

import pytest

from nanoseek.data.chat import chat_example, load_conversations
from nanoseek.data.shards import iter_documents
from nanoseek.infer.engine_loop import Update
from nanoseek.infer.reasoning import ReasoningSplitter
from nanoseek.infer.server.metrics import ServerMetrics, Timing
from nanoseek.infer.server.openai import APIError, ChatRequest, Choice, validate
from nanoseek.infer.server.responses import (
    OUTPUT_LOGPROBS,
    Reply,
    ResponsesRequest,
    TextTokens,
    response_body,
    response_events,
    response_meta,
)
from nanoseek.infer.tools import ToolCallParser, call_style, check_call, parse_tool_calls, prefill, stream_fragments
from nanoseek.tasks.calculator import TOOL, calculate
from nanoseek.tokenizer import (
    ASSISTANT,
    BOS,
    CHAT_TEMPLATE,
    EOS,
    SPECIAL_TOKENS,
    TOOL_TOKENS,
    USER,
    Tokenizer,
    train_tokenizer,
)

CALCS, CALC, CALC_END, CALCS_END, SEP = "<｜tool▁calls▁begin｜>", "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁calls▁end｜>", "<｜tool▁sep｜>"  # fmt: skip
OUTS, OUT, OUT_END, OUTS_END = "<｜tool▁outputs▁begin｜>", "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>", "<｜tool▁outputs▁end｜>"  # fmt: skip
SCHEMAS = {"calculator": TOOL["function"]["parameters"]}
WEATHER = {
    "type": "function",
    "function": {"name": "weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
}


def call(i: int, name: str, arguments: str) -> dict:
    return {"id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": arguments}}


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+3 and the weather in Oslo?"},
    {
        "role": "assistant",
        "content": "<think>two tools</think>Checking.",
        "tool_calls": [call(0, "calculator", '{"expression": "2+3"}'), call(1, "weather", '{"city": "Oslo"}')],
    },
    {"role": "tool", "tool_call_id": "call_0", "content": "5"},
    {"role": "tool", "tool_call_id": "call_1", "content": "rain"},
    {"role": "assistant", "content": "5, and rain."},
]


# ------------------------------------------------------------------------------------------------ the template
def test_template_writes_deepseek_v3_tool_calls_and_results_byte_exact(wide_tok):
    text = wide_tok.apply_chat_template(CONVERSATION, tools=[TOOL, WEATHER])
    tools = (
        "## Tools\nYou have access to the following tools:\n"
        "\n### calculator\nDescription: Evaluate an arithmetic expression.\n\nParameters: "
        '{"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}\n'
        '\n### weather\nDescription: \n\nParameters: {"type": "object", "properties": {"city": {"type": "string"}}}\n'
    )
    calls = (
        f'{CALCS}{CALC}function{SEP}calculator\n```json\n{{"expression": "2+3"}}\n```{CALC_END}\n'
        f'{CALC}function{SEP}weather\n```json\n{{"city": "Oslo"}}\n```{CALC_END}{CALCS_END}'
    )
    results = f"{OUTS}{OUT}5{OUT_END}{OUT}rain{OUT_END}{OUTS_END}"
    history = f"{BOS}Be brief.\n\n{tools}{USER}What is 2+3 and the weather in Oslo?{ASSISTANT}Checking.{calls}{EOS}"
    assert text == f"{history}{results}5, and rain.{EOS}"  # earlier reasoning dropped, as R1's template does
    # a prompt that ends in results ends there: the answer follows with no role tag
    prompt = wide_tok.apply_chat_template(CONVERSATION[:-1], add_generation_prompt=True, tools=[TOOL, WEATHER])
    assert prompt == history + results
    off = wide_tok.apply_chat_template(CONVERSATION[:-1], True, tools=[TOOL, WEATHER], thinking=False)
    assert off == prompt + "<think></think>"
    # arguments given as an object are written as JSON; no tools, no tools section
    as_object = [CONVERSATION[1], {"role": "assistant", "content": None, "tool_calls": [call(0, "f", {"a": "<1>"})]}]
    assert wide_tok.apply_chat_template(as_object).endswith(
        f'{ASSISTANT}{CALCS}{CALC}function{SEP}f\n```json\n{{"a": "<1>"}}\n```{CALC_END}{CALCS_END}{EOS}'
    )
    assert "## Tools" not in wide_tok.apply_chat_template(CONVERSATION)


def test_template_matches_autotokenizer_with_tools(wide_tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    wide_tok.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for messages, gen in ((CONVERSATION, False), (CONVERSATION[:-1], True), (CONVERSATION[:2], True)):
        ours = wide_tok.apply_chat_template(messages, add_generation_prompt=gen, tools=[TOOL, WEATHER])
        theirs = hf.apply_chat_template(messages, tools=[TOOL, WEATHER], tokenize=False, add_generation_prompt=gen)
        assert theirs == ours


def test_tool_tokens_are_single_special_tokens_and_old_tokenizers_still_load(wide_tok, tmp_path, monkeypatch):
    ids = [wide_tok.encode(t) for t in TOOL_TOKENS]
    assert all(len(i) == 1 for i in ids) and sorted(i[0] for i in ids) == list(range(7, 16))
    assert SPECIAL_TOKENS[:7] == [BOS, EOS, "<｜▁pad▁｜>", USER, ASSISTANT, "<think>", "</think>"]
    # a tokenizer saved before the tool tokens (and its template) loads, with the same ids, and says it has none
    monkeypatch.setattr("nanoseek.tokenizer.SPECIAL_TOKENS", SPECIAL_TOKENS[:7])
    old = train_tokenizer(["What is 2+3? <think>2+3=5</think> 5"] * 20, vocab_size=300)
    monkeypatch.undo()
    old_template = (  # the shape of our template before tool calls
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}"
        "{% else %}{{ '<｜Assistant｜>' + m['content'] + eos_token }}{% endif %}{% endfor %}"
    )
    Tokenizer(old._tk, {"chat_template": old_template}).save(tmp_path)
    loaded = Tokenizer.from_pretrained(tmp_path)
    assert (loaded.bos_id, loaded.eos_id, loaded.think_end_id) == (0, 1, 6) and loaded.tool_calls_begin_id is None
    assert not loaded.renders_tool_calls and not loaded.renders_tools
    assert wide_tok.renders_tool_calls and wide_tok.renders_tools
    assert wide_tok.render_tools([TOOL]).startswith("## Tools\n") and "### calculator" in wide_tok.render_tools([TOOL])


# -------------------------------------------------------------------------------------------------- the parser
V3_CALL = f'{CALC}function{SEP}calculator\n```json\n{{"expression": "2+3"}}\n```{CALC_END}'
BAD_CALLS = {
    "not JSON": f'{CALC}function{SEP}calculator\n```json\n{{"expression": "2+3"\n```{CALC_END}',
    "not an object": f"{CALC}function{SEP}calculator\n```json\n[1]\n```{CALC_END}",
    "missing key": f'{CALC}function{SEP}calculator\n```json\n{{"expr": "2"}}\n```{CALC_END}',
    "wrong type": f'{CALC}function{SEP}calculator\n```json\n{{"expression": 5}}\n```{CALC_END}',
    "unknown tool": f'{CALC}function{SEP}search\n```json\n{{"q": "x"}}\n```{CALC_END}',
    "no separator": f"{CALC}calculator{CALC_END}",
}


def streamed(text: str, rng: random.Random, **kw) -> tuple[str, list]:
    """Feed text in random pieces (1-6 characters, or whole special tokens as the engine releases them)."""
    parser, content, i = ToolCallParser(SCHEMAS, **kw), "", 0
    while i < len(text):
        n = rng.randint(1, 6)
        content += parser.feed(text[i : i + n])[0]
        i += n
    return content + parser.feed("", final=True)[0], parser.calls


def test_calls_are_parsed_the_same_whole_and_streamed():
    rng = random.Random(0)
    text = f"Let me compute.{CALCS}{V3_CALL}\n{V3_CALL.replace('2+3', '4*5')}{CALCS_END}"
    content, calls = parse_tool_calls(text, SCHEMAS)
    assert content == "Let me compute." and [c.arguments for c in calls] == [
        '{"expression": "2+3"}',
        '{"expression": "4*5"}',
    ]
    assert all(c.name == "calculator" and c.id.startswith("call_") and len(c.id) == 29 for c in calls)
    for _ in range(50):
        got, got_calls = streamed(text, rng)
        assert got == content and [(c.name, c.arguments) for c in got_calls] == [(c.name, c.arguments) for c in calls]
        for k, c in enumerate(got_calls):  # the fragments rebuild the call
            frags = stream_fragments(k, c)
            assert frags[0] == {
                "index": k,
                "id": c.id,
                "type": "function",
                "function": {"name": "calculator", "arguments": ""},
            }
            assert "".join(f["function"]["arguments"] for f in frags) == c.arguments and all(
                f["index"] == k for f in frags
            )


def test_a_call_that_does_not_fit_its_tool_is_text_never_a_call():
    rng = random.Random(1)
    for why, bad in BAD_CALLS.items():
        text = f"{CALCS}{bad}\n{V3_CALL}{CALCS_END}"
        content, calls = parse_tool_calls(text, SCHEMAS)
        assert content == bad and len(calls) == 1, why  # the bad one as written, the good one still a call
        assert streamed(text, rng)[0] == content, why
    assert check_call("calculator", '{"expression": "1"}', SCHEMAS) is None
    assert "required" in check_call("calculator", "{}", SCHEMAS)
    strict = {"f": {"type": "object", "properties": {"n": {"type": "integer"}}, "additionalProperties": False}}
    assert check_call("f", '{"n": 2.0}', strict) is None and "'m' was unexpected" in check_call("f", '{"m": 1}', strict)
    assert "type" in check_call("f", '{"n": true}', strict)
    cut = f"{CALCS}{V3_CALL[: -len(CALC_END) - 5]}"  # cut off mid-call (max_tokens): what was written is text
    assert parse_tool_calls(cut, SCHEMAS) == (cut[len(CALCS) :], [])


def test_v31_calls_prefill_and_parallel_tool_calls_false():
    v31 = f'{CALCS}{CALC}calculator{SEP}{{"expression": "1+1"}}{CALC_END}{CALCS_END}'
    assert [(c.name, c.arguments) for c in parse_tool_calls(v31, SCHEMAS)[1]] == [
        ("calculator", '{"expression": "1+1"}')
    ]
    assert call_style(CHAT_TEMPLATE) == "v3" and call_style("{{ m['tool_calls'] }} NAME<sep>ARGS") == "v3.1"
    assert prefill("v3") == f"{CALCS}{CALC}function{SEP}"
    assert prefill("v3", "calculator") == f"{CALCS}{CALC}function{SEP}calculator\n```json\n"
    assert prefill("v3.1", "calculator") == f"{CALCS}{CALC}calculator{SEP}"
    # a forced call: the parser starts from the prefill, which the client never sees
    rest = '{"expression": "7"}\n```' + CALC_END + CALCS_END
    content, calls = parse_tool_calls(rest, SCHEMAS, prefix=prefill("v3", "calculator"))
    assert content == "" and calls[0].arguments == '{"expression": "7"}'
    two = f"{CALCS}{V3_CALL}\n{V3_CALL}{CALCS_END}"
    content, calls = parse_tool_calls(two, SCHEMAS, max_calls=1)
    assert len(calls) == 1 and content == V3_CALL  # the second is reported as text, not dropped


ORDER = {  # a tool whose arguments nest: an object holding an array of objects with an enum and required keys
    "type": "object",
    "properties": {
        "customer": {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]},
        "items": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "properties": {"sku": {"type": "string"}, "size": {"enum": ["S", "M", "L"]}, "qty": {"type": "integer"}},
                "required": ["sku", "qty"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["customer", "items"],
}  # fmt: skip


@pytest.mark.parametrize(
    "arguments, why",
    [
        ('{"customer": {"name": "Ada"}, "items": [{"sku": "a1", "qty": 2, "size": "M"}]}', None),
        ('{"customer": {"name": "Ada"}, "items": [{"sku": "a1", "qty": 2, "size": "XL"}]}', "arguments.items.0.size: 'XL' is not one of"),
        ('{"customer": {"name": "Ada"}, "items": [{"sku": "a1"}]}', "arguments.items.0: 'qty' is a required property"),
        ('{"customer": {"name": "Ada"}, "items": [{"sku": "a1", "qty": "2"}]}', "arguments.items.0.qty: '2' is not of type 'integer'"),
        ('{"customer": {"name": "Ada"}, "items": [{"sku": "a1", "qty": 1, "colour": "red"}]}', "'colour' was unexpected"),
        ('{"customer": {}, "items": [{"sku": "a1", "qty": 1}]}', "arguments.customer: 'name' is a required property"),
        ('{"customer": {"name": "Ada"}, "items": []}', "arguments.items: [] should be non-empty"),
        ('{"customer": {"name": "Ada"}, "items": [{"sku": "a1", "qty": NaN}]}', "not JSON"),
    ],
)  # fmt: skip
def test_nested_arguments_are_checked_against_the_whole_schema(arguments, why):
    got = check_call("order", arguments, {"order": ORDER})
    assert got == why if why is None else why in got, got
    text = f"{CALCS}{CALC}function{SEP}order\n```json\n{arguments}\n```{CALC_END}{CALCS_END}"
    content, calls = parse_tool_calls(text, {"order": ORDER})
    if why is None:  # a good call is parsed, a bad one comes back as the text the model wrote
        assert content == "" and [(c.name, c.arguments) for c in calls] == [("order", arguments)]
    else:
        assert calls == [] and content == text[len(CALCS) : -len(CALCS_END)]


def test_a_schema_that_cannot_check_its_arguments_turns_every_call_to_text():
    nowhere = {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}
    assert "cannot be checked" in check_call("f", '{"a": 1}', {"f": nowhere})
    assert check_call("f", "{}", {"f": nowhere}) is None  # the reference is only followed where arguments go
    assert "RecursionError" in check_call("f", "{}", {"f": {"$ref": "#"}})


# ----------------------------------------------------------------------------------------------- request checks
def tool_use(**body):
    req = validate(ChatRequest, {"messages": [{"role": "user", "content": "hi"}], **body})
    return req.tool_use()


def test_tool_choice_variants():
    assert tool_use() is None and tool_use(tools=[TOOL], tool_choice="none") is None
    auto = tool_use(tools=[TOOL, WEATHER])
    assert auto.forced is None and auto.max_calls is None and set(auto.schemas) == {"calculator", "weather"}
    assert tool_use(tools=[TOOL], tool_choice="required").forced == "required"
    named = tool_use(tools=[TOOL, WEATHER], tool_choice={"type": "function", "function": {"name": "weather"}})
    assert named.forced == "weather" and tool_use(tools=[TOOL], parallel_tool_calls=False).max_calls == 1


@pytest.mark.parametrize(
    "body, param, words",
    [
        ({"tools": []}, "tools", "non-empty list"),
        ({"tools": {"type": "function"}}, "tools", "non-empty list"),
        ({"tools": [{"name": "f"}]}, "tools.0", "not a function tool"),
        ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools.0.type", "only 'function'"),
        ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools.0.function.name", "1-64 letters"),
        ({"tools": [TOOL, TOOL]}, "tools.1.function.name", "defined twice"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]}, "tools.0.function.parameters", "JSON Schema object"),
        ({"tools": [{"type": "function", "function": {"name": "f", "description": 1}}]}, "tools.0.function.description", "string"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "required": "x"}}}]}, "tools.0.function.parameters", "not a valid JSON Schema (required: 'x' is not of type 'array')"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": {"$ref": "https://example.com/a.json"}}}}}]}, "tools.0.function.parameters", "only references within the schema"),
        ({"tools": [{"type": "function", "function": {"name": "f", "strict": "yes"}}]}, "tools.0.function.strict", "true or false"),
        ({"tool_choice": "required"}, "tool_choice", "no tools were sent"),
        ({"tools": [TOOL], "tool_choice": "any"}, "tool_choice", '"none", "auto", "required"'),
        ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice", "no tool named 'f'"),
        ({"tools": [TOOL], "tool_choice": {"type": "function"}}, "tool_choice", '{"type": "function"'),
    ],
)  # fmt: skip
def test_malformed_tool_requests_get_a_400_naming_the_field_and_the_fix(body, param, words):
    with pytest.raises(APIError) as e:
        tool_use(**body)
    assert e.value.status == 400 and e.value.param == param and words in e.value.message, e.value.message


def test_tool_results_must_answer_a_call():
    user = {"role": "user", "content": "hi"}
    asked = {"role": "assistant", "content": None, "tool_calls": [call(0, "calculator", "{}")]}
    ok = validate(ChatRequest, {"messages": [user, asked, {"role": "tool", "tool_call_id": "call_0", "content": "1"}]})
    assert ok.tool_use() is None and ok.messages[1].for_template()["tool_calls"][0]["function"]["name"] == "calculator"
    for messages, param in (
        ([user, {"role": "tool", "tool_call_id": "call_0", "content": "1"}], "messages.1"),
        ([user, asked, {"role": "tool", "content": "1"}], "messages.2.tool_call_id"),
    ):
        with pytest.raises(APIError) as e:
            validate(ChatRequest, {"messages": messages}).tool_use()
        assert e.value.param == param


# ------------------------------------------------------------------------------------------ the Responses API
FLAT = {"type": "function", **TOOL["function"]}  # the Responses API's shape of the same tool


def responses_request(**body) -> ResponsesRequest:
    return validate(ResponsesRequest, {"input": "hi", **body})


def test_responses_tools_are_chats_tools_in_the_flat_shape():
    chat = tool_use(tools=[TOOL, WEATHER], tool_choice={"type": "function", "function": {"name": "weather"}})
    flat_weather = {"type": "function", **WEATHER["function"], "strict": True}
    use = responses_request(
        tools=[FLAT, flat_weather], tool_choice={"type": "function", "name": "weather"}, parallel_tool_calls=False
    ).tool_use()
    assert (use.schemas, use.forced, use.max_calls) == (chat.schemas, "weather", 1)
    assert use.tools[0] == TOOL  # the prompt shows it as chat's tool
    assert responses_request(tools=[FLAT], tool_choice="required").tool_use().forced == "required"
    assert responses_request(tools=[FLAT], tool_choice="none").tool_use() is None
    assert responses_request().tool_use() is None


@pytest.mark.parametrize(
    "body, param, words",
    [
        ({"tools": [TOOL]}, "tools.0.name", "tools are flat"),  # chat's nested shape
        ({"tools": [{"type": "function", "name": "a b"}]}, "tools.0.name", "1-64 letters"),
        ({"tools": [{"type": "web_search"}]}, "tools.0.type", "only 'function'"),
        ({"tools": [FLAT, FLAT]}, "tools.1.name", "defined twice"),
        ({"tools": [{**FLAT, "parameters": {"type": "object", "properties": {"n": {"type": "integr"}}}}]}, "tools.0.parameters", "not a valid JSON Schema"),
        ({"tools": [{**FLAT, "strict": 1}]}, "tools.0.strict", "true or false"),
        ({"tools": [FLAT], "tool_choice": {"type": "function", "function": {"name": "calculator"}}}, "tool_choice", '{"type": "function", "name": "..."}'),
        ({"tools": [FLAT], "tool_choice": {"type": "function", "name": "f"}}, "tool_choice", "no tool named 'f'"),
        ({"tool_choice": "required"}, "tool_choice", "no tools were sent"),
    ],
)  # fmt: skip
def test_malformed_responses_tools_get_a_400_naming_the_flat_field(body, param, words):
    with pytest.raises(APIError) as e:
        responses_request(**body).tool_use()
    assert e.value.status == 400 and e.value.param == param and words in e.value.message, e.value.message


def test_function_call_items_render_as_chats_calls_and_results(wide_tok):
    """CONVERSATION's turns as Responses input items give the very messages (and prompt) chat gives."""
    calls = CONVERSATION[2]["tool_calls"]
    items = [
        CONVERSATION[1],
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Checking."}]},
        *[{"type": "function_call", "call_id": c["id"], **c["function"], "status": "completed"} for c in calls],
        {"type": "function_call_output", "call_id": "call_0", "output": "5"},
        {"type": "function_call_output", "call_id": "call_1", "output": [{"type": "input_text", "text": "rain"}]},
    ]
    req = responses_request(input=items, instructions="Be brief.")
    history = [*CONVERSATION[:2], {**CONVERSATION[2], "content": "Checking."}, *CONVERSATION[3:5]]
    chat = validate(ChatRequest, {"messages": history})
    assert req.messages() == [m.for_template() for m in chat.messages]
    only_calls = responses_request(input=[items[0], items[3], items[5]]).messages()
    assert only_calls[1] == {"role": "assistant", "content": "", "tool_calls": calls[:1]}
    assert wide_tok.apply_chat_template(only_calls, True).endswith(f"{CALCS_END}{EOS}{OUTS}{OUT}5{OUT_END}{OUTS_END}")
    for bad, param, words in [
        ([items[0], items[5]], "input.1", "must follow the function_call"),
        ([items[0], {"type": "function_call", "call_id": "c", "name": "f"}], "input.1.arguments", "needs its arguments"),
        ([items[0], items[3], {"type": "function_call_output", "call_id": "c"}], "input.2.output", "needs its output"),
        ([items[0], items[3], {**items[5], "output": [{"type": "input_image", "image_url": "x"}]}], "input.2.output.0", "text only"),
        ([{"type": "item_reference", "id": "x"}], "input.0", "not supported"),
    ]:  # fmt: skip
        with pytest.raises(APIError) as e:
            responses_request(input=bad).messages()
        assert e.value.param == param and words in e.value.message, e.value.message


def test_output_text_logprobs_are_the_tokens_outside_thinking_and_calls(wide_tok):
    think, end = wide_tok.think_start_id, wide_tok.think_end_id
    calls, calls_end = wide_tok.tool_calls_begin_id, wide_tok.tool_calls_end_id
    a, b, c = (wide_tok.encode(ch)[0] for ch in "xyz")

    def kept(ids, **kw):
        args = dict(thinks=True, starts_in_think=False, tools=True, in_call=False) | kw
        return [e[0] for e in TextTokens(wide_tok, **args).take([(t, -1.0, {}) for t in ids])]

    assert kept([think, a, end, b, calls, c, calls_end, a]) == [b, a]
    assert kept([a, end, b], starts_in_think=True) == [b]  # the prompt opened the block
    assert kept([a, b]) == [a, b]  # a reply that does not open with <think> never thinks
    assert kept([c, calls_end, a], in_call=True) == [a]  # a forced call: the prompt opened it
    assert kept([calls, a], tools=False) == [calls, a]  # no tools: the marker is only text


REPLY_AFTER_CALL = (
    f'<think>plan</think>Let me check.{CALCS}{CALC}calculator{SEP}{{"expression": "2+3"}}{CALC_END}{CALCS_END} Done.'
)


async def _scripted(tok: Tokenizer, text: str, per_update: int) -> AsyncIterator[tuple[int, Update]]:
    """The engine's updates for a reply that writes `text`: `per_update` tokens each (more than one: accepted
    MTP drafts), the whole text so far, a log-prob per token."""
    ids = tok.encode(text)
    for i in range(0, len(ids), per_update):
        new = ids[i : i + per_update]
        done = "stop" if i + per_update >= len(ids) else None
        yield 0, Update(tok.decode(ids[: i + per_update]), new, [-0.5] * len(new), [{t: -0.5} for t in new], done)


def _reply(tok: Tokenizer) -> Reply:
    req = responses_request(tools=[FLAT], include=[OUTPUT_LOGPROBS], top_logprobs=1)
    choice = Choice(0, ReasoningSplitter(), [])
    choice.tools = req.tool_use().parser()
    return Reply(response_meta("m"), req, choice, 5, tok, TextTokens(tok, True, False, True, False))


def _items(output: list[dict]) -> list[dict]:
    """Output items without their random ids, a message's logprobs as its tokens' texts."""
    items = []
    for item in output:
        item = {k: v for k, v in item.items() if k not in ("id", "call_id")}
        if item["type"] == "message":
            part = item["content"][0]
            item["content"] = [{**part, "logprobs": [e["token"] for e in part["logprobs"]]}]
        items.append(item)
    return items


@pytest.mark.parametrize("per_update", [1, 2, 3])
def test_responses_body_and_stream_list_text_after_calls_as_a_second_message(wide_tok, per_update):
    """A reply that writes text after its calls: the whole body and the stream's completed response both list
    reasoning, message, function_call, message, in the order written, each message with its own tokens'
    logprobs."""
    metrics = ServerMetrics("m")

    async def both() -> tuple[dict, list[dict]]:
        body = await response_body(_reply(wide_tok), _scripted(wide_tok, REPLY_AFTER_CALL, per_update), Timing(metrics))
        stream = _reply(wide_tok)
        raw = [
            e async for e in response_events(stream, _scripted(wide_tok, REPLY_AFTER_CALL, per_update), Timing(metrics))
        ]
        return body, [json.loads(e.decode().split("data: ", 1)[1]) for e in raw]

    body, events = asyncio.run(both())
    completed = events[-1]
    assert completed["type"] == "response.completed"
    assert _items(body["output"]) == _items(completed["response"]["output"])
    assert [e["item"]["type"] for e in events if e["type"] == "response.output_item.done"] == [
        i["type"] for i in body["output"]
    ]  # the items as the stream announced them
    kinds = [
        (i["type"], i["name"] if i["type"] == "function_call" else i["content"][0]["text"]) for i in body["output"]
    ]
    assert kinds == [
        ("reasoning", "plan"),
        ("message", "Let me check."),
        ("function_call", "calculator"),
        ("message", " Done."),
    ]
    for item in _items(body["output"]):
        if item["type"] == "message":  # its logprobs are its own tokens: they spell its text
            assert "".join(item["content"][0]["logprobs"]) == item["content"][0]["text"]
    assert body["output"][2]["arguments"] == '{"expression": "2+3"}'


# ------------------------------------------------------------------------------------------------ data and SFT
def test_sft_targets_are_the_assistants_calls_and_answers_never_tool_results(wide_tok):
    conversation = {"messages": CONVERSATION[1:], "tools": [TOOL, WEATHER]}
    ids, is_target = chat_example(wide_tok, conversation)
    assert ids == wide_tok.encode_chat(CONVERSATION[1:], tools=[TOOL, WEATHER])
    spans, run = [], []
    for i, t in zip(ids, is_target):
        if t:
            run.append(i)
        elif run:
            spans, run = spans + [wide_tok.decode(run)], []
    spans += [wide_tok.decode(run)] if run else []
    # the first turn has reasoning the template drops from history: context, not a target (as for plain chats)
    assert spans == [f"5, and rain.{EOS}"]
    plain = {
        "messages": [{**m, "content": m["content"].split("</think>")[-1]} for m in CONVERSATION[1:]],
        "tools": [TOOL],
    }
    ids, is_target = chat_example(wide_tok, plain)
    text = wide_tok.decode([i for i, t in zip(ids, is_target) if t])
    assert text.startswith("Checking." + CALCS) and text.endswith(f"{CALCS_END}{EOS}5, and rain.{EOS}")
    assert "rain" + OUT_END not in text and "## Tools" not in text


def test_jsonl_conversations_with_tools_and_the_calculator_task(tmp_path):
    line = {"messages": CONVERSATION, "tools": [TOOL, WEATHER]}
    (tmp_path / "chats.jsonl").write_text(json.dumps(line) + "\n" + json.dumps({"messages": CONVERSATION[:2]}) + "\n")
    docs = [d for d, _ in iter_documents([tmp_path / "chats.jsonl"])]
    assert docs[0]["tools"] == [TOOL, WEATHER] and docs[0]["messages"][2]["tool_calls"] == CONVERSATION[2]["tool_calls"]
    assert isinstance(docs[1], list)
    bad = dict(line, messages=[CONVERSATION[1], {"role": "assistant", "content": None, "tool_calls": [{"name": "f"}]}])
    (tmp_path / "bad.jsonl").write_text(json.dumps(bad) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: bad messages: messages\[1\] assistant tool_calls are"):
        list(iter_documents([tmp_path / "bad.jsonl"]))
    args = {"data": "builtin:calculator", "n": 40, "data_seed": 0, "worked_fraction": 1.0, "levels": ["2x1"]}
    conv = load_conversations(args, "train")
    assert len(conv) == 40 and all(c["tools"] == [TOOL] for c in conv)
    user, asked, result, answer = conv[0]["messages"]
    expression = json.loads(asked["tool_calls"][0]["function"]["arguments"])["expression"]
    assert user["content"] == f"What is {expression}?" and result["content"] == answer["content"] == calculate(
        expression
    )
    assert (calculate("2+3*4"), calculate("7/2"), calculate("(1")[:6]) == ("14", "3.5", "error:")


def test_templates_without_tools_get_them_in_the_system_prompt_and_older_ones_a_400(wide_tok):
    from types import SimpleNamespace

    from nanoseek.infer.server.app import Server

    deepseek_like = (  # renders calls, not `tools`: DeepSeek's own templates expect them in the system prompt
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}"
        "{% elif m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}{% elif m['tool_calls'] %}{{ 'calls' }}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
    )
    server = SimpleNamespace(tok=Tokenizer(wide_tok._tk, {"chat_template": deepseek_like}), reasoning=False)
    use = tool_use(tools=[TOOL], tool_choice="required")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    text, ids, forced = Server.chat_prompt(server, messages, True, None, use)
    defs = wide_tok.render_tools([TOOL])
    assert forced == prefill("v3.1") and text == f"{BOS}Be brief.\n\n{defs}{USER}hi{ASSISTANT}{forced}"
    assert ids == wide_tok.encode(text)
    assert Server.chat_prompt(server, messages[1:], True, None, use)[0].startswith(f"{BOS}{defs}{USER}hi")
    server.tok = Tokenizer(wide_tok._tk, {"chat_template": deepseek_like.replace("m['tool_calls']", "false")})
    with pytest.raises(APIError, match="cannot render tool calls") as e:
        Server.chat_prompt(server, messages, True, None, use)
    assert e.value.param == "tools"
