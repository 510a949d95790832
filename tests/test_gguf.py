"""GGUF export, checked by llama.cpp itself (llama-cpp-python): the file loads, tokenizes like us, computes our
logits and greedy continuations, and carries our chat template; configs llama.cpp would run differently are refused."""

from __future__ import annotations

import ctypes
import random

import numpy as np
import pytest
import torch

from nanoseek import ModelConfig, Transformer, save_model
from nanoseek.export.gguf import check_llama_cpp_compatible, export_gguf
from nanoseek.infer.engine import Engine
from nanoseek.tokenizer import ASSISTANT, BOS, EOS, SPECIAL_TOKENS, THINK_START, USER

llama_cpp = pytest.importorskip("llama_cpp")

YARN = {
    "type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 16,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}
# q_lora on/off, expert groups on/off, YaRN on/off
CONFIGS = {
    "q_lora+groups+yarn": dict(q_lora_rank=24, n_group=4, topk_group=2, rope_scaling=YARN),
    "plain_q+no_groups": dict(q_lora_rank=None, n_group=1, topk_group=1, rope_scaling=None),
    "plain_q+groups+yarn_v2_mscale": dict(
        q_lora_rank=None, n_group=2, topk_group=1, rope_scaling={**YARN, "mscale": 0.707, "mscale_all_dim": 0.707}
    ),
}
PROMPTS = [
    "What is 8+79*9-66?",
    "The quick brown fox, 1999.",
    f"{USER}Make 24 from 3 4 6 8 using each number once.{ASSISTANT}{THINK_START}",
    "12345 67 + 8 = ? " * 4,  # 60+ tokens: positions far beyond YaRN's original 16
]
TEXTS = [
    "What is 8+79*9-66? 12345 and 3.14159!\n\n  Indented line:\tTAB, 'quotes' (parens) [x]{y}\r\n",
    "你好世界，ひらがなカタカナ 漢字 Ünïcödé — ½ ² The quick brown fox, 1999.\n",
]


def _model_dir(tmp_path_factory, tok, name: str) -> tuple[Transformer, object]:
    cfg = ModelConfig.from_preset(
        "tiny",
        vocab_size=tok.vocab_size + 3,  # embedding rows the tokenizer never uses: padded in the GGUF vocab
        num_hidden_layers=3,
        hidden_size=64,
        initializer_range=0.1,  # logits of a few units, so 1e-3 is a real tolerance
        **CONFIGS[name],
    )
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # decisive, biased routing: a wrong group limit or bias changes the experts
        for moe in model.moe_layers():
            moe.gate.weight.normal_(0, 0.5)
            moe.gate.e_score_correction_bias.copy_(torch.randn(cfg.n_routed_experts) * 0.5)
    d = tmp_path_factory.mktemp(name.replace("+", "_"))
    save_model(model, d / "model", tokenizer=tok)
    return model, d


@pytest.fixture(scope="module", params=list(CONFIGS))
def exported(request, tmp_path_factory, wide_tok):
    model, d = _model_dir(tmp_path_factory, wide_tok, request.param)
    path = export_gguf(d / "model", d / "model.gguf", dtype="f32")
    llm = llama_cpp.Llama(
        str(path),
        n_ctx=256,
        n_batch=256,
        n_threads=2,
        logits_all=True,
        verbose=False,
        type_k=0,  # GGML_TYPE_F32 latent cache: the default f16 cache alone costs ~1e-3
        type_v=0,
    )
    yield model, llm, d
    llm.close()


@pytest.fixture(scope="module")
def vocab_only(tmp_path_factory, wide_tok):
    _, d = _model_dir(tmp_path_factory, wide_tok, "plain_q+no_groups")
    path = export_gguf(d / "model", d / "model.gguf", dtype="f32")
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    yield llm
    llm.close()


def _llama_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def test_llama_cpp_logits_match_nanoseek(exported, wide_tok):
    model, llm, _ = exported
    assert llm.n_vocab() == model.config.vocab_size
    for prompt in PROMPTS:
        ids = wide_tok.encode(prompt, bos=True)
        with torch.no_grad():
            ours = model(torch.tensor([ids]))[0].numpy()
        theirs = _llama_logits(llm, ids)
        assert np.abs(ours).max() > 1.0  # logits large enough for the tolerance to mean something
        diff = np.abs(ours - theirs).max()
        assert diff < 1e-3, f"{prompt!r}: max |logits diff| = {diff}"


def test_llama_cpp_greedy_continuation_equals_engine(exported, wide_tok):
    model, llm, _ = exported
    engine = Engine(model, wide_tok, max_batch_size=4)
    engine.eos_ids = set()  # 64 tokens whatever comes: EOS is just another token on both sides
    prompts = [wide_tok.encode(p, bos=True) for p in PROMPTS[:3]]
    ours = engine.generate(prompts, max_tokens=64, temperature=0)
    for ids, done in zip(prompts, ours):
        llm.reset()
        llm.eval(ids)
        theirs = []
        for _ in range(64):  # llama.cpp's own decode path: one token at a time through its KV cache
            theirs.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([theirs[-1]])
        assert len(done.token_ids) == 64
        assert theirs == done.token_ids


def _fuzz_strings(n: int, seed: int = 0) -> list[str]:
    pieces = [
        "0123456789", "1999", "3.14159", "1,000,000", "٣٤٥",  # digits (Arabic-Indic too)
        " ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n ", "\u00a0", "\u3000",  # whitespace
        "!", "?!", "...", "--", "'s", "'quoted'", "(x)", "[y]", "{z}", "#$%&*+/<=>@\\^_`|~", "\"", "，。！",
        "The", " quick", "brown", " fox", "What", " is", "don't", "CamelCase", "snake_case", "x2", "a1b2",
        "你好世界", "漢字", "ひらがな", "カタカナ", "Ünïcödé", "e\u0301", "naïve", "Ångström", "ß", "İı",
        "привет", "مرحبا", "नमस्ते", "½", "²", "√∑∞", "😀", "👍🏽", "🇫🇷", "\u200b", "ﬁ",
        *SPECIAL_TOKENS,
    ]  # fmt: skip
    rng = random.Random(seed)
    out = [*TEXTS, *PROMPTS, *pieces]
    while len(out) < n:
        out.append("".join(rng.choice(pieces) for _ in range(rng.randint(1, 12))))
    return out


def test_llama_cpp_tokenizes_like_us(vocab_only, wide_tok):
    assert vocab_only.metadata["tokenizer.ggml.pre"] == "deepseek-v3"
    mismatches = []
    for text in _fuzz_strings(600):
        ours = wide_tok.encode(text)
        theirs = vocab_only.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        if ours != theirs:
            mismatches.append((text, ours, theirs))
        assert vocab_only.detokenize(theirs, special=True).decode("utf-8") == text
    assert not mismatches, f"{len(mismatches)} strings differ, e.g. {mismatches[:3]}"
    # llama.cpp adds BOS as our tokenizer_config's add_bos_token does
    assert vocab_only.tokenize(b"What is 2+3?") == wide_tok.encode("What is 2+3?", bos=True)
    assert (vocab_only.token_bos(), vocab_only.token_eos()) == (wide_tok.bos_id, wide_tok.eos_id)


CHATS = [
    [{"role": "user", "content": "What is 2+3?"}],
    [
        {"role": "user", "content": "What is 2+3?"},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "And 4*5?"},
    ],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+3?"},
        {"role": "assistant", "content": "<think>2+3=5</think> 5"},
        {"role": "user", "content": "And 4*5?"},
    ],
]


