"""`nanoseek grpo`: options -> GRPOJob -> run_grpo, in one process or under torchrun."""

from __future__ import annotations

import argparse
from typing import Any

from nanoseek.cli.common import add_device_option, config_from_options, run_distributed, run_stage
from nanoseek.distributed.process_group import DistEnv
from nanoseek.train.grpo import RESUME_OVERRIDABLE, GRPOConfig, GRPOJob, run_grpo


def _grpo(args: argparse.Namespace, env: DistEnv) -> int:
    cfg, more = config_from_options(args, GRPOConfig(), RESUME_OVERRIDABLE, eval_split=args.eval_split)
    eval_split = more.get("eval_split", "val")
    # model, task, levels and eval_data may be None: the library takes the run's on --resume
    job = GRPOJob(args.model, args.task, args.out, args.levels, eval_split, args.eval_data, args.resume, cfg)
    return run_stage("grpo", run_grpo, job, env, _summary)


def _summary(s: dict[str, Any]) -> str:
    acc = f", eval accuracy {s['eval_accuracy']:.3f}" if "eval_accuracy" in s else ""
    return (
        f"done: step {s['step']} ({s['elapsed_s']:.1f} s){acc}; checkpoint {s['checkpoint']}; "
        f"metrics and plots in {s['run_dir']}"
    )


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    d = GRPOConfig()
    p = subparsers.add_parser("grpo", help="GRPO reinforcement learning with verifiable rewards (resumable)")
    p.add_argument("--model", help="policy to start from (HF model dir with tokenizer, or a run folder)")
    p.add_argument("--task", help="arithmetic | countdown | a .jsonl of {prompt, answer}")
    p.add_argument("--out", required=True, help="run dir: metrics.jsonl, plots/, checkpoints/step_N/")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--levels", nargs="*", help="built-in task levels to train on (default: all)")
    p.add_argument("--eval-split", help="held-out split for periodic evaluation (val | test; default val)")
    p.add_argument("--eval-data", help="a .jsonl of {prompt, answer} for evaluation (with a .jsonl --task)")
    g = p.add_argument_group("GRPO (defaults: grpo-recipe.md sec. 0)")
    g.add_argument("--steps", type=int, help="GRPO steps (rollout + update)")
    g.add_argument("--time-budget", type=float, help="seconds of training")
    g.add_argument("--prompts-per-step", type=int, help=f"prompts per step (default {d.prompts_per_step})")
    g.add_argument("--group-size", type=int, help=f"G, samples per prompt (default {d.group_size})")
    g.add_argument("--temperature", type=float, help=f"sampling temperature (default {d.temperature})")
    g.add_argument("--max-new-tokens", type=int, help=f"completion length cap (default {d.max_new_tokens})")
    g.add_argument("--lr", type=float, help=f"AdamW learning rate, constant after warmup (default {d.lr})")
    g.add_argument("--warmup", type=int, help=f"linear warmup steps (default {d.warmup})")
    g.add_argument("--weight-decay", type=float, help=f"AdamW weight decay (default {d.weight_decay})")
    g.add_argument("--optim", choices=("adamw", "muon"), help="adamw (default) or muon")
    g.add_argument("--max-grad-norm", type=float, help=f"gradient clipping (default {d.max_grad_norm})")
    g.add_argument("--beta", type=float, help="k3 KL coefficient; 0 = no reference model (default 0)")
    g.add_argument("--clip-low", type=float, help=f"eps_low (default {d.clip_low})")
    g.add_argument("--clip-high", type=float, help=f"eps_high, clip-higher (default {d.clip_high})")
    g.add_argument("--mu", type=int, help="optimisation passes per rollout batch (default 1)")
    g.add_argument("--no-std-scaling", dest="std_scaling", action="store_false", default=None, help="Dr. GRPO")
    g.add_argument("--dynamic-sampling", action="store_true", default=None, help="resample zero-variance groups")
    g.add_argument("--max-rounds", type=int, help=f"dynamic sampling: rollout rounds per step (default {d.max_rounds})")
    g.add_argument("--format-reward", type=float, help="weight of the <think>...</think> answer format reward (0)")
    g.add_argument(
        "--reward-truncated",
        dest="zero_truncated",
        action="store_false",
        default=None,
        help="score truncated completions too (default: they get 0)",
    )
    g.add_argument("--length-penalty", type=int, nargs=2, metavar=("MAX", "CACHE"), help="DAPO overlong penalty")
    g.add_argument("--bias-gamma", type=float, help="MoE bias update speed during GRPO (default 0 = off)")
    g.add_argument("--micro-batch", type=int, help=f"sequences per forward/backward (default {d.micro_batch})")
    g.add_argument("--eval-every", type=int, help=f"held-out greedy eval every N steps, 0 = never ({d.eval_every})")
    g.add_argument("--eval-n", type=int, help=f"held-out problems per evaluation (default {d.eval_n})")
    g.add_argument("--seed", type=int, help="seed for prompts and rollouts (default 0)")
    g.add_argument("--save-every", type=int, help=f"checkpoint every N steps, 0 = only at the end ({d.save_every})")
    g.add_argument("--keep-last", type=int, help=f"checkpoints to keep (default {d.keep_last})")
    g.add_argument("--log-every", type=int, help="metrics record every N steps (default 1)")
    add_device_option(g, default=None)  # None: on --resume, the run's
    p.set_defaults(func=lambda args: run_distributed(_grpo, args))
