"""The default engine's fast path: greedy decoding, K steps per call, compiled ahead of time (AOTInductor).

A decode step of a small model is ~100 tiny ops: eager PyTorch pays Python and dispatch for each (~2 ms per
token for cpu-small), `torch.compile` pays dynamo's guards and its wrapper per call, and both pay the engine's
Python per token. Here one call of a C++ graph (`torch._inductor.aoti_compile_and_package`) runs K greedy
steps: each step's argmax is the next step's input and its latents are written into the cache inside the graph,
so call and engine overhead are paid once per K tokens. The graph has dynamic dimensions (the number of rows and
the cache length read), so one artifact serves every batch and context; the model's weights are graph inputs,
not baked constants, so one artifact serves every checkpoint of a config and in-place weight updates (GRPO) are
seen at once.

Artifacts are built once per (config, torch version, CPU flags, cache shape, K, threads) in a child process
(`python -m nanoseek.infer.fast_decode`, so the engine keeps decoding eagerly meanwhile, with no stall and no
shared GIL) and cached under `~/.cache/nanoseek/aoti` (`NANOSEEK_CACHE_DIR`); later processes load them in
about a second. `NANOSEEK_FAST_DECODE=0` turns the path off (the tests' default: CI has no cached artifacts);
any failure (no C++ compiler, an export error) prints one line and leaves the engine eager.

Two artifacts per engine: "b1" (one row: the MoE reads the chosen experts' weights in place, and each matmul, a
matrix-vector product, is inductor's own multiply-and-sum rather than a BLAS call) and "bn" (2..n_slots rows; for
up to 32 slots of small matrices, `small_rows_fit`, every matmul is a multiply-and-sum too, the MoE's one per
(row, expert) pair over its expert's weights read in place, `Experts.pairs`; else BLAS calls and a padded MoE).
The routed experts are read from copies laid out [out, in], which the engine keeps and refreshes when the weights
change.
Rows are read from and written to their own cache slots (index_select / index_put), so any set of running slots
decodes in one call. Only plain greedy rows (no penalties, log-probs, grammar or speculation) take it.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from nanoseek.config import ModelConfig
from nanoseek.infer.cache import LatentCache
from nanoseek.model import Transformer
from nanoseek.model.mla import write_latents
from nanoseek.model.moe import Experts, MoE
from nanoseek.model.rope import rope_frequencies

try:
    import fcntl  # POSIX: a lock file per artifact, so concurrent engines build it once
except ImportError:
    fcntl = None

FORMAT = 5  # bump when the exported function changes: old artifacts are then ignored
ENV_SWITCH = "NANOSEEK_FAST_DECODE"  # "0": off (eager engine), else on
OUT_IN_MAX_BYTES = 1 << 30  # the [out, in] expert copies cost the routed experts' size again: not above this
# "bn" computes a matmul of a few rows as inductor's multiply-and-sum, which reads the weights once per row: it beats
# a BLAS call while each weight matrix stays in the core's L2 cache between rows; measured on cpu-small and
# cpu-medium (BENCHMARKS.md) up to 32 rows. Larger matrices or more rows keep BLAS (and the padded MoE).
SMALL_MATRIX_BYTES = 1 << 20
SMALL_MAX_ROWS = 32


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "off", "no")


def cache_dir() -> Path:
    root = os.environ.get("NANOSEEK_CACHE_DIR") or Path.home() / ".cache" / "nanoseek"
    return Path(root) / "aoti"


def cpu_flags() -> str:
    """The CPU's model name and feature flags (an artifact is built with -march=native)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        import platform

        return platform.processor() or platform.machine()
    pick = [next((ln for ln in lines if ln.startswith(k)), "") for k in ("model name", "flags")]
    return "\n".join(pick)


