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
#   RESOLUTIONS   "640x360 854x480 1280x720" (WxH, H.264 MP4, 30 fps, GOP 60, made with ffmpeg)
#   VIDEOS        videos per resolution (24), DURATION seconds each (10)
#   STEPS         steps per resolution (60), SKIP first steps left out of the figures (10)
#   THREADS       decode threads (workers.decode_threads; default nproc)
#   VIDEO_DECODER software (default) or nvdec (workers.video_decoder: GStreamer's NVDEC
#                 elements, for when CPU decode cannot keep up)
#   VJEPA         a prebuilt vjepa binary (default: build it, with the cuda feature on cuda)
# Outputs in OUT (target/gpu-pipeline): media/, run-RES/, results.md.
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE="${DEVICE:-cuda}"
if [ "$DEVICE" = cpu ]; then CONFIG="${1:-bench/configs/vit_tiny_64.yaml}"; else CONFIG="${1:-configs/vitl16.yaml}"; fi
RESOLUTIONS="${RESOLUTIONS:-640x360 854x480 1280x720}"
VIDEOS="${VIDEOS:-24}"; DURATION="${DURATION:-10}"
STEPS="${STEPS:-60}"; SKIP="${SKIP:-10}"
THREADS="${THREADS:-$(nproc)}"
VIDEO_DECODER="${VIDEO_DECODER:-software}"
OUT="${OUT:-target/gpu-pipeline}"
(( STEPS > SKIP )) || { echo "gpu-pipeline.sh: STEPS must exceed SKIP" >&2; exit 2; }
command -v ffmpeg >/dev/null || { echo "gpu-pipeline.sh: ffmpeg not found; run ops/setup.sh" >&2; exit 1; }
VJEPA="${VJEPA:-$(bench/build-bin.sh vjepa-pipeline vjepa "$DEVICE")}"
PY="$(ops/parquet-venv.sh)"
mkdir -p "$OUT"

# Real encoded content: ffmpeg's moving test patterns (four sources, so clips differ).
SOURCES=(testsrc2 mandelbrot "life=mold=10:ratio=0.1:death_color=#C83232:life_color=#00ff00" cellauto)
for res in $RESOLUTIONS; do
  dir="$OUT/media/$res"
  [ "$(ls "$dir" 2>/dev/null | wc -l)" -ge "$VIDEOS" ] && continue
  mkdir -p "$dir"
  echo "making $VIDEOS H.264 videos at $res in $dir ..." >&2
  for i in $(seq 0 $((VIDEOS - 1))); do
    src="${SOURCES[$((i % ${#SOURCES[@]}))]}"
    case "$src" in *=*) src="$src:size=$res:rate=30" ;; *) src="$src=size=$res:rate=30" ;; esac
    ffmpeg -v error -y -f lavfi -i "$src" -t "$DURATION" \
      -vf "hue=H=$i*0.4" -c:v libx264 -preset veryfast -crf 23 -g 60 -pix_fmt yuv420p \
      -movflags +faststart "$dir/v$(printf %03d "$i").mp4"
  done
done

for res in $RESOLUTIONS; do
  run="$OUT/run-$res"
  rm -rf "$run"; mkdir -p "$run"
  # The config with this run's corpus, output, decode threads and no metrics server.
  { cat "$CONFIG"; printf 'workers:\n  count: 1\n  decode_threads: %s\n  video_decoder: %s\ntelemetry:\n  listen: null\n' \
    "$THREADS" "$VIDEO_DECODER"; } \
    > "$run/config.yaml"
  echo "training $STEPS steps on $res ($DEVICE, $THREADS $VIDEO_DECODER decode threads) ..." >&2
  "$VJEPA" train --config "$run/config.yaml" --dataset "$PWD/$OUT/media/$res/" --out "$PWD/$run/out/" \
    --max-steps "$STEPS" --device "$DEVICE" --fresh > "$run/train.log" 2>&1 \
    || { echo "gpu-pipeline.sh: training failed, see $run/train.log" >&2; tail -5 "$run/train.log" >&2; exit 1; }
done

"$PY" - "$OUT" "$CONFIG" "$DEVICE" "$THREADS" "$SKIP" $RESOLUTIONS <<'PYEOF' | tee "$OUT/results.md"
import glob, sys
import pyarrow as pa
import pyarrow.parquet as pq
out, config, device, threads, skip, resolutions = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6:]
print(f"{config} on {device}, {threads} decode threads; steps after the first {skip}")
print()
print("| input | steps | clips/s | step s (mean) | data wait share | decode capacity clips/s | keeps up |")
print("|---|---|---|---|---|---|---|")
for res in resolutions:
    files = sorted(glob.glob(f"{out}/run-{res}/out/metrics*.parquet"))
    t = pa.concat_tables([pq.read_table(f) for f in files], promote_options="default").to_pydict()
    rows = [i for i, s in enumerate(t["step"]) if s > skip]
    step = sum(t["step_time_s"][i] for i in rows)
    wait = sum(t["data_wait_s"][i] for i in rows)
    clips = sum(t["clips_per_sec"][i] * (t["step_time_s"][i] + t["data_wait_s"][i]) for i in rows)
    decode = sum(t["decode_s"][i] for i in rows)
    rate = clips / (step + wait)
    capacity = threads * clips / decode if decode > 0 else float("inf")
    step_rate = clips / step  # what the trainer could take if never waiting
    print(f"| {res} H.264 | {len(rows)} | {rate:.1f} | {step / len(rows):.3f} | {100 * wait / (step + wait):.1f} % "
          f"| {capacity:.1f} | {'yes' if capacity >= step_rate else 'no'} (step takes {step_rate:.1f}) |")
PYEOF
