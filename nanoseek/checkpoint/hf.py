"""Load and save models as Hugging Face DeepSeek-V3 directories (config.json + safetensors).

On disk the names are HF's (`model.layers.L.mlp.experts.E.gate_proj.weight`, MTP at layer index
num_hidden_layers + k, FP8 weights with 128x128-block `weight_scale_inv`; V4: DeepSeek's hub names, FP8 and FP4
weights with `.scale`, see quant.py); in memory routed experts are stacked for grouped GEMMs. Only safetensors
and JSON are read, so loading a model never runs code.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nanoseek.checkpoint import hub_v4
from nanoseek.checkpoint.quant import QUANTIZED, dequantize
from nanoseek.config import ModelConfig
from nanoseek.io import atomic_dir, atomic_path, atomic_write_text
from nanoseek.model import Transformer

_EXPERT = re.compile(r"^(.*?mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")
_MTP_OWN = ("enorm.", "hnorm.", "eh_proj.", "shared_head.norm.")
_MTP_OWN_V4 = ("enorm.", "hnorm.", "e_proj.", "h_proj.", "norm.", "hc_head.")  # DeepSeek-V4's MTPBlock
_MTP_SHARED_COPIES = ("embed_tokens.weight", "shared_head.head.weight")  # copies of the main embedding / head
_IGNORED = re.compile(r"(rotary_emb\.inv_freq$)")


# ---------------------------------------------------------------------------------------------- names
def hf_to_internal(name: str, config: ModelConfig) -> str | None:
    """HF tensor name -> internal parameter name (None for tensors that are shared copies or ignored).

    Routed-expert tensors map to the stacked `...experts.w13` / `...experts.w2` (the caller slices them).
    """
    if _IGNORED.search(name):
        return None
    if name == "lm_head.weight":
        return name
    m = _LAYER.match(name)
    if m is None:
        return name[len("model.") :] if name.startswith("model.") else "?" + name
    idx, rest = int(m.group(1)), m.group(2)
    e = _EXPERT.match(rest)
    if e is not None:
        rest = f"{e.group(1)}.{'w2' if e.group(3) == 'down_proj' else 'w13'}"
    if idx < config.num_hidden_layers:
        return f"layers.{idx}.{rest}"
    k = idx - config.num_hidden_layers
    if rest in _MTP_SHARED_COPIES:
        return None
    if rest.startswith(_MTP_OWN_V4 if config.is_v4 else _MTP_OWN):
        return f"mtp.{k}.{rest}"
    return f"mtp.{k}.block.{rest}"


def internal_to_hf(model: Transformer) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) for every weight, experts unstacked to per-expert [out, in] matrices."""
    c = model.config
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        if name.endswith("e_score_correction_bias") and c.topk_method != "noaux_tc":
            continue
        if name.startswith("mtp."):
            k, rest = name.split(".", 2)[1:]
            layer = c.num_hidden_layers + int(k)
            rest = rest.removeprefix("block.")
            prefix = f"model.layers.{layer}."
        elif name.startswith("layers."):
            layer_rest = name.split(".", 2)
            prefix, rest = f"model.layers.{layer_rest[1]}.", layer_rest[2]
        elif name == "lm_head.weight":
            prefix, rest = "", name
        else:
            prefix, rest = "model.", name
        if rest.endswith("experts.w13"):
            base = rest[: -len("w13")]
            I = c.moe_intermediate_size
            for e in range(t.shape[0]):
                yield f"{prefix}{base}{e}.gate_proj.weight", t[e, :, :I].T
                yield f"{prefix}{base}{e}.up_proj.weight", t[e, :, I:].T
        elif rest.endswith("experts.w2"):
            base = rest[: -len("w2")]
            for e in range(t.shape[0]):
                yield f"{prefix}{base}{e}.down_proj.weight", t[e].T
        else:
            yield prefix + rest, t
    for k in range(0 if c.is_v4 else len(model.mtp)):  # real V3 checkpoints carry copies (V4's do not)
        prefix = f"model.layers.{c.num_hidden_layers + k}."
        yield prefix + "embed_tokens.weight", model.embed_tokens.weight
        yield prefix + "shared_head.head.weight", model.lm_head.weight


