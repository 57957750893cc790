#!/usr/bin/env bash
# Installs the Debian packages given that are not installed yet (sudo when not root), quietly.
#   ops/apt-install.sh WHO PACKAGE...
# WHO prefixes the messages (stderr). Prints the packages it installed on stdout, one per line
# (nothing when all were present), so callers can act on what is new.
set -euo pipefail
who="$1"; shift
missing=()
for p in "$@"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "$who: installing ${missing[*]}" >&2
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
$SUDO apt-get update -qq >&2
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
printf '%s\n' "${missing[@]}"
