#!/usr/bin/env bash
# One V-JEPA training step, ours (candle) vs PyTorch CPU, same shapes, masks, clip and threads,
# in one run; prints each median step time and the ratio torch/ours (> 1: we are faster).
#   bench/train-step.sh [THREADS] [CONFIG...]    (defaults: nproc; quickstart + vit_small 16×112×112)
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS="${1:-$(nproc)}"; shift || true
CONFIGS=("$@"); [ ${#CONFIGS[@]} -gt 0 ] || CONFIGS=(configs/quickstart.yaml bench/configs/vit_small_112.yaml)
STEPS="${STEPS:-5}"; WARMUP="${WARMUP:-2}"
PY="$(ops/torch-venv.sh)"
cargo build --release --locked -q -p vjepa-bench
TMP="$(mktemp -d)"; trap 'rm -rf "$TMP"' EXIT
export RAYON_NUM_THREADS="$THREADS" OMP_NUM_THREADS="$THREADS" MKL_NUM_THREADS="$THREADS"
printf '%-40s %8s %12s %12s %8s\n' config threads "ours s/step" "torch s/step" ratio
for cfg in "${CONFIGS[@]}"; do
  target/release/train-step --config "$cfg" --inputs "$TMP/in.safetensors" \
    --warmup "$WARMUP" --steps "$STEPS" > "$TMP/ours.json"
  "$PY" bench/train_step_torch.py --inputs "$TMP/in.safetensors" --threads "$THREADS" > "$TMP/torch.json"
  "$PY" - "$cfg" "$THREADS" "$TMP/ours.json" "$TMP/torch.json" <<'PYEOF'
import json, sys
cfg, threads, ours, torch = sys.argv[1], sys.argv[2], json.load(open(sys.argv[3])), json.load(open(sys.argv[4]))
print(f"{cfg:<40} {threads:>8} {ours['median_s']:>12.4f} {torch['median_s']:>12.4f} {torch['median_s']/ours['median_s']:>7.2f}x")
PYEOF
done
