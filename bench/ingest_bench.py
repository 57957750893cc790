"""The ingest benchmark's driver (run it through bench/ingest.sh, which sets up its inputs).

Same files, same clips (plan written by our `ingest plan`), same cores, one run:
  ours    `ingest run`: THREADS threads, one GStreamer decoder each (1 decoder thread), file bytes
          -> seek to the window's key frame -> the 16 frames -> crop/resize/flip/normalise tensor.
  ffmpeg  the decode limit: one `ffmpeg -threads 1` process per clip, THREADS at once; `-ss` before
          `-i` (key-frame seek + accurate decode), select the 16 frames, crop + bilinear scale to
          S x S (+ hflip) in the same filter graph, raw RGB to a pipe. No normalisation.
  decord  the official loader's way: THREADS worker processes, per clip
          `VideoReader(path, num_threads=1)`, `seek(0)`, `get_batch(indices).asnumpy()`, then the
          same crop / bilinear resize (align_corners=False, no antialias) / flip / normalise in numpy.
Warm-up clips (untimed) go through every decoder first (each time it starts); each decoder then
decodes every timed clip once per round, REPEAT rounds. The order of the decoders rotates from
group to group and round to round.
"""

import argparse
import concurrent.futures as cf
import json
import math
import multiprocessing as mp
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float64) * 255.0
STD = np.array([0.229, 0.224, 0.225], dtype=np.float64) * 255.0

# (name, width, height, target bit rate (a typical web upload at that size), colour matrix tag:
# BT.601 for SD, BT.709 for HD, as encoders usually write them).
RESOLUTIONS = [("360p", 640, 360, "1000k", "smpte170m"), ("720p", 1280, 720, "2500k", "bt709")]
CODECS = ["h264", "vp9"]
# Four different contents per group: motion, texture, noise, colour (lavfi sources).
SOURCES = [
    "mandelbrot=s={w}x{h}:r=30",
    "life=s={w}x{h}:r=30:mold=10:ratio=0.3:death_color=#C83232:life_color=#00ff00,boxblur=2",
    "testsrc2=s={w}x{h}:r=30,noise=alls=6:allf=t",
    "gradients=s={w}x{h}:r=30:speed=0.05,noise=alls=8:allf=t",
]
SECONDS = 10
GOP = 60


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Inputs


def make_media(cache):
    """Encodes the benchmark videos once (10 s, 30 fps, GOP 60) and returns [(group, path)]."""
    os.makedirs(cache, exist_ok=True)
    out = []
    for res, w, h, rate, colour in RESOLUTIONS:
        kbps = int(rate[:-1])
        # x264: capped VBR; libvpx only honours a cap in CBR mode (noisy content overshoots 3x).
        limits = {
            "h264": ["-b:v", rate, "-maxrate", f"{kbps * 3 // 2}k", "-bufsize", f"{kbps * 2}k"],
            "vp9": ["-b:v", rate, "-minrate", rate, "-maxrate", rate],
        }
        tags = ["-colorspace", colour, "-color_primaries", colour, "-color_trc", colour,
                "-color_range", "tv"]
        for codec in CODECS:
            group = f"{res}-{codec}"
            for i, src in enumerate(SOURCES):
                ext = "mp4" if codec == "h264" else "webm"
                path = os.path.join(cache, f"{group}-{i}.{ext}")
                out.append((group, path))
                if os.path.exists(path):
                    continue
                if codec == "h264":
                    enc = ["-c:v", "libx264", "-preset", "medium", "-sc_threshold", "0",
                           "-movflags", "+faststart"]
                else:
                    enc = ["-c:v", "libvpx-vp9", "-deadline", "good", "-cpu-used", "5",
                           "-row-mt", "1"]
                tmp = path + ".part." + ext
                cmd = ["ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i",
                       src.format(w=w, h=h), "-t", str(SECONDS), *enc, *limits[codec], *tags,
                       "-g", str(GOP), "-keyint_min", str(GOP), "-pix_fmt", "yuv420p", tmp]
                log(f"making {path}")
                subprocess.run(cmd, check=True)
                os.replace(tmp, path)
    return out


# ---------------------------------------------------------------------------------------------
# The numpy transform (spec §1; torch interpolate bilinear, align_corners=False, antialias=False)


def taps(n_in, n_out):
    scale = np.float32(n_in) / np.float32(n_out)
    dst = np.arange(n_out, dtype=np.float32)
    src = np.maximum(scale * (dst + np.float32(0.5)) - np.float32(0.5), np.float32(0.0))
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    l1 = np.clip(src - i0.astype(np.float32), 0.0, 1.0).astype(np.float32)
    i1 = np.where(i0 < n_in - 1, i0 + 1, i0)
    return i0, i1, (np.float32(1.0) - l1), l1


