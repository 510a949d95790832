"""Terminal front-ends on the Engine: `nanoseek generate` (prompts -> completions) and `nanoseek chat`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from nanoseek.cli.common import add_device_option
from nanoseek.infer.engine import Engine
from nanoseek.infer.reasoning import partial_suffix
from nanoseek.infer.sampling import SamplingParams

DIM, RESET = "\x1b[2m", "\x1b[0m"


def add_parser(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("generate", help="complete prompts with a model directory")
    g.add_argument("--model", required=True, help="model directory (HF format, with tokenizer.json)")
    g.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    g.add_argument("--prompt-file", help="a text file with one prompt per line")
    g.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template as a user turn")
    g.add_argument("--json", action="store_true", help="one JSON object per prompt with text and token_ids")
    _sampling_options(g)
    g.set_defaults(func=run_generate)

    c = sub.add_parser("chat", help="interactive chat in the terminal (/reset, /exit)")
    c.add_argument("--model", required=True, help="model directory (HF format, with tokenizer.json)")
    c.add_argument("--system", default=None, help="a system prompt")
    c.add_argument("--hide-think", action="store_true", help="do not print the <think> part")
    _sampling_options(c, temperature=0.7, max_tokens=512)
    c.set_defaults(func=run_chat)


def _sampling_options(p: argparse.ArgumentParser, temperature: float = 0.0, max_tokens: int = 128) -> None:
    p.add_argument("--max-tokens", type=int, default=max_tokens)
    p.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--speculative", action="store_true", help="MTP self-speculative decoding")
    p.add_argument(
        "--compile", action="store_true", help="torch.compile the decode step (faster steps, ~5-30 s per new shape)"
    )
    add_device_option(p)


def _params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=list(args.stop),
    )


def _engine(args: argparse.Namespace) -> Engine:
    from nanoseek.checkpoint.run import resolve_model_dir
    from nanoseek.train.run import resolve_device

    args.model = resolve_model_dir(args.model)  # a run folder means its latest checkpoint
    if not (Path(args.model) / "tokenizer.json").exists():
        raise FileNotFoundError(f"{args.model} has no tokenizer.json: text generation needs the model's tokenizer")
    device = resolve_device(args.device)
    return Engine.from_pretrained(args.model, device=device, speculative=args.speculative, compile=args.compile)


def run_generate(args: argparse.Namespace) -> int:
    prompts = list(args.prompt)
    if args.prompt_file:
        lines = Path(args.prompt_file).read_text(encoding="utf-8").splitlines()
        prompts += [line for line in lines if line.strip()]
    if not prompts:
        raise ValueError("no prompt given: use --prompt TEXT or --prompt-file FILE")
    engine = _engine(args)
    tok = engine.tokenizer
    inputs = (
        [tok.encode_chat([{"role": "user", "content": p}], add_generation_prompt=True) for p in prompts]
        if args.chat
        else prompts
    )
    for prompt, out in zip(prompts, engine.generate(inputs, _params(args))):
        if args.json:
            record = {
                "prompt": prompt,
                "text": out.text,
                "token_ids": out.token_ids,
                "finish_reason": out.finish_reason,
            }
            print(json.dumps(record, ensure_ascii=False))
        else:
            print(out.text)
    if engine.acceptance_rate is not None:
        drafted, accepted = engine.stats["drafted"], engine.stats["accepted"]
        print(f"MTP speculation: {accepted}/{drafted} drafts accepted ({engine.acceptance_rate:.1%})", file=sys.stderr)
    return 0


def run_chat(args: argparse.Namespace) -> int:
    engine = _engine(args)
    tok = engine.tokenizer
    params = _params(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    print("nanoseek chat: /reset clears the conversation, /exit quits.", file=sys.stderr)
    while True:
        try:
            line = input("> ").strip()
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            history = []
            print("(conversation cleared)", file=sys.stderr)
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        ids, dropped = fit_history(tok, system, history, engine.max_len - params.max_tokens)
        if dropped:
            history = history[dropped:]
            print(f"(dropped {dropped} old message(s) to fit the {engine.max_len}-token context)", file=sys.stderr)
        reply = ""
        printer = ThinkPrinter(hide=args.hide_think)
        for piece in engine.stream(ids, params):
            reply += piece
            printer.write(piece)
        printer.close()
        history.append({"role": "assistant", "content": reply})


def fit_history(tok, system: list[dict], history: list[dict], budget: int) -> tuple[list[int], int]:
    """Token ids of the conversation with a generation prompt, dropping the oldest turns until it fits in
    `budget` tokens. Returns (ids, number of messages dropped); raises if even the last message is too long."""
    for dropped in range(len(history)):
        ids = tok.encode_chat(system + history[dropped:], add_generation_prompt=True)
        if len(ids) <= budget and history[dropped]["role"] == "user":
            return ids, dropped
    raise ValueError(f"the last message alone does not fit in the context ({budget} tokens); shorten it")


class ThinkPrinter:
    """Streams text to the terminal, showing the <think>...</think> part dimmed (or not at all)."""

    def __init__(self, hide: bool = False, out=None) -> None:
        self.hide, self.out, self.in_think, self.pending = hide, out or sys.stdout, False, ""

    def write(self, piece: str) -> None:
        self.pending += piece
        while self.pending:
            tag = "</think>" if self.in_think else "<think>"
            i = self.pending.find(tag)
            if i < 0:
                keep = partial_suffix(self.pending, tag)  # a tag may arrive split over two pieces
                self._emit(self.pending[: len(self.pending) - keep])
                self.pending = self.pending[len(self.pending) - keep :]
                return
            self._emit(self.pending[:i])
            self.pending = self.pending[i + len(tag) :]
            self.in_think = not self.in_think
            if not self.hide:
                self.out.write(DIM + "<think>" if self.in_think else "</think>" + RESET)

    def _emit(self, text: str) -> None:
        if text and not (self.hide and self.in_think):
            self.out.write(text)
            self.out.flush()

    def close(self) -> None:
        self._emit(self.pending)
        self.out.write((RESET if self.in_think else "") + "\n")
        self.out.flush()
