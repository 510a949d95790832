"""run_on_processes: a library function on N local processes in one process group, as torchrun runs a command."""

import pytest
import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

from nanoseek.distributed.launch import run_on_processes


def _sum_of_ranks(offset: float, env=None) -> tuple[int, int, float, int]:
    t = torch.tensor([env.rank + offset])
    dist.all_reduce(t)  # fails unless both processes joined one group
    return env.rank, env.world_size, t.item(), torch.get_num_threads()


def _fail_on_rank_1(env=None) -> None:
    if env.rank == 1:
        raise ValueError("rank 1 fails")
    dist.barrier()


def test_two_processes_join_one_group_and_rank_0_returns():
    assert run_on_processes(_sum_of_ranks, 2, 10.0, threads=1, device="cpu") == (0, 2, 21.0, 1)


def _pid(env=None) -> tuple[int, bool]:
    import os

    return os.getpid(), env is None


def test_one_process_runs_in_this_process_without_a_group():
    import os

    assert run_on_processes(_pid, 1) == (os.getpid(), True)


def test_a_failing_rank_raises_here():
    with pytest.raises(ChildFailedError, match="rank 1 fails|_fail_on_rank_1"):
        run_on_processes(_fail_on_rank_1, 2, device="cpu")
