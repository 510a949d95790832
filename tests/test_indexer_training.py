"""Training the V3.2 lightning indexer (V3.2 report sec. 2.1.1): a dense warm-up fits the indexer to the summed
attention distribution by KL with everything else frozen, then sparse training fits it on its own top-k while
the language-model loss trains the rest; the indexer's inputs are detached, so neither loss leaks. V4's CSA
indexers train the same way over compressed entries."""

from __future__ import annotations

import pytest
import torch

from nanoseek import ModelConfig, Transformer, load_model
from nanoseek.distributed.data_parallel import Parallel
from nanoseek.distributed.process_group import DistEnv
from nanoseek.model.indexer import indexer_kl
from nanoseek.train.indexer_warmup import split_indexer_parameters
from nanoseek.train.metrics import read_metrics
from nanoseek.train.pretrain import PretrainJob, TrainConfig, run_pretrain


def _model(preset: str = "tiny-v32") -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_preset(preset, max_position_embeddings=64)).train()


def _ids(model: Transformer) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (2, 33), generator=torch.Generator().manual_seed(1))


def test_indexer_kl_is_zero_when_the_scores_match_the_attention():
    target = torch.tensor([[[0.5, 0.25, 0.25, 0.0]]])
    allowed = torch.tensor([[[True, True, True, False]]])
    assert indexer_kl(target, target.clamp(min=1e-9).log(), allowed).abs() < 1e-6
    assert indexer_kl(target, torch.zeros(1, 1, 4), allowed) > 0.05


@pytest.mark.parametrize("preset", ["tiny-v32", "tiny-v4"])
def test_indexer_loss_reaches_only_the_indexer_and_the_lm_loss_everything_else(preset):
    model = _model(preset)
    ids = _ids(model)
    for mode in ("dense", "sparse"):
        model.set_indexer_training(mode)
        losses = model.compute_loss(ids[:, :-1], ids[:, 1:])
        assert losses.indexer is not None and losses.indexer > 0
        model.zero_grad()
        losses.indexer.backward()
        for name, p in model.named_parameters():
            assert (p.grad is not None and p.grad.abs().sum() > 0) == (".indexer." in name), (mode, name)
    model.set_indexer_training(None)
    assert model.compute_loss(ids[:, :-1], ids[:, 1:]).indexer is None


def test_v4_indexer_is_frozen_unless_trained():
    model = _model("tiny-v4")
    indexer = [n for n, p in model.named_parameters() if ".indexer." in n]
    assert indexer and not any(p.requires_grad for n, p in model.named_parameters() if ".indexer." in n)
    model.set_indexer_training("dense")
    assert all(p.requires_grad for n, p in model.named_parameters() if ".indexer." in n)


def test_v4_indexer_kl_targets_the_attention_over_entries_and_skips_queries_without_any():
    """The target is the attention's mass on each allowed entry, conditioned on attending to an entry at all."""
    from nanoseek.model.compressed_attention import compressed_indexer_kl

    p = torch.tensor([[[[0.0, 0.0], [0.2, 0.1]], [[0.0, 0.0], [0.1, 0.2]]]])  # [B 1, heads 2, T 2, entries 2]
    allowed = torch.tensor([[[False, False], [True, True]]])  # query 0 sees no entry yet
    scores = torch.zeros(1, 2, 2, requires_grad=True)  # uniform: already the target (0.3 / 0.3)
    loss = compressed_indexer_kl(p, scores, allowed)
    assert loss.abs() < 1e-6
    loss.backward()
    assert torch.isfinite(scores.grad).all()
    assert compressed_indexer_kl(p, torch.tensor([[[0.0, 0.0], [2.0, 0.0]]]), allowed) > 0.1


def test_v4_dense_mode_attends_every_visible_entry():
    """32 tokens make 8 CSA entries, of which the indexer keeps 3: dense mode must attend to all of them."""
    model = _model("tiny-v4").eval()
    ids = _ids(model)
    with torch.no_grad():
        sparse = model(ids)
        model.set_indexer_training("dense")
        dense = model(ids)
        for m in model.modules():
            if getattr(m, "indexer", None) is not None:
                m.indexer.topk = 100  # selection by score that keeps every entry
        model.set_indexer_training(None)
        assert torch.allclose(dense, model(ids), atol=1e-6) and not torch.allclose(dense, sparse, atol=1e-3)


