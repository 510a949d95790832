"""Training the V3.2 lightning indexer (V3.2 report sec. 2.1.1): a dense warm-up fits the indexer to the summed
attention distribution by KL with everything else frozen, then sparse training fits it on its own top-k while
the language-model loss trains the rest; the indexer's inputs are detached, so neither loss leaks."""

from __future__ import annotations

import torch

from nanoseek import ModelConfig, Transformer, load_model
from nanoseek.model.indexer import indexer_kl
from nanoseek.train.metrics import read_metrics
from nanoseek.train.pretrain import PretrainJob, TrainConfig, run_pretrain


def _model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_preset("tiny-v32", max_position_embeddings=64)).train()


def _ids(model: Transformer) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (2, 33), generator=torch.Generator().manual_seed(1))


def test_indexer_kl_is_zero_when_the_scores_match_the_attention():
    target = torch.tensor([[[0.5, 0.25, 0.25, 0.0]]])
    allowed = torch.tensor([[[True, True, True, False]]])
    assert indexer_kl(target, target.clamp(min=1e-9).log(), allowed).abs() < 1e-6
    assert indexer_kl(target, torch.zeros(1, 1, 4), allowed) > 0.05


def test_indexer_loss_reaches_only_the_indexer_and_the_lm_loss_everything_else():
    model, ids = _model(), _ids(_model())
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


def test_warmup_fits_the_indexer_then_sparse_training_trains_everything(builtin_data, tmp_path):
    cfg = TrainConfig(steps=12, batch_size=2, seq_len=32, lr=3e-3, warmup=1, eval_every=0, save_every=8)
    cfg.indexer_warmup = 8
    job = PretrainJob(out=str(tmp_path), data=str(builtin_data), preset="tiny-v32", train=cfg)
    run_pretrain(job)
    records = read_metrics(tmp_path / "metrics.jsonl")
    kl = [r["indexer_loss"] for r in records]
    assert kl[7] < 0.8 * kl[0], kl  # the warm-up fits the indexer
    torch.manual_seed(cfg.seed)  # the run's initial weights, as run_pretrain makes them
    start = Transformer(load_model(tmp_path / "checkpoints" / "step_8").config).state_dict()
    warm = load_model(tmp_path / "checkpoints" / "step_8").state_dict()
    end = load_model(tmp_path / "checkpoints" / "step_12").state_dict()
    for name in warm:
        assert torch.equal(warm[name], start[name]) != (".indexer." in name), name  # only the indexer moved
        assert not torch.equal(end[name], warm[name]) or "e_score_correction_bias" in name, name
