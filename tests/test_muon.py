"""Muon (--optim muon): Newton-Schulz orthogonalises the momentum of hidden matrices, AdamW keeps the rest; it
trains V3 and V4 models and a run resumes from its checkpoint bit for bit."""

from __future__ import annotations

import pytest
import torch
from helpers import interrupt_after

from nanoseek import ModelConfig, Transformer, load_model
from nanoseek.data.shards import TokenLoader
from nanoseek.train.muon import Muon, muon_parameters, orthogonalize
from nanoseek.train.optim import build_optimizer
from nanoseek.train.pretrain import PretrainJob, TrainConfig, run_pretrain


def test_newton_schulz_sets_every_singular_value_near_one():
    g = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    g[:, 0] *= 100  # badly conditioned
    for m in (g, g.T, torch.stack([g, 2 * g])):
        s = torch.linalg.svdvals(orthogonalize(m))
        assert s.min() > 0.9 and s.max() < 1.1, s
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    assert torch.allclose(orthogonalize(g), u @ vh, atol=0.1)  # the polar factor U V^T


@pytest.mark.parametrize("preset", ["tiny", "tiny-v4"])
def test_hidden_matrices_get_muon_and_the_rest_adamw(preset):
    model = Transformer(ModelConfig.from_preset(preset))
    muon, rest = muon_parameters(model)
    names = {id(p): n for n, p in model.named_parameters()}
    muon_names, rest_names = {names[id(p)] for p in muon}, {names[id(p)] for p in rest}
    assert not muon_names & rest_names
    assert muon_names | rest_names == {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"embed_tokens.weight", "lm_head.weight", "norm.weight"} <= rest_names
    assert any(n.endswith("mlp.gate.weight") for n in rest_names)  # the router
    assert any(n.endswith("experts.w13") for n in muon_names) and any(n.endswith("q_b_proj.weight") for n in muon_names)
    assert all(p.dim() >= 2 for p in muon)
    if preset == "tiny-v4":
        assert any(n.endswith("attn_hc.fn") for n in rest_names) and any(n.endswith("sinks") for n in rest_names)
    optimizer = build_optimizer(model, 1e-3, optim="muon")
    assert isinstance(optimizer, Muon) and [g["muon"] for g in optimizer.param_groups] == [True, False, False]


@pytest.mark.parametrize("preset", ["tiny", "tiny-v4"])
def test_muon_trains_a_tiny_model_at_adamws_learning_rate(preset):
    """The update-RMS rescale lets Muon take AdamW's lr (1e-2 here: AdamW ends at 2.5 / 1.5 in 15 steps)."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset(preset)).train()
    optimizer = build_optimizer(model, 1e-2, optim="muon")
    ids = torch.randint(0, 64, (4, 33), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(15):
        loss = model.compute_loss(ids[:, :-1], ids[:, 1:]).total()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.4 * losses[0], losses


def test_muon_run_resumes_exactly(builtin_data, tmp_path, monkeypatch):
    """A V4 run with Muon, interrupted after step 6 and resumed, ends with the weights of the run that never
    stopped: the momentum buffers and AdamW moments come back from the checkpoint."""
    cfg = TrainConfig(steps=10, batch_size=2, seq_len=32, lr=3e-3, warmup=2, eval_every=0, optim="muon", save_every=6)

    def job(out: str, resume: bool = False) -> PretrainJob:
        return PretrainJob(out=out, data=str(builtin_data), preset="tiny-v4", train=cfg, resume=resume)

    run_pretrain(job(str(tmp_path / "full")))
    interrupt_after(monkeypatch, TokenLoader, 6)
    with pytest.raises(KeyboardInterrupt):
        run_pretrain(job(str(tmp_path / "split")))
    monkeypatch.undo()
    run_pretrain(job(str(tmp_path / "split"), resume=True))
    a = load_model(tmp_path / "full" / "checkpoints" / "step_10").state_dict()
    b = load_model(tmp_path / "split" / "checkpoints" / "step_10").state_dict()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    first = load_model(tmp_path / "split" / "checkpoints" / "step_6").state_dict()
    assert any(not torch.equal(first[n], a[n]) for n in a)
