#!/usr/bin/env bash
# Prints the path of a checkout of the official V-JEPA code (facebookresearch/jepa) at the commit
# the benchmarks compare against, fetching it into .tools/jepa on first use. Only run beside ours,
# by a driver kept outside this repository (OFFICIAL_DRIVER of bench/train-step.sh); nothing of
# it is ever part of this repository.
# Environment: OFFICIAL_JEPA (an existing checkout or copy to use instead: a folder with
# src/models/vision_transformer.py; e.g. the one bench/gpu-pack.sh carries to a device without
# network), OFFICIAL_JEPA_URL (where to fetch from), OFFICIAL_JEPA_COMMIT (which commit).
set -euo pipefail
cd "$(dirname "$0")/.."
URL="${OFFICIAL_JEPA_URL:-https://github.com/facebookresearch/jepa}"
COMMIT="${OFFICIAL_JEPA_COMMIT:-51c59d518fc63c08464af6de585f78ac0c7ed4d5}"
is_checkout() { [ -f "$1/src/models/vision_transformer.py" ] && [ -f "$1/app/vjepa/utils.py" ]; }
if [ -n "${OFFICIAL_JEPA:-}" ]; then
  is_checkout "$OFFICIAL_JEPA" || {
    echo "fetch-official.sh: OFFICIAL_JEPA=$OFFICIAL_JEPA is not a facebookresearch/jepa checkout" >&2
    exit 2
  }
  (cd "$OFFICIAL_JEPA" && pwd)
  exit 0
fi
DIR=.tools/jepa
if ! is_checkout "$DIR" || [ "$(git -C "$DIR" rev-parse HEAD 2>/dev/null)" != "$COMMIT" ]; then
  echo "fetching facebookresearch/jepa at ${COMMIT:0:7} from $URL into $DIR ..." >&2
  rm -rf "$DIR.part"
  git init -q "$DIR.part"
  git -C "$DIR.part" remote add origin "$URL"
  # One commit, no history; a server that refuses fetches by commit gets a full fetch instead.
  git -C "$DIR.part" fetch -q --depth 1 origin "$COMMIT" 2>/dev/null \
    || git -C "$DIR.part" fetch -q origin
  git -C "$DIR.part" -c advice.detachedHead=false checkout -q "$COMMIT"
  rm -rf "$DIR" && mv "$DIR.part" "$DIR"
fi
(cd "$DIR" && pwd)
