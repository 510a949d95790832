"""Incremental detokenisation: a long generation costs the tokenizer one lookup per token, never a re-decode of the
output, and ends with the text a whole decode gives, multi-byte characters split over tokens included."""

from __future__ import annotations

import codecs
import threading

import torch
from helpers import MIXED, tiny_model

from nanoseek.infer.engine import Engine
from nanoseek.infer.engine_loop import EngineLoop, Update
from nanoseek.infer.sampling import SamplingParams
from nanoseek.infer.server.openai import Choice
from nanoseek.tokenizer import Tokenizer

N = 4000  # output tokens


class CountingTokenizer:
    """The tokenizer, counting what the engine asks of it."""

    def __init__(self, tok: Tokenizer) -> None:
        self.tok, self.decoded_ids, self.lookups = tok, 0, 0

    def __getattr__(self, name: str):
        return getattr(self.tok, name)

    def decode(self, ids, **kwargs) -> str:
        ids = list(ids)
        self.decoded_ids += len(ids)
        return self.tok.decode(ids, **kwargs)

    def token_bytes(self, i: int) -> bytes:
        self.lookups += 1
        return self.tok.token_bytes(i)


class CountingUTF8:
    """A sequence's incremental UTF-8 decoder, recording the bytes each call is given."""

    def __init__(self) -> None:
        self.inner, self.calls = codecs.getincrementaldecoder("utf-8")("replace"), []

    def decode(self, data: bytes, final: bool = False) -> str:
        self.calls.append(len(data))
        return self.inner.decode(data, final)


class ScriptedRunner:
    """Stands in for the forward passes: its logits make greedy sampling pick `script[k]` as a sequence's k-th
    output token, so the engine's own bookkeeping is all that runs."""

    compiled = False

    def __init__(self, script: list[int], vocab_size: int) -> None:
        self.script, self.vocab_size, self.k = script, vocab_size, {}

    def _logits(self, slots: list[int]) -> torch.Tensor:
        logits = torch.full((len(slots), 1, self.vocab_size), -1e9)
        for row, s in enumerate(slots):
            logits[row, 0, self.script[self.k[s]]] = 0.0
            self.k[s] += 1
        return logits

    def prefill(self, prompt: list[int], slot: torch.Tensor, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        self.k[int(slot)] = 0
        return self._logits([int(slot)]), torch.zeros(1, len(prompt), 1)

    def forward(self, slots: list[int], tokens: list[list[int]]) -> tuple[torch.Tensor, None, torch.Tensor]:
        return self._logits(slots), None, torch.tensor(slots)


def _script(tok: Tokenizer) -> list[int]:
    """N tokens of mixed-script text (CJK, accents, tags) interleaved with random ids (stray UTF-8 bytes)."""
    g = torch.Generator().manual_seed(0)
    ids: list[int] = []
    while len(ids) < N:
        ids += tok.encode(MIXED) + torch.randint(0, tok.vocab_size, (20,), generator=g).tolist()
    return ids[:N]


def _engine(tok: Tokenizer, script: list[int]) -> tuple[Engine, CountingTokenizer]:
    counting = CountingTokenizer(tok)
    e = Engine(tiny_model(tok, max_position_embeddings=N + 16), counting, max_batch_size=2, max_len=N + 16)
    e.runner = ScriptedRunner(script, tok.vocab_size)
    return e, counting


def _params(**kwargs) -> SamplingParams:
    return SamplingParams(max_tokens=N, temperature=0, ignore_eos=True, **kwargs)


def test_the_script_splits_characters_over_tokens(wide_tok):
    script = _script(wide_tok)
    halves = [i for i in script if not _is_utf8(wide_tok.token_bytes(i))]
    assert len(halves) > 100 and "你好世界" in wide_tok.decode(script)


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_a_4000_token_generation_decodes_each_token_once_and_equals_a_whole_decode(wide_tok):
    """Linear: the tokenizer is asked for each token's bytes once and never decodes the output; each step feeds
    the UTF-8 decoder that token's bytes alone (the 4,000th token costs what the first did)."""
    script = _script(wide_tok)
    e, counting = _engine(wide_tok, script)
    sid = e.add_request([1, 2], _params())
    seq = e.waiting[-1]
    seq.utf8 = utf8 = CountingUTF8()
    while not seq.done:
        e.step()
    assert seq.output_ids == script and seq.finish_reason == "length"
    assert counting.decoded_ids == 0 and counting.lookups == N
    longest = max(len(wide_tok.token_bytes(i)) for i in range(wide_tok.vocab_size))
    assert len(utf8.calls) == N + 1 and max(utf8.calls) <= longest  # N tokens, then the final flush
    assert sum(utf8.calls) == sum(len(wide_tok.token_bytes(i)) for i in script)
    assert seq.text == wide_tok.decode(script) and seq.id == sid


def test_a_stop_string_late_in_a_long_output_cuts_there(wide_tok):
    script = _script(wide_tok)
    whole = wide_tok.decode(script)
    stop = whole[-40:-30]  # found on the new text near the end, possibly split over tokens
    e, counting = _engine(wide_tok, script)
    out = e.generate([1, 2], _params(stop=[stop]))[0]
    assert out.finish_reason == "stop" and out.text == whole[: whole.find(stop)]
    assert counting.decoded_ids == 0 and counting.lookups == len(out.token_ids)


def test_streams_of_a_long_output_join_to_the_whole_decode(wide_tok):
    """`Engine.stream` and the server's path (engine loop updates -> `Choice.advance` deltas) release every
    character once, and what they release joins to the whole decode."""
    script = _script(wide_tok)
    whole = wide_tok.decode(script)
    e, counting = _engine(wide_tok, script)
    pieces = list(e.stream([1, 2], _params()))
    assert "".join(pieces) == whole and all(pieces) and counting.decoded_ids == 0

    e, counting = _engine(wide_tok, script)
    updates: list[Update] = []
    finished = threading.Event()

    def sink(key: int, up: Update) -> None:
        updates.append(up)
        if up.finish_reason is not None:
            finished.set()

    loop = EngineLoop(e)
    loop.start()
    try:
        loop.submit([[1, 2]], [_params(stop=["never in the text"])], sink)
        assert finished.wait(600), "the engine loop did not finish the request"
    finally:
        loop.stop()
    choice = Choice(0, None, ["never in the text"])
    deltas = [choice.advance(up) for up in updates]
    assert "".join(deltas) == whole and choice.ids == script and counting.decoded_ids == 0
