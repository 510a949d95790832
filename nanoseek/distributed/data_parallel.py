"""Data parallelism: DDP or FSDP2 around the Transformer, with the seams the training loop needs.

- compute_loss goes through the wrapper so DDP's reducer / FSDP2's unshard hooks see every forward.
- accumulate(last=False) skips gradient synchronisation on all but the last micro-batch of a step
  (DDP no_sync, FSDP2 set_requires_gradient_sync(False)): one all-reduce / reduce-scatter per step.
- The MoE bias must stay identical on every rank, so the training loop sums the per-expert token counts over
  all ranks before the sign update. DDP runs with forward_sync_buffers=False (torch 2.13's name for
  broadcast_buffers): its per-forward buffer broadcast would otherwise overwrite every rank's bias and counts
  with rank 0's.
- Gradients are averaged (not summed) over ranks: DDP and FSDP2 both divide by the world size, which
  tests/test_dist.py checks against a one-process run.
- Expert parallelism (ep > 1, see expert_parallel.py) takes the routed experts out of DDP's hands: their
  gradients are reduced by `reduce_gradients` over the shard's replicas instead.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor

from nanoseek.distributed.expert_parallel import ExpertParallel, apply_expert_parallel, reduce_expert_grads
from nanoseek.distributed.process_group import DistEnv
from nanoseek.model import Transformer
from nanoseek.model.transformer import Losses

DP_MODES = ("ddp", "fsdp")


class _Forward(nn.Module):
    """compute_loss (or the plain logits forward) as a module forward, so DDP wraps it (DDP only hooks __call__)."""

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args, loss: bool = True, **kwargs) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if not loss:
            return self.model(*args, **kwargs)
        losses = self.model.compute_loss(*args, **kwargs)
        return losses.main, losses.mtp, losses.aux, losses.indexer  # the indexer's KL loss: None unless trained


class Parallel:
    """The model as the training loop drives it; one process: a thin pass-through."""

    def __init__(
        self, model: Transformer, env: DistEnv, dp: str = "ddp", mtp: bool = True, ep: int = 1, indexer: bool = False
    ) -> None:
        """Wrap `model` (already on env.device) in place. mtp: whether the MTP modules take part in the loss;
        indexer: whether the lightning indexers are trained (V3.2's are trainable parameters that only their KL
        loss reaches); DDP must otherwise look for unused parameters every step. ep: expert-parallel degree
        (divides the world size and n_routed_experts)."""
        if dp not in DP_MODES:
            raise ValueError(f"--dp must be one of {', '.join(DP_MODES)}, got {dp!r}")
        self.model, self.env, self.dp, self.ep = model, env, dp if env.distributed else "none", ep
        self._ddp, self._ep_group, self._replica_group, expert_names = None, None, None, []
        if ep > 1:
            if env.world_size % ep:
                raise ValueError(f"--ep {ep} must divide the number of processes ({env.world_size})")
            # 2-D mesh for the experts: shards over "ep", replicas (or FSDP2 shards) over "edp"
            mesh = init_device_mesh(env.device.type, (env.world_size // ep, ep), mesh_dim_names=("edp", "ep"))
            expert_names = apply_expert_parallel(model, mesh["ep"])
            self._ep_group = mesh["ep"].get_group()
            self._replica_group = mesh["edp"].get_group() if env.world_size > ep else None
            self._expert_mesh = mesh["edp"]
        if self.dp == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            idle_indexer = not indexer and any(
                p.requires_grad for n, p in model.named_parameters() if ".indexer." in n
            )  # V3.2 trained without --indexer-warmup
            unused = (not mtp and len(model.mtp) > 0) or idle_indexer
            wrapper = _Forward(model)
            # sharded experts are not replicas: DDP must not average them (reduce_gradients does)
            DDP._set_params_and_buffers_to_ignore_for_model(wrapper, [f"model.{n}" for n in expert_names])
            self._ddp = DDP(
                wrapper,
                device_ids=[env.device.index] if env.device.type == "cuda" else None,
                forward_sync_buffers=False,  # keep per-rank expert counts; the bias is synced explicitly
                find_unused_parameters=unused,
            )
        elif self.dp == "fsdp":
            shard_fsdp2(model, env, expert_mesh=self._expert_mesh if ep > 1 else None)

    def compute_loss(self, x: torch.Tensor, y: torch.Tensor, mtp: bool = True) -> Losses:
        if self._ddp is not None:
            return Losses(*self._ddp(x, y, mtp=mtp))
        return self.model.compute_loss(x, y, mtp=mtp)

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, vocab], through the wrapper (GRPO's policy forward)."""
        if self._ddp is not None:
            return self._ddp(input_ids, loss=False)
        return self.model(input_ids)

    @contextlib.contextmanager
    def accumulate(self, last: bool) -> Iterator[None]:
        """Forward + backward of one micro-batch; gradients are synchronised only when `last`."""
        if last or self.dp == "none":
            yield
        elif self._ddp is not None:
            with self._ddp.no_sync():
                yield
        else:
            self.model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                self.model.set_requires_gradient_sync(True)

    @property
    def replicas(self) -> dist.ProcessGroup | None:
        """The group whose ranks all hold every parameter and the same gradients (plain DDP): Muon splits its
        Newton-Schulz over it. None otherwise (one process, FSDP2, or experts split by expert parallelism)."""
        return dist.group.WORLD if self.dp == "ddp" and self.ep == 1 else None

    @property
    def sharded(self) -> bool:
        """Whether no rank holds the whole model (checkpoints are then distributed)."""
        return self.dp == "fsdp" or self.ep > 1

    def reduce_gradients(self) -> None:
        """After the step's last backward: reduce what DDP / FSDP2 did not (expert-parallel weights)."""
        if self.ep > 1 and self.dp == "fsdp":  # FSDP2 averaged them over "edp" already: / ep completes 1 / world
            reduce_expert_grads(self.model, None, self.ep)
        elif self.ep > 1:
            reduce_expert_grads(self.model, self._replica_group, self.env.world_size)

    def clip_grad_norm(self, max_norm: float, params: list[nn.Parameter] | None = None) -> float:
        """Clip the global gradient norm of `params` (default: every parameter; sharded gradients included);
        returns the norm before clipping."""
        params = [p for p in (self.model.parameters() if params is None else params) if p.grad is not None]
        if not params:
            return 0.0
        if self.ep > 1 and self.dp == "ddp":
            return _clip_mixed(params, max_norm, self._ep_group)
        if self.ep > 1:  # FSDP2 + EP: every rank holds distinct pieces of every gradient (on two meshes)
            return _clip_mixed(params, max_norm, None, sharded_everywhere=True)
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        return norm.item()


