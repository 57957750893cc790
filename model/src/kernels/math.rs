//! Scalar building blocks shared by the kernels: the element trait (f32 fast paths, f64 exact),
//! fixed-order lane reductions that vectorise, CPU-feature dispatch and a strided GEMM helper.

use candle_core::{CpuStorage, WithDType};

/// Accumulator lanes of the row reductions. Partial sums live in `LANES` independent slots that
/// the compiler maps to SIMD registers; they are combined in a fixed tree order, so the result
/// does not depend on the instruction set the dispatcher picked.
pub(crate) const LANES: usize = 16;

/// A float type the kernels run on. f32 uses polynomial `exp`/`erfc` that vectorise (≤ 2e-7
/// relative error); f64 uses the exact library functions (finite-difference tests).
pub(crate) trait Elem: WithDType + Default {
    const ZERO: Self;
    const ONE: Self;
    const NEG_INFINITY: Self;

    /// e^x.
    fn exp_(self) -> Self;
    /// √x.
    fn sqrt_(self) -> Self;
    /// Φ(x), the standard normal CDF, without cancellation for x ≪ 0.
    fn normal_cdf(self) -> Self;
    /// The element slice of a storage of this dtype.
    fn storage_mut(s: &mut CpuStorage) -> Option<&mut Vec<Self>>;

    /// Exact GELU x·Φ(x) (torch `nn.GELU()` default).
    #[inline(always)]
    fn gelu(self) -> Self {
        self * self.normal_cdf()
    }

    /// d/dx x·Φ(x) = Φ(x) + x·φ(x).
    #[inline(always)]
    fn gelu_grad(self) -> Self {
        let inv_sqrt_2pi = Self::from_f64(0.398_942_280_401_432_7);
        let half = Self::from_f64(0.5);
        let pdf = (Self::ZERO - half * self * self).exp_() * inv_sqrt_2pi;
        self.normal_cdf() + self * pdf
    }
}

/// 1.5·2²³: adding it rounds an f32 of magnitude < 2²² to the nearest integer (SSE2-friendly).
const ROUND_MAGIC: f32 = 12_582_912.0;

/// e^x for f32: 2ⁿ·e^r with n = round(x·log₂e), |r| ≤ ln2/2, Cephes' degree-6 polynomial
/// (≈1 ulp). Inputs are clamped to [-87, 88] (e^-87 ≈ 1.6e-38 stands in for smaller results),
/// which keeps it branch-free so loops over it vectorise.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    let x = if x < -87.0 { -87.0 } else { x };
    let x = if x > 88.0 { 88.0 } else { x };
    let t = x * std::f32::consts::LOG2_E + ROUND_MAGIC;
    let n = t - ROUND_MAGIC;
    let ni = (t.to_bits() as i32).wrapping_sub(ROUND_MAGIC.to_bits() as i32);
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    let scale = f32::from_bits(((ni + 127) as u32) << 23);
    y * scale
}

/// Φ(x) for f32 via erfc(z), z = |x|/√2 (Numerical Recipes' Chebyshev fit, relative error
/// < 1.2e-7 for every z ≥ 0): Φ = erfc(z)/2 for x < 0 and 1 − erfc(z)/2 otherwise.
#[inline(always)]
fn normal_cdf_f32(x: f32) -> f32 {
    let z = if x < 0.0 { -x } else { x } * std::f32::consts::FRAC_1_SQRT_2;
    let t = 1.0 / (1.0 + 0.5 * z);
    let mut p = 0.170_872_77f32;
    p = p * t - 0.822_152_23;
    p = p * t + 1.488_515_9;
    p = p * t - 1.135_204;
    p = p * t + 0.278_868_07;
    p = p * t - 0.186_288_06;
    p = p * t + 0.096_784_18;
    p = p * t + 0.374_091_96;
    p = p * t + 1.000_023_7;
    p = p * t - 1.265_512_2;
    let half_erfc = 0.5 * t * exp_f32(p - z * z);
    if x < 0.0 { half_erfc } else { 1.0 - half_erfc }
}

impl Elem for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const NEG_INFINITY: Self = f32::NEG_INFINITY;

    #[inline(always)]
    fn exp_(self) -> Self {
        exp_f32(self)
    }
    #[inline(always)]
    fn sqrt_(self) -> Self {
        self.sqrt()
    }
    #[inline(always)]
    fn normal_cdf(self) -> Self {
        normal_cdf_f32(self)
    }
    fn storage_mut(s: &mut CpuStorage) -> Option<&mut Vec<Self>> {
        match s {
            CpuStorage::F32(v) => Some(v),
            _ => None,
        }
    }
}

impl Elem for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const NEG_INFINITY: Self = f64::NEG_INFINITY;

    #[inline(always)]
    fn exp_(self) -> Self {
        self.exp()
    }
    #[inline(always)]
    fn sqrt_(self) -> Self {
        self.sqrt()
    }
    #[inline(always)]
    fn normal_cdf(self) -> Self {
        0.5 * candle_core::cpu::erf::erfc_f64(-self * std::f64::consts::FRAC_1_SQRT_2)
    }
    fn storage_mut(s: &mut CpuStorage) -> Option<&mut Vec<Self>> {
        match s {
            CpuStorage::F64(v) => Some(v),
            _ => None,
        }
    }
}

