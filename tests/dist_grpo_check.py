"""torchrun worker for tests/test_dist.py: GRPO under DDP. Writes OUT/rank{R}.json.

1. One policy update with each rank holding its own rollouts equals a one-process update over all of them
   (gradients averaged with token-level normalisation over every rank's completion tokens).
2. A short `grpo()` run with a trivially learnable reward (a completion starting with a digit) runs on both ranks
   and leaves the same policy on each.

    torchrun --standalone --nproc-per-node 2 tests/dist_grpo_check.py TOKENIZER_DIR OUT
"""

import copy
import json
import sys
from pathlib import Path

import torch

from nanoseek import ModelConfig, Transformer
from nanoseek.distributed.data_parallel import Parallel
from nanoseek.distributed.process_group import all_reduce, init_distributed, shutdown
from nanoseek.tasks.sources import ListPrompts
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.grpo import GRPOConfig, grpo, policy_update
from nanoseek.train.optim import build_optimizer
from nanoseek.train.rollouts import Rollout

tok = Tokenizer.from_pretrained(sys.argv[1])
out = Path(sys.argv[2])
env = init_distributed("cpu")
config = ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
torch.manual_seed(0)
model = Transformer(config)
single = copy.deepcopy(model)

g = torch.Generator().manual_seed(0)
rollouts, advantages = [], []
for i in range(6):  # different completion lengths: ranks hold different token counts
    prompt = tok.encode_chat([{"role": "user", "content": f"What is {i}+1?"}], add_generation_prompt=True)
    completion = torch.randint(3, tok.vocab_size, (2 + 3 * i,), generator=g).tolist() + [tok.eos_id]
    rollouts.append(Rollout({"prompt": "", "answer": "1"}, prompt, completion, "", False))
    advantages.append([1.0, -1.0, 0.5, -0.5, 2.0, -2.0][i])
cfg = GRPOConfig(steps=1, mu=2, micro_batch=2, clip_high=0.1, clip_low=0.1)
mine = [0, 1, 5] if env.rank == 0 else [2, 3, 4]  # 2 + 5 + 17 tokens vs 8 + 11 + 14

ref_stats = policy_update(single, build_optimizer(single, 1e-3, 0.0), rollouts, advantages, cfg, tok.pad_id)
par = Parallel(model, env, "ddp", mtp=False)
stats = policy_update(
    model, build_optimizer(model, 1e-3, 0.0), [rollouts[i] for i in mine], [advantages[i] for i in mine], cfg,
    tok.pad_id, par=par,
)  # fmt: skip
result = {
    "update_max_diff": max((a - b).abs().max().item() for a, b in zip(model.parameters(), single.parameters())),
    "loss": [stats["loss"], ref_stats["loss"]],
    "tokens": [stats["tokens"], ref_stats["tokens"]],
    "grad_norm": [stats["grad_norm"], ref_stats["grad_norm"]],
}

examples = [{"prompt": f"What is {i}+{i}?", "answer": str(2 * i)} for i in range(8)]
run_cfg = GRPOConfig(
    steps=4, prompts_per_step=4, group_size=4, max_new_tokens=1, lr=3e-2, warmup=0, eval_every=0, save_every=0,
    zero_truncated=False,
)  # fmt: skip
torch.manual_seed(1)
policy = Transformer(config)
grpo(run_cfg, policy, tok, ListPrompts(examples, 0), out / "run", [lambda p, c, e: float(c[:1].isdigit())], env=env)
flat = torch.cat([p.detach().flatten() for p in policy.parameters()])
total = all_reduce(flat.clone(), env)
result["ranks_differ_by"] = (total / 2 - flat).abs().max().item()
(out / f"rank{env.rank}.json").write_text(json.dumps(result))
shutdown()
