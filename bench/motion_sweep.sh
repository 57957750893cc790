#!/usr/bin/env bash
# Issue 8, acceptance 1, the follow-up: which V-JEPA settings keep motion in a tiny encoder?
# Pretrains the motion benchmark's V-JEPA config (bench/motion_probe.sh, which must have run
# first with the same STEPS) once per variant below, probes each frozen at 100 % labels, and
# prints top-1, its difference to the random-init encoder probed the same way in this run (the
# peer; the goal is ≥ +20 points), and the effective rank of the target features at the last
# step (`target_rank`, near 1: dimensional collapse).
#   bench/motion_sweep.sh [STEPS] [VARIANT ...]      (default 600 steps, every variant)
# Environment: OUT (target/motion-probe, as motion_probe.sh), VIEWS (1), PROBE_EPOCHS (200),
# PROBE_LR (0.003), WORKERS (1: two variants can then run side by side on 2 cores), AUGMENT
# (the probe's train clips: none, as the README's figures were taken, or official).
# Each variant is a sed edit of OUT/vjepa.yaml; results go to OUT/sweep-VARIANT/ and
# OUT/sweep.md (appended, one table per run).
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS="${1:-600}"
shift || true
OUT="${OUT:-target/motion-probe}"
VIEWS="${VIEWS:-1}"
AUGMENT="${AUGMENT:-none}"
WORKERS="${WORKERS:-1}"
# The one-line edits the variants combine.
EMA9995='s#^  ema: \[0.998, 1.0\]#  ema: [0.9995, 1.0]#'
WD004='s#^  final_weight_decay: 0.4#  final_weight_decay: 0.04#'
REG1='s#^  reg_coeff: 0.0#  reg_coeff: 1.0#'
LR3E4='s#^  lr: 0.001#  lr: 0.0003#; s#^  start_lr: 0.0002#  start_lr: 0.0001#'
PRED4W96='s#^  pred_depth: 2#  pred_depth: 4#; s#^  pred_embed_dim: 48#  pred_embed_dim: 96#'
declare -A EDIT=(
  [spec]=''
  [ema9995]="$EMA9995"
  [wd004]="$WD004"
  [ema9995_wd004]="$EMA9995; $WD004"
  [temporal_keep05]='s#max_temporal_keep: 1.0#max_temporal_keep: 0.5#'
  [reg1]="$REG1"
  [reg1_ema9995]="$REG1; $EMA9995"
  [longrange04_ema9995]="s#spatial_scale: \[0.7, 0.7\]#spatial_scale: [0.4, 0.4]#; $EMA9995"
  [pred_depth1_ema9995]="s#^  pred_depth: 2#  pred_depth: 1#; $EMA9995"
  [lr3e4_ema9995]="$LR3E4; $EMA9995"
  [pred4w96]="$PRED4W96"
  [pred4w96_lr3e4_ema9995]="$PRED4W96; $LR3E4; $EMA9995"
)
ORDER=(spec ema9995 wd004 ema9995_wd004 temporal_keep05 reg1 reg1_ema9995 longrange04_ema9995 pred_depth1_ema9995 lr3e4_ema9995 pred4w96 pred4w96_lr3e4_ema9995)
[ $# -gt 0 ] && ORDER=("$@")
BASE="$OUT/vjepa.yaml"
DATA="$OUT/data"
grep -q "epochs: $((STEPS / 30))" "$BASE" 2>/dev/null \
  || { echo "motion_sweep.sh: run bench/motion_probe.sh $STEPS first (needs $BASE for $STEPS steps)" >&2; exit 2; }
RANDOM_CKPT="$(printf '%s/random/checkpoints/step-%08d.safetensors' "$OUT" "$STEPS")"
[ -f "$RANDOM_CKPT" ] || { echo "motion_sweep.sh: no $RANDOM_CKPT (run bench/motion_probe.sh $STEPS)" >&2; exit 2; }
cargo build --release --locked -q -p vjepa-pipeline --bin vjepa
BIN="${CARGO_TARGET_DIR:-target}/release/vjepa"

# top-1 (%) of the probe of CHECKPOINT, written to DIR
probe() { # CHECKPOINT DIR
  "$BIN" probe --checkpoint "$1" --train "$DATA/train.csv" --val "$DATA/test.csv" \
    --out "$2" --views "$VIEWS" --epochs "${PROBE_EPOCHS:-200}" --lr "${PROBE_LR:-0.003}" \
    --label-fraction 1.0 --seed 0 --augment "$AUGMENT" > "$2.log" 2>&1
  sed -n 's/^top-1 \([0-9.]*\) %.*/\1/p' "$2.log"
}
random_top1="$(probe "$RANDOM_CKPT" "$OUT/sweep-random-probe")"
[ -n "$random_top1" ] || { echo "motion_sweep.sh: random-init probe failed: $OUT/sweep-random-probe.log" >&2; exit 1; }
{
  echo
  echo "$STEPS steps; probe 100 % labels, $VIEWS view(s); random init (the peer): $random_top1 %"
  echo
  echo "| variant | edit | top-1 | V-JEPA − random (goal ≥ +20) | target_rank |"
  echo "|---|---|---|---|---|"
} | tee -a "$OUT/sweep.md"
for v in "${ORDER[@]}"; do
  [ -n "${EDIT[$v]+set}" ] || { echo "motion_sweep.sh: unknown variant $v (${!EDIT[*]})" >&2; exit 2; }
  dir="$OUT/sweep-$v"
  mkdir -p "$dir"
  edits=(-e "s#^  folder: .*#  folder: $dir/#" -e "s#^  dir: .*#  dir: $dir/#" -e "s#^  count: .*#  count: $WORKERS#")
  if [ -n "${EDIT[$v]}" ]; then
    cmp -s <(sed -e "${EDIT[$v]}" "$BASE") "$BASE" \
      && { echo "motion_sweep.sh: variant $v changes nothing in $BASE" >&2; exit 1; }
    edits+=(-e "${EDIT[$v]}")
  fi
  sed "${edits[@]}" "$BASE" > "$dir/config.yaml"
  "$BIN" train --config "$dir/config.yaml" --fresh > "$dir/train.log" 2>&1
  rank="$(grep -o 'rank=[0-9.]*' "$dir/train.log" | tail -1 | cut -d= -f2)"
  ckpt="$(printf '%s/checkpoints/step-%08d.safetensors' "$dir" "$STEPS")"
  top1="$(probe "$ckpt" "$dir/probe")"
  [ -n "$top1" ] || { echo "motion_sweep.sh: probe of $v failed: $dir/probe.log" >&2; exit 1; }
  diff="$(awk -v a="$top1" -v b="$random_top1" 'BEGIN { printf "%+.1f", a - b }')"
  echo "| $v | \`${EDIT[$v]:-(spec recipe)}\` | $top1 % | $diff | $rank |" | tee -a "$OUT/sweep.md"
done
