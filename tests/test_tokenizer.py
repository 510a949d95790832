import json

import pytest
from helpers import MIXED

from nanoseek.infer.reasoning import close_think
from nanoseek.tasks.problems import builtin_corpus
from nanoseek.tokenizer import (
    ASSISTANT,
    BOS,
    EOS,
    PAD,
    THINK_END,
    THINK_START,
    USER,
    Tokenizer,
    multi_digit_tokens,
    train_tokenizer,
)

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+3?"},
    {"role": "assistant", "content": "<think>2+3=5</think> 5"},
    {"role": "user", "content": "And 4*5?"},
]


@pytest.fixture(scope="module")
def saved(wide_tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("wide_tok")
    wide_tok.save(d)
    return d


def test_special_token_ids_match_deepseek_layout(wide_tok):
    assert (wide_tok.bos_id, wide_tok.eos_id, wide_tok.pad_id) == (0, 1, 2)
    for token, i in [(BOS, 0), (EOS, 1), (PAD, 2)]:
        assert wide_tok.id_to_token(i) == token
    named = {wide_tok.user_id, wide_tok.assistant_id, wide_tok.think_start_id, wide_tok.think_end_id}
    assert len(named) == 4 and all(3 <= i < 7 for i in named)
    assert wide_tok.encode(THINK_START + THINK_END) == [wide_tok.think_start_id, wide_tok.think_end_id]


def test_vocab_has_no_multi_digit_token_and_digits_encode_one_per_token(wide_tok):
    assert multi_digit_tokens(wide_tok) == []
    ids = wide_tok.encode("1999 12345")
    assert [wide_tok.decode([i]) for i in ids] == ["1", "9", "9", "9", " ", "1", "2", "3", "4", "5"]


def test_round_trip_decode(wide_tok):
    assert wide_tok.decode(wide_tok.encode(MIXED)) == MIXED
    assert wide_tok.decode(wide_tok.encode("hi", bos=True, eos=True), skip_special_tokens=True) == "hi"
    assert wide_tok.encode("hi", bos=True, eos=True)[0] == 0 and wide_tok.encode("hi", eos=True)[-1] == 1


def test_autotokenizer_loads_saved_dir_and_matches_ids(wide_tok, saved):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(saved))
    assert hf(MIXED, add_special_tokens=False)["input_ids"] == wide_tok.encode(MIXED)
    assert hf(MIXED)["input_ids"] == wide_tok.encode(MIXED, bos=True)  # add_bos_token, as DeepSeek
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2)
    assert hf.decode(wide_tok.encode(MIXED)) == MIXED


def test_chat_template_matches_autotokenizer(wide_tok, saved):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(saved))
    for gen in (False, True):
        ours = wide_tok.apply_chat_template(CHAT, add_generation_prompt=gen)
        assert hf.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=gen) == ours
        hf_ids = hf.apply_chat_template(CHAT, add_generation_prompt=gen)
        hf_ids = hf_ids["input_ids"] if not isinstance(hf_ids, list) else hf_ids
        assert hf_ids == wide_tok.encode_chat(CHAT, add_generation_prompt=gen)


def test_chat_template_renders_deepseek_r1_format(wide_tok):
    text = wide_tok.apply_chat_template(CHAT, add_generation_prompt=True)
    # earlier turns lose their reasoning; generation prompt is plain <｜Assistant｜>
    assert text == f"{BOS}Be brief.{USER}What is 2+3?{ASSISTANT} 5{EOS}{USER}And 4*5?{ASSISTANT}"
    sft = wide_tok.apply_chat_template(CHAT[1:3])
    assert sft == f"{BOS}{USER}What is 2+3?{ASSISTANT}<think>2+3=5</think> 5{EOS}"
    ids = wide_tok.encode_chat(CHAT[1:3])
    assert ids[0] == wide_tok.bos_id and ids.count(wide_tok.bos_id) == 1 and ids[-1] == wide_tok.eos_id
    prompt = wide_tok.encode_chat(CHAT[1:2], add_generation_prompt=True)
    assert ids[: len(prompt)] == prompt  # SFT can mask the prompt by its length
    with pytest.raises(ValueError, match="unknown role"):
        wide_tok.apply_chat_template([{"role": "robot", "content": "x"}])


def test_thinking_false_closes_an_empty_think_block_for_the_reply(wide_tok, saved):
    off = wide_tok.apply_chat_template(CHAT, add_generation_prompt=True, thinking=False)
    assert off == wide_tok.apply_chat_template(CHAT, add_generation_prompt=True) + "<think></think>"
    assert wide_tok.apply_chat_template(CHAT, add_generation_prompt=True, thinking=True).endswith(ASSISTANT)
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(saved))
    assert hf.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True, thinking=False) == off
    # templates without the switch: R1's opens the block (we close it), older ones get an empty one
    assert close_think("x<｜Assistant｜><think>\n") == "x<｜Assistant｜><think></think>"
    assert close_think("x<｜Assistant｜>") == "x<｜Assistant｜><think></think>"
    assert close_think(off) == off


