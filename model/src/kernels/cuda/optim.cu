// In-place AdamW (torch semantics, decoupled weight decay) and the EMA target update: per tensor
// (fused, or the two passes of the CPU ops: moments, then parameter) or over many tensors in one
// launch (multi-tensor: a table of tensors plus a block → (tensor, chunk) map in device memory).
//
// Parameters, moments and EMA targets are f32. The multi-tensor kernels also take bf16 gradients
// (mixed precision: the networks ran on bf16 copies of the weights, so their gradients are bf16),
// scale each tensor's gradient by its clipping factor as they read it, and rewrite a bf16 copy of
// each updated tensor when the table gives one (the copies the next step computes with: no
// separate cast of the whole model per step). 1 − β1, 1 − β2 and 1 − momentum arrive precomputed
// in f64 by the host (rounding β to f32 first and subtracting would cost ~1e-5 relative in
// 1 − β2). Loads/stores are 4-wide when every pointer of the tensor is aligned for it (16 bytes
// f32, 8 bytes bf16), with a scalar tail.
#include "common.cuh"

struct AdamHyper {
    float omb1, b2, omb2, eps;
};

// m = m + (1 − β1)(g − m); v = β2·v + (1 − β2)·g²  (torch: exp_avg.lerp_, exp_avg_sq.mul_.addcmul_)
__device__ __forceinline__ void moments1(float g, float &m, float &v, const AdamHyper &h) {
    m = m + (g - m) * h.omb1;
    v = v * h.b2 + (g * g) * h.omb2;
}
// p = p·decay − step_size · m / (√v / √bc2 + eps)
__device__ __forceinline__ float update1(float p, float m, float v, float decay, float step_size,
                                         float sqrt_bc2, float eps) {
    return p * decay - step_size * (m / (sqrtf(v) / sqrt_bc2 + eps));
}

__device__ __forceinline__ bool aligned16(const void *a, const void *b, const void *c,
                                          const void *d) {
    return (((uintptr_t)a | (uintptr_t)b | (uintptr_t)c | (uintptr_t)d) & 15) == 0;
}
// Whether 4 elements of a `G` array (f32: 16 bytes, bf16: 8) can be read in one access at `g`,
// and a bf16 copy (if any) written in one at `c`.
template <typename G>
__device__ __forceinline__ bool aligned4(const G *g, const bf16 *c) {
    return ((uintptr_t)g % (4 * sizeof(G))) == 0 && ((uintptr_t)c & 7) == 0;
}
__device__ __forceinline__ void store4(bf16 *q, float4 f) {
    const __nv_bfloat162 a = __floats2bfloat162_rn(f.x, f.y);
    const __nv_bfloat162 b = __floats2bfloat162_rn(f.z, f.w);
    uint2 u;
    u.x = *reinterpret_cast<const uint32_t *>(&a);
    u.y = *reinterpret_cast<const uint32_t *>(&b);
    *reinterpret_cast<uint2 *>(q) = u;
}

// Fused AdamW over [start, end) of one tensor, by the threads `t0, t0 + step, …`: the gradient
// times `gscale` (1, or the clipping factor: an exact no-op at 1), and the updated parameter also
// written to `copy` in bf16 when `copy` is not null.
template <typename G>
__device__ __forceinline__ void adamw_range(float *p, const G *g, float *m, float *v, bf16 *copy,
                                            size_t start, size_t end, size_t t0, size_t step,
                                            const AdamHyper &h, float decay, float step_size,
                                            float sqrt_bc2, float gscale) {
    size_t vend = start;
    if (aligned16(p + start, m + start, v + start, p + start) &&
        aligned4(g + start, copy ? copy + start : nullptr)) {
        vend = start + (end - start) / 4 * 4;
        for (size_t i = start + 4 * t0; i < vend; i += 4 * step) {
            float4 pv = *reinterpret_cast<float4 *>(p + i);
            float4 gv = load4(g + i);
            gv.x *= gscale;
            gv.y *= gscale;
            gv.z *= gscale;
            gv.w *= gscale;
            float4 mv = *reinterpret_cast<float4 *>(m + i);
            float4 vv = *reinterpret_cast<float4 *>(v + i);
            moments1(gv.x, mv.x, vv.x, h);
            moments1(gv.y, mv.y, vv.y, h);
            moments1(gv.z, mv.z, vv.z, h);
            moments1(gv.w, mv.w, vv.w, h);
            pv.x = update1(pv.x, mv.x, vv.x, decay, step_size, sqrt_bc2, h.eps);
            pv.y = update1(pv.y, mv.y, vv.y, decay, step_size, sqrt_bc2, h.eps);
            pv.z = update1(pv.z, mv.z, vv.z, decay, step_size, sqrt_bc2, h.eps);
            pv.w = update1(pv.w, mv.w, vv.w, decay, step_size, sqrt_bc2, h.eps);
            *reinterpret_cast<float4 *>(m + i) = mv;
            *reinterpret_cast<float4 *>(v + i) = vv;
            *reinterpret_cast<float4 *>(p + i) = pv;
            if (copy) store4(copy + i, pv);
        }
    }
    for (size_t i = vend + t0; i < end; i += step) {
        float mi = m[i], vi = v[i];
        moments1(to_f(g[i]) * gscale, mi, vi, h);
        m[i] = mi;
        v[i] = vi;
        const float pi = update1(p[i], mi, vi, decay, step_size, sqrt_bc2, h.eps);
        p[i] = pi;
        if (copy) copy[i] = __float2bfloat16_rn(pi);
    }
}

