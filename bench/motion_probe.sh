#!/usr/bin/env bash
# Issue 8, acceptance 1: does pretraining teach the encoder motion? On the labelled motion
# benchmark (tools/motion_bench.py: 8 camera motions over real photographs, split by image),
# a tiny encoder is pretrained for the same fixed budget of steps with V-JEPA and with the
# pixel objective (VideoMAE-style), and a random-init encoder (`vjepa init`) is the floor.
# Each is probed frozen with the same attentive probe (`vjepa probe`) at 100 % and 10 % of
# the train labels; prints the top-1 table and writes it to OUT/results.md.
#   bench/motion_probe.sh [STEPS]          (default 600 pretraining steps, batch 8)
# Environment: OUT (target/motion-probe), PROBE_EPOCHS (200), PROBE_LR (0.003), VIEWS (3),
# SEEDS (probe seeds, averaged; "0"), CLIPS_PER_CLASS (benchmark size, 2), SOURCE (photos, or
# digits: motion_bench.py --source digits; give it its own OUT), AUGMENT (the probe's train
# clips: none, as the README's figures were taken and so the token tables feature_stats.py
# reads are written; or official).
# Everything (data, configs, checkpoints, probes) lives in OUT; the data is made once.
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS="${1:-600}"
OUT="${OUT:-target/motion-probe}"
PROBE_EPOCHS="${PROBE_EPOCHS:-200}"
PROBE_LR="${PROBE_LR:-0.003}"
VIEWS="${VIEWS:-3}"
SEEDS="${SEEDS:-0}"
AUGMENT="${AUGMENT:-none}"
IPE=30  # 240 train clips / batch 8
if (( STEPS % IPE != 0 )); then
  echo "motion_probe.sh: STEPS must be a multiple of $IPE" >&2
  exit 2
fi
cargo build --release --locked -q -p vjepa-pipeline --bin vjepa
BIN="${CARGO_TARGET_DIR:-target}/release/vjepa"
mkdir -p "$OUT"
DATA="$OUT/data"
if [ ! -f "$DATA/test.csv" ]; then
  PY="$(ops/motion-venv.sh)"
  "$PY" tools/motion_bench.py "$DATA" --source "${SOURCE:-photos}" --clips-per-class "${CLIPS_PER_CLASS:-2}"
fi

# The quickstart model (ViT D 96, depth 4) at 64 px with 8-px patches (8×8×8 = 512 tokens),
# batch 8, STEPS steps (the schedules span exactly the budget), one checkpoint at the end.
config() { # NAME EXTRA_MODEL_LINES
  sed -e "s#^    - samples/videos/ .*#    - $DATA/train.csv#" \
      -e "s#^  folder: out/quickstart/#  folder: $OUT/$1/#" \
      -e "s#^  dir: out/quickstart/#  dir: $OUT/$1/#" \
      -e "s#^  batch_size: 4#  batch_size: 8#" \
      -e "s#^  crop_size: 96#  crop_size: 64#" \
      -e "s#^  patch_size: 16#  patch_size: 8#" \
      -e "s#^  ipe: 10#  ipe: $IPE#" \
      -e "s#^  epochs: 6#  epochs: $((STEPS / IPE))#" \
      -e "s#^  checkpoint_every: 30#  checkpoint_every: $STEPS#" \
      -e "s#^  listen: .*#  listen: null#" \
      -e "s#^  model_name: vit_tiny#  model_name: vit_tiny$2#" \
      configs/quickstart.yaml > "$OUT/$1.yaml"
  grep -q "$DATA/train.csv" "$OUT/$1.yaml" && grep -q "patch_size: 8" "$OUT/$1.yaml" \
    && grep -q "epochs: $((STEPS / IPE))" "$OUT/$1.yaml" \
    || { echo "motion_probe.sh: configs/quickstart.yaml layout changed" >&2; exit 1; }
}
config vjepa ""
# The pixel decoder as light as V-JEPA's predictor (width 48, 2 blocks).
config pixel "\n  objective: pixel\n  pixel: {mask_ratio: 0.9, decoder_depth: 2, decoder_dim: 48, decoder_heads: 3}"
config random ""

ckpt() { printf '%s/%s/checkpoints/step-%08d.safetensors' "$OUT" "$1" "$STEPS"; }
for name in vjepa pixel; do
  if [ ! -f "$(ckpt "$name")" ]; then
    echo "pretraining $name for $STEPS steps ..." >&2
    start=$(date +%s)
    "$BIN" train --config "$OUT/$name.yaml" --fresh > "$OUT/$name.log" 2>&1
    echo "  $name: $(( $(date +%s) - start )) s; $(tail -1 "$OUT/$name.log")" >&2
  fi
done
mkdir -p "$OUT/random/checkpoints"
"$BIN" init --config "$OUT/random.yaml" --out "$(ckpt random)" >&2

# top-1 (%) of one probe run
probe() { # NAME FRACTION SEED
  local dir="$OUT/probe-$1-$2-s$3"
  "$BIN" probe --checkpoint "$(ckpt "$1")" --train "$DATA/train.csv" --val "$DATA/test.csv" \
    --out "$dir" --views "$VIEWS" --epochs "$PROBE_EPOCHS" --lr "$PROBE_LR" \
    --label-fraction "$2" --seed "$3" --augment "$AUGMENT" 2> "$dir.log" | tee -a "$dir.log" \
    | sed -n 's/^top-1 \([0-9.]*\) %.*/\1/p'
}
declare -A TOP1
for frac in 1.0 0.1; do
  for name in random pixel vjepa; do
    vals=""
    for seed in $SEEDS; do
      v="$(probe "$name" "$frac" "$seed")"
      [ -n "$v" ] || { echo "probe $name $frac seed $seed failed: see $OUT/probe-$name-$frac-s$seed.log" >&2; exit 1; }
      vals="$vals $v"
    done
    TOP1[$name,$frac]="$(echo "$vals" | awk '{s=0; for(i=1;i<=NF;i++) s+=$i; printf "%.1f", s/NF}')"
    echo "  probe $name, labels $frac: top-1 per seed$vals → mean ${TOP1[$name,$frac]}" >&2
  done
done

{
  echo "| encoder (pretrained $STEPS steps) | top-1, 100 % labels | top-1, 10 % labels |"
  echo "|---|---|---|"
  for name in random pixel vjepa; do
    label="$name"
    [ "$name" = random ] && label="random init (no pretraining)"
    [ "$name" = pixel ] && label="pixel objective (VideoMAE-style)"
    [ "$name" = vjepa ] && label="V-JEPA"
    echo "| $label | ${TOP1[$name,1.0]} % | ${TOP1[$name,0.1]} % |"
  done
  for frac in 1.0 0.1; do
    awk -v f="$frac" -v v="${TOP1[vjepa,$frac]}" -v r="${TOP1[random,$frac]}" -v p="${TOP1[pixel,$frac]}" \
      'BEGIN { printf "\nlabels %s: V-JEPA − random %+.1f points (goal ≥ +20), V-JEPA − pixel %+.1f points (goal > 0)\n", f, v - r, v - p }'
  done
  echo
  echo "8 classes (chance 12.5 %), $(wc -l < "$DATA/train.csv") train / $(wc -l < "$DATA/test.csv") test clips; probe: $PROBE_EPOCHS epochs, lr $PROBE_LR, $VIEWS views, seeds $SEEDS (mean)."
} | tee "$OUT/results.md"
