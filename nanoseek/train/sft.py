"""Supervised fine-tuning on chat data (`nanoseek sft`): loss on assistant tokens only, through `train()`.

Data: `.jsonl` files (one `{"messages": [{"role", "content"}, ...]}` per line, OpenAI style, with assistant
`tool_calls`, `tool` results and a `tools` list when the conversation uses tools) or the built-in tasks
(`builtin:arithmetic,countdown,calculator`), rendered with the model's chat template. `worked_fraction` F makes
a share F of built-in completions worked (`<think>steps</think> answer`) and the rest answer-only
(`<think></think> answer`); which problems are worked is fixed by the seed.

Loss mask: every assistant turn the template renders unchanged is a target, content and tool calls plus its
closing EOS; the prompt, BOS, role tokens, system text, tool definitions and tool results are -100. R1's template drops the reasoning of *earlier*
assistant turns, so such a turn is context (history as the model will see it), not a target.

Batching: conversations are NOT packed. Packing would let attention cross conversation boundaries (our
attention is plain causal, with no document mask), so each row holds one conversation, right-padded to
the longest in its batch (pad targets are -100; right padding never changes earlier positions under a
causal mask). To limit the waste, batches are length-bucketed: each epoch shuffles, cuts the order into
pools of 64 batches, sorts each pool by length and shuffles the resulting batches. On the built-in tasks
(batch 16, worked solutions) 0.9% of the computed positions are padding, vs 33-40% for random batches
(`padding_fraction`). `train()` counts `batch_size * seq_len` tokens per step for tokens/s and MFU, so those
metrics are nominal upper bounds; `seq_len` defaults to the longest conversation to keep them close.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nanoseek.checkpoint.hf import load_model
from nanoseek.checkpoint.run import resolve_model_dir, resume_point
from nanoseek.data.chat import BUILTIN, SFTLoader, chat_example, encode_conversations, load_conversations
from nanoseek.distributed.process_group import DistEnv
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.config import RESUME_OVERRIDABLE, TrainConfig
from nanoseek.train.loop import resumed_model, train, val_loaders
from nanoseek.train.run import rank0_print, resumed_job, seed_everything, training_device

# TrainConfig defaults that differ for fine-tuning; seq_len None: the longest conversation
SFT_DEFAULTS: dict[str, Any] = {"lr": 1e-3, "warmup": 20, "batch_size": 16, "eval_every": 100, "eval_batches": 10}
SFT_DEFAULTS["seq_len"] = None
DATA_SETTINGS = ("model", "data", "worked_fraction", "n", "levels", "data_seed", "val_fraction")


@dataclass
class SFTJob:
    """One SFT run: fine-tune `model` (a model dir or run folder) on `data` (a .jsonl, a dir of them or
    `builtin:TASK,...`) into the run folder `out`; resume continues the run in `out` (model and data may be None
    then: the run's)."""

    model: str | None
    data: str | None
    out: str
    worked_fraction: float = 1.0  # built-in: share of worked solutions
    n: int = 20000  # built-in: problems per task (and per level)
    levels: list[str] | None = None  # built-in: only these levels
    data_seed: int = 0  # built-in: problem generation seed
    val_fraction: float = 0.02  # jsonl: share held out for the val loss
    resume: bool = False
    train: TrainConfig = field(default_factory=lambda: TrainConfig(**SFT_DEFAULTS))


def run_sft(job: SFTJob, env: DistEnv | None = None) -> dict[str, Any]:
    """Run (or resume) an SFT job through `train()`; returns its summary. env: the torchrun process group (None:
    one process). Raises ValueError for bad settings, and lets NonFiniteLoss and KeyboardInterrupt through."""
    env = env or DistEnv()
    log = rank0_print(env)
    run_dir = Path(job.out)
    ckpt, saved = resume_point(run_dir, job.resume)
    settings = {k: getattr(job, k) for k in DATA_SETTINGS}
    if settings["model"]:
        settings["model"] = str(resolve_model_dir(settings["model"]))  # a run folder means its latest checkpoint
    if settings["data"] and not settings["data"].startswith(BUILTIN):
        settings["data"] = str(Path(settings["data"]).resolve())
    cfg, settings = resumed_job(job.train, settings, saved, RESUME_OVERRIDABLE, env.world_size)
    if not settings.get("model") or not settings.get("data"):
        raise ValueError("pass --model MODEL_DIR and --data FILE|DIR|builtin:arithmetic,countdown")
    if not 0 <= settings["worked_fraction"] <= 1:
        raise ValueError(f"--worked-fraction must be in [0, 1], got {settings['worked_fraction']}")

    device = training_device(env, cfg.device)
    source = ckpt or Path(settings["model"])
    tokenizer = Tokenizer.from_pretrained(source)
    train_conv = load_conversations(settings, "train")
    if ckpt is None:
        seed_everything(cfg.seed)
    model = resumed_model(ckpt, device) if ckpt else load_model(source, device=device, dtype=torch.float32)
    if cfg.seq_len is None:  # the longest conversation (of the first 20k), within what the model can attend to
        longest = max((len(chat_example(tokenizer, m)[0]) - 1 for m in train_conv[:20000]), default=1)
        cfg.seq_len = min(longest, model.config.max_position_embeddings)
        if longest > cfg.seq_len:
            log(f"sft: the longest conversation has {longest} tokens: longer ones are cut at {cfg.seq_len}")
    cfg.validate()

    examples, dropped = encode_conversations(tokenizer, train_conv, cfg.seq_len)
    shard = dict(seed=cfg.seed, rank=env.rank, world_size=env.world_size)
    loader = SFTLoader(examples, cfg.batch_size, tokenizer.pad_id, **shard)
    val_examples, _ = encode_conversations(tokenizer, load_conversations(settings, "val"), cfg.seq_len)
    make_val = None
    if val_examples:
        make_val = val_loaders(lambda: SFTLoader(val_examples, cfg.batch_size, tokenizer.pad_id, **shard), cfg, log)
    log(
        f"sft: {len(examples):,} conversations ({dropped} dropped: no target within --seq-len {cfg.seq_len}), "
        f"{len(val_examples):,} val; {loader.batches_per_epoch} batches/epoch, "
        f"{100 * loader.padding_fraction():.1f}% padding; device {device}"
    )
    run_args = {**settings, "out": str(run_dir)}
    return train(cfg, model, loader, run_dir, tokenizer, make_val, resume_from=ckpt, run_args=run_args, env=env)