def artifact_path(
    config: ModelConfig, kind: str, steps: int, kv_shape: tuple[int, ...], threads: int, out_in: bool = False
) -> Path:
    spec = {
        "format": FORMAT,
        "config": config.to_dict(),
        "torch": torch.__version__,
        "cpu": cpu_flags(),
        "kind": kind,
        "steps": steps,
        "kv_shape": list(kv_shape),
        "threads": threads,
        "out_in": out_in,
    }
    key = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:20]
    return cache_dir() / f"{kind}-k{steps}-{key}.pt2"


def supported(model: Transformer, cache) -> str | None:
    """Why this engine cannot take the fast path (None: it can)."""
    c = model.config
    p = next(model.parameters())
    if c.model_type != "deepseek_v3":
        return f"model_type {c.model_type} (the fast path covers deepseek_v3)"
    if not isinstance(cache, LatentCache):
        return "not a latent cache"
    if p.device.type != "cpu" or p.dtype != torch.float32:
        return f"{p.device.type} {p.dtype} (the fast path covers float32 on CPU)"
    return None


def state_tensors(model: Transformer) -> list[torch.Tensor]:
    """The weights the exported graph takes as inputs, in a fixed order for a config."""
    return [t for _, t in model.named_parameters()] + [t for _, t in model.named_buffers()]


def routed_experts(model: Transformer) -> list[tuple[str, Experts]]:
    """The decoder layers' routed experts (not the MTP module's: decoding does not run it), with their names."""
    return [(n, m) for n, m in model.layers.named_modules(prefix="layers") if isinstance(m, Experts)]


def out_in_names(model: Transformer) -> list[str]:
    """The graphs' extra inputs, after the weights: each routed expert stack laid out [out, in]."""
    return [f"{n}.{w}" for n, _ in routed_experts(model) for w in ("w13_t", "w2_t")]


def out_in_bytes(model: Transformer) -> int:
    return sum((m.w13.numel() + m.w2.numel()) * m.w13.element_size() for _, m in routed_experts(model))


def small_rows_fit(model: Transformer, n_rows: int) -> bool:
    """Whether "bn" (up to n_rows rows) reads its weights per row (multiply-and-sum, `Experts.pairs`) rather than
    through BLAS: few rows, and every weight matrix (an expert's three together) within SMALL_MATRIX_BYTES."""
    largest = max(t.numel() * t.element_size() for t in model.parameters() if t.dim() == 2)
    for _, m in routed_experts(model):
        largest = max(largest, (m.w13[0].numel() + m.w2[0].numel()) * m.w13.element_size())
    return n_rows <= SMALL_MAX_ROWS and largest <= SMALL_MATRIX_BYTES


class GreedySteps(torch.nn.Module):
    """What is exported: `steps` greedy decode steps of rows `slots` of the cache, written in place.

    forward(weights, ids [N], kv [layers, n_slots, max_len, W], slots [N], start [N], past [C]) -> tokens [N, steps]
    Row n feeds ids[n] at position start[n], then its own argmax, and so on; step k reads the first C cached
    positions (C = past.shape[0] >= max(start) + steps - 1; masked past each row's own length)."""

    def __init__(self, model: Transformer, steps: int, extra: list[str] = ()) -> None:
        super().__init__()
        object.__setattr__(self, "model", model)  # not a submodule: its weights are inputs, not constants
        self.steps = steps
        self.names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()] + list(extra)

    def forward(self, weights, ids, kv, slots, start, past):
        state = dict(zip(self.names, weights))
        return torch.func.functional_call(self.model, state, (ids, kv, slots, start, past.shape[0], self.steps))


def greedy_steps(model: Transformer, ids, kv, slots, start, cache_len: int, steps: int) -> torch.Tensor:
    """The exported computation (model.forward is swapped for it during export; see `build`)."""
    tok, out = ids.unsqueeze(1), []
    for k in range(steps):
        pos = start + k
        logits, _, new = model.cached_step(tok, kv, slots, pos, cache_len)
        write_latents(kv, slots, pos, new)
        tok = logits[:, -1].argmax(dim=-1, keepdim=True)
        out.append(tok)
    return torch.cat(out, dim=1)


