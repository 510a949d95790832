"""HF-format checkpoints: round trips, sharding, FP8 dequantisation, MTP placement, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import nanoseek.checkpoint.hf as ckpt
from nanoseek import ModelConfig, Transformer, load_model, save_model
from nanoseek.checkpoint.quant import dequantize_fp8


def _model(**kw) -> Transformer:
    return tiny_model(**kw).eval()


def _same(a: Transformer, b: Transformer) -> None:
    ids = torch.randint(0, a.config.vocab_size, (2, 20))
    torch.testing.assert_close(a(ids), b(ids), atol=0, rtol=0)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], atol=0, rtol=0)


def test_round_trip_uses_hf_names_and_puts_mtp_after_the_main_layers(tmp_path):
    model = _model()
    save_model(model, tmp_path / "m")
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    n = model.config.num_hidden_layers
    assert "model.layers.1.mlp.experts.7.gate_proj.weight" in names
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in names
    assert {
        f"model.layers.{n}.eh_proj.weight",
        f"model.layers.{n}.enorm.weight",
        f"model.layers.{n}.shared_head.norm.weight",
        f"model.layers.{n}.shared_head.head.weight",
        f"model.layers.{n}.self_attn.kv_b_proj.weight",
    } <= names
    assert not any("w13" in k or k.startswith("mtp.") for k in names)
    _same(model, load_model(tmp_path / "m"))
    assert (tmp_path / "m" / "generation_config.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_sharded_save_writes_an_index_and_loads(tmp_path):
    model = _model()
    save_model(model, tmp_path, max_shard_bytes=50_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 1 and all((tmp_path / f).exists() for f in files)
    _same(model, load_model(tmp_path))


def test_tied_embeddings_and_bf16_round_trip(tmp_path):
    model = _model(tie_word_embeddings=True)
    save_model(model, tmp_path)
    loaded = load_model(tmp_path)
    assert loaded.lm_head.weight.data_ptr() == loaded.embed_tokens.weight.data_ptr()
    _same(model, loaded)
    save_model(model, tmp_path / "bf16", dtype=torch.bfloat16)
    half = load_model(tmp_path / "bf16")
    assert half.embed_tokens.weight.dtype == torch.bfloat16
    assert half.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32


def test_fp8_block_quantised_checkpoint_loads_within_quantisation_error(tmp_path):
    # hidden 160 and expert width 136 make 128x128 blocks with partial edges
    model = _model(hidden_size=160, moe_intermediate_size=136, intermediate_size=200, q_lora_rank=144)
    save_model(model, tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = load_file(str(path))
    originals = {}
    for name, w in list(tensors.items()):
        skip = ("embed_tokens", "lm_head", "norm", "mlp.gate.", "eh_proj", "shared_head")
        if w.dim() != 2 or any(s in name for s in skip):
            continue
        rows, cols = w.shape
        br, bc = -(-rows // 128), -(-cols // 128)
        padded = torch.zeros(br * 128, bc * 128)
        padded[:rows, :cols] = w
        blocks = padded.view(br, 128, bc, 128)
        scale = blocks.abs().amax(dim=(1, 3)) / 448.0  # weight_scale_inv: the dequantisation multiplier
        q = (blocks / scale[:, None, :, None]).view(br * 128, bc * 128)[:rows, :cols].to(torch.float8_e4m3fn)
        tensors[name], tensors[name + "_scale_inv"] = q, scale
        originals[name] = w
    save_file(tensors, str(path))
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    (tmp_path / "config.json").write_text(json.dumps(cfg))

    loaded = load_model(tmp_path, dtype=torch.float32)
    hf_names = dict(ckpt.internal_to_hf(loaded))
    assert len(originals) > 20
    for name, w in originals.items():
        got = hf_names[name].float()
        exact = dequantize_fp8(tensors[name], tensors[name + "_scale_inv"])
        torch.testing.assert_close(got, exact, atol=0, rtol=0)  # the documented formula, bit for bit
        # e4m3 keeps 3 mantissa bits: relative error <= 2^-4, plus the subnormal floor of each block
        bound = w.abs() * 2**-4 + w.abs().max() / 448 * 2**-6 + 1e-12
        assert ((got - w).abs() <= bound).all(), name
    ids = torch.randint(0, 256, (2, 16))
    ref, out = model(ids), loaded(ids)
    assert (ref - out).abs().max() < 0.1 * ref.abs().max()


def test_hf_checkpoint_without_mtp_weights_loads_without_mtp(tmp_path):
    model = _model()
    save_model(model, tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = {k: v for k, v in load_file(str(path)).items() if not k.startswith("model.layers.2.")}
    save_file(tensors, str(path))
    loaded = load_model(tmp_path)
    assert loaded.config.num_nextn_predict_layers == 0 and len(loaded.mtp) == 0
    ids = torch.randint(0, 256, (1, 8))
    torch.testing.assert_close(loaded(ids), model(ids))


def _edit(tmp_path, fn):
    save_model(_model(), tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path))


def test_unknown_tensor_is_named(tmp_path):
    _edit(tmp_path, lambda t: t.__setitem__("model.layers.0.self_attn.q_extra.weight", torch.zeros(2)))
    with pytest.raises(ValueError, match=r"q_extra.*config does not match"):
        load_model(tmp_path)


def test_missing_tensor_is_named(tmp_path):
    _edit(tmp_path, lambda t: t.pop("model.layers.1.self_attn.o_proj.weight"))
    with pytest.raises(ValueError, match=r"missing 1 tensor.*layers\.1\.self_attn\.o_proj"):
        load_model(tmp_path)


def test_missing_expert_is_named(tmp_path):
    _edit(tmp_path, lambda t: t.pop("model.layers.1.mlp.experts.3.up_proj.weight"))
    with pytest.raises(ValueError, match=r"experts\.3\.up_proj"):
        load_model(tmp_path)


def test_shape_mismatch_is_named(tmp_path):
    _edit(tmp_path, lambda t: t.__setitem__("model.norm.weight", torch.ones(33)))
    with pytest.raises(ValueError, match=r"model\.norm\.weight.*\(33,\).*\(32,\)"):
        load_model(tmp_path)


def test_pickle_weights_are_refused_with_a_hint(tmp_path):
    ModelConfig.from_preset("tiny").save_json(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(FileNotFoundError, match="only safetensors"):
        load_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope")


def test_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    model = _model()
    save_model(model, tmp_path / "m")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_model(_model(hidden_size=64), tmp_path / "m")
    _same(model, load_model(tmp_path / "m"))
    assert [p.name for p in tmp_path.iterdir()] == ["m"]
