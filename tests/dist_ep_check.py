"""torchrun worker for tests/test_dist.py: expert parallelism's forward and gradients equal the single-process
model's. Each rank feeds its own batch to a plain copy and to an EP copy of the same tiny model; writes
OUT/rank{R}.json with the largest differences.

    torchrun --standalone --nproc-per-node 2 tests/dist_ep_check.py OUT
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from nanoseek import ModelConfig, Transformer
from nanoseek.distributed.expert_parallel import ExpertParallel, apply_expert_parallel

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
config = ModelConfig.from_preset("tiny", aux_loss_alpha=0.0)
reference = Transformer(config)
model = Transformer(config)
model.load_state_dict(reference.state_dict())
apply_expert_parallel(model, init_device_mesh("cpu", (world,), mesh_dim_names=("ep",)))


def compare(reference: Transformer, model: Transformer, seed: int) -> dict[str, float]:
    """Largest differences of loss, logits, replicated gradients and expert gradients on this rank's batch."""
    for m in (reference, model):
        m.zero_grad(set_to_none=True)
    g = torch.Generator().manual_seed(seed + rank)  # each rank its own tokens, so experts get remote rows
    x = torch.randint(0, config.vocab_size, (3, 16), generator=g)
    y = torch.randint(0, config.vocab_size, (3, 16), generator=g)
    ref_loss = reference.compute_loss(x, y).total()
    ref_loss.backward()
    loss = model.compute_loss(x, y).total()
    loss.backward()
    errors = {"loss": (loss - ref_loss).abs().item(), "logits": 0.0, "grads": 0.0, "expert_grads": 0.0}
    with torch.no_grad():
        errors["logits"] = (model(x) - reference(x)).abs().max().item()  # the few-token inference path
    ref_params = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        ref = ref_params[name]
        if not name.endswith(("experts.w13", "experts.w2")):
            errors["grads"] = max(errors["grads"], (p.grad - ref.grad).abs().max().item())
            continue
        # an expert's gradient collects every rank's tokens: compare with the sum of the ranks' full gradients
        total = ref.grad.clone()
        dist.all_reduce(total)
        local = p.grad.to_local()
        n = local.shape[0]
        err = (local - total[rank * n : (rank + 1) * n]).abs().max().item()
        errors["expert_grads"] = max(errors["expert_grads"], err)
    return errors


errors = compare(reference, model, seed=100)
# every token routed into group 0 (experts 0-3, all on rank 0): rank 1 receives no rows at all
for m in (*reference.moe_layers(), *model.moe_layers()):
    m.gate.e_score_correction_bias[:4] = 10.0
errors["skewed"] = compare(reference, model, seed=200)
errors["local_experts"] = [m.w13.to_local().shape[0] for m in model.modules() if isinstance(m, ExpertParallel)]
Path(sys.argv[1], f"rank{rank}.json").write_text(json.dumps(errors))
dist.destroy_process_group()
