// Flash-style multi-head attention straight on the fused qkv projection [B, N, 3·D]
// (columns [q | k | v], head h at h·hd..(h+1)·hd), output [B, N, D]. Softmax(q·kᵀ/√hd)·v with
// an online softmax: no N×N matrix ever reaches global memory.
//
// All kernels use 256 threads as a 16×16 grid (ty = tid / 16, tx = tid % 16) over 64×64 tiles;
// each thread owns a 4×4 micro-tile (rows ty·4.., cols tx·4..) of the score tile, and 4 rows ×
// HDP/16 columns (d = tx + 16·cc) of the [64, hd] accumulators. Operand tiles live in shared
// memory transposed, [d][row] with a padded stride, so both products read float4s without bank
// conflicts. The head dim is padded with zeros to HDP (a multiple of 16, ≤ 128). fp32 math
// whatever the storage type (f32 or bf16). Scores use base 2: s·log2(e)/√hd, exp2f.
//
// Backward (deterministic: no atomics): `attn_bwd_stats` recomputes each row's log-sum-exp and
// Dᵢ = Σ dO∘O; `attn_bwd_dkdv` walks query tiles for a fixed key tile (dV = Pᵀ·dO,
// dK = scale·dSᵀ·Q); `attn_bwd_dq` walks key tiles for a fixed query tile (dQ = scale·dS·K),
// with dS = P∘(dP − Dᵢ), dP = dO·Vᵀ. Every element of dqkv is written exactly once.
#include "common.cuh"
#include <mma.h>

#define TILE 64
#define LD 68 // padded stride of transposed [d][row] tiles (16-byte aligned rows)
#define NT 256

extern __shared__ __align__(128) float4 attn_smem[];

// Xt[d][n] = X[row0 + n][d] for n < 64, d < HDP; zero outside N rows / hd columns.
// `base` points at (row 0, column 0) of the head's block; rows are `rstride` elements apart.
template <typename T, int HDP>
__device__ __forceinline__ void load_t(float *Xt, const T *__restrict__ base, int row0, int n_rows,
                                       size_t rstride, int hd) {
    for (int idx = threadIdx.x; idx < TILE * (HDP / 4); idx += NT) {
        const int n = idx & (TILE - 1);
        const int d = (idx >> 6) * 4;
        float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
        const int r = row0 + n;
        if (r < n_rows && d < hd) v = load4(base + (size_t)r * rstride + d);
        Xt[(d + 0) * LD + n] = v.x;
        Xt[(d + 1) * LD + n] = v.y;
        Xt[(d + 2) * LD + n] = v.z;
        Xt[(d + 3) * LD + n] = v.w;
    }
}

// acc[r][c] += Σ_d Lt[d][ty·4 + r] · Rt[d][tx·4 + c]
template <int HDP>
__device__ __forceinline__ void mm_tt(float acc[4][4], const float *Lt, const float *Rt, int ty,
                                      int tx) {
#pragma unroll 8
    for (int d = 0; d < HDP; ++d) {
        const float4 a = *reinterpret_cast<const float4 *>(&Lt[d * LD + ty * 4]);
        const float4 b = *reinterpret_cast<const float4 *>(&Rt[d * LD + tx * 4]);
        const float av[4] = {a.x, a.y, a.z, a.w};
        const float bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
        for (int r = 0; r < 4; ++r)
#pragma unroll
            for (int c = 0; c < 4; ++c) acc[r][c] = fmaf(av[r], bv[c], acc[r][c]);
    }
}

// out[r][cc] += Σ_k X[ty·4 + r][k] · Yt[tx + 16·cc][k]; X is [64][64] row-major.
template <int HDP>
__device__ __forceinline__ void mm_acc(float out[4][HDP / 16], const float *X, const float *Yt,
                                       int ty, int tx) {
#pragma unroll 2
    for (int k = 0; k < TILE; k += 4) {
        float4 xr[4];
#pragma unroll
        for (int r = 0; r < 4; ++r)
            xr[r] = *reinterpret_cast<const float4 *>(&X[(ty * 4 + r) * TILE + k]);
#pragma unroll
        for (int cc = 0; cc < HDP / 16; ++cc) {
            const float4 y = *reinterpret_cast<const float4 *>(&Yt[(tx + 16 * cc) * LD + k]);
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                float a = out[r][cc];
                a = fmaf(xr[r].x, y.x, a);
                a = fmaf(xr[r].y, y.y, a);
                a = fmaf(xr[r].z, y.z, a);
                a = fmaf(xr[r].w, y.w, a);
                out[r][cc] = a;
            }
        }
    }
}