def test_small_vocab_on_builtin_corpus():
    tok = train_tokenizer(builtin_corpus(200, seed=1), vocab_size=300)
    assert 263 <= tok.vocab_size <= 300
    text = builtin_corpus(5, seed=2)[0]
    assert tok.decode(tok.encode(text)) == text
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer(["abc"], vocab_size=100)


def test_save_load_round_trip_and_stable_hash(wide_tok, saved):
    loaded = Tokenizer.from_pretrained(saved)
    assert loaded.hash() == wide_tok.hash()
    assert loaded.encode(MIXED) == wide_tok.encode(MIXED)
    assert loaded.apply_chat_template(CHAT) == wide_tok.apply_chat_template(CHAT)
    config = json.loads((saved / "tokenizer_config.json").read_text())
    assert config["bos_token"] == BOS and config["eos_token"] == EOS and config["add_bos_token"] is True
    assert not list(saved.glob("*.tmp"))


def test_loads_a_plain_tokenizer_json_file(wide_tok, tmp_path):
    (tmp_path / "tokenizer.json").write_text(wide_tok.to_json())  # no tokenizer_config.json beside it
    loaded = Tokenizer.from_pretrained(tmp_path / "tokenizer.json")
    assert loaded.encode(MIXED) == wide_tok.encode(MIXED)
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (0, 1, 2)
    assert loaded.apply_chat_template(CHAT) == wide_tok.apply_chat_template(CHAT)  # default template


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer train"):
        Tokenizer.from_pretrained(tmp_path)


def test_cli_train_and_info(tmp_path, capsys):
    from nanoseek.cli.main import main

    (tmp_path / "a.txt").write_text("Hello world 123.\n" * 50)
    out = tmp_path / "wide_tok"
    assert (
        main(
            [
                "tokenizer",
                "train",
                "--out",
                str(out),
                "--input",
                str(tmp_path / "a.txt"),
                "--vocab-size",
                "300",
            ]
        )
        == 0
    )
    assert main(["tokenizer", "info", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "vocab size:" in printed and BOS in printed
    assert main(["tokenizer", "train", "--out", str(out)]) == 1  # no input: error, no traceback


def test_cli_builtin_takes_task_names_and_means_every_task_when_bare(tmp_path):
    from nanoseek.cli.main import main

    for names, tasks in (([], ("arithmetic", "countdown")), (["arithmetic"], ("arithmetic",))):
        out = tmp_path / "-".join(tasks)
        argv = ["tokenizer", "train", "--out", str(out), "--builtin", *names, "--n", "50", "--vocab-size", "300"]
        assert main(argv) == 0
        expected = train_tokenizer(builtin_corpus(50, seed=0, tasks=tasks), vocab_size=300)
        assert Tokenizer.from_pretrained(out).hash() == expected.hash()


def test_loads_deepseek_style_config_with_added_token_dicts(wide_tok, tmp_path):
    (tmp_path / "tokenizer.json").write_text(wide_tok.to_json())
    config = {  # the shape of a DeepSeek-V3/R1 checkpoint's tokenizer_config.json
        "tokenizer_class": "LlamaTokenizerFast",
        "add_bos_token": True,
        "bos_token": {"__type": "AddedToken", "content": BOS, "lstrip": False},
        "eos_token": {"__type": "AddedToken", "content": EOS, "lstrip": False},
        "pad_token": {"__type": "AddedToken", "content": EOS, "lstrip": False},
        "chat_template": "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}",
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    loaded = Tokenizer.from_pretrained(tmp_path)
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (0, 1, 1)
    assert loaded.apply_chat_template([{"role": "user", "content": "hi"}]) == f"{BOS}hi"


def test_a_tokenizer_without_tool_tokens_keeps_the_other_ids():
    """`tools=False` (the speedrun's arithmetic tokenizer) leaves out only the nine tool-call tokens: the merges
    then start 9 ids earlier, and no tool token encodes as one id."""
    from nanoseek.tokenizer import TOOL_CALLS_BEGIN

    texts = builtin_corpus(100, seed=0)
    with_tools, without = train_tokenizer(texts, vocab_size=320), train_tokenizer(texts, vocab_size=320, tools=False)
    assert without.tool_calls_begin_id is None and with_tools.tool_calls_begin_id is not None
    assert len(without.encode(TOOL_CALLS_BEGIN)) > 1 and with_tools.encode(TOOL_CALLS_BEGIN) == [
        with_tools.tool_calls_begin_id
    ]
    assert without.bos_id == with_tools.bos_id and without.eos_id == with_tools.eos_id
