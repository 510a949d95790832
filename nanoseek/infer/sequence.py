"""A request's state while the engine runs it (`Sequence`), what it returns (`Completion`), and its text.

The text grows by each new token's bytes alone: an incremental UTF-8 decoder keeps the first bytes of a character
split over two tokens until the rest arrive, so a step decodes one token, not the whole output, and the text never
shows half a character. For nanoseek's byte-level BPE this is exactly `tokenizer.decode(output_ids)`.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass, field

import torch

from nanoseek.infer.sampling import SamplingParams
from nanoseek.infer.structured import Constraint


@dataclass
class Completion:
    """The result of one request."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string), "length" (max_tokens or context full) or "abort"
    prompt_tokens: int
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None


@dataclass(eq=False)  # identity semantics: sequences are dict keys
class Sequence:
    id: int
    prompt_ids: list[int]
    params: SamplingParams
    slot: int = -1
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[int, float]] = field(default_factory=list)
    finish_reason: str | None = None
    cached_tokens: int = 0  # prompt tokens whose latents came from the prefix cache
    text: str = ""  # the decoded output (cut before a stop string); complete characters only until finished
    draft: int | None = None  # speculative: MTP's guess for the token after output_ids[-1]
    draft_probs: torch.Tensor | None = None
    constraint: Constraint | None = None  # structured output: the grammar its tokens must follow
    utf8: codecs.IncrementalDecoder = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def add_text(self, token_bytes: bytes, stops: list[str]) -> bool:
        """Append a token's bytes to `text`; if that completes a stop string, cut the text before it and return
        True. Only the new end can hold a stop string, so only it is searched."""
        old = len(self.text)
        self.text += self.utf8.decode(token_bytes)
        for stop in stops:
            cut = self.text.find(stop, max(0, old - len(stop) + 1))
            if cut >= 0:
                self.text = self.text[:cut]
                return True
        return False

    def finish_text(self) -> None:
        """End of output: bytes of an unfinished character become U+FFFD, as a whole-output decode shows them."""
        self.text += self.utf8.decode(b"", final=True)

    def completion(self) -> Completion:
        return Completion(
            text=self.text,
            token_ids=list(self.output_ids),
            finish_reason=self.finish_reason or "length",
            prompt_tokens=len(self.prompt_ids),
            logprobs=self.logprobs if self.params.wants_logprobs else None,
            top_logprobs=self.top_logprobs if self.params.top_logprobs else None,
        )
