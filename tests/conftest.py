"""Fixtures shared across test files: built once per session, read-only (copy one before changing it)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import builtin_tokenizer, tiny_model, wide_tokenizer
from serve_util import memorised_model

from nanoseek import save_model
from nanoseek.data.shards import prepare
from nanoseek.tokenizer import Tokenizer

# The engine's default fast path compiles its decode graphs the first time a model config is served (minutes on
# CI's two cores, which cache nothing between runs): tests, and the servers they start, decode eagerly unless
# they ask for it (tests/test_fast_decode.py)
os.environ.setdefault("NANOSEEK_FAST_DECODE", "0")


@pytest.fixture(scope="session")
def tok() -> Tokenizer:
    """The test tokenizer: BPE on 200 built-in arithmetic + countdown problems (seed 0), vocab 320."""
    return builtin_tokenizer()


@pytest.fixture(scope="session")
def tok_dir(tok, tmp_path_factory) -> Path:
    """`tok` saved (tokenizer.json + tokenizer_config.json)."""
    d = tmp_path_factory.mktemp("tok")
    tok.save(d)
    return d


@pytest.fixture(scope="session")
def wide_tok() -> Tokenizer:
    """A tokenizer that has also seen CJK, accents, punctuation and special tokens in text, vocab 600."""
    return wide_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tok, tmp_path_factory) -> Path:
    """An untrained tiny-preset model (seed 0) sized for `tok`, saved with it by save_model."""
    d = tmp_path_factory.mktemp("tiny") / "model"
    save_model(tiny_model(tok), d, tokenizer=tok)
    return d


@pytest.fixture(scope="session")
def builtin_data(tok, tok_dir, tmp_path_factory) -> Path:
    """Token shards of 400 arithmetic + 400 countdown problems (seed 0) made with `tok` (recorded as tok_dir)."""
    d = tmp_path_factory.mktemp("data") / "builtin"
    prepare(tok, d, builtin=["arithmetic", "countdown"], n=400, seed=0, tokenizer_path=str(tok_dir))
    return d


@pytest.fixture(scope="session")
def memorised_dir(tmp_path_factory) -> Path:
    """A tiny model dir (named tiny-r1) that has memorised serve_util.KNOWN's `<think>` answers: trained once."""
    d = tmp_path_factory.mktemp("served") / "tiny-r1"
    memorised_model(d)
    return d
