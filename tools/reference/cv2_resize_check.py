#!/usr/bin/env python3
"""Randomized byte-for-byte comparison of vjepa_ingest::Cv2Linear (the official evaluation's
resize, pipeline/ingest/src/cv2_resize.rs) against
cv2.resize(..., interpolation=cv2.INTER_LINEAR) on uint8 HxWx3 images.

Usage (the torch venv has OpenCV):
    cargo build --release --locked -p vjepa-bench --bin cv2-resize-check
    "$(ops/torch-venv.sh)" tools/reference/cv2_resize_check.py [--cases N] [--seed S] [--big N] [--bin PATH]
  (set OPENCV_CPU_DISABLE=AVX512-SKX,... in the environment to test lower dispatch levels;
  OpenCV spells the features with '-' and '.')

For each case it draws a source size, a destination size and a region of the
output, sends the whole image to target/release/cv2-resize-check (which copies only
`source_window` into a padded buffer and runs `resize_region`), and compares
the region with the same slice of cv2's whole output. Every 4th case it also
checks that `source_window` really is enough, by scrambling every source pixel
outside the window and checking that cv2's output in the region is unchanged.
"""
import argparse, os, struct, subprocess, sys, time
import numpy as np
import cv2

HERE = os.path.dirname(os.path.abspath(__file__))

REAL = [(240, 320), (360, 640), (720, 1280), (1080, 1920), (480, 480), (480, 640),
        (270, 480), (240, 426), (360, 480), (576, 720), (1080, 1080), (720, 720),
        (144, 256), (180, 320), (1024, 1366), (1200, 1400), (16, 16), (32, 24)]


def pick_src(rng):
    u = rng.random()
    if u < 0.40:
        h, w = REAL[rng.integers(len(REAL))]
        if rng.random() < 0.25:
            h, w = w, h                                   # portrait video
        return int(h), int(w)
    if u < 0.80:
        return int(rng.integers(1, 1401)), int(rng.integers(1, 1401))
    if u < 0.90:
        return int(rng.integers(1, 33)), int(rng.integers(1, 33))  # tiny sources
    # exact multiple of a plausible output size (2x/3x/4x)
    k = int(rng.choice([2, 3, 4]))
    dh, dw = [(224, 298), (224, 448), (256, 341), (112, 150), (224, 224), (160, 213)][rng.integers(6)]
    if rng.random() < 0.5:
        dh, dw = int(rng.integers(1, 351)), int(rng.integers(1, 351))
    return dh * k, dw * k


