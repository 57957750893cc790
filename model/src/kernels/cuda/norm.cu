// LayerNorm over the last dim (affine and plain), forward and backward.
//
// Forward and the dx part of the backward use one warp per row (8 rows per 256-thread block),
// fp32 statistics with a two-pass variance. dweight/dbias are column reductions of
// dy·x̂ and dy: per-chunk fp32 partials, then `ln_final` adds them in chunk order
// (deterministic, shape-only dependent).
#include "common.cuh"

template <typename T, bool AFFINE>
__device__ __forceinline__ void ln_fwd(const T *__restrict__ x, const T *__restrict__ w,
                                       const T *__restrict__ b, T *__restrict__ y, uint32_t rows,
                                       uint32_t cols, float eps) {
    const uint32_t lane = threadIdx.x & 31;
    const uint32_t row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;
    const T *xr = x + (size_t)row * cols;
    T *yr = y + (size_t)row * cols;
    float s = 0.f;
#pragma unroll 4
    for (uint32_t c = lane; c < cols; c += 32) s += to_f(xr[c]);
    const float mean = warp_sum(s) / (float)cols;
    float v = 0.f;
#pragma unroll 4
    for (uint32_t c = lane; c < cols; c += 32) {
        const float d = to_f(xr[c]) - mean;
        v = fmaf(d, d, v);
    }
    const float rstd = rsqrtf(warp_sum(v) / (float)cols + eps);
#pragma unroll 4
    for (uint32_t c = lane; c < cols; c += 32) {
        float o = (to_f(xr[c]) - mean) * rstd;
        if (AFFINE) o = fmaf(o, to_f(w[c]), to_f(b[c]));
        yr[c] = from_f<T>(o);
    }
}

// dx = rstd · (g − mean(g) − x̂ · mean(g·x̂)), g = dy·w (dy when plain). Stores (mean, rstd) per
// row in `stats` when AFFINE, for the dweight/dbias reduction.
template <typename T, bool AFFINE>
__device__ __forceinline__ void ln_bwd_dx(const T *__restrict__ x, const T *__restrict__ w,
                                          const T *__restrict__ dy, T *__restrict__ dx,
                                          float2 *__restrict__ stats, uint32_t rows, uint32_t cols,
                                          float eps) {
    const uint32_t lane = threadIdx.x & 31;
    const uint32_t row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;
    const size_t base = (size_t)row * cols;
    const T *xr = x + base;
    const T *dyr = dy + base;
    T *dxr = dx + base;
    float s = 0.f;
#pragma unroll 4
    for (uint32_t c = lane; c < cols; c += 32) s += to_f(xr[c]);
    const float mean = warp_sum(s) / (float)cols;
    float v = 0.f;
#pragma unroll 4
    for (uint32_t c = lane; c < cols; c += 32) {
        const float d = to_f(xr[c]) - mean;
        v = fmaf(d, d, v);
    }
    const float rstd = rsqrtf(warp_sum(v) / (float)cols + eps);
    float sg = 0.f, sgx = 0.f;
#pragma unroll 4
    for (uint32_t c = lane; c < cols; c += 32) {
        const float xh = (to_f(xr[c]) - mean) * rstd;
        float g = to_f(dyr[c]);
        if (AFFINE) g *= to_f(w[c]);
        sg += g;
        sgx = fmaf(g, xh, sgx);
    }
    const float mg = warp_sum(sg) / (float)cols;
    const float mgx = warp_sum(sgx) / (float)cols;
#pragma unroll 4
    for (uint32_t c = lane; c < cols; c += 32) {
        const float xh = (to_f(xr[c]) - mean) * rstd;
        float g = to_f(dyr[c]);
        if (AFFINE) g *= to_f(w[c]);
        dxr[c] = from_f<T>(rstd * (g - mg - xh * mgx));
    }
    if (AFFINE && lane == 0) stats[row] = make_float2(mean, rstd);
}

// partial[chunk, c] = Σ dy·x̂ and partial[chunk, cols + c] = Σ dy over the chunk's rows.
// Block (32, 8), grid (ceil(cols / 32), nchunks).
template <typename T>
__device__ __forceinline__ void ln_dwdb_partial(const T *__restrict__ x, const T *__restrict__ dy,
                                                const float2 *__restrict__ stats,
                                                float *__restrict__ partial, uint32_t rows,
                                                uint32_t cols, uint32_t rpc) {
    __shared__ float sw[8][32];
    __shared__ float sb[8][32];
    const uint32_t c = blockIdx.x * 32 + threadIdx.x;
    const uint32_t r0 = blockIdx.y * rpc;
    const uint32_t r1 = min(r0 + rpc, rows);
    float aw = 0.f, ab = 0.f;
    if (c < cols) {
        for (uint32_t r = r0 + threadIdx.y; r < r1; r += 8) {
            const size_t i = (size_t)r * cols + c;
            const float2 st = stats[r];
            const float g = to_f(dy[i]);
            aw = fmaf(g, (to_f(x[i]) - st.x) * st.y, aw);
            ab += g;
        }
    }
    sw[threadIdx.y][threadIdx.x] = aw;
    sb[threadIdx.y][threadIdx.x] = ab;
    __syncthreads();
    if (threadIdx.y == 0 && c < cols) {
        float w = 0.f, b = 0.f;
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            w += sw[k][threadIdx.x];
            b += sb[k][threadIdx.x];
        }
        float *p = partial + (size_t)blockIdx.y * 2 * cols;
        p[c] = w;
        p[cols + c] = b;
    }
}

