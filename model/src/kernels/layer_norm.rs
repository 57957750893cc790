//! LayerNorm over the last dimension (biased variance, like torch), affine and plain, with a
//! backward that produces dx, dweight and dbias in one pass over the rows.

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, D, Layout, Shape, Tensor, WithDType,
};

use super::math::{Elem, dot, dot3, multiversion, sum, sum_sq_dev};
use super::{check_same, contiguous, par, rows_per_task, unsupported};
use crate::ModelError;

/// Affine LayerNorm of `x` `[.., C]` with weight and bias `[C]` (the ViTs' norms, eps 1e-6).
pub fn layer_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Tensor, ModelError> {
    if let Some(r) =
        super::widen_cpu_bf16(&[x, weight, bias], |t| layer_norm(&t[0], &t[1], &t[2], eps))
    {
        return r;
    }
    check_same("layer_norm", &[x, weight, bias])?;
    let c = last_dim("layer_norm", x)?;
    for (what, t) in [("weight", weight), ("bias", bias)] {
        if t.dims() != [c] {
            return Err(ModelError::Input(format!(
                "layer_norm: {what} {:?} for rows of {c}",
                t.dims()
            )));
        }
    }
    Ok(x.contiguous()?.apply_op3(
        &weight.contiguous()?,
        &bias.contiguous()?,
        LayerNorm { eps },
    )?)
}

/// LayerNorm of `x` `[.., C]` without affine parameters (the target normalisation, eps 1e-5).
pub fn layer_norm_plain(x: &Tensor, eps: f64) -> Result<Tensor, ModelError> {
    if let Some(r) = super::widen_cpu_bf16(&[x], |t| layer_norm_plain(&t[0], eps)) {
        return r;
    }
    check_same("layer_norm_plain", &[x])?;
    last_dim("layer_norm_plain", x)?;
    Ok(x.contiguous()?.apply_op1(LayerNormPlain { eps })?)
}

fn last_dim(op: &str, x: &Tensor) -> Result<usize, ModelError> {
    match x.dims().last() {
        Some(&c) if c > 0 => Ok(c),
        _ => Err(ModelError::Input(format!(
            "{op}: needs a non-empty last dimension, got {:?}",
            x.dims()
        ))),
    }
}

/// Row width of a layout (its last dimension, ≥ 1).
fn cols_of(op: &str, l: &Layout) -> candle_core::Result<usize> {
    match l.dims().last() {
        Some(&c) if c > 0 => Ok(c),
        _ => candle_core::bail!("{op}: needs a non-empty last dimension, got {:?}", l.dims()),
    }
}

fn check_vec(op: &str, l: &Layout, c: usize) -> candle_core::Result<()> {
    if l.dims() != [c] {
        candle_core::bail!("{op}: parameter {:?} for rows of {c}", l.dims());
    }
    Ok(())
}

/// Forward op, affine: (x, weight, bias) → y.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    /// Added to the variance.
    pub eps: f64,
}

/// Forward op without affine: x → y.
#[derive(Clone, Debug)]
pub struct LayerNormPlain {
    /// Added to the variance.
    pub eps: f64,
}

/// Backward op, affine: (x, weight, dy) → packed `[rows + 2, C]` = dx rows, then dweight,
/// then dbias.
#[derive(Clone, Debug)]
pub struct LayerNormBackward {
    /// The forward's eps.
    pub eps: f64,
}

