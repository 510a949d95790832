"""The process group of a torchrun launch: who am I, which device, which mesh.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous (MASTER_ADDR/PORT); without them (or with
WORLD_SIZE=1) everything here is a no-op and training runs as one process, unchanged. CUDA ranks use nccl
on the GPU LOCAL_RANK; CPU ranks use gloo with an explicit CPU device mesh (FSDP2 and DTensor need it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

# A collective that waits longer than this raises on every rank still alive instead of hanging forever
# (torchrun also tears the whole job down as soon as one rank exits with an error).
DEFAULT_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job. world_size 1: a plain single-process run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    mesh: DeviceMesh | None = None  # 1-D data-parallel mesh over all ranks

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone logs, draws the progress bar, writes metrics, plots and model files."""
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> DistEnv:
    """Join the process group torchrun describes (or return a single-process DistEnv).

    device: auto | cpu | cuda. On CUDA each rank takes GPU LOCAL_RANK. Idempotent: a second call
    returns the same environment.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if world <= 1:
        return DistEnv(device=torch.device(device if device != "auto" else ("cuda" if use_cuda else "cpu")))
    for var in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise ValueError(f"WORLD_SIZE={world} but {var} is not set: launch with torchrun --nproc-per-node N")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible): "
                "lower --nproc-per-node or pass --device cpu"
            )
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        kwargs = {"device_id": dev} if use_cuda else {}
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), **kwargs)
    mesh = init_device_mesh(dev.type, (world,), mesh_dim_names=("dp",))
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=dev, mesh=mesh)


def shutdown(clean: bool = True) -> None:
    """Leave the process group. clean: every rank got here the normal way, so wait for the others first (no rank
    closes its connections while a peer still uses them); after an error just leave, a barrier could hang."""
    if dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()


def all_reduce(t: torch.Tensor, env: DistEnv, op: str = "sum") -> torch.Tensor:
    """In-place sum, mean or max of t over every rank (no-op in one process); returns t."""
    if env.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        if op == "mean":
            t /= env.world_size
    return t


def any_rank(flag: bool, env: DistEnv) -> bool:
    """True when `flag` holds on at least one rank (every rank gets the same answer)."""
    return bool(all_reduce(torch.tensor([float(flag)]), env).item() > 0) if env.distributed else flag


def broadcast_object(obj, env: DistEnv, src: int = 0):
    """Rank src's picklable obj on every rank (e.g. a path rank 0 chose)."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()
