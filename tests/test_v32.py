"""DeepSeek-V3.2: the lightning indexer and sparse MLA reproduce transformers' DeepseekV32ForCausalLM, both ways,
decode incrementally like the full forward, and the preset has the published size."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.selections import assert_decisive, recorded_selections

from nanoseek import ModelConfig, Transformer, load_model, save_model
from nanoseek.model.flops import flops_per_token
from nanoseek.model.indexer import Indexer, select_topk
from nanoseek.model.rope import apply_rope, apply_rope_half

transformers = pytest.importorskip("transformers")

TOPK = 8  # keys per query; sequences of 48 make the selection bind from position 8 on
YARN = {
    "type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 32,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}
# the spec's D1 config: dense + 2 MoE layers, group-limited routing, YaRN beyond 32 positions
TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    first_k_dense_replace=1,
    num_attention_heads=4,
    q_lora_rank=32,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=16,
    v_head_dim=16,
    index_n_heads=16,  # ReLU zeroes a key's score with probability 2^-heads: few heads tie at 0 (spec P9)
    index_head_dim=64,
    index_topk=TOPK,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_group=4,
    topk_group=2,
    n_shared_experts=1,
    max_position_embeddings=128,
)


def _hf_v32(tmp_path, **overrides):
    """A transformers V3.2 model with every parameter HF sets to 0 or 1 re-randomised, saved to tmp_path."""
    rope = {"rope_type": "yarn", "rope_theta": 10000.0, **{k: v for k, v in YARN.items() if k != "type"}}
    cfg = transformers.DeepseekV32Config(**{**TINY, **overrides}, num_key_value_heads=4, rope_parameters=rope)
    torch.manual_seed(0)
    hf = transformers.DeepseekV32ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:  # RMSNorm and LayerNorm weights, LayerNorm bias
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
            elif ".indexer." in name:  # scores spread well beyond float error, so top-k choices are decisive
                p.normal_(0, 0.2)
        for layer in hf.model.layers[cfg.first_k_dense_replace :]:
            layer.mlp.gate.e_score_correction_bias.copy_(torch.randn(cfg.n_routed_experts) * 0.5)
            layer.mlp.gate.weight.normal_(0, 0.5)
    hf.save_pretrained(tmp_path)
    return hf


def _ids(vocab: int, seq_len: int = 48) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randint(0, vocab, (2, seq_len))


def _compare(hf, ours, vocab: int, seq_len: int = 48) -> None:
    ids = _ids(vocab, seq_len)
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids)
    got = got.logits if hasattr(got, "logits") else got
    diff = (ref - got).abs().max().item()
    assert diff < 1e-4, f"max |logits diff| = {diff}"


# ------------------------------------------------------------------------------------------------ config
def test_v32_config_round_trips_with_transformers_field_names(tmp_path):
    c = ModelConfig.from_preset("tiny-v32", rope_scaling=dict(YARN), max_position_embeddings=128)
    c.save_json(tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    assert d["model_type"] == "deepseek_v32" and d["architectures"] == ["DeepseekV32ForCausalLM"]
    assert (d["index_n_heads"], d["index_head_dim"], d["index_topk"]) == (4, 64, 8)
    assert ModelConfig.from_json(tmp_path).to_dict() == c.to_dict()
    hf = transformers.AutoConfig.from_pretrained(tmp_path)
    assert (hf.index_n_heads, hf.index_head_dim, hf.index_topk) == (4, 64, 8)
    assert hf.mlp_layer_types == ["dense", "sparse"]
    v3 = ModelConfig.from_preset("tiny").to_dict()  # V3 files stay as they were
    assert v3["model_type"] == "deepseek_v3" and not any(k.startswith("index_") for k in v3)


def test_v32_config_reads_transformers_layer_lists():
    d = ModelConfig.from_preset("tiny-v32").to_dict()
    d.update(first_k_dense_replace=0, mlp_layer_types=["dense", "sparse"], layer_types=["indexed_attention"] * 2)
    c = ModelConfig.from_dict(d)
    assert c.first_k_dense_replace == 1 and "mlp_layer_types" not in c.extra and "layer_types" not in c.extra
    with pytest.raises(ValueError, match="mlp_layer_types"):
        ModelConfig.from_dict({**d, "mlp_layer_types": ["sparse", "dense"]})
    with pytest.raises(ValueError, match="q_lora_rank"):
        ModelConfig.from_preset("tiny-v32", q_lora_rank=None)
    with pytest.raises(ValueError, match="index_head_dim"):
        ModelConfig.from_preset("tiny-v32", index_head_dim=4)


def test_v32_preset_has_the_published_size():
    with torch.device("meta"):
        v32 = Transformer(ModelConfig.from_preset("deepseek-v32"))
        v3 = Transformer(ModelConfig.from_preset("deepseek-v3"))
    c = v32.config
    indexer = c.num_hidden_layers * (
        c.q_lora_rank * c.index_n_heads * c.index_head_dim
        + c.hidden_size * (c.index_head_dim + c.index_n_heads)
        + 2 * c.index_head_dim
    )
    assert v32.num_parameters() == v3.num_parameters() + indexer  # 671B + 0.85B of indexers
    assert round(v32.num_parameters() / 1e9) == 672
    assert 37e9 < v32.num_parameters(activated=True) < 39e9  # V3's 37B + the indexers, all active
    # the hub's "685B": main + MTP layer (with its indexer) + the MTP layer's copies of embedding and head
    on_disk = v32.num_parameters(include_mtp=True) + 2 * c.vocab_size * c.hidden_size
    assert round(on_disk / 1e9) == 685


def test_v32_flops_grow_with_the_indexer_not_the_attention():
    v3, v32 = ModelConfig.from_preset("deepseek-v3"), ModelConfig.from_preset("deepseek-v32")
    assert flops_per_token(v3, 1024) < flops_per_token(v32, 1024) < 1.05 * flops_per_token(v3, 1024)
    assert flops_per_token(v32, 128 * 1024) < 0.5 * flops_per_token(v3, 128 * 1024)  # MLA reads 2048 keys


# ----------------------------------------------------------------------------------------------- indexer
def test_indexer_rope_is_half_split_not_interleaved():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 4)  # [T, heads, d]
    cos, sin = torch.zeros(1, 1, 2), torch.ones(1, 1, 2)  # a quarter turn
    assert apply_rope_half(x, cos, sin).flatten().tolist() == [-3.0, -4.0, 1.0, 2.0]  # pairs (0, 2), (1, 3)
    assert apply_rope(x, cos, sin).flatten().tolist() == [-2.0, -4.0, 1.0, 3.0]  # pairs (0, 1), (2, 3)


def test_indexer_picks_topk_past_keys_only():
    torch.manual_seed(0)
    c = ModelConfig.from_preset("tiny-v32")
    scores = torch.randn(2, 20, 20)
    causal = torch.ones(20, 20, dtype=torch.bool).tril()
    chosen = Indexer(c).select(scores, causal)
    assert not (chosen & ~causal).any()
    assert chosen.sum(-1).tolist() == [[min(t + 1, c.index_topk) for t in range(20)]] * 2
    best = scores.masked_fill(~causal, float("-inf")).topk(c.index_topk, dim=-1).values[..., -1:]
    assert (scores[chosen.nonzero(as_tuple=True)] >= best.expand_as(scores)[chosen]).all()


def test_indexer_ties_go_to_the_earliest_key_at_any_length():
    """Exact ties (ReLU's zeros) are broken by position, so a query picks the same keys whether it sees its t + 1
    keys (a decode step) or a whole padded row (the full forward), and whatever the batch."""
    g = torch.Generator().manual_seed(0)
    T, k = 64, 8
    scores = torch.randn(3, T, T, generator=g).relu().round(decimals=1)  # ~half exact zeros, many equal values
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    full = select_topk(scores, causal, k)
    for t in range(T):
        step = select_topk(scores[:, t : t + 1, : t + 1], causal[t : t + 1, : t + 1], k)
        assert torch.equal(step[:, 0], full[:, t, : t + 1]), t
    row = torch.tensor([[[0.0, 2.0, 0.0, 1.0, 0.0, 0.0, 1.0]]])
    picked = select_topk(row, torch.ones_like(row, dtype=torch.bool), 4)
    assert picked.nonzero()[:, -1].tolist() == [0, 1, 3, 6]  # 2.0, both 1.0s, then the first of the zeros
    assert torch.equal(select_topk(-0.0 * row, row == row, 2), select_topk(0.0 * row, row == row, 2))


def test_indexer_scores_are_differentiable_for_an_indexer_loss():
    torch.manual_seed(0)
    c = ModelConfig.from_preset("tiny-v32")
    ind = Indexer(c)
    x, c_q = torch.randn(1, 5, c.hidden_size), torch.randn(1, 5, c.q_lora_rank)
    cos, sin = torch.ones(5, 1, c.qk_rope_head_dim // 2), torch.zeros(5, 1, c.qk_rope_head_dim // 2)
    ind.scores(x, c_q, cos, sin, ind.keys(x, cos, sin)).logsumexp(-1).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ind.parameters())


# ------------------------------------------------------------------------------------------------ parity
def test_v32_logits_match_transformers(tmp_path):
    hf = _hf_v32(tmp_path)
    ours = load_model(tmp_path)
    assert ours.config.sparse_attention and ours.config.index_topk == TOPK and ours.config.yarn is not None
    hf_picks = []
    for layer in hf.model.layers:
        layer.self_attn.indexer.register_forward_hook(lambda m, a, out: hf_picks.append(out))
    with recorded_selections() as selections:
        _compare(hf, ours, TINY["vocab_size"])
    assert len(selections) == len(hf_picks) == TINY["num_hidden_layers"]
    assert_decisive(selections)
    for (scores, visible, _), picks in zip(selections, hf_picks):  # the same key sets, future keys aside
        theirs = torch.zeros_like(visible).scatter_(-1, picks.long(), True) & visible
        assert torch.equal(Indexer.select(ours.layers[0].self_attn.indexer, scores, visible), theirs)


def test_nanoseek_v32_checkpoint_loads_in_transformers(tmp_path):
    config = ModelConfig.from_preset("tiny-v32", rope_scaling=dict(YARN), max_position_embeddings=128, index_n_heads=16)
    torch.manual_seed(0)
    ours = Transformer(config).eval()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if ".indexer." in name or "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
        for moe in ours.moe_layers():
            moe.gate.e_score_correction_bias.copy_(torch.randn(config.n_routed_experts) * 0.3)
    save_model(ours, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == "DeepseekV32ForCausalLM" and hf.config.index_topk == config.index_topk
    with recorded_selections() as selections:
        _compare(hf, ours, config.vocab_size)
    assert_decisive(selections)


def test_parity_test_catches_dense_attention_and_interleaved_indexer_rope(tmp_path):
    """Guard the guard: ignoring the selection, or the pre-2025-11-17 interleaved indexer RoPE, breaks parity."""
    hf = _hf_v32(tmp_path)
    ours = load_model(tmp_path)
    for layer in ours.layers:
        layer.self_attn.indexer.topk = 10**6  # every visible key: dense causal MLA
    with pytest.raises(AssertionError):
        _compare(hf, ours, TINY["vocab_size"])
    ours = load_model(tmp_path)
    for m in ours.modules():
        if isinstance(m, Indexer):
            r = m.rope_dim
            m._rope = lambda t, cos, sin, r=r: torch.cat((apply_rope(t[..., :r], cos, sin), t[..., r:]), dim=-1)
    with pytest.raises(AssertionError):
        _compare(hf, ours, TINY["vocab_size"])


def test_short_sequences_are_dense_v3_attention(tmp_path):
    """With index_topk or fewer keys DSA selects everything: the V3 model on the same weights gives the same."""
    hf = _hf_v32(tmp_path)
    v32 = load_model(tmp_path)
    v3 = Transformer(v32.config.replace(model_type="deepseek_v3")).eval()
    state = {k: v for k, v in v32.state_dict().items() if ".indexer." not in k}
    v3.load_state_dict(state)
    ids = _ids(TINY["vocab_size"], TOPK)
    with torch.no_grad():
        assert torch.allclose(v32(ids), v3(ids), atol=1e-6)
        assert torch.allclose(hf(ids).logits, v3(ids), atol=1e-4)
        long = _ids(TINY["vocab_size"], 3 * TOPK)
        assert not torch.allclose(v32(long), v3(long), atol=1e-3)


# ------------------------------------------------------------------------------------------------ decode
@pytest.mark.parametrize("heads", [16, 1])
@pytest.mark.parametrize("schedule", [(20,) + (1,) * 28, (7, 3, 13, 1, 24)])
def test_cached_decoding_equals_full_forward(schedule, heads):
    """Prefill + single tokens (absorbed form) and chunks (expanded form), with the indexer keys cached. Row 0 is
    LAG positions ahead of row 1, whose cache row holds noise beyond its length: never visible, never chosen.
    One indexer head scores about half the keys exactly 0 (ReLU): ties at the top-k cut on nearly every query,
    which the earliest-key rule must break alike at every length."""
    torch.manual_seed(0)
    config = ModelConfig.from_preset("tiny-v32", max_position_embeddings=64, index_n_heads=heads)
    model = Transformer(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".indexer." in name:
                p.normal_(0, 0.2)
    c, lag = model.config, 5
    ids = _ids(c.vocab_size, lag + sum(schedule))
    slots = torch.tensor([2, 0])
    kv = torch.randn(c.num_hidden_layers, 3, 64, c.latent_cache_width)  # noise where nothing was written
    assert kv.shape[-1] == c.kv_lora_rank + c.qk_rope_head_dim + c.index_head_dim
    with torch.no_grad():
        full = model(ids)
        model.forward_cached(ids[:1, :lag], kv, slots[:1], torch.tensor([0]))  # row 0's head start
        pos, got = 0, []
        for n in schedule:
            start = torch.tensor([lag + pos, pos])
            chunk = torch.stack([ids[r, int(start[r]) : int(start[r]) + n] for r in range(2)])
            logits, _ = model.forward_cached(chunk, kv, slots, start)
            got.append((start, logits))
            pos += n
    for start, logits in got:
        for r in range(2):
            s = int(start[r])
            ref = full[r, s : s + logits.shape[1]]
            assert torch.allclose(logits[r], ref, atol=1e-5), (r, s, (logits[r] - ref).abs().max().item())


# ---------------------------------------------------------------------------------------------- training
def test_tiny_v32_trains():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny-v32"))
    ids = _ids(model.config.vocab_size, 33)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = model.compute_loss(ids[:, :-1], ids[:, 1:]).total()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    for name, p in model.named_parameters():  # the LM loss never reaches the indexer: top-k is a choice
        assert (p.grad is None) == (".indexer." in name), name
