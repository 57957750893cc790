//! Deterministic reductions: the column sum behind every bias gradient and the sum of squares
//! behind the gradient norms. Partials over fixed chunks, combined in chunk order.

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, D, Layout, Shape, Tensor, WithDType,
};

use super::math::{Elem, LANES, fold_lanes, multiversion};
use super::{FLAT_CHUNK, check_same, contiguous, par, rows_per_task, unsupported};
use crate::ModelError;

/// Sum over all leading dimensions: `[.., C]` → `[C]`.
pub fn column_sum(x: &Tensor) -> Result<Tensor, ModelError> {
    if let Some(r) = super::widen_cpu_bf16(&[x], |t| column_sum(&t[0])) {
        return r;
    }
    check_same("column_sum", &[x])?;
    match x.dims().last() {
        Some(&c) if c > 0 => Ok(x.contiguous()?.apply_op1(ColumnSum)?),
        _ => Err(ModelError::Input(format!(
            "column_sum: needs a non-empty last dimension, got {:?}",
            x.dims()
        ))),
    }
}

/// Σ x² over all elements, as a 0-d tensor of x's dtype (accumulated in f64 across chunks).
pub fn sum_sq(x: &Tensor) -> Result<Tensor, ModelError> {
    if let Some(r) = super::widen_cpu_bf16(&[x], |t| sum_sq(&t[0])) {
        return r;
    }
    check_same("sum_sq", &[x])?;
    Ok(x.contiguous()?.apply_op1(SumSq)?)
}

/// mean |a − b| over all elements, as a 0-d tensor of their dtype: the L1 loss of one mask
/// (spec §6), in one pass over each operand (accumulated in f64 across chunks on the CPU, fp32
/// on a GPU), instead of candle's `(a - b).abs().mean_all()`, which makes two full-size
/// temporaries and, on a GPU, sums them in one block. Differentiable in both (d/da =
/// sign(a − b)/n, with torch's sign(0) = 0).
pub fn l1_mean(a: &Tensor, b: &Tensor) -> Result<Tensor, ModelError> {
    if let Some(r) = super::widen_cpu_bf16(&[a, b], |t| l1_mean(&t[0], &t[1])) {
        return r;
    }
    check_same("l1_mean", &[a, b])?;
    if a.dims() != b.dims() || a.elem_count() == 0 {
        return Err(ModelError::Input(format!(
            "l1_mean: operands {:?} and {:?} (same non-empty shape needed)",
            a.dims(),
            b.dims()
        )));
    }
    Ok(a.contiguous()?.apply_op2(&b.contiguous()?, L1Mean)?)
}

/// Forward op: (a, b) → mean |a − b| (0-d).
#[derive(Clone, Copy, Debug)]
pub struct L1Mean;

/// Backward op of [`L1Mean`]: (a, b, g) → sign(a − b) · g / n, shaped as a.
#[derive(Clone, Copy, Debug)]
pub struct L1MeanBackward;

/// Forward op: `[.., C]` → `[C]`.
#[derive(Clone, Copy, Debug)]
pub struct ColumnSum;

/// Forward op: x → Σ x² (0-d).
#[derive(Clone, Copy, Debug)]
pub struct SumSq;

multiversion! {
    /// acc += each `c`-wide row of x.
    fn add_rows_into<T: Elem>(x: &[T], acc: &mut [T], c: usize) {
        for row in x.chunks_exact(c) {
            for (a, &v) in acc.iter_mut().zip(row) {
                *a += v;
            }
        }
    }
}

multiversion! {
    /// Σ x² in a fixed lane order.
    fn sum_squares<T: Elem>(x: &[T]) -> T {
        let mut acc = [T::ZERO; LANES];
        let mut chunks = x.chunks_exact(LANES);
        for ch in &mut chunks {
            for i in 0..LANES {
                acc[i] += ch[i] * ch[i];
            }
        }
        for (a, &v) in acc.iter_mut().zip(chunks.remainder()) {
            *a += v * v;
        }
        fold_lanes(acc, |a, b| a + b)
    }
}

