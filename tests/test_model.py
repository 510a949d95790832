"""Model behaviour: config validation and JSON, routing, MTP loss, gradients, balancing, sizes."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_config as tiny

from nanoseek import ModelConfig, Transformer
from nanoseek.model.moe import Gate


# ------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(topk_group=3, n_group=2), "topk_group"),
        (dict(n_group=3), "divisible by n_group"),
        (dict(hidden_size=0), "hidden_size"),
        (dict(num_experts_per_tok=9), "num_experts_per_tok"),
        (dict(qk_rope_head_dim=7), "even"),
        (dict(scoring_func="relu"), "scoring_func"),
        (dict(first_k_dense_replace=5), "first_k_dense_replace"),
        (dict(rope_scaling={"type": "yarn", "factor": 4.0}), "original_max_position_embeddings"),
    ],
)
def test_invalid_config_names_the_field(kw, msg):
    with pytest.raises(ValueError, match=msg):
        tiny(**kw)


def test_unknown_preset_lists_choices():
    with pytest.raises(ValueError, match="cpu-small"):
        ModelConfig.from_preset("nope")


def test_config_json_round_trip_carries_interop_fields(tmp_path):
    rs = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    c = tiny(rope_scaling=rs)
    c.save_json(tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    assert d["model_type"] == "deepseek_v3" and d["architectures"] == ["DeepseekV3ForCausalLM"]
    assert d["num_key_value_heads"] == c.num_attention_heads
    assert d["scoring_func"] == "sigmoid" and d["topk_method"] == "noaux_tc"
    assert d["num_nextn_predict_layers"] == 1
    assert d["rope_scaling"]["mscale"] == 1.0 and d["rope_scaling"]["mscale_all_dim"] == 1.0
    back = ModelConfig.from_json(tmp_path)
    assert back.to_dict() == c.to_dict()


def test_config_reads_transformers_v5_rope_parameters():
    d = tiny().to_dict()
    del d["rope_theta"]
    d["rope_parameters"] = {
        "rope_type": "yarn",
        "rope_theta": 5e5,
        "factor": 8.0,
        "original_max_position_embeddings": 32,
    }
    c = ModelConfig.from_dict(d)
    assert c.rope_theta == 5e5 and c.yarn["factor"] == 8.0


def test_bad_config_json_file_gives_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ModelConfig.from_json(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelConfig.from_json(tmp_path / "missing")


def test_real_presets_have_the_published_sizes():
    with torch.device("meta"):
        v3 = Transformer(ModelConfig.from_preset("deepseek-v3"))
        lite = Transformer(ModelConfig.from_preset("deepseek-v2-lite"))
    assert round(v3.num_parameters() / 1e9) == 671
    assert 36.5e9 < v3.num_parameters(activated=True) < 38e9
    assert round(lite.num_parameters() / 1e9, 1) == 15.7
    small = Transformer(ModelConfig.from_preset("cpu-small"))
    assert 1e6 < small.num_parameters() < 5e6
    with torch.device("meta"):
        gpu = Transformer(ModelConfig.from_preset("gpu-small"))
    assert 100e6 < gpu.num_parameters() < 200e6


def test_softmax_scale_includes_yarn_mscale():
    v3 = ModelConfig.from_preset("deepseek-v3")
    assert v3.softmax_scale == pytest.approx(0.1352338, abs=1e-7)
    lite = ModelConfig.from_preset("deepseek-v2-lite")
    assert lite.softmax_scale == pytest.approx(0.1147214, abs=1e-7)


# ------------------------------------------------------------------------------------------ routing
def _gate(**kw) -> Gate:
    g = Gate(tiny(**kw))
    torch.nn.init.normal_(g.weight)
    return g


def test_bias_selects_experts_but_does_not_weight_them():
    g = _gate(n_group=1, topk_group=1, routed_scaling_factor=1.0)
    x = torch.randn(5, 32)
    g.e_score_correction_bias[:] = torch.tensor([10.0, 10.0] + [0.0] * 6)  # force experts 0 and 1
    w, idx, scores = g(x)
    assert sorted(idx[0].tolist()) == [0, 1] and (idx.sort(-1).values == torch.tensor([0, 1])).all()
    expected = scores[:, :2] / scores[:, :2].sum(-1, keepdim=True)  # unbiased, normalised
    torch.testing.assert_close(w.sort(-1).values, expected.sort(-1).values)


def test_group_limit_restricts_experts_to_kept_groups_even_with_negative_scores():
    g = _gate(n_group=2, topk_group=1, routed_scaling_factor=2.5)
    g.e_score_correction_bias[:] = torch.tensor([-5.0] * 4 + [-2.0, -2.0, -3.0, -3.0])
    w, idx, _ = g(torch.randn(16, 32))
    # group 1 wins (top-2 sum ~ -3 vs ~ -9), and its biased scores are all negative: a 0.0 fill for the
    # dropped group (old HF / remote code) would pick group-0 experts; the -inf fill must not
    assert (idx >= 4).all()
    assert torch.allclose(w.sum(-1), torch.full((16,), 2.5))


def test_softmax_greedy_routing_is_unnormalised_probabilities():
    torch.manual_seed(0)  # the gate's weights and the input: not whatever the tests before left in the RNG
    g = _gate(
        scoring_func="softmax",
        topk_method="greedy",
        n_group=1,
        topk_group=1,
        norm_topk_prob=False,
        routed_scaling_factor=1.0,
    )
    w, idx, scores = g(torch.randn(4, 32))
    torch.testing.assert_close(w, scores.gather(1, idx))
    assert (w.sum(-1) <= 1 + 1e-6).all() and (w.sum(-1) < 0.999).any()  # top-k of a softmax, not renormalised


def test_grouped_experts_equal_a_per_token_loop():
    torch.manual_seed(0)
    model = Transformer(tiny()).eval()
    moe = model.layers[1].mlp
    x = torch.randn(2, 7, 32)
    y = moe(x)
    w, idx, _ = moe.gate(x.view(-1, 32))
    ref = moe.shared_experts(x).view(-1, 32)
    I = model.config.moe_intermediate_size
    for t in range(14):
        for k in range(2):
            e = idx[t, k]
            h = x.view(-1, 32)[t] @ moe.experts.w13[e]
            ref[t] += w[t, k] * ((torch.nn.functional.silu(h[:I]) * h[I:]) @ moe.experts.w2[e])
    torch.testing.assert_close(y.view(-1, 32), ref, atol=1e-5, rtol=1e-5)
    assert moe.last_load.sum() == 14 * 2


def test_dense_experts_equal_routed_experts():
    """The fixed-shape path of compiled decoding (every expert on every token, unselected ones weighted 0)."""
    torch.manual_seed(0)
    moe = Transformer(tiny()).eval().layers[1].mlp
    x = torch.randn(5, 32)
    w, idx, _ = moe.gate(x)
    dense_w = torch.zeros(5, moe.n_experts).scatter_(1, idx, w)
    routed = (moe.experts.gathered(x, idx) * w.unsqueeze(-1)).sum(1)
    torch.testing.assert_close(moe.experts.dense(x, dense_w), routed, atol=1e-5, rtol=1e-5)


def test_the_fast_paths_experts_equal_routed_experts():
    """The exported fast path's MoE: one token's experts read in place (`selected`), and several tokens' rows in
    one zero-padded batch per expert (`padded`), including an expert nobody chose and one everybody chose."""
    torch.manual_seed(0)
    moe = Transformer(tiny()).eval().layers[1].mlp
    x = torch.randn(6, 32)
    idx = torch.tensor([[0, 3], [3, 1], [3, 0], [5, 3], [3, 7], [2, 3]])  # expert 3 six times, 4 and 6 never
    torch.testing.assert_close(moe.experts.padded(x, idx), moe.experts.gathered(x, idx), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(moe.experts.selected(x[:1], idx[:1]), moe.experts.gathered(x[:1], idx[:1]))
    with torch.no_grad():  # one token on the CPU takes the in-place path in eager inference too
        moe.gather_max_tokens = 0
        w, i, _ = moe.gate(x[:1])
        ref = (moe.experts.gathered(x[:1], i) * w.unsqueeze(-1)).sum(1) + moe.shared_experts(x[:1])
        torch.testing.assert_close(moe(x[None, :1]).view(1, 32), ref, atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------------------- training
def test_gradients_reach_every_learnable_parameter_and_not_the_bias():
    torch.manual_seed(0)
    model = Transformer(tiny()).train()
    ids = torch.randint(0, 256, (4, 24))
    losses = model.compute_loss(ids[:, :-1], ids[:, 1:])
    assert losses.mtp > 0 and losses.aux > 0
    losses.total(0.3).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient for {name}"
    for moe in model.moe_layers():
        assert not moe.gate.e_score_correction_bias.requires_grad
    names = {n for n, _ in model.named_parameters()}
    assert {"mtp.0.eh_proj.weight", "layers.1.mlp.gate.weight", "layers.1.mlp.experts.w13"} <= names
    assert "layers.0.self_attn.q_a_proj.weight" in names and "layers.0.self_attn.kv_b_proj.weight" in names


def test_mtp_loss_targets_the_token_after_next():
    """A model whose MTP head is perfect for t+2 gets near-zero MTP loss only with the right alignment."""
    torch.manual_seed(0)
    model = Transformer(tiny()).eval()
    ids = torch.randint(0, 256, (2, 10))
    inputs, targets = ids[:, :-1], ids[:, 1:]
    h, (cos, sin) = model.hidden(inputs)
    # MTP depth 1 at position i must be scored against ids[:, i + 2] = targets[:, i + 1]
    _, hn = model.mtp[0](h, model.embed_tokens(targets), cos, sin)
    logits = model.lm_head(hn)
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 256), ids[:, 2:].reshape(-1))
    torch.testing.assert_close(model.compute_loss(inputs, targets).mtp, expected)


def test_ignored_targets_do_not_count():
    torch.manual_seed(0)
    model = Transformer(tiny()).eval()
    ids = torch.randint(0, 256, (2, 12))
    targets = ids[:, 1:].clone()
    a = model.compute_loss(ids[:, :-1], targets).main
    targets[:, :5] = -100
    b = model.compute_loss(ids[:, :-1], targets).main
    logits = model(ids[:, :-1])
    ref = torch.nn.functional.cross_entropy(logits[:, 5:].reshape(-1, 256), ids[:, 6:].reshape(-1))
    torch.testing.assert_close(b, ref)
    assert not torch.isclose(a, b)


def test_bias_update_moves_load_towards_balance():
    torch.manual_seed(0)
    model = Transformer(tiny(n_group=1, topk_group=1)).eval()
    with torch.no_grad():
        for moe in model.moe_layers():
            moe.gate.weight[0] += 2.0  # expert 0 hogs the tokens
    ids = torch.randint(0, 256, (8, 32))
    model(ids)
    before = model.expert_loads().float()
    for _ in range(60):
        model.update_expert_bias(model.expert_loads(), gamma=0.05)
        model(ids)
    after = model.expert_loads().float()
    assert before.shape == (1, 8)  # one MoE layer (MTP is not run by forward)
    assert (after.max(-1).values / after.mean(-1)).item() < (before.max(-1).values / before.mean(-1)).item()


def test_bad_input_ids_give_clear_errors():
    model = Transformer(tiny()).eval()
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(torch.tensor([[1, 2, 999]]))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, 300, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        model(torch.zeros(5, dtype=torch.long))


def test_causal_the_past_does_not_see_the_future():
    torch.manual_seed(0)
    model = Transformer(tiny()).eval()
    ids = torch.randint(0, 256, (1, 16))
    other = ids.clone()
    other[0, 10:] = (other[0, 10:] + 1) % 256
    torch.testing.assert_close(model(ids)[:, :10], model(other)[:, :10])