/// Backward op without affine: (x, dy) → dx.
#[derive(Clone, Debug)]
pub struct LayerNormPlainBackward {
    /// The forward's eps.
    pub eps: f64,
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "vjepa-layer-norm"
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
        super::cuda::layer_norm_fwd(s1, l1, s2, l2, s3, l3, self.eps as f32)
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
        let c = cols_of(name, l1)?;
        check_vec(name, l2, c)?;
        check_vec(name, l3, c)?;
        fn run<T: Elem>(
            name: &str,
            s: [(&CpuStorage, &Layout); 3],
            c: usize,
            eps: f64,
        ) -> candle_core::Result<CpuStorage> {
            let x = contiguous::<T>(name, s[0].0, s[0].1)?;
            let w = contiguous::<T>(name, s[1].0, s[1].1)?;
            let b = contiguous::<T>(name, s[2].0, s[2].1)?;
            Ok(T::to_cpu_storage_owned(forward(x, c, Some((w, b)), eps)))
        }
        let s = [(s1, l1), (s2, l2), (s3, l3)];
        let out = match s1 {
            CpuStorage::F32(_) => run::<f32>(name, s, c, self.eps)?,
            CpuStorage::F64(_) => run::<f64>(name, s, c, self.eps)?,
            _ => return Err(unsupported(name, s1)),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let c = x.dim(D::Minus1)?;
        let rows = x.elem_count() / c;
        let packed = x.apply_op3_no_bwd(
            weight,
            &grad.contiguous()?,
            &LayerNormBackward { eps: self.eps },
        )?;
        let dx = packed.narrow(0, 0, rows)?.reshape(x.shape())?;
        Ok((
            Some(dx),
            Some(packed.get(rows)?),
            Some(packed.get(rows + 1)?),
        ))
    }
}

impl CustomOp1 for LayerNormPlain {
    fn name(&self) -> &'static str {
        "vjepa-layer-norm-plain"
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::layer_norm_plain_fwd(s, l, self.eps as f32)
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let name = self.name();
        let c = cols_of(name, l)?;
        let out = match s {
            CpuStorage::F32(_) => {
                f32::to_cpu_storage_owned(forward(contiguous(name, s, l)?, c, None, self.eps))
            }
            CpuStorage::F64(_) => {
                f64::to_cpu_storage_owned(forward(contiguous(name, s, l)?, c, None, self.eps))
            }
            _ => return Err(unsupported(name, s)),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let dx = x.apply_op2_no_bwd(
            &grad.contiguous()?,
            &LayerNormPlainBackward { eps: self.eps },
        )?;
        Ok(Some(dx))
    }
}

impl CustomOp3 for LayerNormBackward {
    fn name(&self) -> &'static str {
        "vjepa-layer-norm-backward"
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
        super::cuda::layer_norm_bwd(s1, l1, s2, l2, s3, l3, self.eps as f32)
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
        let c = cols_of(name, l1)?;
        check_vec(name, l2, c)?;
        if l3.dims() != l1.dims() {
            candle_core::bail!("{name}: grad {:?} vs x {:?}", l3.dims(), l1.dims());
        }
        let rows = l1.shape().elem_count() / c;
        fn run<T: Elem>(
            name: &str,
            s: [(&CpuStorage, &Layout); 3],
            c: usize,
            eps: f64,
        ) -> candle_core::Result<CpuStorage> {
            let x = contiguous::<T>(name, s[0].0, s[0].1)?;
            let w = contiguous::<T>(name, s[1].0, s[1].1)?;
            let dy = contiguous::<T>(name, s[2].0, s[2].1)?;
            Ok(T::to_cpu_storage_owned(backward(x, dy, c, Some(w), eps)))
        }
        let s = [(s1, l1), (s2, l2), (s3, l3)];
        let out = match s1 {
            CpuStorage::F32(_) => run::<f32>(name, s, c, self.eps)?,
            CpuStorage::F64(_) => run::<f64>(name, s, c, self.eps)?,
            _ => return Err(unsupported(name, s1)),
        };
        Ok((out, Shape::from((rows + 2, c))))
    }
}

impl CustomOp2 for LayerNormPlainBackward {
    fn name(&self) -> &'static str {
        "vjepa-layer-norm-plain-backward"
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::layer_norm_plain_bwd(s1, l1, s2, l2, self.eps as f32)
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let name = self.name();
        let c = cols_of(name, l1)?;
        if l2.dims() != l1.dims() {
            candle_core::bail!("{name}: grad {:?} vs x {:?}", l2.dims(), l1.dims());
        }
        let rows = l1.shape().elem_count() / c;
        fn run<T: Elem>(
            name: &str,
            s: [(&CpuStorage, &Layout); 2],
            c: usize,
            rows: usize,
            eps: f64,
        ) -> candle_core::Result<CpuStorage> {
            let x = contiguous::<T>(name, s[0].0, s[0].1)?;
            let dy = contiguous::<T>(name, s[1].0, s[1].1)?;
            let mut packed = backward(x, dy, c, None, eps);
            packed.truncate(rows * c);
            Ok(T::to_cpu_storage_owned(packed))
        }
        let s = [(s1, l1), (s2, l2)];
        let out = match s1 {
            CpuStorage::F32(_) => run::<f32>(name, s, c, rows, self.eps)?,
            CpuStorage::F64(_) => run::<f64>(name, s, c, rows, self.eps)?,
            _ => return Err(unsupported(name, s1)),
        };
        Ok((out, l1.shape().clone()))
    }
}

