"""Token shards on disk (`nanoseek prepare`) and the random-window loader that reads them.

A data directory holds `train_000.bin`, `val_000.bin`, ... (raw token ids, uint16 when the vocabulary
fits, else uint32; open with `np.memmap`) and `manifest.json`. Each document is stored as
BOS + tokens + EOS, documents back to back.

Inputs: a `.txt` file is ONE document (a book, an article); a `.jsonl` line is one document,
`{"text": ...}` or `{"messages": [{"role": ..., "content": ...}, ...]}` (rendered with the chat
template, which supplies BOS and EOS itself; OpenAI's chat format, so assistant `tool_calls`, `tool`
messages and a `tools` list beside `messages` too); a directory means every .txt/.jsonl file under it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from nanoseek.io import atomic_write_text, replace_dir, temp_dir_beside
from nanoseek.tokenizer import Tokenizer

MANIFEST = "manifest.json"
FORMAT = "nanoseek-tokens-v1"
SHARD_TOKENS = 2**27  # tokens per shard file (256 MiB as uint16)
CHUNK_DOCS = 512  # documents encoded per batch call (the tokenizer's Rust backend uses every core)
ROLES = ("system", "user", "assistant", "tool")

# text, a conversation's messages, or {"messages": [...], "tools": [...]} for one that offers tools
Document = str | list[dict] | dict


# ----------------------------------------------------------------------------- reading inputs


def _expand(paths: Iterable[str | Path]) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix in (".txt", ".jsonl") and f.is_file())
            if not found:
                raise ValueError(f"{p}: directory holds no .txt or .jsonl files")
            files += found
        elif p.is_file():
            if p.suffix not in (".txt", ".jsonl"):
                raise ValueError(f"{p}: unsupported input type {p.suffix!r}: use .txt or .jsonl")
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or directory")
    return files


def _decode(data: bytes, path: Path, line: int | None = None) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        where = line if line is not None else data[: e.start].count(b"\n") + 1
        raise ValueError(
            f"{path}:{where}: not valid UTF-8 (byte 0x{data[e.start]:02x}): "
            f"re-encode the file as UTF-8, e.g. `iconv -f latin1 -t utf-8 {path.name}`"
        ) from None


def _jsonl_document(line: str, path: Path, lineno: int) -> Document:
    fix = 'each line must be a JSON object {"text": "..."} or {"messages": [{"role": ..., "content": ...}]}'
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg}): {fix}") from None
    if isinstance(obj, dict) and isinstance(obj.get("text"), str):
        return obj["text"]
    if isinstance(obj, dict) and isinstance(obj.get("messages"), list):
        messages, tools = obj["messages"], obj.get("tools")
        if not messages:
            raise ValueError(f"{path}:{lineno}: empty messages: {fix}")
        for i, m in enumerate(messages):
            problem = _bad_message(m)
            if problem:
                raise ValueError(f"{path}:{lineno}: bad messages: messages[{i}] {problem}: {fix}")
        if tools is not None and not (isinstance(tools, list) and all(_is_tool(t) for t in tools)):
            raise ValueError(
                f"{path}:{lineno}: tools must be a list of "
                '{"type": "function", "function": {"name": ..., "description": ..., "parameters": {...}}}'
            )
        out = [_message(m) for m in messages]
        return {"messages": out, "tools": tools} if tools else out
    raise ValueError(f"{path}:{lineno}: no string field 'text' or list field 'messages': {fix}")


def _bad_message(m) -> str | None:
    """What is wrong with one chat message (None: nothing): a role in ROLES and a string content, or an assistant
    turn's `tool_calls` ([{"function": {"name", "arguments"}}], content may then be null)."""
    if not isinstance(m, dict) or m.get("role") not in ROLES:
        return f"each message needs a role in {ROLES}"
    calls = m.get("tool_calls")
    if calls is not None:
        ok = m["role"] == "assistant" and isinstance(calls, list) and calls
        for c in calls if ok else []:
            fn = c.get("function") if isinstance(c, dict) else None
            ok = ok and isinstance(fn, dict) and isinstance(fn.get("name"), str)
            ok = ok and isinstance(fn.get("arguments"), (str, dict))
        if not ok:
            return 'assistant tool_calls are [{"type": "function", "function": {"name": ..., "arguments": "{...}"}}]'
    if not isinstance(m.get("content"), str) and not (calls and m.get("content") is None):
        return "needs a string content (null only beside tool_calls)"
    return None


