"""Supervised fine-tuning on chat data (`nanoseek sft`): loss on assistant tokens only, through `train()`.

Data: `.jsonl` files (one `{"messages": [{"role", "content"}, ...]}` per line, OpenAI style) or the built-in
tasks (`builtin:arithmetic,countdown`), rendered with the model's chat template. `--worked-fraction F` makes
a share F of built-in completions worked (`<think>steps</think> answer`) and the rest answer-only
(`<think></think> answer`); which problems are worked is fixed by the seed.

Loss mask: every assistant turn the template renders unchanged is a target, content plus its closing EOS;
the prompt, BOS, role tokens and system text are -100. R1's template drops the reasoning of *earlier*
assistant turns, so such a turn is context (history as the model will see it), not a target.

Batching: conversations are NOT packed. Packing would let attention cross conversation boundaries (our
attention is plain causal, with no document mask), so each row holds one conversation, right-padded to
the longest in its batch (pad targets are -100; right padding never changes earlier positions under a
causal mask). To limit the waste, batches are length-bucketed: each epoch shuffles, cuts the order into
pools of 64 batches, sorts each pool by length and shuffles the resulting batches. On the built-in tasks
(batch 16, worked solutions) 0.9% of the computed positions are padding, vs 33-40% for random batches
(`padding_fraction`). loop.py counts `batch_size * seq_len` tokens per step for tokens/s and MFU, so those
metrics are nominal upper bounds; `--seq-len` defaults to the longest conversation to keep them close.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nanoseek.checkpoint import load_model, resolve_model_dir
from nanoseek.config import ModelConfig
from nanoseek.data.shards import iter_documents
from nanoseek.data.tasks import LEVELS, generate
from nanoseek.distributed.checkpoint import is_distributed_checkpoint
from nanoseek.distributed.process_group import DistEnv, init_distributed, shutdown
from nanoseek.model import Transformer
from nanoseek.model.transformer import IGNORE_INDEX
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.checkpointing import resume_point
from nanoseek.train.loop import (
    NonFiniteLoss,
    TrainConfig,
    add_train_options,
    format_summary,
    resolve_device,
    seed_everything,
    train,
    train_config_from_args,
)

BUILTIN = "builtin:"
POOL_BATCHES = 64  # batches per length-sorting pool: bigger = less padding, less randomness in batch makeup
SFT_DEFAULTS = {"lr": 1e-3, "warmup": 20, "batch_size": 16, "eval_every": 100, "eval_batches": 10}


# ------------------------------------------------------------------------------------ examples and masks
def chat_example(tokenizer: Tokenizer, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation and, per token, whether it is a loss target.

    Pieces are cut at special tokens (the role tags and EOS), where the BPE never merges across, so the
    concatenated ids equal `tokenizer.encode_chat(messages)`.
    """
    full = tokenizer.apply_chat_template(messages)
    eos = tokenizer.eos_token
    ids: list[int] = []
    is_target: list[bool] = []
    done = 0  # characters of `full` already encoded
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
        start = len(prefix)
        end = full.find(eos, start)
        if not full.startswith(prefix) or end < 0:
            raise ValueError("the chat template does not render assistant turns as prefix + content + EOS")
        if full[start:end] != m["content"]:  # reasoning stripped from an earlier turn: history, not target
            continue
        end += len(eos)
        for text, target in ((full[done:start], False), (full[start:end], True)):
            piece = tokenizer.encode(text) if text else []
            ids += piece
            is_target += [target] * len(piece)
        done = end
    tail = tokenizer.encode(full[done:]) if done < len(full) else []
    return ids + tail, is_target + [False] * len(tail)


def inputs_and_targets(ids: list[int], is_target: list[bool]) -> tuple[list[int], list[int]]:
    """Next-token pairs: inputs ids[:-1]; targets ids[1:] where that token is a target, else -100."""
    return ids[:-1], [t if m else IGNORE_INDEX for t, m in zip(ids[1:], is_target[1:])]


def builtin_conversations(
    tasks: list[str], n: int, seed: int, split: str, worked_fraction: float, levels: list[str] | None = None
) -> list[list[dict]]:
    """n problems per task (per level when levels are given), each worked with probability worked_fraction."""
    rng = random.Random(f"worked:{seed}:{split}")
    out = []
    for task in tasks:
        task_levels = [lv for lv in levels if lv in LEVELS[task]] if levels else [None]
        if levels and not task_levels:
            raise ValueError(f"none of --levels {levels} is a {task} level ({list(LEVELS[task])})")
        for level in task_levels:
            for p in generate(task, n, seed, split, level):
                out.append(p.chat(worked=rng.random() < worked_fraction))
    random.Random(f"order:{seed}:{split}").shuffle(out)  # interleave tasks and levels
    return out


