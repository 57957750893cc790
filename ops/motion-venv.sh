#!/usr/bin/env bash
# scikit-image and scikit-learn (pinned; their sample photographs are the benchmark's sources)
# in .tools/motion-venv, for tools/motion_bench.py (issue 8's labelled motion benchmark).
# Prints the venv's python. Reuses $MOTION_PYTHON when set.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${MOTION_PYTHON:-}" ]; then echo "$MOTION_PYTHON"; exit 0; fi
VENV=.tools/motion-venv
if ! "$VENV/bin/python" -c "import skimage, sklearn, scipy" 2>/dev/null; then
  PY=python3.11; command -v "$PY" >/dev/null || PY=python3
  echo "motion-venv: installing scikit-image, scikit-learn into $VENV" >&2
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q scikit-image==0.26.0 scikit-learn==1.9.1 >&2
fi
echo "$PWD/$VENV/bin/python"
