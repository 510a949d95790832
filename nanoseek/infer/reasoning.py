"""Split a reasoning model's output into its thinking part and its answer, as text streams in.

An R1-style completion reads `<think>reasoning</think> answer`. Our chat template lets the model open the think
block itself; DeepSeek-R1's own template ends the prompt with `<think>\\n`, so its output starts inside the block
(`starts_in_think`). The tags themselves belong to neither part, and each part's leading whitespace is dropped,
so the concatenated stream deltas equal the parts of the whole text (`split_reasoning`).
"""

from __future__ import annotations

from nanoseek.tokenizer import THINK_END, THINK_START


def partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of tag (a tag split over two pieces)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ReasoningSplitter:
    """Feed text pieces; get (reasoning, content) deltas back. Only text before the first `</think>` can be
    reasoning, and only when the output opens with `<think>` (or the prompt already did)."""

    def __init__(self, starts_in_think: bool = False) -> None:
        self.starts_in_think = starts_in_think
        self.state = "think" if starts_in_think else "start"  # start -> think -> answer
        self.pending = ""  # text held back: it may be the start of a tag
        self.started = {"reasoning": False, "content": False}  # whether a part has had non-space text

    def feed(self, piece: str, final: bool = False) -> tuple[str, str]:
        """The reasoning and content deltas that `piece` completes (`final`: no more text comes)."""
        self.pending += piece
        out = {"reasoning": "", "content": ""}
        while self.pending:
            if self.state == "start":
                stripped = self.pending.lstrip()
                if stripped.startswith(THINK_START):
                    self.pending, self.state = stripped[len(THINK_START) :], "think"
                    continue
                if not final and (not stripped or THINK_START.startswith(stripped)):
                    break  # still possibly the opening tag
                self.state = "answer"
            if self.state == "think":
                i = self.pending.find(THINK_END)
                if i >= 0:
                    self._emit(out, "reasoning", self.pending[:i])
                    self.pending, self.state = self.pending[i + len(THINK_END) :], "answer"
                    continue
                keep = 0 if final else partial_suffix(self.pending, THINK_END)
                self._emit(out, "reasoning", self.pending[: len(self.pending) - keep])
                self.pending = self.pending[len(self.pending) - keep :]
                break
            self._emit(out, "content", self.pending.replace(THINK_START, "").replace(THINK_END, ""))
            self.pending = ""
        return out["reasoning"], out["content"]

    def _emit(self, out: dict[str, str], part: str, text: str) -> None:
        if not self.started[part]:
            text = text.lstrip()
            self.started[part] = bool(text)
        out[part] += text


def split_reasoning(text: str, starts_in_think: bool = False) -> tuple[str | None, str]:
    """(reasoning or None when the model did not think, content) of a whole completion."""
    splitter = ReasoningSplitter(starts_in_think)
    reasoning, content = splitter.feed(text, final=True)
    thought = starts_in_think or text.lstrip().startswith(THINK_START)
    return (reasoning if thought else None), content


def prompt_opens_think(prompt: str) -> bool:
    """Whether a rendered chat prompt already opened the think block (DeepSeek-R1's template does)."""
    return prompt.rstrip().endswith(THINK_START)


def close_think(prompt: str) -> str:
    """A rendered chat prompt whose reply skips thinking: it ends with a closed, empty think block. For templates
    that do not know the `thinking` switch (ours before it, R1's, which opens `<think>` itself)."""
    end = prompt.rstrip()
    if end.endswith(THINK_END):
        return prompt
    return end + THINK_END if end.endswith(THINK_START) else prompt + THINK_START + THINK_END
