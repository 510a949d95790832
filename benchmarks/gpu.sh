#!/usr/bin/env bash
# One call on a lent GPU (the `device` tool): correctness checks first, then the benchmarks, nanoseek vs
# transformers on the same weights. JSON lines on stdout and appended to $OUT/gpu.jsonl (./gpu.jsonl without OUT).
# No installs: the GPU image has torch, transformers, safetensors and tokenizers. Each step is bounded by
# `timeout`, so a hang costs its own slot only; at most 580 s in all (device run: timeout_s=600).
#   bash benchmarks/gpu.sh                                     # on the GPU machine
#   DEVICE=cpu DTYPE=float32 PRESET=cpu-small QUICK=1 bash benchmarks/gpu.sh   # smoke test of the script here
#   SPEEDRUN=1 bash benchmarks/gpu.sh                          # also a shortened `nanoseek speedrun --preset gpu`
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
DEVICE=${DEVICE:-cuda} DTYPE=${DTYPE:-bfloat16} PRESET=${PRESET:-gpu-small}
out="${OUT:-.}/gpu.jsonl"
if [ -n "${QUICK:-}" ]; then seq=128 iters=2 reps=1; else seq=1024 iters=10 reps=3; fi

step() {  # step SECONDS ARGS...: python3 ARGS under a timeout; a failure is recorded as a JSON line
    local limit=$1
    shift
    echo "# $*" >&2
    timeout "$limit" python3 "$@" | tee -a "$out"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || echo "{\"failed\": \"$*\", \"rc\": $rc}" | tee -a "$out"
}

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2
step 150 -m benchmarks.gpu_check --device "$DEVICE"
step 120 -m benchmarks.model_throughput --preset "$PRESET" --device "$DEVICE" --dtype "$DTYPE" \
    --batch-size 8 --seq-len "$seq" --iters "$iters" --rounds 3
step 120 -m benchmarks.decode --preset "$PRESET" --device "$DEVICE" --reps "$reps"
step 130 -m benchmarks.decode --preset "$PRESET" --device "$DEVICE" --reps "$reps" --compile
# issue 23 item 6: the decode step captured as one CUDA graph per batch bucket vs the eager step (off CUDA: the
# same static loop without capture, a check of the script only)
step 60 -m benchmarks.cuda_graphs --preset "$PRESET" --device "$DEVICE" --dtype "$DTYPE" --batch 1 32 --reps "$reps"
# Multi-process (issue 13): on a box with 2+ GPUs only, data- and expert-parallel scaling over all of them (nccl;
# up to 4 more minutes: give such a box timeout_s=600 and QUICK=1, or run this step alone)
ngpu=$(command -v nvidia-smi >/dev/null && nvidia-smi -L | wc -l || echo 0)
if [ "$ngpu" -gt 1 ] && [ "$DEVICE" = cuda ]; then
    step 240 -m benchmarks.scaling --nproc "$ngpu" --device cuda --preset "$PRESET" --batch-size 8 \
        --seq-len "$seq" --steps "$iters" --peak-flops 989e12
fi
# the speedrun's gpu recipe, shortened to fit one device call (the full recipe is about an hour):
# bf16 autocast, compiled loss, gpu-small; report.md/json under $OUT/speedrun_gpu
if [ -n "${SPEEDRUN:-}" ]; then
    step 420 -m nanoseek speedrun --preset gpu --out "${OUT:-.}/speedrun_gpu" --set pretrain_steps=2000 \
        --set sft_steps=300 --set grpo_steps=40 --set eval_n=2100 --set passk_n=140
fi
