#!/usr/bin/env bash
# Installs what the monitoring tests need on Debian 12: the Prometheus server and promtool
# (package `prometheus`) and headless Chromium (package `chromium`). Safe to re-run: skips
# what is present. Called by ops/setup.sh.
set -euo pipefail

PACKAGES=(prometheus chromium)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-monitoring: installing ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # The package starts a system-wide Prometheus where systemd runs; the tests start their own.
  if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet prometheus 2>/dev/null; then
    $SUDO systemctl disable --now prometheus >/dev/null 2>&1 || true
  fi
fi
for tool in prometheus promtool chromium; do
  command -v "$tool" >/dev/null || { echo "install-monitoring: $tool missing after install" >&2; exit 1; }
done
