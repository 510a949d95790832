"""`nanoseek plan`: will this model train on these GPUs, with which layout, in how long, for how much?

Bytes per parameter follow what nanoseek's training does: fp32 weights (bf16 autocast computes), fp32 gradients,
AdamW's two fp32 moments: 4 + 4 + 8 = 16 bytes. Per rank:

    DDP         everything replicated:                     16 P
    FSDP2       weights, gradients and moments sharded:    16 P / N
                + the unit being computed, unsharded (and the next one, prefetched): 2 x 8 x max block params,
                + the root (embedding, head), unsharded for the whole forward and backward
    FSDP2 + EP  as FSDP2 (experts sharded over EP x the rest), but a block's routed experts are gathered only
                within its EP slice: E / EP experts per rank instead of all E

Activations (bf16, no activation checkpointing) are estimated from the tensors autograd keeps per token and layer:
MLA's projections, per-head q/k/v and output; the FFN's input and SwiGLU gate/up/product, times top-k for routed
experts; fp32 logits for the main and MTP heads. A layout fits when all of it stays under 90% of the GPU memory
(the rest: CUDA context, allocator fragmentation). Among those that fit, the best moves the fewest bytes per step
(DDP all-reduce; FSDP2 all-gathers per micro-batch and one reduce-scatter; EP adds the token all-to-alls).
Time = tokens x FLOPs per token (the count the training loop's MFU uses) / (GPUs x peak x MFU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanoseek.config import ModelConfig
from nanoseek.model import Transformer
from nanoseek.model.flops import flops_per_token

# GPU: (memory in GB, dense bf16 peak FLOP/s from the vendor sheets; no sparsity)
GPUS: dict[str, tuple[float, float]] = {
    "h100": (80, 989e12),
    "h800": (80, 989e12),
    "h200": (141, 989e12),
    "b200": (180, 2250e12),
    "a100": (80, 312e12),
    "a100-40gb": (40, 312e12),
    "l40s": (48, 362e12),
    "l4": (24, 121e12),
    "4090": (24, 165e12),
    "mi300x": (192, 1307e12),
}
BYTES_WEIGHT, BYTES_GRAD, BYTES_ADAM = 4, 4, 8  # fp32 master weights, gradients, AdamW m and v
USABLE = 0.9  # share of GPU memory a plan may fill


@dataclass
class ParamCounts:
    total: int  # every parameter, MTP included (what is trained)
    activated: int  # per token: top-k routed experts only (main model, as the V3 report counts)
    expert: int  # routed experts (the part expert parallelism splits)
    root: int  # outside any block: embedding, final norm, head
    largest_unit: int  # the largest block or MTP module (an FSDP2 unit)
    largest_unit_expert: int  # its routed-expert parameters

    @property
    def dense(self) -> int:
        return self.total - self.expert


def count_parameters(config: ModelConfig) -> ParamCounts:
    """Parameter counts from the model itself, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = Transformer(config)
    units: dict[str, list[int]] = {}
    expert = root = 0
    for name, p in model.named_parameters():
        is_expert = ".experts." in name
        expert += p.numel() if is_expert else 0
        parts = name.split(".")
        if parts[0] in ("layers", "mtp"):
            unit = units.setdefault(".".join(parts[:2]), [0, 0])
            unit[0] += p.numel()
            unit[1] += p.numel() if is_expert else 0
        else:
            root += p.numel()
    largest = max(units.values(), key=lambda u: u[0])
    return ParamCounts(
        total=model.num_parameters(include_mtp=True),
        activated=model.num_parameters(activated=True),
        expert=expert,
        root=root,
        largest_unit=largest[0],
        largest_unit_expert=largest[1],
    )


def state_bytes(counts: ParamCounts, layout: str, world: int) -> dict[str, float]:
    """Weights, gradients and AdamW state per rank (bytes) under ddp | fsdp | fsdp+ep (EP shards like FSDP2)."""
    n = 1 if layout == "ddp" else world
    return {
        "weights": BYTES_WEIGHT * counts.total / n,
        "grads": BYTES_GRAD * counts.total / n,
        "optimizer": BYTES_ADAM * counts.total / n,
    }