// ---------------------------------------------------------------------------------------------
// Fast path for cols = NV·128 (NV ≤ 8, i.e. C ≤ 1024: every ViT width that is a multiple of 128):
// a warp per row with the row in registers (lane owns 4-element vectors lane + 32·v), one read
// of x/dy, vector loads. The affine backward also accumulates dweight/dbias over the block's
// chunk of rows in registers, combines its 8 warps in order through shared memory and writes one
// partial per chunk (then `ln_final`): two launches for the whole backward.

template <typename T, int NV>
__device__ __forceinline__ void load_row(float (&v)[NV][4], const T *p, int lane) {
#pragma unroll
    for (int k = 0; k < NV; ++k) {
        Vec<4, T> t;
        t.load(p + (lane + 32 * k) * 4);
#pragma unroll
        for (int e = 0; e < 4; ++e) v[k][e] = t.v[e];
    }
}

template <typename T, int NV>
__device__ __forceinline__ void store_row(const float (&v)[NV][4], T *p, int lane) {
#pragma unroll
    for (int k = 0; k < NV; ++k) {
        Vec<4, T> t;
#pragma unroll
        for (int e = 0; e < 4; ++e) t.v[e] = v[k][e];
        t.store(p + (lane + 32 * k) * 4);
    }
}

// (mean, rstd) of a register row of NV·128 values.
template <int NV>
__device__ __forceinline__ float2 row_stats(const float (&v)[NV][4], float eps) {
    constexpr float inv_c = 1.f / (NV * 128);
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < NV; ++k)
#pragma unroll
        for (int e = 0; e < 4; ++e) s += v[k][e];
    const float mean = warp_sum(s) * inv_c;
    float q = 0.f;
#pragma unroll
    for (int k = 0; k < NV; ++k)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const float d = v[k][e] - mean;
            q = fmaf(d, d, q);
        }
    return make_float2(mean, rsqrtf(warp_sum(q) * inv_c + eps));
}

template <typename T, bool AFFINE, int NV>
__device__ __forceinline__ void ln_fwd_fast(const T *__restrict__ x, const T *__restrict__ w,
                                            const T *__restrict__ b, T *__restrict__ y,
                                            uint32_t rows, float eps) {
    constexpr int C = NV * 128;
    const int lane = threadIdx.x & 31;
    const uint32_t row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;
    float v[NV][4];
    load_row<T, NV>(v, x + (size_t)row * C, lane);
    const float2 st = row_stats<NV>(v, eps);
    float wv[NV][4], bv[NV][4];
    if (AFFINE) {
        load_row<T, NV>(wv, w, lane);
        load_row<T, NV>(bv, b, lane);
    }
#pragma unroll
    for (int k = 0; k < NV; ++k)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const float o = (v[k][e] - st.x) * st.y;
            v[k][e] = AFFINE ? fmaf(o, wv[k][e], bv[k][e]) : o;
        }
    store_row<T, NV>(v, y + (size_t)row * C, lane);
}

// Block: 8 warps over rows [blockIdx.x·rpc, +rpc), warp w taking rows w, w + 8, …
template <typename T, bool AFFINE, int NV>
__device__ __forceinline__ void ln_bwd_fast(const T *__restrict__ x, const T *__restrict__ w,
                                            const T *__restrict__ dy, T *__restrict__ dx,
                                            float *__restrict__ partial, uint32_t rows, float eps,
                                            uint32_t rpc) {
    constexpr int C = NV * 128;
    constexpr float inv_c = 1.f / C;
    __shared__ float sh[AFFINE ? 8 * C : 1];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const uint32_t r0 = blockIdx.x * rpc;
    const uint32_t r1 = min(r0 + rpc, rows);
    float wv[NV][4], dw[NV][4] = {}, db[NV][4] = {};
    if (AFFINE) load_row<T, NV>(wv, w, lane);
    for (uint32_t row = r0 + warp; row < r1; row += 8) {
        float v[NV][4], g[NV][4];
        load_row<T, NV>(v, x + (size_t)row * C, lane);
        load_row<T, NV>(g, dy + (size_t)row * C, lane);
        const float2 st = row_stats<NV>(v, eps);
        float sg = 0.f, sgx = 0.f;
#pragma unroll
        for (int k = 0; k < NV; ++k)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float xh = (v[k][e] - st.x) * st.y;
                v[k][e] = xh;
                if (AFFINE) {
                    dw[k][e] = fmaf(g[k][e], xh, dw[k][e]);
                    db[k][e] += g[k][e];
                    g[k][e] *= wv[k][e];
                }
                sg += g[k][e];
                sgx = fmaf(g[k][e], xh, sgx);
            }
        const float mg = warp_sum(sg) * inv_c;
        const float mgx = warp_sum(sgx) * inv_c;
#pragma unroll
        for (int k = 0; k < NV; ++k)
#pragma unroll
            for (int e = 0; e < 4; ++e) g[k][e] = st.y * (g[k][e] - mg - v[k][e] * mgx);
        store_row<T, NV>(g, dx + (size_t)row * C, lane);
    }
    if (AFFINE) {
        float *p = partial + (size_t)blockIdx.x * 2 * C;
#pragma unroll
        for (int pass = 0; pass < 2; ++pass) {
#pragma unroll
            for (int k = 0; k < NV; ++k)
#pragma unroll
                for (int e = 0; e < 4; ++e)
                    sh[warp * C + (lane + 32 * k) * 4 + e] = pass == 0 ? dw[k][e] : db[k][e];
            __syncthreads();
            for (int c = threadIdx.x; c < C; c += blockDim.x) {
                float t = 0.f;
#pragma unroll
                for (int k = 0; k < 8; ++k) t += sh[k * C + c];
                p[pass * C + c] = t;
            }
            __syncthreads();
        }
    }
}

