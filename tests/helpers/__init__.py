"""Helpers shared by several test files; the fixtures built from them live in tests/conftest.py."""

from helpers.models import interrupt_after, make_live, memorise, periodic_tiny, tiny_config, tiny_model, weights
from helpers.tokenizers import MIXED, WIDE_TEXTS, builtin_tokenizer, wide_tokenizer

__all__ = [
    "MIXED",
    "WIDE_TEXTS",
    "builtin_tokenizer",
    "interrupt_after",
    "make_live",
    "memorise",
    "periodic_tiny",
    "tiny_config",
    "tiny_model",
    "weights",
    "wide_tokenizer",
]
