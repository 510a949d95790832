"""What the GGUF tests of V3.2 and V4 share: llama.cpp's logits and greedy decoding, and a check that the
indexers' top-k choices are decisive (spec P9: ggml and torch break exact ties differently)."""

from __future__ import annotations

import numpy as np
import torch

from nanoseek.model import compressed_attention, indexer


def llama_logits(llm, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits [T, V] for a fresh prompt (one batch through its prefill path)."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def llama_greedy(llm, ids: list[int], n: int) -> list[int]:
    """n greedy tokens from llama.cpp's own decode path: one token at a time through its caches."""
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return out


def record_topk(monkeypatch) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """Patch the indexers' top-k (V3.2's and V4's) to record (scores, visible, k) of every selection."""
    seen = []

    def select_topk(scores, visible, topk, _orig=indexer.select_topk):
        seen.append((scores.detach(), visible.expand(scores.shape), topk))
        return _orig(scores, visible, topk)

    monkeypatch.setattr(indexer, "select_topk", select_topk)
    monkeypatch.setattr(compressed_attention, "select_topk", select_topk)
    return seen
