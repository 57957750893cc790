#!/usr/bin/env bash
# Issue 10, item 1: our V-JEPA training step against the official code's step, same device, same
# clip, masks and settings, in one run. Prints s/step, clips/s, model TFLOP/s (matmul FLOPs
# counted from the shapes, bench/gpu_step_official.py `model_flops`), MFU against PEAK_TFLOPS,
# peak memory, and the ratio of our clips/s to each official variant's (> 1: we are faster).
#   bench/gpu-step.sh [CONFIG]              (default configs/vitl16.yaml: ViT-L/16, batch 24)
# Environment:
#   JEPA_DIR      a checkout of facebookresearch/jepa (required; never committed here)
#   DEVICE        cuda (default) or cpu — cpu checks the harness on a small config
#                 (bench/configs/official_tiny_64.yaml) where no GPU is lent
#   DTYPE         bf16 (default on cuda: the official configs' bfloat16 autocast) or f32
#   BATCH         clips per step (default: the config's data.batch_size)
#   WARMUP, STEPS untimed and timed steps (3, 10)
#   COMPILE=1     also time the official step with torch.compile on the target encoder
#   PEAK_TFLOPS   the device's measured dense bf16 GEMM peak, for MFU (optional)
#   TRAIN_STEP    a prebuilt train-step binary (default: build it, with the cuda feature on cuda)
#   TORCH_PYTHON  python with torch, safetensors, numpy, pyyaml (default: ops/torch-venv.sh)
# Writes OUT (target/gpu-step)/{inputs.safetensors, *.json, results.md}.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG="${1:-configs/vitl16.yaml}"
DEVICE="${DEVICE:-cuda}"
if [ "$DEVICE" = cpu ]; then DTYPE="${DTYPE:-f32}"; else DTYPE="${DTYPE:-bf16}"; fi
WARMUP="${WARMUP:-3}"; STEPS="${STEPS:-10}"
OUT="${OUT:-target/gpu-step}"
[ -n "${JEPA_DIR:-}" ] && [ -f "$JEPA_DIR/app/vjepa/utils.py" ] \
  || { echo "gpu-step.sh: set JEPA_DIR to a checkout of facebookresearch/jepa" >&2; exit 2; }
case "$DTYPE" in bf16|f32) ;; *) echo "gpu-step.sh: DTYPE is bf16 or f32" >&2; exit 2 ;; esac
PY="${TORCH_PYTHON:-$(ops/torch-venv.sh)}"
if [ -z "${TRAIN_STEP:-}" ]; then
  features=(); [ "$DEVICE" = cpu ] || features=(--features cuda)
  cargo build --release --locked -q -p vjepa-bench --bin train-step "${features[@]}"
  TRAIN_STEP="${CARGO_TARGET_DIR:-target}/release/train-step"
fi
mkdir -p "$OUT"
ours_flags=(--device "$DEVICE"); off_flags=(--device "$DEVICE")
if [ "$DTYPE" = bf16 ]; then ours_flags+=(--bf16); off_flags+=(--bf16); fi
[ -n "${BATCH:-}" ] && ours_flags+=(--batch-size "$BATCH")
[ "$DEVICE" = cpu ] && off_flags+=(--threads "$(nproc)")

echo "ours: $TRAIN_STEP --config $CONFIG ${ours_flags[*]}" >&2
"$TRAIN_STEP" --config "$CONFIG" --inputs "$OUT/inputs.safetensors" --warmup "$WARMUP" \
  --steps "$STEPS" "${ours_flags[@]}" > "$OUT/ours.json"
runs=(ours)
official() { # NAME FLAGS...
  local name=$1; shift
  echo "official ($name): ${off_flags[*]} $*" >&2
  "$PY" bench/gpu_step_official.py --inputs "$OUT/inputs.safetensors" --jepa-dir "$JEPA_DIR" \
    "${off_flags[@]}" "$@" > "$OUT/$name.json"
  runs+=("$name")
}
official official
official official_logging --logging
[ "${COMPILE:-0}" = 1 ] && official official_compile --compile

"$PY" - "$OUT" "$CONFIG" "${PEAK_TFLOPS:-}" "${runs[@]}" <<'PYEOF' | tee "$OUT/results.md"
import json, sys
out, config, peak, names = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
rows = {n: json.load(open(f"{out}/{n}.json")) for n in names}
flops = rows["official"]["flops_per_step"]  # same inputs: the same work for every row
ours = rows["ours"]
batch = ours["batch_size"]
print(f"{config}: batch {batch}, {ours['device']}, {ours['dtype']}; "
      f"{flops / 1e12:.2f} model TFLOP per step (matmuls)")
print()
print("| step | s/step (median) | clips/s | TFLOP/s | MFU | peak memory | ours ÷ this |")
print("|---|---|---|---|---|---|---|")
for n in names:
    r = rows[n]
    s = r["median_s"]
    mem = r.get("peak_reserved_bytes") or r.get("memory_used_bytes")
    mem = f"{mem / 2**30:.1f} GiB" + (" reserved" if r.get("peak_reserved_bytes") else " in use") if mem else "–"
    tflops = flops / s / 1e12
    mfu = f"{100 * tflops / float(peak):.1f} %" if peak else "–"
    ratio = s / ours["median_s"]
    print(f"| {r['impl']} | {s:.4f} | {batch / s:.1f} | {tflops:.1f} | {mfu} | {mem} | {ratio:.2f}× |")
print()
print("first losses: " + "; ".join(
    f"{rows[n]['impl']} {', '.join(f'{l:.4f}' for l in rows[n]['losses'][:3])}" for n in names))
PYEOF
