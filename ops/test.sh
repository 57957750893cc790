#!/usr/bin/env bash
# README command 2: set up a fresh machine (apt packages, the s3s-fs S3 server for the S3 tests)
# and run the whole test suite: formatting, lints, unit and integration tests.
set -euo pipefail
cd "$(dirname "$0")/.."
VJEPA_SKIP_BUILD=1 ops/setup.sh

# A local S3 server that checks signatures, pinned to a version that builds with our rustc.
TOOLS="$(pwd)/.tools"
if [ ! -x "$TOOLS/bin/s3s-fs" ]; then
  echo "test: installing s3s-fs 0.14.1 into .tools/"
  cargo install --quiet --locked --root "$TOOLS" s3s-fs@0.14.1 --features binary
fi
export PATH="$TOOLS/bin:$PATH"
export VJEPA_REQUIRE_S3=1
# The monitoring tests must find prometheus/promtool/chromium (installed by setup.sh).
export VJEPA_REQUIRE_OPS=1

cargo fmt --all -- --check
cargo clippy --release --locked --workspace --all-targets -- -D warnings
cargo test --release --locked --workspace -- --test-threads=1
echo "test: all passed"
