#!/usr/bin/env bash
# Ingest benchmark (issue 5, acceptance 4): ours vs ffmpeg (the decode limit) vs the official
# loader's way (decord get_batch + numpy crop/resize/normalise), same files, same clips, same cores,
# one run; prints clips/s per (resolution, codec), the ratios, bytes read per clip and a fidelity check.
#   bench/ingest.sh [THREADS]        (default: nproc)
# Environment: CLIPS (timed clips per group, default 32), REPEAT (rounds: each decoder sees each
# clip REPEAT times, default 2), SEED (0), DECORD_TRANSFORM (lean: only the rows the resize reads
# go to float, default; official: the whole clip to float32 first, as the official transform).
# Videos (360p/720p × H.264 MP4 / VP9 WebM, 10 s, 30 fps, GOP 60, 4 contents each) are made once
# with ffmpeg into target/ingest-bench/media (~8 min on 2 cores); decord comes from
# ops/decord-venv.sh (.tools/decord-venv, PyPI `decord2`).
# Results also go to target/ingest-bench/results.json.
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS="${1:-$(nproc)}"
for tool in ffmpeg ffprobe; do
  command -v "$tool" >/dev/null || { echo "ingest.sh: $tool not found; run ops/setup.sh" >&2; exit 1; }
done
PY="$(ops/decord-venv.sh)"
cargo build --release --locked -q -p vjepa-bench --bin ingest
BIN="${CARGO_TARGET_DIR:-target}/release/ingest"
CACHE=target/ingest-bench
mkdir -p "$CACHE"
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 GST_DEBUG="${GST_DEBUG:-0}"
"$PY" bench/ingest_bench.py --bin "$BIN" --cache "$CACHE" --threads "$THREADS" \
  --clips "${CLIPS:-32}" --repeat "${REPEAT:-2}" --seed "${SEED:-0}" \
  --decord-transform "${DECORD_TRANSFORM:-lean}" --json "$CACHE/results.json"
