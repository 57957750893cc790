//! Linear biases: `x + b` and the fused `gelu_erf(x + b)` of the MLP's first layer, whose
//! backward returns dx and the bias gradient (a column sum) from one pass.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, D, Layout, Shape, Tensor, WithDType};

use super::math::{Elem, multiversion};
use super::reduce::ColumnSum;
use super::{check_same, contiguous, par, rows_per_task, unsupported};
use crate::ModelError;

/// `x + b` over the last dimension (x `[.., C]`, b `[C]`); backward dx = dy, db = column_sum(dy).
pub fn bias_add(x: &Tensor, b: &Tensor) -> Result<Tensor, ModelError> {
    if let Some(r) = super::widen_cpu_bf16(&[x, b], |t| bias_add(&t[0], &t[1])) {
        return r;
    }
    check_bias("bias_add", x, b)?;
    Ok(x.contiguous()?.apply_op2(&b.contiguous()?, BiasAdd)?)
}

/// Exact GELU of `x + b` (the MLP's fc1 bias and activation in one pass).
pub fn bias_gelu(x: &Tensor, b: &Tensor) -> Result<Tensor, ModelError> {
    if let Some(r) = super::widen_cpu_bf16(&[x, b], |t| bias_gelu(&t[0], &t[1])) {
        return r;
    }
    check_bias("bias_gelu", x, b)?;
    Ok(x.contiguous()?.apply_op2(&b.contiguous()?, BiasGelu)?)
}

fn check_bias(op: &str, x: &Tensor, b: &Tensor) -> Result<(), ModelError> {
    check_same(op, &[x, b])?;
    match x.dims().last() {
        Some(&c) if c > 0 && b.dims() == [c] => Ok(()),
        _ => Err(ModelError::Input(format!(
            "{op}: bias {:?} for input {:?}",
            b.dims(),
            x.dims()
        ))),
    }
}

/// Row width after checking the bias layout against it.
fn bias_cols(op: &str, lx: &Layout, lb: &Layout) -> candle_core::Result<usize> {
    match lx.dims().last() {
        Some(&c) if c > 0 && lb.dims() == [c] => Ok(c),
        _ => candle_core::bail!("{op}: bias {:?} for input {:?}", lb.dims(), lx.dims()),
    }
}

/// Forward op: (x, b) → x + b.
#[derive(Clone, Copy, Debug)]
pub struct BiasAdd;

/// Forward op: (x, b) → gelu_erf(x + b).
#[derive(Clone, Copy, Debug)]
pub struct BiasGelu;

/// Backward op of [`BiasGelu`]: (x, b, dy) → packed `[rows + 1, C]`: dx = dy·gelu'(x + b), then
/// the bias gradient Σ_rows dx.
#[derive(Clone, Copy, Debug)]
pub struct BiasGeluBackward;

multiversion! {
    /// y = x + b for each `c`-wide row.
    fn add_rows<T: Elem>(x: &[T], b: &[T], y: &mut [T], c: usize) {
        for (xr, yr) in x.chunks_exact(c).zip(y.chunks_exact_mut(c)) {
            for ((y, &x), &b) in yr.iter_mut().zip(xr).zip(b) {
                *y = x + b;
            }
        }
    }
}

multiversion! {
    /// y = gelu(x + b) for each `c`-wide row.
    fn gelu_rows<T: Elem>(x: &[T], b: &[T], y: &mut [T], c: usize) {
        for (xr, yr) in x.chunks_exact(c).zip(y.chunks_exact_mut(c)) {
            for ((y, &x), &b) in yr.iter_mut().zip(xr).zip(b) {
                *y = (x + b).gelu();
            }
        }
    }
}