extern "C" __global__ void adamw_f32(float *p, const float *g, float *m, float *v, size_t n,
                                     float decay, float omb1, float b2, float omb2,
                                     float step_size, float sqrt_bc2, float eps) {
    const AdamHyper h{omb1, b2, omb2, eps};
    adamw_range<float>(p, g, m, v, nullptr, 0, n, (size_t)blockIdx.x * blockDim.x + threadIdx.x,
                       (size_t)gridDim.x * blockDim.x, h, decay, step_size, sqrt_bc2, 1.f);
}

// First pass of the two-pass form: the moments only.
extern "C" __global__ void adam_moments_f32(float *m, float *v, const float *g, size_t n,
                                            float omb1, float b2, float omb2) {
    const AdamHyper h{omb1, b2, omb2, 0.f};
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        float mi = m[i], vi = v[i];
        moments1(g[i], mi, vi, h);
        m[i] = mi;
        v[i] = vi;
    }
}

// Second pass: the parameter from the updated moments.
extern "C" __global__ void adam_update_f32(float *p, const float *m, const float *v, size_t n,
                                           float decay, float step_size, float sqrt_bc2,
                                           float eps) {
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        p[i] = update1(p[i], m[i], v[i], decay, step_size, sqrt_bc2, eps);
}

// Host-packed row of the multi-tensor table (64 bytes; see cuda.rs `adamw_multi`). `copy` is the
// device address of the tensor's bf16 copy, or 0 for none.
struct AdamWEntry {
    unsigned long long p, g, m, v, n;
    float decay, step_size, sqrt_bc2, gscale;
    unsigned long long copy;
};
static_assert(sizeof(AdamWEntry) == 64, "AdamWEntry layout");

// blockmap[block] = tensor | chunk << 32; each block updates `chunk` elements of one tensor.
template <typename G>
__device__ __forceinline__ void adamw_multi(const AdamWEntry *table,
                                            const unsigned long long *blockmap, float omb1,
                                            float b2, float omb2, float eps, uint32_t chunk) {
    const unsigned long long e = blockmap[blockIdx.x];
    const AdamWEntry a = table[e & 0xffffffffull];
    const size_t start = (size_t)(e >> 32) * chunk;
    const size_t end = min(start + chunk, (size_t)a.n);
    const AdamHyper h{omb1, b2, omb2, eps};
    adamw_range<G>(reinterpret_cast<float *>(a.p), reinterpret_cast<const G *>(a.g),
                   reinterpret_cast<float *>(a.m), reinterpret_cast<float *>(a.v),
                   reinterpret_cast<bf16 *>(a.copy), start, end, threadIdx.x, blockDim.x, h,
                   a.decay, a.step_size, a.sqrt_bc2, a.gscale);
}

// f32 gradients.
extern "C" __global__ void adamw_multi_f32(const AdamWEntry *table,
                                           const unsigned long long *blockmap, float omb1,
                                           float b2, float omb2, float eps, uint32_t chunk) {
    adamw_multi<float>(table, blockmap, omb1, b2, omb2, eps, chunk);
}

// bf16 gradients (f32 parameters and moments).
extern "C" __global__ void adamw_multi_bf16g(const AdamWEntry *table,
                                             const unsigned long long *blockmap, float omb1,
                                             float b2, float omb2, float eps, uint32_t chunk) {
    adamw_multi<bf16>(table, blockmap, omb1, b2, omb2, eps, chunk);
}

