"""Muon: momentum orthogonalised by Newton-Schulz for the hidden weight matrices, AdamW for everything else
(Jordan et al. 2024; Moonlight, Liu et al. 2025; the optimizer of DeepSeek-V4's pretraining).

For a matrix W with gradient G (per expert for stacked experts):

    B = mu B + G;   M = G + mu B  (Nesterov)
    O = NS(M) ~ U V^T of M = U S V^T       the update with every singular value set to 1
    W <- W (1 - lr wd) - lr 0.2 sqrt(max(rows, cols)) O

NS runs DeepSeek-V4's schedule (shared/deepseek-v32-v4-spec.md B13): 8 quintic iterations with
(3.4445, -4.7750, 2.0315), which push singular values near 1 fast, then 2 with (2, -1.5, 0.5), which settle them
at 1. The 0.2 sqrt(max(rows, cols)) factor (Moonlight) gives the update the RMS of a typical AdamW update, so
Muon and AdamW share one learning rate and schedule. Embeddings, the LM head, the router, norms, biases, mHC
mixing parameters, sinks and position biases are not hidden linear maps: AdamW (V4's exact split and momentum
are not published; this is Moonlight's choice). One optimizer object, so the state saves and resumes as AdamW's.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from nanoseek.model.moe import Experts

NS_SCHEDULE = ((3.4445, -4.7750, 2.0315),) * 8 + ((2.0, -1.5, 0.5),) * 2


def orthogonalize(g: torch.Tensor, schedule: tuple[tuple[float, float, float], ...] = NS_SCHEDULE) -> torch.Tensor:
    """Newton-Schulz: the nearest semi-orthogonal matrix U V^T of each matrix g [..., rows, cols], in float32.

    X <- a X + (b A + c A^2) X with A = X X^T, on the wide orientation (X X^T is then the smaller Gram matrix);
    X starts at g / ||g||_F, so every singular value is <= 1 where the iteration converges."""
    x = g.float()
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for a, b, c in schedule:
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if tall else x


def muon_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(hidden matrices for Muon, the rest for AdamW), trainable parameters only, each once. Hidden matrices: the
    weights of nn.Linear layers and the stacked routed experts, except the LM head; the router (Gate) is a
    Parameter of its own and so stays on AdamW, like embeddings, norms, biases and mHC's fn/base/scale."""
    head = getattr(model, "lm_head", None)
    skip = {id(head.weight)} if head is not None else set()
    hidden: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, nn.Linear) and id(module.weight) not in skip:
            hidden[id(module.weight)] = module.weight
        elif isinstance(module, Experts):
            hidden.update({id(module.w13): module.w13, id(module.w2): module.w2})
    muon = [p for p in hidden.values() if p.requires_grad]
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in hidden]
    return muon, rest


class Muon(torch.optim.Optimizer):
    """Muon for param groups with `muon: True` (matrices, or stacks of them [..., rows, cols]); AdamW, as
    torch.optim.AdamW computes it, for the other groups. One lr per group, set by the schedule as for AdamW.

    replicas: a process group whose ranks hold the same parameters and gradients (DDP): Newton-Schulz, most of
    Muon's cost, is then split between them, each rank orthogonalising its share of the matrices, and one
    all-reduce of the updates gives every rank all of them, the same numbers one process computes."""

    def __init__(
        self,
        params,
        lr: float,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        replicas: dist.ProcessGroup | None = None,
    ) -> None:
        defaults = dict(
            lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov, betas=betas, eps=eps, muon=False
        )
        super().__init__(params, defaults)
        self.replicas = replicas

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if group["muon"]:
                self._muon(params, group)
            else:
                for p in params:
                    self._adamw(p, group)
        return loss

    def _muon(self, params: list[torch.Tensor], group: dict) -> None:
        momenta = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf, mu = state["momentum_buffer"], group["momentum"]
            buf.mul_(mu).add_(p.grad)
            momenta.append(p.grad.add(buf, alpha=mu) if group["nesterov"] else buf)
        for p, o in zip(params, self._orthogonalized(momenta), strict=True):
            p.mul_(1 - group["lr"] * group["weight_decay"])
            p.add_((o * (0.2 * max(p.shape[-2:]) ** 0.5)).to(p.dtype), alpha=-group["lr"])

    def _orthogonalized(self, momenta: list[torch.Tensor]) -> list[torch.Tensor]:
        """NS of every momentum, split over the replicas when there are some (see the class docstring)."""
        world = dist.get_world_size(self.replicas) if self.replicas is not None else 1
        if world == 1 or any(isinstance(m, DTensor) for m in momenta):
            return [_orthogonalize_full(m) for m in momenta]
        # the same deterministic split on every rank: largest first, each to the least-loaded rank
        load, owner = [0] * world, [0] * len(momenta)
        for i in sorted(range(len(momenta)), key=lambda i: -momenta[i].numel()):
            owner[i] = min(range(world), key=load.__getitem__)
            load[owner[i]] += momenta[i].numel()
        rank = dist.get_rank(self.replicas)
        flat = torch.zeros(sum(m.numel() for m in momenta), dtype=torch.float32, device=momenta[0].device)
        out, offset = [], 0
        for m, who in zip(momenta, owner, strict=True):
            view = flat[offset : offset + m.numel()].view(m.shape)
            if who == rank:
                view.copy_(orthogonalize(m))
            out.append(view)
            offset += m.numel()
        dist.all_reduce(flat, group=self.replicas)  # each entry is one rank's value plus zeros: exact
        return out

    def _adamw(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        (beta1, beta2), lr = group["betas"], group["lr"]
        state["step"] += 1
        step = float(state["step"])
        p.mul_(1 - lr * group["weight_decay"])
        state["exp_avg"].lerp_(p.grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
        denom = (state["exp_avg_sq"].sqrt() / (1 - beta2**step) ** 0.5).add_(group["eps"])
        p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1**step))


def _orthogonalize_full(m: torch.Tensor) -> torch.Tensor:
    """orthogonalize on whole matrices: a DTensor (FSDP2 shards rows) is gathered first and the result sharded
    back the same way, so every rank applies its slice of the one update a single process would."""
    if isinstance(m, DTensor):
        full = orthogonalize(m.full_tensor()).to(m.dtype)
        return distribute_tensor(full, m.device_mesh, m.placements, src_data_rank=None)
    return orthogonalize(m)


def build_muon(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.1,
    betas=(0.9, 0.95),
    eps: float = 1e-8,
    replicas: dist.ProcessGroup | None = None,
) -> Muon:
    """Three groups: Muon on hidden matrices (decayed), AdamW on other >= 2-D tensors (embedding, head, router,
    mHC fn; decayed) and AdamW on vectors (norms, biases, sinks; no decay). replicas: see Muon."""
    muon, rest = muon_parameters(model)
    groups = [
        {"params": muon, "muon": True, "weight_decay": weight_decay},
        {"params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0},
    ]
    return Muon(
        [g for g in groups if g["params"]], lr=lr, weight_decay=weight_decay, betas=betas, eps=eps, replicas=replicas
    )
