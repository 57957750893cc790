// Shared helpers for the vjepa CUDA kernels: dtype conversion, vector loads, reductions.
// Every kernel computes in fp32 whatever the storage type (f32 or bf16).
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

typedef __nv_bfloat16 bf16;

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(bf16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
// Round to nearest even, as torch and candle do.
template <> __device__ __forceinline__ bf16 from_f<bf16>(float x) { return __float2bfloat16_rn(x); }

// Four consecutive elements as fp32. The address must be aligned to 4 elements.
__device__ __forceinline__ float4 load4(const float *p) { return *reinterpret_cast<const float4 *>(p); }
__device__ __forceinline__ float4 load4(const bf16 *p) {
    uint2 u = *reinterpret_cast<const uint2 *>(p);
    // Little endian: element 0 is the low half of the first word.
    return make_float4(__uint_as_float(u.x << 16), __uint_as_float(u.x & 0xffff0000u),
                       __uint_as_float(u.y << 16), __uint_as_float(u.y & 0xffff0000u));
}

// Sum over the 32 lanes of a warp; every lane gets the result (same tree on every lane, so the
// result is deterministic).
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Sum over a block of `blockDim.x` threads (a multiple of 32, at most 1024); the result is valid
// in thread 0. `scratch` holds 32 floats.
__device__ __forceinline__ float block_sum(float v, float *scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    const int nwarps = blockDim.x >> 5;
    v = (threadIdx.x < nwarps) ? scratch[threadIdx.x] : 0.f;
    if (warp == 0) v = warp_sum(v);
    return v;
}

// out[c] = Σ_k partial[k, c]: block (32, 8), grid ceil(cols / 32). Thread (tx, ty) adds chunks
// k ≡ ty (mod 8) in order, then the 8 sums are added in ty order: a fixed tree for a given shape.
template <typename T>
__device__ __forceinline__ void colsum_final(const float *__restrict__ partial, T *__restrict__ out,
                                             uint32_t nchunks, uint32_t cols) {
    __shared__ float sh[8][33];
    const uint32_t c = blockIdx.x * 32 + threadIdx.x;
    float s = 0.f;
    if (c < cols)
        for (uint32_t k = threadIdx.y; k < nchunks; k += 8) s += partial[(size_t)k * cols + c];
    sh[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && c < cols) {
        float t = 0.f;
#pragma unroll
        for (int k = 0; k < 8; ++k) t += sh[k][threadIdx.x];
        out[c] = from_f<T>(t);
    }
}

// V consecutive elements as fp32 (V = 4: one 16-byte f32 / 8-byte bf16 access; V = 1: scalar).
template <int V, typename T> struct Vec {
    float v[V];
    __device__ __forceinline__ void load(const T *p) {
        if constexpr (V == 4) {
            const float4 f = load4(p);
            v[0] = f.x, v[1] = f.y, v[2] = f.z, v[3] = f.w;
        } else {
#pragma unroll
            for (int i = 0; i < V; ++i) v[i] = to_f(p[i]);
        }
    }
    __device__ __forceinline__ void store(T *p) const {
        if constexpr (V == 4 && sizeof(T) == 4) {
            *reinterpret_cast<float4 *>(p) = make_float4(v[0], v[1], v[2], v[3]);
        } else if constexpr (V == 4 && sizeof(T) == 2) {
            const __nv_bfloat162 a = __floats2bfloat162_rn(v[0], v[1]);
            const __nv_bfloat162 b = __floats2bfloat162_rn(v[2], v[3]);
            uint2 u;
            u.x = *reinterpret_cast<const uint32_t *>(&a);
            u.y = *reinterpret_cast<const uint32_t *>(&b);
            *reinterpret_cast<uint2 *>(p) = u;
        } else {
#pragma unroll
            for (int i = 0; i < V; ++i) p[i] = from_f<T>(v[i]);
        }
    }
};
