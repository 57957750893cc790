//! Deterministic reductions: the column sum behind every bias gradient and the sum of squares
//! behind the gradient norms. Partials over fixed chunks, combined in chunk order.

use candle_core::{CpuStorage, CustomOp1, D, Layout, Shape, Tensor, WithDType};

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
    let partials = par::map(x.len().div_ceil(FLAT_CHUNK), |i| {
        sum_squares(&x[i * FLAT_CHUNK..(i * FLAT_CHUNK + FLAT_CHUNK).min(x.len())]).to_f64()
    });
    T::from_f64(partials.iter().sum())
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
    use candle_core::{DType, Var};

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
