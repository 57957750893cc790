#!/usr/bin/env bash
# Installs what vjepa-stream needs on a fresh Debian 12 machine (GStreamer dev + plugins, ffmpeg
# for decode comparisons; Prometheus and Chromium for the monitoring tests) and builds the
# release binary. Safe to re-run: skips what is present.
set -euo pipefail
cd "$(dirname "$0")/.."

ops/apt-install.sh setup \
  pkg-config libgstreamer1.0-dev libgstreamer-plugins-base1.0-dev \
  gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-bad \
  gstreamer1.0-plugins-ugly gstreamer1.0-libav gstreamer1.0-tools ffmpeg >/dev/null

# Prometheus, promtool and headless Chromium for the monitoring tests.
ops/install-monitoring.sh

if [ "${VJEPA_SKIP_BUILD:-0}" != "1" ]; then
  echo "setup: building (release)"
  cargo build --release --locked -p vjepa-pipeline
fi