__device__ __forceinline__ float max16(float v) {
#pragma unroll
    for (int o = 1; o < 16; o <<= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
__device__ __forceinline__ float sum16(float v) {
#pragma unroll
    for (int o = 1; o < 16; o <<= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ void store4(float *dst, const float v[4]) {
    *reinterpret_cast<float4 *>(dst) = make_float4(v[0], v[1], v[2], v[3]);
}

// Online softmax over key tiles for the block's 64 query rows. With PV, accumulates o (forward);
// without, only the row statistics (backward pre-pass). On return m/l are the row max (base 2)
// and this thread's share of the row sum.
template <typename T, int HDP, bool PV>
__device__ __forceinline__ void online_softmax(const T *__restrict__ base, int n, size_t rs, int hd,
                                               int dim, float scale_log2, float *Qt, float *Kt,
                                               float *Vt, float *Ps, float o[4][HDP / 16],
                                               float m[4], float l[4]) {
    const int ty = threadIdx.x >> 4, tx = threadIdx.x & 15;
    for (int k0 = 0; k0 < n; k0 += TILE) {
        __syncthreads(); // previous tile fully consumed
        load_t<T, HDP>(Kt, base + dim, k0, n, rs, hd);
        if (PV) load_t<T, HDP>(Vt, base + 2 * dim, k0, n, rs, hd);
        __syncthreads();
        float s[4][4] = {};
        mm_tt<HDP>(s, Qt, Kt, ty, tx);
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            float mx = -INFINITY;
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                s[r][c] = (k0 + tx * 4 + c < n) ? s[r][c] * scale_log2 : -INFINITY;
                mx = fmaxf(mx, s[r][c]);
            }
            // Column k0 is always valid, so the new max is finite.
            const float mnew = fmaxf(m[r], max16(mx));
            const float alpha = exp2f(m[r] - mnew);
            m[r] = mnew;
            float ps = 0.f;
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                s[r][c] = exp2f(s[r][c] - mnew);
                ps += s[r][c];
            }
            l[r] = l[r] * alpha + ps;
            if (PV) {
#pragma unroll
                for (int cc = 0; cc < HDP / 16; ++cc) o[r][cc] *= alpha;
                store4(&Ps[(ty * 4 + r) * TILE + tx * 4], s[r]);
            }
        }
        if (PV) {
            __syncthreads();
            mm_acc<HDP>(o, Ps, Vt, ty, tx);
        }
    }
}

template <typename T, int HDP>
__device__ __forceinline__ void attn_fwd(const T *__restrict__ qkv, T *__restrict__ out, int n,
                                         int heads, int hd, float scale_log2) {
    float *Qt = reinterpret_cast<float *>(attn_smem);
    float *Kt = Qt + HDP * LD;
    float *Vt = Kt + HDP * LD;
    float *Ps = Vt + HDP * LD;
    const int ty = threadIdx.x >> 4, tx = threadIdx.x & 15;
    const int q0 = blockIdx.x * TILE;
    const int b = blockIdx.y / heads, h = blockIdx.y % heads;
    const int dim = heads * hd;
    const size_t rs = 3 * (size_t)dim;
    const T *base = qkv + (size_t)b * n * rs + (size_t)h * hd;
    load_t<T, HDP>(Qt, base, q0, n, rs, hd);
    float o[4][HDP / 16] = {};
    float m[4] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY};
    float l[4] = {0.f, 0.f, 0.f, 0.f};
    online_softmax<T, HDP, true>(base, n, rs, hd, dim, scale_log2, Qt, Kt, Vt, Ps, o, m, l);
#pragma unroll
    for (int r = 0; r < 4; ++r) {
        const float inv = 1.f / sum16(l[r]);
        const int i = q0 + ty * 4 + r;
        if (i >= n) continue;
        T *orow = out + ((size_t)b * n + i) * dim + (size_t)h * hd;
#pragma unroll
        for (int cc = 0; cc < HDP / 16; ++cc) {
            const int d = tx + 16 * cc;
            if (d < hd) orow[d] = from_f<T>(o[r][cc] * inv);
        }
    }
}

// lse[bh, i] = log2 Σ_j exp2(s_ij) (base-2 scores) and delta[bh, i] = Σ_d dO[i, d]·O[i, d].
template <typename T, int HDP>
__device__ __forceinline__ void attn_bwd_stats(const T *__restrict__ qkv, const T *__restrict__ o_,
                                               const T *__restrict__ dout, float *__restrict__ lse,
                                               float *__restrict__ delta, int n, int heads, int hd,
                                               float scale_log2) {
    float *Qt = reinterpret_cast<float *>(attn_smem);
    float *Kt = Qt + HDP * LD;
    const int ty = threadIdx.x >> 4, tx = threadIdx.x & 15;
    const int q0 = blockIdx.x * TILE;
    const int b = blockIdx.y / heads, h = blockIdx.y % heads;
    const int dim = heads * hd;
    const size_t rs = 3 * (size_t)dim;
    const T *base = qkv + (size_t)b * n * rs + (size_t)h * hd;
    // delta: 4 threads per row.
    {
        const int row = threadIdx.x >> 2, part = threadIdx.x & 3;
        const int i = q0 + row;
        float acc = 0.f;
        if (i < n) {
            const size_t off = ((size_t)b * n + i) * dim + (size_t)h * hd;
            for (int d = part; d < hd; d += 4) acc = fmaf(to_f(dout[off + d]), to_f(o_[off + d]), acc);
        }
        acc += __shfl_xor_sync(0xffffffffu, acc, 1);
        acc += __shfl_xor_sync(0xffffffffu, acc, 2);
        if (part == 0 && i < n) delta[(size_t)blockIdx.y * n + i] = acc;
    }
    load_t<T, HDP>(Qt, base, q0, n, rs, hd);
    float m[4] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY};
    float l[4] = {0.f, 0.f, 0.f, 0.f};
    online_softmax<T, HDP, false>(base, n, rs, hd, dim, scale_log2, Qt, Kt, nullptr, nullptr,
                                  nullptr, m, l);
#pragma unroll
    for (int r = 0; r < 4; ++r) {
        const float tot = sum16(l[r]);
        const int i = q0 + ty * 4 + r;
        if (tx == 0 && i < n) lse[(size_t)blockIdx.y * n + i] = m[r] + log2f(tot);
    }
}

