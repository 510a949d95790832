"""Helpers for tests that run a real `nanoseek serve` process on 127.0.0.1, and a tiny model that has
memorised a few R1-style answers (`<think>...</think> answer`), so replies are known in advance."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
from helpers import memorise, tiny_model
from helpers.shapes import CheckedTransport

from nanoseek import save_model
from nanoseek.tokenizer import Tokenizer, train_tokenizer

REPO = Path(__file__).resolve().parents[1]
KNOWN = {
    "What is 2+3?": "<think>2+3=5</think> 5",
    "What is 4*2?": "<think>4*2=8</think> 8",
    "What is 9-7?": "<think>9-7=2</think> 2",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def memorised_model(out: Path, steps: int = 120, max_position_embeddings: int = 128) -> Tokenizer:
    """Save a tiny model that answers KNOWN's questions (greedy) into `out`; returns its tokenizer."""
    texts = [f"{q} {a}" for q, a in KNOWN.items()] * 20 + ["hello world, the quick brown fox " * 4] * 5
    tok = train_tokenizer(texts, vocab_size=320)
    model = tiny_model(tok, max_position_embeddings=max_position_embeddings)
    chats = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in KNOWN.items()]
    loss = memorise(model, tok, chats, steps)
    assert loss < 0.02, loss
    save_model(model, out, tokenizer=tok)
    return tok


class ServeProcess:
    """`nanoseek serve --model DIR ...` in a subprocess; ready once /health answers 200."""

    def __init__(self, model_dir: Path, *args: str, timeout: float = 180.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.base_url = self.url + "/v1"
        env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        # on the CPU whatever the machine has: tests compare its replies with engines in the test process
        serve = ["serve", "--model", str(model_dir), "--port", str(self.port), "--device", "cpu", *args]
        cmd = [sys.executable, "-m", "nanoseek", *serve]
        self.log = Path(model_dir).parent / f"serve-{self.port}.log"
        self._log = open(self.log, "w")
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nanoseek serve exited ({self.proc.returncode}):\n{self.log.read_text()}")
            try:
                health = httpx.get(self.url + "/health", timeout=2)
                if health.status_code == 200:
                    return
                if "engine stopped" in health.text:  # it will never be healthy: say why now
                    self.close()
                    raise RuntimeError(f"nanoseek serve's engine stopped:\n{self.log.read_text()}")
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.close()
                raise TimeoutError(f"nanoseek serve not healthy after {timeout} s:\n{self.log.read_text()}")
            time.sleep(0.2)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def metric(self, name: str) -> float:
        """The value of an unlabelled-but-for-model_name metric line in /metrics."""
        for line in httpx.get(self.url + "/metrics", timeout=10).text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)


def checked_client(base_url: str, timeout: float = 60) -> openai.OpenAI:
    """An `openai` client whose every response is validated against the package's types (helpers/shapes.py)."""
    http = httpx.Client(transport=CheckedTransport(), timeout=timeout)
    return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=timeout, http_client=http)
