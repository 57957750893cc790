#!/usr/bin/env bash
# Issue 10, items 1, 2 and 5: the V-JEPA training step on the GPU, ours (bf16 mixed precision)
# against PyTorch with bf16 autocast (bench/train-step.sh with DEVICE=cuda; COMPILE=1 adds
# torch.compile), printing clips/s, model TFLOP/s, MFU (PEAK_TFLOPS), memory and the ratio.
#   bench/gpu-step.sh [CONFIG...]      (default configs/vitl16.yaml: ViT-L/16, batch 24;
#                                      configs/vith16.yaml for ViT-H)
# Environment as bench/train-step.sh (OFFICIAL_DRIVER adds the official step, the issue's first
# bar); DEVICE defaults to cuda here (cpu checks the harness).
# Steady state by default: STEPS (10) mask draws, warmed up once over the same draws
# (WARMUP = MASK_CYCLE = STEPS), so the timed steps meet no shape for the first time — as in a
# long run, where the context lengths recur. MASK_CYCLE=0 times cold shapes instead.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -gt 0 ] || set -- configs/vitl16.yaml
STEPS="${STEPS:-10}"
DEVICE="${DEVICE:-cuda}" WARMUP="${WARMUP:-$STEPS}" MASK_CYCLE="${MASK_CYCLE:-$STEPS}" STEPS="$STEPS" \
  exec bench/train-step.sh "$(nproc)" "$@"
