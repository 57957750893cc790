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
//! Dtypes: f32 (the training dtype) and f64 (finite-difference tests); bf16 runs natively on a
//! CUDA device and, on the CPU, in f32 on widened copies (mixed-precision checks without a GPU);
//! anything else is refused with [`ModelError::Unsupported`].
//!
//! With the `cuda` feature every op also has a `cuda_fwd` (`cuda`: one kernel launch per
//! forward, flash-style attention, f32 and bf16 storage with fp32 math), so the model runs on a
//! candle CUDA device unchanged; `vjepa gpu-check` (`gpu_check`) compares the two backends.

mod adamw;
mod attention;
mod bias;
mod layer_norm;
mod linear;
mod math;
mod par;
mod reduce;
mod rows;

/// CUDA implementations of the ops (PTX built by `build.rs`).
#[cfg(feature = "cuda")]
pub mod cuda;
/// cuDNN fused attention (the `cudnn` feature; libcudnn opened at run time).
#[cfg(feature = "cudnn")]
pub mod cudnn;
/// CPU-vs-GPU correctness rows and GPU timings behind `vjepa gpu-check`.
#[cfg(feature = "cuda")]
pub mod gpu_check;

#[cfg(test)]
mod bench;
#[cfg(test)]
mod reference;

pub use adamw::{AdamMoments, AdamUpdate, EmaUpdate, adamw_step, ema_update};
pub use attention::{
    Attention, AttentionBackend, AttentionBackward, attention, attention_backend,
    check_attention_backend, set_attention_backend,
};
pub use bias::{BiasAdd, BiasGelu, BiasGeluBackward, bias_add, bias_gelu};
pub use layer_norm::{
    LayerNorm, LayerNormBackward, LayerNormPlain, LayerNormPlainBackward, layer_norm,
    layer_norm_plain,
};
pub use linear::{Linear, LinearBackward, LinearNoBias, linear};
pub use reduce::{ColumnSum, L1Mean, L1MeanBackward, SumSq, column_sum, l1_mean, sum_sq};
pub use rows::{GatherRows, ScatterRows, gather_rows};

use candle_core::{CpuStorage, DType, Layout, Tensor};

use crate::ModelError;
use math::Elem;

/// A process-wide on/off switch of a GPU code path, read from an environment variable on first
/// use (`1`/`on`/`true`/`yes` or `0`/`off`/`false`/`no`; anything else or unset: the default) and
/// settable from code (gpu-check runs both ways). Why an environment variable: the switches
/// choose between implementations of the same numbers, so a lent GPU session can flip one
/// without a rebuild.
#[cfg(feature = "cuda")]
pub(crate) struct EnvSwitch {
    /// 0: not read yet, 1: on, 2: off.
    state: std::sync::atomic::AtomicU8,
    var: &'static str,
    default: bool,
}

#[cfg(feature = "cuda")]
impl EnvSwitch {
    pub(crate) const fn new(var: &'static str, default: bool) -> Self {
        Self {
            state: std::sync::atomic::AtomicU8::new(0),
            var,
            default,
        }
    }

    /// Whether the switch is on.
    pub(crate) fn get(&self) -> bool {
        use std::sync::atomic::Ordering;
        match self.state.load(Ordering::Relaxed) {
            1 => true,
            2 => false,
            _ => {
                let on = match std::env::var(self.var).as_deref() {
                    Ok("1" | "on" | "true" | "yes") => true,
                    Ok("0" | "off" | "false" | "no") => false,
                    _ => self.default,
                };
                self.set(on);
                on
            }
        }
    }

    /// Sets the switch for the whole process.
    pub(crate) fn set(&self, on: bool) {
        self.state
            .store(if on { 1 } else { 2 }, std::sync::atomic::Ordering::Relaxed);
    }
}

/// bf16 on the CPU, where the kernels have no bf16 code: when any of `ts` is a CPU bf16 tensor,
/// runs `op` on f32 copies of all of them and narrows its result back to bf16 — fp32 math on
/// bf16 storage, as the CUDA kernels do it, and differentiable through the two casts. It is for
/// checking mixed-precision training on machines without a GPU, not for speed. `None` otherwise.
fn widen_cpu_bf16(
    ts: &[&Tensor],
    op: impl FnOnce(&[Tensor]) -> Result<Tensor, ModelError>,
) -> Option<Result<Tensor, ModelError>> {
    if !ts
        .iter()
        .any(|t| t.dtype() == DType::BF16 && t.device().is_cpu())
    {
        return None;
    }
    let run = || {
        let wide = ts
            .iter()
            .map(|t| t.to_dtype(DType::F32))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(op(&wide)?.to_dtype(DType::BF16)?)
    };
    Some(run())
}