@torch.no_grad()
def _clip_mixed(
    params: list[torch.Tensor], max_norm: float, ep_group: dist.ProcessGroup | None, sharded_everywhere: bool = False
) -> float:
    """clip_grad_norm_ over gradients on several meshes. DDP + EP: replicated weights plus expert weights sharded
    over the EP group; FSDP2 + EP (sharded_everywhere): every rank's pieces are distinct, so sum over all ranks."""
    local = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad for p in params]
    squares = [g.float().pow(2).sum() for g in local]
    if sharded_everywhere:
        norm_sq = torch.stack(squares).sum()
        dist.all_reduce(norm_sq)
    else:
        zero = squares[0].new_zeros(())
        sharded = sum((sq for p, sq in zip(params, squares) if isinstance(p, DTensor)), zero)
        dist.all_reduce(sharded, group=ep_group)  # each shard counted once: replicas hold the same gradient
        norm_sq = sharded + sum((sq for p, sq in zip(params, squares) if not isinstance(p, DTensor)), zero)
    norm = norm_sq.sqrt()
    if max_norm > 0:
        torch._foreach_mul_(local, (max_norm / (norm + 1e-6)).clamp(max=1.0))
    return norm.item()


def shard_fsdp2(model: Transformer, env: DistEnv, expert_mesh: DeviceMesh | None = None) -> None:
    """FSDP2: every decoder block and MTP module its own fully_shard unit, then the root (embedding, final
    norm, head). compute_loss is registered as a forward method so the root's parameters are gathered for it.
    With expert parallelism the experts (already EP shards) are first sharded over `expert_mesh`, the ranks
    holding the same EP shard, so a block's gather brings in E / EP experts, not all of them."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    if expert_mesh is not None:
        for module in model.modules():
            if isinstance(module, ExpertParallel):
                fully_shard(module, mesh=expert_mesh)
    for block in [*model.layers, *model.mtp]:
        fully_shard(block, mesh=env.mesh)
    fully_shard(model, mesh=env.mesh)
    register_fsdp_forward_method(model, "compute_loss")