def test_gguf_chat_template_renders_our_prompts(vocab_only, wide_tok):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = vocab_only.metadata["tokenizer.chat_template"]
    bos = vocab_only.detokenize([vocab_only.token_bos()], special=True).decode()
    eos = vocab_only.detokenize([vocab_only.token_eos()], special=True).decode()
    assert (bos, eos) == (BOS, EOS)
    # what llama-cpp-python's chat completions render from the GGUF (Jinja, the template we stored)
    formatter = Jinja2ChatFormatter(template=template, bos_token=bos, eos_token=eos)
    for messages in CHATS:
        ours = wide_tok.apply_chat_template(messages, add_generation_prompt=True)
        assert formatter(messages=messages).prompt == ours
    # llama.cpp's built-in renderer (llama-cli without --jinja, llama-server's fallback) recognises the template
    # as DeepSeek-V3's; it leaves BOS to the tokenizer and ends a system message with "\n\n", so compare chats
    # without one
    model = vocab_only.model
    tmpl = llama_cpp.llama_model_chat_template(model, None)
    for messages in CHATS[:2]:
        arr = (llama_cpp.llama_chat_message * len(messages))()
        for i, m in enumerate(messages):
            arr[i].role, arr[i].content = m["role"].encode(), m["content"].encode()
        buf = ctypes.create_string_buffer(4096)
        n = llama_cpp.llama_chat_apply_template(tmpl, arr, len(messages), True, buf, len(buf))
        assert 0 < n <= len(buf)
        rendered = buf.raw[:n].decode()
        assert BOS + rendered == wide_tok.apply_chat_template(messages, add_generation_prompt=True)