def transform(frames, params, s, whole_float=False):
    """uint8 [T,H,W,3] -> float32 [3,T,S,S]: crop, bilinear resize, flip, normalise.

    `whole_float` first converts the whole clip to float32, as the official transform does
    (`torch.tensor(buffer, dtype=torch.float32)` before cropping); otherwise only the source rows
    the resize reads are converted.

    Vertical pass first on the two source rows each output row needs (whole-row copies), then
    the horizontal pass on S x W; the flip is a reversed column tap table. The same arithmetic
    as torch's kernel up to float rounding order.
    """
    if whole_float:
        frames = frames.astype(np.float32)
    c = params["crop"]
    x = frames[:, c["top"]:c["top"] + c["height"], c["left"]:c["left"] + c["width"], :]
    r0, r1, h0, h1 = taps(c["height"], s)
    q0, q1, w0, w1 = taps(c["width"], s)
    if params["flip"]:
        q0, q1, w0, w1 = q0[::-1], q1[::-1], w0[::-1], w1[::-1]
    t, w = x.shape[0], x.shape[2]
    v = np.take(x, r0, axis=1).astype(np.float32, copy=False)  # [T,S,w,3]
    v *= h0[None, :, None, None]
    v1 = np.take(x, r1, axis=1).astype(np.float32, copy=False)
    v1 *= h1[None, :, None, None]
    v += v1
    v = v.reshape(t * s, w * 3)  # columns interleaved with channels: gather along the last axis
    rgb = np.arange(3)
    c0 = (q0[:, None] * 3 + rgb).ravel()
    c1 = (q1[:, None] * 3 + rgb).ravel()
    out = np.take(v, c0, axis=1)
    out *= np.repeat(w0, 3)
    o1 = np.take(v, c1, axis=1)
    o1 *= np.repeat(w1, 3)
    out += o1
    out = out.reshape(t, s, s, 3)
    out -= MEAN.astype(np.float32)
    out /= STD.astype(np.float32)
    return np.ascontiguousarray(out.transpose(3, 0, 1, 2))


# ---------------------------------------------------------------------------------------------
# decord (worker processes)


def decord_init():
    import decord  # noqa: F401  (imported once per worker, before the clock starts)


def decord_tensor(job):
    import decord

    path, indices, params, s, whole_float = job
    vr = decord.VideoReader(path, num_threads=1, ctx=decord.cpu(0))
    vr.seek(0)
    frames = vr.get_batch(indices).asnumpy()
    return transform(frames, params, s, whole_float)


def decord_clip(job):
    """One clip in a worker; returns the worker's CPU seconds for it (all its threads)."""
    cpu = time.process_time()
    decord_tensor(job)
    return time.process_time() - cpu


def decord_len(path):
    import decord

    return len(decord.VideoReader(path, num_threads=1, ctx=decord.cpu(0)))


# ---------------------------------------------------------------------------------------------
# ffmpeg (one process per clip)


def ffmpeg_cmd(path, fps, indices, params, s):
    start = indices[0]
    uniq = sorted(set(indices))
    select = "+".join(f"eq(n\\,{i - start})" for i in uniq)
    c = params["crop"]
    vf = (f"select='{select}',crop={c['width']}:{c['height']}:{c['left']}:{c['top']},"
          f"scale={s}:{s}:flags=bilinear")
    if params["flip"]:
        vf += ",hflip"
    # Half a frame before the window's first frame: container timestamps are rounded (WebM: ms).
    seek = [] if start == 0 else ["-ss", f"{(start - 0.5) / fps:.6f}"]
    cmd = ["ffmpeg", "-nostdin", "-v", "error", "-threads", "1", "-filter_threads", "1",
           *seek, "-i", path, "-vf", vf, "-fps_mode", "passthrough", "-frames:v", str(len(uniq)),
           "-pix_fmt", "rgb24", "-f", "rawvideo", "pipe:1"]
    return cmd, uniq


def ffmpeg_clip(path, fps, indices, params, s):
    """Runs ffmpeg for one clip; returns uint8 [T,S,S,3] in `indices` order."""
    cmd, uniq = ffmpeg_cmd(path, fps, indices, params, s)
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=False)
    want = len(uniq) * s * s * 3
    if r.returncode != 0 or len(r.stdout) != want:
        raise RuntimeError(f"ffmpeg on {path} {indices}: rc {r.returncode}, "
                           f"{len(r.stdout)} of {want} bytes: {r.stderr.decode()[-500:]}")
    frames = np.frombuffer(r.stdout, dtype=np.uint8).reshape(len(uniq), s, s, 3)
    pos = {i: k for k, i in enumerate(uniq)}
    return frames[[pos[i] for i in indices]]


