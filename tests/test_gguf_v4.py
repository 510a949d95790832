"""GGUF export of DeepSeek-V4 (llama.cpp's `deepseek4`), checked by llama.cpp itself (llama-cpp-python): the file
carries the converter's keys and tensors, and llama.cpp computes our logits and greedy continuations on a tiny model
with every layer kind it runs (sliding window, CSA with an indexer that selects, HCA, hash- and score-routed MoE,
four mHC streams), over sequences far longer than the window and spanning several HCA blocks of 128."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import make_live
from helpers.gguf_checks import llama_greedy, llama_logits, record_topk
from helpers.selections import assert_decisive

from nanoseek import ModelConfig, Transformer, save_model
from nanoseek.config import CSA, HCA
from nanoseek.export.gguf import check_llama_cpp_compatible, export_gguf
from nanoseek.infer.engine import Engine

llama_cpp = pytest.importorskip("llama_cpp")

# spec D3: tiny-v4's layers [sliding, CSA, HCA, CSA] and routing [hash, hash, moe, moe] at llama.cpp's rates 4 / 128
OVERRIDES = dict(
    hidden_size=64,
    head_dim=32,
    qk_rope_head_dim=16,
    q_lora_rank=32,
    o_lora_rank=16,
    compress_rates={CSA: 4, HCA: 128},
    index_n_heads=16,  # ReLU zeroes an entry for every head with probability 2^-16 only: no ties at 0 (spec P9)
    index_head_dim=64,  # llama.cpp's indexer Hadamard needs a multiple of 64
    index_topk=3,  # of up to 90 CSA entries
    moe_intermediate_size=32,
    swiglu_limit=0.5,  # the clamps bind
    initializer_range=0.1,
    max_position_embeddings=4096,
    rope_scaling={
        "type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 256,  # a YaRN ramp on the compressed layers' rope dims
        "beta_fast": 32.0,
        "beta_slow": 1.0,
    },
)
PROMPTS = [
    "What is 8+79*9-66?",  # shorter than an HCA block: window and CSA only
    "12345 67 + 8 = ? " * 9,  # 145 tokens: one HCA entry (tokens 0..127) before decoding starts
    "The quick brown fox, 1999. What is 8+79*9-66? " * 9,  # 235 tokens: the next HCA entry completes in decoding
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, wide_tok):
    cfg = ModelConfig.from_preset("tiny-v4", vocab_size=wide_tok.vocab_size + 3, **OVERRIDES)
    torch.manual_seed(0)
    model = make_live(Transformer(cfg).eval())  # sinks, position biases, mHC bases, routing bias all nonzero
    d = tmp_path_factory.mktemp("v4")
    save_model(model, d / "model", tokenizer=wide_tok)
    path = export_gguf(d / "model", d / "model.gguf", dtype="f32")
    llm = llama_cpp.Llama(
        str(path), n_ctx=512, n_batch=512, n_threads=1, logits_all=True, verbose=False, type_k=0, type_v=0
    )
    yield model, llm, d
    llm.close()


def _random_ids(model, n: int = 300) -> list[int]:
    g = torch.Generator().manual_seed(1)  # HCA entries complete at 127 and 255, 75 CSA entries, window 8
    return [0] + torch.randint(3, model.config.vocab_size, (n - 1,), generator=g).tolist()


def test_gguf_v4_has_the_converters_keys_and_tensors(exported):
    import gguf

    model, _, d = exported
    c = model.config
    reader = gguf.GGUFReader(str(d / "model.gguf"))
    f = {k.removeprefix("deepseek4."): v for k, v in reader.fields.items() if k.startswith("deepseek4.")}
    assert reader.fields["general.architecture"].contents() == "deepseek4"
    assert f["block_count"].contents() == 4 and "nextn_predict_layers" not in f  # MTP: a separate file
    assert f["attention.compress_ratios"].contents() == [0, 4, 128, 4, 0]  # the MTP block's slot too
    assert f["attention.compress_ratios"].types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32]
    assert f["swiglu_clamp_exp"].contents() == [0.5] * 4 and f["swiglu_clamp_shexp"].contents() == [0.5] * 4
    assert f["swiglu_clamp_exp"].types[-1] == gguf.GGUFValueType.FLOAT32
    assert f["expert_gating_func"].contents() == 4 and f["hash_layer_count"].contents() == 2
    assert f["hyper_connection.count"].contents() == 4 and f["attention.compress_rope_freq_base"].contents() == 1.6e5
    assert "expert_group_count" not in f and "feed_forward_length" not in f
    t = {t.name: t for t in reader.tensors}
    shape = {name: tuple(int(n) for n in x.shape) for name, x in t.items()}  # ggml order: fastest first
    H, hc, d_h, V = c.hidden_size, c.hc_mult, c.head_dim, c.vocab_size
    assert shape["output_hc_fn.weight"] == (hc * H, hc) and "output.weight" in shape
    assert shape["blk.0.hc_attn_fn.weight"] == (hc * H, (2 + hc) * hc)
    assert shape["blk.0.attn_output_a.weight"] == (
        c.num_attention_heads * d_h // c.o_groups,
        c.o_groups * c.o_lora_rank,
    )
    assert shape["blk.1.attn_compressor_ape.weight"] == (2 * d_h, 4)  # CSA: two overlapping halves
    assert shape["blk.2.attn_compressor_ape.weight"] == (d_h, 128)
    assert shape["blk.1.indexer_compressor_ape.weight"] == (2 * c.index_head_dim, 4)
    assert "blk.0.attn_compressor_kv.weight" not in shape and "blk.2.indexer.proj.weight" not in shape
    assert shape["blk.0.ffn_gate_tid2eid.weight"] == (c.num_experts_per_tok, V)
    assert t["blk.0.ffn_gate_tid2eid.weight"].tensor_type == gguf.GGMLQuantizationType.I32
    assert "blk.0.exp_probs_b.bias" not in shape and "blk.2.exp_probs_b.bias" in shape
    tid2eid = model.layers[0].mlp.gate.tid2eid
    assert np.array_equal(np.asarray(t["blk.0.ffn_gate_tid2eid.weight"].data), tid2eid.numpy())


def test_llama_cpp_v4_logits_match_nanoseek(exported, wide_tok, monkeypatch):
    model, llm, _ = exported
    selections = record_topk(monkeypatch)
    worst = 0.0
    for ids in [wide_tok.encode(p, bos=True) for p in PROMPTS] + [_random_ids(model)]:
        with torch.no_grad():
            ours = model(torch.tensor([ids]))[0].numpy()
        diff = np.abs(ours - llama_logits(llm, ids)).max()
        assert np.abs(ours).max() > 1.0  # logits large enough for the tolerance to mean something
        assert diff < 1e-3, f"{len(ids)} tokens: max |logits diff| = {diff}"
        worst = max(worst, diff)
    assert assert_decisive(selections) > 200  # the CSA indexers chose, decisively
    print(f"deepseek4: max |logits diff| {worst:.2e}")


def test_llama_cpp_v4_prefill_in_small_ubatches_matches(exported):
    """llama.cpp's compressor states carry partial windows across ubatches of 7 tokens (not a multiple of 4)."""
    model, _, d = exported
    llm = llama_cpp.Llama(
        str(d / "model.gguf"), n_ctx=512, n_batch=512, n_ubatch=7, n_threads=1, logits_all=True, verbose=False,
        type_k=0, type_v=0,
    )  # fmt: skip
    try:
        ids = _random_ids(model)
        with torch.no_grad():
            ours = model(torch.tensor([ids]))[0].numpy()
        diff = np.abs(ours - llama_logits(llm, ids)).max()
        assert diff < 1e-3, f"max |logits diff| = {diff}"
    finally:
        llm.close()