@pytest.mark.parametrize("dtype", ["f16", "bf16", "q8_0"])
def test_quantised_exports_load_and_stay_close(exported, dtype, wide_tok):
    model, _, d = exported
    path = export_gguf(d / "model", d / f"model-{dtype}.gguf", dtype=dtype)
    assert path.stat().st_size < (d / "model.gguf").stat().st_size
    llm = llama_cpp.Llama(str(path), n_ctx=128, n_threads=2, logits_all=True, verbose=False)
    try:
        ids = wide_tok.encode(PROMPTS[1], bos=True)
        with torch.no_grad():
            ours = model(torch.tensor([ids]))[0].numpy()
        diff = np.abs(ours - _llama_logits(llm, ids))
        if dtype == "q8_0":  # activations are quantised too; a rounded score can flip an expert at a few positions
            assert diff.mean() < 0.1 * np.abs(ours).mean(), f"mean |logits diff| = {diff.mean()}"
        else:
            assert diff.max() < 0.1, f"{dtype}: max |logits diff| = {diff.max()}"
    finally:
        llm.close()


def test_export_refuses_what_llama_cpp_cannot_run(tmp_path):
    base = ModelConfig.from_preset("tiny")
    check_llama_cpp_compatible(base)  # the tiny preset itself exports
    bad = [
        (dict(n_group=2, topk_group=2), "topk_group"),
        (dict(attention_bias=True), "attention_bias"),
        (dict(qk_nope_head_dim=0), "qk_nope_head_dim"),
        (dict(rope_scaling={**YARN, "mscale": 1.0, "mscale_all_dim": 0.707}), "rope_scaling.mscale"),
        (dict(num_hidden_layers=27, first_k_dense_replace=1), "num_hidden_layers"),
        (dict(n_shared_experts=0), "n_shared_experts"),
        (dict(n_group=2, topk_group=1, topk_method="group_limited_greedy"), "topk_method"),
    ]
    for overrides, field in bad:
        with pytest.raises(ValueError, match=field.replace(".", r"\.")):
            check_llama_cpp_compatible(base.replace(**overrides))
    from nanoseek.cli.main import main

    cfg = base.replace(n_group=2, topk_group=2)
    save_model(Transformer(cfg), tmp_path / "m")
    assert main(["export", "--format", "gguf", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "m.gguf")]) == 1
    assert not (tmp_path / "m.gguf").exists()


def test_export_command_writes_gguf_without_mtp_and_a_modelfile(tmp_path, tiny_model_dir):
    import gguf

    from nanoseek.cli.main import main

    cfg = ModelConfig.from_json(tiny_model_dir)  # the tiny preset, with an MTP layer, which is left out
    assert cfg.num_nextn_predict_layers == 1
    out = tmp_path / "out" / "m.gguf"
    argv = ["export", "--format", "gguf", "--model", str(tiny_model_dir), "--out", str(out), "--dtype", "q8_0"]
    assert main(argv) == 0
    reader = gguf.GGUFReader(str(out))
    names = {t.name for t in reader.tensors}
    assert reader.fields["deepseek2.block_count"].contents() == cfg.num_hidden_layers
    assert not any(n.startswith(f"blk.{cfg.num_hidden_layers}.") for n in names)  # MTP layer dropped
    assert "blk.1.attn_kv_b.weight" not in names and {"blk.1.attn_k_b.weight", "blk.1.attn_v_b.weight"} <= names
    assert reader.fields["deepseek2.expert_gating_func"].contents() == 2  # sigmoid, written explicitly
    modelfile = (out.parent / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./m.gguf\n") and 'PARAMETER stop "<｜end▁of▁sentence｜>"' in modelfile
    assert not list(out.parent.glob(".*.tmp"))  # written atomically, nothing left behind
