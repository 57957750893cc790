#!/usr/bin/env python3
"""Golden values for the encoder's position-table resizing (spec §2), made with PyTorch.

The reference resizes its fixed sin-cos table when a clip's token grid differs from the one it was
built for: video models view the `[1, N, D]` table as `[1, D, T, H, W]` (a permuted, i.e.
channels-last, view) and call `F.interpolate(mode='trilinear', scale_factor=(T'/T, H'/H, W'/W))`;
image models (num_frames = 1) view it as `[1, D, n, n]` and call `F.interpolate(mode='bicubic',
scale_factor=sqrt(N'/N))`. Both keep torch's default align_corners=False and pass scale factors,
not sizes, so the output side is trunc(in * factor) and the kernel maps coordinates with 1/factor.

This script builds small tables with its own numpy sin-cos code (spec §2 layout), resizes them
exactly that way and writes `model/tests/goldens/pos_interp.safetensors`:
  `<case>.src` `[N, D]` source table, `<case>.out` `[N', D]` torch's result,
and in the metadata `cases` (JSON): name, kind, dim, uniform_power, from grid, to grid.
`size_quirks` lists (in, out, torch_out) side pairs where trunc(in * (out / in)) != out, i.e.
where the reference's add of table and tokens fails; the model must refuse those grids.

With `--official-repo PATH` (a git dir of facebookresearch/jepa) it also checks that our source
tables equal the reference's `get_3d_sincos_pos_embed` / `get_2d_sincos_pos_embed` (read from
the repo at run time, not copied).

Run: "$(ops/torch-venv.sh)" tools/pos_interp_golden.py [--official-repo DIR]
"""

import argparse
import json
import math
import pathlib
import subprocess

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.numpy import save_file

OUT = pathlib.Path(__file__).resolve().parent.parent / "model/tests/goldens/pos_interp.safetensors"


def axis_table(d, positions):
    """[len(positions), d]: sin block then cos block, omega_k = 10000^(-k/(d/2))."""
    half = d // 2
    omega = 1.0 / 10000.0 ** (np.arange(half, dtype=np.float64) / half)
    arg = np.asarray(positions, dtype=np.float64)[:, None] * omega[None, :]
    return np.concatenate([np.sin(arg), np.cos(arg)], axis=1)


def video_table(dim, grid, uniform_power):
    gt, gh, gw = grid
    if uniform_power:
        dt = dh = dw = 2 * math.ceil(dim / 6)
    else:
        dt, dh, dw = dim // 2, dim // 4, dim // 4
    t, h, w = np.meshgrid(np.arange(gt), np.arange(gh), np.arange(gw), indexing="ij")
    rows = np.concatenate(
        [axis_table(dt, t.ravel()), axis_table(dh, h.ravel()), axis_table(dw, w.ravel())], axis=1
    )
    return rows[:, :dim]


def image_table(dim, side):
    h, w = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    return np.concatenate([axis_table(dim // 2, h.ravel()), axis_table(dim // 2, w.ravel())], axis=1)


def resize_video(table, grid, to):
    """The reference call on a `[1, N, D]` f32 table."""
    gt, gh, gw = grid
    dim = table.shape[-1]
    pe = torch.from_numpy(table).float().unsqueeze(0)
    factors = (to[0] / gt, to[1] / gh, to[2] / gw)
    x = pe.reshape(1, gt, gh, gw, dim).permute(0, 4, 1, 2, 3)
    y = F.interpolate(x, scale_factor=factors, mode="trilinear")
    return y.permute(0, 2, 3, 4, 1).reshape(-1, dim).numpy(), tuple(y.shape[2:])


def resize_image(table, side, to_side):
    dim = table.shape[-1]
    n = side * side
    pe = torch.from_numpy(table).float().unsqueeze(0)
    factor = math.sqrt(to_side * to_side / n)
    x = pe.reshape(1, side, side, dim).permute(0, 3, 1, 2)
    y = F.interpolate(x, scale_factor=factor, mode="bicubic")
    return y.permute(0, 2, 3, 1).reshape(-1, dim).numpy(), tuple(y.shape[2:])


VIDEO_CASES = [
    # name, dim, uniform_power, from, to (dim 14: 6 per axis, the last 4 columns cut)
    ("video_up", 14, True, (3, 4, 4), (6, 6, 7)),
    ("video_down", 14, True, (3, 4, 4), (2, 3, 2)),
    ("video_mixed", 14, True, (3, 4, 4), (4, 5, 3)),
    ("video_spatial_only", 14, True, (3, 4, 4), (3, 7, 7)),
    ("video_temporal_only", 14, True, (3, 4, 4), (5, 4, 4)),
    ("video_split_widths", 16, False, (2, 5, 4), (5, 3, 7)),
]
IMAGE_CASES = [
    ("image_up", 8, 5, 8),
    ("image_up_small", 8, 5, 7),
    ("image_down", 8, 5, 3),
]


def check_official(repo, tables):
    src = subprocess.run(
        ["git", "--git-dir", repo, "show", "HEAD:src/models/utils/pos_embs.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    ns = {}
    exec(compile(src, "pos_embs.py", "exec"), ns)
    n = 0
    for (kind, dim, up, grid), ours in tables:
        if kind == "video":
            if grid[1] != grid[2]:
                continue  # the reference only builds square tables
            ref = ns["get_3d_sincos_pos_embed"](dim, grid[1], grid[0], uniform_power=up)
        else:
            ref = ns["get_2d_sincos_pos_embed"](dim, grid)
        assert ref.shape == ours.shape, (kind, dim, ref.shape, ours.shape)
        assert np.array_equal(ref, ours), (kind, dim, np.abs(ref - ours).max())
        n += 1
    print(f"source tables equal the reference's ({n} checked)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--official-repo", help="git dir of facebookresearch/jepa to cross-check tables")
    args = ap.parse_args()

    tensors, cases, checked = {}, [], []
    for name, dim, up, grid, to in VIDEO_CASES:
        src = video_table(dim, grid, up)
        out, shape = resize_video(src, grid, to)
        assert shape == to, (name, shape, to)
        tensors[f"{name}.src"] = src.astype(np.float32)
        tensors[f"{name}.out"] = np.ascontiguousarray(out)
        cases.append(dict(name=name, kind="video", dim=dim, uniform_power=up, from_grid=grid, to_grid=to))
        checked.append((("video", dim, up, grid), src))
    for name, dim, side, to_side in IMAGE_CASES:
        src = image_table(dim, side)
        out, shape = resize_image(src, side, to_side)
        assert shape == (to_side, to_side), (name, shape)
        tensors[f"{name}.src"] = src.astype(np.float32)
        tensors[f"{name}.out"] = np.ascontiguousarray(out)
        cases.append(
            dict(name=name, kind="image", dim=dim, uniform_power=False,
                 from_grid=(1, side, side), to_grid=(1, to_side, to_side))
        )
        checked.append((("image", dim, False, side), src))

    quirks = []
    for a, b in [(11, 15), (13, 15), (14, 15), (14, 16), (8, 12), (23, 13)]:
        x = torch.zeros(1, 1, 1, 1, a)
        torch_out = F.interpolate(x, scale_factor=(1.0, 1.0, b / a), mode="trilinear").shape[-1]
        quirks.append((a, b, torch_out))
    if args.official_repo:
        check_official(args.official_repo, checked)

    OUT.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "torch": torch.__version__,
        "cases": json.dumps(cases),
        "size_quirks": json.dumps(quirks),
    }
    save_file(tensors, str(OUT), metadata=meta)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes, {len(cases)} cases, quirks {quirks})")


if __name__ == "__main__":
    main()
