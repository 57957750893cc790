"""Writes operators/tests/goldens/randaugment_pil.{bin,txt}: what Pillow's own functions give for
each RandAugment operation (spec §9: ImageOps / ImageEnhance / Image.transform with bicubic
resampling and a grey fill) on one small RGB frame, for `cargo test -p vjepa-operators --test
randaugment_pil`.

Two frames, an even and an odd size (PIL rotates about (W/2, H/2), a half pixel for odd sizes).
The .txt has a `frame H W` line per frame and then one `op argument` line per case; the .bin
holds, in the same order, each input frame (H x W x 3 u8) followed by its cases' outputs. Run
with any Python that has Pillow and numpy:

    python tools/reference/make_randaugment_golden.py
"""

import os

import numpy as np
import PIL
from PIL import Image, ImageEnhance, ImageOps

SIZES = [(20, 24), (19, 23)]
FILL = (128, 128, 128)
HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "..", "operators", "tests", "goldens")


def frame(H: int, W: int) -> np.ndarray:
    rng = np.random.default_rng(9)
    y, x = np.mgrid[0:H, 0:W]
    base = np.stack([40 + 7 * x, 30 + 9 * y, 200 - 3 * x - 4 * y], axis=-1).astype(np.float64)
    img = base + rng.normal(0, 18, size=(H, W, 3))
    img[3, 5] = (255, 255, 255)
    img[11, 17] = (0, 0, 0)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def affine(img, m):
    return img.transform(img.size, Image.AFFINE, m, resample=Image.BICUBIC, fillcolor=FILL)


def solarize_add(img, add):
    lut = [min(255, i + add) if i < 128 else i for i in range(256)]
    return img.point(lut * 3)


CASES = [
    ("AutoContrast", None, ImageOps.autocontrast),
    ("Equalize", None, ImageOps.equalize),
    ("Invert", None, ImageOps.invert),
    ("Posterize", 2, ImageOps.posterize),
    ("Posterize", 1, ImageOps.posterize),
    ("Solarize", 77, ImageOps.solarize),
    ("Solarize", 180, ImageOps.solarize),
    ("SolarizeAdd", 77, solarize_add),
    ("Color", 0.37, lambda i, f: ImageEnhance.Color(i).enhance(f)),
    ("Color", 1.63, lambda i, f: ImageEnhance.Color(i).enhance(f)),
    ("Contrast", 0.37, lambda i, f: ImageEnhance.Contrast(i).enhance(f)),
    ("Contrast", 1.63, lambda i, f: ImageEnhance.Contrast(i).enhance(f)),
    ("Brightness", 0.37, lambda i, f: ImageEnhance.Brightness(i).enhance(f)),
    ("Brightness", 1.63, lambda i, f: ImageEnhance.Brightness(i).enhance(f)),
    ("Sharpness", 0.37, lambda i, f: ImageEnhance.Sharpness(i).enhance(f)),
    ("Sharpness", 1.63, lambda i, f: ImageEnhance.Sharpness(i).enhance(f)),
    ("Rotate", 21.0, lambda i, d: i.rotate(d, resample=Image.BICUBIC, fillcolor=FILL)),
    ("Rotate", -17.5, lambda i, d: i.rotate(d, resample=Image.BICUBIC, fillcolor=FILL)),
    ("Rotate", 26.837, lambda i, d: i.rotate(d, resample=Image.BICUBIC, fillcolor=FILL)),
    ("Rotate", -29.113, lambda i, d: i.rotate(d, resample=Image.BICUBIC, fillcolor=FILL)),
    ("ShearX", 0.21, lambda i, f: affine(i, (1, f, 0, 0, 1, 0))),
    ("ShearY", -0.27, lambda i, f: affine(i, (1, 0, 0, f, 1, 0))),
    ("TranslateX", 0.31, lambda i, p: affine(i, (1, 0, p * i.size[0], 0, 1, 0))),
    ("TranslateY", -0.173, lambda i, p: affine(i, (1, 0, 0, 0, 1, p * i.size[1]))),
]


def main() -> None:
    outs, lines = [], []
    for H, W in SIZES:
        src = frame(H, W)
        img = Image.fromarray(src, "RGB")
        outs.append(src)
        lines.append(f"frame {H} {W}")
        for name, arg, fn in CASES:
            out = fn(img) if arg is None else fn(img, arg)
            outs.append(np.asarray(out.convert("RGB"), dtype=np.uint8))
            lines.append(f"{name} {'' if arg is None else arg}".rstrip())
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "randaugment_pil.bin"), "wb") as f:
        for o in outs:
            f.write(o.tobytes())
    with open(os.path.join(OUT, "randaugment_pil.txt"), "w") as f:
        f.write(f"# Pillow {PIL.__version__}\n")
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