/// Combines the lanes pairwise in a fixed order.
#[inline(always)]
pub(crate) fn fold_lanes<T: Elem>(mut acc: [T; LANES], op: impl Fn(T, T) -> T) -> T {
    let mut w = LANES / 2;
    while w > 0 {
        for i in 0..w {
            acc[i] = op(acc[i], acc[i + w]);
        }
        w /= 2;
    }
    acc[0]
}

/// Σ xs in a fixed lane order.
#[inline(always)]
pub(crate) fn sum<T: Elem>(xs: &[T]) -> T {
    let mut acc = [T::ZERO; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            acc[i] += c[i];
        }
    }
    for (a, &x) in acc.iter_mut().zip(chunks.remainder()) {
        *a += x;
    }
    fold_lanes(acc, |a, b| a + b)
}

/// Σ aᵢ·bᵢ in a fixed lane order.
#[inline(always)]
pub(crate) fn dot<T: Elem>(a: &[T], b: &[T]) -> T {
    let mut acc = [T::ZERO; LANES];
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut ca = a.chunks_exact(LANES);
    let mut cb = b.chunks_exact(LANES);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    for ((acc, &x), &y) in acc.iter_mut().zip(ca.remainder()).zip(cb.remainder()) {
        *acc += x * y;
    }
    fold_lanes(acc, |a, b| a + b)
}

/// Σ aᵢ·bᵢ·cᵢ in a fixed lane order.
#[inline(always)]
pub(crate) fn dot3<T: Elem>(a: &[T], b: &[T], c: &[T]) -> T {
    let mut acc = [T::ZERO; LANES];
    let n = a.len().min(b.len()).min(c.len());
    let (a, b, c) = (&a[..n], &b[..n], &c[..n]);
    let mut ca = a.chunks_exact(LANES);
    let mut cb = b.chunks_exact(LANES);
    let mut cc = c.chunks_exact(LANES);
    for ((x, y), z) in (&mut ca).zip(&mut cb).zip(&mut cc) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i] * z[i];
        }
    }
    let rest = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .zip(cc.remainder());
    for (acc, ((&x, &y), &z)) in acc.iter_mut().zip(rest) {
        *acc += x * y * z;
    }
    fold_lanes(acc, |a, b| a + b)
}