def build(
    config: ModelConfig,
    kind: str,
    steps: int,
    kv_shape: tuple[int, ...],
    threads: int,
    out: Path,
    out_in: bool = False,
) -> None:
    """Export and compile one artifact to `out` (on a weightless copy of the model: weights are inputs).
    `out_in`: the routed experts are read from [out, in] copies, inputs after the weights; "bn" is built with
    them when `small_rows_fit` (each matmul a multiply-and-sum, `Experts.pairs`), without them otherwise (BLAS
    calls, each expert's rows padded to the busiest expert's in one batched GEMM, `Experts.padded`)."""
    t0 = time.perf_counter()
    torch.set_num_threads(threads)  # inductor bakes the thread count into its kernels
    with torch.device("meta"):
        model = Transformer(config)
    model = model.to_empty(device="cpu").eval()
    model.inv_freq, model.rope_attention_factor = rope_frequencies(config)  # a plain tensor: to_empty skips it
    if kind == "bn":  # several rows: Experts.pairs (or .padded), never .gathered's weight copies
        for m in model.modules():
            if isinstance(m, MoE):
                m.gather_max_tokens = 0
    model.forward = lambda ids, kv, slots, start, cache_len, n: greedy_steps(model, ids, kv, slots, start, cache_len, n)
    weights = tuple(torch.zeros_like(t) for t in state_tensors(model))
    extra = out_in_names(model) if out_in else []
    fn = GreedySteps(model, steps, extra)
    for _, m in routed_experts(model) if out_in else []:  # what Experts.selected reads when present
        m.register_buffer("w13_t", m.w13.transpose(1, 2).contiguous(), persistent=False)
        m.register_buffer("w2_t", m.w2.transpose(1, 2).contiguous(), persistent=False)
        weights += (torch.zeros_like(m.w13_t), torch.zeros_like(m.w2_t))
    L, S, M, W = kv_shape
    N = 1 if kind == "b1" else min(2, S)
    kv = torch.zeros(kv_shape)
    args = (weights, torch.zeros(N, dtype=torch.long), kv, torch.arange(N), torch.zeros(N, dtype=torch.long))
    args += (torch.empty(steps + 1),)
    from torch.export import Dim

    rows = None if kind == "b1" else {0: Dim("rows", min=2, max=S)}
    past = {0: Dim("past", min=2, max=M - 1)}  # C < max_len: a full-length slice would be a special case
    dynamic = ((None,) * len(weights), rows, None, rows, rows, past)
    with torch.no_grad():
        ep = torch.export.export(fn, args, dynamic_shapes=dynamic)
    print(f"exported in {time.perf_counter() - t0:.1f} s", flush=True)
    tmp = out.with_name(f"{out.stem}.tmp{os.getpid()}.pt2")
    # one row: each matmul is a matrix-vector product, memory-bound, where inductor's own vectorised
    # multiply-and-sum reads the weights faster than the BLAS call it would make otherwise; a few rows of small
    # matrices ("bn" with out_in): also faster, fused with its neighbours, no packing of the weights and no
    # thread fork per call. The pass's CPU limit on a batched product's batch size is a module constant (read
    # from the config at import): raised for this build (a torch without it decomposes only what it would).
    from torch._inductor.fx_passes import decompose_mem_bound_mm as decompose

    options = {"decompose_mm_pass": {}} if kind == "b1" or out_in else {}
    limit = getattr(decompose, "cpu_max_first_dimension_decomposition", None)
    if kind == "bn" and out_in and limit is not None:
        decompose.cpu_max_first_dimension_decomposition = 2 * SMALL_MAX_ROWS
    try:
        with torch._inductor.config.patch(post_grad_fusion_options=options):
            torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp))
    finally:
        if limit is not None:
            decompose.cpu_max_first_dimension_decomposition = limit
    os.replace(tmp, out)


