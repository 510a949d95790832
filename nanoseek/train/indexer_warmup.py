"""Training the lightning indexer (DeepSeek-V3.2 report sec. 2.1.1), for V3.2's indexers over tokens and V4's
over compressed entries (CSA layers), under --indexer-warmup N: a dense warm-up of N steps fits the indexer to the
main attention by KL with every other weight left alone, then sparse training fits it on its own top-k while
the language-model loss trains the rest. The indexer's inputs are detached (model/mla.py,
model/compressed_attention.py), so its KL loss reaches it alone, and its gradients are clipped by their own norm.
"""

from __future__ import annotations

from torch import nn

from nanoseek.model import Transformer


def indexer_stage(model: Transformer, step: int, warmup: int | None) -> bool:
    """V3.2's indexer training (report sec. 2.1.1) at optimizer step `step`, for V3.2's indexers over tokens and
    V4's over compressed entries (CSA layers): None leaves the indexer untrained; else the first `warmup` steps
    are the dense warm-up (dense attention, only the indexer learns, by KL) and the rest sparse training (top-k
    attention, the indexer fitted on its selection). True in the warm-up."""
    if warmup is None:
        return False
    if not any(getattr(m, "indexer", None) is not None for m in model.modules()):
        raise ValueError(
            "--indexer-warmup trains a lightning indexer: the model has none (deepseek_v32, or deepseek_v4 with "
            "compressed_sparse_attention layers, have one)"
        )
    model.set_indexer_training("dense" if step < warmup else "sparse")
    return step < warmup


def split_indexer_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(the language model's parameters, the lightning indexers'): two objectives, clipped each by its own norm
    (the indexer learns only from its KL loss, detached from the LM loss)."""
    lm, indexer = [], []
    for name, p in model.named_parameters():
        (indexer if ".indexer." in name else lm).append(p)
    return lm, indexer


def keep_only_indexer_grads(model: nn.Module) -> None:
    """Warm-up: drop every other gradient, so the optimizer leaves those weights (and their state) as they are."""
    for name, p in model.named_parameters():
        if ".indexer." not in name:
            p.grad = None