// For the block's 64 keys: dV = Σ_i Pᵀ·dO, dK = scale·Σ_i dSᵀ·Q over all query tiles.
template <typename T, int HDP>
__device__ __forceinline__ void attn_bwd_dkdv(const T *__restrict__ qkv, const T *__restrict__ dout,
                                              const float *__restrict__ lse,
                                              const float *__restrict__ delta, T *__restrict__ dqkv,
                                              int n, int heads, int hd, float scale_log2,
                                              float scale) {
    float *Kt = reinterpret_cast<float *>(attn_smem);
    float *Vt = Kt + HDP * LD;
    float *Qt = Vt + HDP * LD;
    float *dOt = Qt + HDP * LD;
    float *PT = dOt + HDP * LD;
    float *dST = PT + TILE * TILE;
    float *lse_s = dST + TILE * TILE;
    float *del_s = lse_s + TILE;
    const int ty = threadIdx.x >> 4, tx = threadIdx.x & 15;
    const int k0 = blockIdx.x * TILE;
    const int b = blockIdx.y / heads, h = blockIdx.y % heads;
    const int dim = heads * hd;
    const size_t rs = 3 * (size_t)dim;
    const T *base = qkv + (size_t)b * n * rs + (size_t)h * hd;
    const T *dobase = dout + (size_t)b * n * dim + (size_t)h * hd;
    const float *lse_bh = lse + (size_t)blockIdx.y * n;
    const float *del_bh = delta + (size_t)blockIdx.y * n;
    load_t<T, HDP>(Kt, base + dim, k0, n, rs, hd);
    load_t<T, HDP>(Vt, base + 2 * dim, k0, n, rs, hd);
    float dk[4][HDP / 16] = {};
    float dv[4][HDP / 16] = {};
    for (int q0 = 0; q0 < n; q0 += TILE) {
        __syncthreads();
        load_t<T, HDP>(Qt, base, q0, n, rs, hd);
        load_t<T, HDP>(dOt, dobase, q0, n, (size_t)dim, hd);
        if (threadIdx.x < TILE) {
            const int i = q0 + threadIdx.x;
            lse_s[threadIdx.x] = i < n ? lse_bh[i] : 0.f;
            del_s[threadIdx.x] = i < n ? del_bh[i] : 0.f;
        }
        __syncthreads();
        // Transposed tiles: rows are keys j (ty), columns queries i (tx).
        float st[4][4] = {};
        float dpt[4][4] = {};
        mm_tt<HDP>(st, Kt, Qt, ty, tx);
        mm_tt<HDP>(dpt, Vt, dOt, ty, tx);
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            const bool jv = k0 + ty * 4 + r < n;
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const int ic = tx * 4 + c;
                const float p = (jv && q0 + ic < n) ? exp2f(st[r][c] * scale_log2 - lse_s[ic]) : 0.f;
                st[r][c] = p;
                dpt[r][c] = p * (dpt[r][c] - del_s[ic]);
            }
            store4(&PT[(ty * 4 + r) * TILE + tx * 4], st[r]);
            store4(&dST[(ty * 4 + r) * TILE + tx * 4], dpt[r]);
        }
        __syncthreads();
        mm_acc<HDP>(dv, PT, dOt, ty, tx);
        mm_acc<HDP>(dk, dST, Qt, ty, tx);
    }
#pragma unroll
    for (int r = 0; r < 4; ++r) {
        const int j = k0 + ty * 4 + r;
        if (j >= n) continue;
        T *row = dqkv + ((size_t)b * n + j) * rs + (size_t)h * hd;
#pragma unroll
        for (int cc = 0; cc < HDP / 16; ++cc) {
            const int d = tx + 16 * cc;
            if (d < hd) {
                row[dim + d] = from_f<T>(dk[r][cc] * scale);
                row[2 * dim + d] = from_f<T>(dv[r][cc]);
            }
        }
    }
}

// For the block's 64 queries: dQ = scale·Σ_j dS·K over all key tiles.
template <typename T, int HDP>
__device__ __forceinline__ void attn_bwd_dq(const T *__restrict__ qkv, const T *__restrict__ dout,
                                            const float *__restrict__ lse,
                                            const float *__restrict__ delta, T *__restrict__ dqkv,
                                            int n, int heads, int hd, float scale_log2,
                                            float scale) {
    float *Qt = reinterpret_cast<float *>(attn_smem);
    float *dOt = Qt + HDP * LD;
    float *Kt = dOt + HDP * LD;
    float *Vt = Kt + HDP * LD;
    float *dS = Vt + HDP * LD;
    float *lse_s = dS + TILE * TILE;
    float *del_s = lse_s + TILE;
    const int ty = threadIdx.x >> 4, tx = threadIdx.x & 15;
    const int q0 = blockIdx.x * TILE;
    const int b = blockIdx.y / heads, h = blockIdx.y % heads;
    const int dim = heads * hd;
    const size_t rs = 3 * (size_t)dim;
    const T *base = qkv + (size_t)b * n * rs + (size_t)h * hd;
    const T *dobase = dout + (size_t)b * n * dim + (size_t)h * hd;
    load_t<T, HDP>(Qt, base, q0, n, rs, hd);
    load_t<T, HDP>(dOt, dobase, q0, n, (size_t)dim, hd);
    if (threadIdx.x < TILE) {
        const int i = q0 + threadIdx.x;
        lse_s[threadIdx.x] = i < n ? lse[(size_t)blockIdx.y * n + i] : 0.f;
        del_s[threadIdx.x] = i < n ? delta[(size_t)blockIdx.y * n + i] : 0.f;
    }
    float dq[4][HDP / 16] = {};
    for (int k0 = 0; k0 < n; k0 += TILE) {
        __syncthreads();
        load_t<T, HDP>(Kt, base + dim, k0, n, rs, hd);
        load_t<T, HDP>(Vt, base + 2 * dim, k0, n, rs, hd);
        __syncthreads();
        float s[4][4] = {};
        float dp[4][4] = {};
        mm_tt<HDP>(s, Qt, Kt, ty, tx);
        mm_tt<HDP>(dp, dOt, Vt, ty, tx);
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            const int ir = ty * 4 + r;
            const bool iv = q0 + ir < n;
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const float p = (iv && k0 + tx * 4 + c < n)
                                    ? exp2f(s[r][c] * scale_log2 - lse_s[ir])
                                    : 0.f;
                s[r][c] = p * (dp[r][c] - del_s[ir]);
            }
            store4(&dS[ir * TILE + tx * 4], s[r]);
        }
        __syncthreads();
        mm_acc<HDP>(dq, dS, Kt, ty, tx);
    }
#pragma unroll
    for (int r = 0; r < 4; ++r) {
        const int i = q0 + ty * 4 + r;
        if (i >= n) continue;
        T *row = dqkv + ((size_t)b * n + i) * rs + (size_t)h * hd;
#pragma unroll
        for (int cc = 0; cc < HDP / 16; ++cc) {
            const int d = tx + 16 * cc;
            if (d < hd) row[d] = from_f<T>(dq[r][cc] * scale);
        }
    }
}

