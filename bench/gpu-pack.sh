#!/usr/bin/env bash
# Build machine (no GPU needed): builds `vjepa` and `train-step` with the `cudnn` feature and
# packs them into .carry/ for a lent GPU machine (the device tool's `carry: [".carry"]`; it
# must stay under 64 MiB): the stripped binaries xz'd, the non-system, non-CUDA shared libraries
# they link (GStreamer core, GLib, …: the device image has none), and the Python wheels the
# PyTorch peers need beyond torch (safetensors, numpy, pyyaml). Then on the device:
# `bench/gpu-session.sh`. Environment: CUDA_ENV (default ../shared/tools/cuda-env.sh),
# CARGO_TARGET_DIR (default target-cuda: keep it, candle-kernels takes ~16 min to build),
# OFFICIAL_DRIVER (a peer script kept outside this repository that runs the official code's step,
# see bench/train-step.sh: carried as .carry/official_driver.py with the official checkout of
# bench/fetch-official.sh as .carry/jepa, for gpu-session's step phase on a device without
# network; carried only, never part of this repository), EXTRA_CARRY (more files or folders to carry), GST_KIT (1, the default: also pack
# bench/gst-kit.sh's GStreamer kit, for gpu-session.sh's trend and pipeline phases; 0: skip).
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$("${CUDA_ENV:-../shared/tools/cuda-env.sh}")"
eval "$(ops/cudnn-headers.sh)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target-cuda}"
cargo build --release --locked -p vjepa-pipeline -p vjepa-bench --features cudnn \
  --bin vjepa --bin train-step
rm -rf .carry && mkdir -p .carry/libs .carry/wheels
for b in vjepa train-step; do
  strip -o ".carry/$b" "$CARGO_TARGET_DIR/release/$b"
  xz -6 -f ".carry/$b"
done
# The shared libraries both link, less glibc/libstdc++/libgcc (every image has them) and CUDA's
# (the device's own driver and toolkit).
skip='^(linux-vdso|ld-linux|libc\.|libm\.|libdl\.|librt\.|libpthread\.|libgcc_s|libstdc\+\+|libcuda|libcudart|libcublas|libcurand|libnvrtc)'
for b in vjepa train-step; do
  ldd "$CARGO_TARGET_DIR/release/$b" | awk '$3 ~ /^\// {print $1, $3}'
done | sort -u | while read -r name path; do
  [[ "$name" =~ $skip ]] || cp -L "$path" ".carry/libs/$name"
done
tar -C .carry -cJf .carry/libs.tar.xz libs && rm -rf .carry/libs
python3 -m pip download -q --only-binary=:all: --python-version 3.12 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .carry/wheels safetensors numpy pyyaml
[ "${GST_KIT:-1}" = 1 ] && bench/gst-kit.sh .carry/gst.tar.xz
if [ -n "${OFFICIAL_DRIVER:-}" ]; then
  cp "$OFFICIAL_DRIVER" .carry/official_driver.py
  src="$(bench/fetch-official.sh)"
  mkdir -p .carry/jepa
  # The working files only (no .git), and the commit beside them (for the driver's row name).
  tar -C "$src" --exclude=.git -c . | tar -C .carry/jepa -x
  git -C "$src" rev-parse HEAD > .carry/jepa/COMMIT 2>/dev/null \
    || { [ -f "$src/COMMIT" ] && cp "$src/COMMIT" .carry/jepa/COMMIT; } || true
fi
for x in ${EXTRA_CARRY:-}; do cp -r "$x" .carry/; done
du -sh .carry && ls -la .carry .carry/wheels
