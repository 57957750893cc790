#!/usr/bin/env bash
# Device machine: the whole GPU check-up in as few calls as the budget allows. Unpacks what
# bench/gpu-pack.sh put in .carry/, then runs PHASES (default "check ops step"), each under its
# own timeout, writing everything under $OUT (the device tool's output folder):
#   check  `vjepa gpu-check --no-timing`: every kernel, cuDNN's attention and the bf16 step
#          against the CPU (issue 9 acceptance 1, 2)
#   ops    bench/gpu-ops.sh: each op against torch on this GPU, with the bars (issue 9, 3)
#   step   bench/gpu-step.sh on STEP_CONFIGS (default vitl16), ours with ATTENTION (default
#          "cudnn own") and VARIANTS (default "--target-stream --cast-weights --graph-blocks":
#          the step with the target pass on a second stream, without the kept bf16 weight
#          copies, and without the fused blocks) against the PyTorch peer
#          and the official code's step (the driver and checkout gpu-pack.sh carried) and
#          any EXTRA_PEER scripts (issue 10, 1 and 5)
#   trend  bench/loss-trend.sh: 200 steps on the CPU (f32) and on the GPU (bf16, and f32 as the
#          noise floor), same videos and seed, loss curves compared (issue 10, 4)
#   pipeline  bench/gpu-pipeline.sh: the whole job on H.264 at 360p/480p/720p, data-wait share
#          and decode capacity (issue 10, 3); VIDEO_DECODER=nvdec for NVDEC
# trend and pipeline decode with GStreamer: they need the kit of bench/gst-kit.sh in
# .carry/gst.tar.xz (bench/gpu-pack.sh makes it with GST_KIT=1) where the device has none.
# Environment: TORCH_ROOT (the device's torch venv, default /opt/torch/.venv), PHASES,
# STEP_CONFIGS, ATTENTION, VARIANTS, COMPILE, PEAK_TFLOPS (the step phase measures torch's bf16
# GEMM peak when neither it nor this call's ops phase gives one), the per-phase timeouts CHECK_S,
# OPS_S, STEP_S, TREND_S, PIPELINE_S (seconds), and DEADLINE_S (570: no phase runs past this
# many seconds from the start, so one call ends inside the device tool's limit with its
# outputs written; give less when the session has less device time left than a whole call).
# Outputs: the device tool brings back at most 8 files, so $OUT holds env.txt, summary.txt
# (each phase's result lines, also printed) and one PHASE.tgz per phase with its files.
set -uo pipefail
T0=$(date +%s)
cd "$(dirname "$0")/.."
OUT="${OUT:-$(mktemp -d)}"
W="${VJ_WORK:-/tmp/vj}"; mkdir -p "$W/lib" "$W/py"
TORCH_ROOT="${TORCH_ROOT:-/opt/torch/.venv}"
PY="$TORCH_ROOT/bin/python3"
"$PY" - .carry "$W" <<'PYEOF'
import lzma, pathlib, shutil, sys, tarfile, zipfile
carry, w = map(pathlib.Path, sys.argv[1:])
for b in ("vjepa", "train-step"):
    with lzma.open(carry / f"{b}.xz") as s, open(w / b, "wb") as d:
        shutil.copyfileobj(s, d)
    (w / b).chmod(0o755)
tarfile.open(carry / "libs.tar.xz").extractall(w / "carried")
for wheel in (carry / "wheels").glob("*.whl"):
    zipfile.ZipFile(wheel).extractall(w / "py" / wheel.name.split("-")[0].lower())
if (carry / "gst.tar.xz").exists():
    tarfile.open(carry / "gst.tar.xz").extractall(w)
PYEOF
SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
export LD_LIBRARY_PATH="$SITE/nvidia/cu13/lib:$SITE/nvidia/cudnn/lib:$W/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# The GStreamer kit: its plugins only (not the device's, if any), scanned by the kit's scanner.
# Its libraries go on the loader path of the phases that decode (trend, pipeline) alone: they
# would shadow the device's own copies (expat, zlib, GL, ...) for torch and everything else.
gst_env=()
if [ -d "$W/gst" ]; then
  gst_env=(env "LD_LIBRARY_PATH=$LD_LIBRARY_PATH:$W/gst/lib")
  export GST_PLUGIN_SYSTEM_PATH_1_0="$W/gst/plugins" GST_PLUGIN_PATH_1_0=""
  export GST_PLUGIN_SCANNER_1_0="$W/gst/libexec/gst-plugin-scanner" GST_REGISTRY_1_0="$W/gst/registry.bin"
