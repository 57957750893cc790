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
"$BIN" train --config configs/quickstart.yaml "$@"
echo
echo "outputs: $(pwd)/out/quickstart/"
ls -R out/quickstart