#define INSTANTIATE(T, S, HDP)                                                                     \
    extern "C" __global__ void __launch_bounds__(NT, 2)                                               \
        attn_fwd_##S##_##HDP(const T *qkv, T *out, int n, int heads, int hd, float scale_log2) {   \
        attn_fwd<T, HDP>(qkv, out, n, heads, hd, scale_log2);                                      \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(NT, 2)                                               \
        attn_bwd_stats_##S##_##HDP(const T *qkv, const T *o, const T *dout, float *lse,            \
                                   float *delta, int n, int heads, int hd, float scale_log2) {     \
        attn_bwd_stats<T, HDP>(qkv, o, dout, lse, delta, n, heads, hd, scale_log2);                \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(NT, 2)                                               \
        attn_bwd_dkdv_##S##_##HDP(const T *qkv, const T *dout, const float *lse,                   \
                                  const float *delta, T *dqkv, int n, int heads, int hd,           \
                                  float scale_log2, float scale) {                                 \
        attn_bwd_dkdv<T, HDP>(qkv, dout, lse, delta, dqkv, n, heads, hd, scale_log2, scale);       \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(NT, 2)                                               \
        attn_bwd_dq_##S##_##HDP(const T *qkv, const T *dout, const float *lse, const float *delta, \
                                T *dqkv, int n, int heads, int hd, float scale_log2,               \
                                float scale) {                                                     \
        attn_bwd_dq<T, HDP>(qkv, dout, lse, delta, dqkv, n, heads, hd, scale_log2, scale);         \
    }

#define INSTANTIATE_ALL(HDP)                                                                       \
    INSTANTIATE(float, f32, HDP)                                                                   \
    INSTANTIATE(bf16, bf16, HDP)

INSTANTIATE_ALL(16)
INSTANTIATE_ALL(32)
INSTANTIATE_ALL(48)
INSTANTIATE_ALL(64)
INSTANTIATE_ALL(80)
INSTANTIATE_ALL(96)
INSTANTIATE_ALL(112)
INSTANTIATE_ALL(128)

// ---------------------------------------------------------------------------------------------
// bf16 forward on tensor cores (WMMA 16×16×16, fp32 accumulation), for hd a multiple of 8.
//
// 128 threads = 4 warps; the block owns 64 query rows, warp w rows 16w..16w+15, and walks key
// tiles of 64. Per tile and warp: S = Q·Kᵀ (Q fragments stay in registers) into shared fp32,
// online softmax on the warp's rows (2 lanes per row, interleaved columns), P rounded to bf16,
// the fp32 O rows rescaled in shared memory, then O += P·V through accumulator fragments.
// Tiles are bf16 row-major in shared memory with padded strides; head dim zero-padded to HDP.

#define TC_THREADS 128
namespace wm = nvcuda::wmma;

template <int HDP> struct TcLayout {
    static constexpr int LDH = HDP + 8;  // bf16 Q/K/V tiles [64][LDH]
    static constexpr int LDS = TILE + 4; // fp32 scores [64][LDS]
    static constexpr int LDP = TILE + 8; // bf16 probabilities [64][LDP]
    static constexpr int LDO = HDP + 4;  // fp32 output accumulator [64][LDO]
    static constexpr int Q = 0;
    static constexpr int K = Q + TILE * LDH * 2;
    static constexpr int V = K + TILE * LDH * 2;
    static constexpr int S = V + TILE * LDH * 2;
    static constexpr int P = S + TILE * LDS * 4;
    static constexpr int O = P + TILE * LDP * 2;
    static constexpr int BYTES = O + TILE * LDO * 4;
};

// dst[r][c] = src row (row0 + r), columns c < HDP (zero past hd or N), 16-byte chunks.
template <int HDP>
__device__ __forceinline__ void tc_load(bf16 *dst, const bf16 *__restrict__ base, int row0, int n,
                                        size_t rstride, int hd) {
    constexpr int C8 = HDP / 8;
    for (int idx = threadIdx.x; idx < TILE * C8; idx += TC_THREADS) {
        const int r = idx / C8, c = (idx % C8) * 8;
        uint4 v = make_uint4(0u, 0u, 0u, 0u);
        if (row0 + r < n && c < hd) v = *reinterpret_cast<const uint4 *>(base + (size_t)(row0 + r) * rstride + c);
        *reinterpret_cast<uint4 *>(dst + r * TcLayout<HDP>::LDH + c) = v;
    }
}