def jsonl_conversations(paths: list[str], val_fraction: float, split: str) -> list[list[dict]]:
    """Conversations from .jsonl files (or dirs of them); val/train by a stable hash of the conversation."""
    out = []
    for doc, source in iter_documents(paths):
        if isinstance(doc, str):
            raise ValueError(f"{source}: SFT needs {{'messages': [...]}} lines, got a text document")
        if not any(m["role"] == "assistant" for m in doc):
            continue
        digest = hashlib.sha1(json.dumps(doc, sort_keys=True).encode("utf-8")).digest()
        is_val = int.from_bytes(digest[:8], "little") / 2**64 < val_fraction
        if is_val == (split == "val"):
            out.append(doc)
    return out


def encode_conversations(
    tokenizer: Tokenizer, conversations: list[list[dict]], seq_len: int | None = None
) -> tuple[list[tuple[list[int], list[int]]], int]:
    """(inputs, targets) pairs, truncated to seq_len; conversations left with no target are dropped.

    Returns (examples, number dropped)."""
    examples, dropped = [], 0
    for messages in conversations:
        x, y = inputs_and_targets(*chat_example(tokenizer, messages))
        if seq_len is not None:
            x, y = x[:seq_len], y[:seq_len]
        if all(t == IGNORE_INDEX for t in y):
            dropped += 1
            continue
        examples.append((x, y))
    return examples, dropped


# ---------------------------------------------------------------------------------------------- loader
class SFTLoader:
    """Length-bucketed, right-padded batches of (inputs, targets), deterministic by (seed, epoch), resumable.

    next_batch() -> (inputs [B, T_max] int64 padded with pad_id, targets [B, T_max] padded with -100).
    """

    def __init__(
        self,
        examples: list[tuple[list[int], list[int]]],
        batch_size: int,
        pad_id: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        """rank / world_size: under torchrun, rank r serves the epoch's batches r, r + world_size, ... (every rank
        the same number of them)."""
        if not examples:
            raise ValueError("no SFT examples (every conversation was empty or had no assistant target)")
        self.examples, self.batch_size, self.pad_id, self.seed = examples, batch_size, pad_id, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.cursor = 0, 0
        self._batches = self._epoch_batches(0)
        if not self._batches:
            raise ValueError(f"{len(examples)} SFT examples are too few for one batch on each of {world_size} ranks")

    @property
    def batches_per_epoch(self) -> int:
        return len(self._batches)

    def _epoch_batches(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.examples))
        lengths = np.array([len(self.examples[i][0]) for i in order])
        pool = self.batch_size * POOL_BATCHES
        batches = []
        for lo in range(0, len(order), pool):
            chunk = order[lo : lo + pool][np.argsort(lengths[lo : lo + pool], kind="stable")]
            batches += [chunk[j : j + self.batch_size] for j in range(0, len(chunk), self.batch_size)]
        batches = [batches[i] for i in rng.permutation(len(batches))]
        per_rank = len(batches) // self.world_size
        return batches[self.rank :: self.world_size][:per_rank]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cursor >= len(self._batches):
            self.epoch, self.cursor = self.epoch + 1, 0
            self._batches = self._epoch_batches(self.epoch)
        rows = [self.examples[i] for i in self._batches[self.cursor]]
        self.cursor += 1
        T = max(len(x) for x, _ in rows)
        x = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        y = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
        for r, (xi, yi) in enumerate(rows):
            x[r, : len(xi)] = torch.tensor(xi)
            y[r, : len(yi)] = torch.tensor(yi)
        return x, y

    def padding_fraction(self) -> float:
        """Share of positions in one epoch's batches that are padding (the cost of not packing)."""
        real = padded = 0
        for b in self._epoch_batches(self.epoch):
            lens = [len(self.examples[i][0]) for i in b]
            real, padded = real + sum(lens), padded + max(lens) * len(lens)
        return 1 - real / padded

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "examples": len(self.examples)}

    def load_state_dict(self, state: dict) -> None:
        if state["examples"] != len(self.examples) or state["seed"] != self.seed:
            raise ValueError("the SFT data changed since the checkpoint (example count or seed differs)")
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._batches = self._epoch_batches(self.epoch)


