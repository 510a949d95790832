"""Same data, same recipe, same seconds: `nanoseek train` vs transformers' DeepseekV3 in a plain loop, one process.

    python -m benchmarks.pretrain_race --data DATA_DIR --seconds 300 --out runs/race

Both start from the same weights (nanoseek's init, saved and loaded by `AutoModelForCausalLM`), read the same
batches, and use the same AdamW, clip, warmup and schedule (over wall time). transformers' model has no MTP and
its loop no bias update, so nanoseek runs with --mtp-weight 0 and its bias update (part of the recipe).
Each trained model is then scored greedily on held-out `test` problems of every arithmetic level (pretraining
format, the same problems for both). Prints one JSON line; run it alone on the machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks import run_command
from nanoseek import ModelConfig, Transformer, load_model, save_model
from nanoseek.checkpoint.run import latest_checkpoint
from nanoseek.data.shards import TokenLoader, find_tokenizer, load_manifest
from nanoseek.eval.evaluate import evaluate
from nanoseek.infer.engine import Engine
from nanoseek.tasks.problems import LEVELS, generate
from nanoseek.train.optim import build_optimizer
from nanoseek.train.schedule import lr_at


def train_transformers(model_dir: Path, data: str, out: Path, args: argparse.Namespace) -> dict:
    """The reference loop: forward, cross-entropy, backward, clip, AdamW, for args.seconds."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train()
    opt = build_optimizer(model, args.lr, 0.1)
    loader = TokenLoader(data, "train", args.batch_size, args.seq_len, seed=0)
    step, t0, losses = 0, time.perf_counter(), []
    while (elapsed := time.perf_counter() - t0) < args.seconds:
        lr = lr_at(step, elapsed / args.seconds, args.lr, args.schedule, 50, 0.1, 0.2)
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = loader.next_batch()
        logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        losses.append(loss.item())
    model.save_pretrained(out)
    tokens = step * args.batch_size * args.seq_len
    return {"steps": step, "tokens": tokens, "tokens_per_s": round(tokens / args.seconds), "loss": _tail(losses)}


def _tail(losses: list[float], n: int = 50) -> float:
    return round(sum(losses[-n:]) / max(len(losses[-n:]), 1), 4)


def score(model_dir: Path, tokenizer, n: int) -> dict:
    model = load_model(model_dir, dtype=torch.float32)
    engine = Engine(model, tokenizer, max_batch_size=64)
    problems = [p for lv in LEVELS["arithmetic"] for p in generate("arithmetic", n, seed=0, split="test", level=lv)]
    r = evaluate(engine, problems, fmt="pretrain", max_tokens=96)
    return {lv: round(100 * s["accuracy"], 1) for lv, s in r["levels"].items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="`nanoseek prepare --builtin arithmetic` output")
    p.add_argument("--out", default="runs/race")
    p.add_argument("--seconds", type=float, default=300)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=4e-3)
    p.add_argument("--schedule", default="wsd")
    p.add_argument("--n", type=int, default=200, help="test problems per level (200)")
    args = p.parse_args()
    out = Path(args.out)
    manifest = load_manifest(args.data)
    tokenizer = find_tokenizer(Path(args.data), manifest)
    torch.manual_seed(0)
    init = Transformer(ModelConfig.from_preset("cpu-small", vocab_size=manifest["vocab_size"]))
    save_model(init, out / "init", tokenizer=tokenizer)

    result: dict = {"bench": "pretrain_race", "seconds": args.seconds, "batch": [args.batch_size, args.seq_len]}
    hf = train_transformers(out / "init", args.data, out / "transformers", args)
    result["transformers"] = {**hf, "accuracy": score(out / "transformers", tokenizer, args.n)}

    recipe = ["--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--lr", str(args.lr)]
    run_command("nanoseek train", ["train", "--init-from", str(out / "init"), "--data", args.data, "--out", str(out / "nanoseek"), "--time-budget", str(args.seconds), "--schedule", args.schedule, "--mtp-weight", "0", "--eval-every", "0", "--save-every", "0", *recipe])  # fmt: skip
    rows = [json.loads(line) for line in (out / "nanoseek" / "metrics.jsonl").read_text().splitlines()]
    tokens = rows[-1]["tokens"]
    result["nanoseek"] = {
        "steps": rows[-1]["step"],
        "tokens": tokens,
        "tokens_per_s": round(tokens / args.seconds),
        "loss": _tail([r["loss"] for r in rows]),
        "accuracy": score(latest_checkpoint(out / "nanoseek"), tokenizer, args.n),
    }
    result.update(
        torch=torch.__version__,
        machine=f"{platform.machine()} {torch.get_num_threads()} threads",
        date=time.strftime("%Y-%m-%d"),
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
