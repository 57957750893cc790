"""Golden for the official evaluation's spatial views (spec §9), made with OpenCV and torch.

For each case, one random RGB frame goes through the official evaluation's way of making views,
written here from the spec: the whole frame resized with ``cv2.resize(..., INTER_LINEAR)`` so
that its short side is ``S`` (several views) or ``int(S * 256 / 224)`` (one view; the long side
``int(short * long / short_side)``, no resize when the short side already is that size), then
``S x S`` crops at ``k * ((long - S) // (views - 1))`` along the long side, or the centre crop
``int(round((extent - S) / 2))``; then float, ``/ 255`` and ``(x - mean) / std`` in float32 as
torch computes them.

Writes ``pipeline/ingest/tests/goldens/eval_views.bin`` (little-endian): ``b"EVG1"``, u32 case
count; per case u32 height, width, S, views, the frame (height x width x 3 bytes), then per view
3 x S x S float32 (channel-major). Run with the torch venv (``ops/torch-venv.sh``):

    "$(ops/torch-venv.sh)" tools/reference/make_eval_view_golden.py
    cargo test --release -p vjepa-ingest --lib eval_view
"""

import pathlib
import struct

import cv2
import numpy as np
import torch

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

# (height, width, S, views): landscape and portrait, one and several views, down- and
# upscales, an exact 2x, a short side already at S, and centre offsets that are ties.
CASES = [
    (40, 56, 32, 1),
    (40, 56, 32, 3),
    (56, 40, 32, 3),
    (32, 48, 32, 2),
    (45, 80, 16, 4),
    (18, 30, 24, 3),
    (64, 96, 32, 3),
    (33, 33, 24, 1),
    (30, 41, 28, 1),
    (37, 120, 20, 5),
]


def frame(rng, h, w):
    """Noise with saturated blocks and a sharp edge (where rounding and clamping show)."""
    f = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    f[: h // 3, : w // 4] = 255
    f[h // 2 :, w // 2 : w // 2 + 3] = 0
    f[:, -2:] = rng.integers(250, 256, size=(h, 2, 3), dtype=np.uint8)
    return f


def resize_short(f, short):
    h, w = f.shape[:2]
    if (w <= h and w == short) or (h <= w and h == short):
        return f
    if w < h:
        size = (short, int(short * h / w))
    else:
        size = (int(short * w / h), short)
    return cv2.resize(f, size, interpolation=cv2.INTER_LINEAR)


def normalised(view):
    t = torch.from_numpy(view.astype(np.float64)).permute(2, 0, 1).float()
    t = torch.div(t, 255)
    mean = torch.as_tensor(MEAN, dtype=torch.float32)[:, None, None]
    std = torch.as_tensor(STD, dtype=torch.float32)[:, None, None]
    return t.sub(mean).div(std)


def views_of(f, s, views):
    if views == 1:
        r = resize_short(f, int(s * 256 / 224))
        h, w = r.shape[:2]
        top, left = int(round((h - s) / 2.0)), int(round((w - s) / 2.0))
        return [r[top : top + s, left : left + s]]
    r = resize_short(f, s)
    h, w = r.shape[:2]
    step = (max(h, w) - s) // (views - 1)
    out = []
    for i in range(views):
        start = i * step
        out.append(r[start : start + s, :] if h > w else r[:, start : start + s])
    return out


def main():
    rng = np.random.default_rng(20261124)
    blob = bytearray(b"EVG1" + struct.pack("<I", len(CASES)))
    for h, w, s, views in CASES:
        f = frame(rng, h, w)
        blob += struct.pack("<4I", h, w, s, views) + f.tobytes()
        for v in views_of(f, s, views):
            assert v.shape == (s, s, 3), (h, w, s, views, v.shape)
            blob += normalised(np.ascontiguousarray(v)).numpy().astype("<f4").tobytes()
    out = pathlib.Path(__file__).resolve().parents[2] / "pipeline/ingest/tests/goldens/eval_views.bin"
    out.write_bytes(bytes(blob))
    print(f"wrote {out} ({len(blob)} bytes, {len(CASES)} cases, cv2 {cv2.__version__}, torch {torch.__version__})")


if __name__ == "__main__":
    main()
