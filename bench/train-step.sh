#!/usr/bin/env bash
# One V-JEPA training step, ours (candle) vs PyTorch (our spec-written reference model with the
# torch ops the official code uses, bench/train_step_torch.py), same device, shapes, clip, masks
# and threads, in one run; prints per config s/step, clips/s, model TFLOP/s (matmul FLOPs from
# the shapes), MFU against PEAK_TFLOPS, memory, and the ratio torch/ours (> 1: we are faster).
#   bench/train-step.sh [THREADS] [CONFIG...]    (defaults: nproc; quickstart + vit_small 16×112×112)
# Environment: DEVICE (cpu; cuda for the GPU step, see bench/gpu-step.sh), DTYPE (f32 on the
# CPU, bf16 elsewhere: ours --bf16, torch with bf16 autocast), BATCH (the config's), WARMUP (2),
# STEPS (5), COMPILE=1 (also torch with torch.compile on the target encoder), PEAK_TFLOPS (for
# MFU), TRAIN_STEP (a prebuilt train-step binary), TORCH_PYTHON (default: ops/torch-venv.sh),
# ATTENTION (GPU: our attention implementations to time, one row each; default "auto"; e.g.
# "own cudnn" for both, see workers.attention), MASK_CYCLE (masks repeat every this many steps,
# for ours and the peer alike; 0 = a new draw every step, the default), EXTRA_PEER (more peer
# scripts, space-separated, run like bench/train_step_torch.py on the same inputs and printing
# the same JSON line), OFFICIAL_DRIVER (a peer script kept outside this repository that runs the
# official code's step on the same inputs, reading the checkout of bench/fetch-official.sh from
# $OFFICIAL_JEPA: one more row, the issue's bar; nothing of the official code, and no driver
# importing it, is part of this repository), CHECKPOINT=1 (ours with
# activation checkpointing), VARIANTS (train-step switches,
# space-separated, each one more row of ours with the first ATTENTION: --cast-weights casts the
# f32 weights in every bf16 step instead of using the kept bf16 copies, and so runs the blocks on
# the graph too: compare it with the --graph-blocks row, which records the blocks op by op on
# candle's graph instead of the fused block op; both the way before them; --target-stream runs
# the target encoder's pass on a thread and, on a GPU, a stream of its own). A row that fails is
# printed as failed (its last error line) and the others still run; the script then exits 1. When
# the first row of ours runs out of GPU memory, it runs once more with activation checkpointing.
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS="${1:-$(nproc)}"; shift || true
CONFIGS=("$@"); [ ${#CONFIGS[@]} -gt 0 ] || CONFIGS=(configs/quickstart.yaml bench/configs/vit_small_112.yaml)
DEVICE="${DEVICE:-cpu}"
if [ "$DEVICE" = cpu ]; then DTYPE="${DTYPE:-f32}"; else DTYPE="${DTYPE:-bf16}"; fi
case "$DTYPE" in bf16|f32) ;; *) echo "train-step.sh: DTYPE is bf16 or f32" >&2; exit 2 ;; esac
STEPS="${STEPS:-5}"; WARMUP="${WARMUP:-2}"
PY="${TORCH_PYTHON:-$(ops/torch-venv.sh)}"
BIN="${TRAIN_STEP:-$(bench/build-bin.sh vjepa-bench train-step "$DEVICE")}"
TMP="$(mktemp -d)"; trap 'rm -rf "$TMP"' EXIT
export RAYON_NUM_THREADS="$THREADS" OMP_NUM_THREADS="$THREADS" MKL_NUM_THREADS="$THREADS"
ours=(--device "$DEVICE" --mask-cycle "${MASK_CYCLE:-0}"); peer=(--device "$DEVICE" --threads "$THREADS")
if [ "$DTYPE" = bf16 ]; then ours+=(--bf16); peer+=(--bf16); fi
[ -n "${BATCH:-}" ] && ours+=(--batch-size "$BATCH")
[ "${CHECKPOINT:-0}" = 1 ] && ours+=(--checkpoint-activations)
ATTENTION="${ATTENTION:-auto}"; [ "$DEVICE" = cpu ] && ATTENTION=auto
PEERS="${EXTRA_PEER:-}"
if [ -n "${OFFICIAL_DRIVER:-}" ]; then
  [ -f "$OFFICIAL_DRIVER" ] || { echo "train-step.sh: OFFICIAL_DRIVER=$OFFICIAL_DRIVER is not a file" >&2; exit 2; }
  OFFICIAL_JEPA="$(bench/fetch-official.sh)"; export OFFICIAL_JEPA
  PEERS="$OFFICIAL_DRIVER $PEERS"
