"""TrainConfig: the hyper-parameters of one training run (pretraining and SFT; distill's student SFT too), and
which of them a resumed run may change."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanoseek.distributed.data_parallel import DP_MODES
from nanoseek.train.optim import OPTIMIZERS
from nanoseek.train.schedule import SCHEDULES

# Settings a resume may change; every other one must match the run's saved arguments.
RESUME_OVERRIDABLE = frozenset(
    {"steps", "time_budget", "save_every", "keep_last", "eval_every", "eval_batches", "log_every", "compile"}
    | {"device", "peak_flops", "data", "tokenizer", "dp", "ep"}
)


@dataclass
class TrainConfig:
    """Hyper-parameters of one run (defaults: the 2-core CPU recipe of shared/cpu-feasibility.md)."""

    steps: int | None = None  # optimizer steps; with time_budget as well, whichever ends first
    time_budget: float | None = None  # seconds of wall time; the lr schedule then follows elapsed time
    batch_size: int = 8  # sequences per micro-batch
    seq_len: int | None = 256  # None (SFT only): the longest example
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: int = 50  # steps
    schedule: str = "cosine"  # cosine | wsd
    decay_frac: float = 0.2  # wsd: share of the run spent decaying
    weight_decay: float = 0.1
    optim: str = "adamw"  # adamw | muon (Newton-Schulz orthogonalised momentum on hidden matrices)
    clip: float = 1.0  # max grad norm (0: no clipping)
    mtp_weight: float = 0.3
    bias_gamma: float = 1e-3  # aux-loss-free bias update speed
    aux_alpha: float | None = None  # sequence-wise balance loss weight (None: the model config's)
    indexer_warmup: int | None = None  # V3.2 / V4 CSA: train the indexer by KL, after this many dense warm-up steps
    seed: int = 0
    save_every: int = 1000  # steps (0: only at the end)
    keep_last: int = 3
    eval_every: int = 200  # steps (0: never)
    eval_batches: int = 10
    log_every: int = 1
    compile: bool = False
    device: str = "auto"  # auto | cpu | cuda
    peak_flops: float | None = None  # for MFU; None: by device
    dp: str = "ddp"  # data parallel under torchrun: ddp | fsdp (ignored in one process)
    ep: int = 1  # expert parallel degree under torchrun (routed experts split over ep processes)

    def validate(self) -> None:
        if self.steps is None and self.time_budget is None:
            raise ValueError("say how long to train: pass --steps N and/or --time-budget SECONDS")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {self.steps}")
        if self.time_budget is not None and self.time_budget <= 0:
            raise ValueError(f"--time-budget must be > 0 seconds, got {self.time_budget}")
        if self.seq_len is None:
            raise ValueError("pass --seq-len N (tokens per sequence)")
        for name in ("batch_size", "seq_len", "grad_accum", "log_every", "eval_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.optim not in OPTIMIZERS:
            raise ValueError(f"--optim must be one of {', '.join(OPTIMIZERS)}, got {self.optim!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"--device must be cpu, cuda or auto, got {self.device!r}")
        if self.indexer_warmup is not None and self.indexer_warmup < 0:
            raise ValueError(f"--indexer-warmup must be >= 0 steps, got {self.indexer_warmup}")
        if self.ep < 1:
            raise ValueError(f"--ep must be >= 1, got {self.ep}")
        if self.dp not in DP_MODES:
            raise ValueError(f"--dp must be one of {', '.join(DP_MODES)}, got {self.dp!r}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("--device cuda but no CUDA device is available: use --device cpu")