/// Σ (xᵢ − c)² in a fixed lane order.
#[inline(always)]
pub(crate) fn sum_sq_dev<T: Elem>(xs: &[T], c: T) -> T {
    let mut acc = [T::ZERO; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for ch in &mut chunks {
        for i in 0..LANES {
            let d = ch[i] - c;
            acc[i] += d * d;
        }
    }
    for (a, &x) in acc.iter_mut().zip(chunks.remainder()) {
        let d = x - c;
        *a += d * d;
    }
    fold_lanes(acc, |a, b| a + b)
}

/// max xs (−∞ for an empty slice).
#[inline(always)]
pub(crate) fn max<T: Elem>(xs: &[T]) -> T {
    let mut acc = [T::NEG_INFINITY; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    let pick = |a: T, b: T| if b > a { b } else { a };
    for c in &mut chunks {
        for i in 0..LANES {
            acc[i] = pick(acc[i], c[i]);
        }
    }
    for (a, &x) in acc.iter_mut().zip(chunks.remainder()) {
        *a = pick(*a, x);
    }
    fold_lanes(acc, pick)
}

/// In-place softmax of one row: exp(x − max) / Σ.
#[inline(always)]
pub(crate) fn softmax_row<T: Elem>(row: &mut [T]) {
    let m = max(row);
    let mut acc = [T::ZERO; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            let e = (c[i] - m).exp_();
            c[i] = e;
            acc[i] += e;
        }
    }
    for (a, x) in acc.iter_mut().zip(chunks.into_remainder()) {
        let e = (*x - m).exp_();
        *x = e;
        *a += e;
    }
    let inv = T::ONE / fold_lanes(acc, |a, b| a + b);
    for x in row.iter_mut() {
        *x *= inv;
    }
}

/// Tests cap the instruction set here (0 baseline, 1 AVX2, 2 AVX-512) to compare the versions.
#[cfg(test)]
pub(crate) static SIMD_CAP: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(2);

#[cfg(test)]
fn simd_allowed(level: u8) -> bool {
    SIMD_CAP.load(std::sync::atomic::Ordering::Relaxed) >= level
}

#[cfg(not(test))]
#[inline(always)]
fn simd_allowed(_: u8) -> bool {
    true
}

/// Whether the AVX-512 versions of the kernels can run (checked once, cached by std).
#[cfg(target_arch = "x86_64")]
#[inline]
pub(crate) fn has_avx512() -> bool {
    simd_allowed(2) && std::arch::is_x86_feature_detected!("avx512f")
}

/// Whether the AVX2 versions of the kernels can run.
#[cfg(target_arch = "x86_64")]
#[inline]
pub(crate) fn has_avx2() -> bool {
    simd_allowed(1) && std::arch::is_x86_feature_detected!("avx2")
}

/// Defines `fn name<T: Elem>(…)` three times — baseline, AVX2 and AVX-512 (`#[target_feature]`,
/// the widest the CPU has chosen at run time) — from one body. The body never uses `mul_add` and
/// fixes every summation order, so all versions return identical bits; the features only widen
/// the vectors.
macro_rules! multiversion {
    (
        $(#[$m:meta])*
        $vis:vis fn $name:ident<T: Elem>($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block
    ) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name<T: $crate::kernels::math::Elem>($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn body<T: $crate::kernels::math::Elem>($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                #[allow(clippy::too_many_arguments)]
                fn avx512<T: $crate::kernels::math::Elem>($($arg: $ty),*) $(-> $ret)? {
                    body::<T>($($arg),*)
                }
                #[target_feature(enable = "avx2")]
                #[allow(clippy::too_many_arguments)]
                fn avx2<T: $crate::kernels::math::Elem>($($arg: $ty),*) $(-> $ret)? {
                    body::<T>($($arg),*)
                }
                if $crate::kernels::math::has_avx512() {
                    // SAFETY: the CPU supports AVX-512F (checked at run time just above).
                    return unsafe { avx512::<T>($($arg),*) };
                }
                if $crate::kernels::math::has_avx2() {
                    // SAFETY: the CPU supports AVX2 (checked at run time just above).
                    return unsafe { avx2::<T>($($arg),*) };
                }
            }
            body::<T>($($arg),*)
        }
    };
}
pub(crate) use multiversion;

/// A strided matrix operand: element (i, j) at `ptr + i·rs + j·cs`.
#[derive(Clone, Copy)]
pub(crate) struct Mat<T> {
    pub ptr: *const T,
    pub rs: isize,
    pub cs: isize,
}

/// dst (m×n, row stride `dst_rs`, unit column stride) = scale · lhs (m×k) · rhs (k×n), added
/// to dst's values when `accumulate`, else overwriting them; single-threaded (callers
/// parallelise over independent units).
///
/// # Safety
/// Every addressed element of `lhs`, `rhs` and `dst` must be in bounds; `dst` must not overlap
/// the operands nor be written concurrently by another task.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm<T: Elem>(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut T,
    dst_rs: isize,
    lhs: Mat<T>,
    rhs: Mat<T>,
    scale: T,
    accumulate: bool,
) {
    // SAFETY: forwarded to the caller; T is f32 or f64, which gemm implements.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs,
            accumulate,
            lhs.ptr,
            lhs.cs,
            lhs.rs,
            rhs.ptr,
            rhs.cs,
            rhs.rs,
            if accumulate { T::ONE } else { T::ZERO },
            scale,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_f32_is_accurate() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = exp_f32(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(exp_f32(0.0), 1.0);
        assert!(exp_f32(-1e4) < 2e-38 && exp_f32(-1e4) >= 0.0);
    }

    #[test]
    fn normal_cdf_f32_is_accurate() {
        let mut worst_abs = 0f64;
        let mut worst_rel_tail = 0f64;
        let mut x = -12.0f32;
        while x < 12.0 {
            let want = 0.5 * candle_core::cpu::erf::erfc_f64(-(x as f64) / 2f64.sqrt());
            let got = normal_cdf_f32(x) as f64;
            worst_abs = worst_abs.max((got - want).abs());
            if x < 0.0 {
                worst_rel_tail = worst_rel_tail.max(((got - want) / want).abs());
            }
            x += 0.00731;
        }
        assert!(worst_abs < 2e-7, "worst abs error {worst_abs}");
        // No cancellation in the lower tail (1 + erf would lose everything below x ≈ -5.5):
        // the error left is f32 rounding of the exponent −z², growing to ≈1.5e-5 at x = −12.
        assert!(
            worst_rel_tail < 3e-5,
            "worst tail relative error {worst_rel_tail}"
        );
    }

    #[test]
    fn reductions_match_naive() {
        let xs: Vec<f64> = (0..37).map(|i| (i as f64 * 0.37).sin()).collect();
        let ys: Vec<f64> = (0..37).map(|i| (i as f64 * 0.11).cos()).collect();
        let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
        assert!(close(sum(&xs), xs.iter().sum()));
        assert!(close(
            dot(&xs, &ys),
            xs.iter().zip(&ys).map(|(a, b)| a * b).sum()
        ));
        let c = 0.3;
        assert!(close(
            sum_sq_dev(&xs, c),
            xs.iter().map(|x| (x - c) * (x - c)).sum()
        ));
        assert_eq!(max(&xs), xs.iter().cloned().fold(f64::MIN, f64::max));
        assert_eq!(max::<f64>(&[]), f64::NEG_INFINITY);
        let mut row = xs.clone();
        softmax_row(&mut row);
        let z: f64 = xs.iter().map(|x| x.exp()).sum();
        for (p, x) in row.iter().zip(&xs) {
            assert!(close(*p, x.exp() / z));
        }
    }
}