def pick_dst(rng, h, w):
    u = rng.random()
    if u < 0.35:                                          # short side -> S, like the eval transform
        S = int(rng.choice([224, 256]))
        if h <= w:
            return S, int(S * w / h)
        return int(S * h / w), S
    if u < 0.50:                                          # exact integer downscale
        ks = [k for k in (2, 3, 4) if h % k == 0 and w % k == 0]
        if ks:
            k = int(rng.choice(ks))
            return h // k, w // k
        k = int(rng.choice([2, 3, 4]))
        return max(1, h // k), max(1, w // k)
    if u < 0.55:                                          # exact integer upscale
        k = int(rng.choice([2, 3, 4]))
        if h * k <= 3000 and w * k <= 3000:
            return h * k, w * k
    if u < 0.60:
        return h, w                                       # same size (copy)
    if u < 0.65:                                          # off-by-one sizes
        return max(1, h + int(rng.integers(-1, 2))), max(1, w + int(rng.integers(-1, 2)))
    if u < 0.82:                                          # random scale factor up or down
        f = float(np.exp(rng.uniform(np.log(0.05), np.log(4.0))))
        return (int(min(3000, max(1, round(h * f)))), int(min(3000, max(1, round(w * f * rng.uniform(0.8, 1.25))))))
    return int(rng.integers(1, 1401)), int(rng.integers(1, 1401))


def make_image(rng, h, w):
    kind = rng.integers(5)
    if kind == 0:                                         # white noise
        return rng.integers(0, 256, (h, w, 3), dtype=np.uint8), 'noise'
    if kind == 1:                                         # saturated blocks 0/255 with sharp edges
        bh, bw = int(rng.integers(1, 9)), int(rng.integers(1, 9))
        blocks = rng.integers(0, 2, ((h + bh - 1) // bh, (w + bw - 1) // bw, 3)).astype(np.uint8) * 255
        return np.ascontiguousarray(blocks.repeat(bh, 0).repeat(bw, 1)[:h, :w]), 'blocks'
    if kind == 2:                                         # smooth gradients + a hard edge
        y, x = np.mgrid[0:h, 0:w]
        img = np.stack([(x * 255 // max(1, w - 1)), (y * 255 // max(1, h - 1)),
                        ((x + y) * 7) % 256], -1).astype(np.uint8)
        img[:, : w // 3] = 255
        return img, 'gradient'
    if kind == 3:                                         # noise with saturated patches and lines
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        for _ in range(int(rng.integers(1, 6))):
            r0, c0 = int(rng.integers(h)), int(rng.integers(w))
            img[r0:r0 + int(rng.integers(1, h + 1)), c0:c0 + int(rng.integers(1, w + 1))] = rng.choice([0, 255])
        img[:, int(rng.integers(w))] = 255
        img[int(rng.integers(h)), :] = 0
        return img, 'patches'
    # near-extreme values (stress the saturation / rounding at both ends)
    return rng.choice(np.array([0, 1, 2, 253, 254, 255], np.uint8), (h, w, 3)), 'extremes'


def pick_region(rng, dh, dw):
    u = rng.random()
    if u < 0.25:
        return 0, 0, dh, dw                               # whole output
    if u < 0.60:                                          # centre square crop (eval transform)
        s = min(dh, dw, int(rng.choice([224, 256, 10**9])))
        return (dh - s) // 2, (dw - s) // 2, s, s
    h, w = int(rng.integers(1, dh + 1)), int(rng.integers(1, dw + 1))
    return int(rng.integers(0, dh - h + 1)), int(rng.integers(0, dw - w + 1)), h, w


class Rust:
    def __init__(self, path):
        self.p = subprocess.Popen([path], stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def run(self, img, dh, dw, top, left, h, w, pad):
        sh, sw = img.shape[:2]
        self.p.stdin.write(struct.pack('<9I', sh, sw, dh, dw, top, left, h, w, pad))
        self.p.stdin.write(np.ascontiguousarray(img).tobytes())
        self.p.stdin.flush()
        win = struct.unpack('<4I', self._read(16))
        out = np.frombuffer(self._read(h * w * 3), np.uint8).reshape(h, w, 3)
        return win, out

    def _read(self, n):
        b = b''
        while len(b) < n:
            c = self.p.stdout.read(n - len(b))
            if not c:
                raise RuntimeError('cv2-resize-check died')
            b += c
        return b


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--cases', type=int, default=5000)
    ap.add_argument('--big', type=int, default=20, help='extra 4K/1080p cases')
    ap.add_argument('--seed', type=int, default=12345)
    ap.add_argument('--bin', default=os.path.join(HERE, '..', '..', 'target', 'release', 'cv2-resize-check'))
    a = ap.parse_args()
    print('cv2', cv2.__version__, '| OPENCV_CPU_DISABLE=%r' % os.environ.get('OPENCV_CPU_DISABLE', ''),
          '| useIPP', cv2.ipp.useIPP(), 'useIPP_NotExact', cv2.ipp.useIPP_NotExact())
    print('CPU features:', cv2.getCPUFeaturesLine())
    rng = np.random.default_rng(a.seed)
    rust = Rust(a.bin)
    n = exact = win_checks = win_ok = 0
    pix = 0
    bad = []
    tags = {}
    t0 = time.time()
    total = a.cases + a.big
    for i in range(total):
        if i < a.cases:
            sh, sw = pick_src(rng)
            dh, dw = pick_dst(rng, sh, sw)
        else:                                             # big, realistic frames
            sh, sw = [(2160, 3840), (1080, 1920), (3840, 2160), (1440, 2560)][i % 4]
            S = [224, 256][i % 2]
            dh, dw = (S, int(S * sw / sh)) if sh <= sw else (int(S * sh / sw), S)
        img, kind = make_image(rng, sh, sw)
        top, left, h, w = pick_region(rng, dh, dw)
        pad = int(rng.integers(0, 4))
        ref = cv2.resize(img, (dw, dh), interpolation=cv2.INTER_LINEAR)
        win, out = rust.run(img, dh, dw, top, left, h, w, pad)
        want = ref[top:top + h, left:left + w]
        n += 1
        pix += want.size
        ok = np.array_equal(out, want)
        scale_tag = 'same' if (sh, sw) == (dh, dw) else ('down' if dh * dw < sh * sw else 'up')
        if (sh % dh == 0 and sw % dw == 0 and sh // dh == sw // dw and sh != dh):
            scale_tag = 'int%dx' % (sh // dh)
        tags.setdefault(scale_tag, [0, 0])
        tags[scale_tag][0] += 1
        if ok:
            exact += 1
            tags[scale_tag][1] += 1
        else:
            d = np.abs(out.astype(int) - want.astype(int))
            bad.append(((sh, sw), (dh, dw), (top, left, h, w), kind, int(d.max()), int((d > 0).sum())))
        if i % 4 == 0:                                    # is source_window really sufficient?
            r0, r1, c0, c1 = win
            scr = rng.integers(0, 256, img.shape, dtype=np.uint8)
            scr[r0:r1, c0:c1] = img[r0:r1, c0:c1]
            ref2 = cv2.resize(scr, (dw, dh), interpolation=cv2.INTER_LINEAR)
            win_checks += 1
            if np.array_equal(ref2[top:top + h, left:left + w], want):
                win_ok += 1
            else:
                bad.append(('window insufficient', (sh, sw), (dh, dw), (top, left, h, w), win))
        if (i + 1) % 500 == 0:
            print(f'  {i + 1}/{total} cases, {exact} exact, {time.time() - t0:.0f}s', flush=True)
    rust.p.stdin.close()
    rust.p.wait()
    print(f'cases: {n}  bit-exact: {exact}  ({100.0 * exact / n:.2f} %)  pixels compared: {pix // 3}')
    print('by kind:', {k: f'{v[1]}/{v[0]}' for k, v in sorted(tags.items())})
    print(f'source_window sufficiency checks: {win_ok}/{win_checks}')
    for b in bad[:50]:
        print('MISMATCH', b)
    sys.exit(0 if not bad else 1)


if __name__ == '__main__':
    main()