fi
for v in ${VARIANTS:-}; do
  case "$v" in --cast-weights|--graph-blocks|--target-stream) ;;
    *) echo "train-step.sh: VARIANTS takes --cast-weights, --graph-blocks and --target-stream, not $v" >&2; exit 2 ;;
  esac
done
# row NAME OUT CMD...: one row of the table, CMD's JSON line in OUT. A row that fails (e.g. out of
# GPU memory) becomes a row saying so with its last error line, and the table goes on: a GPU
# session's other rows are not lost to one of them. The script then exits 1.
failed=0
row() {
  local name="$1" out="$2"; shift 2
  if ! "$@" > "$out" 2> "$out.err"; then
    local why; why=$(grep -v '^[[:space:]]*$' "$out.err" | tail -n 1 | cut -c1-300)
    "$PY" -c 'import json, sys; print(json.dumps({"impl": sys.argv[1], "failed": sys.argv[2]}))' \
      "$name" "${why:-exit status only}" > "$out"
    failed=1
  fi
  cat "$out.err" >&2
  # The row as soon as it is done, in brief: a run cut short (a device call's time limit) keeps
  # its rows.
  "$PY" - "$name" "$out" <<'PYEOF' || true
import json, sys
name, path = sys.argv[1], sys.argv[2]
r = json.loads([l for l in open(path) if l.startswith("{")][-1])
if "failed" in r:
    print(f"row: {name}: failed: {r['failed']}")
else:
    mem = r.get("peak_reserved_bytes") or r.get("memory_used_bytes")
    mem = f", {mem / 2**30:.1f} GiB" if mem else ""
    losses = ", ".join(f"{l:.4f}" for l in r.get("losses", [])[:3])
    print(f"row: {name}: {r['median_s']:.4f} s/step, {r['batch_size'] / r['median_s']:.1f} clips/s{mem}; "
          f"losses {losses}", flush=True)
PYEOF
}
for cfg in "${CONFIGS[@]}"; do
  runs=()
  # Order: the first of ours, then the peers (the bar), then the other rows of ours, so that a
  # run cut short still has the comparison that matters.
  first="${ATTENTION%% *}"
  ours_row() {  # ours_row NAME FILE ARGS...: one row of ours on this config
    local name="$1" file="$2"; shift 2
    row "$name" "$file" \
      "$BIN" --config "$cfg" --inputs "$TMP/in.safetensors" --warmup "$WARMUP" --steps "$STEPS" \
      "${ours[@]}" "$@"
    runs+=("$file")
  }
  ours_row "ours --attention $first" "$TMP/ours-$first.json" --attention "$first"
  # Every row of ours writes the same inputs (config and seed) before it starts, so the peers
  # have them even where ours failed; without any, they fail as rows too.
  row "torch (bench/train_step_torch.py)" "$TMP/torch.json" \
    "$PY" bench/train_step_torch.py --inputs "$TMP/in.safetensors" "${peer[@]}"
  runs+=("$TMP/torch.json")
  n=0
  for extra in $PEERS; do
    n=$((n + 1)); out="$TMP/extra-$n.json"
    row "$extra" "$out" "$PY" "$extra" --inputs "$TMP/in.safetensors" "${peer[@]}"
    runs+=("$out")
  done
  for att in ${ATTENTION#"$first"}; do
    ours_row "ours --attention $att" "$TMP/ours-$att.json" --attention "$att"
  done
  # Out of GPU memory without activation checkpointing (ViT-H at batch 24 may be): the same row
  # once more with it, so the config still gets a row of ours.
  if [ "${CHECKPOINT:-0}" != 1 ] && grep -qi "out of memory\|OUT_OF_MEMORY" "$TMP/ours-$first.json.err"; then
    ours_row "ours --attention $first --checkpoint-activations (after out of memory)" "$TMP/ours-ckpt.json" \
      --attention "$first" --checkpoint-activations
  fi
  for v in ${VARIANTS:-}; do
    ours_row "ours $v" "$TMP/ours$v.json" "$v" --attention "$first"
  done
  if [ "${COMPILE:-0}" = 1 ]; then
    row "torch.compile (bench/train_step_torch.py --compile)" "$TMP/compile.json" \
      "$PY" bench/train_step_torch.py --inputs "$TMP/in.safetensors" "${peer[@]}" --compile
    runs+=("$TMP/compile.json")
  fi
  "$PY" - "$cfg" "$THREADS" "${PEAK_TFLOPS:-}" "${runs[@]}" <<'PYEOF'
import json, sys
cfg, threads, peak, files = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
# Each run's JSON line (a peer may print log lines before it).
rows = [json.loads([l for l in open(f) if l.startswith("{")][-1]) for f in files]
done = [r for r in rows if "failed" not in r]
if not done:
    print(f"{cfg}: every row failed")
    for r in rows:
        print(f"- {r['impl']}: {r['failed']}")
    sys.exit(0)
ours = done[0]  # the first row that ran (the first of ours unless it failed): the ratios' base
flops = next((r["flops_per_step"] for r in done if "flops_per_step" in r), None)
batch = ours["batch_size"]
tflop = f"{flops / 1e12:.3f} model TFLOP per step (matmuls)" if flops else "FLOPs not reported"
print(f"{cfg}: {ours['device']}, {ours['dtype']}, batch {batch}, {threads} threads; {tflop}")
base = "torch ÷ ours" if ours is rows[0] else f"÷ {ours['impl']} (the first row failed)"
print(f"| impl | s/step (median) | clips/s | TFLOP/s | MFU | memory | {base} |")
print("|---|---|---|---|---|---|---|")
for r in rows:
    if "failed" in r:
        print(f"| {r['impl']} | failed: {r['failed'].replace('|', '/')} | – | – | – | – | – |")
        continue
    s = r["median_s"]
    mem = r.get("peak_reserved_bytes") or r.get("memory_used_bytes")
    mem = f"{mem / 2**30:.1f} GiB" + (" peak reserved" if r.get("peak_reserved_bytes") else " in use") if mem else "–"
    mfu = f"{100 * flops / s / 1e12 / float(peak):.1f} %" if peak and flops else "–"
    tflops = f"{flops / s / 1e12:.2f}" if flops else "–"
    print(f"| {r['impl']} | {s:.4f} | {batch / s:.1f} | {tflops} | {mfu} | {mem} "
          f"| {s / ours['median_s']:.2f}× |")
for r in rows:
    if r.get("memory_used_bytes") and r.get("peak_reserved_bytes"):
        print(f"{r['impl']}: {r['memory_used_bytes'] / 2**30:.1f} GiB of device memory in use after the run "
              "(the CUDA context, kernels and library workspaces included; the table's figure is the pool's peak)")
    if r.get("stage_s") is not None:
        print(f"{r['impl']}: packing and uploading one batch {1e3 * r['stage_s']:.1f} ms "
              "(the job's per-step cost, outside the step times above)")
    g = r.get("cudnn_graphs")
    if g:
        timed = ""
        if "built_timed" in g:
            timed = f"; {g['built_timed']} of them, {g['build_s_timed']:.2f} s, inside the timed steps"
        print(f"{r['impl']}: {g['built']} cuDNN attention graphs built, {g['build_s']:.2f} s, in all"
              f"{timed} (a step builds them when it brings a new context length)")
print("first losses: " + "; ".join(
    f"{r['impl']} " + ", ".join(f"{l:.4f}" for l in r["losses"][:3]) for r in done))
PYEOF
done
if [ "$failed" != 0 ]; then
  echo "train-step.sh: some rows failed (marked in the tables above)" >&2
  exit 1
fi
