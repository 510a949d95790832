"""Expert parallelism: each MoE layer's routed experts split across the EP group, tokens sent to their experts.

The model's seam is `MoE.experts`: it is called with the layer's token copies sorted by (global) expert and the
per-expert counts, and returns their outputs in the same order. `ExpertParallel` replaces it and

  1. exchanges the per-expert counts (all_to_all_single, no gradient): rank j learns how many rows each rank
     sends to each of j's local experts, which gives the input and output split sizes (one host sync);
  2. sends the rows to the ranks owning their experts (the autograd-aware functional all_to_all_single, whose
     backward is the reverse all-to-all);
  3. reorders the received rows from rank-major to local-expert-major and runs the local experts as one
     grouped GEMM; then undoes the reordering and sends the outputs back (step 2 reversed).

Its weights keep the names `w13` / `w2` as DTensors sharded on dim 0 over the EP mesh, so distributed checkpoints
record the global [E, ...] shapes and load on any layout; with FSDP2 each slice is further sharded over the ranks
holding it (data_parallel.shard_fsdp2). Attention, shared experts and the router stay data
parallel. Gradients: a rank's expert weights receive the contributions of every EP peer's tokens; the loop's
objective is the mean over all ranks, so `reduce_expert_grads` sums over the replicas of each shard (the ranks
with the same EP index) and divides by the world size, exactly what averaging over data parallel does for the
other weights (under FSDP2, which already averaged over the replicas, it divides by EP).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from nanoseek.model import Transformer
from nanoseek.model.moe import Experts, grouped_swiglu


class ExpertParallel(nn.Module):
    """A drop-in for `Experts` holding E / EP of them on each rank; forward(x_sorted, counts) as Experts'."""

    def __init__(self, experts: Experts, ep_mesh: DeviceMesh) -> None:
        super().__init__()
        n_experts, ep = experts.w13.shape[0], ep_mesh.size()
        if n_experts % ep:
            raise ValueError(f"--ep {ep} must divide n_routed_experts ({n_experts})")
        self.inter_dim, self.n_experts, self.ep, self.mesh = experts.inter_dim, n_experts, ep, ep_mesh
        self.limit = experts.limit  # V4's SwiGLU clamp
        self.group = ep_mesh.get_group()
        # every rank holds the same full weights (same seed or checkpoint); each keeps its own slice
        self.w13 = nn.Parameter(distribute_tensor(experts.w13.detach(), ep_mesh, [Shard(0)], src_data_rank=None))
        self.w2 = nn.Parameter(distribute_tensor(experts.w2.detach(), ep_mesh, [Shard(0)], src_data_rank=None))

    def forward(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x_sorted [M, d] grouped by global expert, counts [E] -> outputs [M, d] in the same order."""
        ep, local = self.ep, self.n_experts // self.ep
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=self.group)  # chunk j: rank j's rows per local expert
        recv = recv_counts.view(ep, local)
        send_splits = counts.view(ep, local).sum(1).tolist()
        recv_splits = recv.sum(1).tolist()
        x_recv = funcol.all_to_all_single_autograd(x_sorted, recv_splits, send_splits, self.group)
        order = _expert_major(recv)
        w13, w2 = self.w13.to_local(), self.w2.to_local()
        if x_recv.shape[0] == 0:  # no rows for this rank's experts: empty output, zero (not missing) gradients
            y_recv = x_recv + 0 * (w13.sum() + w2.sum())  # (grouped_mm's backward rejects empty inputs)
        else:
            y = grouped_swiglu(x_recv.index_select(0, order), recv.sum(0), w13, w2, self.limit)
            y_recv = torch.empty_like(y).index_copy(0, order, y)  # back to rank-major
        return funcol.all_to_all_single_autograd(y_recv, send_splits, recv_splits, self.group)

    def gathered(self, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Few-token inference path of Experts: x [N, d], indices [N, K] -> [N, K, d] (through the dispatch)."""
        expert_of = indices.flatten()
        order = expert_of.argsort(stable=True)
        counts = expert_of.bincount(minlength=self.n_experts)
        y = self(x.index_select(0, order // indices.shape[1]), counts)
        return torch.empty_like(y).index_copy_(0, order, y).view(*indices.shape, -1)


def _expert_major(recv: torch.Tensor) -> torch.Tensor:
    """Row order that turns rank-major received rows (segments [rank j, local expert e] of recv[j, e] rows) into
    local-expert-major order (all ranks' rows for expert 0, then expert 1, ...)."""
    sizes = recv.flatten()
    starts = (sizes.cumsum(0) - sizes).view_as(recv)  # where segment (j, e) begins in the received buffer
    sizes_t, starts_t = recv.t().flatten(), starts.t().flatten()  # segments in (e, j) order
    offsets = sizes_t.cumsum(0) - sizes_t  # where segment (e, j) begins in the expert-major buffer
    shift = torch.repeat_interleave(starts_t - offsets, sizes_t)
    return torch.arange(shift.numel(), device=recv.device) + shift


def apply_expert_parallel(model: Transformer, ep_mesh: DeviceMesh) -> list[str]:
    """Replace every MoE layer's experts by their EP shard (in place); returns the replaced parameter names."""
    names = []
    for name, module in model.named_modules():
        if isinstance(getattr(module, "experts", None), Experts):
            module.experts = ExpertParallel(module.experts, ep_mesh)
            names += [f"{name}.experts.w13", f"{name}.experts.w2"]
    return names


@torch.no_grad()
def reduce_expert_grads(model: Transformer, replica_group: dist.ProcessGroup | None, divisor: int) -> None:
    """Expert gradients: sum over the shard's replicas (ranks with the same EP index; None: nothing to sum, e.g.
    FSDP2 reduced them already), then / divisor (the world size after a sum)."""
    for module in model.modules():
        if isinstance(module, ExpertParallel):
            for p in (module.w13, module.w2):
                if p.grad is None:
                    continue
                g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
                if replica_group is not None:
                    dist.all_reduce(g, group=replica_group)
                g /= divisor