fi
# The cuDNN frontend opens its own CUDA runtime: the one our binaries run on.
export CUDNN_FRONTEND_CUDART_LIB_NAME="${CUDNN_FRONTEND_CUDART_LIB_NAME:-libcudart.so.13}"
# Carried libraries only where the device lacks them (its own take precedence).
for _ in 1 2 3 4 5 6; do
  missing=$(ldd "$W/vjepa" "$W/train-step" | awk '/not found/{print $1}' | sort -u)
  [ -z "$missing" ] && break
  for m in $missing; do
    cp "$W/carried/libs/$m" "$W/lib/" 2>/dev/null && continue
    # Not carried (CUDA's own libraries are too big): anywhere else on the device, e.g. another
    # Python package's nvidia/ folder (torch wheels since 2.15 ship no libcurand).
    found=$(find /opt /usr /root /home -name "$m" -print -quit 2>/dev/null)
    if [ -n "$found" ]; then ln -sf "$found" "$W/lib/$m"; else echo "missing everywhere: $m"; fi
  done
done
# The carried wheels only for the modules the device's Python lacks (its own stay first).
for pair in safetensors:safetensors numpy:numpy yaml:pyyaml; do
  "$PY" -c "import ${pair%%:*}" 2>/dev/null && continue
  export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$W/py/${pair#*:}"
done
{
  echo "supplied libs: $(ls "$W/lib" | tr '\n' ' ')"
  ldd "$W/vjepa" | grep -E "not found|cuda|cublas|curand|stdc"
  nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv
  "$PY" -c 'import torch; print("torch", torch.__version__, "cudnn", torch.backends.cudnn.version())'
  "${gst_env[@]}" "$W/vjepa" check-config --config configs/vitl16.yaml --device cuda --locations 2>&1 | grep -E "^(device|attention|video decoder):"
  if [ -f .carry/official_driver.py ] && [ -d .carry/jepa ]; then
    echo "official step row: on (jepa $(cat .carry/jepa/COMMIT 2>/dev/null || echo '?'))"
  else
    echo "official step row: off (no .carry/official_driver.py or .carry/jepa: OFFICIAL_DRIVER=... bench/gpu-pack.sh)"
  fi
} 2>&1 | tee "$OUT/env.txt"

# The timeout for a phase: its own limit, cut to what is left before DEADLINE_S.
limit() {
  local left=$(( ${DEADLINE_S:-570} - ($(date +%s) - T0) ))
  (( left < $1 )) && echo $(( left > 10 ? left : 10 )) || echo "$1"
}
# Packs a phase's folder into $OUT/PHASE.tgz (the device tool brings back 8 files at most).
pack() {
  tar -czf "$OUT/$1.tgz" -C "$OUT" "$1" && rm -rf "${OUT:?}/$1"
}
for phase in ${PHASES:-check ops step}; do
  echo "== $phase" | tee -a "$OUT/env.txt" "$OUT/summary.txt"
  start=$(date +%s)
  P="$OUT/$phase"; mkdir -p "$P"
  case "$phase" in
    check)
      # Rows go to stderr as they finish and to stdout as a table at the end: one file, so a
      # run cut by its timeout still shows the rows it finished.
      timeout -k 15 "$(limit "${CHECK_S:-360}")" "$W/vjepa" gpu-check --no-timing --json "$P/check.json" \
        > "$P/check.txt" 2>&1
      echo "rc=$?" >> "$P/check.txt"
      # A fault that leaves the CUDA context unusable ends the check at its row (gpu-check
      # names it): once, run the rows again with that path off, and keep it off for this call.
      broken=$(sed -n 's/.*the CUDA context stopped working after the row `\([^`]*\)`.*/\1/p' "$P/check.txt" | head -n 1)
      if [ -n "$broken" ]; then
        case "$broken" in
          *cudnn*) export VJEPA_CUDNN_LIB=/nonexistent; off="VJEPA_CUDNN_LIB=/nonexistent" ;;
          # The classic rows run without cuBLASLt already: nothing to switch off for them.
          "linear (cuBLAS"*) off="" ;;
          linear*) export VJEPA_CUBLASLT=0; off="VJEPA_CUBLASLT=0" ;;
          *) off="" ;;
        esac
        echo "CUDA context broken after \`$broken\`${off:+: checking again with $off (set it for later calls too)}" \
          | tee -a "$OUT/env.txt" "$OUT/summary.txt"
        if [ -n "$off" ]; then
          mv "$P/check.txt" "$P/check-broken.txt"; mv "$P/check.json" "$P/check-broken.json" 2>/dev/null
          timeout -k 15 "$(limit "${CHECK_S:-360}")" "$W/vjepa" gpu-check --no-timing --json "$P/check.json" \
            > "$P/check.txt" 2>&1
          echo "rc=$?" >> "$P/check.txt"
        fi
      fi
      grep -E "^check .*FAIL|gpu-check|^error|rc=" "$P/check.txt" | head -60 | tee -a "$OUT/summary.txt"
      grep -cE "^check .* PASS$" "$P/check.txt" | sed 's/^/rows passed (as they finished): /' | tee -a "$OUT/summary.txt"
      # cuBLASLt's epilogues are the Linear op's default: should only their rows fail (a wrong
      # number, or an error row, which carries the bare op name), the rest of this call runs
      # without them (and later calls should set VJEPA_CUBLASLT=0).
      if grep -E "^(check +)?linear( fwd| bwd)?  " "$P/check.txt" | grep -q FAIL \
        && ! grep -E "^(check +)?linear \(cuBLAS \+ bias kernels\)" "$P/check.txt" | grep -q FAIL; then
        export VJEPA_CUBLASLT=0
        echo "cuBLASLt Linear rows failed, the classic ones pass: VJEPA_CUBLASLT=0 from here on (set it for later calls too)" \
          | tee -a "$OUT/env.txt" "$OUT/summary.txt"
      fi ;;
    ops)
      VJEPA="$W/vjepa" TORCH_PYTHON="$PY" timeout -k 15 "$(limit "${OPS_S:-300}")" bench/gpu-ops.sh "$P" \
        > "$P/ops.txt" 2> "$P/ops.err"
      echo "rc=$?" >> "$P/ops.txt"
      tee -a "$OUT/summary.txt" < "$P/ops.txt"; tail -3 "$P/ops.err" ;;
    step)
      peak=$(sed -n 's/^bf16 GEMM peak: \([0-9.]*\) TFLOP.*/\1/p' "$OUT/summary.txt" 2>/dev/null | tail -n 1)
      if [ -z "${PEAK_TFLOPS:-$peak}" ]; then
        # No ops phase in this call (each call may get a fresh machine): measure it here.
        peak=$(timeout -k 5 60 "$PY" bench/gpu_ops_torch.py --peak-only --runs 20 2>/dev/null \
          | sed -n 's/^bf16 GEMM peak: \([0-9.]*\) TFLOP.*/\1/p')
        echo "bf16 GEMM peak (torch, this call): ${peak:-not measured} TFLOP/s" | tee -a "$OUT/summary.txt"
      fi
      # The official step's driver and checkout that gpu-pack.sh carried (no network here).
      if [ -z "${OFFICIAL_DRIVER:-}" ] && [ -f .carry/official_driver.py ] && [ -d .carry/jepa ]; then
        export OFFICIAL_DRIVER="$PWD/.carry/official_driver.py" OFFICIAL_JEPA="$PWD/.carry/jepa"
      fi
      # shellcheck disable=SC2086
      TRAIN_STEP="$W/train-step" TORCH_PYTHON="$PY" PEAK_TFLOPS="${PEAK_TFLOPS:-$peak}" \
        ATTENTION="${ATTENTION:-cudnn own}" VARIANTS="${VARIANTS---target-stream --cast-weights --graph-blocks}" \
        timeout -k 15 "$(limit "${STEP_S:-570}")" \
        bench/gpu-step.sh ${STEP_CONFIGS:-configs/vitl16.yaml} > "$P/step.txt" 2> "$P/step.err"
      echo "rc=$?" >> "$P/step.txt"
      tee -a "$OUT/summary.txt" < "$P/step.txt"; tail -5 "$P/step.err" ;;
    trend)
      "${gst_env[@]}" env VJEPA="$W/vjepa" PYTHON="$PY" OUT=target/loss-trend timeout -k 15 "$(limit "${TREND_S:-540}")" \
        bench/loss-trend.sh "${TREND_CONFIG:-configs/quickstart.yaml}" > "$P/trend.txt" 2> "$P/trend.err"
      echo "rc=$?" >> "$P/trend.txt"
      cp target/loss-trend/*.log target/loss-trend/*.jsonl "$P/" 2>/dev/null
      tee -a "$OUT/summary.txt" < "$P/trend.txt"; tail -5 "$P/trend.err" ;;
    pipeline)
      # shellcheck disable=SC2086
      "${gst_env[@]}" env VJEPA="$W/vjepa" PYTHON="$PY" OUT=target/gpu-pipeline timeout -k 15 "$(limit "${PIPELINE_S:-540}")" \
        bench/gpu-pipeline.sh ${PIPELINE_CONFIG:-} > "$P/pipeline.txt" 2> "$P/pipeline.err"
      echo "rc=$?" >> "$P/pipeline.txt"
      for d in target/gpu-pipeline/run-*; do
        [ -d "$d" ] && cp "$d/train.log" "$P/$(basename "$d").log" 2>/dev/null
      done
      tee -a "$OUT/summary.txt" < "$P/pipeline.txt"; tail -5 "$P/pipeline.err" ;;
    *) echo "unknown phase $phase (check, ops, step, trend, pipeline)" ;;
  esac
  pack "$phase"
  echo "$phase: $(( $(date +%s) - start )) s" | tee -a "$OUT/env.txt" "$OUT/summary.txt"
done
