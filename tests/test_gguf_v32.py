"""GGUF export of DeepSeek-V3.2 (llama.cpp's `deepseek32`), checked by llama.cpp itself (llama-cpp-python): the file
carries the converter's keys and tensors (indexer, MTP block), and llama.cpp computes our logits and greedy
continuations with an indexer that really selects (index_topk 8 of up to 130 keys)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.gguf_checks import llama_greedy, llama_logits, record_topk
from helpers.selections import assert_decisive

from nanoseek import ModelConfig, Transformer, save_model
from nanoseek.export.gguf import check_llama_cpp_compatible, export_gguf
from nanoseek.infer.engine import Engine
from nanoseek.tokenizer import ASSISTANT, THINK_START, USER

llama_cpp = pytest.importorskip("llama_cpp")

from test_gguf import YARN  # noqa: E402  (the same YaRN settings as the V3 GGUF tests)

PROMPTS = [
    "What is 8+79*9-66?",
    "The quick brown fox, 1999.",
    f"{USER}Make 24 from 3 4 6 8 using each number once.{ASSISTANT}{THINK_START}",
    "12345 67 + 8 = ? " * 4,  # 60+ tokens: the indexer keeps 8 of them, positions far beyond YaRN's 16
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, wide_tok):
    cfg = ModelConfig.from_preset(
        "tiny-v32",
        vocab_size=wide_tok.vocab_size + 3,
        num_hidden_layers=3,  # dense + 2 MoE layers, then the MTP block (blk.3)
        hidden_size=64,
        index_n_heads=16,  # ReLU zeroes a key's score with probability 2^-heads: few heads tie at 0 (spec P9)
        n_group=4,
        topk_group=2,
        rope_scaling=YARN,
        max_position_embeddings=256,
        initializer_range=0.1,  # logits of a few units, so 1e-3 is a real tolerance
    )
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".indexer.k_norm." in name:  # LayerNorm weight and bias away from 1 and 0
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
            elif ".indexer." in name:  # index scores spread far beyond float error: decisive top-k choices
                p.normal_(0, 0.2)
        for moe in model.moe_layers():  # decisive, biased routing: a wrong group limit or bias changes experts
            moe.gate.weight.normal_(0, 0.5)
            moe.gate.e_score_correction_bias.copy_(torch.randn(cfg.n_routed_experts) * 0.5)
    d = tmp_path_factory.mktemp("v32")
    save_model(model, d / "model", tokenizer=wide_tok)
    path = export_gguf(d / "model", d / "model.gguf", dtype="f32")
    llm = llama_cpp.Llama(
        str(path), n_ctx=256, n_batch=256, n_threads=1, logits_all=True, verbose=False, type_k=0, type_v=0
    )  # f32 latent and indexer caches: an f16 cache alone costs ~1e-3
    yield model, llm, path
    llm.close()


def test_gguf_v32_has_the_converters_keys_and_tensors(exported):
    import gguf

    model, _, path = exported
    c = model.config
    reader = gguf.GGUFReader(str(path))
    field = {k: v.contents() for k, v in reader.fields.items() if k.startswith("deepseek32.")}
    assert reader.fields["general.architecture"].contents() == "deepseek32"
    L = c.num_hidden_layers
    assert field["deepseek32.block_count"] == L + 1 and field["deepseek32.nextn_predict_layers"] == 1
    assert field["deepseek32.attention.indexer.head_count"] == c.index_n_heads
    assert field["deepseek32.attention.indexer.key_length"] == c.index_head_dim
    assert field["deepseek32.attention.indexer.top_k"] == c.index_topk
    assert field["deepseek32.attention.head_count_kv"] == 1 and field["deepseek32.expert_gating_func"] == 2
    shapes = {t.name: tuple(int(n) for n in t.shape) for t in reader.tensors}  # ggml order: fastest first
    H, d_I, n_I, q_r = c.hidden_size, c.index_head_dim, c.index_n_heads, c.q_lora_rank
    for i in range(L + 1):
        assert shapes[f"blk.{i}.indexer.attn_q_b.weight"] == (q_r, n_I * d_I)
        assert shapes[f"blk.{i}.indexer.attn_k.weight"] == (H, d_I)
        assert shapes[f"blk.{i}.indexer.proj.weight"] == (H, n_I)
        assert shapes[f"blk.{i}.indexer.k_norm.bias"] == (d_I,)
        assert f"blk.{i}.attn_k_b.weight" in shapes and f"blk.{i}.attn_kv_b.weight" not in shapes
    assert shapes[f"blk.{L}.nextn.eh_proj.weight"] == (2 * H, H)
    for name in ("enorm", "hnorm", "shared_head_norm", "embed_tokens", "shared_head_head"):
        assert f"blk.{L}.nextn.{name}.weight" in shapes


def test_llama_cpp_v32_logits_match_nanoseek(exported, wide_tok, monkeypatch):
    model, llm, _ = exported
    selections = record_topk(monkeypatch)
    worst = 0.0
    for prompt in PROMPTS:
        ids = wide_tok.encode(prompt, bos=True)
        with torch.no_grad():
            ours = model(torch.tensor([ids]))[0].numpy()
        diff = np.abs(ours - llama_logits(llm, ids)).max()
        assert np.abs(ours).max() > 1.0  # logits large enough for the tolerance to mean something
        assert diff < 1e-3, f"{prompt!r}: max |logits diff| = {diff}"
        worst = max(worst, diff)
    assert assert_decisive(selections) > 100  # the indexer chose, decisively, for many queries
    print(f"deepseek32: max |logits diff| {worst:.2e}")


def test_llama_cpp_v32_greedy_continuation_equals_engine(exported, wide_tok, monkeypatch):
    model, llm, _ = exported
    selections = record_topk(monkeypatch)
    engine = Engine(model, wide_tok, max_batch_size=4)
    engine.eos_ids = set()  # 64 tokens whatever comes: EOS is just another token on both sides
    prompts = [wide_tok.encode(p, bos=True) for p in PROMPTS]
    ours = engine.generate(prompts, max_tokens=64, temperature=0)
    assert_decisive(selections)  # no decode step of ours hinged on a near-tie
    for ids, done in zip(prompts, ours):
        assert len(done.token_ids) == 64
        assert llama_greedy(llm, ids, 64) == done.token_ids


def test_export_refuses_v32_configs_llama_cpp_runs_differently():
    base = ModelConfig.from_preset("tiny-v32")
    check_llama_cpp_compatible(base)
    check_llama_cpp_compatible(base.replace(num_hidden_layers=27, first_k_dense_replace=1))  # no V2-Lite guess
    with pytest.raises(ValueError, match="index_head_dim"):
        check_llama_cpp_compatible(base.replace(index_head_dim=32))
    with pytest.raises(ValueError, match="topk_group"):
        check_llama_cpp_compatible(base.replace(n_group=2, topk_group=2))


def test_export_command_writes_a_deepseek32_gguf_and_a_modelfile(tmp_path, wide_tok):
    import gguf

    from nanoseek.cli.main import main

    torch.manual_seed(0)
    save_model(
        Transformer(ModelConfig.from_preset("tiny-v32", vocab_size=wide_tok.vocab_size)),
        tmp_path / "m",
        tokenizer=wide_tok,
    )
    out = tmp_path / "out" / "m.gguf"
    assert main(["export", "--format", "gguf", "--model", str(tmp_path / "m"), "--out", str(out)]) == 0
    assert gguf.GGUFReader(str(out)).fields["general.architecture"].contents() == "deepseek32"
    modelfile = (out.parent / "Modelfile").read_text()  # the same chat template as V3's: the tokenizer's
    assert modelfile.startswith("FROM ./m.gguf\n") and 'PARAMETER stop "<｜end▁of▁sentence｜>"' in modelfile