def gather_bytes(counts: ParamCounts, layout: str, ep: int = 1) -> float:
    """FSDP2's unsharded working set per rank: the root for the whole step, two blocks at a time (the current
    one and the prefetched next), each with weights and gradients; EP gathers only E/EP routed experts."""
    if layout == "ddp":
        return 0.0
    unit = counts.largest_unit - counts.largest_unit_expert + counts.largest_unit_expert / ep
    return (BYTES_WEIGHT + BYTES_GRAD) * (counts.root + 2 * unit)


def activation_bytes(c: ModelConfig, tokens: int) -> float:
    """Activations autograd keeps for one micro-batch of `tokens` tokens (bf16, no checkpointing), estimated."""
    H = c.num_attention_heads
    attn = c.hidden_size + (c.q_lora_rank or 0) + c.kv_lora_rank + c.qk_rope_head_dim
    attn += H * (2 * c.qk_head_dim + 2 * c.v_head_dim)  # q, k, v and the attention output (flash attention)
    dense_ffn = c.hidden_size + 3 * c.intermediate_size
    moe_ffn = c.hidden_size + c.num_experts_per_tok * (c.hidden_size + 3 * c.moe_intermediate_size)
    moe_ffn += 3 * c.n_shared_experts * c.moe_intermediate_size + c.n_routed_experts  # shared experts, router
    layers = range(c.num_hidden_layers + c.num_nextn_predict_layers)
    per_token = sum(attn + 2 * c.hidden_size + (moe_ffn if c.is_moe_layer(i) else dense_ffn) for i in layers)
    logits = 2 * c.vocab_size * (1 + c.num_nextn_predict_layers)  # fp32 = 2 bf16 units each
    return 2.0 * tokens * (per_token + logits)


def comm_bytes(c: ModelConfig, counts: ParamCounts, layout: str, world: int, ep: int, micro_tokens: int, accum: int):
    """Bytes each rank sends per optimizer step (ring collectives ~ 2x the data for all-reduce, 1x otherwise)."""
    if world == 1:
        return 0.0
    frac = (world - 1) / world
    if layout == "ddp":
        return 2 * BYTES_GRAD * counts.total * frac
    params = counts.dense + counts.expert / ep  # what FSDP2 gathers per micro-batch (forward and backward)
    sent = (2 * accum + 1) * BYTES_WEIGHT * params * frac
    if ep > 1:  # dispatch + combine, forward + backward: top-k copies of each token's hidden state, bf16
        moe_layers = sum(c.is_moe_layer(i) for i in range(c.num_hidden_layers + c.num_nextn_predict_layers))
        sent += accum * 4 * micro_tokens * c.num_experts_per_tok * c.hidden_size * 2 * moe_layers * (ep - 1) / ep
    return sent


