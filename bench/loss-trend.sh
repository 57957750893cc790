#!/usr/bin/env bash
# Issue 10, item 4: speed without a correct update does not count. Trains the same config on the
# same videos with the same seed for STEPS steps on the CPU (f32, the reference path) and on
# DEVICE (the GPU: bf16 mixed precision when the config says meta.dtype bfloat16), then compares
# the two loss curves: step-1 loss, 20-step means at the start and the end, the largest gap
# between the 20-step running means (relative), and non-finite losses (must be none).
#   bench/loss-trend.sh [CONFIG]           (default configs/quickstart.yaml)
# Environment: DEVICE (cuda), STEPS (200), DTYPE (bf16: sets meta.dtype; f32), VJEPA (prebuilt
# binary; default: build it, with the cuda feature unless DEVICE is cpu), OUT (target/loss-trend),
# PYTHON (any python3: the runs are read through `vjepa metrics`, no Parquet library needed).
# DEVICE=cpu trains twice on the CPU (the run is deterministic: the curves must be identical),
# a harness check without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG="${1:-configs/quickstart.yaml}"
DEVICE="${DEVICE:-cuda}"; STEPS="${STEPS:-200}"; DTYPE="${DTYPE:-bf16}"
OUT="${OUT:-target/loss-trend}"
case "$DTYPE" in bf16) META=bfloat16 ;; f32) META=float32 ;; *) echo "loss-trend.sh: DTYPE is bf16 or f32" >&2; exit 2 ;; esac
VJEPA="${VJEPA:-$(bench/build-bin.sh vjepa-pipeline vjepa "$DEVICE")}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
[ -d "$OUT/videos" ] || "$VJEPA" make-samples "$OUT/videos" --count 12 >/dev/null
# The config with meta.dtype set (replaced if present, else added to meta), no metrics server.
if grep -q '^  dtype:' "$CONFIG"; then
  sed "s#^  dtype: .*#  dtype: $META#" "$CONFIG"
else
  sed "s#^meta:#meta:\n  dtype: $META#" "$CONFIG"
fi | sed "s#^  listen: .*#  listen: null#" > "$OUT/config.yaml"
grep -q "dtype: $META" "$OUT/config.yaml" || { echo "loss-trend.sh: no meta section in $CONFIG" >&2; exit 1; }
B="run-${DEVICE//:/_}"; [ "$DEVICE" = cpu ] && B=run-cpu-again
for pair in "cpu run-cpu" "$DEVICE $B"; do
  read -r dev name <<< "$pair"
  run="$OUT/$name"
  rm -rf "$run"
  echo "training $STEPS steps on $dev ..." >&2
  "$VJEPA" train --config "$OUT/config.yaml" --dataset "$PWD/$OUT/videos/" --out "$PWD/$run/" \
    --max-steps "$STEPS" --device "$dev" --fresh > "$OUT/$name.log" 2>&1 \
    || { echo "loss-trend.sh: training on $dev failed: $OUT/$name.log" >&2; exit 1; }
done
B="$OUT/$B"
for name in run-cpu "${B#"$OUT/"}"; do
  "$VJEPA" metrics "$PWD/$OUT/$name/" > "$OUT/$name.jsonl"
done
"$PY" - "$OUT/run-cpu.jsonl" "$B.jsonl" "$DEVICE" "$DTYPE" <<'PYEOF' | tee "$OUT/results.md"
import json, math, sys
a_file, b_file, device, dtype = sys.argv[1:5]
def losses(f):
    # `vjepa metrics` rows are by step; a non-finite loss is null.
    return [float("nan") if r["loss"] is None else r["loss"] for r in map(json.loads, open(f))]
a, b = losses(a_file), losses(b_file)
n = min(len(a), len(b))
w = min(20, n)
mean = lambda xs: sum(xs) / len(xs)
run_a = [mean(a[i:i + w]) for i in range(n - w + 1)]
run_b = [mean(b[i:i + w]) for i in range(n - w + 1)]
gap = max(abs(x - y) / abs(x) for x, y in zip(run_a, run_b))
bad = sum(1 for x in b[:n] if not math.isfinite(x))
print(f"{n} steps, CPU f32 vs {device} ({dtype if device != 'cpu' else 'f32'})")
print()
print("| | CPU | " + device + " |")
print("|---|---|---|")
print(f"| step-1 loss | {a[0]:.5f} | {b[0]:.5f} |")
print(f"| mean of the first {w} | {mean(a[:w]):.5f} | {mean(b[:w]):.5f} |")
print(f"| mean of the last {w} | {mean(a[n - w:n]):.5f} | {mean(b[n - w:n]):.5f} |")
print()
print(f"largest gap between the {w}-step running means: {100 * gap:.2f} % ; non-finite losses on {device}: {bad}")
PYEOF