def test_dense_mode_attends_densely():
    """With the top-k binding (32 tokens > index_topk 8), dense mode must give the V3-style dense attention."""
    model = _model().eval()
    ids = _ids(model)
    with torch.no_grad():
        sparse = model(ids)
        model.set_indexer_training("dense")
        dense = model(ids)
        for layer in model.layers:
            layer.self_attn.indexer = None  # plain causal MLA: the reference for dense attention
        assert torch.allclose(dense, model(ids), atol=1e-6) and not torch.allclose(dense, sparse, atol=1e-3)


# V4's targets are coarser (a few CSA entries per query, near-uniform attention at init): more, larger steps
WARMUP_RUNS = {
    "tiny-v32": dict(steps=12, warm=8, batch_size=2, lr=3e-3),
    "tiny-v4": dict(steps=24, warm=20, batch_size=8, lr=2e-2),
}


@pytest.mark.parametrize("preset", WARMUP_RUNS)
def test_warmup_fits_the_indexer_then_sparse_training_trains_everything(builtin_data, tmp_path, preset):
    steps, warm, batch_size, lr = WARMUP_RUNS[preset].values()
    cfg = TrainConfig(steps=steps, batch_size=batch_size, seq_len=32, lr=lr, warmup=1, eval_every=0, save_every=warm)
    cfg.indexer_warmup = warm
    job = PretrainJob(out=str(tmp_path), data=str(builtin_data), preset=preset, train=cfg)
    run_pretrain(job)
    records = read_metrics(tmp_path / "metrics.jsonl")
    kl = [r["indexer_loss"] for r in records]
    assert sum(kl[warm - 3 : warm]) < 0.8 * sum(kl[:3]), kl  # the warm-up fits the indexer
    assert all(r["indexer_grad_norm"] > 0 for r in records) and all(r["grad_norm"] > 0 for r in records[warm:])
    torch.manual_seed(cfg.seed)  # the run's initial weights, as run_pretrain makes them
    start = Transformer(load_model(tmp_path / "checkpoints" / f"step_{warm}").config).state_dict()
    warm_sd = load_model(tmp_path / "checkpoints" / f"step_{warm}").state_dict()
    end = load_model(tmp_path / "checkpoints" / f"step_{steps}").state_dict()
    for name in warm_sd:
        assert torch.equal(warm_sd[name], start[name]) != (".indexer." in name), name  # only the indexer moved
        frozen = name.endswith(("e_score_correction_bias", "tid2eid"))  # moved by balancing / never
        assert not torch.equal(end[name], warm_sd[name]) or frozen, name


@pytest.mark.parametrize("preset", ["tiny-v32", "tiny-v4"])
def test_lm_and_indexer_gradients_are_clipped_each_by_its_own_norm(preset):
    """The indexer's KL loss is detached from the LM loss: two objectives, so one joint clip norm would let the
    larger shrink the smaller's step. Each group is clipped by its own norm."""
    model = _model(preset)
    ids = _ids(model)
    model.set_indexer_training("sparse")
    model.compute_loss(ids[:, :-1], ids[:, 1:]).total().backward()
    groups = [[p for p in g if p.grad is not None] for g in split_indexer_parameters(model)]
    norms = [torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in g])).item() for g in groups]
    small, big = sorted(range(2), key=lambda i: norms[i])
    clip = (norms[small] + norms[big]) / 2
    before = [p.grad.clone() for p in groups[small]]
    par = Parallel(model, DistEnv())
    assert [par.clip_grad_norm(clip, g) for g in groups] == pytest.approx(norms)
    assert all(torch.equal(p.grad, b) for p, b in zip(groups[small], before))  # within its own limit: untouched
    after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in groups[big]])).item()
    assert after == pytest.approx(clip, rel=1e-4)
