// Bias add, fused bias + GELU (erf) forward/backward, column sums, the sum of squares, the
// in-place bias add behind the Linear forward, the L1 loss with its gradient, and the scatter
// behind the context gather's backward.
//
// Row-wise kernels: blockIdx.x = a chunk of `rpc` rows; a block (bx, by) of 256 threads walks
// the row's V-element vectors with threadIdx.x (V = 4: 16-byte f32 / 8-byte bf16 accesses, when
// cols % 4 == 0; else V = 1) and the chunk's rows with threadIdx.y. Column reductions keep one
// fp32 accumulator per vector element, add the `by` row lanes in order in shared memory, and write
// one partial per (chunk, column); `colsum_final` adds the partials in a fixed order. Results are
// deterministic and depend only on the shape.
#include "common.cuh"

__device__ __forceinline__ float gelu_erf(float z) {
    return 0.5f * z * (1.f + erff(z * 0.70710678118654752440f));
}
__device__ __forceinline__ float gelu_erf_grad(float z) {
    // d/dz [z Φ(z)] = Φ(z) + z φ(z)
    return 0.5f * (1.f + erff(z * 0.70710678118654752440f)) +
           z * 0.39894228040143267794f * expf(-0.5f * z * z);
}

enum class Act { Add, Gelu };

// y = act(x + b).
template <typename T, int V, Act A>
__device__ __forceinline__ void bias_act_fwd(const T *__restrict__ x, const T *__restrict__ b,
                                             T *__restrict__ y, uint32_t rows, uint32_t cols,
                                             uint32_t rpc) {
    const uint32_t cv = cols / V;
    const uint32_t r0 = blockIdx.x * rpc;
    const uint32_t r1 = min(r0 + rpc, rows);
    for (uint32_t j = threadIdx.x; j < cv; j += blockDim.x) {
        Vec<V, T> bv;
        bv.load(b + j * V);
#pragma unroll 4
        for (uint32_t r = r0 + threadIdx.y; r < r1; r += blockDim.y) {
            const size_t i = (size_t)r * cols + (size_t)j * V;
            Vec<V, T> v;
            v.load(x + i);
#pragma unroll
            for (int e = 0; e < V; ++e) {
                const float z = v.v[e] + bv.v[e];
                v.v[e] = A == Act::Gelu ? gelu_erf(z) : z;
            }
            v.store(y + i);
        }
    }
}

// y += b in place (the Linear forward adds its bias to the GEMM output).
template <typename T, int V>
__device__ __forceinline__ void bias_inplace(T *y, const T *__restrict__ b, uint32_t rows,
                                             uint32_t cols, uint32_t rpc) {
    const uint32_t cv = cols / V;
    const uint32_t r0 = blockIdx.x * rpc;
    const uint32_t r1 = min(r0 + rpc, rows);
    for (uint32_t j = threadIdx.x; j < cv; j += blockDim.x) {
        Vec<V, T> bv;
        bv.load(b + j * V);
#pragma unroll 4
        for (uint32_t r = r0 + threadIdx.y; r < r1; r += blockDim.y) {
            T *p = y + (size_t)r * cols + (size_t)j * V;
            Vec<V, T> v;
            v.load(p);
#pragma unroll
            for (int e = 0; e < V; ++e) v.v[e] += bv.v[e];
            v.store(p);
        }
    }
}

// Adds the by row lanes of acc (one V-vector per thread, column vector j) in ty order and writes
// the chunk's partial. Every thread of the block must call it (it synchronises).
template <int V>
__device__ __forceinline__ void col_partial(const float (&acc)[V], bool ok, uint32_t j,
                                            float *__restrict__ partial, uint32_t cols) {
    __shared__ float sh[256 * 4];
    const uint32_t tid = threadIdx.y * blockDim.x + threadIdx.x;
#pragma unroll
    for (int e = 0; e < V; ++e) sh[tid * V + e] = acc[e];
    __syncthreads();
    if (threadIdx.y == 0 && ok) {
#pragma unroll
        for (int e = 0; e < V; ++e) {
            float s = 0.f;
            for (uint32_t k = 0; k < blockDim.y; ++k) s += sh[(k * blockDim.x + threadIdx.x) * V + e];
            partial[(size_t)blockIdx.x * cols + (size_t)j * V + e] = s;
        }
    }
    __syncthreads();
}