# ----------------------------------------------------------------------------------------------- save
def save_model(
    model: Transformer,
    out_dir: str | os.PathLike,
    tokenizer=None,
    max_shard_bytes: int = 5 * 2**30,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write `model` as an HF DeepSeek-V3 directory, atomically (temp dir + rename); returns the path.

    Shards above `max_shard_bytes` (`model-0000i-of-0000n.safetensors` + index). `tokenizer` (optional) must
    have `.save(dir)`.
    """
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        write_model_files(model, tmp, max_shard_bytes, dtype)
        if tokenizer is not None:
            tokenizer.save(tmp)
    return out


def write_model_files(
    model: Transformer, out: Path, max_shard_bytes: int = 5 * 2**30, dtype: torch.dtype | None = None
) -> None:
    """Write config.json, generation_config.json and safetensors into an existing directory (not atomic:
    callers fill a `nanoseek.io.atomic_dir`, as save_model does)."""
    c = model.config
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in internal_to_hf(model):
        t = t.detach().to("cpu")
        if dtype is not None and t.is_floating_point() and not name.endswith("e_score_correction_bias"):
            t = t.to(dtype)
        if c.is_v4:  # DeepSeek's hub names, which transformers reads too
            name, t = hub_v4.hub_tensor(name, t, c)
        t = t.contiguous().clone() if not t.is_contiguous() or t.storage_offset() else t.clone()
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    n = len(shards)
    files = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for fname, tensors in zip(files, shards):
        with atomic_path(out / fname) as tmp:  # save_file itself would make the file 0600
            save_file(tensors, str(tmp), metadata={"format": "pt"})
    if n > 1:
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for s in shards for t in s.values())},
            "weight_map": {k: f for f, s in zip(files, shards) for k in s},
        }
        atomic_write_text(out / "model.safetensors.index.json", json.dumps(index, indent=2) + "\n")
    cfg = c.replace(torch_dtype=str(dtype or next(model.parameters()).dtype).removeprefix("torch."))
    cfg.save_json(out / "config.json")
    gen = {"bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id, "do_sample": False}
    atomic_write_text(out / "generation_config.json", json.dumps(gen, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------- load
def weight_files(model_dir: Path) -> dict[str, Path]:
    """Map every tensor name to its safetensors file; clear errors for missing or non-safetensors weights."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {k: model_dir / v for k, v in weight_map.items()}
        for f in set(files.values()):
            if not f.exists():
                raise FileNotFoundError(f"{index.name} lists {f.name}, which is missing from {model_dir}")
        return files
    single = model_dir / "model.safetensors"
    if not single.exists():
        others = sorted(p.name for p in model_dir.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        hint = (
            f"found {', '.join(others)}: nanoseek reads only safetensors (pickle files can run code); convert them "
            "with transformers' `save_pretrained(..., safe_serialization=True)`"
            if others
            else "expected model.safetensors or model.safetensors.index.json"
        )
        if (model_dir / "dcp").is_dir():  # written by a sharded (FSDP2 / expert-parallel) training run
            hint = f"it is a distributed training checkpoint: `nanoseek export --checkpoint {model_dir} --out DIR`"
        raise FileNotFoundError(f"no safetensors weights in {model_dir}: {hint}")
    with safe_open(str(single), framework="pt") as f:
        return {k: single for k in f.keys()}


def load_model(
    path: str | os.PathLike, device: str | torch.device | None = None, dtype: torch.dtype | None = None
) -> Transformer:
    """Load an HF-format DeepSeek-V3/V2 directory into a Transformer in eval mode.

    Tensors are read one at a time from memory-mapped safetensors straight into the preallocated model,
    so peak memory stays near one copy of the model. FP8 (V3.x, V4) and FP4 (V4 experts) weights are dequantised
    on load, one tensor at a time (quant.py).
    dtype defaults to the checkpoint's torch_dtype (bfloat16 for FP8 checkpoints).
    """
    model_dir = Path(path)
    if model_dir.is_file():
        model_dir = model_dir.parent
    if not model_dir.exists():
        raise FileNotFoundError(f"model directory {model_dir} does not exist")
    config = ModelConfig.from_json(model_dir)
    files = weight_files(model_dir)
    stored: dict[str, str] = {}  # name used below -> name in the file, where they differ (V4's hub names)
    if config.is_v4:
        stored = {hub_v4.hf_name(n, config): n for n in files}
        stored.pop(None, None)
        files = {name: files[raw] for name, raw in stored.items()}
    names = set(files)
    # HF's own classes save no MTP weights: then build the model without MTP rather than fail
    mtp_prefixes = [f"model.layers.{config.num_hidden_layers + k}." for k in range(config.num_nextn_predict_layers)]
    if mtp_prefixes and not any(n.startswith(tuple(mtp_prefixes)) for n in names):
        config = config.replace(num_nextn_predict_layers=0)
    quant = config.extra.get("quantization_config") or {}
    block = tuple(quant.get("weight_block_size", (128, 128)))
    if dtype is None:
        dtype = _parse_dtype(config.torch_dtype)
    device = torch.device(device or "cpu")

    with torch.device("meta"):
        model = Transformer(config)
    model = model.to(dtype).to_empty(device=device)
    if config.tie_word_embeddings:  # to_empty gives every parameter its own storage
        model.lm_head.weight = model.embed_tokens.weight
    for m in model.moe_layers():  # the balancing bias stays fp32 whatever the model dtype
        if m.gate.e_score_correction_bias is not None:  # V4's hash-routed layers have none
            m.gate.e_score_correction_bias = torch.zeros(config.n_routed_experts, dtype=torch.float32, device=device)
    params = dict(model.state_dict(keep_vars=True))
    filled: set[str] = set()
    handles: dict[Path, object] = {}

    def get(name: str) -> torch.Tensor:
        f = files[name]
        if f not in handles:
            handles[f] = safe_open(str(f), framework="pt", device="cpu")
        return handles[f].get_tensor(stored.get(name, name))

    for name in sorted(names, key=lambda n: (str(files[n]), n)):
        if name.endswith("_scale_inv"):
            if name.removesuffix("_scale_inv") not in names:
                raise ValueError(f"{name} in {files[name].name} has no matching weight tensor")
            continue
        target = hf_to_internal(name, config)
        if target is None:
            continue
        if target not in params:
            raise ValueError(
                f"unexpected tensor {name!r} in {files[name].name}: it is not part of the model described by "
                f"config.json (num_hidden_layers={config.num_hidden_layers}, q_lora_rank={config.q_lora_rank}, "
                f"first_k_dense_replace={config.first_k_dense_replace}); the config does not match the weights"
            )
        t = get(name)
        if t.dtype in QUANTIZED:
            scale = name + "_scale_inv"
            if scale not in names:
                kind = "FP4" if t.dtype == torch.float4_e2m1fn_x2 else "FP8"
                raise ValueError(f"{kind} tensor {stored.get(name, name)!r} has no scale: cannot dequantise it")
            t = dequantize(t, get(scale), block)
        _copy_into(params[target], target, name, t, files[name].name, config)
        filled.add(name if ".experts." in target else target)

    missing = [n for n in params if n not in filled and not _is_expert(n)]
    if config.topk_method != "noaux_tc":  # V2 has no balancing bias; ours stays zero and unused
        missing = [n for n in missing if not n.endswith("e_score_correction_bias")]
    if config.tie_word_embeddings and "lm_head.weight" in missing:
        missing.remove("lm_head.weight")
    expected_expert = {n for n in _expected_expert_names(config) if n not in filled}
    if missing or expected_expert:
        first = sorted(missing)[:1] or sorted(expected_expert)[:1]
        raise ValueError(
            f"checkpoint {model_dir} is missing {len(missing) + len(expected_expert)} tensor(s), e.g. {first[0]!r}; "
            "the weights do not match config.json"
        )
    return model.eval()


def _is_expert(internal: str) -> bool:
    return internal.endswith(("experts.w13", "experts.w2"))


def _expected_expert_names(config: ModelConfig) -> Iterator[str]:
    layers = list(range(config.first_k_dense_replace, config.num_hidden_layers))
    layers += [config.num_hidden_layers + k for k in range(config.num_nextn_predict_layers)]
    if config.n_routed_experts == 0:
        return
    for layer in layers:
        for e in range(config.n_routed_experts):
            for p in ("gate_proj", "up_proj", "down_proj"):
                yield f"model.layers.{layer}.mlp.experts.{e}.{p}.weight"


def _copy_into(param: torch.Tensor, target: str, name: str, t: torch.Tensor, fname: str, config: ModelConfig) -> None:
    """Copy checkpoint tensor t into param (slicing a stacked expert tensor when needed), checking shapes."""
    dst = param.data
    if _is_expert(target):
        e = int(_EXPERT.match(name).group(2))
        I = config.moe_intermediate_size
        if target.endswith("w13"):
            dst = dst[e, :, :I] if ".gate_proj." in name else dst[e, :, I:]
        else:
            dst = dst[e]
        t = t.T
    if tuple(t.shape) != tuple(dst.shape):
        raise ValueError(
            f"tensor {name!r} in {fname} has shape {tuple(t.shape)} but config.json implies "
            f"{tuple(dst.shape)}; the config does not match the weights"
        )
    with torch.no_grad():
        dst.copy_(t)


def _parse_dtype(name: str) -> torch.dtype:
    name = str(name).removeprefix("torch.")
    if name in ("float8_e4m3fn", "fp8"):
        return torch.bfloat16
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        raise ValueError(f"config.json torch_dtype {name!r} is not a floating-point dtype; pass dtype= explicitly")
    return dt
