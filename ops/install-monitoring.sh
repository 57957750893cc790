#!/usr/bin/env bash
# Installs what the monitoring tests need on Debian 12: the Prometheus server and promtool
# (package `prometheus`) and headless Chromium (package `chromium`). Safe to re-run: skips
# what is present. Called by ops/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

installed="$(ops/apt-install.sh install-monitoring prometheus chromium)"
# The package starts a system-wide Prometheus where systemd runs; the tests start their own.
if grep -qx prometheus <<< "$installed" && command -v systemctl >/dev/null 2>&1 \
  && systemctl is-active --quiet prometheus 2>/dev/null; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO systemctl disable --now prometheus >/dev/null 2>&1 || true
fi
for tool in prometheus promtool chromium; do
  command -v "$tool" >/dev/null || { echo "install-monitoring: $tool missing after install" >&2; exit 1; }
done
