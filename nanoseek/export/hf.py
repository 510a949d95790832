"""Export a training checkpoint (a plain HF dir or a distributed DCP one) as a plain HF model directory."""

from __future__ import annotations

from pathlib import Path

from nanoseek.checkpoint.dcp import model_from_checkpoint
from nanoseek.checkpoint.hf import save_model
from nanoseek.tokenizer import Tokenizer


def export_checkpoint(checkpoint_dir: str | Path, out: str | Path) -> Path:
    """Write a trainer checkpoint (distributed or not) as one HF model dir with its tokenizer."""
    checkpoint_dir = Path(checkpoint_dir)
    if not (checkpoint_dir / "config.json").is_file():
        raise FileNotFoundError(f"{checkpoint_dir} is not a checkpoint (no config.json): pass RUN/checkpoints/step_N")
    model = model_from_checkpoint(checkpoint_dir).eval()
    tokenizer = Tokenizer.from_pretrained(checkpoint_dir) if (checkpoint_dir / "tokenizer.json").is_file() else None
    return save_model(model, out, tokenizer=tokenizer)
