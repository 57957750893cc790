#!/usr/bin/env python3
"""Collapse and layout statistics of token features written by `vjepa extract --tokens`
(or the `train-features.parquet` that `vjepa probe --augment none` writes to --out when it holds
the tokens in memory).

    feature_stats.py [--time-steps 8] [--max-clips 120] FEATURES.parquet [...]

Prints per file:
- rank: participation ratio (Σλ)²/Σλ² of the covariance eigenvalues of all token features
  (the `target_rank` metric's definition): ~k when the variance is spread over k directions.
- clip / time / position: the share of the token variance explained by the clip (its mean
  token), by the time step and by the spatial position (means over the other axes). An encoder
  that keeps where and when each token is has visible time and position shares; the frozen
  attentive probe needs them to read motion (README, "Proof that it learns").
Tokens are read as [T, H·W, D] per clip with T = --time-steps (num_frames / tubelet_size).
"""

import argparse
import sys

import numpy as np
import pyarrow.parquet as pq


def stats(path, time_steps, max_clips):
    t = pq.read_table(path, columns=["embedding", "tokens"]).to_pydict()
    if not t["tokens"] or not t["tokens"][0]:
        raise SystemExit(f"{path}: no tokens (run vjepa extract with --tokens)")
    d = len(t["embedding"][0])
    clips = []
    for tok in t["tokens"][:max_clips]:
        x = np.asarray(tok, dtype=np.float64).reshape(-1, d)
        if x.shape[0] % time_steps:
            raise SystemExit(f"{path}: {x.shape[0]} tokens per clip is not a multiple of --time-steps {time_steps}")
        clips.append(x.reshape(time_steps, -1, d))
    x = np.stack(clips)  # [clips, T, S, D]
    flat = x.reshape(-1, d)
    centred = flat - flat.mean(0)
    cov = centred.T @ centred
    rank = np.trace(cov) ** 2 / np.sum(cov * cov)
    total = (centred**2).sum(1).mean()

    def share(axes):
        m = x.mean(axis=axes) - flat.mean(0)
        return (m**2).sum(-1).mean() / total

    return {
        "clips": len(clips),
        "dim": d,
        "rank": rank,
        "clip": share((1, 2)),
        "time": share((0, 2)),
        "position": share((0, 1)),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+")
    p.add_argument("--time-steps", type=int, default=8)
    p.add_argument("--max-clips", type=int, default=120)
    a = p.parse_args()
    print("| features | clips | D | rank | clip share | time share | position share |")
    print("|---|---|---|---|---|---|---|")
    for f in a.files:
        s = stats(f, a.time_steps, a.max_clips)
        print(
            f"| {f} | {s['clips']} | {s['dim']} | {s['rank']:.1f} | {s['clip']:.2f} | "
            f"{s['time']:.3f} | {s['position']:.3f} |"
        )


if __name__ == "__main__":
    sys.exit(main())
