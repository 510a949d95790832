"""DeepSeek-V4 in nanoseek: logits equal transformers' DeepseekV4ForCausalLM on the same weights, both ways; the
config round-trips; the presets have DeepSeek's published sizes; the tiny preset trains."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.selections import assert_decisive, recorded_selections
from safetensors import safe_open
from safetensors.torch import save_file

from nanoseek import ModelConfig, Transformer, load_model, save_model
from nanoseek.config import CSA, HCA, SLIDING
from nanoseek.distributed.plan import count_parameters
from nanoseek.model.hyper_connections import sinkhorn

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "DeepseekV4ForCausalLM"):
    pytest.skip("transformers >= 5.25 is needed for DeepseekV4ForCausalLM", allow_module_level=True)

# shared/deepseek-v32-v4-spec.md D2: every layer type, hash and biased routing, window 8 << 40 tokens, 10 CSA
# entries of which the indexer keeps 3, 5 HCA entries, YaRN on the compressed layers, clamps that bind
TINY = dict(
    vocab_size=256,
    hidden_size=64,
    num_hidden_layers=4,
    layer_types=[SLIDING, CSA, HCA, CSA],
    mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe"],
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=64,
    partial_rotary_factor=0.25,
    q_lora_rank=32,
    o_groups=2,
    o_lora_rank=16,
    sliding_window=8,
    compress_rates={CSA: 4, HCA: 8},
    index_n_heads=16,  # ReLU zeroes an entry's score with probability 2^-heads: few heads tie at 0 (spec P9)
    index_head_dim=32,
    index_topk=3,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_shared_experts=1,
    moe_intermediate_size=32,
    routed_scaling_factor=1.5,
    swiglu_limit=0.5,
    rope_theta=1e4,
    compress_rope_theta=1.6e5,
    rope_parameters={
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 4096,  # a YaRN ramp over rope dims 2..5
        "beta_fast": 32.0,
        "beta_slow": 1.0,
    },
    max_position_embeddings=16384,
    initializer_range=0.1,  # large enough that the SwiGLU clamps and Sinkhorn act
)
SEQ = 40


def _hf_v4(**overrides):
    cfg = transformers.DeepseekV4Config(**{**TINY, **overrides})
    torch.manual_seed(0)
    hf = transformers.DeepseekV4ForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # transformers starts these at 0 or 1, which would leave whole code paths inert
        for name, p in hf.named_parameters():
            if name.endswith(("sinks", "position_bias", "base", "hc_base")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif name.endswith(("scale", "hc_scale")) or "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
        for layer in hf.model.layers:
            gate = layer.mlp.gate
            if hasattr(gate, "tid2eid"):  # K distinct experts per token id
                gate.tid2eid.copy_(torch.rand(cfg.vocab_size, cfg.n_routed_experts, generator=g).topk(2).indices)
            else:
                gate.e_score_correction_bias.copy_(torch.randn(cfg.n_routed_experts, generator=g) * 0.3)
    return hf


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out


def _ids(vocab: int = 256, seq: int = SEQ) -> torch.Tensor:
    return torch.randint(0, vocab, (2, seq), generator=torch.Generator().manual_seed(2))


def _max_diff(hf, ours, ids) -> float:
    """Max |logits difference|, after checking that no top-k choice of ours hinged on a tie (where transformers'
    `topk` and our earliest-entry rule may differ, and nothing defines the right answer)."""
    with recorded_selections() as selections:
        ours_logits = _logits(ours, ids)
    if ours.config.index_topk < ids.shape[1] // min(ours.config.compress_rates.values()):
        assert_decisive(selections)
    return (_logits(hf, ids) - ours_logits).abs().max().item()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    hf = _hf_v4()
    path = tmp_path_factory.mktemp("hf_v4")
    hf.save_pretrained(path)
    return hf, path


def test_transformers_checkpoint_loads_with_matching_logits(hf_dir):
    hf, path = hf_dir
    ours = load_model(path)
    c = ours.config
    assert type(ours).__name__ == "TransformerV4" and c.model_type == "deepseek_v4"
    assert c.layer_types == TINY["layer_types"] and c.qk_rope_head_dim == 16 and c.compress_rope_theta == 1.6e5
    assert c.yarn is not None and c.yarn["factor"] == 4.0
    diff = _max_diff(hf, ours, _ids())
    assert diff < 1e-4, f"max |logits diff| = {diff}"


@pytest.mark.parametrize(
    "overrides,seq",
    [
        (dict(hc_sinkhorn_iters=1), SEQ),  # Sinkhorn's first (column) step alone
        (dict(hc_sinkhorn_iters=3, sliding_window=64), SEQ),  # the window covers everything
        (dict(index_topk=16), SEQ),  # the indexer keeps every visible entry
        ({}, 3),  # shorter than any compression window: no entries at all
        ({}, 1),
    ],
)
def test_edge_configs_match_transformers(tmp_path, overrides, seq):
    hf = _hf_v4(**overrides)
    hf.save_pretrained(tmp_path)
    diff = _max_diff(hf, load_model(tmp_path), _ids(seq=seq))
    assert diff < 1e-4, f"max |logits diff| = {diff}"


def test_nanoseek_checkpoint_loads_in_transformers(tmp_path):
    config = ModelConfig.from_preset("tiny-v4", initializer_range=0.1, index_n_heads=16)  # decisive top-k (P9)
    torch.manual_seed(0)
    ours = Transformer(config).eval()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith(("sinks", "position_bias", "base")):
                p.normal_(0, 0.5)
        for m in ours.moe_layers():
            if m.gate.e_score_correction_bias is not None:
                m.gate.e_score_correction_bias.normal_(0, 0.3)
    save_model(ours, tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:  # DeepSeek's hub names
        names = set(f.keys())
        assert f.get_tensor("layers.0.ffn.gate.tid2eid").dtype == torch.int32
    assert {"embed.weight", "head.weight", "hc_head_fn", "layers.1.attn.indexer.compressor.ape"} <= names
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == "DeepseekV4ForCausalLM" and hf.config.layer_types == config.layer_types
    diff = _max_diff(hf, ours, _ids(config.vocab_size, 48))
    assert diff < 1e-4, f"max |logits diff| = {diff}"
    assert (_logits(load_model(tmp_path), _ids()) == _logits(ours, _ids())).all()  # and back into nanoseek


def test_hub_extras_are_skipped(tmp_path):
    """DeepSeek's files may keep gate.bias on hash-routed layers, which route without one."""
    model = Transformer(ModelConfig.from_preset("tiny-v4")).eval()
    save_model(model, tmp_path)
    path = str(tmp_path / "model.safetensors")
    with safe_open(path, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["layers.0.ffn.gate.bias"] = torch.ones(8)
    save_file(tensors, path)
    ids = _ids()
    assert (_logits(load_model(tmp_path), ids) == _logits(model, ids)).all()


def test_parity_test_catches_wrong_selection_and_mixing(hf_dir):
    """Guard the guard: attending to every compressed entry, or mixing streams with C instead of C^T, must break
    parity (a transposed C is just as doubly stochastic)."""
    hf, path = hf_dir
    ids = _ids()
    ours = load_model(path)
    for layer in ours.layers:
        if layer.self_attn.indexer is not None:
            layer.self_attn.indexer.topk = 100
    assert _max_diff(hf, ours, ids) > 1e-3
    ours = load_model(path)
    for layer in ours.layers:
        layer.attn_hc.weights = _transposed(layer.attn_hc.weights)
    assert _max_diff(hf, ours, ids) > 1e-3


def _transposed(weights):
    def wrapped(streams):
        pre, post, comb = weights(streams)
        return pre, post, comb.mT

    return wrapped


def test_hash_layers_route_by_token_id(hf_dir):
    _, path = hf_dir
    model = load_model(path)
    moe = model.layers[0].mlp
    x, ids = torch.randn(10, 64), torch.arange(10)
    _, indices, _ = moe.gate(x, ids)
    assert moe.hash_routed and (indices == moe.gate.tid2eid[ids]).all()
    with pytest.raises(ValueError, match="token id"):
        moe.gate(x)


def test_sinkhorn_ends_on_columns_and_converges_to_doubly_stochastic():
    logits = torch.randn(64, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2
    ones = torch.ones(64, 4, dtype=torch.float64)
    c = sinkhorn(logits, iters=20, eps=1e-6)
    assert torch.allclose(c.sum(-2), ones, atol=1e-5)  # every destination stream: a convex mix
    c = sinkhorn(logits, iters=500, eps=1e-6)
    assert torch.allclose(c.sum(-1), ones, atol=1e-4) and torch.allclose(c.sum(-2), ones, atol=1e-5)


def test_config_round_trips_and_transformers_reads_it(tmp_path):
    c = ModelConfig.from_preset("deepseek-v4-flash")
    c.save_json(tmp_path)
    assert ModelConfig.from_json(tmp_path).to_dict() == c.to_dict()
    d = json.loads((tmp_path / "config.json").read_text())
    assert "intermediate_size" not in d and "kv_lora_rank" not in d  # HF would read the first as the expert width
    assert d["compress_ratios"][:4] == [0, 0, 4, 128] and d["num_hash_layers"] == 3
    hf = transformers.AutoConfig.from_pretrained(tmp_path)
    assert hf.layer_types == c.layer_types and hf.mlp_layer_types == c.mlp_layer_types
    assert hf.qk_rope_head_dim == 64 and hf.rope_parameters["compress"]["factor"] == 16
    assert hf.rope_parameters["main"]["rope_type"] == "default"
    # DeepSeek's hub form: legacy compress_ratios / num_hash_layers / qk_rope_head_dim, flat rope_scaling
    hub = {k: v for k, v in d.items() if k not in ("layer_types", "mlp_layer_types", "partial_rotary_factor")}
    hub["compress_ratios"] = d["compress_ratios"] + [0]  # the hub lists the MTP layer too
    assert ModelConfig.from_dict(hub).to_dict() == c.to_dict()
    v3 = ModelConfig.from_preset("tiny").to_dict()  # V3 files stay as they were
    assert not {"head_dim", "hc_mult", "layer_types", "swiglu_limit"} & set(v3)


def test_presets_match_published_sizes():
    """V4-Flash 284B / 13B activated, V4-Pro 1.6T / 49B, counted as DeepSeek counts (V3: 671B / 37B): the main
    model without its MTP block, and activated parameters without the input embedding (a lookup, no compute)."""
    flash = ModelConfig.from_preset("deepseek-v4-flash")
    pro = ModelConfig.from_preset("deepseek-v4-pro")
    for config, total_in_units, unit, activated_b in ((flash, 284, 1e9, 13), (pro, 16, 1e11, 49)):
        counts = count_parameters(config.replace(num_nextn_predict_layers=0))
        embedding = config.vocab_size * config.hidden_size
        assert round(counts.total / unit) == total_in_units, counts.total  # to the published digits
        assert round((counts.activated - embedding) / 1e9) == activated_b, counts.activated
    assert flash.layer_types.count(CSA) == 21 and flash.layer_types.count(HCA) == 20
    assert pro.layer_types.count(CSA) == 30 and pro.layer_types.count(HCA) == 31


def test_tiny_v4_trains():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny-v4")).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 64, (4, 33))
    losses = []
    for _ in range(15):
        loss = model.compute_loss(ids[:, :-1], ids[:, 1:]).total()
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.update_expert_bias(model.expert_loads(), 1e-3)
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