template <int HDP>
__device__ __forceinline__ void attn_fwd_tc(const bf16 *__restrict__ qkv, bf16 *__restrict__ out,
                                            int n, int heads, int hd, float scale_log2) {
    using L = TcLayout<HDP>;
    constexpr int KD = HDP / 16;
    unsigned char *sm = reinterpret_cast<unsigned char *>(attn_smem);
    bf16 *Qs = reinterpret_cast<bf16 *>(sm + L::Q);
    bf16 *Ks = reinterpret_cast<bf16 *>(sm + L::K);
    bf16 *Vs = reinterpret_cast<bf16 *>(sm + L::V);
    float *Ss = reinterpret_cast<float *>(sm + L::S);
    bf16 *Ps = reinterpret_cast<bf16 *>(sm + L::P);
    float *Os = reinterpret_cast<float *>(sm + L::O);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int r0 = warp * 16;
    const int rr = lane >> 1, half = lane & 1; // softmax: row r0 + rr, columns 2c + half
    const int q0 = blockIdx.x * TILE;
    const int b = blockIdx.y / heads, h = blockIdx.y % heads;
    const int dim = heads * hd;
    const size_t rs = 3 * (size_t)dim;
    const bf16 *base = qkv + (size_t)b * n * rs + (size_t)h * hd;

    tc_load<HDP>(Qs, base, q0, n, rs, hd);
    for (int i = threadIdx.x; i < TILE * L::LDO; i += TC_THREADS) Os[i] = 0.f;
    __syncthreads();
    wm::fragment<wm::matrix_a, 16, 16, 16, bf16, wm::row_major> qf[KD];
#pragma unroll
    for (int kb = 0; kb < KD; ++kb) wm::load_matrix_sync(qf[kb], Qs + r0 * L::LDH + kb * 16, L::LDH);

    float m = -INFINITY, l = 0.f;
    for (int k0 = 0; k0 < n; k0 += TILE) {
        __syncthreads(); // every warp is done with the previous K/V tile
        tc_load<HDP>(Ks, base + dim, k0, n, rs, hd);
        tc_load<HDP>(Vs, base + 2 * dim, k0, n, rs, hd);
        __syncthreads();
        // S rows of this warp: [16, 64] = Q_w · Kᵀ.
#pragma unroll
        for (int jb = 0; jb < TILE / 16; ++jb) {
            wm::fragment<wm::accumulator, 16, 16, 16, float> acc;
            wm::fill_fragment(acc, 0.f);
#pragma unroll
            for (int kb = 0; kb < KD; ++kb) {
                wm::fragment<wm::matrix_b, 16, 16, 16, bf16, wm::col_major> kf;
                wm::load_matrix_sync(kf, Ks + jb * 16 * L::LDH + kb * 16, L::LDH);
                wm::mma_sync(acc, qf[kb], kf, acc);
            }
            wm::store_matrix_sync(Ss + r0 * L::LDS + jb * 16, acc, L::LDS, wm::mem_row_major);
        }
        __syncwarp();
        // Online softmax on row r0 + rr, columns 2c + half.
        const float *srow = Ss + (r0 + rr) * L::LDS;
        float s[TILE / 2];
        float mx = -INFINITY;
#pragma unroll
        for (int c = 0; c < TILE / 2; ++c) {
            const int j = 2 * c + half;
            s[c] = (k0 + j < n) ? srow[j] * scale_log2 : -INFINITY;
            mx = fmaxf(mx, s[c]);
        }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        const float mnew = fmaxf(m, mx); // finite: column k0 is valid
        const float alpha = exp2f(m - mnew);
        m = mnew;
        float ps = 0.f;
        bf16 *prow = Ps + (r0 + rr) * L::LDP;
#pragma unroll
        for (int c = 0; c < TILE / 2; ++c) {
            const float p = exp2f(s[c] - mnew);
            ps += p;
            prow[2 * c + half] = __float2bfloat16_rn(p);
        }
        l = l * alpha + ps;
        float *orow = Os + (r0 + rr) * L::LDO;
#pragma unroll
        for (int c = 0; c < HDP / 2; ++c) orow[2 * c + half] *= alpha;
        __syncwarp();
        // O_w += P_w · V.
#pragma unroll
        for (int db = 0; db < KD; ++db) {
            wm::fragment<wm::accumulator, 16, 16, 16, float> acc;
            wm::load_matrix_sync(acc, Os + r0 * L::LDO + db * 16, L::LDO, wm::mem_row_major);
#pragma unroll
            for (int kb = 0; kb < TILE / 16; ++kb) {
                wm::fragment<wm::matrix_a, 16, 16, 16, bf16, wm::row_major> pf;
                wm::fragment<wm::matrix_b, 16, 16, 16, bf16, wm::row_major> vf;
                wm::load_matrix_sync(pf, Ps + r0 * L::LDP + kb * 16, L::LDP);
                wm::load_matrix_sync(vf, Vs + kb * 16 * L::LDH + db * 16, L::LDH);
                wm::mma_sync(acc, pf, vf, acc);
            }
            wm::store_matrix_sync(Os + r0 * L::LDO + db * 16, acc, L::LDO, wm::mem_row_major);
        }
        __syncwarp();
    }
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    const float inv = 1.f / l;
    const int i = q0 + r0 + rr;
    if (i < n) {
        bf16 *dst = out + ((size_t)b * n + i) * dim + (size_t)h * hd;
        const float *orow = Os + (r0 + rr) * L::LDO;
        for (int c = 0; c < HDP / 2; ++c) {
            const int d = 2 * c + half;
            if (d < hd) dst[d] = __float2bfloat16_rn(orow[d] * inv);
        }
    }
}

#define INSTANTIATE_TC(HDP)                                                                        \
    extern "C" __global__ void __launch_bounds__(TC_THREADS)                                       \
        attn_fwd_tc_bf16_##HDP(const bf16 *qkv, bf16 *out, int n, int heads, int hd,               \
                               float scale_log2) {                                                 \
        attn_fwd_tc<HDP>(qkv, out, n, heads, hd, scale_log2);                                      \
    }

INSTANTIATE_TC(16)
INSTANTIATE_TC(32)
INSTANTIATE_TC(48)
INSTANTIATE_TC(64)
INSTANTIATE_TC(80)
INSTANTIATE_TC(96)
INSTANTIATE_TC(112)
INSTANTIATE_TC(128)

// ---------------------------------------------------------------------------------------------
// bf16 backward on tensor cores (same split and determinism as the fp32 kernels above: stats,
// dK/dV per key tile, dQ per query tile; no atomics). 4 warps, each owning 16 rows of the
// block's 64 (keys for dK/dV, queries for stats and dQ). Score-like tiles go through shared
// fp32 scratch for the element-wise part (2 lanes per row, interleaved columns); P and dS are
// rounded to bf16 for the second products, as flash attention does. Accumulators stay in
// fragments for the whole kernel (no rescaling in the backward).

template <int HDP> struct TcBwd {
    static constexpr int LDH = HDP + 8;
    static constexpr int LDS = TILE + 4;
    static constexpr int LDP = TILE + 8;
    static constexpr int TILE_H = TILE * LDH * 2;   // one bf16 [64][LDH] tile
    static constexpr int TILE_S = TILE * LDS * 4;   // one fp32 [64][LDS] scratch
    static constexpr int TILE_P = TILE * LDP * 2;   // one bf16 [64][LDP] tile
    // stats: Q, K, S
    static constexpr int STATS = 2 * TILE_H + TILE_S;
    // dK/dV and dQ: 4 operand tiles, 2 fp32 scratch, 2 bf16 P/dS tiles, lse + delta.
    static constexpr int MAIN = 4 * TILE_H + 2 * TILE_S + 2 * TILE_P + 2 * TILE * 4;
};