multiversion! {
    /// Σ |a − b| in a fixed lane order.
    fn sum_abs_diff<T: Elem>(a: &[T], b: &[T]) -> T {
        let mut acc = [T::ZERO; LANES];
        let mut ca = a.chunks_exact(LANES);
        let mut cb = b.chunks_exact(LANES);
        for (xa, xb) in (&mut ca).zip(&mut cb) {
            for i in 0..LANES {
                let d = xa[i] - xb[i];
                acc[i] += if d < T::ZERO { T::ZERO - d } else { d };
            }
        }
        for ((a, &x), &y) in acc.iter_mut().zip(ca.remainder()).zip(cb.remainder()) {
            let d = x - y;
            *a += if d < T::ZERO { T::ZERO - d } else { d };
        }
        fold_lanes(acc, |a, b| a + b)
    }
}

/// Σ over `0..n` of `part(range)`, the ranges `FLAT_CHUNK`-long pieces run in parallel and
/// their f64 results added in order (the same sum for any thread count).
fn chunked_sum(n: usize, part: impl Fn(std::ops::Range<usize>) -> f64 + Sync) -> f64 {
    par::map(n.div_ceil(FLAT_CHUNK), |i| {
        part(i * FLAT_CHUNK..(i * FLAT_CHUNK + FLAT_CHUNK).min(n))
    })
    .iter()
    .sum()
}

fn l1_mean_slice<T: Elem>(a: &[T], b: &[T]) -> T {
    let n = a.len();
    T::from_f64(chunked_sum(n, |r| sum_abs_diff(&a[r.clone()], &b[r]).to_f64()) / n as f64)
}

/// sign(a − b) · s per element (sign(0) = 0; NaN stays NaN).
fn l1_grad_slice<T: Elem>(a: &[T], b: &[T], s: T) -> Vec<T> {
    let mut out = vec![T::ZERO; a.len()];
    par::chunks_mut(&mut out, FLAT_CHUNK, |i, piece| {
        let at = i * FLAT_CHUNK;
        for (j, o) in piece.iter_mut().enumerate() {
            let d = a[at + j] - b[at + j];
            *o = if d > T::ZERO {
                s
            } else if d < T::ZERO {
                T::ZERO - s
            } else if d == T::ZERO {
                T::ZERO
            } else {
                d
            };
        }
    });
    out
}

/// Column sums of a contiguous `[rows, c]` slice.
pub(crate) fn column_sum_slice<T: Elem>(x: &[T], c: usize) -> Vec<T> {
    let chunk = rows_per_task(c) * c;
    let partials = par::map(x.len().div_ceil(chunk), |i| {
        let mut part = vec![T::ZERO; c];
        add_rows_into(
            &x[i * chunk..(i * chunk + chunk).min(x.len())],
            &mut part,
            c,
        );
        part
    });
    let mut out = vec![T::ZERO; c];
    for part in &partials {
        for (o, &p) in out.iter_mut().zip(part) {
            *o += p;
        }
    }
    out
}

fn sum_sq_slice<T: Elem>(x: &[T]) -> T {
    T::from_f64(chunked_sum(x.len(), |r| sum_squares(&x[r]).to_f64()))
}

impl CustomOp1 for ColumnSum {
    fn name(&self) -> &'static str {
        "vjepa-column-sum"
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::column_sum(s, l)
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let name = self.name();
        let c = match l.dims().last() {
            Some(&c) if c > 0 => c,
            _ => candle_core::bail!(
                "{name}: needs a non-empty last dimension, got {:?}",
                l.dims()
            ),
        };
        let out = match s {
            CpuStorage::F32(_) => {
                f32::to_cpu_storage_owned(column_sum_slice::<f32>(contiguous(name, s, l)?, c))
            }
            CpuStorage::F64(_) => {
                f64::to_cpu_storage_owned(column_sum_slice::<f64>(contiguous(name, s, l)?, c))
            }
            _ => return Err(unsupported(name, s)),
        };
        Ok((out, Shape::from(c)))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let c = x.dim(D::Minus1)?;
        Ok(Some(
            grad.reshape(c)?.broadcast_as(x.shape())?.contiguous()?,
        ))
    }
}

