#!/usr/bin/env bash
# PyTorch (CPU use) for the benchmarks' peer and the reference tools, in .tools/torch-venv.
# Prints the venv's python. Not needed by the job or by CI. Reuses $TORCH_PYTHON when set.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${TORCH_PYTHON:-}" ]; then echo "$TORCH_PYTHON"; exit 0; fi
VENV=.tools/torch-venv
if ! "$VENV/bin/python" -c "import torch, numpy, safetensors, yaml" 2>/dev/null; then
  echo "torch-venv: installing torch 2.15.0, numpy, safetensors, pyyaml into $VENV (~3 GiB with its CUDA wheels)" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q torch==2.15.0 numpy safetensors pyyaml >&2
fi
echo "$PWD/$VENV/bin/python"