using FragA = wm::fragment<wm::matrix_a, 16, 16, 16, bf16, wm::row_major>;
using FragBc = wm::fragment<wm::matrix_b, 16, 16, 16, bf16, wm::col_major>;
using FragBr = wm::fragment<wm::matrix_b, 16, 16, 16, bf16, wm::row_major>;
using FragC = wm::fragment<wm::accumulator, 16, 16, 16, float>;

// Scratch[16 rows of the warp][64] = A_w (16 × HDP, fragments) · Bᵀ (B rows = tile rows).
template <int HDP>
__device__ __forceinline__ void tc_rowtile(const FragA (&a)[HDP / 16], const bf16 *Bs,
                                           float *scratch_w) {
    using L = TcBwd<HDP>;
#pragma unroll
    for (int jb = 0; jb < TILE / 16; ++jb) {
        FragC acc;
        wm::fill_fragment(acc, 0.f);
#pragma unroll
        for (int kb = 0; kb < HDP / 16; ++kb) {
            FragBc b;
            wm::load_matrix_sync(b, Bs + jb * 16 * L::LDH + kb * 16, L::LDH);
            wm::mma_sync(acc, a[kb], b, acc);
        }
        wm::store_matrix_sync(scratch_w + jb * 16, acc, L::LDS, wm::mem_row_major);
    }
}

// acc[db] += P_w (16 × 64 bf16, row-major at Pw) · B (64 × HDP bf16 tile, row-major).
template <int HDP>
__device__ __forceinline__ void tc_acc(FragC (&acc)[HDP / 16], const bf16 *Pw, const bf16 *Bs) {
    using L = TcBwd<HDP>;
#pragma unroll
    for (int kb = 0; kb < TILE / 16; ++kb) {
        FragA a;
        wm::load_matrix_sync(a, Pw + kb * 16, L::LDP);
#pragma unroll
        for (int db = 0; db < HDP / 16; ++db) {
            FragBr b;
            wm::load_matrix_sync(b, Bs + kb * 16 * L::LDH + db * 16, L::LDH);
            wm::mma_sync(acc[db], a, b, acc[db]);
        }
    }
}

// Writes acc·mul as rows row0 + 0..15 (< n), columns d < hd, of dst (row stride rs), through the
// warp's fp32 scratch.
template <int HDP>
__device__ __forceinline__ void tc_store(FragC (&acc)[HDP / 16], float mul, float *scratch_w,
                                         bf16 *dst, int row0, int n, size_t rs, int hd) {
    using L = TcBwd<HDP>;
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int db = 0; db < HDP / 16; ++db) {
        __syncwarp();
        wm::store_matrix_sync(scratch_w, acc[db], L::LDS, wm::mem_row_major);
        __syncwarp();
        for (int e = lane; e < 256; e += 32) {
            const int r = e >> 4, c = e & 15;
            const int d = db * 16 + c;
            if (row0 + r < n && d < hd)
                dst[(size_t)(row0 + r) * rs + d] = __float2bfloat16_rn(scratch_w[r * L::LDS + c] * mul);
        }
    }
}

template <int HDP>
__device__ __forceinline__ void attn_bwd_stats_tc(const bf16 *__restrict__ qkv,
                                                  const bf16 *__restrict__ o_,
                                                  const bf16 *__restrict__ dout,
                                                  float *__restrict__ lse,
                                                  float *__restrict__ delta, int n, int heads,
                                                  int hd, float scale_log2) {
    using L = TcBwd<HDP>;
    constexpr int KD = HDP / 16;
    unsigned char *sm = reinterpret_cast<unsigned char *>(attn_smem);
    bf16 *Qs = reinterpret_cast<bf16 *>(sm);
    bf16 *Ks = reinterpret_cast<bf16 *>(sm + L::TILE_H);
    float *Ss = reinterpret_cast<float *>(sm + 2 * L::TILE_H);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int r0 = warp * 16, rr = lane >> 1, half = lane & 1;
    const int q0 = blockIdx.x * TILE;
    const int b = blockIdx.y / heads, h = blockIdx.y % heads;
    const int dim = heads * hd;
    const size_t rs = 3 * (size_t)dim;
    const bf16 *base = qkv + (size_t)b * n * rs + (size_t)h * hd;
    // delta: 2 threads per row.
    {
        const int row = threadIdx.x >> 1, part = threadIdx.x & 1;
        const int i = q0 + row;
        float acc = 0.f;
        if (i < n) {
            const size_t off = ((size_t)b * n + i) * dim + (size_t)h * hd;
            for (int d = part; d < hd; d += 2) acc = fmaf(to_f(dout[off + d]), to_f(o_[off + d]), acc);
        }
        acc += __shfl_xor_sync(0xffffffffu, acc, 1);
        if (part == 0 && i < n) delta[(size_t)blockIdx.y * n + i] = acc;
    }
    tc_load<HDP>(Qs, base, q0, n, rs, hd);
    __syncthreads();
    FragA qa[KD];
#pragma unroll
    for (int kb = 0; kb < KD; ++kb) wm::load_matrix_sync(qa[kb], Qs + r0 * L::LDH + kb * 16, L::LDH);
    float m = -INFINITY, l = 0.f;
    float *Sw = Ss + r0 * L::LDS;
    for (int k0 = 0; k0 < n; k0 += TILE) {
        __syncthreads();
        tc_load<HDP>(Ks, base + dim, k0, n, rs, hd);
        __syncthreads();
        tc_rowtile<HDP>(qa, Ks, Sw);
        __syncwarp();
        float mx = -INFINITY;
        float s[TILE / 2];
#pragma unroll
        for (int c = 0; c < TILE / 2; ++c) {
            const int j = 2 * c + half;
            s[c] = (k0 + j < n) ? Sw[rr * L::LDS + j] * scale_log2 : -INFINITY;
            mx = fmaxf(mx, s[c]);
        }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        const float mnew = fmaxf(m, mx);
        float ps = 0.f;
#pragma unroll
        for (int c = 0; c < TILE / 2; ++c) ps += exp2f(s[c] - mnew);
        l = l * exp2f(m - mnew) + ps;
        m = mnew;
        __syncwarp();
    }
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    const int i = q0 + r0 + rr;
    if (half == 0 && i < n) lse[(size_t)blockIdx.y * n + i] = m + log2f(l);
}

