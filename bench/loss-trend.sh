#!/usr/bin/env bash
# Issue 10, item 4: speed without a correct update does not count. Trains the same config on the
# same videos with the same seed for STEPS steps on the CPU (f32, the reference path) and on
# DEVICE in each of DTYPES (the GPU: bf16 mixed precision, and f32 beside it as the noise floor:
# over 200 steps training amplifies any rounding difference, so the f32 GPU curve shows how far
# two correct implementations drift apart), then compares each curve with the CPU's: step-1
# loss, 20-step means at the start and the end, the largest gap between the 20-step running
# means (relative), and non-finite losses (must be none).
#   bench/loss-trend.sh [CONFIG]           (default configs/quickstart.yaml)
# Environment: DEVICE (cuda), STEPS (200), DTYPES ("bf16 f32"; each sets meta.dtype), VJEPA
# (prebuilt binary; default: build it, with the cuda feature unless DEVICE is cpu), OUT
# (target/loss-trend), PYTHON (any python3: the runs are read through `vjepa metrics`, no Parquet
# library needed). DEVICE=cpu trains twice on the CPU in f32 (the run is deterministic: the
# curves must be identical), a harness check without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG="${1:-configs/quickstart.yaml}"
DEVICE="${DEVICE:-cuda}"; STEPS="${STEPS:-200}"
if [ "$DEVICE" = cpu ]; then DTYPES=f32; else DTYPES="${DTYPES:-${DTYPE:-bf16 f32}}"; fi
OUT="${OUT:-target/loss-trend}"
VJEPA="${VJEPA:-$(bench/build-bin.sh vjepa-pipeline vjepa "$DEVICE")}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"; OUT="$(cd "$OUT" && pwd)"
[ -d "$OUT/videos" ] || "$VJEPA" make-samples "$OUT/videos" --count 12 >/dev/null
# The config with meta.dtype set (replaced if present, else added to meta), no metrics server,
# one worker (a GPU takes one; the CPU run the same, so both compute the same batches alike).
config_for() {
  local meta
  case "$1" in bf16) meta=bfloat16 ;; f32) meta=float32 ;; *) echo "loss-trend.sh: DTYPES are bf16 or f32" >&2; exit 2 ;; esac
  if grep -q '^  dtype:' "$CONFIG"; then
    sed "s#^  dtype: .*#  dtype: $meta#" "$CONFIG"
  else
    sed "s#^meta:#meta:\n  dtype: $meta#" "$CONFIG"
  fi | sed -e "s#^  listen: .*#  listen: null#" -e "s#^  count: .*#  count: 1#" > "$OUT/config-$1.yaml"
  grep -q "dtype: $meta" "$OUT/config-$1.yaml" || { echo "loss-trend.sh: no meta section in $CONFIG" >&2; exit 1; }
}
runs=("cpu f32 run-cpu")
for dt in $DTYPES; do
  if [ "$DEVICE" = cpu ]; then runs+=("cpu f32 run-cpu-again"); else runs+=("$DEVICE $dt run-${DEVICE//:/_}-$dt"); fi
done
names=()
for r in "${runs[@]}"; do
  read -r dev dt name <<< "$r"
  config_for "$dt"
  run="$OUT/$name"
  rm -rf "$run"
  echo "training $STEPS steps on $dev ($dt) ..." >&2
  "$VJEPA" train --config "$OUT/config-$dt.yaml" --dataset "$OUT/videos/" --out "$run/" \
    --max-steps "$STEPS" --device "$dev" --fresh > "$OUT/$name.log" 2>&1 \
    || { echo "loss-trend.sh: training on $dev ($dt) failed: $OUT/$name.log" >&2; exit 1; }
  "$VJEPA" metrics "$run/" > "$OUT/$name.jsonl"
  names+=("$dev $dt $OUT/$name.jsonl")
done
"$PY" - "${names[@]}" <<'PYEOF' | tee "$OUT/results.md"
import json, math, sys
runs = [a.split(" ", 2) for a in sys.argv[1:]]  # device, dtype, jsonl
def losses(f):
    # `vjepa metrics` rows are by step; a non-finite loss is null.
    return [float("nan") if r["loss"] is None else r["loss"] for r in map(json.loads, open(f))]
curves = [losses(f) for _, _, f in runs]
n = min(len(c) for c in curves)
w = min(20, n)
mean = lambda xs: sum(xs) / len(xs)
label = lambda r: f"{r[0]} {r[1]}" if r[0] != "cpu" else f"CPU {r[1]}"
print(f"{n} steps, CPU f32 vs {runs[1][0]} ({', '.join(r[1] for r in runs[1:])})")
print()
print("| | " + " | ".join(label(r) for r in runs) + " |")
print("|---" * (len(runs) + 1) + "|")
print("| step-1 loss | " + " | ".join(f"{c[0]:.5f}" for c in curves) + " |")
print(f"| mean of the first {w} | " + " | ".join(f"{mean(c[:w]):.5f}" for c in curves) + " |")
print(f"| mean of the last {w} | " + " | ".join(f"{mean(c[n - w:n]):.5f}" for c in curves) + " |")
print()
ref = [mean(curves[0][i:i + w]) for i in range(n - w + 1)]
for r, c in zip(runs[1:], curves[1:]):
    run = [mean(c[i:i + w]) for i in range(n - w + 1)]
    gap = max(abs(x - y) / abs(x) for x, y in zip(ref, run))
    bad = sum(1 for x in c[:n] if not math.isfinite(x))
    print(f"{r[0]} {r[1]}: largest gap between the {w}-step running means: {100 * gap:.2f} % ; "
          f"non-finite losses: {bad}")
PYEOF
