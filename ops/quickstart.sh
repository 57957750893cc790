#!/usr/bin/env bash
# README command 1: set up a fresh machine, make the sample corpus, train the tiny quickstart model
# on it, and say where the outputs are.
set -euo pipefail
cd "$(dirname "$0")/.."
ops/setup.sh
BIN=target/release/vjepa
if [ ! -d samples/videos ] || [ -z "$(ls -A samples/videos 2>/dev/null)" ]; then
  "$BIN" make-samples samples/videos --count 12
fi
rm -rf out/quickstart
echo "quickstart: while it trains, metrics at http://127.0.0.1:9464/metrics and the status page at http://127.0.0.1:9464/ (telemetry.listen; --listen ADDR to change)"
"$BIN" train --config configs/quickstart.yaml "$@"
last=$(ls out/quickstart/checkpoints/ | sort | tail -n 1)
"$BIN" inspect "out/quickstart/checkpoints/$last"
echo
echo "outputs: $(pwd)/out/quickstart/"
ls -l out/quickstart out/quickstart/checkpoints