// dx = dy · gelu'(x + b); partials of db = Σ_rows dx (of dx as stored, i.e. rounded to T).
template <typename T, int V>
__device__ __forceinline__ void bias_gelu_bwd(const T *__restrict__ x, const T *__restrict__ b,
                                              const T *__restrict__ dy, T *__restrict__ dx,
                                              float *__restrict__ partial, uint32_t rows,
                                              uint32_t cols, uint32_t rpc) {
    const uint32_t cv = cols / V;
    const uint32_t r0 = blockIdx.x * rpc;
    const uint32_t r1 = min(r0 + rpc, rows);
    for (uint32_t j0 = 0; j0 < cv; j0 += blockDim.x) {
        const uint32_t j = j0 + threadIdx.x;
        const bool ok = j < cv;
        float acc[V] = {};
        if (ok) {
            Vec<V, T> bv;
            bv.load(b + j * V);
#pragma unroll 4
            for (uint32_t r = r0 + threadIdx.y; r < r1; r += blockDim.y) {
                const size_t i = (size_t)r * cols + (size_t)j * V;
                Vec<V, T> xv, gv;
                xv.load(x + i);
                gv.load(dy + i);
#pragma unroll
                for (int e = 0; e < V; ++e) {
                    const float g = gv.v[e] * gelu_erf_grad(xv.v[e] + bv.v[e]);
                    gv.v[e] = to_f(from_f<T>(g));
                    acc[e] += gv.v[e];
                }
                gv.store(dx + i);
            }
        }
        col_partial<V>(acc, ok, j, partial, cols);
    }
}

// Partials of Σ_rows x[r, c].
template <typename T, int V>
__device__ __forceinline__ void colsum_partial(const T *__restrict__ x, float *__restrict__ partial,
                                               uint32_t rows, uint32_t cols, uint32_t rpc) {
    const uint32_t cv = cols / V;
    const uint32_t r0 = blockIdx.x * rpc;
    const uint32_t r1 = min(r0 + rpc, rows);
    for (uint32_t j0 = 0; j0 < cv; j0 += blockDim.x) {
        const uint32_t j = j0 + threadIdx.x;
        const bool ok = j < cv;
        float acc[V] = {};
        if (ok) {
#pragma unroll 4
            for (uint32_t r = r0 + threadIdx.y; r < r1; r += blockDim.y) {
                Vec<V, T> v;
                v.load(x + (size_t)r * cols + (size_t)j * V);
#pragma unroll
                for (int e = 0; e < V; ++e) acc[e] += v.v[e];
            }
        }
        col_partial<V>(acc, ok, j, partial, cols);
    }
}

// Σ x² per block (grid-stride, fixed grid) → partial[blockIdx.x]. Block of 256 threads.
template <typename T>
__device__ __forceinline__ void sumsq_partial(const T *__restrict__ x, float *__restrict__ partial,
                                              size_t n) {
    __shared__ float scratch[32];
    float acc = 0.f;
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const float v = to_f(x[i]);
        acc = fmaf(v, v, acc);
    }
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

// out[0] = scale · Σ partial[0..n), with one block, in a fixed order.
template <typename T>
__device__ __forceinline__ void scaled_final(const float *__restrict__ partial, T *__restrict__ out,
                                             uint32_t n, float scale) {
    __shared__ float scratch[32];
    float acc = 0.f;
    for (uint32_t i = threadIdx.x; i < n; i += blockDim.x) acc += partial[i];
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) out[0] = from_f<T>(acc * scale);
}

// The L1 loss of one mask (spec §6): partial sums of |a - b| per block (grid-stride, fp32), then
// their sum in a fixed order scaled by 1/n; and its gradient d mean|a - b| / da =
// sign(a - b) * g / n with g the upstream gradient, read on the device (sign(0) = 0 as torch's;
// NaN stays NaN).
template <typename T>
__device__ __forceinline__ void absdiff_partial(const T *__restrict__ a, const T *__restrict__ b,
                                                float *__restrict__ partial, size_t n) {
    __shared__ float scratch[32];
    float acc = 0.f;
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        acc += fabsf(to_f(a[i]) - to_f(b[i]));
    }
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}


