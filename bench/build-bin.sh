#!/usr/bin/env bash
# Builds a release binary of this workspace and prints its path; for a device other than cpu with
# the `cuda` feature (which needs the CUDA toolchain: bench/GPU-RESULTS.md).
#   bench/build-bin.sh PACKAGE BIN DEVICE
set -euo pipefail
cd "$(dirname "$0")/.."
features=()
[ "$3" = cpu ] || features=(--features cuda)
cargo build --release --locked -q -p "$1" --bin "$2" "${features[@]}"
echo "${CARGO_TARGET_DIR:-target}/release/$2"
