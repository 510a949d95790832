"""One thread owns the Engine and runs continuous batching for many concurrent callers (the server's requests).

Callers never touch the engine: `submit` and `abort` post messages to an inbox; the loop drains it between
steps, so requests join and leave the running batch at token granularity, and hands each sequence's progress
(`Update`) to the caller's sink, a thread-safe callback (the server's is `loop.call_soon_threadsafe` into an
asyncio queue). An aborted request's cache slot is free for the very next step.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from nanoseek.infer.engine import Engine
from nanoseek.infer.sampling import SamplingParams
from nanoseek.infer.sequence import Sequence


@dataclass
class Update:
    """A sequence's progress since its previous update: a snapshot, safe to read on another thread."""

    text: str  # the whole completion so far (stop strings cut)
    token_ids: list[int]  # new tokens
    logprobs: list[float]  # their log-probs (when asked)
    top_logprobs: list[dict[int, float]]
    finish_reason: str | None  # "stop", "length", "abort", "error" or None while running
    error: str | None = None
    queue_time: float | None = None  # seconds waiting for a slot (first update only)
    cached_tokens: int = 0  # prompt tokens served from the prefix cache (first update only)


class QueueFull(Exception):
    """More sequences are outstanding than the engine's slots plus the queue allow."""


@dataclass
class _Request:
    key: int
    prompt_ids: list[int]
    params: SamplingParams
    sink: Callable[[int, Update], None]
    submitted: float
    seq_id: int = -1
    sent: int = 0  # output tokens already reported


class EngineLoop:
    """Continuous batching on a background thread. `max_queue` bounds the sequences waiting for a slot."""

    def __init__(self, engine: Engine, max_queue: int = 256, on_step: Callable[[EngineLoop], None] | None = None):
        self.engine, self.max_queue, self.on_step = engine, max_queue, on_step
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.ready = threading.Event()  # set once warm-up is done
        self.error: BaseException | None = None  # why the loop died, if it did
        self._keys = itertools.count()
        self._by_seq: dict[int, _Request] = {}
        self._by_key: dict[int, _Request] = {}
        self._lock = threading.Lock()
        self._outstanding = 0  # submitted, not yet finished (guarded by _lock)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------ caller side
    @property
    def outstanding(self) -> int:
        return self._outstanding

    @property
    def waiting(self) -> int:
        """Sequences submitted that do not hold a slot yet."""
        return max(0, self._outstanding - len(self.engine.running))

    def submit(
        self, prompts: list[list[int]], params: list[SamplingParams], sink: Callable[[int, Update], None]
    ) -> list[int]:
        """Queue sequences (all or none); returns their keys. `sink(key, update)` is called on the loop thread
        for each update of each sequence. Raises QueueFull when the engine's slots and the queue are taken."""
        slots = self.engine.cache.n_slots
        with self._lock:
            if self._outstanding + len(prompts) > slots + self.max_queue:
                raise QueueFull(f"{self._outstanding} sequences are running or queued (limit {slots + self.max_queue})")
            self._outstanding += len(prompts)
        keys = [next(self._keys) for _ in prompts]
        now = time.perf_counter()
        for key, ids, p in zip(keys, prompts, params):
            self.inbox.put(("add", _Request(key, ids, p, sink, now)))
        return keys

    def abort(self, keys: list[int]) -> None:
        """Stop these sequences (finished ones are ignored)."""
        for key in keys:
            self.inbox.put(("abort", key))

    def start(self, warmup: Callable[[Engine], None] | None = None) -> None:
        self._thread = threading.Thread(target=self._run, args=(warmup,), name="nanoseek-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self.inbox.put(("wake", None))
        if self._thread is not None:
            self._thread.join(timeout)

    # -------------------------------------------------------------------------------- loop side
    def _run(self, warmup: Callable[[Engine], None] | None) -> None:
        try:
            if warmup is not None:
                warmup(self.engine)
            self.ready.set()
            while not self._stop.is_set():
                self._drain(block=not self.engine.has_work())
                if self.engine.has_work():
                    self._step()
        except BaseException as e:  # the loop is gone: fail everything outstanding so no caller waits forever
            self.error = e
            self._fail_all(f"engine loop stopped: {e!r}")
            raise

    def _drain(self, block: bool) -> None:
        try:
            msg = self.inbox.get(timeout=0.1) if block else self.inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, item = msg
            if kind == "add":
                self._add(item)
            elif kind == "abort":
                self._abort(item)
            try:
                msg = self.inbox.get_nowait()
            except queue.Empty:
                return

    def _add(self, req: _Request) -> None:
        try:
            req.seq_id = self.engine.add_request(req.prompt_ids, req.params)
        except ValueError as e:  # the server validates first; this is a last line of defence
            self._finish(req, Update("", [], [], [], "error", error=str(e)))
            return
        self._by_seq[req.seq_id] = req
        self._by_key[req.key] = req

    def _abort(self, key: int) -> None:
        req = self._by_key.get(key)
        if req is not None:
            self.engine.abort(req.seq_id)
            self._finish(req, Update("", [], [], [], "abort"))

    def _step(self) -> None:
        started = time.perf_counter()
        try:
            events = self.engine.step()
        except Exception as e:  # a failed step fails its requests, not the server
            for req in list(self._by_key.values()):
                self.engine.abort(req.seq_id)
                self._finish(req, Update("", [], [], [], "error", error=f"generation failed: {e!r}"))
            return
        for seq, _ in events:
            req = self._by_seq.get(seq.id)
            if req is not None:
                self._report(req, seq, started)
        if self.on_step is not None:
            self.on_step(self)

    def _report(self, req: _Request, seq: Sequence, step_started: float) -> None:
        n0, n1 = req.sent, len(seq.output_ids)
        update = Update(
            seq.text,
            seq.output_ids[n0:n1],
            seq.logprobs[n0:n1],
            seq.top_logprobs[n0:n1],
            seq.finish_reason,
            queue_time=max(0.0, step_started - req.submitted) if n0 == 0 else None,
            cached_tokens=seq.cached_tokens if n0 == 0 else 0,
        )
        req.sent = n1
        if seq.done:
            self._finish(req, update)
        else:
            self._send(req, update)

    def _finish(self, req: _Request, update: Update) -> None:
        self._by_seq.pop(req.seq_id, None)
        if self._by_key.pop(req.key, None) is not None or req.seq_id < 0:
            with self._lock:
                self._outstanding -= 1
        self._send(req, update)

    @staticmethod
    def _send(req: _Request, update: Update) -> None:
        try:
            req.sink(req.key, update)
        except Exception:  # a caller that went away (its event loop closed) must not stop the loop
            pass

    def _fail_all(self, message: str) -> None:
        pending = list(self._by_key.values())
        while True:  # requests still in the inbox
            try:
                kind, item = self.inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "add":
                pending.append(item)
        for req in pending:
            self._finish(req, Update("", [], [], [], "error", error=message))