def _is_tool(t) -> bool:
    fn = t.get("function") if isinstance(t, dict) else None
    return isinstance(fn, dict) and isinstance(fn.get("name"), str)


def _message(m: dict) -> dict:
    """The fields of a message the chat template reads."""
    out = {"role": m["role"], "content": m.get("content") or ""}
    for key in ("tool_calls", "tool_call_id"):
        if m.get(key) is not None:
            out[key] = m[key]
    return out


def iter_documents(paths: Iterable[str | Path]) -> Iterator[tuple[Document, str]]:
    """Yield (document, source file) for every non-empty document in paths."""
    for path in _expand(paths):
        if path.suffix == ".txt":
            text = _decode(path.read_bytes(), path)
            if text.strip():
                yield text, str(path)
            continue
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                line = _decode(raw, path, lineno)
                if not line.strip():
                    continue
                doc = _jsonl_document(line, path, lineno)
                if doc.strip() if isinstance(doc, str) else doc:
                    yield doc, str(path)


def chat_parts(doc: list[dict] | dict) -> tuple[list[dict], list[dict] | None]:
    """(messages, tools or None) of a conversation document."""
    if isinstance(doc, dict):
        return doc["messages"], doc.get("tools")
    return doc, None


# ----------------------------------------------------------------------------- writing shards