impl CustomOp2 for L1Mean {
    fn name(&self) -> &'static str {
        "vjepa-l1-mean"
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::l1_mean(s1, l1, s2, l2)
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let name = self.name();
        if l1.shape().elem_count() != l2.shape().elem_count() || l1.shape().elem_count() == 0 {
            candle_core::bail!("{name}: operands {:?} and {:?}", l1.dims(), l2.dims());
        }
        let out = match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => {
                f32::to_cpu_storage_owned(vec![l1_mean_slice::<f32>(
                    contiguous(name, s1, l1)?,
                    contiguous(name, s2, l2)?,
                )])
            }
            (CpuStorage::F64(_), CpuStorage::F64(_)) => {
                f64::to_cpu_storage_owned(vec![l1_mean_slice::<f64>(
                    contiguous(name, s1, l1)?,
                    contiguous(name, s2, l2)?,
                )])
            }
            _ => return Err(unsupported(name, s1)),
        };
        Ok((out, Shape::from(())))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let da = a.apply_op3_no_bwd(b, &grad.contiguous()?, &L1MeanBackward)?;
        let db = if b.track_op() { Some(da.neg()?) } else { None };
        Ok((Some(da), db))
    }
}

impl CustomOp3 for L1MeanBackward {
    fn name(&self) -> &'static str {
        "vjepa-l1-mean-backward"
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::l1_mean_grad(s1, l1, s2, l2, s3, l3)
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let name = self.name();
        let n = l1.shape().elem_count();
        if l2.shape().elem_count() != n || l3.shape().elem_count() != 1 || n == 0 {
            candle_core::bail!(
                "{name}: operands {:?}, {:?} and gradient {:?}",
                l1.dims(),
                l2.dims(),
                l3.dims()
            );
        }
        fn run<T: Elem>(
            name: &str,
            (s1, l1): (&CpuStorage, &Layout),
            (s2, l2): (&CpuStorage, &Layout),
            (s3, l3): (&CpuStorage, &Layout),
        ) -> candle_core::Result<CpuStorage> {
            let (a, b, g) = (
                contiguous::<T>(name, s1, l1)?,
                contiguous::<T>(name, s2, l2)?,
                contiguous::<T>(name, s3, l3)?,
            );
            let s = T::from_f64(g[0].to_f64() / a.len() as f64);
            Ok(T::to_cpu_storage_owned(l1_grad_slice(a, b, s)))
        }
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(_), CpuStorage::F32(_), CpuStorage::F32(_)) => {
                run::<f32>(name, (s1, l1), (s2, l2), (s3, l3))?
            }
            (CpuStorage::F64(_), CpuStorage::F64(_), CpuStorage::F64(_)) => {
                run::<f64>(name, (s1, l1), (s2, l2), (s3, l3))?
            }
            _ => return Err(unsupported(name, s1)),
        };
        Ok((out, l1.shape().clone()))
    }
}

