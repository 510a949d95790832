"""`nanoseek eval`: accuracy of a model on a built-in task or a .jsonl of problems."""

from __future__ import annotations

import argparse
import json

from nanoseek.cli.common import Deprecated, add_device_option
from nanoseek.eval.evaluate import evaluate, format_table
from nanoseek.tasks.sources import FORMATS, load_problems


def _cmd_eval(args: argparse.Namespace) -> None:
    from nanoseek.checkpoint.run import resolve_model_dir
    from nanoseek.infer.engine import Engine
    from nanoseek.train.run import resolve_device

    args.model = resolve_model_dir(args.model)  # a run folder means its latest checkpoint
    problems = load_problems(args.task, args.levels or None, args.n, args.split, args.seed)
    device = resolve_device(args.device)
    engine = Engine.from_pretrained(args.model, device=device, max_batch_size=args.batch_size)
    if engine.tokenizer is None:
        raise FileNotFoundError(f"{args.model} has no tokenizer.json: evaluation needs the model's tokenizer")
    result = evaluate(engine, problems, args.format, args.k, args.samples, args.temperature, args.max_tokens, args.seed)
    result.pop("results")
    if args.json:
        info = {"model": str(args.model), "task": args.task, "format": args.format, "split": args.split}
        print(json.dumps({**info, **result, "k": args.k}))
        return
    how = "accuracy greedy"
    if "sampled_accuracy" in result:
        samples = args.samples or args.k
        how += f"; sampled and pass@{args.k} from {samples} samples per problem at temperature {args.temperature}"
    print(f"{args.model}: {args.task} ({args.split} split), format {args.format}, {how}")
    print(format_table(result, args.k))


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval",
        help="accuracy of a model on arithmetic / countdown / a .jsonl of problems",
        epilog="example: nanoseek eval --model runs/grpo --task arithmetic --format chat --k 8\n"
        "         nanoseek eval --model runs/pt --task arithmetic --levels 2x1 3x12 --n 100 --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model", required=True, help="model directory (with tokenizer.json) or a run folder (its latest checkpoint)"
    )
    p.add_argument("--task", required=True, help="arithmetic, countdown, or FILE.jsonl with {prompt, answer} lines")
    p.add_argument("--levels", nargs="*", help="built-in levels to score (default: all), e.g. 2x1 3x12")
    p.add_argument("--level", nargs="+", dest="levels", action=Deprecated, new="--levels", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=200, help="built-in problems per level (default 200)")
    p.add_argument("--split", default="test", help="built-in split: train, val or test (default test)")
    p.add_argument("--seed", type=int, default=0, help="problem generation and sampling seed")
    p.add_argument("--k", type=int, default=1, help="also report pass@k from sampled completions (default 1: off)")
    p.add_argument("--samples", type=int, help="sampled completions per problem (default k when k > 1)")
    p.add_argument("--temperature", type=float, default=1.0, help="temperature of the sampled completions")
    p.add_argument("--max-tokens", type=int, default=128, help="completion length limit (default 128)")
    p.add_argument(
        "--format",
        default="pretrain",
        choices=FORMATS,
        help="pretrain: raw text prefix (any pretrained model, default); chat: chat template (SFT/GRPO models)",
    )
    p.add_argument("--batch-size", type=int, default=64, help="sequences decoded together (default 64)")
    add_device_option(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.set_defaults(func=_cmd_eval)
