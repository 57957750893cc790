//! Fused kernels with hand-written backward passes: the training hot path.
//!
//! candle's own fused `layer_norm` / `softmax_last_dim` stop the gradient, and its composite CPU
//! ops are 10–45× slower than torch's (STACK-NOTES). Each op here is a candle `CustomOp1/2/3`
//! whose `bwd` applies another custom op (the backward kernel), so the same op structs can get a
//! `cuda_fwd` later without touching the model.
//!
//! CPU implementations: parallel loops over fixed-size units (rows, row blocks, (batch, head)
//! pairs) on candle's own worker pool (see `par` for why not a second pool), with `gemm` and
//! `Parallelism::None` inside a unit. Every reduction runs over chunks whose size depends only
//! on the tensor shape and combines the partials in index order, so results are bit-for-bit
//! identical whatever the number of threads.
//!
//! Dtypes: f32 (the training dtype) and f64 (finite-difference tests); anything else is refused
//! with [`ModelError::Unsupported`].

mod adamw;
mod attention;
mod bias;
mod layer_norm;
mod linear;
mod math;
mod par;
mod reduce;

#[cfg(test)]
mod bench;
#[cfg(test)]
mod reference;

pub use adamw::{AdamMoments, AdamUpdate, EmaUpdate, adamw_step, ema_update};
pub use attention::{Attention, AttentionBackward, attention};
pub use bias::{BiasAdd, BiasGelu, BiasGeluBackward, bias_add, bias_gelu};
pub use layer_norm::{
    LayerNorm, LayerNormBackward, LayerNormPlain, LayerNormPlainBackward, layer_norm,
    layer_norm_plain,
};
pub use linear::{Linear, LinearBackward, LinearNoBias, linear};
pub use reduce::{ColumnSum, SumSq, column_sum, sum_sq};

use candle_core::{CpuStorage, DType, Layout, Tensor};

use crate::ModelError;
use math::Elem;

/// Refuses dtypes the kernels don't implement, naming the op.
fn check_dtype(op: &str, t: &Tensor) -> Result<(), ModelError> {
    match t.dtype() {
        DType::F32 | DType::F64 => Ok(()),
        other => Err(ModelError::Unsupported(format!(
            "{op}: dtype {other:?} (the kernels implement f32, and f64 for tests)"
        ))),
    }
}

/// Checks that all tensors share the first one's dtype and device.
fn check_same(op: &str, ts: &[&Tensor]) -> Result<(), ModelError> {
    let Some(first) = ts.first() else {
        return Ok(());
    };
    check_dtype(op, first)?;
    for t in &ts[1..] {
        if t.dtype() != first.dtype() {
            return Err(ModelError::Input(format!(
                "{op}: mixed dtypes {:?} and {:?}",
                first.dtype(),
                t.dtype()
            )));
        }
        if !t.device().same_device(first.device()) {
            return Err(ModelError::Input(format!(
                "{op}: tensors on different devices"
            )));
        }
    }
    Ok(())
}

/// The contiguous elements of a storage under `layout` (the op wrappers make inputs contiguous;
/// this refuses anything else rather than reading the wrong elements).
fn contiguous<'a, T: Elem>(
    op: &str,
    s: &'a CpuStorage,
    l: &Layout,
) -> candle_core::Result<&'a [T]> {
    let data = T::cpu_storage_as_slice(s)?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{op}: input must be contiguous"),
    }
}

/// Mutable counterpart of [`contiguous`] for in-place ops.
fn contiguous_mut<'a, T: Elem>(
    op: &str,
    s: &'a mut CpuStorage,
    l: &Layout,
) -> candle_core::Result<&'a mut [T]> {
    let Some(data) = T::storage_mut(s) else {
        candle_core::bail!("{op}: destination dtype differs from the sources'")
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&mut data[a..b]),
        None => candle_core::bail!("{op}: destination must be contiguous"),
    }
}

/// Error for a dtype without a CPU kernel (reached only by bypassing the wrappers).
fn unsupported(op: &str, s: &CpuStorage) -> candle_core::Error {
    candle_core::Error::Msg(format!(
        "{op}: dtype {:?} not implemented (f32, f64 only)",
        candle_core::backend::BackendStorage::dtype(s)
    ))
}

/// Rows per parallel task for row-wise kernels over `cols`-wide rows: about 16 Ki elements, a
/// function of the shape only (so chunked reductions don't depend on the thread count).
fn rows_per_task(cols: usize) -> usize {
    (16 * 1024 / cols.max(1)).max(1)
}

/// Elements per parallel task of element-wise kernels and flat reductions.
const FLAT_CHUNK: usize = 16 * 1024;

/// A raw pointer that parallel units may share; each unit writes a disjoint region.
struct SyncPtr<T>(*mut T);

// SAFETY: used only to hand disjoint output regions to parallel tasks.
unsafe impl<T: Send> Send for SyncPtr<T> {}
// SAFETY: as above; no two tasks write the same element.
unsafe impl<T: Send> Sync for SyncPtr<T> {}

impl<T> SyncPtr<T> {
    /// The pointer (a method, so closures capture the `Sync` wrapper, not the raw field).
    fn get(&self) -> *mut T {
        self.0
    }
}