#define INSTANTIATE_FAST(T, S, NV)                                                                 \
    extern "C" __global__ void ln_fwd_fast_##S##_##NV(const T *x, const T *w, const T *b, T *y,   \
                                                      uint32_t rows, float eps) {                  \
        ln_fwd_fast<T, true, NV>(x, w, b, y, rows, eps);                                           \
    }                                                                                              \
    extern "C" __global__ void ln_plain_fwd_fast_##S##_##NV(const T *x, T *y, uint32_t rows,      \
                                                            float eps) {                           \
        ln_fwd_fast<T, false, NV>(x, nullptr, nullptr, y, rows, eps);                              \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(256)                                              \
        ln_bwd_fast_##S##_##NV(const T *x, const T *w, const T *dy, T *dx, float *partial,         \
                               uint32_t rows, float eps, uint32_t rpc) {                           \
        ln_bwd_fast<T, true, NV>(x, w, dy, dx, partial, rows, eps, rpc);                           \
    }                                                                                              \
    extern "C" __global__ void ln_plain_bwd_fast_##S##_##NV(const T *x, const T *dy, T *dx,       \
                                                            uint32_t rows, float eps,              \
                                                            uint32_t rpc) {                        \
        ln_bwd_fast<T, false, NV>(x, nullptr, dy, dx, nullptr, rows, eps, rpc);                    \
    }

#define INSTANTIATE_FAST_ALL(NV)                                                                   \
    INSTANTIATE_FAST(float, f32, NV)                                                               \
    INSTANTIATE_FAST(bf16, bf16, NV)

INSTANTIATE_FAST_ALL(1)
INSTANTIATE_FAST_ALL(2)
INSTANTIATE_FAST_ALL(3)
INSTANTIATE_FAST_ALL(4)
INSTANTIATE_FAST_ALL(5)
INSTANTIATE_FAST_ALL(6)
INSTANTIATE_FAST_ALL(7)
INSTANTIATE_FAST_ALL(8)

#define INSTANTIATE(T, S)                                                                          \
    extern "C" __global__ void ln_fwd_##S(const T *x, const T *w, const T *b, T *y, uint32_t rows, \
                                          uint32_t cols, float eps) {                              \
        ln_fwd<T, true>(x, w, b, y, rows, cols, eps);                                              \
    }                                                                                              \
    extern "C" __global__ void ln_plain_fwd_##S(const T *x, T *y, uint32_t rows, uint32_t cols,   \
                                                float eps) {                                       \
        ln_fwd<T, false>(x, nullptr, nullptr, y, rows, cols, eps);                                 \
    }                                                                                              \
    extern "C" __global__ void ln_bwd_dx_##S(const T *x, const T *w, const T *dy, T *dx,          \
                                             float2 *stats, uint32_t rows, uint32_t cols,          \
                                             float eps) {                                          \
        ln_bwd_dx<T, true>(x, w, dy, dx, stats, rows, cols, eps);                                  \
    }                                                                                              \
    extern "C" __global__ void ln_plain_bwd_##S(const T *x, const T *dy, T *dx, uint32_t rows,    \
                                                uint32_t cols, float eps) {                        \
        ln_bwd_dx<T, false>(x, nullptr, dy, dx, nullptr, rows, cols, eps);                         \
    }                                                                                              \
    extern "C" __global__ void ln_dwdb_partial_##S(const T *x, const T *dy, const float2 *stats,  \
                                                   float *partial, uint32_t rows, uint32_t cols,   \
                                                   uint32_t rpc) {                                 \
        ln_dwdb_partial<T>(x, dy, stats, partial, rows, cols, rpc);                                \
    }                                                                                              \
    extern "C" __global__ void ln_final_##S(const float *partial, T *out, uint32_t nchunks,       \
                                            uint32_t cols) {                                       \
        colsum_final<T>(partial, out, nchunks, cols);                                              \
    }

INSTANTIATE(float, f32)
INSTANTIATE(bf16, bf16)