impl CustomOp1 for SumSq {
    fn name(&self) -> &'static str {
        "vjepa-sum-sq"
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::sum_sq(s, l)
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let name = self.name();
        let out = match s {
            CpuStorage::F32(_) => {
                f32::to_cpu_storage_owned(vec![sum_sq_slice::<f32>(contiguous(name, s, l)?)])
            }
            CpuStorage::F64(_) => {
                f64::to_cpu_storage_owned(vec![sum_sq_slice::<f64>(contiguous(name, s, l)?)])
            }
            _ => return Err(unsupported(name, s)),
        };
        Ok((out, Shape::from(())))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some((x.broadcast_mul(grad)? * 2.0)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::reference::{self, assert_close, randn};
    use candle_core::{DType, Device, Var};

    #[test]
    fn l1_mean_matches_candle_and_its_gradients() {
        for (i, shape) in [&[1usize][..], &[2, 95, 96], &[3, 40_000], &[7, 5]]
            .iter()
            .enumerate()
        {
            for dtype in [DType::F32, DType::F64] {
                let a = Var::from_tensor(&randn(shape, dtype, 2 * i as u64)).unwrap();
                let b = Var::from_tensor(&randn(shape, dtype, 2 * i as u64 + 1)).unwrap();
                let ours = l1_mean(&a, &b).unwrap();
                assert!(ours.dims().is_empty());
                let want = (a.as_tensor() - b.as_tensor())
                    .unwrap()
                    .abs()
                    .unwrap()
                    .mean_all()
                    .unwrap();
                assert_close(&ours, &want, 1e-6, &format!("{shape:?} {dtype:?}"));
                // Gradients of 3·loss: ±3/n per element, with opposite signs for a and b.
                let grads = (ours * 3.0).unwrap().backward().unwrap();
                let want = (a.as_tensor() - b.as_tensor())
                    .unwrap()
                    .sign()
                    .unwrap()
                    .affine(3.0 / a.elem_count() as f64, 0.0)
                    .unwrap();
                assert_close(grads.get(&a).unwrap(), &want, 1e-12, "d/da");
                assert_close(grads.get(&b).unwrap(), &want.neg().unwrap(), 1e-12, "d/db");
            }
        }
        // torch's sign(0) = 0; a detached second operand gets no gradient; shapes must agree.
        let a =
            Var::from_tensor(&Tensor::new(&[1f32, 2.0, 3.0, 4.0], &Device::Cpu).unwrap()).unwrap();
        let b = Tensor::new(&[1f32, 0.0, 5.0, 4.0], &Device::Cpu).unwrap();
        let loss = l1_mean(&a, &b).unwrap();
        assert_eq!(loss.to_scalar::<f32>().unwrap(), 1.0);
        let grads = loss.backward().unwrap();
        let g = grads.get(&a).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(g, [0.0, 0.25, -0.25, 0.0]);
        assert!(grads.get(&b).is_none());
        assert!(l1_mean(&a, &b.narrow(0, 0, 2).unwrap()).is_err());
        // CPU bf16: computed in f32, narrowed.
        let (ab, bb) = (
            a.as_tensor().to_dtype(DType::BF16).unwrap(),
            b.to_dtype(DType::BF16).unwrap(),
        );
        let lb = l1_mean(&ab, &bb).unwrap();
        assert_eq!(lb.dtype(), DType::BF16);
        assert_eq!(
            lb.to_dtype(DType::F32).unwrap().to_scalar::<f32>().unwrap(),
            1.0
        );
    }

    #[test]
    fn column_sum_matches_reference_and_grads() {
        for (i, shape) in [
            &[1usize, 1, 3][..],
            &[2, 95, 96],
            &[4, 357, 48],
            &[5000, 3],
            &[7],
        ]
        .iter()
        .enumerate()
        {
            let x = Var::from_tensor(&randn(shape, DType::F32, i as u64)).unwrap();
            let ours = column_sum(&x).unwrap();
            assert_close(
                &ours,
                &reference::column_sum(&x).unwrap(),
                1e-6,
                &format!("{shape:?}"),
            );
            let c = *shape.last().unwrap();
            let g = randn(&[c], DType::F32, 99);
            let grads = (ours * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let want = g.broadcast_as(x.shape()).unwrap();
            assert_close(grads.get(&x).unwrap(), &want, 0.0, "column_sum grad");
        }
    }

    #[test]
    fn sum_sq_matches_naive_and_grads() {
        let x = Var::from_tensor(&randn(&[3, 40_000], DType::F32, 7)).unwrap();
        let got = sum_sq(&x).unwrap();
        assert_eq!(got.dims(), &[] as &[usize]);
        let want: f64 = x
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|&v| (v as f64) * (v as f64))
            .sum();
        let got_v = got.to_scalar::<f32>().unwrap() as f64;
        assert!((got_v - want).abs() < 1e-5 * want, "{got_v} vs {want}");
        let grads = (got * 3.0).unwrap().backward().unwrap();
        assert_close(
            grads.get(&x).unwrap(),
            &(x.as_tensor() * 6.0).unwrap(),
            1e-7,
            "sum_sq grad",
        );
    }

    #[test]
    fn parallel_equals_serial_bit_for_bit() {
        let x = randn(&[3000, 97], DType::F32, 8);
        let run = || {
            let cs = column_sum(&x).unwrap().to_vec1::<f32>().unwrap();
            let sq = sum_sq(&x).unwrap().to_scalar::<f32>().unwrap();
            (
                cs.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                sq.to_bits(),
            )
        };
        assert_eq!(run(), par::serial(run));
    }
}
