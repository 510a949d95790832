"""`nanoseek train`: options -> PretrainJob -> run_pretrain, in one process or under torchrun."""

from __future__ import annotations

import argparse

from nanoseek.cli.common import (
    add_device_option,
    config_from_options,
    parse_set,
    run_distributed,
    run_stage,
    train_summary,
)
from nanoseek.config import ModelConfig
from nanoseek.distributed.data_parallel import DP_MODES
from nanoseek.distributed.process_group import DistEnv
from nanoseek.train.optim import OPTIMIZERS
from nanoseek.train.pretrain import RESUME_OVERRIDABLE, PretrainJob, TrainConfig, run_pretrain
from nanoseek.train.schedule import SCHEDULES


def add_train_options(p: argparse.ArgumentParser, d: TrainConfig | None = None) -> None:
    """The options of TrainConfig (shared with SFT, whose defaults `d` differ). They default to None here, so a
    --resume can tell which were given; `config_from_options` fills in the rest."""
    d = d or TrainConfig()
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, help="optimizer steps")
    g.add_argument("--time-budget", type=float, help="seconds of training; the lr schedule follows wall time")
    g.add_argument("--batch-size", type=int, help=f"sequences per micro-batch (default {d.batch_size})")
    g.add_argument("--seq-len", type=int, help=f"tokens per sequence (default {d.seq_len or 'the longest example'})")
    g.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default 1)")
    g.add_argument("--lr", type=float, help=f"peak learning rate (default {d.lr})")
    g.add_argument("--min-lr-ratio", type=float, help=f"final lr / peak lr (default {d.min_lr_ratio})")
    g.add_argument("--warmup", type=int, help=f"linear warmup steps (default {d.warmup})")
    g.add_argument("--schedule", choices=SCHEDULES, help="cosine (default) or wsd (warmup-stable-decay)")
    g.add_argument("--decay-frac", type=float, help=f"wsd: share of the run spent decaying (default {d.decay_frac})")
    g.add_argument("--weight-decay", type=float, help=f"AdamW weight decay on matrices (default {d.weight_decay})")
    g.add_argument(
        "--optim", choices=OPTIMIZERS, help="adamw (default) or muon (orthogonalised momentum on hidden matrices)"
    )
    g.add_argument("--clip", type=float, help=f"max gradient norm, 0 = off (default {d.clip})")
    g.add_argument("--mtp-weight", type=float, help=f"MTP loss weight lambda (default {d.mtp_weight})")
    g.add_argument("--bias-gamma", type=float, help=f"MoE bias update speed, 0 = off (default {d.bias_gamma})")
    g.add_argument("--aux-alpha", type=float, help="sequence-wise balance loss weight (default: model config's)")
    g.add_argument(
        "--indexer-warmup",
        type=int,
        help="V3.2 / V4 CSA: fit the lightning indexer to the attention by KL, first N dense warm-up steps (default: off)",
    )
    g.add_argument("--seed", type=int, help="seed for init and data order (default 0)")
    g.add_argument("--save-every", type=int, help=f"checkpoint every N steps, 0 = only at the end ({d.save_every})")
    g.add_argument("--keep-last", type=int, help=f"checkpoints to keep, 0 = all (default {d.keep_last})")
    g.add_argument("--eval-every", type=int, help=f"val loss every N steps, 0 = never (default {d.eval_every})")
    g.add_argument("--eval-batches", type=int, help=f"val batches per evaluation (default {d.eval_batches})")
    g.add_argument("--log-every", type=int, help="metrics.jsonl record every N steps (default 1)")
    g.add_argument("--compile", action="store_true", default=None, help="torch.compile the loss computation")
    add_device_option(g, default=None)  # None: on --resume, the run's
    g.add_argument("--peak-flops", type=float, help="peak FLOP/s for MFU (default: 205e9 on CPU, 989e12 on H100)")
    g.add_argument("--ep", type=int, help="under torchrun: split routed experts over this many processes (default 1)")
    g.add_argument(
        "--dp", choices=DP_MODES, help="under torchrun: ddp (default; replicated) or fsdp (FSDP2, sharded weights)"
    )


def _train(args: argparse.Namespace, env: DistEnv) -> int:
    model = {"preset": args.preset, "init_from": args.init_from}
    cfg, model = config_from_options(args, TrainConfig(), RESUME_OVERRIDABLE, env.world_size, **model)
    job = PretrainJob(
        out=args.out,
        data=args.data,
        preset=model.get("preset"),
        overrides=parse_set(args.set, ModelConfig),
        init_from=model.get("init_from"),
        tokenizer=args.tokenizer,
        resume=args.resume,
        train=cfg,
    )
    return run_stage("train", run_pretrain, job, env, train_summary)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="pretrain a model on token shards (resumable)")
    p.add_argument("--preset", help="model preset for a new model: tiny, cpu-small, gpu-small, ...")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a preset's config field, e.g. --set num_hidden_layers=12 (repeatable; config.json names; "
        "booleans true/false/yes/no/1/0)",
    )
    p.add_argument(
        "--init-from", help="start from this HF model dir or run folder instead of a preset (fresh optimizer)"
    )
    p.add_argument("--data", help="data dir from `nanoseek prepare` (on --resume: the run's)")
    p.add_argument("--tokenizer", help="tokenizer dir, if the manifest's recorded path is not reachable")
    p.add_argument("--out", required=True, help="run dir: metrics.jsonl, plots/, checkpoints/step_N/")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    add_train_options(p)
    p.set_defaults(func=lambda args: run_distributed(_train, args))
