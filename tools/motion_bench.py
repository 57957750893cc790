#!/usr/bin/env python3
"""A small labelled video benchmark of motion classes, made from real photographs.

    motion_bench.py OUT_DIR [--source photos|digits] [--size 64] [--frames 64]
                    [--clips-per-class 2] [--seed 0]

Each clip is a virtual camera moving over one photograph shipped in a PyPI package
(scikit-image's sample images, scikit-learn's sample images), with one of eight motions:
pan left / right / up / down, rotate clockwise / counter-clockwise, zoom in / out — in the spirit
of Something-Something's motion labels: the class is in how the content moves, not in what it
shows. Speeds, start positions and scales are drawn per clip from the seed. Clips are real
H.264 MP4s (ffmpeg, yuv420p). The split is by source image: every image's clips are all in
train or all in test, so a probe cannot pass by recognising the picture.

`--source digits` moves the same camera over pages of scikit-learn's 1,797 handwritten digits
instead (a new random page of 48 enlarged digits per clip, in the spirit of Moving MNIST), so
the unlabelled pretraining clips do not repeat a handful of pictures; the digits are split
between train and test as the images are.

Writes OUT_DIR/{train,test}/*.mp4 and the official index format (`path label` per line, paths
absolute) OUT_DIR/train.csv, OUT_DIR/test.csv, plus OUT_DIR/classes.txt.
"""

import argparse
import math
import os
import subprocess
import sys

import numpy as np
from scipy import ndimage

CLASSES = [
    "pan_left",
    "pan_right",
    "pan_up",
    "pan_down",
    "rotate_cw",
    "rotate_ccw",
    "zoom_in",
    "zoom_out",
]

# Photographs and scans only (no synthetic patterns), in a fixed order.
SKIMAGE = [
    "astronaut",
    "brick",
    "camera",
    "cat",
    "cell",
    "chelsea",
    "clock",
    "coffee",
    "coins",
    "grass",
    "gravel",
    "hubble_deep_field",
    "immunohistochemistry",
    "moon",
    "page",
    "retina",
    "rocket",
    "text",
]


def photographs():
    """[(name, float32 HxWx3 in [0, 1])] from the installed packages."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    out = []
    for name in SKIMAGE:
        img = np.asarray(getattr(skimage.data, name)())
        out.append((name, img))
    sample = load_sample_images()
    for fname, img in zip(sample.filenames, sample.images):
        out.append(("sklearn_" + os.path.splitext(os.path.basename(fname))[0], np.asarray(img)))
    result = []
    for name, img in out:
        img = img.astype(np.float32)
        if img.max() > 1.0:
            img = img / 255.0
        if img.ndim == 2:
            img = np.stack([img] * 3, axis=-1)
        result.append((name, img[..., :3]))
    return result


def digit_images():
    """scikit-learn's 1,797 handwritten digits (8×8, float32 in [0, 1])."""
    from sklearn.datasets import load_digits

    return load_digits().images.astype(np.float32) / 16.0


def digit_canvas(digits, rng, side=192, count=48, scale=3):
    """A float32 [side, side, 3] page of `count` digits drawn from `digits` (each enlarged
    `scale`× with bilinear interpolation, random brightness, overlapping by max) on a dark
    background: every clip gets its own page, so no two clips share their content."""
    canvas = np.zeros((side, side), np.float32)
    cell = 8 * scale
    for i in rng.integers(0, len(digits), count):
        glyph = ndimage.zoom(digits[i], scale, order=1) * rng.uniform(0.5, 1.0)
        y, x = rng.integers(0, side - cell, 2)
        canvas[y : y + cell, x : x + cell] = np.maximum(canvas[y : y + cell, x : x + cell], glyph)
    tint = rng.uniform(0.6, 1.0, 3).astype(np.float32)
    return np.clip(canvas[..., None] * tint + 0.05, 0.0, 1.0)


