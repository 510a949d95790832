"""torchrun entry point for tests/test_dist.py: `nanoseek ARGS` on each rank, plus test probes set by env vars.

NANOSEEK_TEST_PROBE=DIR   after training, each rank writes DIR/rank{R}.pt: its MoE biases, and the bytes of its
                          parameters, gradients and AdamW state measured right after the first optimizer step
NANOSEEK_TEST_FAIL_RANK=R rank R raises RuntimeError on its third batch
NANOSEEK_TEST_KILL_IN_SAVE=R  rank R kills itself (SIGKILL) as its second distributed checkpoint save begins
"""

import os
import signal
import sys

import torch

import nanoseek.train.pretrain as loop
from nanoseek.cli.main import main
from nanoseek.data.shards import TokenLoader

rank = int(os.environ.get("RANK", "0"))


def _local_bytes(t: torch.Tensor) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


if probe := os.environ.get("NANOSEEK_TEST_PROBE"):
    measured: dict[str, int] = {}
    step = torch.optim.AdamW.step

    def measuring_step(self, *args, **kwargs):
        out = step(self, *args, **kwargs)
        if not measured:  # after the first step: weights, gradients and the AdamW moments all exist
            params = [p for g in self.param_groups for p in g["params"]]
            measured["weights"] = sum(_local_bytes(p) for p in params)
            measured["grads"] = sum(_local_bytes(p.grad) for p in params if p.grad is not None)
            measured["optimizer"] = sum(
                _local_bytes(v) for s in self.state.values() for k, v in s.items() if k in ("exp_avg", "exp_avg_sq")
            )
        return out

    torch.optim.AdamW.step = measuring_step
    train = loop.train

    def probing_train(cfg, model, *args, **kwargs):
        summary = train(cfg, model, *args, **kwargs)
        biases = [m.gate.e_score_correction_bias.clone() for m in model.moe_layers()]
        torch.save({"biases": biases, "bytes": measured}, os.path.join(probe, f"rank{rank}.pt"))
        return summary

    loop.train = probing_train

if int(os.environ.get("NANOSEEK_TEST_FAIL_RANK", "-1")) == rank:
    next_batch, calls = TokenLoader.next_batch, [0]

    def failing_next_batch(self):
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError(f"injected failure on rank {rank}")
        return next_batch(self)

    TokenLoader.next_batch = failing_next_batch

if int(os.environ.get("NANOSEEK_TEST_KILL_IN_SAVE", "-1")) == rank:
    import torch.distributed.checkpoint as dcp

    save, saves = dcp.save, []

    def dying_save(*args, **kwargs):
        saves.append(1)
        if len(saves) == 2:  # the other rank may already be writing its shards into the temp dir
            os.kill(os.getpid(), signal.SIGKILL)
        return save(*args, **kwargs)

    dcp.save = dying_save

sys.exit(main(sys.argv[1:]))
