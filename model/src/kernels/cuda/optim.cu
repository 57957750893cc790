// In-place AdamW (torch semantics, decoupled weight decay) and the EMA target update, per tensor
// or over many tensors in one launch (multi-tensor: a table of tensors plus a block → (tensor,
// chunk) map, both in device memory).
#include "common.cuh"

// One element of AdamW, in the order torch's `_single_tensor_adamw` (and optim.rs) computes it:
// p *= 1 − lr·wd; m = m + (1 − β1)(g − m); v = β2·v + (1 − β2)·g²;
// p −= (lr / bc1) · m / (sqrt(v) / sqrt(bc2) + eps).
__device__ __forceinline__ void adamw_elem(float *p, const float *g, float *m, float *v, size_t i,
                                           float decay, float b1, float b2, float step_size,
                                           float sqrt_bc2, float eps) {
    const float gi = g[i];
    const float mi = m[i] + (gi - m[i]) * (1.f - b1);
    const float vi = v[i] * b2 + gi * gi * (1.f - b2);
    m[i] = mi;
    v[i] = vi;
    const float denom = sqrtf(vi) / sqrt_bc2 + eps;
    p[i] = p[i] * decay - (mi / denom) * step_size;
}

extern "C" __global__ void adamw_f32(float *p, const float *g, float *m, float *v, size_t n,
                                     float decay, float b1, float b2, float step_size,
                                     float sqrt_bc2, float eps) {
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        adamw_elem(p, g, m, v, i, decay, b1, b2, step_size, sqrt_bc2, eps);
}

// Host-packed row of the multi-tensor table (64 bytes; see cuda.rs `AdamWTable`).
struct AdamWEntry {
    unsigned long long p, g, m, v, n;
    float decay, step_size, sqrt_bc2, pad0;
    unsigned long long pad1;
};
static_assert(sizeof(AdamWEntry) == 64, "AdamWEntry layout");

// blockmap[block] = tensor | chunk << 32; each block updates `chunk` elements of one tensor.
extern "C" __global__ void adamw_multi_f32(const AdamWEntry *table,
                                           const unsigned long long *blockmap, float b1, float b2,
                                           float eps, uint32_t chunk) {
    const unsigned long long e = blockmap[blockIdx.x];
    const AdamWEntry a = table[e & 0xffffffffull];
    const size_t start = (size_t)(e >> 32) * chunk;
    const size_t end = min(start + chunk, (size_t)a.n);
    float *p = reinterpret_cast<float *>(a.p);
    const float *g = reinterpret_cast<const float *>(a.g);
    float *m = reinterpret_cast<float *>(a.m);
    float *v = reinterpret_cast<float *>(a.v);
    for (size_t i = start + threadIdx.x; i < end; i += blockDim.x)
        adamw_elem(p, g, m, v, i, a.decay, b1, b2, a.step_size, a.sqrt_bc2, eps);
}

// θ_t ← m·θ_t + (1 − m)·θ
extern "C" __global__ void ema_f32(float *t, const float *s, size_t n, float mom) {
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        t[i] = t[i] * mom + s[i] * (1.f - mom);
}

struct EmaEntry {
    unsigned long long t, s, n, pad;
};
static_assert(sizeof(EmaEntry) == 32, "EmaEntry layout");

extern "C" __global__ void ema_multi_f32(const EmaEntry *table, const unsigned long long *blockmap,
                                         float mom, uint32_t chunk) {
    const unsigned long long e = blockmap[blockIdx.x];
    const EmaEntry a = table[e & 0xffffffffull];
    const size_t start = (size_t)(e >> 32) * chunk;
    const size_t end = min(start + chunk, (size_t)a.n);
    float *t = reinterpret_cast<float *>(a.t);
    const float *s = reinterpret_cast<const float *>(a.s);
    for (size_t i = start + threadIdx.x; i < end; i += blockDim.x)
        t[i] = t[i] * mom + s[i] * (1.f - mom);
}
