"""Pretraining (`nanoseek train`): `run_pretrain(PretrainJob)` builds (or resumes) the model and the token loaders,
then runs the training loop it shares with SFT (loop.py: resume, log, checkpoint; step.py: one optimizer step;
indexer_warmup.py: V3.2's and V4's indexer training under --indexer-warmup).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nanoseek.checkpoint.hf import load_model
from nanoseek.checkpoint.run import resolve_model_dir, resume_point
from nanoseek.config import ModelConfig
from nanoseek.data.shards import TokenLoader, find_tokenizer, load_manifest
from nanoseek.distributed.process_group import DistEnv
from nanoseek.model import Transformer
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.config import RESUME_OVERRIDABLE, TrainConfig
from nanoseek.train.loop import resumed_model, train, val_loaders
from nanoseek.train.run import rank0_print, resumed_job, seed_everything, training_device


# --------------------------------------------------------------------------------------------- the stage
@dataclass
class PretrainJob:
    """One pretraining run: a new model (preset + overrides) or one to continue (init_from), on token shards
    from `nanoseek prepare`, into the run folder `out`; resume continues the run in `out`."""

    out: str
    data: str | None = None  # on resume: the run's
    preset: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields over the preset's
    init_from: str | None = None  # a model dir or run folder (fresh optimizer)
    tokenizer: str | None = None  # where the data's tokenizer is, if the manifest's path is not reachable
    resume: bool = False
    train: TrainConfig = field(default_factory=TrainConfig)


def run_pretrain(job: PretrainJob, env: DistEnv | None = None) -> dict[str, Any]:
    """Run (or resume) a pretraining job: build the model and the token loaders, then `train()`. Returns its
    summary. env: the torchrun process group (None: one process). Raises ValueError for bad settings, and lets
    NonFiniteLoss and KeyboardInterrupt through (the last checkpoint is complete)."""
    env = env or DistEnv()
    log = rank0_print(env)
    run_dir = Path(job.out)
    ckpt, saved = resume_point(run_dir, job.resume)
    if saved is not None and job.overrides:
        raise ValueError("--set changes a new model's config; a resumed run keeps its checkpoint's config")
    model_args = {"preset": job.preset, "overrides": job.overrides or None, "init_from": job.init_from}
    cfg, model_args = resumed_job(job.train, model_args, saved, RESUME_OVERRIDABLE, env.world_size)
    cfg.validate()
    if cfg.ep > 1 and not env.distributed and cfg.ep != (saved or {}).get("ep"):  # a resume may run all experts
        raise ValueError(f"--ep {cfg.ep} needs several processes: launch with torchrun --nproc-per-node N")
    if fixed := sorted({"vocab_size", "bos_token_id", "eos_token_id"} & set(job.overrides)):
        raise ValueError(f"--set {', '.join(fixed)}: decided by the data's tokenizer, not settable")
    data = job.data or (saved or {}).get("data")
    if not data:
        raise ValueError("pass --data DATA_DIR (a directory made by `nanoseek prepare`)")
    data = Path(data).resolve()
    manifest = load_manifest(data)
    device = training_device(env, cfg.device)
    if ckpt is None:
        seed_everything(cfg.seed)
    model, tokenizer, init_from = _model_and_tokenizer(job, ckpt, data, manifest, device)
    if ckpt is not None:
        log(f"resuming {run_dir} from {ckpt.name}")

    shard = dict(rank=env.rank, world_size=env.world_size, seed=cfg.seed)  # each rank its own windows
    loader = TokenLoader(data, "train", cfg.batch_size, cfg.seq_len, **shard)
    make_val = val_loaders(lambda: TokenLoader(data, "val", cfg.batch_size, cfg.seq_len, **shard), cfg, log)
    layout = cfg.dp + (f" + ep {cfg.ep}" if cfg.ep > 1 else "")
    procs = f", {env.world_size} processes ({layout})" if env.distributed else ""
    log(
        f"model: {model.num_parameters(include_mtp=True) / 1e6:.2f}M params "
        f"({model.num_parameters(activated=True) / 1e6:.2f}M activated, main), vocab {model.config.vocab_size}, "
        f"device {device}{procs}; data {data}"
    )
    run_args = {"preset": model_args.get("preset"), "overrides": model_args.get("overrides") or {}}
    run_args["init_from"] = init_from or model_args.get("init_from")  # resolved: a run folder's checkpoint
    run_args |= {"data": str(data), "tokenizer": job.tokenizer, "out": str(run_dir)}
    return train(cfg, model, loader, run_dir, tokenizer, make_val, resume_from=ckpt, run_args=run_args, env=env)


def _model_and_tokenizer(
    job: PretrainJob, ckpt: Path | None, data: Path, manifest: dict, device: torch.device
) -> tuple[Transformer, Tokenizer, str | None]:
    """(model, the data's tokenizer, the resolved init_from) for a resumed run, a continued model or a preset."""
    if ckpt is not None:
        if not (ckpt / "tokenizer.json").is_file():
            return resumed_model(ckpt, device), find_tokenizer(data, manifest, job.tokenizer), None
        tokenizer = Tokenizer.from_pretrained(ckpt)
        if tokenizer.hash() != manifest["tokenizer_hash"]:
            raise ValueError(f"{data} was prepared with a different tokenizer than the run in {job.out}")
        return resumed_model(ckpt, device), tokenizer, None
    tokenizer = find_tokenizer(data, manifest, job.tokenizer)
    if job.init_from:
        if job.preset or job.overrides:
            raise ValueError("pass --preset [--set KEY=VALUE] (new model) or --init-from MODEL_DIR, not both")
        init_from = resolve_model_dir(job.init_from)  # a run folder: its latest checkpoint
        model = load_model(init_from, device=device, dtype=torch.float32)
        if model.config.vocab_size < manifest["vocab_size"]:
            raise ValueError(
                f"{init_from} has vocab_size {model.config.vocab_size} but the data's tokenizer has "
                f"{manifest['vocab_size']} tokens: use data prepared with that model's tokenizer"
            )
        init_tok = init_from / "tokenizer.json"
        if init_tok.is_file() and Tokenizer.from_pretrained(init_tok).hash() != manifest["tokenizer_hash"]:
            raise ValueError(f"{data} was prepared with a different tokenizer than {init_from} has")
        return model, tokenizer, str(init_from)
    if not job.preset:
        raise ValueError("pass --preset NAME (e.g. cpu-small) or --init-from MODEL_DIR")
    config = ModelConfig.from_preset(
        job.preset,
        **job.overrides,
        vocab_size=manifest["vocab_size"],  # the data's tokenizer decides the vocabulary
        bos_token_id=manifest["bos_id"],
        eos_token_id=manifest["eos_id"],
    )
    with torch.device(device):
        return Transformer(config), tokenizer, None