template <int HDP>
__device__ __forceinline__ void attn_bwd_dkdv_tc(const bf16 *__restrict__ qkv,
                                                 const bf16 *__restrict__ dout,
                                                 const float *__restrict__ lse,
                                                 const float *__restrict__ delta,
                                                 bf16 *__restrict__ dqkv, int n, int heads, int hd,
                                                 float scale_log2, float scale) {
    using L = TcBwd<HDP>;
    constexpr int KD = HDP / 16;
    unsigned char *sm = reinterpret_cast<unsigned char *>(attn_smem);
    bf16 *Ks = reinterpret_cast<bf16 *>(sm);
    bf16 *Vs = reinterpret_cast<bf16 *>(sm + L::TILE_H);
    bf16 *Qs = reinterpret_cast<bf16 *>(sm + 2 * L::TILE_H);
    bf16 *dOs = reinterpret_cast<bf16 *>(sm + 3 * L::TILE_H);
    float *Ss = reinterpret_cast<float *>(sm + 4 * L::TILE_H);
    float *Ds = reinterpret_cast<float *>(sm + 4 * L::TILE_H + L::TILE_S);
    bf16 *PT = reinterpret_cast<bf16 *>(sm + 4 * L::TILE_H + 2 * L::TILE_S);
    bf16 *dST = reinterpret_cast<bf16 *>(sm + 4 * L::TILE_H + 2 * L::TILE_S + L::TILE_P);
    float *lse_s = reinterpret_cast<float *>(sm + 4 * L::TILE_H + 2 * L::TILE_S + 2 * L::TILE_P);
    float *del_s = lse_s + TILE;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int r0 = warp * 16, rr = lane >> 1, half = lane & 1;
    const int k0 = blockIdx.x * TILE;
    const int b = blockIdx.y / heads, h = blockIdx.y % heads;
    const int dim = heads * hd;
    const size_t rs = 3 * (size_t)dim;
    const bf16 *base = qkv + (size_t)b * n * rs + (size_t)h * hd;
    const bf16 *dobase = dout + (size_t)b * n * dim + (size_t)h * hd;
    const float *lse_bh = lse + (size_t)blockIdx.y * n;
    const float *del_bh = delta + (size_t)blockIdx.y * n;
    tc_load<HDP>(Ks, base + dim, k0, n, rs, hd);
    tc_load<HDP>(Vs, base + 2 * dim, k0, n, rs, hd);
    __syncthreads();
    FragA ka[KD], va[KD];
#pragma unroll
    for (int kb = 0; kb < KD; ++kb) {
        wm::load_matrix_sync(ka[kb], Ks + r0 * L::LDH + kb * 16, L::LDH);
        wm::load_matrix_sync(va[kb], Vs + r0 * L::LDH + kb * 16, L::LDH);
    }
    FragC dk[KD], dv[KD];
#pragma unroll
    for (int db = 0; db < KD; ++db) {
        wm::fill_fragment(dk[db], 0.f);
        wm::fill_fragment(dv[db], 0.f);
    }
    float *Sw = Ss + r0 * L::LDS;
    float *Dw = Ds + r0 * L::LDS;
    bf16 *PTw = PT + r0 * L::LDP;
    bf16 *dSTw = dST + r0 * L::LDP;
    const bool jv = k0 + r0 + rr < n;
    for (int q0 = 0; q0 < n; q0 += TILE) {
        __syncthreads();
        tc_load<HDP>(Qs, base, q0, n, rs, hd);
        tc_load<HDP>(dOs, dobase, q0, n, (size_t)dim, hd);
        if (threadIdx.x < TILE) {
            const int i = q0 + threadIdx.x;
            lse_s[threadIdx.x] = i < n ? lse_bh[i] : 0.f;
            del_s[threadIdx.x] = i < n ? del_bh[i] : 0.f;
        }
        __syncthreads();
        tc_rowtile<HDP>(ka, Qs, Sw);  // Sᵀ rows: keys; columns: queries
        tc_rowtile<HDP>(va, dOs, Dw); // dPᵀ
        __syncwarp();
#pragma unroll 8
        for (int c = 0; c < TILE / 2; ++c) {
            const int j = 2 * c + half; // query column
            const float p = (jv && q0 + j < n)
                                ? exp2f(Sw[rr * L::LDS + j] * scale_log2 - lse_s[j])
                                : 0.f;
            const float ds = p * (Dw[rr * L::LDS + j] - del_s[j]);
            PTw[rr * L::LDP + j] = __float2bfloat16_rn(p);
            dSTw[rr * L::LDP + j] = __float2bfloat16_rn(ds);
        }
        __syncwarp();
        tc_acc<HDP>(dv, PTw, dOs);
        tc_acc<HDP>(dk, dSTw, Qs);
    }
    bf16 *rowbase = dqkv + (size_t)b * n * rs + (size_t)h * hd;
    tc_store<HDP>(dk, scale, Sw, rowbase + dim, k0 + r0, n, rs, hd);
    tc_store<HDP>(dv, 1.f, Sw, rowbase + 2 * dim, k0 + r0, n, rs, hd);
}

