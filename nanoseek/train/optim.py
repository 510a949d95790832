"""What changes the model each step: AdamW (or Muon, train/muon.py) over the parameters, and the aux-loss-free
balancing of the router bias.

Weight decay applies to matrices and embeddings (every tensor with >= 2 dims: linear weights, stacked
experts, the router, embeddings and head), never to norms or biases (DeepSeek-V3: AdamW, betas 0.9/0.95,
weight decay 0.1). The MoE bias `e_score_correction_bias` is a buffer, so the optimizer never sees it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from nanoseek.model import Transformer
from nanoseek.train.muon import build_muon

OPTIMIZERS = ("adamw", "muon")


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    fused: bool | None = None,
    optim: str = "adamw",
    replicas: dist.ProcessGroup | None = None,
) -> torch.optim.Optimizer:
    """AdamW with two groups (decay: >= 2-D tensors; no decay: norms and biases), in named_parameters order;
    optim="muon": Muon on the hidden matrices, AdamW (same lr) on the rest (train/muon.py).

    fused=None uses the fused CUDA kernel when every parameter is on a CUDA device. replicas (Muon): the process
    group of DDP replicas that split Newton-Schulz between them.
    """
    if optim == "muon":
        return build_muon(model, lr, weight_decay, betas, eps, replicas=replicas)
    if optim != "adamw":
        raise ValueError(f"optim must be one of {', '.join(OPTIMIZERS)}, got {optim!r}")
    decay, no_decay = [], []
    for p in model.parameters():  # deduplicated, so a tied embedding/head appears once
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    if fused is None:
        fused = all(p.is_cuda for p in decay + no_decay)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)


@torch.no_grad()
def expert_bias_step(model: Transformer, loads: torch.Tensor | None, gamma: float) -> None:
    """Aux-loss-free balancing (V3 report eq. 16): b_e += gamma * sign(mean_load - load_e) per MoE layer.

    `loads` [n_moe_layers, E] are the tokens per expert summed over the step's micro-batches. Models that
    route without the bias (V2's greedy top-k) are left alone.
    """
    if gamma == 0 or loads is None or loads.numel() == 0 or model.config.topk_method != "noaux_tc":
        return
    model.update_expert_bias(loads, gamma)


def max_load_violation(loads: torch.Tensor) -> list[float]:
    """Per MoE layer: max_e load_e / mean load - 1 (0 = perfectly balanced)."""
    loads = loads.float()
    return (loads.amax(dim=-1) / loads.mean(dim=-1).clamp(min=1e-9) - 1).tolist()
