#!/usr/bin/env bash
# pyarrow, pandas and duckdb (pinned) in .tools/parquet-venv, for tools/check_parquet.py: the
# check that our Parquet outputs read in the tools people use, without hints (issue 7).
# Prints the venv's python. Reuses $PARQUET_PYTHON when set.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PARQUET_PYTHON:-}" ]; then echo "$PARQUET_PYTHON"; exit 0; fi
VENV=.tools/parquet-venv
if ! "$VENV/bin/python" -c "import pyarrow, pandas, duckdb" 2>/dev/null; then
  PY=python3.11; command -v "$PY" >/dev/null || PY=python3
  echo "parquet-venv: installing pyarrow, pandas, duckdb into $VENV" >&2
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q pyarrow==26.0.1 pandas==3.1.1 duckdb==2.0.0 >&2
fi
echo "$PWD/$VENV/bin/python"
