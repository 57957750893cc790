#!/usr/bin/env python3
"""The `vjepa gpu-check` timing shapes in PyTorch on the same GPU, for comparison.

Attention B=8 H=16 N=1568 d=64 (SDPA, every backend that accepts the inputs, best reported),
LayerNorm [12544, 1024], bias + GELU / bias add / bias grad on [12544, 4096], fused AdamW and
a foreach EMA over 2 x 4096x1024 f32 params, and a sum of squares. Times are the median of
CUDA-event times over `--runs` runs after 3 warm-ups (and the median synchronised wall time),
as in gpu-check. Usage: python bench/gpu_ops_torch.py [--runs 30] [--json out.json]
"""
import argparse
import json
import time

import torch
import torch.nn.functional as F

RUNS = 30


def bench(fn, runs):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ev, wall = [], []
    for _ in range(runs):
        t = time.perf_counter()
        e0 = torch.cuda.Event(enable_timing=True)
        e1 = torch.cuda.Event(enable_timing=True)
        e0.record()
        fn()
        e1.record()
        torch.cuda.synchronize()
        wall.append((time.perf_counter() - t) * 1e3)
        ev.append(e0.elapsed_time(e1))
    ev.sort()
    wall.sort()
    return ev[len(ev) // 2], ev[0], wall[len(wall) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=RUNS)
    ap.add_argument("--json")
    ap.add_argument("--peak-only", action="store_true",
                    help="print only the bf16 GEMM peak in TFLOP/s (PEAK_TFLOPS for bench/gpu-step.sh)")
    args = ap.parse_args()
    runs = max(args.runs, 20)
    dev = torch.device("cuda")
    # fp32 means fp32 here, as in gpu-check (no TF32 GEMMs).
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}, cuda {torch.version.cuda}")
    rows = []

    def add(op, shape, dtype, fn, nbytes=None, flops=None):
        med, mn, wall = bench(fn, runs)
        thr = ""
        if flops:
            thr = f"{flops / (med * 1e-3) / 1e12:.1f} TFLOP/s"
        elif nbytes:
            thr = f"{nbytes / (med * 1e-3) / 1e9:.0f} GB/s"
        rows.append(dict(op=op, shape=shape, dtype=str(dtype).replace("torch.", ""),
                         median_ms=med, min_ms=mn, wall_median_ms=wall, throughput=thr))
        print(f"  {op:<36} {shape:<24} {rows[-1]['dtype']:<9} {med:9.3f} ms  {thr}", flush=True)

    # The bf16 GEMM peak of this GPU (the MFU denominator of bench/gpu-step.sh's PEAK_TFLOPS).
    m = 8192
    a = torch.randn(m, m, device=dev, dtype=torch.bfloat16)
    bm = torch.randn(m, m, device=dev, dtype=torch.bfloat16)
    add("gemm peak (a @ b)", f"{m}^3", torch.bfloat16, lambda: a @ bm, flops=2.0 * m ** 3)
    del a, bm
    if args.peak_only:
        print(f"bf16 GEMM peak: {2.0 * m ** 3 / (rows[-1]['median_ms'] * 1e-3) / 1e12:.0f} TFLOP/s")
        return

    from torch.nn.attention import SDPBackend, sdpa_kernel
    backends = [("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                ("cudnn", SDPBackend.CUDNN_ATTENTION), ("math", SDPBackend.MATH)]
    for dt in (torch.bfloat16, torch.float32):
        es = torch.finfo(dt).bits // 8
        b, h, n, hd = 8, 16, 1568, 64
        d = h * hd
        shape = f"B={b} H={h} N={n} d={hd}"
        fl = 4.0 * b * h * n * n * hd
        qkv = torch.randn(b, n, 3 * d, device=dev, dtype=dt)
        dout = torch.randn(b, n, d, device=dev, dtype=dt)

        def attn(x):
            q, k, v = x.view(b, n, 3, h, hd).permute(2, 0, 3, 1, 4).unbind(0)
            return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)

        for name, be in backends:
            try:
                with sdpa_kernel([be]):
                    x = qkv.detach().requires_grad_(True)
                    out = attn(x)
                    torch.autograd.grad(out, x, dout)
                    add(f"attention fwd (sdpa {name})", shape, dt, lambda: attn(qkv), flops=fl)
                    out = attn(x)
                    add(f"attention bwd (sdpa {name})", shape, dt,
                        lambda: torch.autograd.grad(out, x, dout, retain_graph=True), flops=2.5 * fl)
                    del out, x
            except (RuntimeError, torch.OutOfMemoryError) as e:
                print(f"  sdpa {name} {dt}: unavailable ({str(e).splitlines()[0][:80]})")
            torch.cuda.empty_cache()

        r, c = 8 * 1568, 1024
        shape = f"[{r},{c}]"
        nb = r * c * es
        x = torch.randn(r, c, device=dev, dtype=dt, requires_grad=True)
        w = torch.randn(c, device=dev, dtype=dt, requires_grad=True)
        bb = torch.randn(c, device=dev, dtype=dt, requires_grad=True)
        dy = torch.randn(r, c, device=dev, dtype=dt)
        add("layer_norm fwd", shape, dt, lambda: F.layer_norm(x, (c,), w, bb, 1e-6), nbytes=2 * nb)
        y = F.layer_norm(x, (c,), w, bb, 1e-6)
        add("layer_norm bwd", shape, dt,
            lambda: torch.autograd.grad(y, (x, w, bb), dy, retain_graph=True), nbytes=3 * nb)
        del x, w, bb, dy, y

        r, c = 8 * 1568, 4096
        shape = f"[{r},{c}]"
        nb = r * c * es
        x = torch.randn(r, c, device=dev, dtype=dt, requires_grad=True)
        bb = torch.randn(c, device=dev, dtype=dt, requires_grad=True)
        dy = torch.randn(r, c, device=dev, dtype=dt)
        add("bias_gelu fwd (gelu(x + b))", shape, dt, lambda: F.gelu(x + bb), nbytes=2 * nb)
        y = F.gelu(x + bb)
        add("bias_gelu bwd (dx, db)", shape, dt,
            lambda: torch.autograd.grad(y, (x, bb), dy, retain_graph=True), nbytes=3 * nb)
        add("bias_add fwd", shape, dt, lambda: x + bb, nbytes=2 * nb)
        add("column_sum (dy.sum(0))", shape, dt, lambda: dy.sum(0), nbytes=nb)
        del x, bb, dy, y
        torch.cuda.empty_cache()

        r, i, o = 8 * 1568, 1024, 4096
        shape = f"[{r},{i}]x[{o},{i}]T"
        fl = 2.0 * r * i * o
        x = torch.randn(r, i, device=dev, dtype=dt, requires_grad=True)
        w = (torch.randn(o, i, device=dev, dtype=dt) * 0.02).requires_grad_(True)
        bb = torch.randn(o, device=dev, dtype=dt, requires_grad=True)
        dy = torch.randn(r, o, device=dev, dtype=dt)
        add("linear fwd (F.linear)", shape, dt, lambda: F.linear(x, w, bb), flops=fl)
        y = F.linear(x, w, bb)
        add("linear bwd (dx, dW, db)", shape, dt,
            lambda: torch.autograd.grad(y, (x, w, bb), dy, retain_graph=True), flops=2 * fl)
        del x, w, bb, dy, y
        torch.cuda.empty_cache()

    params = [torch.randn(4096, 1024, device=dev) * 0.02, torch.randn(1024, 4096, device=dev) * 0.02]
    for p in params:
        p.requires_grad_(True)
        p.grad = torch.randn_like(p) * 1e-3
    np_ = sum(p.numel() for p in params)
    shape = f"2 tensors, {np_} params"
    for kind in ("fused", "foreach"):
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.04, **{kind: True})
        add(f"adamw ({kind})", shape, torch.float32, opt.step, nbytes=28 * np_)
    tgt = [p.detach().clone() for p in params]
    src = [p.detach() for p in params]
    add("ema (_foreach_lerp_)", shape, torch.float32,
        lambda: torch._foreach_lerp_(tgt, src, 1 - 0.996), nbytes=12 * np_)
    g0 = params[0].grad
    add("sum_sq (g.square().sum())", f"[{g0.numel()}]", torch.float32,
        lambda: g0.square().sum(), nbytes=4 * g0.numel())

    print()
    print(f"{'op':<36} {'shape':<24} {'dtype':<9} {'median ms':>10} {'min ms':>9} {'wall ms':>9}  throughput")
    for r in rows:
        print(f"{r['op']:<36} {r['shape']:<24} {r['dtype']:<9} {r['median_ms']:>10.3f} "
              f"{r['min_ms']:>9.3f} {r['wall_median_ms']:>9.3f}  {r['throughput']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(torch=torch.__version__, device=torch.cuda.get_device_name(0), rows=rows), f)


if __name__ == "__main__":
    main()