def test_llama_cpp_v4_greedy_continuation_equals_engine(exported, wide_tok, monkeypatch):
    model, llm, _ = exported
    selections = record_topk(monkeypatch)
    engine = Engine(model, wide_tok, max_batch_size=4)
    engine.eos_ids = set()  # 64 tokens whatever comes: EOS is just another token on both sides
    prompts = [wide_tok.encode(p, bos=True) for p in PROMPTS]
    assert len(prompts[2]) + 64 > 256 > len(prompts[2]) and len(prompts[1]) > 128
    ours = engine.generate(prompts, max_tokens=64, temperature=0)
    assert_decisive(selections)  # no decode step of ours hinged on a near-tie
    for ids, done in zip(prompts, ours):
        assert len(done.token_ids) == 64
        assert llama_greedy(llm, ids, 64) == done.token_ids


def test_gguf_v4_q8_0_loads_and_stays_close(exported, wide_tok):
    model, _, d = exported
    path = export_gguf(d / "model", d / "model-q8_0.gguf", dtype="q8_0")
    assert path.stat().st_size < (d / "model.gguf").stat().st_size
    llm = llama_cpp.Llama(str(path), n_ctx=512, n_threads=1, logits_all=True, verbose=False)
    try:
        ids = wide_tok.encode(PROMPTS[1], bos=True)
        with torch.no_grad():
            ours = model(torch.tensor([ids]))[0].numpy()
        diff = np.abs(ours - llama_logits(llm, ids))
        assert diff.mean() < 0.1 * np.abs(ours).mean(), f"mean |logits diff| = {diff.mean()}"
    finally:
        llm.close()


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(hc_mult=2), "hc_mult"),
        (dict(compress_rates={CSA: 4, HCA: 8}), "compress_rates"),
        (dict(scoring_func="sigmoid"), "scoring_func"),
        (dict(norm_topk_prob=False), "norm_topk_prob"),
        (dict(mlp_layer_types=["moe", "hash_moe", "moe", "moe"]), "mlp_layer_types"),
        (dict(index_head_dim=32), "index_head_dim"),
        (dict(rope_scaling={**OVERRIDES["rope_scaling"], "attention_factor": 1.2}), r"rope_scaling\.attention_factor"),
    ],
)
def test_export_refuses_v4_configs_llama_cpp_runs_differently(overrides, field):
    base = ModelConfig.from_preset("tiny-v4", **OVERRIDES)
    check_llama_cpp_compatible(base)
    with pytest.raises(ValueError, match=field):
        check_llama_cpp_compatible(base.replace(**overrides))


