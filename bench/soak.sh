#!/usr/bin/env bash
# Soak benchmark (issue 6, acceptance 5): trains the quickstart config for MINUTES (default 30)
# and samples the process's resident memory (VmRSS) every INTERVAL seconds; prints the RSS after
# warm-up (WARMUP seconds, default 60), at the end, the peak, and the growth in % of the median
# RSS of the last minute over the first minute after warm-up. Goal: < 5 %.
#   bench/soak.sh [MINUTES]
# Environment: INTERVAL (5), WARMUP (60), VIDEOS (sample videos to make, 8).
# Everything lives in target/soak/ (videos, config, outputs; rss.csv: seconds,VmRSS kB,last step).
# The run checkpoints every 200 steps and flushes metrics every 20, as a long run would; it starts
# fresh each time (--fresh) and is killed at the end (that is what the resume is for).
set -euo pipefail
cd "$(dirname "$0")/.."
MINUTES="${1:-30}"
INTERVAL="${INTERVAL:-5}"
WARMUP="${WARMUP:-60}"
cargo build --release --locked -q -p vjepa-pipeline --bin vjepa
BIN="${CARGO_TARGET_DIR:-target}/release/vjepa"
DIR=target/soak
mkdir -p "$DIR"
if [ ! -d "$DIR/videos" ]; then
  "$BIN" make-samples "$DIR/videos" --count "${VIDEOS:-8}" >/dev/null
fi
# The quickstart config with this corpus and output, a schedule far longer than the soak,
# periodic checkpoints, and the monitoring server on any free port (soaks can run side by side).
sed -e "s#^    - samples/videos/ #    - $DIR/videos/ #" \
    -e "s#^  folder: out/quickstart/#  folder: $DIR/out/#" \
    -e "s#^  dir: out/quickstart/#  dir: $DIR/out/#" \
    -e "s#^  epochs: 6#  epochs: 100000#" \
    -e "s#^  checkpoint_every: 30#  checkpoint_every: 200#" \
    -e "s#^  listen: .*#  listen: 127.0.0.1:0#" \
    configs/quickstart.yaml > "$DIR/soak.yaml"
grep -q "epochs: 100000" "$DIR/soak.yaml" && grep -q "$DIR/videos/" "$DIR/soak.yaml" \
  || { echo "soak.sh: configs/quickstart.yaml layout changed" >&2; exit 1; }

"$BIN" train --config "$DIR/soak.yaml" --fresh > "$DIR/train.log" 2>&1 &
PID=$!
trap 'kill "$PID" 2>/dev/null || true' EXIT
rss() { awk '/^VmRSS:/ {print $2}' "/proc/$PID/status" 2>/dev/null || echo 0; }
step() { grep -o 'step=[0-9]*' "$DIR/train.log" | tail -1 | cut -d= -f2 || true; }
echo "seconds,rss_kb,step" > "$DIR/rss.csv"
START=$(date +%s)
END=$((START + MINUTES * 60))
while [ "$(date +%s)" -lt "$END" ]; do
  kill -0 "$PID" 2>/dev/null || { echo "soak.sh: training exited early; see $DIR/train.log" >&2; exit 1; }
  echo "$(( $(date +%s) - START )),$(rss),$(step)" >> "$DIR/rss.csv"
  sleep "$INTERVAL"
done
echo "$(( $(date +%s) - START )),$(rss),$(step)" >> "$DIR/rss.csv"
kill "$PID"
wait "$PID" 2>/dev/null || true
trap - EXIT

# Single samples swing by ~10 % (a batch in flight, a checkpoint being serialised), so the verdict
# compares medians over a minute: the first minute after warm-up and the last minute.
CSV="$DIR/rss.csv"
LAST=$(tail -1 "$CSV" | cut -d, -f1)
[ "$LAST" -ge $((WARMUP + 60)) ] || { echo "soak.sh: run shorter than warm-up + 1 min" >&2; exit 1; }
median() { awk -F, -v lo="$1" -v hi="$2" 'NR > 1 && $2 > 0 && $1 >= lo && $1 < hi {print $2}' "$CSV" \
  | sort -n | awk '{a[NR] = $1} END {print a[int((NR + 1) / 2)]}'; }
M0=$(median "$WARMUP" $((WARMUP + 60)))
M1=$(median $((LAST - 60)) $((LAST + 1)))
awk -F, -v warm="$WARMUP" -v minutes="$MINUTES" -v m0="$M0" -v m1="$M1" '
  NR > 1 && $2 > 0 {
    if (!have && $1 >= warm) { have = 1; t0 = $1; r0 = $2; s0 = $3 }
    if ($2 > peak) peak = $2
    t1 = $1; r1 = $2; s1 = $3
  }
  END {
    g = 100 * (m1 - m0) / m0
    printf "soak %d min: steps %s..%s; RSS at %d s %.1f MiB, at %d s %.1f MiB (%+.2f %%), peak %.1f MiB\n",
      minutes, s0, s1, t0, r0 / 1024, t1, r1 / 1024, 100 * (r1 - r0) / r0, peak / 1024
    printf "median RSS first minute after warm-up %.1f MiB, last minute %.1f MiB: growth %+.2f %% (goal < 5 %%): %s\n",
      m0 / 1024, m1 / 1024, g, (g < 5 ? "ok" : "OVER")
  }' "$CSV"
