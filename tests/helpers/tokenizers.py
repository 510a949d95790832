"""The two tokenizers the tests use, trained in milliseconds from fixed texts (same texts, same vocabulary)."""

from __future__ import annotations

from nanoseek.tasks.problems import builtin_corpus
from nanoseek.tokenizer import ASSISTANT, EOS, THINK_END, THINK_START, USER, Tokenizer, train_tokenizer

# Code-like punctuation and whitespace, CJK, accents, digits, and the special tokens inside text.
MIXED = (
    f"{USER}What is 8+79*9-66? 12345 and 3.14159!\n\n  Indented line:\tTAB, 'quotes' (parens) [x]{{y}}\r\n"
    f"你好世界，ひらがなカタカナ 漢字 Ünïcödé — ½ ²{ASSISTANT}{THINK_START}79*9=711{THINK_END} 653{EOS}"
)
WIDE_TEXTS = [MIXED.replace(USER, "")] * 20 + ["The quick brown fox, 1999.\n"] * 20


def builtin_tokenizer() -> Tokenizer:
    """The tokenizer most tests use: 200 built-in arithmetic and countdown problems each (seed 0), vocab 320."""
    return train_tokenizer(builtin_corpus(200, seed=0), vocab_size=320)


def wide_tokenizer() -> Tokenizer:
    """A tokenizer that has also seen MIXED's scripts and punctuation (vocab 600): for tests of tokenization
    itself and of the GGUF tokenizer, where text beyond the built-in tasks must get real merges."""
    return train_tokenizer(builtin_corpus(300, seed=0) + WIDE_TEXTS, vocab_size=600)
