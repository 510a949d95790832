"""`nanoseek tokenizer train|info`."""

from __future__ import annotations

import argparse
from collections.abc import Iterable

from nanoseek.cli.common import add_builtin_option
from nanoseek.tokenizer import DEFAULT_VOCAB_SIZE, Tokenizer, train_tokenizer


def _input_texts(paths: list[str]) -> Iterable[str]:
    from nanoseek.data.shards import iter_documents  # lazy: data imports the tokenizer

    for doc, _ in iter_documents(paths):
        yield doc if isinstance(doc, str) else "\n".join(m["content"] for m in doc)


def _cmd_train(args: argparse.Namespace) -> None:
    if not args.input and args.builtin is None:
        raise ValueError("nothing to train on: pass --input PATH... and/or --builtin [TASK ...]")
    texts: list[Iterable[str]] = []
    if args.input:
        texts.append(_input_texts(args.input))
    if args.builtin is not None:
        from nanoseek.tasks.problems import builtin_corpus

        texts.append(builtin_corpus(n=args.n, seed=args.seed, tasks=tuple(args.builtin)))
    tok = train_tokenizer((t for it in texts for t in it), args.vocab_size)
    tok.save(args.out)
    print(f"saved tokenizer ({tok.vocab_size} tokens, hash {tok.hash()[:12]}) to {args.out}")


def _cmd_info(args: argparse.Namespace) -> None:
    tok = Tokenizer.from_pretrained(args.path)
    print(f"vocab size: {tok.vocab_size}")
    print(f"hash: {tok.hash()}")
    for name in ("bos", "eos", "pad", "user", "assistant", "think_start", "think_end"):
        i = getattr(tok, f"{name}_id")
        print(f"{name:12s} {i!s:>7}  {tok.id_to_token(i) if i is not None else '-'}")
    messages = [{"role": "user", "content": args.sample}]
    ids = tok.encode_chat(messages, add_generation_prompt=True)
    print(f"sample: {tok.apply_chat_template(messages, add_generation_prompt=True)!r}")
    print(f"ids ({len(ids)}): {ids}")
    print(f"tokens: {[tok.decode([i]) for i in ids]}")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("tokenizer", help="train or inspect a byte-level BPE tokenizer")
    sub = p.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    t = sub.add_parser("train", help="train a tokenizer and save tokenizer.json + tokenizer_config.json")
    t.add_argument("--out", required=True, help="output directory")
    t.add_argument("--input", nargs="*", default=[], help=".txt / .jsonl files or directories")
    add_builtin_option(t, "also train on")
    t.add_argument("--n", type=int, default=20000, help="built-in problems per task (default 20000)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    t.set_defaults(func=_cmd_train)
    i = sub.add_parser("info", help="print vocab size, special tokens and a sample encoding")
    i.add_argument("path", help="tokenizer directory or tokenizer.json")
    i.add_argument("--sample", default="What is 8+79*9-66? 你好, world!")
    i.set_defaults(func=_cmd_info)