/// (mean, 1/√(var + eps)) of one row.
#[inline(always)]
fn row_stats<T: Elem>(x: &[T], eps: T) -> (T, T) {
    let n = T::from_f64(x.len() as f64);
    let mean = sum(x) / n;
    let var = sum_sq_dev(x, mean) / n;
    (mean, T::ONE / (var + eps).sqrt_())
}

multiversion! {
    /// y = (x − mean)·rstd (·w + b) for each `c`-wide row.
    fn forward_rows<T: Elem>(x: &[T], y: &mut [T], c: usize, affine: Option<(&[T], &[T])>, eps: T) {
        for (xr, yr) in x.chunks_exact(c).zip(y.chunks_exact_mut(c)) {
            let (mean, rstd) = row_stats(xr, eps);
            match affine {
                Some((w, b)) => {
                    for (((y, &x), &w), &b) in yr.iter_mut().zip(xr).zip(w).zip(b) {
                        *y = (x - mean) * rstd * w + b;
                    }
                }
                None => {
                    for (y, &x) in yr.iter_mut().zip(xr) {
                        *y = (x - mean) * rstd;
                    }
                }
            }
        }
    }
}

fn forward<T: Elem>(x: &[T], c: usize, affine: Option<(&[T], &[T])>, eps: f64) -> Vec<T> {
    let mut y = vec![T::ZERO; x.len()];
    let chunk = rows_per_task(c) * c;
    let eps = T::from_f64(eps);
    par::chunks_mut(&mut y, chunk, |i, yc| {
        forward_rows(&x[i * chunk..i * chunk + yc.len()], yc, c, affine, eps)
    });
    y
}

multiversion! {
    /// dx = rstd·(g − mean(g) − x̂·mean(g∘x̂)) with g = dy∘w (or dy), per row. With affine
    /// parameters, also accumulates Σ dy∘x̂ and Σ dy over the rows into `part` = [dw | db].
    fn backward_rows<T: Elem>(
        x: &[T],
        dy: &[T],
        dx: &mut [T],
        c: usize,
        w: Option<&[T]>,
        eps: T,
        part: &mut [T],
    ) {
        let n = T::from_f64(c as f64);
        let rows = x.chunks_exact(c).zip(dy.chunks_exact(c));
        for ((xr, gr), dxr) in rows.zip(dx.chunks_exact_mut(c)) {
            let (mean, rstd) = row_stats(xr, eps);
            for (xh, &x) in dxr.iter_mut().zip(xr) {
                *xh = (x - mean) * rstd;
            }
            match w {
                Some(w) => {
                    let a = dot(gr, w) / n;
                    let b = dot3(gr, w, dxr) / n;
                    let (dw, db) = part.split_at_mut(c);
                    let cols = dw.iter_mut().zip(db.iter_mut()).zip(gr);
                    for (((dw, db), &g), &xh) in cols.zip(dxr.iter()) {
                        *dw += g * xh;
                        *db += g;
                    }
                    for ((d, &g), &w) in dxr.iter_mut().zip(gr).zip(w) {
                        *d = rstd * (g * w - a - *d * b);
                    }
                }
                None => {
                    let a = sum(gr) / n;
                    let b = dot(gr, dxr) / n;
                    for (d, &g) in dxr.iter_mut().zip(gr) {
                        *d = rstd * (g - a - *d * b);
                    }
                }
            }
        }
    }
}