multiversion! {
    /// dx = dy·gelu'(x + b) per row, accumulating Σ dx over the rows into `db`.
    fn gelu_grad_rows<T: Elem>(x: &[T], b: &[T], dy: &[T], dx: &mut [T], c: usize, db: &mut [T]) {
        let rows = x.chunks_exact(c).zip(dy.chunks_exact(c));
        for ((xr, gr), dxr) in rows.zip(dx.chunks_exact_mut(c)) {
            let cols = dxr.iter_mut().zip(xr).zip(b).zip(gr);
            for ((((d, &x), &b), &g), s) in cols.zip(db.iter_mut()) {
                let v = g * (x + b).gelu_grad();
                *d = v;
                *s += v;
            }
        }
    }
}

/// Applies a row kernel `f(x_rows, b, y_rows, c)` over fixed row chunks in parallel.
fn map_rows<T: Elem>(x: &[T], b: &[T], c: usize, f: fn(&[T], &[T], &mut [T], usize)) -> Vec<T> {
    let mut y = vec![T::ZERO; x.len()];
    let chunk = rows_per_task(c) * c;
    par::chunks_mut(&mut y, chunk, |i, yc| {
        f(&x[i * chunk..i * chunk + yc.len()], b, yc, c)
    });
    y
}

/// Runs a (x, b) row kernel for the storage's dtype.
fn run2(
    op: &str,
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
    f32_kernel: fn(&[f32], &[f32], &mut [f32], usize),
    f64_kernel: fn(&[f64], &[f64], &mut [f64], usize),
) -> candle_core::Result<(CpuStorage, Shape)> {
    let c = bias_cols(op, l1, l2)?;
    let out = match s1 {
        CpuStorage::F32(_) => f32::to_cpu_storage_owned(map_rows(
            contiguous(op, s1, l1)?,
            contiguous(op, s2, l2)?,
            c,
            f32_kernel,
        )),
        CpuStorage::F64(_) => f64::to_cpu_storage_owned(map_rows(
            contiguous(op, s1, l1)?,
            contiguous(op, s2, l2)?,
            c,
            f64_kernel,
        )),
        _ => return Err(unsupported(op, s1)),
    };
    Ok((out, l1.shape().clone()))
}

impl CustomOp2 for BiasAdd {
    fn name(&self) -> &'static str {
        "vjepa-bias-add"
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::bias_add(s1, l1, s2, l2)
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        run2(
            self.name(),
            s1,
            l1,
            s2,
            l2,
            add_rows::<f32>,
            add_rows::<f64>,
        )
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _b: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let db = grad.contiguous()?.apply_op1_no_bwd(&ColumnSum)?;
        Ok((Some(grad.clone()), Some(db)))
    }
}

impl CustomOp2 for BiasGelu {
    fn name(&self) -> &'static str {
        "vjepa-bias-gelu"
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::bias_gelu(s1, l1, s2, l2)
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        run2(
            self.name(),
            s1,
            l1,
            s2,
            l2,
            gelu_rows::<f32>,
            gelu_rows::<f64>,
        )
    }

    fn bwd(
        &self,
        x: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let c = x.dim(D::Minus1)?;
        let rows = x.elem_count() / c;
        let packed = x.apply_op3_no_bwd(b, &grad.contiguous()?, &BiasGeluBackward)?;
        let dx = packed.narrow(0, 0, rows)?.reshape(x.shape())?;
        Ok((Some(dx), Some(packed.get(rows)?)))
    }
}

