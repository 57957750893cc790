"""Writes the golden for `vjepa extract` on an official-layout `.pth.tar` (issue 8, acceptance 3):
the target encoder of ``pth_fixture.pth.tar`` run by PyTorch over the clips that spec §9 samples
from a small real video, to compare with the features ``vjepa extract`` writes for the same file.

What it writes (model/tests/goldens/):
- ``extract_clip.mkv``: 24 frames of 24×16 (W×H) 4:2:0 video, FFV1 in Matroska (a real codec and
  container, lossless so the decoded samples are known exactly; untagged, so BT.601 limited range).
  The content is a textured pattern that moves and changes colour from frame to frame.
- ``extract_golden.safetensors``:
  - ``rgb``: uint8 ``[24, 16, 24, 3]``, the frames as an RGB24 decode holds them (BT.601 limited
    range, chroma replicated over its 2×2 block, clamped, rounded). The samples are drawn so that
    no pixel lies within 0.02 of a rounding tie, so any correct conversion gives these bytes.
  - ``frames``: int64 ``[2, 4]``, the frame indices of the 2 segments (spec §9, allow_clip_overlap
    branch: L = 24 ≤ window 16·… ⇒ linspace over the first 16 frames, shifted by (L − 16)).
  - ``tokens``: float32 ``[2, 3, 8, 24]``: per segment and spatial view (3 crops of 16×16 along the
    long side at x = 0, 4, 8; the short side is already 16, so no resize), the target encoder's
    output tokens, computed in float64 from the saved float32 weights; ``embedding`` ``[2, 3, 24]``
    is their mean.

The command the Rust test (pipeline/tests/extract.rs, ``pth_checkpoint_features_equal_pytorch``)
compares against:
``vjepa extract --checkpoint model/tests/goldens/pth_fixture.pth.tar --config
model/tests/goldens/pth_fixture.yaml --index DIR/ --segments 2 --views 3 --tokens --out F``.

Usage (deterministic): python tools/reference/make_extract_golden.py
Needs torch, numpy, safetensors (ops/torch-venv.sh) and ffmpeg with the ffv1 encoder.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vjepa_ref as ref  # noqa: E402

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
GOLDENS = os.path.join(REPO, "model", "tests", "goldens")
VIDEO = os.path.join(GOLDENS, "extract_clip.mkv")
OUT = os.path.join(GOLDENS, "extract_golden.safetensors")

L, H, W = 24, 16, 24
FPC, STEP = 4, 4  # pth_fixture.yaml: num_frames 4; extract's default frame step 4
SEGMENTS, VIEWS, S = 2, 3, 16
# The fixture's encoder (pth_fixture.yaml; make_pth_fixture.py's ENC).
ENC = ref.EncoderConfig(embed_dim=24, depth=2, num_heads=4, mlp_hidden=96, patch_size=8,
                        tubelet_size=2, num_frames=4, crop_size=16, uniform_power=True)
MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


def yuv_to_rgb(y: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """BT.601 limited range → RGB in float64, before clamping and rounding (chroma per 2×2)."""
    kr, kb = 0.299, 0.114
    kg = 1.0 - kr - kb
    ys, cs = 255.0 / 219.0, 255.0 / 224.0
    u = np.repeat(np.repeat(u, 2, axis=0), 2, axis=1).astype(np.float64) - 128.0
    v = np.repeat(np.repeat(v, 2, axis=0), 2, axis=1).astype(np.float64) - 128.0
    yy = (y.astype(np.float64) - 16.0) * ys
    r = yy + 2.0 * (1.0 - kr) * cs * v
    g = yy - 2.0 * (1.0 - kb) * kb / kg * cs * u - 2.0 * (1.0 - kr) * kr / kg * cs * v
    b = yy + 2.0 * (1.0 - kb) * cs * u
    return np.stack([r, g, b], axis=-1)


def make_frames(rng: np.random.Generator):
    """YUV planes of a moving, colour-changing texture; redraws any sample whose RGB value is
    within 0.02 of a rounding tie (x.5), so the RGB24 bytes do not depend on float details."""
    yy, xx = np.mgrid[0:H, 0:W]
    cy, cx = np.mgrid[0:H // 2, 0:W // 2]
    ys, us, vs = [], [], []
    for t in range(L):
        base = 120 + 60 * np.sin((xx + 1.5 * t) / 3.0) * np.cos((yy - 0.7 * t) / 4.0)
        y = np.clip(base + rng.normal(0, 12, (H, W)), 16, 235)
        u = np.clip(128 + 50 * np.sin((cx + t) / 2.0) + rng.normal(0, 8, cx.shape), 16, 240)
        v = np.clip(128 + 50 * np.cos((cy - t) / 2.0) + rng.normal(0, 8, cy.shape), 16, 240)
        y, u, v = y.round().astype(np.uint8), u.round().astype(np.uint8), v.round().astype(np.uint8)
        for _ in range(1000):
            rgb = yuv_to_rgb(y, u, v)
            clamped = np.clip(rgb, 0.0, 255.0)
            near = np.abs(clamped - np.floor(clamped) - 0.5) < 0.02
            near &= (rgb > 0.0) & (rgb < 255.0)
            bad = np.argwhere(near.any(axis=-1))
            if len(bad) == 0:
                break
            for py, px in bad:
                y[py, px] = np.uint8(np.clip(int(y[py, px]) + rng.choice([-1, 1]), 16, 235))
        else:
            raise RuntimeError("could not avoid rounding ties")
        ys.append(y)
        us.append(u)
        vs.append(v)
    return ys, us, vs


def write_video(ys, us, vs) -> None:
    raw = b"".join(y.tobytes() + u.tobytes() + v.tobytes() for y, u, v in zip(ys, us, vs))
    subprocess.run(
        ["ffmpeg", "-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "yuv420p", "-s", f"{W}x{H}",
         "-r", "8", "-i", "-", "-c:v", "ffv1", "-level", "3", "-g", "1", VIDEO],
        input=raw, check=True)
    # Lossless: decoding gives the same samples back.
    back = subprocess.run(
        ["ffmpeg", "-v", "error", "-i", VIDEO, "-f", "rawvideo", "-pix_fmt", "yuv420p", "-"],
        capture_output=True, check=True).stdout
    if back != raw:
        raise RuntimeError("FFV1 round trip changed the samples")


def segment_indices() -> np.ndarray:
    """Spec §9 segment sampling (allow_clip_overlap branch; every partition here is shorter than
    the clip window): linspace over the first min(window, L) − 1 frames, padded with that frame,
    clipped below it, then shifted by i·((L − window) // (segments − 1))."""
    window = FPC * STEP
    assert L // SEGMENTS <= window
    sample_len = min(window, L) - 1
    k = sample_len // STEP
    idx = np.concatenate([np.linspace(0, sample_len, num=k), np.full(FPC - k, sample_len)])
    idx = np.clip(idx, 0, sample_len - 1).astype(np.int64)
    shift = (L - window) // (SEGMENTS - 1) if L > window else 0
    return np.stack([idx + i * shift for i in range(SEGMENTS)])


def main() -> None:
    rng = np.random.default_rng(2024)
    ys, us, vs = make_frames(rng)
    write_video(ys, us, vs)
    rgb = np.stack([np.clip(yuv_to_rgb(y, u, v), 0, 255) for y, u, v in zip(ys, us, vs)])
    rgb = np.floor(rgb + 0.5).astype(np.uint8)  # [L, H, W, 3]

    ckpt = torch.load(os.path.join(GOLDENS, "pth_fixture.pth.tar"), map_location="cpu",
                      weights_only=True)
    strip = len("module.backbone.")
    encoder = ref.VisionTransformer(ENC)
    encoder.load_state_dict({k[strip:]: v for k, v in ckpt["target_encoder"].items()},
                            strict=True)
    encoder = encoder.double().eval()

    frames = segment_indices()
    offsets = [0, (W - S) // 2, W - S][:VIEWS]  # uniform_crop along the long side
    tokens = np.zeros((SEGMENTS, VIEWS, 8, ENC.embed_dim))
    with torch.no_grad():
        for s in range(SEGMENTS):
            clip = rgb[frames[s]].astype(np.float64)  # [T, H, W, 3]
            clip = (clip - 255.0 * MEAN) / (255.0 * STD)
            for v, x0 in enumerate(offsets):
                view = clip[:, :, x0:x0 + S, :].transpose(3, 0, 1, 2)[None]  # [1, 3, T, S, S]
                out = encoder(torch.from_numpy(np.ascontiguousarray(view)))
                tokens[s, v] = out[0].numpy()
    save_file({
        "rgb": torch.from_numpy(rgb),
        "frames": torch.from_numpy(frames),
        "tokens": torch.from_numpy(tokens).float().contiguous(),
        "embedding": torch.from_numpy(tokens.mean(axis=2)).float().contiguous(),
    }, OUT, metadata={"video": os.path.basename(VIDEO), "segments": str(SEGMENTS),
                      "views": str(VIEWS)})
    print(f"wrote {VIDEO} ({os.path.getsize(VIDEO)} bytes) and {OUT}; frames {frames.tolist()}; "
          f"token std {tokens.std():.3f}")


if __name__ == "__main__":
    main()
