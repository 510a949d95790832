"""Chat data for SFT: conversations (built-in worked solutions, the calculator tool task, or .jsonl), the chat
template's token ids with a loss mask on the assistant's tokens only (its answers and its tool calls, never the
tool results), and a length-bucketed loader. A conversation is its list of messages, or `{"messages": [...],
"tools": [...]}` when it offers tools."""

from __future__ import annotations

import hashlib
import json
import random
from typing import Any

import numpy as np
import torch

from nanoseek.data.shards import chat_parts, iter_documents
from nanoseek.model.transformer import IGNORE_INDEX
from nanoseek.tasks.calculator import NAME as CALCULATOR
from nanoseek.tasks.calculator import calculator_chat
from nanoseek.tasks.problems import LEVELS, generate
from nanoseek.tokenizer import Tokenizer

BUILTIN = "builtin:"
CHAT_TASKS = (*LEVELS, CALCULATOR)  # what `builtin:` names


POOL_BATCHES = 64  # batches per length-sorting pool: bigger = less padding, less randomness in batch makeup


def chat_example(tokenizer: Tokenizer, conversation: list[dict] | dict) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation and, per token, whether it is a loss target: each assistant turn as
    the template renders it after its prompt (content, tool calls, EOS).

    Pieces are cut at special tokens (the role tags, `<｜tool▁outputs▁end｜>` and EOS), where the BPE never merges
    across, so the concatenated ids equal `tokenizer.encode_chat(messages, tools=tools)`.
    """
    messages, tools = chat_parts(conversation)
    full = tokenizer.apply_chat_template(messages, tools=tools)
    ids: list[int] = []
    is_target: list[bool] = []
    done = 0  # characters of `full` already encoded
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True, tools=tools)
        upto = tokenizer.apply_chat_template(messages[: i + 1], tools=tools)
        start, end = len(prefix), len(upto)
        if not (full.startswith(prefix) and upto.startswith(prefix) and upto.endswith(tokenizer.eos_token)):
            raise ValueError("the chat template does not render assistant turns as prefix + turn + EOS")
        if full[start:end] != upto[start:]:  # reasoning stripped from an earlier turn: history, not target
            continue
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
) -> list[list[dict] | dict]:
    """n problems per task (per level when levels are given), each worked with probability worked_fraction.
    `calculator`: arithmetic problems solved by a call to the calculator tool (nanoseek/tasks/calculator.py)."""
    rng = random.Random(f"worked:{seed}:{split}")
    out = []
    for task in tasks:
        kind = "arithmetic" if task == CALCULATOR else task
        task_levels = [lv for lv in levels if lv in LEVELS[kind]] if levels else [None]
        if levels and not task_levels:
            raise ValueError(f"none of --levels {levels} is a {task} level ({list(LEVELS[kind])})")
        for level in task_levels:
            for i, p in enumerate(generate(kind, n, seed, split, level)):
                out.append(
                    calculator_chat(p, i) if task == CALCULATOR else p.chat(worked=rng.random() < worked_fraction)
                )
    random.Random(f"order:{seed}:{split}").shuffle(out)  # interleave tasks and levels
    return out


def jsonl_conversations(paths: list[str], val_fraction: float, split: str) -> list[list[dict] | dict]:
    """Conversations from .jsonl files (or dirs of them); val/train by a stable hash of the conversation."""
    out = []
    for doc, source in iter_documents(paths):
        if isinstance(doc, str):
            raise ValueError(f"{source}: SFT needs {{'messages': [...]}} lines, got a text document")
        if not any(m["role"] == "assistant" for m in chat_parts(doc)[0]):
            continue
        digest = hashlib.sha1(json.dumps(doc, sort_keys=True).encode("utf-8")).digest()
        is_val = int.from_bytes(digest[:8], "little") / 2**64 < val_fraction
        if is_val == (split == "val"):
            out.append(doc)
    return out


def encode_conversations(
    tokenizer: Tokenizer, conversations: list[list[dict] | dict], seq_len: int | None = None
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


def load_conversations(args: dict[str, Any], split: str) -> list[list[dict] | dict]:
    """The run's conversations for one split, from its (saved) arguments."""
    data = args["data"]
    if data.startswith(BUILTIN):
        tasks = [t.strip() for t in data[len(BUILTIN) :].split(",") if t.strip()]
        bad = [t for t in tasks if t not in CHAT_TASKS]
        if not tasks or bad:
            raise ValueError(f"--data {data}: name built-in tasks from {sorted(CHAT_TASKS)}, e.g. builtin:arithmetic")
        n = args["n"] if split == "train" else max(1, args["n"] // 20)
        return builtin_conversations(tasks, n, args["data_seed"], split, args["worked_fraction"], args["levels"])
    return jsonl_conversations([data], args["val_fraction"], split)
