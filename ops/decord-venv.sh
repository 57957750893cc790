#!/usr/bin/env bash
# decord (the official V-JEPA loader's video reader) + numpy for bench/ingest.sh, in .tools/decord-venv.
# Prints the venv's python. Not needed by the job or by CI. Reuses $DECORD_PYTHON when set.
# decord itself is unmaintained; `decord2` is a maintained rebuild with the same `decord` module.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${DECORD_PYTHON:-}" ]; then echo "$DECORD_PYTHON"; exit 0; fi
VENV=.tools/decord-venv
if ! "$VENV/bin/python" -c "import decord, numpy" 2>/dev/null; then
  PY=python3.11; command -v "$PY" >/dev/null || PY=python3
  echo "decord-venv: installing decord2 (or decord) and numpy into $VENV" >&2
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q numpy >&2
  "$VENV/bin/pip" install -q decord2 >&2 || "$VENV/bin/pip" install -q decord >&2
fi
echo "$PWD/$VENV/bin/python"
