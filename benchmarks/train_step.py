"""A full optimizer step, nanoseek vs transformers' DeepseekV3 + torch AdamW, on the same config and weights.

    python benchmarks/train_step.py --preset cpu-small --batch-size 8 --seq-len 256

nanoseek's step is what `nanoseek train` runs: forward with MTP (loss weight 0.3) and the sequence-wise aux
loss, backward, grad-norm clip 1.0, AdamW, aux-loss-free bias update. transformers' model has no MTP and never
updates the bias: its step is forward, backward, clip, AdamW. nanoseek is also timed without MTP, the
like-for-like figure. Memory: bytes saved for backward (the activations that dominate training memory, counted
with saved-tensor hooks) plus parameters, gradients and AdamW state. One JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from benchmarks.model_throughput import matmul_peak
from nanoseek import ModelConfig, Transformer, save_model
from nanoseek.model.flops import flops_per_token
from nanoseek.train.optim import build_optimizer, expert_bias_step


def saved_activation_bytes(fn) -> int:
    """Bytes of the tensors autograd saves for backward during fn() (each storage counted once)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        s = t.untyped_storage()
        seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn()
    loss.backward()
    return sum(seen.values())


def state_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    params = {p.data_ptr(): p for p in model.parameters()}.values()
    n = sum(p.numel() * p.element_size() * 2 for p in params)  # weights + grads
    for st in opt.state.values():
        n += sum(v.numel() * v.element_size() for v in st.values() if torch.is_tensor(v) and v.dim() > 0)
    return n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu-small")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--iters", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    import transformers

    torch.manual_seed(0)
    config = ModelConfig.from_preset(args.preset)
    ours = Transformer(config).train()
    ours_nomtp = Transformer(config.replace(num_nextn_predict_layers=0)).train()
    ours_nomtp.load_state_dict({k: v for k, v in ours.state_dict().items() if not k.startswith("mtp.")})
    with tempfile.TemporaryDirectory() as d:
        save_model(ours, d)
        hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).train()
    ids = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len + 1))
    x, y = ids[:, :-1], ids[:, 1:]
    V = config.vocab_size
    opts = {name: build_optimizer(m, lr=1e-4) for name, m in [("ours", ours), ("ours_nomtp", ours_nomtp)]}
    opts["hf"] = torch.optim.AdamW(hf.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)

    def loss_ours(m):
        return m.compute_loss(x, y).total(0.3)

    def loss_hf():
        return F.cross_entropy(hf(x).logits.view(-1, V), y.reshape(-1))

    def step(name: str):
        m = {"ours": ours, "ours_nomtp": ours_nomtp, "hf": hf}[name]
        loss = loss_hf() if name == "hf" else loss_ours(m)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opts[name].step()
        opts[name].zero_grad(set_to_none=True)
        if name != "hf":
            expert_bias_step(m, m.expert_loads(), 1e-3)

    times: dict[str, list[float]] = {k: [] for k in opts}
    for _ in range(args.rounds):  # alternate so machine drift hits all three
        for name in opts:
            for i in range(2 + args.iters):
                t = time.perf_counter()
                step(name)
                if i >= 2:
                    times[name].append(time.perf_counter() - t)
    mem = {
        "ours": saved_activation_bytes(lambda: loss_ours(ours)) + state_bytes(ours, opts["ours"]),
        "ours_nomtp": saved_activation_bytes(lambda: loss_ours(ours_nomtp))
        + state_bytes(ours_nomtp, opts["ours_nomtp"]),
        "hf": saved_activation_bytes(loss_hf) + state_bytes(hf, opts["hf"]),
    }
    tokens = args.batch_size * args.seq_len
    tps = {k: tokens / statistics.median(v) for k, v in times.items()}
    peak = matmul_peak()
    f_mtp = flops_per_token(config, args.seq_len, include_mtp=True)
    f_main = flops_per_token(config, args.seq_len, include_mtp=False)
    print(
        json.dumps(
            {
                "bench": "train_step",
                "preset": args.preset,
                "batch": args.batch_size,
                "seq_len": args.seq_len,
                "dtype": "float32",
                "threads": torch.get_num_threads(),
                "tokens_per_s": {
                    "nanoseek": round(tps["ours"]),
                    "nanoseek_no_mtp": round(tps["ours_nomtp"]),
                    "transformers": round(tps["hf"]),
                },
                "ratio_no_mtp": round(tps["ours_nomtp"] / tps["hf"], 3),
                "ratio_with_mtp": round(tps["ours"] / tps["hf"], 3),
                "mfu": {
                    "nanoseek": round(f_mtp * tps["ours"] / peak, 3),
                    "nanoseek_no_mtp": round(f_main * tps["ours_nomtp"] / peak, 3),
                    "transformers": round(f_main * tps["hf"] / peak, 3),
                },
                "peak_memory_mb": {k: round(v / 2**20, 1) for k, v in mem.items()},
                "memory_ratio_no_mtp": round(mem["ours_nomtp"] / mem["hf"], 3),
                "matmul_peak_gflops": round(peak / 1e9, 1),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "machine": f"{platform.machine()} {torch.get_num_threads()} threads",
                "date": time.strftime("%Y-%m-%d"),
            }
        )
    )


if __name__ == "__main__":
    main()