def render(img, motion, size, frames, rng):
    """Frames [T, size, size, 3] uint8 of a camera moving over img."""
    h, w, _ = img.shape
    short = min(h, w)
    # Window side in source pixels (at the largest extent of a zoom), and the motion's extent;
    # the window (rotated: its diagonal) stays inside the picture for the whole clip.
    pan = rng.uniform(0.2, 0.3) * short  # total pan distance
    spin = rng.uniform(0.6, 1.2)  # total rotation, radians
    zoom = rng.uniform(1.6, 2.2)  # total zoom factor
    theta0 = rng.uniform(0, 2 * math.pi) if motion.startswith("rotate") else 0.0
    if motion.startswith("pan"):
        side = short * rng.uniform(0.3, 0.4)
    elif motion == "zoom_out":
        side = short * rng.uniform(0.5, 0.65) / zoom
    else:
        side = short * rng.uniform(0.5, 0.65)
    largest = side * (zoom if motion == "zoom_out" else 1.0)
    radius = largest * math.sqrt(2) / 2
    dx, dy = {
        "pan_left": (-pan, 0),
        "pan_right": (pan, 0),
        "pan_up": (0, -pan),
        "pan_down": (0, pan),
    }.get(motion, (0, 0))
    lo_x, hi_x = radius - min(dx, 0), w - radius - max(dx, 0)
    lo_y, hi_y = radius - min(dy, 0), h - radius - max(dy, 0)
    if lo_x >= hi_x or lo_y >= hi_y:
        raise ValueError("image too small for the motion")
    cx0, cy0 = rng.uniform(lo_x, hi_x), rng.uniform(lo_y, hi_y)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    u = (xs + 0.5) / size - 0.5
    v = (ys + 0.5) / size - 0.5
    out = np.empty((frames, size, size, 3), np.uint8)
    for t in range(frames):
        a = t / max(frames - 1, 1)
        cx, cy = cx0 + a * dx, cy0 + a * dy
        theta = theta0
        scale = side
        if motion == "rotate_cw":
            theta += a * spin
        elif motion == "rotate_ccw":
            theta -= a * spin
        elif motion == "zoom_in":
            scale = side * zoom ** (-a)
        elif motion == "zoom_out":
            scale = side * zoom ** (a - 1) * zoom
        c, s = math.cos(theta), math.sin(theta)
        sx = cx + scale * (c * u - s * v)
        sy = cy + scale * (s * u + c * v)
        for ch in range(3):
            out[t, :, :, ch] = np.clip(
                ndimage.map_coordinates(img[:, :, ch], [sy - 0.5, sx - 0.5], order=1, mode="reflect")
                * 255.0
                + 0.5,
                0,
                255,
            ).astype(np.uint8)
    return out


def encode(frames, path, fps=30):
    t, h, w, _ = frames.shape
    cmd = [
        "ffmpeg", "-v", "error", "-y",
        "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-r", str(fps), "-i", "-",
        "-c:v", "libx264", "-preset", "veryfast", "-crf", "20", "-pix_fmt", "yuv420p",
        "-g", "32", "-movflags", "+faststart", path,
    ]
    subprocess.run(cmd, input=frames.tobytes(), check=True)


def add_clip(rows, out, split, stem, img, motion, label, a, rng):
    """Renders one clip of `motion` over `img`, encodes it to OUT/split/stem.mp4 and records its
    index line."""
    os.makedirs(os.path.join(out, split), exist_ok=True)
    path = os.path.join(out, split, f"{stem}.mp4")
    encode(render(img, motion, a.size, a.frames, rng), path)
    rows[split].append(f"{path} {label}")


def write_indexes(out, rows):
    """OUT/{train,test}.csv (`path label` lines) and OUT/classes.txt."""
    for split, lines in rows.items():
        with open(os.path.join(out, f"{split}.csv"), "w") as f:
            f.write("\n".join(lines) + "\n")
    with open(os.path.join(out, "classes.txt"), "w") as f:
        f.write("\n".join(CLASSES) + "\n")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--frames", type=int, default=64)
    p.add_argument("--clips-per-class", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-every", type=int, default=4, help="every N-th image is a test image")
    p.add_argument("--max-images", type=int, default=0, help="use only the first N images (0: all)")
    p.add_argument(
        "--source",
        choices=["photos", "digits"],
        default="photos",
        help="photos: camera motions over the packages' photographs, --clips-per-class per image "
        "and class; digits: over pages of scikit-learn's handwritten digits, one new page per clip, "
        "--clips-per-class × 15 train and × 5 test clips per class, the digits split like the images",
    )
    a = p.parse_args()
    out = os.path.abspath(a.out)
    if a.source == "digits":
        return digits_main(a, out)
    images = photographs()
    if a.max_images:
        images = images[: a.max_images]
    rng = np.random.default_rng(a.seed)
    rows = {"train": [], "test": []}
    for i, (name, img) in enumerate(images):
        split = "test" if i % a.test_every == a.test_every - 1 else "train"
        for label, motion in enumerate(CLASSES):
            for k in range(a.clips_per_class):
                add_clip(rows, out, split, f"{name}-{motion}-{k}", img, motion, label, a, rng)
    write_indexes(out, rows)
    print(
        f"{len(images)} images, {len(CLASSES)} classes: {len(rows['train'])} train clips, "
        f"{len(rows['test'])} test clips ({a.frames} frames, {a.size}x{a.size}) in {out}"
    )


def digits_main(a, out):
    digits = digit_images()
    index = np.arange(len(digits))
    pools = {
        "train": digits[index % a.test_every != a.test_every - 1],
        "test": digits[index % a.test_every == a.test_every - 1],
    }
    per_class = {"train": 15 * a.clips_per_class, "test": 5 * a.clips_per_class}
    rng = np.random.default_rng(a.seed)
    rows = {"train": [], "test": []}
    for split in ("train", "test"):
        for label, motion in enumerate(CLASSES):
            for k in range(per_class[split]):
                page = digit_canvas(pools[split], rng)
                add_clip(rows, out, split, f"digits-{motion}-{k}", page, motion, label, a, rng)
    write_indexes(out, rows)
    print(
        f"{len(pools['train'])} train / {len(pools['test'])} test digits, {len(CLASSES)} classes: "
        f"{len(rows['train'])} train clips, {len(rows['test'])} test clips ({a.frames} frames, "
        f"{a.size}x{a.size}) in {out}"
    )


if __name__ == "__main__":
    sys.exit(main())
