import json

import pytest

from nanoseek.data.tasks import builtin_corpus
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

MIXED = (
    f"{USER}What is 8+79*9-66? 12345 and 3.14159!\n\n  Indented line:\tTAB, 'quotes' (parens) [x]{{y}}\r\n"
    f"你好世界，ひらがなカタカナ 漢字 Ünïcödé — ½ ²{ASSISTANT}{THINK_START}79*9=711{THINK_END} 653{EOS}"
)
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+3?"},
    {"role": "assistant", "content": "<think>2+3=5</think> 5"},
    {"role": "user", "content": "And 4*5?"},
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    texts = builtin_corpus(300, seed=0) + [MIXED.replace(USER, "")] * 20 + ["The quick brown fox, 1999.\n"] * 20
    return train_tokenizer(texts, vocab_size=600)


@pytest.fixture(scope="module")
def saved(tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    tok.save(d)
    return d


def test_special_token_ids_match_deepseek_layout(tok):
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    for token, i in [(BOS, 0), (EOS, 1), (PAD, 2)]:
        assert tok.id_to_token(i) == token
    named = {tok.user_id, tok.assistant_id, tok.think_start_id, tok.think_end_id}
    assert len(named) == 4 and all(3 <= i < 7 for i in named)
    assert tok.encode(THINK_START + THINK_END) == [tok.think_start_id, tok.think_end_id]


def test_vocab_has_no_multi_digit_token_and_digits_encode_one_per_token(tok):
    assert multi_digit_tokens(tok) == []
    ids = tok.encode("1999 12345")
    assert [tok.decode([i]) for i in ids] == ["1", "9", "9", "9", " ", "1", "2", "3", "4", "5"]


def test_round_trip_decode(tok):
    assert tok.decode(tok.encode(MIXED)) == MIXED
    assert tok.decode(tok.encode("hi", bos=True, eos=True), skip_special_tokens=True) == "hi"
    assert tok.encode("hi", bos=True, eos=True)[0] == 0 and tok.encode("hi", eos=True)[-1] == 1


def test_autotokenizer_loads_saved_dir_and_matches_ids(tok, saved):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(saved))
    assert hf(MIXED, add_special_tokens=False)["input_ids"] == tok.encode(MIXED)
    assert hf(MIXED)["input_ids"] == tok.encode(MIXED, bos=True)  # add_bos_token, as DeepSeek
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2)
    assert hf.decode(tok.encode(MIXED)) == MIXED


def test_chat_template_matches_autotokenizer(tok, saved):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(saved))
    for gen in (False, True):
        ours = tok.apply_chat_template(CHAT, add_generation_prompt=gen)
        assert hf.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=gen) == ours
        hf_ids = hf.apply_chat_template(CHAT, add_generation_prompt=gen)
        hf_ids = hf_ids["input_ids"] if not isinstance(hf_ids, list) else hf_ids
        assert hf_ids == tok.encode_chat(CHAT, add_generation_prompt=gen)


def test_chat_template_renders_deepseek_r1_format(tok):
    text = tok.apply_chat_template(CHAT, add_generation_prompt=True)
    # earlier turns lose their reasoning; generation prompt is plain <｜Assistant｜>
    assert text == f"{BOS}Be brief.{USER}What is 2+3?{ASSISTANT} 5{EOS}{USER}And 4*5?{ASSISTANT}"
    sft = tok.apply_chat_template(CHAT[1:3])
    assert sft == f"{BOS}{USER}What is 2+3?{ASSISTANT}<think>2+3=5</think> 5{EOS}"
    ids = tok.encode_chat(CHAT[1:3])
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1 and ids[-1] == tok.eos_id
    prompt = tok.encode_chat(CHAT[1:2], add_generation_prompt=True)
    assert ids[: len(prompt)] == prompt  # SFT can mask the prompt by its length
    with pytest.raises(ValueError, match="unknown role"):
        tok.apply_chat_template([{"role": "robot", "content": "x"}])


def test_small_vocab_on_builtin_corpus():
    tok = train_tokenizer(builtin_corpus(200, seed=1), vocab_size=300)
    assert 263 <= tok.vocab_size <= 300
    text = builtin_corpus(5, seed=2)[0]
    assert tok.decode(tok.encode(text)) == text
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer(["abc"], vocab_size=100)


def test_save_load_round_trip_and_stable_hash(tok, saved):
    loaded = Tokenizer.from_pretrained(saved)
    assert loaded.hash() == tok.hash()
    assert loaded.encode(MIXED) == tok.encode(MIXED)
    assert loaded.apply_chat_template(CHAT) == tok.apply_chat_template(CHAT)
    config = json.loads((saved / "tokenizer_config.json").read_text())
    assert config["bos_token"] == BOS and config["eos_token"] == EOS and config["add_bos_token"] is True
    assert not list(saved.glob("*.tmp"))


def test_loads_a_plain_tokenizer_json_file(tok, tmp_path):
    (tmp_path / "tokenizer.json").write_text(tok.to_json())  # no tokenizer_config.json beside it
    loaded = Tokenizer.from_pretrained(tmp_path / "tokenizer.json")
    assert loaded.encode(MIXED) == tok.encode(MIXED)
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (0, 1, 2)
    assert loaded.apply_chat_template(CHAT) == tok.apply_chat_template(CHAT)  # default template


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer train"):
        Tokenizer.from_pretrained(tmp_path)


def test_cli_train_and_info(tmp_path, capsys):
    from nanoseek.cli import main

    (tmp_path / "a.txt").write_text("Hello world 123.\n" * 50)
    out = tmp_path / "tok"
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


def test_loads_deepseek_style_config_with_added_token_dicts(tok, tmp_path):
    (tmp_path / "tokenizer.json").write_text(tok.to_json())
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
