// Bias add, fused bias + GELU (erf) forward/backward, column sums and the sum of squares.
//
// Row-wise ops use a 2-D grid: blockIdx.x tiles 32 columns, blockIdx.y a chunk of `rpc` rows;
// the block is (32, 8), so a warp touches 32 consecutive columns of one row. Column reductions
// write one fp32 partial per (chunk, column) and a second kernel adds the partials in chunk
// order, so results are deterministic and depend only on the shape.
#include "common.cuh"

#define TX 32
#define TY 8

__device__ __forceinline__ float gelu_erf(float z) {
    return 0.5f * z * (1.f + erff(z * 0.70710678118654752440f));
}
__device__ __forceinline__ float gelu_erf_grad(float z) {
    // d/dz [z Φ(z)] = Φ(z) + z φ(z)
    return 0.5f * (1.f + erff(z * 0.70710678118654752440f)) +
           z * 0.39894228040143267794f * expf(-0.5f * z * z);
}

// y[r, c] = x[r, c] + b[c]  (GELU: gelu_erf(x + b))
template <typename T, bool GELU>
__device__ __forceinline__ void bias_act_fwd(const T *__restrict__ x, const T *__restrict__ b,
                                             T *__restrict__ y, uint32_t rows, uint32_t cols,
                                             uint32_t rpc) {
    const uint32_t c = blockIdx.x * TX + threadIdx.x;
    if (c >= cols) return;
    const uint32_t r0 = blockIdx.y * rpc;
    const uint32_t r1 = min(r0 + rpc, rows);
    const float bc = to_f(b[c]);
    for (uint32_t r = r0 + threadIdx.y; r < r1; r += TY) {
        const size_t i = (size_t)r * cols + c;
        float z = to_f(x[i]) + bc;
        y[i] = from_f<T>(GELU ? gelu_erf(z) : z);
    }
}

// Writes the fp32 column partial of `v` (one value per thread) for this block's chunk.
__device__ __forceinline__ void store_col_partial(float v, float *__restrict__ partial,
                                                  uint32_t cols, uint32_t ld, uint32_t c) {
    __shared__ float sh[TY][TX];
    sh[threadIdx.y][threadIdx.x] = v;
    __syncthreads();
    if (threadIdx.y == 0 && c < cols) {
        float s = 0.f;
#pragma unroll
        for (int k = 0; k < TY; ++k) s += sh[k][threadIdx.x];
        partial[(size_t)blockIdx.y * ld + c] = s;
    }
}

// dx = dy * gelu'(x + b); partial (for db = Σ_rows dx) per chunk.
template <typename T>
__device__ __forceinline__ void bias_gelu_bwd(const T *__restrict__ x, const T *__restrict__ b,
                                              const T *__restrict__ dy, T *__restrict__ dx,
                                              float *__restrict__ partial, uint32_t rows,
                                              uint32_t cols, uint32_t rpc) {
    const uint32_t c = blockIdx.x * TX + threadIdx.x;
    const uint32_t r0 = blockIdx.y * rpc;
    const uint32_t r1 = min(r0 + rpc, rows);
    float acc = 0.f;
    if (c < cols) {
        const float bc = to_f(b[c]);
        for (uint32_t r = r0 + threadIdx.y; r < r1; r += TY) {
            const size_t i = (size_t)r * cols + c;
            const float g = to_f(dy[i]) * gelu_erf_grad(to_f(x[i]) + bc);
            const T gt = from_f<T>(g);
            dx[i] = gt;
            acc += to_f(gt);
        }
    }
    store_col_partial(acc, partial, cols, cols, c);
}

// partial[chunk, c] = Σ_{rows in chunk} x[r, c]
template <typename T>
__device__ __forceinline__ void colsum_partial(const T *__restrict__ x, float *__restrict__ partial,
                                               uint32_t rows, uint32_t cols, uint32_t rpc) {
    const uint32_t c = blockIdx.x * TX + threadIdx.x;
    const uint32_t r0 = blockIdx.y * rpc;
    const uint32_t r1 = min(r0 + rpc, rows);
    float acc = 0.f;
    if (c < cols)
        for (uint32_t r = r0 + threadIdx.y; r < r1; r += TY) acc += to_f(x[(size_t)r * cols + c]);
    store_col_partial(acc, partial, cols, cols, c);
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

// out[0] = Σ partial[0..n) with one block.
extern "C" __global__ void sum_final_f32(const float *__restrict__ partial, float *__restrict__ out,
                                         uint32_t n) {
    __shared__ float scratch[32];
    float acc = 0.f;
    for (uint32_t i = threadIdx.x; i < n; i += blockDim.x) acc += partial[i];
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) out[0] = acc;
}

#define INSTANTIATE(T, S)                                                                          \
    extern "C" __global__ void bias_add_##S(const T *x, const T *b, T *y, uint32_t rows,          \
                                            uint32_t cols, uint32_t rpc) {                         \
        bias_act_fwd<T, false>(x, b, y, rows, cols, rpc);                                          \
    }                                                                                              \
    extern "C" __global__ void bias_gelu_fwd_##S(const T *x, const T *b, T *y, uint32_t rows,     \
                                                 uint32_t cols, uint32_t rpc) {                    \
        bias_act_fwd<T, true>(x, b, y, rows, cols, rpc);                                           \
    }                                                                                              \
    extern "C" __global__ void bias_gelu_bwd_##S(const T *x, const T *b, const T *dy, T *dx,      \
                                                 float *partial, uint32_t rows, uint32_t cols,     \
                                                 uint32_t rpc) {                                   \
        bias_gelu_bwd<T>(x, b, dy, dx, partial, rows, cols, rpc);                                  \
    }                                                                                              \
    extern "C" __global__ void colsum_partial_##S(const T *x, float *partial, uint32_t rows,      \
                                                  uint32_t cols, uint32_t rpc) {                   \
        colsum_partial<T>(x, partial, rows, cols, rpc);                                            \
    }                                                                                              \
    extern "C" __global__ void colsum_final_##S(const float *partial, T *out, uint32_t nchunks,   \
                                                uint32_t cols) {                                   \
        colsum_final<T>(partial, out, nchunks, cols);                                              \
    }                                                                                              \
    extern "C" __global__ void sumsq_partial_##S(const T *x, float *partial, size_t n) {          \
        sumsq_partial<T>(x, partial, n);                                                           \
    }

INSTANTIATE(float, f32)
INSTANTIATE(bf16, bf16)