template <typename T>
__device__ __forceinline__ void l1_grad(const T *__restrict__ a, const T *__restrict__ b,
                                        const T *__restrict__ g, T *__restrict__ da, size_t n,
                                        float inv_count) {
    const float s = to_f(g[0]) * inv_count;
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const float d = to_f(a[i]) - to_f(b[i]);
        da[i] = from_f<T>(d > 0.f ? s : (d < 0.f ? -s : (d == 0.f ? 0.f : d)));
    }
}

// The backward of a gather of distinct rows: out (zeroed) row idx[i / d] gets g's row i / d.
template <typename T>
__device__ __forceinline__ void scatter_rows(const T *__restrict__ g,
                                             const uint32_t *__restrict__ idx, T *__restrict__ out,
                                             size_t n, uint32_t d, uint32_t rows) {
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const uint32_t r = idx[i / d];
        if (r < rows) out[(size_t)r * d + i % d] = g[i];
    }
}

#define INSTANTIATE_V(T, S, V)                                                                     \
    extern "C" __global__ void bias_add_##S##_v##V(const T *x, const T *b, T *y, uint32_t rows,   \
                                                   uint32_t cols, uint32_t rpc) {                  \
        bias_act_fwd<T, V, Act::Add>(x, b, y, rows, cols, rpc);                                    \
    }                                                                                              \
    extern "C" __global__ void bias_add_inplace_##S##_v##V(T *y, const T *b, uint32_t rows,       \
                                                           uint32_t cols, uint32_t rpc) {          \
        bias_inplace<T, V>(y, b, rows, cols, rpc);                                    \
    }                                                                                              \
    extern "C" __global__ void bias_gelu_fwd_##S##_v##V(const T *x, const T *b, T *y,             \
                                                        uint32_t rows, uint32_t cols,              \
                                                        uint32_t rpc) {                            \
        bias_act_fwd<T, V, Act::Gelu>(x, b, y, rows, cols, rpc);                                   \
    }                                                                                              \
    extern "C" __global__ void bias_gelu_bwd_##S##_v##V(const T *x, const T *b, const T *dy,      \
                                                        T *dx, float *partial, uint32_t rows,      \
                                                        uint32_t cols, uint32_t rpc) {             \
        bias_gelu_bwd<T, V>(x, b, dy, dx, partial, rows, cols, rpc);                               \
    }                                                                                              \
    extern "C" __global__ void colsum_partial_##S##_v##V(const T *x, float *partial,              \
                                                         uint32_t rows, uint32_t cols,             \
                                                         uint32_t rpc) {                           \
        colsum_partial<T, V>(x, partial, rows, cols, rpc);                                         \
    }

#define INSTANTIATE(T, S)                                                                          \
    INSTANTIATE_V(T, S, 1)                                                                         \
    INSTANTIATE_V(T, S, 4)                                                                         \
    extern "C" __global__ void colsum_final_##S(const float *partial, T *out, uint32_t nchunks,   \
                                                uint32_t cols) {                                   \
        colsum_final<T>(partial, out, nchunks, cols);                                              \
    }                                                                                              \
    extern "C" __global__ void sumsq_partial_##S(const T *x, float *partial, size_t n) {          \
        sumsq_partial<T>(x, partial, n);                                                           \
    }                                                                                              \
    extern "C" __global__ void scaled_final_##S(const float *partial, T *out, uint32_t n,         \
                                                float scale) {                                     \
        scaled_final<T>(partial, out, n, scale);                                                   \
    }                                                                                              \
    extern "C" __global__ void absdiff_partial_##S(const T *a, const T *b, float *partial,        \
                                                   size_t n) {                                     \
        absdiff_partial<T>(a, b, partial, n);                                                      \
    }                                                                                              \
    extern "C" __global__ void l1_grad_##S(const T *a, const T *b, const T *g, T *da, size_t n,   \
                                           float inv_count) {                                      \
        l1_grad<T>(a, b, g, da, n, inv_count);                                                     \
    }                                                                                              \
    extern "C" __global__ void scatter_rows_##S(const T *g, const uint32_t *idx, T *out, size_t n, \
                                                uint32_t d, uint32_t rows) {                       \
        scatter_rows<T>(g, idx, out, n, d, rows);                                                  \
    }

INSTANTIATE(float, f32)
INSTANTIATE(bf16, bf16)