# ---------------------------------------------------------------------------------------------


def children_cpu():
    """User + system CPU seconds of the finished (waited-for) child processes so far."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def psnr_255(a, b):
    """PSNR (peak 255) and max abs diff between two tensors in 0..255 units."""
    d = a.astype(np.float64) - b.astype(np.float64)
    mse = float(np.mean(d * d))
    return (math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)), float(np.abs(d).max())


def denorm(t):
    """[3,T,S,S] normalised -> [T,S,S,3] in 0..255."""
    return t.transpose(1, 2, 3, 0) * STD + MEAN


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True, help="our `ingest` binary")
    ap.add_argument("--cache", required=True, help="media/plan cache directory")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clips", type=int, default=32, help="timed clips per group")
    ap.add_argument("--repeat", type=int, default=1,
                    help="rounds: times each decoder sees each timed clip")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--crop-size", type=int, default=224)
    ap.add_argument("--fidelity-clips", type=int, default=2, help="per group")
    ap.add_argument("--decord-transform", choices=["lean", "official"], default="lean",
                    help="lean: convert only the rows the resize reads to float; official: the "
                    "whole clip to float32 first, as the official transform does")
    ap.add_argument("--json", help="write all results here")
    a = ap.parse_args()
    threads = a.threads
    whole_float = a.decord_transform == "official"

    media = make_media(os.path.join(a.cache, "media"))
    plan_path = os.path.join(a.cache, "plan.json")
    with open(plan_path, "w") as f:
        subprocess.run([a.bin, "plan", *[f"{g}={p}" for g, p in media], "--clips", str(a.clips),
                        "--warmup", str(threads), "--seed", str(a.seed),
                        "--crop-size", str(a.crop_size)], stdout=f, check=True)
    with open(plan_path) as f:
        plan = json.load(f)
    files = plan["files"]
    s = plan["crop_size"]
    groups = sorted({c["group"] for c in plan["clips"]})

    # The frame counts must agree, or the decoders would not see the same windows.
    with mp.get_context("fork").Pool(1) as pool:
        lens = pool.map(decord_len, [f["path"] for f in files])
    for f, n in zip(files, lens):
        if n != f["num_frames"]:
            log(f"WARNING: {f['path']}: decord counts {n} frames, our decoder {f['num_frames']}")

    def job(c):
        f = files[c["file"]]
        return f["path"], f["fps"], c["indices"], c["params"]

    dump_dir = tempfile.mkdtemp(prefix="ingest-bench-")
    by_group = {}
    for group in groups:
        clips = [c for c in plan["clips"] if c["group"] == group]
        timed = [c for c in clips if not c["warmup"]]
        by_group[group] = {
            "warm": [c for c in clips if c["warmup"]],
            "timed": timed,
            "fid": [c["id"] for c in timed[: a.fidelity_clips]],
        }
    results = {g: {"clips": 0, "seconds": {"ours": 0.0, "ffmpeg": 0.0, "decord": 0.0},
                   "cpu_seconds": {"ours": 0.0, "ffmpeg": 0.0, "decord": 0.0},
                   "ours_bytes_read": 0.0, "file_bytes": 0.0} for g in groups}

    def run_ours(group, dump):
        g = by_group[group]
        cmd = [a.bin, "run", "--plan", plan_path, "--group", group, "--threads", str(threads)]
        if dump:
            cmd += ["--dump-dir", dump_dir, "--dump", ",".join(map(str, g["fid"]))]
        r = json.loads(subprocess.run(cmd, stdout=subprocess.PIPE, check=True).stdout)
        results[group]["ours_bytes_read"] += r["bytes_read_per_clip"] * r["clips"]
        results[group]["file_bytes"] += r["file_bytes_per_clip"] * r["clips"]
        return r["seconds"], r["cpu_seconds"] or math.nan

    def run_ffmpeg(group, _dump):
        g = by_group[group]
        with cf.ThreadPoolExecutor(threads) as ex:
            list(ex.map(lambda c: ffmpeg_clip(*job(c), s), g["warm"]))
            t0, cpu0 = time.perf_counter(), children_cpu()
            for frames in ex.map(lambda c: ffmpeg_clip(*job(c), s), g["timed"]):
                assert frames.shape[1:] == (s, s, 3)
            return time.perf_counter() - t0, children_cpu() - cpu0

    def run_decord(group, _dump):
        g = by_group[group]
        jobs = lambda cs: [(files[c["file"]]["path"], c["indices"], c["params"], s, whole_float)
                           for c in cs]
        with mp.get_context("fork").Pool(threads, initializer=decord_init) as pool:
            pool.map(decord_clip, jobs(g["warm"]), chunksize=1)
            t0 = time.perf_counter()
            cpu = sum(pool.map(decord_clip, jobs(g["timed"]), chunksize=1))
            return time.perf_counter() - t0, cpu

    # Rounds: every decoder decodes every timed clip once per round; the order of the decoders
    # rotates with the round and the group, so slow drifts in machine load hit all three.
    runners = [("ours", run_ours), ("ffmpeg", run_ffmpeg), ("decord", run_decord)]
    for rnd in range(a.repeat):
        for gi, group in enumerate(groups):
            k = (gi + rnd) % len(runners)
            for name, fn in runners[k:] + runners[:k]:
                log(f"round {rnd + 1}/{a.repeat} {group}: {name} ...")
                wall, cpu = fn(group, rnd == 0)
                results[group]["seconds"][name] += wall
                results[group]["cpu_seconds"][name] += cpu
            results[group]["clips"] += len(by_group[group]["timed"])
    for group in groups:
        r = results[group]
        for name, _ in runners:
            r[name] = r["clips"] / r["seconds"][name]
            r[name + "_cpu_ms_per_clip"] = 1e3 * r["cpu_seconds"][name] / r["clips"]
        r["ours_bytes_read_per_clip"] = r["ours_bytes_read"] / r["clips"]
        r["file_bytes_per_clip"] = r["file_bytes"] / r["clips"]

    # Fidelity (untimed): our tensor vs decord's (same indices, crop and numpy transform).
    with mp.get_context("fork").Pool(1) as pool:
        for group in groups:
            fl = []
            for c in [c for c in by_group[group]["timed"] if c["id"] in by_group[group]["fid"]]:
                ours = np.fromfile(os.path.join(dump_dir, f"{c['id']}.f32"), dtype="<f4")
                ours = ours.reshape(3, len(c["indices"]), s, s)
                dec = pool.apply(decord_tensor, ((files[c["file"]]["path"], c["indices"],
                                                  c["params"], s, whole_float),))
                p_dec, m_dec = psnr_255(denorm(ours), denorm(dec))
                fl.append({"clip": c["id"], "psnr_decord": p_dec, "maxdiff_decord": m_dec})
            results[group]["fidelity"] = fl
    shutil.rmtree(dump_dir, ignore_errors=True)

    print()
    print(f"ingest benchmark: {threads} threads, {a.clips} timed clips x {a.repeat} rounds per group, "
          f"16 frames -> {s}x{s}, seed {a.seed}, decord transform {a.decord_transform}")
    hdr = (f"{'group':<10} {'clips':>5} {'ours':>8} {'ffmpeg':>8} {'decord':>8} "
           f"{'ours/ffmpeg':>11} {'ours/decord':>11} {'MB read/clip':>12} {'MB file':>8}")
    print(hdr)
    print("-" * len(hdr))
    for group in groups:
        r = results[group]
        print(f"{group:<10} {r['clips']:>5} {r['ours']:>8.2f} {r['ffmpeg']:>8.2f} {r['decord']:>8.2f} "
              f"{r['ours'] / r['ffmpeg']:>11.2f} {r['ours'] / r['decord']:>11.2f} "
              f"{r['ours_bytes_read_per_clip'] / 1e6:>12.2f} {r['file_bytes_per_clip'] / 1e6:>8.2f}")
    print("(clips/s, wall clock; goals: ours/ffmpeg >= 0.9, ours/decord >= 2.0)")
    print()
    hdr = (f"{'group':<10} {'ours':>8} {'ffmpeg':>8} {'decord':>8} "
           f"{'ffmpeg/ours':>11} {'decord/ours':>11}")
    print("CPU ms per clip (user + system, all threads/processes; unlike the wall clock, not "
          "inflated by other load on the machine):")
    print(hdr)
    print("-" * len(hdr))
    for group in groups:
        r = results[group]
        o, f, d = (r[n + "_cpu_ms_per_clip"] for n in ("ours", "ffmpeg", "decord"))
        print(f"{group:<10} {o:>8.1f} {f:>8.1f} {d:>8.1f} {f / o:>11.2f} {d / o:>11.2f}")
    print()
    print("fidelity, ours vs decord (same indices, crop and transform; tensors in 0..255 units; "
          "differences come from the YUV->RGB conversion):")
    for group in groups:
        for f in results[group]["fidelity"]:
            print(f"  {group:<10} clip {f['clip']:>4}: PSNR {f['psnr_decord']:6.2f} dB, "
                  f"max |diff| {f['maxdiff_decord']:6.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"threads": threads, "clips": a.clips, "repeat": a.repeat, "seed": a.seed,
                       "crop_size": s, "decord_transform": a.decord_transform, "groups": results},
                      f, indent=1)


if __name__ == "__main__":
    main()