def make_plan(
    config: ModelConfig,
    gpus: int,
    gpu: str = "h100",
    gpu_mem_gb: float | None = None,
    tokens: float = 1e9,
    seq_len: int | None = None,
    micro_batch: int = 1,
    batch_tokens: int | None = None,
    mfu: float = 0.4,
    price_per_hour: float | None = None,
    gpu_hours: float | None = None,
) -> dict:
    """Every layout's per-rank memory, whether it fits, the best one, and time and cost for `tokens` tokens."""
    if gpu not in GPUS:
        raise ValueError(f"unknown --gpu {gpu!r}: choose one of {', '.join(GPUS)}")
    if gpus < 1 or micro_batch < 1 or not 0 < mfu <= 1:
        raise ValueError("--gpus and --micro-batch must be >= 1 and --mfu in (0, 1]")
    mem_gb, peak = GPUS[gpu]
    mem = (gpu_mem_gb or mem_gb) * 1e9
    seq_len = seq_len or min(4096, config.max_position_embeddings)
    micro_tokens = micro_batch * seq_len
    batch_tokens = batch_tokens or gpus * micro_tokens
    accum = batch_tokens / (gpus * micro_tokens)
    if accum < 1 or accum != int(accum):
        raise ValueError(
            f"--batch-tokens {batch_tokens} must be a multiple of GPUs x micro-batch x seq-len = {gpus * micro_tokens}"
        )
    accum = int(accum)
    counts = count_parameters(config)
    flops_tok = flops_per_token(config, seq_len)
    act = activation_bytes(config, micro_tokens)

    candidates = [("ddp", 1), ("fsdp", 1)] if gpus > 1 else [("ddp", 1)]
    candidates += [("fsdp+ep", e) for e in range(2, gpus + 1) if gpus % e == 0 and config.n_routed_experts % e == 0]
    layouts = []
    for layout, ep in candidates:
        mem_parts = {**state_bytes(counts, layout, gpus), "gather": gather_bytes(counts, layout, ep)}
        static = sum(mem_parts.values())
        free = USABLE * mem - static
        per_token = act / micro_tokens
        layouts.append(
            {
                "layout": layout if layout != "fsdp+ep" else f"fsdp+ep{ep}",
                "ep": ep,
                **{f"{k}_gb": v / 1e9 for k, v in mem_parts.items()},
                "activations_gb": act / 1e9,
                "total_gb": (static + act) / 1e9,
                "fits": static + act <= USABLE * mem,
                "max_micro_tokens": max(0, int(free / per_token)),  # the largest micro-batch that fits
                "comm_gb_per_step": comm_bytes(config, counts, layout, gpus, ep, micro_tokens, accum) / 1e9,
            }
        )
    fitting = [lay for lay in layouts if lay["fits"]]
    best = min(fitting, key=lambda lay: lay["comm_gb_per_step"]) if fitting else None
    seconds = tokens * flops_tok / (gpus * peak * mfu)
    out = {
        "gpus": gpus,
        "gpu": gpu,
        "gpu_mem_gb": mem / 1e9,
        "peak_flops": peak,
        "params_total": counts.total,
        "params_activated": counts.activated,
        "params_expert": counts.expert,
        "flops_per_token": flops_tok,
        "seq_len": seq_len,
        "micro_batch": micro_batch,
        "batch_tokens": batch_tokens,
        "grad_accum": accum,
        "layouts": layouts,
        "best": best["layout"] if best else None,
        "tokens": tokens,
        "mfu": mfu,
        "hours": seconds / 3600,
        "gpu_hours": gpus * seconds / 3600,
    }
    if price_per_hour is not None:
        out["cost"] = out["gpu_hours"] * price_per_hour
    if gpu_hours is not None:  # what MFU a reported budget implies
        out["implied_mfu"] = tokens * flops_tok / (gpu_hours * 3600 * peak)
    return out


def format_plan(p: dict, name: str) -> str:
    lines = [
        f"{name}: {p['params_total'] / 1e9:.2f}B parameters ({p['params_activated'] / 1e9:.2f}B activated, "
        f"{p['params_expert'] / 1e9:.2f}B in routed experts); {p['flops_per_token'] / 1e9:.1f} GFLOP per token "
        f"(training, seq {p['seq_len']})",
        f"{p['gpus']} x {p['gpu']} ({p['gpu_mem_gb']:.0f} GB, {p['peak_flops'] / 1e12:.0f} TFLOP/s bf16); "
        f"micro-batch {p['micro_batch']} x {p['seq_len']} tokens, global batch {p['batch_tokens']:,} tokens "
        f"(grad accum {p['grad_accum']})",
        "",
        f"{'layout':<12}{'weights':>9}{'grads':>9}{'AdamW':>9}{'gather':>9}{'activ.':>9}{'total':>9}  fits  "
        f"{'max tokens/micro':>16}{'comm/step':>11}",
    ]
    for lay in p["layouts"]:
        lines.append(
            f"{lay['layout']:<12}{lay['weights_gb']:>8.1f}G{lay['grads_gb']:>8.1f}G{lay['optimizer_gb']:>8.1f}G"
            f"{lay['gather_gb']:>8.1f}G{lay['activations_gb']:>8.1f}G{lay['total_gb']:>8.1f}G  "
            f"{'yes ' if lay['fits'] else 'no  '}  {lay['max_micro_tokens']:>16,}{lay['comm_gb_per_step']:>10.1f}G"
        )
    lines.append("")
    if p["best"]:
        lines.append(f"best layout: {p['best']} (fits, fewest bytes moved per step)")
    else:
        lines.append(
            "nothing fits: lower --seq-len / --micro-batch (see max tokens/micro), add GPUs, or pick a larger GPU"
        )
    cost = f", ${p['cost']:,.0f}" if "cost" in p else ""
    lines.append(
        f"{p['tokens']:.3g} tokens at MFU {p['mfu']:.0%}: {p['hours']:,.1f} h ({p['hours'] / 24:,.1f} days), "
        f"{p['gpu_hours']:,.0f} GPU-hours{cost}"
    )
    if "implied_mfu" in p:
        lines.append(f"the given GPU-hours imply MFU {p['implied_mfu']:.1%} (of the bf16 peak)")
    return "\n".join(lines)
