#!/usr/bin/env bash
# Builds a release binary of this workspace and prints its path; for a device other than cpu with
# the `cuda` feature (which needs the CUDA toolchain: bench/GPU-RESULTS.md), and `cudnn` too when
# the cuDNN headers are set (CUDNN_INCLUDE, from ops/cudnn-headers.sh).
#   bench/build-bin.sh PACKAGE BIN DEVICE
set -euo pipefail
cd "$(dirname "$0")/.."
features=()
if [ "$3" != cpu ]; then
  if [ -n "${CUDNN_INCLUDE:-}" ]; then features=(--features cudnn); else features=(--features cuda); fi
fi
cargo build --release --locked -q -p "$1" --bin "$2" "${features[@]}"
echo "${CARGO_TARGET_DIR:-target}/release/$2"