/// Packed `[rows + 2, c]`: dx, then dweight and dbias (zeros without affine). The column sums
/// are per-task partials over fixed row chunks, added in chunk order.
fn backward<T: Elem>(x: &[T], dy: &[T], c: usize, w: Option<&[T]>, eps: f64) -> Vec<T> {
    let rows = x.len() / c;
    let mut out = vec![T::ZERO; (rows + 2) * c];
    let (dx, tail) = out.split_at_mut(rows * c);
    let chunk = rows_per_task(c) * c;
    let eps = T::from_f64(eps);
    let part_len = if w.is_some() { 2 * c } else { 0 };
    let partials = par::map_chunks_mut(dx, chunk, |i, dxc| {
        let span = i * chunk..i * chunk + dxc.len();
        let mut part = vec![T::ZERO; part_len];
        backward_rows(&x[span.clone()], &dy[span], dxc, c, w, eps, &mut part);
        part
    });
    for part in &partials {
        for (t, &p) in tail.iter_mut().zip(part) {
            *t += p;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::reference::{self, assert_close, randn};
    use candle_core::{DType, Var};

    fn check(shape: &[usize], seed: u64) {
        let c = *shape.last().unwrap();
        let x = Var::from_tensor(&(randn(shape, DType::F32, seed) * 3.0).unwrap()).unwrap();
        let w = Var::from_tensor(&randn(&[c], DType::F32, seed + 1)).unwrap();
        let b = Var::from_tensor(&randn(&[c], DType::F32, seed + 2)).unwrap();
        let g = randn(shape, DType::F32, seed + 3);
        let what = format!("{shape:?}");
        let ours = layer_norm(&x, &w, &b, 1e-6).unwrap();
        let want = reference::layer_norm(&x, &w, &b, 1e-6).unwrap();
        assert_close(&ours, &want, 1e-5, &format!("affine fwd {what}"));
        let ga = (ours * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (want * &g).unwrap().sum_all().unwrap().backward().unwrap();
        for (name, v) in [("dx", &x), ("dw", &w), ("db", &b)] {
            assert_close(
                ga.get(v).unwrap(),
                gb.get(v).unwrap(),
                1e-5,
                &format!("{name} {what}"),
            );
        }
        let ours = layer_norm_plain(&x, 1e-5).unwrap();
        let want = reference::layer_norm_plain(&x, 1e-5).unwrap();
        assert_close(&ours, &want, 1e-5, &format!("plain fwd {what}"));
        let ga = (ours * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (want * &g).unwrap().sum_all().unwrap().backward().unwrap();
        assert_close(
            ga.get(&x).unwrap(),
            gb.get(&x).unwrap(),
            1e-5,
            &format!("plain dx {what}"),
        );
    }

    #[test]
    fn matches_composite_reference() {
        check(&[1, 1, 7], 1);
        check(&[2, 95, 96], 2);
        check(&[3, 357, 48], 3);
        check(&[700, 33], 4); // several row chunks → ordered partial sums
        check(&[5], 5);
    }

    #[test]
    fn finite_difference() {
        let x = Var::from_tensor(&randn(&[3, 5], DType::F64, 11)).unwrap();
        let w = Var::from_tensor(&randn(&[5], DType::F64, 12)).unwrap();
        let b = Var::from_tensor(&randn(&[5], DType::F64, 13)).unwrap();
        let r = randn(&[3, 5], DType::F64, 14);
        let loss = || {
            let affine = layer_norm(&x, &w, &b, 1e-6).unwrap();
            let plain = layer_norm_plain(&x, 1e-5).unwrap();
            ((affine + plain).unwrap() * &r).unwrap().sum_all().unwrap()
        };
        let f = || -> f64 { loss().to_scalar().unwrap() };
        let grads = loss().backward().unwrap();
        for v in [&x, &w, &b] {
            crate::layers::tests::check_grad(v, grads.get(v).unwrap(), &f, 1e-7);
        }
    }

    #[test]
    fn refuses_bad_parameters() {
        let x = randn(&[2, 4], DType::F32, 1);
        let w = randn(&[3], DType::F32, 2);
        assert!(matches!(
            layer_norm(&x, &w, &w, 1e-6),
            Err(ModelError::Input(_))
        ));
        let w64 = randn(&[4], DType::F64, 2);
        assert!(matches!(
            layer_norm(&x, &w64, &w64, 1e-6),
            Err(ModelError::Input(_))
        ));
        let e = randn(&[2, 0], DType::F32, 3);
        assert!(matches!(
            layer_norm_plain(&e, 1e-5),
            Err(ModelError::Input(_))
        ));
    }
}
