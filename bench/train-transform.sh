#!/usr/bin/env bash
# The probe's training transform (`vjepa probe --augment official`: RandAugment
# rand-m7-n4-mstd0.5-inc1, random resized crop, random erasing; spec §9) against the official
# evaluation's `VideoTransform` on the same decoded clip, in one run: the time per clip of each
# and the ratio, and whether the two draw from the same distribution (per-channel mean and std
# of the normalised clip over DRAWS draws each: both sides' mean ± sd, and the two-sample
# Kolmogorov–Smirnov distance against its 1 % critical value).
#   bench/train-transform.sh
# Environment: VIDEO (default: a 320x240 H.264 sample made with `vjepa make-samples`), DRAWS
# (200), SIZE (224), OFFICIAL_DRIVER (the peer: a script kept outside this repository that runs
# the official transform on the same frames, reading the checkout of bench/fetch-official.sh
# from $OFFICIAL_JEPA; without it only our row is printed; it needs torch, numpy, torchvision,
# Pillow and OpenCV, installed into ops/torch-venv.sh's venv on first use). One thread each.
set -euo pipefail
cd "$(dirname "$0")/.."
DRAWS="${DRAWS:-200}"
SIZE="${SIZE:-224}"
OUT=target/train-transform
mkdir -p "$OUT"
cargo build --release --locked -q -p vjepa-bench --bin train-transform
cargo build --release --locked -q -p vjepa-pipeline --bin vjepa
BIN="${CARGO_TARGET_DIR:-target}/release"
VIDEO="${VIDEO:-}"
if [ -z "$VIDEO" ]; then
  rm -rf "$OUT/media"
  "$BIN/vjepa" make-samples "$OUT/media" --count 1 --size 320x240 --frames 96 --codec h264 >/dev/null
  VIDEO="$(ls "$OUT"/media/*.mp4 | head -n 1)"
fi
"$BIN/train-transform" --video "$VIDEO" --raw "$OUT/clip.rgb" --size "$SIZE" --draws "$DRAWS" \
  > "$OUT/ours.json"
FILES=("$OUT/ours.json")
if [ -n "${OFFICIAL_DRIVER:-}" ]; then
  [ -f "$OFFICIAL_DRIVER" ] || { echo "train-transform.sh: OFFICIAL_DRIVER=$OFFICIAL_DRIVER is not a file" >&2; exit 2; }
  OFFICIAL_JEPA="$(bench/fetch-official.sh)"; export OFFICIAL_JEPA
  PY="$(ops/torch-venv.sh)"
  if ! "$PY" -c "import torchvision, PIL, cv2" 2>/dev/null; then
    echo "train-transform.sh: installing torchvision, Pillow and OpenCV into the torch venv" >&2
    "$PY" -m pip install -q --no-deps torchvision pillow opencv-python-headless >&2
  fi
  read -r T H W < <(python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print(r["frames"], r["height"], r["width"])' "$OUT/ours.json")
  OMP_NUM_THREADS=1 "$PY" "$OFFICIAL_DRIVER" "$OUT/clip.rgb" "$T" "$H" "$W" "$SIZE" "$DRAWS" 0 \
    > "$OUT/official.json"
  FILES+=("$OUT/official.json")
fi
python3 - "${FILES[@]}" <<'PY'
import json, math, sys
rows = [json.load(open(p)) for p in sys.argv[1:]]
names = ["mean R", "mean G", "mean B", "std R", "std G", "std B"]
r0 = rows[0]
print(f"clip {r0['frames']} x {r0['height']}x{r0['width']}, {r0['draws']} draws each")
for r in rows:
    print(f"  {r['name']:>8}: {r['ms_per_clip']:.1f} ms per clip")
if len(rows) == 2:
    ours, off = rows
    print(f"  official / ours time per clip: {off['ms_per_clip'] / ours['ms_per_clip']:.2f}x")
    n, m = len(ours["stats"]), len(off["stats"])
    crit = 1.628 * math.sqrt((n + m) / (n * m))
    print(f"  {'statistic':<8} {'ours mean ± sd':>18} {'official mean ± sd':>20}   KS D (1% critical {crit:.3f})")
    def ms(v):
        mu = sum(v) / len(v)
        return mu, math.sqrt(sum((x - mu) ** 2 for x in v) / len(v))
    def ks(a, b):
        a, b = sorted(a), sorted(b)
        i = j = 0; d = 0.0
        while i < len(a) and j < len(b):
            x = min(a[i], b[j])
            while i < len(a) and a[i] <= x: i += 1
            while j < len(b) and b[j] <= x: j += 1
            d = max(d, abs(i / len(a) - j / len(b)))
        return d
    for k, name in enumerate(names):
        a = [s[k] for s in ours["stats"]]; b = [s[k] for s in off["stats"]]
        (ma, sa), (mb, sb) = ms(a), ms(b)
        d = ks(a, b)
        print(f"  {name:<8} {ma:>9.3f} ± {sa:<6.3f} {mb:>11.3f} ± {sb:<6.3f}   {d:.3f}{'' if d < crit else '  (differs)'}")
PY