/// Refuses dtypes the kernels don't implement, naming the op.
fn check_dtype(op: &str, t: &Tensor) -> Result<(), ModelError> {
    match t.dtype() {
        DType::F32 | DType::F64 => Ok(()),
        DType::BF16 if t.device().is_cuda() => Ok(()),
        other => Err(ModelError::Unsupported(format!(
            "{op}: dtype {other:?} (the kernels implement f32, f64 for tests, bf16 on CUDA)"
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

#[cfg(test)]
mod tests {
    #[cfg(feature = "cuda")]
    #[test]
    fn env_switch_reads_its_variable_once_and_can_be_set() {
        // SAFETY: variables of this test's own, set before any thread reads them.
        unsafe {
            std::env::set_var("VJEPA_TEST_SWITCH_ON", "off");
            std::env::set_var("VJEPA_TEST_SWITCH_JUNK", "maybe");
        }
        let on = super::EnvSwitch::new("VJEPA_TEST_SWITCH_ON", true);
        let junk = super::EnvSwitch::new("VJEPA_TEST_SWITCH_JUNK", true);
        let unset = super::EnvSwitch::new("VJEPA_TEST_SWITCH_UNSET", false);
        assert!(!on.get(), "'off' turns a default-on switch off");
        assert!(junk.get(), "an unreadable value keeps the default");
        assert!(!unset.get());
        unset.set(true);
        assert!(unset.get());
        // Read once: a later change of the variable is not seen.
        unsafe { std::env::set_var("VJEPA_TEST_SWITCH_ON", "on") };
        assert!(!on.get());
    }

    use super::*;
    use crate::kernels::reference::randn;
    use candle_core::Var;
    use std::sync::atomic::Ordering;

    /// Bits of every output and gradient of a small block-like graph through all the ops.
    fn run_all() -> Vec<Vec<u32>> {
        let (b, n, d, h) = (2, 37, 48, 3);
        let x = Var::from_tensor(&randn(&[b, n, d], DType::F32, 1)).unwrap();
        let w = Var::from_tensor(&(randn(&[3 * d, d], DType::F32, 2) * 0.2).unwrap()).unwrap();
        let bias = Var::from_tensor(&randn(&[3 * d], DType::F32, 3)).unwrap();
        let g = Var::from_tensor(&randn(&[d], DType::F32, 4)).unwrap();
        let qkv = linear(&layer_norm(&x, &g, &g, 1e-6).unwrap(), &w, Some(&bias)).unwrap();
        let a = attention(&qkv, h).unwrap();
        let y = bias_gelu(&a, &g).unwrap();
        let y = bias_add(&layer_norm_plain(&y, 1e-5).unwrap(), &g).unwrap();
        let loss = (sum_sq(&y).unwrap() + column_sum(&y).unwrap().sum_all().unwrap()).unwrap();
        let grads = loss.backward().unwrap();
        let bits = |t: &Tensor| -> Vec<u32> {
            t.flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect()
        };
        let mut out = vec![bits(&y), bits(&loss.reshape(1).unwrap())];
        for v in [&x, &w, &bias, &g] {
            out.push(bits(grads.get(v).unwrap()));
        }
        let state = Tensor::zeros((2, 3 * d, d), DType::F32, &candle_core::Device::Cpu).unwrap();
        let p = w.as_tensor().copy().unwrap();
        let update = AdamUpdate {
            lr: 0.1,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            step: 1,
        };
        adamw_step(&p, &state, grads.get(&w).unwrap(), &update).unwrap();
        ema_update(&p, w.as_tensor(), 0.9).unwrap();
        out.push(bits(&p));
        out.push(bits(&state));
        out
    }

    #[test]
    fn instruction_sets_and_scheduling_give_identical_bits() {
        let full = run_all();
        for cap in [1, 0] {
            math::SIMD_CAP.store(cap, Ordering::Relaxed);
            let capped = run_all();
            math::SIMD_CAP.store(2, Ordering::Relaxed);
            assert!(full == capped, "SIMD level {cap} differs from the widest");
        }
        assert!(full == par::serial(run_all), "serial run differs");
    }
}
