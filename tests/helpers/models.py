"""Tiny models: the `tiny` preset sized for a tokenizer, seeded, and taught a few answers by heart."""

from __future__ import annotations

from pathlib import Path

import torch

from nanoseek import ModelConfig, Transformer, load_model
from nanoseek.data.chat import chat_example, inputs_and_targets
from nanoseek.model.transformer import IGNORE_INDEX
from nanoseek.tokenizer import Tokenizer


def tiny_config(tok: Tokenizer | None = None, preset: str = "tiny", **overrides) -> ModelConfig:
    """The tiny preset (or `preset`, e.g. tiny-v4); with `tok`, its vocabulary size and BOS/EOS ids."""
    if tok is not None:
        overrides = {"vocab_size": tok.vocab_size, "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, **overrides}
    return ModelConfig.from_preset(preset, **overrides)


def tiny_model(tok: Tokenizer | None = None, seed: int = 0, preset: str = "tiny", **overrides) -> Transformer:
    """A freshly initialised tiny model: the same weights for the same seed and config."""
    torch.manual_seed(seed)
    return Transformer(tiny_config(tok, preset, **overrides))


def weights(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a saved model (or checkpoint) dir."""
    return load_model(model_dir).state_dict()


def memorise(model: Transformer, tok: Tokenizer, chats: list[list[dict]], steps: int, lr: float = 1e-2) -> float:
    """Train `model` on the chats' assistant turns, all in one padded batch, for `steps` AdamW steps (so greedy
    decoding then reproduces them); returns the last loss."""
    pairs = [inputs_and_targets(*chat_example(tok, messages)) for messages in chats]
    T = max(len(x) for x, _ in pairs)
    x, y = torch.full((len(pairs), T), tok.pad_id), torch.full((len(pairs), T), IGNORE_INDEX)
    for i, (xi, yi) in enumerate(pairs):
        x[i, : len(xi)], y[i, : len(yi)] = torch.tensor(xi), torch.tensor(yi)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = model.compute_loss(x, y).main
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


def interrupt_after(monkeypatch, loader_class: type, steps: int) -> None:
    """Make `loader_class.next_batch` raise KeyboardInterrupt when asked for batch steps + 1: a run stopped after
    `steps` steps, as Ctrl-C stops it (undo with `monkeypatch.undo()` before resuming)."""
    calls, next_batch = {"n": 0}, loader_class.next_batch

    def interrupted(self):
        calls["n"] += 1
        if calls["n"] > steps:
            raise KeyboardInterrupt
        return next_batch(self)

    monkeypatch.setattr(loader_class, "next_batch", interrupted)


def make_live(model: Transformer) -> Transformer:
    """Parameters that start at 0 made live (sinks, position biases, mHC bases, routing bias) and the indexers'
    weights spread, so every path of a cached step acts and top-k choices are decisive. Draws from torch's RNG."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("sinks", "position_bias", "base", "hc_base", "e_score_correction_bias")):
                p.normal_(0, 0.5)
            elif ".indexer." in name:
                p.normal_(0, 0.3)
    return model


def periodic_tiny() -> Transformer:
    """The tiny preset trained for a few seconds on a periodic sequence: confident argmaxes (a different summation
    order cannot flip a greedy token) and an MTP head that drafts well. Seeded."""
    torch.manual_seed(0)
    m = Transformer(ModelConfig.from_preset("tiny"))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    pattern = torch.tensor([5, 9, 17, 3, 42, 8, 77, 21, 6])
    for _ in range(150):
        offs = torch.randint(0, 9, (8,))
        ids = torch.stack([pattern.roll(-int(o)).repeat(5)[:33] for o in offs])
        loss = m.compute_loss(ids[:, :-1], ids[:, 1:]).total(1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()