template <int HDP>
__device__ __forceinline__ void attn_bwd_dq_tc(const bf16 *__restrict__ qkv,
                                               const bf16 *__restrict__ dout,
                                               const float *__restrict__ lse,
                                               const float *__restrict__ delta,
                                               bf16 *__restrict__ dqkv, int n, int heads, int hd,
                                               float scale_log2, float scale) {
    using L = TcBwd<HDP>;
    constexpr int KD = HDP / 16;
    unsigned char *sm = reinterpret_cast<unsigned char *>(attn_smem);
    bf16 *Qs = reinterpret_cast<bf16 *>(sm);
    bf16 *dOs = reinterpret_cast<bf16 *>(sm + L::TILE_H);
    bf16 *Ks = reinterpret_cast<bf16 *>(sm + 2 * L::TILE_H);
    bf16 *Vs = reinterpret_cast<bf16 *>(sm + 3 * L::TILE_H);
    float *Ss = reinterpret_cast<float *>(sm + 4 * L::TILE_H);
    float *Ds = reinterpret_cast<float *>(sm + 4 * L::TILE_H + L::TILE_S);
    bf16 *dSs = reinterpret_cast<bf16 *>(sm + 4 * L::TILE_H + 2 * L::TILE_S);
    float *lse_s = reinterpret_cast<float *>(sm + 4 * L::TILE_H + 2 * L::TILE_S + 2 * L::TILE_P);
    float *del_s = lse_s + TILE;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int r0 = warp * 16, rr = lane >> 1, half = lane & 1;
    const int q0 = blockIdx.x * TILE;
    const int b = blockIdx.y / heads, h = blockIdx.y % heads;
    const int dim = heads * hd;
    const size_t rs = 3 * (size_t)dim;
    const bf16 *base = qkv + (size_t)b * n * rs + (size_t)h * hd;
    const bf16 *dobase = dout + (size_t)b * n * dim + (size_t)h * hd;
    tc_load<HDP>(Qs, base, q0, n, rs, hd);
    tc_load<HDP>(dOs, dobase, q0, n, (size_t)dim, hd);
    if (threadIdx.x < TILE) {
        const int i = q0 + threadIdx.x;
        lse_s[threadIdx.x] = i < n ? lse[(size_t)blockIdx.y * n + i] : 0.f;
        del_s[threadIdx.x] = i < n ? delta[(size_t)blockIdx.y * n + i] : 0.f;
    }
    __syncthreads();
    FragA qa[KD], doa[KD];
#pragma unroll
    for (int kb = 0; kb < KD; ++kb) {
        wm::load_matrix_sync(qa[kb], Qs + r0 * L::LDH + kb * 16, L::LDH);
        wm::load_matrix_sync(doa[kb], dOs + r0 * L::LDH + kb * 16, L::LDH);
    }
    FragC dq[KD];
#pragma unroll
    for (int db = 0; db < KD; ++db) wm::fill_fragment(dq[db], 0.f);
    float *Sw = Ss + r0 * L::LDS;
    float *Dw = Ds + r0 * L::LDS;
    bf16 *dSw = dSs + r0 * L::LDP;
    const bool iv = q0 + r0 + rr < n;
    const float lse_r = lse_s[r0 + rr], del_r = del_s[r0 + rr];
    for (int k0 = 0; k0 < n; k0 += TILE) {
        __syncthreads();
        tc_load<HDP>(Ks, base + dim, k0, n, rs, hd);
        tc_load<HDP>(Vs, base + 2 * dim, k0, n, rs, hd);
        __syncthreads();
        tc_rowtile<HDP>(qa, Ks, Sw);
        tc_rowtile<HDP>(doa, Vs, Dw);
        __syncwarp();
#pragma unroll 8
        for (int c = 0; c < TILE / 2; ++c) {
            const int j = 2 * c + half;
            const float p = (iv && k0 + j < n) ? exp2f(Sw[rr * L::LDS + j] * scale_log2 - lse_r) : 0.f;
            dSw[rr * L::LDP + j] = __float2bfloat16_rn(p * (Dw[rr * L::LDS + j] - del_r));
        }
        __syncwarp();
        tc_acc<HDP>(dq, dSw, Ks);
    }
    tc_store<HDP>(dq, scale, Sw, dqkv + (size_t)b * n * rs + (size_t)h * hd, q0 + r0, n, rs, hd);
}

#define INSTANTIATE_TC_BWD(HDP)                                                                    \
    extern "C" __global__ void __launch_bounds__(TC_THREADS) attn_bwd_stats_tc_bf16_##HDP(         \
        const bf16 *qkv, const bf16 *o, const bf16 *dout, float *lse, float *delta, int n,         \
        int heads, int hd, float scale_log2) {                                                     \
        attn_bwd_stats_tc<HDP>(qkv, o, dout, lse, delta, n, heads, hd, scale_log2);                \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(TC_THREADS) attn_bwd_dkdv_tc_bf16_##HDP(          \
        const bf16 *qkv, const bf16 *dout, const float *lse, const float *delta, bf16 *dqkv,       \
        int n, int heads, int hd, float scale_log2, float scale) {                                 \
        attn_bwd_dkdv_tc<HDP>(qkv, dout, lse, delta, dqkv, n, heads, hd, scale_log2, scale);       \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(TC_THREADS) attn_bwd_dq_tc_bf16_##HDP(            \
        const bf16 *qkv, const bf16 *dout, const float *lse, const float *delta, bf16 *dqkv,       \
        int n, int heads, int hd, float scale_log2, float scale) {                                 \
        attn_bwd_dq_tc<HDP>(qkv, dout, lse, delta, dqkv, n, heads, hd, scale_log2, scale);         \
    }

INSTANTIATE_TC_BWD(16)
INSTANTIATE_TC_BWD(32)
INSTANTIATE_TC_BWD(48)
INSTANTIATE_TC_BWD(64)
INSTANTIATE_TC_BWD(80)
INSTANTIATE_TC_BWD(96)
INSTANTIATE_TC_BWD(112)
INSTANTIATE_TC_BWD(128)
