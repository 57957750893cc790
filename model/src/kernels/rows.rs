//! Row gathers whose backward pass is a scatter: the context-token gather of every V-JEPA step.
//!
//! Why: candle differentiates `index_select` with `index_add`, whose CUDA kernel gives each
//! of the D columns one thread that walks all M gathered rows in turn: for a ViT-L context
//! gather (M = B·K, about 7,000–11,000 rows at batch 24, D = 1024) that is a thousand threads
//! doing ten thousand dependent read-modify-writes each, milliseconds per mask on a GPU that
//! could do it in microseconds. When the gathered rows are distinct (a mask's context tokens
//! are a set), the gradient is a plain scatter: each gathered row's gradient goes to its source
//! row, every element in parallel, nothing added twice, so the result is exact and the same as
//! `index_add` into zeros.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor, WithDType};

use crate::ModelError;

/// Rows `idx` (u32, `[M]`, pairwise distinct: the caller vouches for it) of `x` `[R, D]` →
/// `[M, D]`, differentiable in `x` with a scatter backward (see the module docs).
pub fn gather_rows(x: &Tensor, idx: &Tensor) -> Result<Tensor, ModelError> {
    let (_, d) = x.dims2().map_err(|_| {
        ModelError::Input(format!("gather_rows: x must be [R, D], got {:?}", x.dims()))
    })?;
    if idx.dtype() != DType::U32 || idx.rank() != 1 || d == 0 {
        return Err(ModelError::Input(format!(
            "gather_rows: indices must be u32 [M] (got {:?} {:?}) over a non-empty row",
            idx.dtype(),
            idx.dims()
        )));
    }
    Ok(x.contiguous()?.apply_op2(&idx.contiguous()?, GatherRows)?)
}

/// Forward op: (x `[R, D]`, idx `[M]`) → x's rows idx.
#[derive(Clone, Copy, Debug)]
pub struct GatherRows;

/// Backward op of [`GatherRows`]: (g `[M, D]`, idx `[M]`) → `[rows, D]`, row idx[m] = g[m], the
/// other rows 0.
#[derive(Clone, Copy, Debug)]
pub struct ScatterRows {
    /// R, the source's row count.
    pub rows: usize,
}

impl CustomOp2 for GatherRows {
    fn name(&self) -> &'static str {
        "vjepa-gather-rows"
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let out = s1.index_select(s2, l1, l2, 0)?;
        Ok((out, gathered_shape(l1, l2)?))
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = s1.index_select(s2, l1, l2, 0)?;
        Ok((out, gathered_shape(l1, l2)?))
    }

    fn bwd(
        &self,
        x: &Tensor,
        idx: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let rows = x.dim(0)?;
        let dx = grad
            .contiguous()?
            .apply_op2_no_bwd(idx, &ScatterRows { rows })?;
        Ok((Some(dx), None))
    }
}

fn gathered_shape(lx: &Layout, li: &Layout) -> candle_core::Result<Shape> {
    let (_, d) = lx.shape().dims2()?;
    Ok(Shape::from((li.shape().elem_count(), d)))
}

/// Rows and columns of the gradient `[M, D]`, checked against the `[M]` indices.
fn scatter_dims(lg: &Layout, li: &Layout, op: &str) -> candle_core::Result<(usize, usize)> {
    let (m, d) = lg.shape().dims2()?;
    if li.shape().elem_count() != m {
        candle_core::bail!(
            "{op}: {m} gradient rows for {} indices",
            li.shape().elem_count()
        );
    }
    Ok((m, d))
}

impl CustomOp2 for ScatterRows {
    fn name(&self) -> &'static str {
        "vjepa-scatter-rows"
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (_, d) = scatter_dims(l1, l2, self.name())?;
        let out = super::cuda::scatter_rows(s1, l1, s2, l2, self.rows)?;
        Ok((out, Shape::from((self.rows, d))))
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let name = self.name();
        let (_, d) = scatter_dims(l1, l2, name)?;
        let ids: &[u32] = match (s2, l2.contiguous_offsets()) {
            (CpuStorage::U32(v), Some((a, b))) => &v[a..b],
            _ => candle_core::bail!("{name}: indices must be contiguous u32"),
        };
        fn run<T: WithDType>(
            g: &[T],
            ids: &[u32],
            rows: usize,
            d: usize,
            name: &str,
        ) -> candle_core::Result<Vec<T>> {
            let mut out = vec![T::zero(); rows * d];
            for (m, &r) in ids.iter().enumerate() {
                let r = r as usize;
                if r >= rows {
                    candle_core::bail!("{name}: index {r} outside 0..{rows}");
                }
                out[r * d..(r + 1) * d].copy_from_slice(&g[m * d..(m + 1) * d]);
            }
            Ok(out)
        }
        let Some((a, b)) = l1.contiguous_offsets() else {
            candle_core::bail!("{name}: the gradient must be contiguous");
        };
        let out = match s1 {
            CpuStorage::F32(v) => CpuStorage::F32(run(&v[a..b], ids, self.rows, d, name)?),
            CpuStorage::F64(v) => CpuStorage::F64(run(&v[a..b], ids, self.rows, d, name)?),
            CpuStorage::BF16(v) => CpuStorage::BF16(run(&v[a..b], ids, self.rows, d, name)?),
            CpuStorage::F16(v) => CpuStorage::F16(run(&v[a..b], ids, self.rows, d, name)?),
            other => candle_core::bail!("{name}: dtype {:?} not implemented", other.dtype()),
        };
        Ok((out, Shape::from((self.rows, d))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn gather_rows_equals_index_select_with_the_same_gradient() {
        let dev = Device::Cpu;
        for dtype in [DType::F32, DType::F64, DType::BF16] {
            let x = Var::from_tensor(
                &Tensor::arange(0f32, 40.0, &dev)
                    .unwrap()
                    .reshape((10, 4))
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap(),
            )
            .unwrap();
            let idx = Tensor::new(&[7u32, 2, 9, 0], &dev).unwrap();
            let ours = gather_rows(&x, &idx).unwrap();
            let want = x.index_select(&idx, 0).unwrap();
            let f = |t: &Tensor| {
                t.to_dtype(DType::F64)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap()
            };
            assert_eq!(f(&ours), f(&want), "{dtype:?}");
            let w = Tensor::arange(1f32, 17.0, &dev)
                .unwrap()
                .reshape((4, 4))
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let g1 = (ours * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (want * &w).unwrap().sum_all().unwrap().backward().unwrap();
            assert_eq!(f(g1.get(&x).unwrap()), f(g2.get(&x).unwrap()), "{dtype:?}");
        }
        let x = Tensor::zeros((3, 2), DType::F32, &dev).unwrap();
        assert!(gather_rows(&x, &Tensor::new(&[1i64], &dev).unwrap()).is_err());
        assert!(
            gather_rows(
                &x.flatten_all().unwrap(),
                &Tensor::new(&[1u32], &dev).unwrap()
            )
            .is_err()
        );
    }
}
