"""DeepSeek's published low-precision checkpoints load: V3.1/V3.2 FP8 with UE8M0 (power-of-two) block scales, V4
FP8 linears and MXFP4 experts with E8M0 `.scale` tensors, sharded with an index, MTP layers as published; each
weight is dequantised by the documented formula, one memory-mapped tensor at a time."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from nanoseek import ModelConfig, Transformer, load_model, save_model
from nanoseek.checkpoint import hub_v4
from nanoseek.checkpoint.hf import internal_to_hf
from nanoseek.checkpoint.quant import (
    dequantize,
    dequantize_fp4,
    dequantize_fp8,
    quantize_fp4,
    quantize_fp8,
    to_e8m0,
)


def test_fp4_packs_element_2i_in_the_low_nibble_and_round_trips_representable_values():
    w = torch.tensor([[0.5, 1.0, -6.0, 3.0] + [0.0] * 28, [4.0, -0.5] + [1.5] * 30])
    packed, scale = quantize_fp4(w)
    assert packed.dtype == torch.float4_e2m1fn_x2 and packed.shape == (2, 16) and scale.shape == (2, 1)
    assert scale.view(torch.uint8).tolist() == [[127], [127]]  # amax 6 and 4 fit e2m1 unscaled: 2^0
    assert packed.view(torch.uint8)[0, :2].tolist() == [
        0x21,
        0x5F,
    ]  # 0.5 = code 1, 1.0 = 2; -6 = 0xF (sign 8 + 7), 3 = 5
    assert torch.equal(dequantize_fp4(packed, scale), w)
    assert torch.equal(dequantize_fp4(*quantize_fp4(w * 2**-5)), w * 2**-5)  # a power-of-two scale is exact


def test_e8m0_scales_are_powers_of_two():
    b = torch.tensor([127, 130, 120], dtype=torch.uint8).view(torch.float8_e8m0fnu)
    assert b.float().tolist() == [1.0, 8.0, 2.0**-7]
    assert to_e8m0(torch.tensor([1.0, 8.0, 2.0**-7])).view(torch.uint8).tolist() == [127, 130, 120]


def test_ue8m0_fp8_scales_round_up_to_powers_of_two_and_stay_within_e4m3():
    w = torch.randn(200, 300, generator=torch.Generator().manual_seed(0))
    q, s = quantize_fp8(w, ue8m0=True)
    assert s.shape == (2, 3) and torch.equal(s, torch.exp2(torch.log2(s).round()))
    assert q.float().abs().max() <= 448
    got = dequantize_fp8(q, s)
    assert ((got - w).abs() <= w.abs() * 2**-3 + s.max() * 2**-9).all()  # a power-of-two scale costs one bit


def _quantize_dir(path: Path, kind, scale_name) -> dict[str, torch.Tensor]:
    """Rewrite every shard of a saved model dir in a published low-precision layout: kind(name, tensor) says
    "fp8", "fp4" or None; the scale goes under scale_name(name). Returns the original weights."""
    index = path / "model.safetensors.index.json"
    meta = json.loads(index.read_text())
    originals = {}
    for shard in sorted(set(meta["weight_map"].values())):
        out = {}
        for name, t in load_file(str(path / shard)).items():
            k = kind(name, t)
            if k is None:
                out[name] = t
                continue
            originals[name] = t
            if k == "fp4":
                out[name], out[scale_name(name)] = quantize_fp4(t)
            else:
                q, s = quantize_fp8(t, ue8m0=True)
                out[name], out[scale_name(name)] = q, to_e8m0(s) if scale_name(name).endswith(".scale") else s
            meta["weight_map"][scale_name(name)] = shard
        save_file(out, str(path / shard), metadata={"format": "pt"})
    index.write_text(json.dumps(meta))
    return originals


def _set_quantization_config(path: Path, **extra) -> None:
    cfg = json.loads((path / "config.json").read_text())
    quant = {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0", "weight_block_size": [128, 128]}
    cfg.update(quantization_config=quant, torch_dtype="bfloat16", **extra)
    (path / "config.json").write_text(json.dumps(cfg))


def _check(loaded, names, originals, stored, model, vocab) -> None:
    """Every quantised weight equals the formula bit for bit, is near the original, and logits stay close."""
    for name, w in originals.items():
        got = names[name].float()
        assert torch.equal(got, dequantize(*stored(name))), name
        assert (got - w).abs().max() <= w.abs().max() / 4, name  # e2m1's coarsest step: 1/6 of a group's max
    ids = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, out = model(ids).flatten(), loaded(ids).flatten()
    assert torch.nn.functional.cosine_similarity(ref, out, dim=0) > 0.95  # the same model, coarsely rounded


def test_v32_fp8_checkpoint_with_ue8m0_scales_loads(tmp_path):
    """V3.2 as published: sharded, FP8 linears incl. the indexer's wq_b and wk (weights_proj stays bf16), float32
    power-of-two `weight_scale_inv`, the MTP layer at index num_hidden_layers with its own indexer."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny-v32", hidden_size=160, q_lora_rank=144)).eval()
    save_model(model, tmp_path, max_shard_bytes=200_000)
    keep = ("embed_tokens", "lm_head", "norm", "mlp.gate.", "eh_proj", "shared_head", "weights_proj")

    def kind(name, t):
        return "fp8" if t.dim() == 2 and not any(k in name for k in keep) else None

    originals = _quantize_dir(tmp_path, kind, lambda n: n + "_scale_inv")
    _set_quantization_config(tmp_path)
    n_mtp = model.config.num_hidden_layers
    assert f"model.layers.{n_mtp}.self_attn.indexer.wk.weight" in originals and len(originals) > 30
    shards = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(shards.values())) > 1

    def stored(name):
        def one(n):
            return load_file(str(tmp_path / shards[n]))[n]

        return one(name), one(name + "_scale_inv")

    loaded = load_model(tmp_path, dtype=torch.float32)
    assert len(loaded.mtp) == 1 and loaded.mtp[0].block.self_attn.indexer is not None
    _check(loaded, dict(internal_to_hf(loaded)), originals, stored, model, model.config.vocab_size)


