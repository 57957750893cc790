#!/usr/bin/env bash
# Issue 10, item 3: the whole job (object store → GStreamer decode → crop → masks → step) on
# real H.264 videos, per resolution: clips/s, step time, the share of the step the trainer
# waited for data (goal < 5 % at the GPU step rate), and the decode capacity of the machine's
# decode threads (clips/s they could deliver if never idle: threads × clips ÷ decode seconds),
# so the resolution where CPU decode stops keeping up with the step can be read off.
#   bench/gpu-pipeline.sh [CONFIG]        (default configs/vitl16.yaml on cuda)
# Environment:
#   DEVICE        cuda (default) or cpu — cpu checks the harness with
#                 bench/configs/vit_tiny_64.yaml where no GPU is lent
#   RESOLUTIONS   "1280x720 854x480 640x360" (WxH, in run order; H.264 MP4, 30 fps, a keyframe every 2 s, made
#                 by `vjepa make-samples` with x264 at a constant bitrate of BPP bits per pixel;
#                 moving colour bars and noise, which fill that rate)
#   BPP           bits per pixel and frame (0.1: 2.8 Mbit/s at 720p30, as streaming sites use)
#   VIDEOS        videos per resolution (24), DURATION seconds each (10)
#   STEPS         steps per resolution (60), SKIP first steps left out of the figures (10)
#   THREADS       decode threads (workers.decode_threads; default nproc)
#   VIDEO_DECODER software (default) or nvdec (workers.video_decoder: GStreamer's NVDEC
#                 elements, for when CPU decode cannot keep up)
#   VJEPA         a prebuilt vjepa binary (default: build it, with the cuda feature on cuda)
#   PYTHON        any python3 (the runs are read through `vjepa metrics`: no Parquet library)
# Outputs in OUT (target/gpu-pipeline): media/, run-RES/, results.md.
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE="${DEVICE:-cuda}"
if [ "$DEVICE" = cpu ]; then CONFIG="${1:-bench/configs/vit_tiny_64.yaml}"; else CONFIG="${1:-configs/vitl16.yaml}"; fi
# 720p first: the resolution the measurement is about keeps its row if the run is cut short.
RESOLUTIONS="${RESOLUTIONS:-1280x720 854x480 640x360}"
BPP="${BPP:-0.1}"
VIDEOS="${VIDEOS:-24}"; DURATION="${DURATION:-10}"
STEPS="${STEPS:-60}"; SKIP="${SKIP:-10}"
THREADS="${THREADS:-$(nproc)}"
VIDEO_DECODER="${VIDEO_DECODER:-software}"
OUT="${OUT:-target/gpu-pipeline}"
(( STEPS > SKIP )) || { echo "gpu-pipeline.sh: STEPS must exceed SKIP" >&2; exit 2; }
VJEPA="${VJEPA:-$(bench/build-bin.sh vjepa-pipeline vjepa "$DEVICE")}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"; OUT="$(cd "$OUT" && pwd)"

# Real encoded content: x264 over two of videotestsrc's patterns that fill the bitrate (moving
# colour bars, noise): at 720p they decode at 1.5-1.7 ms a frame on one core, like ffmpeg's
# testsrc2 and mandelbrot at crf 23 (1.3 and 2.3 ms); a ball on black would take 0.6.
# The resolutions' corpora are made side by side (one process each: a process makes its smpte
# videos one after another, see `vjepa make-samples`, and its snow ones in parallel).
makers=()
for res in $RESOLUTIONS; do
  rate=$(awk -v r="$res" -v b="$BPP" 'BEGIN { split(r, s, "x"); printf "%d", s[1] * s[2] * 30 * b / 1000 }')
  dir="$OUT/media/$res"
  [ "$(ls "$dir" 2>/dev/null | wc -l)" -ge "$VIDEOS" ] && continue
  echo "making $VIDEOS H.264 videos at $res, $rate kbit/s, in $dir ..." >&2
  "$VJEPA" make-samples "$dir" --count "$VIDEOS" --size "$res" --fps 30 \
    --frames $((DURATION * 30)) --codec h264fs --bitrate "$rate" --keyframe-interval 60 \
    --pattern "smpte horizontal-speed=4" --pattern "snow" >/dev/null &
  makers+=($!)
done
for pid in "${makers[@]}"; do wait "$pid"; done

# One row per resolution, printed as soon as its run is done (a run cut short keeps the rows
# before it); a failed run is a row saying so, and the others still run (exit 1 at the end).
{
  echo "$CONFIG on $DEVICE, $THREADS decode threads; steps after the first $SKIP"
  echo
  echo "| input | steps | clips/s | step s (mean) | data wait share | decode capacity clips/s | keeps up | NVDEC share |"
  echo "|---|---|---|---|---|---|---|---|"
} | tee "$OUT/results.md"
failed=0
for res in $RESOLUTIONS; do
  run="$OUT/run-$res"
  rm -rf "$run"; mkdir -p "$run"
  # The config with this run's corpus, output, decode threads and no metrics server.
  { cat "$CONFIG"; printf 'workers:\n  count: 1\n  decode_threads: %s\n  video_decoder: %s\ntelemetry:\n  listen: null\n' \
    "$THREADS" "$VIDEO_DECODER"; } \
    > "$run/config.yaml"
  echo "training $STEPS steps on $res ($DEVICE, $THREADS $VIDEO_DECODER decode threads) ..." >&2
  if ! "$VJEPA" train --config "$run/config.yaml" --dataset "$OUT/media/$res/" --out "$run/out/" \
    --max-steps "$STEPS" --device "$DEVICE" --fresh > "$run/train.log" 2>&1 \
    || ! "$VJEPA" metrics "$run/out/" > "$run/metrics.jsonl"; then
    why=$(grep -v '^[[:space:]]*$' "$run/train.log" | tail -n 1 | cut -c1-200)
    echo "| $res H.264 | failed: ${why//|//} (see $run/train.log) | – | – | – | – | – | – |" | tee -a "$OUT/results.md"
    failed=1
    continue
  fi
  "$PY" - "$run/metrics.jsonl" "$res" "$THREADS" "$SKIP" <<'PYEOF' | tee -a "$OUT/results.md" || failed=1
import json, sys
path, res, threads, skip = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
rows = [r for r in map(json.loads, open(path)) if r["step"] > skip]
if not rows:
    print(f"| {res} H.264 | no steps after the first {skip} | – | – | – | – | – | – |")
    sys.exit(0)
step = sum(r["step_time_s"] for r in rows)
wait = sum(r["data_wait_s"] for r in rows)
clips = sum(r["clips_per_sec"] * (r["step_time_s"] + r["data_wait_s"]) for r in rows)
decode = sum(r["decode_s"] for r in rows)
rate = clips / (step + wait)
capacity = threads * clips / decode if decode > 0 else float("inf")
step_rate = clips / step  # what the trainer could take if never waiting
# Clips NVDEC decoded (the rest: software, incl. NVDEC failures decoded again); 0 without nvdec.
nvdec = sum(r.get("nvdec_clips", 0) for r in rows) / max(clips, 1e-9)
print(f"| {res} H.264 | {len(rows)} | {rate:.1f} | {step / len(rows):.3f} | {100 * wait / (step + wait):.1f} % "
      f"| {capacity:.1f} | {'yes' if capacity >= step_rate else 'no'} (step takes {step_rate:.1f}) "
      f"| {100 * nvdec:.0f} % |")
PYEOF
done
exit "$failed"