class _ShardWriter:
    """Appends token arrays to `{split}_000.bin`, `{split}_001.bin`, ... of at most shard_tokens each."""

    def __init__(self, out: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.out, self.split, self.dtype, self.shard_tokens = out, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self.tokens = self.documents = 0
        self._file = None

    def write(self, ids: list[int]) -> None:
        arr = np.asarray(ids, dtype=self.dtype)
        self.documents += 1
        while len(arr):
            if self._file is None or self.shards[-1]["tokens"] >= self.shard_tokens:
                self._open()
            take = self.shard_tokens - self.shards[-1]["tokens"]
            self._file.write(arr[:take].tobytes())
            self.shards[-1]["tokens"] += len(arr[:take])
            self.tokens += len(arr[:take])
            arr = arr[take:]

    def _open(self) -> None:
        self.close()
        name = f"{self.split}_{len(self.shards):03d}.bin"
        self._file = open(self.out / name, "wb")
        self.shards.append({"file": name, "tokens": 0})

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _is_val(ids: list[int], val_fraction: float) -> bool:
    # By a hash of the content: stable across runs and input order, and duplicates share a split.
    digest = hashlib.sha1(np.asarray(ids, dtype=np.uint32).tobytes()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64 < val_fraction


def _replace_data_dir(tmp: Path, out: Path) -> None:
    """Move the finished tmp dir to out; an earlier data dir there is replaced, anything else kept."""
    if out.exists() and not (out / MANIFEST).is_file():
        raise ValueError(f"{out} exists and is not a nanoseek data dir (no {MANIFEST}): choose another --out")
    replace_dir(tmp, out)


def prepare(
    tokenizer: Tokenizer,
    out_dir: str | Path,
    inputs: Iterable[str | Path] = (),
    builtin: Iterable[str] = (),
    n: int = 10000,
    seed: int = 0,
    val_fraction: float = 0.05,
    tokenizer_path: str | None = None,
    shard_tokens: int = SHARD_TOKENS,
    worked_fraction: float = 1.0,
) -> dict:
    """Tokenize inputs (and/or built-in task texts, n problems per task, a share `worked_fraction` of them with
    worked solutions) into out_dir; return the manifest."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"--val-fraction {val_fraction} must be in [0, 1)")
    inputs, builtin = list(inputs), list(builtin)
    docs: list[Iterable[tuple[Document, str]]] = []
    if inputs:
        _expand(inputs)  # fail on a bad path before any work
        docs.append(iter_documents(inputs))
    if builtin:
        from nanoseek.tasks.problems import builtin_corpus

        docs.append(
            (text, "builtin") for text in builtin_corpus(n, seed, tuple(builtin), worked_fraction=worked_fraction)
        )
    if not docs:
        raise ValueError("no input: pass --input PATH... and/or --builtin arithmetic countdown")

    out = Path(out_dir).resolve()
    tmp = temp_dir_beside(out)
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size < 2**16 else np.uint32)
    writers = {s: _ShardWriter(tmp, s, dtype, shard_tokens) for s in ("train", "val")}
    sources: dict[str, int] = {}
    try:
        chunk: list[tuple[Document, str]] = []
        bar = tqdm(desc="prepare", unit="doc", disable=None)
        for item in (d for it in docs for d in it):
            chunk.append(item)
            if len(chunk) >= CHUNK_DOCS:
                _write_chunk(tokenizer, chunk, writers, val_fraction, sources)
                bar.update(len(chunk))
                chunk = []
        _write_chunk(tokenizer, chunk, writers, val_fraction, sources)
        bar.update(len(chunk))
        bar.close()
        for w in writers.values():
            w.close()
        docs_total = sum(w.documents for w in writers.values())
        if docs_total == 0:
            names = ", ".join(map(str, inputs + builtin))
            raise ValueError(f"no documents found in {names}: the inputs are empty, add text to them")
        if writers["train"].documents == 0:
            raise ValueError(f"all {docs_total} documents fell in the val split: lower --val-fraction or add documents")
        if val_fraction and writers["val"].documents == 0:
            print(
                f"warning: no document fell in the val split ({docs_total} documents; a .txt file is one "
                "document): add documents or use --val-fraction 0",
                file=sys.stderr,
            )
        manifest = {
            "format": FORMAT,
            "dtype": dtype.name,
            "vocab_size": tokenizer.vocab_size,
            "bos_id": tokenizer.bos_id,
            "eos_id": tokenizer.eos_id,
            "tokenizer_hash": tokenizer.hash(),
            "tokenizer": tokenizer_path,
            "splits": {
                s: {"tokens": w.tokens, "documents": w.documents, "shards": w.shards} for s, w in writers.items()
            },
            "sources": sources,
            "builtin": {"tasks": builtin, "n": n, "seed": seed, "worked_fraction": worked_fraction}
            if builtin
            else None,
            "val_fraction": val_fraction,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        _replace_data_dir(tmp, out)
    except BaseException:
        for w in writers.values():
            w.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _render_chat(tokenizer: Tokenizer, doc: list[dict] | dict) -> str:
    messages, tools = chat_parts(doc)
    return tokenizer.apply_chat_template(messages, tools=tools)


def _write_chunk(tokenizer, chunk, writers, val_fraction, sources) -> None:
    texts = [d if isinstance(d, str) else _render_chat(tokenizer, d) for d, _ in chunk]
    for (doc, source), ids in zip(chunk, tokenizer.encode_batch(texts)):
        if isinstance(doc, str):
            ids = [tokenizer.bos_id, *ids, tokenizer.eos_id]
        elif not ids or ids[-1] != tokenizer.eos_id:  # a chat ending on a user turn
            ids.append(tokenizer.eos_id)
        split = "val" if val_fraction and _is_val(ids, val_fraction) else "train"
        writers[split].write(ids)
        sources[source] = sources.get(source, 0) + 1


# ----------------------------------------------------------------------------- loading


def load_manifest(data_dir: str | Path) -> dict:
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{data_dir} has no {MANIFEST}: run `nanoseek prepare --tokenizer DIR --input ... --out {data_dir}` first"
        )
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown format {manifest.get('format')!r}, expected {FORMAT}")
    return manifest


class TokenLoader:
    """Seeded random windows of seq_len + 1 tokens, as (inputs, targets) batches of int64 [B, T].

    Windows start on a grid of stride seq_len (shifted by a random offset each epoch) inside each
    shard, and are visited in a seeded random order per epoch. Global batch g of an epoch takes
    windows perm[g*B : (g+1)*B]; rank r serves batches g = r, r + world_size, ..., so ranks never
    see the same window in an epoch. The cursor (epoch, step) is the whole state.
    """

    def __init__(
        self,
        data_dir: str | Path,
        split: str,
        batch_size: int,
        seq_len: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
    ):
        manifest = load_manifest(data_dir)
        if split not in manifest["splits"]:
            raise ValueError(f"{data_dir} has no split {split!r}: choose one of {list(manifest['splits'])}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.split, self.batch_size, self.seq_len = split, batch_size, seq_len
        self.rank, self.world_size, self.seed = rank, world_size, seed
        dtype = np.dtype(manifest["dtype"])
        self.shards = [
            np.memmap(Path(data_dir) / s["file"], dtype=dtype, mode="r")
            for s in manifest["splits"][split]["shards"]
            if s["tokens"] > seq_len
        ]
        self.epoch = self.step = 0
        self._windows = self._epoch_windows(0)
        if self.batches_per_epoch == 0:
            tokens = manifest["splits"][split]["tokens"]
            raise ValueError(
                f"split {split!r} of {data_dir} has {tokens} tokens, too few for one batch of "
                f"{batch_size} x {seq_len + 1} tokens on each of {world_size} ranks: "
                "lower --batch-size/--seq-len or prepare more data"
            )

    @property
    def batches_per_epoch(self) -> int:
        """Batches each rank gets per epoch."""
        return len(self._windows) // (self.batch_size * self.world_size)

    def _epoch_windows(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        offset = int(rng.integers(self.seq_len))
        starts = []
        for i, shard in enumerate(self.shards):
            # Fall back to offset 0 for a shard too short to fit one shifted window.
            first = offset if len(shard) - offset >= self.seq_len + 1 else 0
            s = np.arange(first, len(shard) - self.seq_len, self.seq_len)
            starts.append(np.stack([np.full_like(s, i), s], axis=1))
        windows = np.concatenate(starts) if starts else np.zeros((0, 2), dtype=np.int64)
        return windows[rng.permutation(len(windows))]  # [num_windows, (shard, start)]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.step >= self.batches_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
            self._windows = self._epoch_windows(self.epoch)
        g = self.step * self.world_size + self.rank
        rows = self._windows[g * self.batch_size : (g + 1) * self.batch_size]
        batch = np.stack([self.shards[i][s : s + self.seq_len + 1] for i, s in rows]).astype(np.int64)
        self.step += 1
        x = torch.from_numpy(batch)  # [B, T + 1]
        return x[:, :-1], x[:, 1:]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {
            "split": self.split,
            "epoch": self.epoch,
            "step": self.step,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume at a saved cursor: the next batches equal those of an uninterrupted run."""
        if state["split"] != self.split or state["seed"] != self.seed:
            raise ValueError(
                f"loader state is for split {state['split']!r} seed {state['seed']}, "
                f"this loader reads split {self.split!r} seed {self.seed}"
            )
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self._windows = self._epoch_windows(self.epoch)


# ----------------------------------------------------------------------------- the tokenizer of a data dir


def find_tokenizer(data_dir: Path, manifest: dict, path: str | Path | None = None) -> Tokenizer:
    """The tokenizer the data was prepared with: `path`, else the data dir, else the manifest's recorded path
    (as written, then relative to the data dir and to its parent); its hash must match the manifest's."""
    recorded = manifest.get("tokenizer")
    candidates = [Path(path)] if path else [data_dir]
    if not path and recorded:
        candidates += [Path(recorded), data_dir / recorded, data_dir.parent / recorded]
    for c in candidates:
        file = c / "tokenizer.json" if c.is_dir() else c
        if not file.is_file():
            continue
        tok = Tokenizer.from_pretrained(c)
        if tok.hash() == manifest.get("tokenizer_hash"):
            return tok
        if path:
            raise ValueError(f"tokenizer {path} is not the one {data_dir} was prepared with (hash differs)")
    raise FileNotFoundError(
        f"cannot find the tokenizer of {data_dir} (manifest records {recorded!r}): pass --tokenizer DIR "
        "so checkpoints carry it"
    )
