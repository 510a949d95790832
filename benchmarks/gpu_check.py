"""Correctness on an accelerator (the checks `benchmarks/gpu.sh` runs first on a lent GPU); one JSON line.

    python -m benchmarks.gpu_check --device cuda     # also runs on cpu, which is how it is tested here

Each check runs on its own and reports ok / the numbers / its error, so one failure does not hide the rest:
- parity: nanoseek vs transformers' DeepseekV3ForCausalLM logits on the same weights, float32 (TF32 off);
- cached: the Engine's greedy tokens for prompts of different lengths equal argmax decoding with full forwards,
  and a cached step's logits equal the full forward's;
- speculative: MTP self-speculative greedy output equals plain greedy;
- training: 30 steps as `nanoseek train` takes them (bf16 autocast on CUDA) on one batch: the loss falls;
- compiled: the compiled decode step (Engine(compile=True)) gives the eager engine's tokens.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
import traceback

import torch

from nanoseek import ModelConfig, Transformer, save_model
from nanoseek.infer.engine import Engine
from nanoseek.infer.sampling import SamplingParams

SMALL = dict(vocab_size=512, max_position_embeddings=256)  # cpu-small shapes, a vocabulary for random prompts


def _model(device: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.from_preset("cpu-small", **SMALL))
    with torch.no_grad():  # decisive routing and a non-zero balance bias, so selection bugs show
        for m in model.moe_layers():
            m.gate.weight.normal_(0, 0.5)
            m.gate.e_score_correction_bias.copy_(torch.randn(m.n_experts) * 0.5)
    return model.to(device=device, dtype=dtype).eval()


def _prompts(n: int = 4, vocab: int = SMALL["vocab_size"]) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, vocab, (5 + 7 * i,), generator=g).tolist() for i in range(n)]


def check_parity(device: str) -> dict:
    import transformers

    ours = _model("cpu")
    with tempfile.TemporaryDirectory() as d:
        save_model(ours, d)
        hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).to(device).eval()
    ours = ours.to(device)
    ids = torch.randint(0, SMALL["vocab_size"], (2, 96), generator=torch.Generator().manual_seed(2)).to(device)
    with torch.no_grad():
        diff = (hf(ids).logits - ours(ids)).abs().max().item()
    return {"ok": diff < 1e-4, "logits_max_abs_diff": diff}


@torch.no_grad()
def _greedy_full(model: Transformer, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt], device=next(model.parameters()).device)
    for _ in range(n):
        ids = torch.cat((ids, model(ids)[:, -1:].argmax(-1)), dim=1)
    return ids[0, len(prompt) :].tolist()


def check_cached(device: str) -> dict:
    model, n = _model(device), 24
    engine = Engine(model, max_batch_size=4)
    engine.eos_ids = set()
    got = [c.token_ids for c in engine.generate(_prompts(), SamplingParams(max_tokens=n, temperature=0))]
    want = [_greedy_full(model, p, n) for p in _prompts()]
    prompt = _prompts()[3]  # one cached step after a prefill vs the full forward's last position
    ids = torch.tensor([prompt], device=device)
    with torch.inference_mode():
        kv = engine.cache.kv.zero_()
        slot, zero = torch.tensor([0], device=device), torch.tensor([0], device=device)
        model.forward_cached(ids[:, :-1], kv, slot, zero)
        step, _ = model.forward_cached(ids[:, -1:], kv, slot, torch.tensor([len(prompt) - 1], device=device))
        full = model(ids)[:, -1:]
    diff = (step - full).abs().max().item()
    return {"ok": got == want and diff < 1e-4, "tokens_equal": got == want, "step_logits_max_abs_diff": diff}


def check_speculative(device: str) -> dict:
    model, params = _model(device), SamplingParams(max_tokens=24, temperature=0)
    plain = [c.token_ids for c in Engine(model, max_batch_size=4).generate(_prompts(), params)]
    spec_engine = Engine(model, max_batch_size=4, speculative=True)
    spec = [c.token_ids for c in spec_engine.generate(_prompts(), params)]
    return {"ok": spec == plain, "acceptance_rate": spec_engine.acceptance_rate}


def check_training(device: str) -> dict:
    """30 steps as `nanoseek train` takes them: float32 weights, bf16 autocast on CUDA (float32 on CPU), loss with
    MTP and balance terms, AdamW, the aux-loss-free bias update; the loss must stay finite and fall."""
    import contextlib

    model = _model(device).train()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else contextlib.nullcontext()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, SMALL["vocab_size"], (4, 129), generator=g).to(device)
    losses = []
    for _ in range(30):
        with autocast:
            loss = model.compute_loss(ids[:, :-1], ids[:, 1:]).total()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.update_expert_bias(model.expert_loads(), 1e-3)
        losses.append(loss.item())
    ok = all(math.isfinite(x) for x in losses) and losses[-1] < 0.8 * losses[0]
    return {"ok": ok, "loss_first": round(losses[0], 3), "loss_last": round(losses[-1], 3)}


def check_compiled(device: str) -> dict:
    model, params = _model(device), SamplingParams(max_tokens=12, temperature=0)
    eager = [c.token_ids for c in Engine(model, max_batch_size=4).generate(_prompts(), params)]
    compiled = [c.token_ids for c in Engine(model, max_batch_size=4, compile=True).generate(_prompts(), params)]
    return {"ok": compiled == eager}


CHECKS = {
    "parity": check_parity,
    "cached": check_cached,
    "speculative": check_speculative,
    "training": check_training,
    "compiled": check_compiled,
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--skip", nargs="*", default=[], choices=list(CHECKS), help="checks to leave out")
    args = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 parity means float32 matmuls
    torch.backends.cudnn.allow_tf32 = False
    result: dict = {"bench": "gpu_check", "device": args.device, "torch": torch.__version__}
    if args.device.startswith("cuda"):
        result["gpu"] = torch.cuda.get_device_name()
    for name, check in CHECKS.items():
        if name in args.skip:
            continue
        t = time.perf_counter()
        try:
            result[name] = check(args.device)
        except Exception as e:  # report and go on: one device run should show every failure at once
            result[name] = {"ok": False, "error": f"{type(e).__name__}: {e}", "where": traceback.format_exc()[-600:]}
        result[name]["seconds"] = round(time.perf_counter() - t, 1)
    result["all_ok"] = all(result[n]["ok"] for n in CHECKS if n not in args.skip)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