def test_v4_checkpoint_with_fp8_linears_and_fp4_experts_loads(tmp_path):
    """V4 as published: hub names, FP8 attention and shared-expert linears with E8M0 `.scale` blocks, MXFP4
    routed experts with per-32 E8M0 `.scale`, bf16 compressors and indexer weights, and an `mtp.0.*` block (FP8
    e_proj / h_proj, FP4 experts) that loads into nanoseek's MTP depth."""
    torch.manual_seed(0)
    config = ModelConfig.from_preset("tiny-v4", moe_intermediate_size=32, initializer_range=0.1)
    model = Transformer(config).eval()
    save_model(model, tmp_path, max_shard_bytes=100_000)
    fp8 = ("attn.wq_a.", "attn.wq_b.", "attn.wkv.", "attn.wo_a.", "attn.wo_b.", "indexer.wq_b.", "shared_experts.")
    fp8 += ("mtp.0.e_proj.", "mtp.0.h_proj.")

    def kind(name, t):
        if ".ffn.experts." in name:
            return "fp4"
        return "fp8" if any(k in name for k in fp8) else None

    def scale_name(name):
        return name.removesuffix("weight") + "scale"

    originals = _quantize_dir(tmp_path, kind, scale_name)
    meta = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    _set_quantization_config(tmp_path, expert_dtype="fp4")
    assert sum(".ffn.experts." in n for n in originals) == 5 * 8 * 3 and any("wo_b" in n for n in originals)
    assert {"mtp.0.e_proj.scale", "mtp.0.ffn.experts.7.w2.scale", "mtp.0.hc_head_fn"} <= set(meta["weight_map"])

    def stored(name):
        def one(n):
            return load_file(str(tmp_path / meta["weight_map"][n]))[n]

        return one(name), one(scale_name(name))

    loaded = load_model(tmp_path, dtype=torch.float32)
    assert len(loaded.mtp) == 1
    names = dict(hub_v4.hub_tensor(n, t, loaded.config) for n, t in internal_to_hf(loaded))
    _check(loaded, names, originals, stored, model, config.vocab_size)