# ------------------------------------------------------------------------------------------------ CLI
def load_conversations(args: dict[str, Any], split: str) -> list[list[dict]]:
    """The run's conversations for one split, from its (saved) arguments."""
    data = args["data"]
    if data.startswith(BUILTIN):
        tasks = [t.strip() for t in data[len(BUILTIN) :].split(",") if t.strip()]
        bad = [t for t in tasks if t not in LEVELS]
        if not tasks or bad:
            raise ValueError(f"--data {data}: name built-in tasks from {sorted(LEVELS)}, e.g. builtin:arithmetic")
        n = args["n"] if split == "train" else max(1, args["n"] // 20)
        return builtin_conversations(tasks, n, args["data_seed"], split, args["worked_fraction"], args["levels"])
    return jsonl_conversations([data], args["val_fraction"], split)


def _cmd_sft(args: argparse.Namespace) -> int:
    """`nanoseek sft`, in one process or under torchrun (one call per rank)."""
    env = init_distributed(args.device or "auto")
    rc = 1
    try:
        rc = _sft_command(args, env)
        return rc
    finally:
        shutdown(clean=rc == 0)


def _sft_command(args: argparse.Namespace, env: DistEnv) -> int:
    log = print if env.is_main else (lambda *a, **k: None)
    run_dir = Path(args.out)
    ckpt, saved = resume_point(run_dir, args.resume)
    if saved is None:
        for k, v in SFT_DEFAULTS.items():
            if getattr(args, k) is None:
                setattr(args, k, v)
    if saved is None and args.model:
        args.model = str(resolve_model_dir(args.model))  # a run folder means its latest checkpoint
    data_args = {"model", "data", "worked_fraction", "n", "levels", "data_seed", "val_fraction"}
    run_args = {k: getattr(args, k) for k in data_args}
    if saved is not None:
        run_args = {k: saved[k] for k in data_args}
    elif not args.model or not args.data:
        raise ValueError("pass --model MODEL_DIR and --data FILE|DIR|builtin:arithmetic,countdown")
    if not 0 <= run_args["worked_fraction"] <= 1:
        raise ValueError(f"--worked-fraction must be in [0, 1], got {run_args['worked_fraction']}")
    if not run_args["data"].startswith(BUILTIN):
        run_args["data"] = str(Path(run_args["data"]).resolve())

    device = env.device if env.distributed else resolve_device(args.device or (saved or {}).get("device", "auto"))
    source = ckpt or Path(run_args["model"])
    tokenizer = Tokenizer.from_pretrained(source)
    train_conv = load_conversations(run_args, "train")
    longest = max(len(chat_example(tokenizer, m)[0]) - 1 for m in train_conv[:20000]) if train_conv else 1
    if args.seq_len is None and saved is None:
        args.seq_len = longest
    cfg: TrainConfig = train_config_from_args(args, saved, env.world_size)
    cfg.validate()
    if ckpt is None:
        seed_everything(cfg.seed)
    if ckpt is not None and is_distributed_checkpoint(ckpt):  # its weights are loaded by train()
        with torch.device(device):
            model = Transformer(ModelConfig.from_json(ckpt))
    else:
        model = load_model(source, device=device, dtype=torch.float32)
    if cfg.seq_len > model.config.max_position_embeddings:
        raise ValueError(
            f"--seq-len {cfg.seq_len} exceeds max_position_embeddings {model.config.max_position_embeddings}"
        )

    examples, dropped = encode_conversations(tokenizer, train_conv, cfg.seq_len)
    shard = dict(seed=cfg.seed, rank=env.rank, world_size=env.world_size)
    loader = SFTLoader(examples, cfg.batch_size, tokenizer.pad_id, **shard)
    val_examples, _ = encode_conversations(tokenizer, load_conversations(run_args, "val"), cfg.seq_len)
    make_val = None
    if cfg.eval_every > 0 and val_examples:
        try:
            SFTLoader(val_examples, cfg.batch_size, tokenizer.pad_id, **shard)
            make_val = lambda: SFTLoader(val_examples, cfg.batch_size, tokenizer.pad_id, **shard)  # noqa: E731
        except ValueError as e:
            log(f"warning: no validation: {e}", file=sys.stderr)
    log(
        f"sft: {len(examples):,} conversations ({dropped} dropped: no target within --seq-len {cfg.seq_len}), "
        f"{len(val_examples):,} val; {loader.batches_per_epoch} batches/epoch, "
        f"{100 * loader.padding_fraction():.1f}% padding; device {device}"
    )
    run_args["out"] = str(run_dir)
    try:
        summary = train(cfg, model, loader, run_dir, tokenizer, make_val, resume_from=ckpt, run_args=run_args, env=env)
    except NonFiniteLoss as e:
        log(f"nanoseek sft: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        log(f"\nnanoseek sft: interrupted; continue with `nanoseek sft --out {run_dir} --resume`", file=sys.stderr)
        return 130
    log(format_summary(summary))
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("sft", help="supervised fine-tuning on chat data, loss on assistant tokens only")
    p.add_argument("--model", help="model dir to fine-tune (with its tokenizer)")
    p.add_argument("--data", help="a .jsonl of {'messages': [...]}, a dir of them, or builtin:arithmetic,countdown")
    p.add_argument("--out", required=True, help="run dir: metrics.jsonl, plots/, checkpoints/step_N/")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--worked-fraction", type=float, default=1.0, help="built-in: share of worked solutions (1.0)")
    p.add_argument(
        "--n", "--problems", dest="n", type=int, default=20000, help="built-in: problems per task (and per level)"
    )  # --problems: under torchrun, whose parser takes --n for an abbreviation of its own options
    p.add_argument("--levels", nargs="*", help="built-in: only these levels, e.g. 2x1 3x12 4x12")
    p.add_argument("--data-seed", type=int, default=0, help="built-in: problem generation seed")
    p.add_argument("--val-fraction", type=float, default=0.02, help="jsonl: share held out for val loss")
    add_train_options(p)
    p.set_defaults(func=_cmd_sft)