def test_export_command_writes_a_deepseek4_gguf_and_a_modelfile(tmp_path, wide_tok):
    import gguf

    from nanoseek.cli.main import main

    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny-v4", vocab_size=wide_tok.vocab_size, **OVERRIDES)
    save_model(Transformer(cfg), tmp_path / "m", tokenizer=wide_tok)
    out = tmp_path / "out" / "m.gguf"
    argv = ["export", "--format", "gguf", "--model", str(tmp_path / "m"), "--out", str(out), "--dtype", "bf16"]
    assert main(argv) == 0
    reader = gguf.GGUFReader(str(out))
    assert reader.fields["general.architecture"].contents() == "deepseek4"
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_q_b.weight"] == gguf.GGMLQuantizationType.BF16
    for name in ("blk.0.hc_attn_fn.weight", "blk.2.attn_compressor_ape.weight", "blk.0.attn_sinks.weight"):
        assert types[name] == gguf.GGMLQuantizationType.F32  # as DeepSeek ships them, whatever --dtype says
    modelfile = (out.parent / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./m.gguf\n") and 'PARAMETER stop "<｜end▁of▁sentence｜>"' in modelfile
    cfg.replace(compress_rates={CSA: 4, HCA: 8}).save_json(tmp_path / "m")  # refused, nothing written
    assert main(["export", "--format", "gguf", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "b.gguf")]) == 1
    assert not (tmp_path / "b.gguf").exists()