class FastDecoder:
    """The engine's handle on its two artifacts: built in the background the first time, loaded when ready."""

    steps = 8  # greedy steps per call (K): the call's overhead is paid once per K tokens
    build_timeout_s = 1800.0  # a build still running after this is stopped (the engine stays eager)

    def __init__(self, model: Transformer, cache: LatentCache, verbose: bool = True) -> None:
        self.model, self.cache, self.verbose = model, cache, verbose
        steps = self.steps
        self.kv_shape = tuple(cache.kv.shape)
        threads = {"b1": 1, "bn": torch.get_num_threads()}
        self.out_in = bool(routed_experts(model)) and out_in_bytes(model) <= OUT_IN_MAX_BYTES
        out_in = {"b1": self.out_in, "bn": self.out_in and small_rows_fit(model, self.kv_shape[1])}
        self.out_in_kinds = {k for k, v in out_in.items() if v}
        self.paths = {k: artifact_path(model.config, k, steps, self.kv_shape, t, out_in[k]) for k, t in threads.items()}
        self.threads = threads
        self._out_in: list[tuple[torch.Tensor, torch.Tensor, tuple | None]] = []  # (weight, copy, version copied)
        self.runners: dict[str, object] = {}
        self.builds: dict[str, tuple[subprocess.Popen, float, Path]] = {}
        self.failed: set[str] = set()
        self._past = torch.empty(cache.max_len)
        self.weights = state_tensors(model)
        self.load_s: dict[str, float] = {}
        self.build_s: dict[str, float] = {}
        for kind in self.paths:  # load what earlier processes built; a missing one is built on first demand
            self._poll(kind)
        if self.runners:
            took = sum(self.load_s.values())
            self._say(f"fast decode path loaded ({', '.join(sorted(self.runners))}, {took:.1f} s) from {cache_dir()}")

    def _say(self, msg: str) -> None:
        if self.verbose:
            print(f"nanoseek: {msg}", file=sys.stderr, flush=True)

    def _poll(self, kind: str, start: bool = False) -> bool:
        """Whether artifact `kind` is loaded; loads it once its file exists, starts its build if asked."""
        if kind in self.runners:
            return True
        if kind in self.failed:
            return False
        path = self.paths[kind]
        if kind in self.builds:
            proc, t0, log = self.builds[kind]
            if proc.poll() is None:
                if time.perf_counter() - t0 > self.build_timeout_s:
                    proc.kill()
                    del self.builds[kind]
                    self._fail(kind, f"its build took over {self.build_timeout_s:.0f} s and was stopped")
                return False
            del self.builds[kind]
            if proc.returncode != 0 or not path.exists():
                tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.exists() else []
                self._fail(kind, f"building it failed ({'; '.join(tail) or proc.returncode})")
                return False
            self.build_s[kind] = time.perf_counter() - t0
            self._say(f"fast decode step '{kind}' compiled in {self.build_s[kind]:.0f} s (once; cached in {path})")
        if path.exists():
            try:
                t0 = time.perf_counter()
                runner = torch._inductor.aoti_load_package(str(path))
                if self.out_in and not self._out_in:
                    self._out_in = [
                        (w, torch.empty_like(w.transpose(1, 2), memory_format=torch.contiguous_format), None)
                        for _, m in routed_experts(self.model)
                        for w in (m.w13, m.w2)
                    ]
                self.runners[kind] = runner.loader
                self.load_s[kind] = time.perf_counter() - t0
                return True
            except Exception as e:  # a corrupt or incompatible file: rebuild it once
                path.unlink(missing_ok=True)
                if kind in self.build_s:  # the one we just built: give up
                    self._fail(kind, f"loading {path} failed: {e!r}")
                    return False
        if start and kind not in self.builds:
            self._start_build(kind)
        return False

    def _fail(self, kind: str, why: str) -> None:
        self.failed.add(kind)
        self._say(f"fast decode step '{kind}' unavailable, decoding eagerly: {why}")

    def _start_build(self, kind: str) -> None:
        path = self.paths[kind]
        path.parent.mkdir(parents=True, exist_ok=True)
        log = path.with_suffix(".log")
        spec = {
            "config": self.model.config.to_dict(),
            "kind": kind,
            "steps": self.steps,
            "kv_shape": list(self.kv_shape),
            "threads": self.threads[kind],
            "out_in": kind in self.out_in_kinds,
            "out": str(path),
        }
        spec_file = Path(tempfile.mkstemp(suffix=".json", prefix="nanoseek-aoti-")[1])
        spec_file.write_text(json.dumps(spec))
        self._say(f"compiling the fast decode step '{kind}' in the background (first time for this model)")
        with open(log, "w") as f:
            proc = subprocess.Popen(  # lowest priority: a background build must not slow what runs meanwhile
                [sys.executable, "-m", "nanoseek.infer.fast_decode", str(spec_file)],
                stdout=f,
                stderr=subprocess.STDOUT,
                preexec_fn=_lowest_priority if hasattr(os, "nice") else None,
            )
        self.builds[kind] = (proc, time.perf_counter(), log)

    def ready(self, n_rows: int) -> bool:
        """Whether the artifact for n_rows rows is loaded (the first call for one not built starts its build)."""
        return self._poll("b1" if n_rows == 1 else "bn", start=True)

    def wait(self, timeout: float | None = None) -> bool:
        """Build (if needed) and load both artifacts, blocking; returns whether both are loaded."""
        t0 = time.perf_counter()
        while any(k not in self.runners and k not in self.failed for k in self.paths):
            for k in self.paths:
                self._poll(k, start=True)
            if timeout is not None and time.perf_counter() - t0 > timeout:
                return False
            time.sleep(0.2)
        return len(self.runners) == len(self.paths)

    def close(self) -> None:
        for proc, _, _ in self.builds.values():
            proc.kill()
        self.builds.clear()

    def decode(self, slots: list[int], tokens: list[int], start: list[int]) -> list[list[int]]:
        """`steps` greedy tokens per row, their latents written to the cache (the caller advances lengths)."""
        kind = "b1" if len(slots) == 1 else "bn"
        runner = self.runners[kind]
        C = max(start) + self.steps - 1
        flat = [
            *self.weights,
            *(self.out_in_copies() if kind in self.out_in_kinds else ()),  # the weights end with them
            torch.tensor(tokens),
            self.cache.kv,
            torch.tensor(slots),
            torch.tensor(start),
            self._past[: max(C, 2)],
        ]
        (out,) = runner.boxed_run(flat)
        return out.tolist()

    def out_in_copies(self) -> list[torch.Tensor]:
        """The [out, in] expert copies, refreshed where the weights changed since (GRPO's in-place updates, a
        loaded state dict, `param.data = ...`): a tensor's version counter moves with every in-place write, and
        its data pointer with a swapped storage."""
        for i, (w, copy, seen) in enumerate(self._out_in):
            version = _version(w)
            version = None if version is None else (version, w.data_ptr())
            if version is None or version != seen:
                with torch.no_grad():
                    copy.copy_(w.transpose(1, 2))
                self._out_in[i] = (w, copy, version)
        return [copy for _, copy, _ in self._out_in]


def _version(t: torch.Tensor) -> int | None:
    """The tensor's version counter (None for inference tensors, which have none: copied on every call)."""
    try:
        return t._version
    except RuntimeError:
        return None


def _lowest_priority() -> None:
    os.nice(19)


def _main(spec_file: str) -> None:
    """A build process: one artifact, once. Engines that ask for the same artifact at the same time (a server and
    a chat started together, two ranks) queue on its lock file; the later ones then find it built and exit."""
    spec = json.loads(Path(spec_file).read_text())
    Path(spec_file).unlink(missing_ok=True)
    out = Path(spec["out"])
    with open(out.with_suffix(".lock"), "a") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or when this process dies
        if out.exists():
            print(f"{out} was built by another process meanwhile")
            return
        t0 = time.perf_counter()
        config = ModelConfig.from_dict(spec["config"])
        kv_shape, out_in = tuple(spec["kv_shape"]), spec.get("out_in", False)
        build(config, spec["kind"], spec["steps"], kv_shape, spec["threads"], out, out_in)
        print(f"built {out} in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    _main(sys.argv[1])