impl CustomOp3 for BiasGeluBackward {
    fn name(&self) -> &'static str {
        "vjepa-bias-gelu-backward"
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
        super::cuda::bias_gelu_bwd(s1, l1, s2, l2, s3, l3)
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
        let c = bias_cols(name, l1, l2)?;
        if l3.dims() != l1.dims() {
            candle_core::bail!("{name}: grad {:?} vs x {:?}", l3.dims(), l1.dims());
        }
        let rows = l1.shape().elem_count() / c;
        fn run<T: Elem>(x: &[T], b: &[T], dy: &[T], c: usize) -> Vec<T> {
            let rows = x.len() / c;
            let mut out = vec![T::ZERO; (rows + 1) * c];
            let (dx, db) = out.split_at_mut(rows * c);
            let chunk = rows_per_task(c) * c;
            let partials = par::map_chunks_mut(dx, chunk, |i, dxc| {
                let span = i * chunk..i * chunk + dxc.len();
                let mut part = vec![T::ZERO; c];
                gelu_grad_rows(&x[span.clone()], b, &dy[span], dxc, c, &mut part);
                part
            });
            for part in &partials {
                for (t, &p) in db.iter_mut().zip(part) {
                    *t += p;
                }
            }
            out
        }
        let out = match s1 {
            CpuStorage::F32(_) => f32::to_cpu_storage_owned(run::<f32>(
                contiguous(name, s1, l1)?,
                contiguous(name, s2, l2)?,
                contiguous(name, s3, l3)?,
                c,
            )),
            CpuStorage::F64(_) => f64::to_cpu_storage_owned(run::<f64>(
                contiguous(name, s1, l1)?,
                contiguous(name, s2, l2)?,
                contiguous(name, s3, l3)?,
                c,
            )),
            _ => return Err(unsupported(name, s1)),
        };
        Ok((out, Shape::from((rows + 1, c))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::reference::{self, assert_close, randn};
    use candle_core::{DType, Var};

    fn check(shape: &[usize], seed: u64) {
        let c = *shape.last().unwrap();
        let x = Var::from_tensor(&(randn(shape, DType::F32, seed) * 3.0).unwrap()).unwrap();
        let b = Var::from_tensor(&randn(&[c], DType::F32, seed + 1)).unwrap();
        let g = randn(shape, DType::F32, seed + 2);
        type Op = fn(&Tensor, &Tensor) -> Result<Tensor, ModelError>;
        type Ref = fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>;
        let ops: [(&str, Op, Ref); 2] = [
            ("bias_add", bias_add, reference::bias_add),
            ("bias_gelu", bias_gelu, reference::bias_gelu),
        ];
        for (name, op, reference) in ops {
            let what = format!("{name} {shape:?}");
            let ours = op(&x, &b).unwrap();
            let want = reference(&x, &b).unwrap();
            assert_close(&ours, &want, 1e-5, &format!("{what} fwd"));
            let ga = (ours * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let gb = (want * &g).unwrap().sum_all().unwrap().backward().unwrap();
            // candle's gelu_erf backward rounds 1/√(2π) to 0.398942 (≈6e-7 relative)
            assert_close(
                ga.get(&x).unwrap(),
                gb.get(&x).unwrap(),
                1e-5,
                &format!("{what} dx"),
            );
            assert_close(
                ga.get(&b).unwrap(),
                gb.get(&b).unwrap(),
                1e-5,
                &format!("{what} db"),
            );
        }
    }

    #[test]
    fn matches_composite_reference() {
        check(&[1, 1, 5], 1);
        check(&[2, 95, 384], 2);
        check(&[4, 357, 96], 3);
        check(&[3000, 7], 4);
    }

    #[test]
    fn finite_difference() {
        let x = Var::from_tensor(&(randn(&[4, 3], DType::F64, 21) * 3.0).unwrap()).unwrap();
        let b = Var::from_tensor(&randn(&[3], DType::F64, 22)).unwrap();
        let r = randn(&[4, 3], DType::F64, 23);
        let loss = || {
            let y =
                (bias_gelu(&x, &b).unwrap() + bias_add(&x, &b).unwrap().sqr().unwrap()).unwrap();
            (y * &r).unwrap().sum_all().unwrap()
        };
        let f = || -> f64 { loss().to_scalar().unwrap() };
        let grads = loss().backward().unwrap();
        for v in [&x, &b] {
            crate::layers::tests::check_grad(v, grads.get(v).unwrap(), &f, 1e-7);
        }
    }

    #[test]
    fn refuses_mismatched_bias() {
        let x = randn(&[2, 4], DType::F32, 1);
        let b = randn(&[2], DType::F32, 2);
        assert!(matches!(bias_add(&x, &b), Err(ModelError::Input(_))));
        assert!(matches!(bias_gelu(&x, &x), Err(ModelError::Input(_))));
    }
}