// θ_t ← m·θ_t + (1 − m)·θ over [start, end), and θ_t in bf16 to `copy` when it is not null.
__device__ __forceinline__ void ema_range(float *t, const float *s, bf16 *copy, size_t start,
                                          size_t end, size_t t0, size_t step, float mom,
                                          float rest) {
    size_t vend = start;
    if (aligned16(t + start, s + start, t + start, s + start) &&
        aligned4<float>(t + start, copy ? copy + start : nullptr)) {
        vend = start + (end - start) / 4 * 4;
        for (size_t i = start + 4 * t0; i < vend; i += 4 * step) {
            float4 a = *reinterpret_cast<float4 *>(t + i);
            const float4 b = *reinterpret_cast<const float4 *>(s + i);
            a.x = a.x * mom + b.x * rest;
            a.y = a.y * mom + b.y * rest;
            a.z = a.z * mom + b.z * rest;
            a.w = a.w * mom + b.w * rest;
            *reinterpret_cast<float4 *>(t + i) = a;
            if (copy) store4(copy + i, a);
        }
    }
    for (size_t i = vend + t0; i < end; i += step) {
        const float a = t[i] * mom + s[i] * rest;
        t[i] = a;
        if (copy) copy[i] = __float2bfloat16_rn(a);
    }
}

extern "C" __global__ void ema_f32(float *t, const float *s, size_t n, float mom, float rest) {
    ema_range(t, s, nullptr, 0, n, (size_t)blockIdx.x * blockDim.x + threadIdx.x,
              (size_t)gridDim.x * blockDim.x, mom, rest);
}

// `copy`: the target tensor's bf16 copy, or 0 for none.
struct EmaEntry {
    unsigned long long t, s, n, copy;
};
static_assert(sizeof(EmaEntry) == 32, "EmaEntry layout");

extern "C" __global__ void ema_multi_f32(const EmaEntry *table, const unsigned long long *blockmap,
                                         float mom, float rest, uint32_t chunk) {
    const unsigned long long e = blockmap[blockIdx.x];
    const EmaEntry a = table[e & 0xffffffffull];
    const size_t start = (size_t)(e >> 32) * chunk;
    const size_t end = min(start + chunk, (size_t)a.n);
    ema_range(reinterpret_cast<float *>(a.t), reinterpret_cast<const float *>(a.s),
              reinterpret_cast<bf16 *>(a.copy), start, end, threadIdx.x, blockDim.x, mom, rest);
}

// Squared gradient norms of many tensors in two launches (the clipping and the metrics need one
// per module): `sumsq_multi_*` writes one fp32 partial per (tensor, chunk) block, in block order;
// `sum_ranges_f32` adds each group's contiguous range of partials with one block per group. A
// fixed tree for given sizes, so the result never depends on scheduling.
struct SumSqEntry {
    unsigned long long x, n;
};
static_assert(sizeof(SumSqEntry) == 16, "SumSqEntry layout");

template <typename T>
__device__ __forceinline__ void sumsq_multi(const SumSqEntry *table,
                                            const unsigned long long *blockmap, float *partial,
                                            uint32_t chunk) {
    __shared__ float scratch[32];
    const unsigned long long e = blockmap[blockIdx.x];
    const SumSqEntry a = table[e & 0xffffffffull];
    const T *x = reinterpret_cast<const T *>(a.x);
    const size_t start = (size_t)(e >> 32) * chunk;
    const size_t end = min(start + chunk, (size_t)a.n);
    float acc = 0.f;
    for (size_t i = start + threadIdx.x; i < end; i += blockDim.x) {
        const float v = to_f(x[i]);
        acc = fmaf(v, v, acc);
    }
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

extern "C" __global__ void sumsq_multi_f32(const SumSqEntry *table,
                                           const unsigned long long *blockmap, float *partial,
                                           uint32_t chunk) {
    sumsq_multi<float>(table, blockmap, partial, chunk);
}

extern "C" __global__ void sumsq_multi_bf16(const SumSqEntry *table,
                                            const unsigned long long *blockmap, float *partial,
                                            uint32_t chunk) {
    sumsq_multi<bf16>(table, blockmap, partial, chunk);
}

// out[g] = Σ partial[bounds[g] .. bounds[g + 1]), block g.
extern "C" __global__ void sum_ranges_f32(const float *partial, const unsigned long long *bounds,
                                          float *out) {
    __shared__ float scratch[32];
    const size_t b0 = bounds[blockIdx.x], b1 = bounds[blockIdx.x + 1];
    float acc = 0.f;
    for (size_t i = b0 + threadIdx.x; i < b1; i += blockDim.x) acc += partial[i];
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) out[blockIdx.x] = acc;
}
