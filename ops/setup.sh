#!/usr/bin/env bash
# Installs what vjepa-stream needs on a fresh Debian 12 machine (GStreamer dev + plugins, ffmpeg
# for decode comparisons; Prometheus and Chromium for the monitoring tests) and builds the
# release binary. Safe to re-run: skips what is present.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(
  pkg-config libgstreamer1.0-dev libgstreamer-plugins-base1.0-dev
  gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-bad
  gstreamer1.0-plugins-ugly gstreamer1.0-libav gstreamer1.0-tools ffmpeg
)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Prometheus, promtool and headless Chromium for the monitoring tests.
ops/install-monitoring.sh

if [ "${VJEPA_SKIP_BUILD:-0}" != "1" ]; then
  echo "setup: building (release)"
  cargo build --release --locked -p vjepa-pipeline
fi
