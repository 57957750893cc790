//! cuBLASLt GEMMs with a fused epilogue, for the Linear op on CUDA.
//!
//! Why: the classic cuBLAS GEMM writes the product, and our bias kernel then reads and writes
//! it once more: one extra pass over the output of every biased Linear. On the H100 the ViT-L
//! fc1 shape (`[12544,1024]·[4096,1024]ᵀ + b`, bf16) took 0.240 ms that way against torch's
//! 0.173 ms, which adds the bias inside cuBLASLt's epilogue. The backward pass has the same
//! waste in reverse: the bias gradient is a column sum over dy, which the dW GEMM reads
//! anyway; cuBLASLt's `BGRADB` epilogue reduces it there.
//!
//! Each thread keeps its own cuBLASLt handle, workspace (candle's CUDA device launches on the
//! calling thread's default stream, so a shared workspace could be used by two streams at
//! once) and plan cache: descriptors, layouts and the heuristic's algorithm per device,
//! dtype, shape, epilogue and operand alignment, so a step pays the heuristic once per shape.
//! Where cuBLASLt has no algorithm for a case (or refuses it at launch) the call returns
//! `Ok(false)`, remembers that, and the caller takes the classic path.
//!
//! `VJEPA_CUBLASLT=0` (read once) or [`set_enabled`] turn it off: for A/B timings, and as a
//! way out, without a rebuild, should a driver's cuBLASLt misbehave.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::c_void;

use candle_core::cuda_backend::DeviceId;
use candle_core::cuda_backend::cudarc::cublas::sys::cublasOperation_t;
use candle_core::cuda_backend::cudarc::cublaslt::{result, sys};
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, CudaViewMut, DevicePtr, DevicePtrMut,
};
use candle_core::{CudaDevice, DType, Result, bail};

use super::KernelFloat;

/// Workspace per thread and device (NVIDIA's recommendation for Hopper).
const WORKSPACE_BYTES: usize = 32 << 20;
/// Bias pointers must be at least this aligned to take the fused path.
const BIAS_ALIGN: u64 = 16;

static ENABLED: crate::kernels::EnvSwitch = crate::kernels::EnvSwitch::new("VJEPA_CUBLASLT", true);

/// Whether Linear ops use cuBLASLt's fused epilogues (default on; `VJEPA_CUBLASLT=0` turns them
/// off).
pub fn enabled() -> bool {
    ENABLED.get()
}

/// Turns the fused path on or off for the whole process (gpu-check runs both ways).
pub fn set_enabled(on: bool) {
    ENABLED.set(on);
}

/// A column-major GEMM `D[m, n] = op(A)·op(B)` as cuBLAS sees it (`k` the reduced dimension,
/// leading dimensions in elements).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Gemm {
    /// A is stored `[k, m]` and used transposed (else stored `[m, k]`).
    pub transa: bool,
    /// B is stored `[n, k]` and used transposed (else stored `[k, n]`).
    pub transb: bool,
    /// Rows of D.
    pub m: usize,
    /// Columns of D.
    pub n: usize,
    /// The reduced dimension.
    pub k: usize,
    /// Leading dimension of A.
    pub lda: usize,
    /// Leading dimension of B.
    pub ldb: usize,
    /// Leading dimension of D.
    pub ldd: usize,
}

/// What the epilogue does with the bias vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Epilogue {
    /// `D += bias` broadcast over columns (bias has `m` elements).
    Bias,
    /// `bias = Σ_k op(B)` (the bias gradient, `n` elements), D as without epilogue.
    BiasGradB,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Key {
    device: DeviceId,
    bf16: bool,
    gemm: Gemm,
    epilogue: Epilogue,
    /// Alignment in bytes (≤ 256) of A, B, D and the bias (the heuristic reads the bias
    /// pointer's alignment too, so a plan is only reused for pointers aligned as well).
    align: [u32; 4],
}

/// A cached GEMM plan: descriptor, layouts and algorithm.
struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    layouts: [sys::cublasLtMatrixLayout_t; 3],
    algo: sys::cublasLtMatmulAlgo_t,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: created by `Plan::new` and destroyed once, here. Errors at teardown are
        // ignored (nothing can be done about them).
        unsafe {
            for l in self.layouts.into_iter().filter(|l| !l.is_null()) {
                let _ = result::destroy_matrix_layout(l);
            }
            let _ = result::destroy_matmul_desc(self.desc);
        }
    }
}

/// One thread's handle and workspace on one device.
struct Lt {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
}

impl Drop for Lt {
    fn drop(&mut self) {
        // SAFETY: created in `State::lt` and destroyed once, here.
        let _ = unsafe { result::destroy_handle(self.handle) };
    }
}

#[derive(Default)]
struct State {
    lts: HashMap<DeviceId, Lt>,
    /// `None`: cuBLASLt has no algorithm for that key (or refused it); use the classic path.
    plans: HashMap<Key, Option<Plan>>,
}

thread_local! {
    static STATE: RefCell<State> = RefCell::new(State::default());
}

fn lt_err(e: result::CublasError, what: &str) -> candle_core::Error {
    candle_core::Error::Msg(format!("cuBLASLt {what}: {e}"))
}

fn alignment(ptr: u64) -> u32 {
    if ptr == 0 {
        256
    } else {
        (ptr & ptr.wrapping_neg()).min(256) as u32
    }
}

fn data_type(bf16: bool) -> sys::cudaDataType {
    if bf16 {
        sys::cudaDataType::CUDA_R_16BF
    } else {
        sys::cudaDataType::CUDA_R_32F
    }
}

impl Plan {
    /// Descriptors for `key` and the heuristic's best algorithm; `Ok(None)` when cuBLASLt has
    /// none.
    fn new(handle: sys::cublasLtHandle_t, key: &Key, bias: u64) -> Result<Option<Self>> {
        let g = key.gemm;
        let ty = data_type(key.bf16);
        // fp32 accumulation and scaling for both dtypes (no TF32: f32 stays f32).
        let desc = result::create_matmul_desc(
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cudaDataType::CUDA_R_32F,
        )
        .map_err(|e| lt_err(e, "matmul descriptor"))?;
        let mut plan = Plan {
            desc,
            layouts: [std::ptr::null_mut(); 3],
            algo: sys::cublasLtMatmulAlgo_t { data: [0; 8] },
        };
        let op = |t: bool| {
            if t {
                cublasOperation_t::CUBLAS_OP_T
            } else {
                cublasOperation_t::CUBLAS_OP_N
            }
        };
        let epilogue = match key.epilogue {
            Epilogue::Bias => sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS,
            Epilogue::BiasGradB => sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BGRADB,
        };
        let set = |attr: sys::cublasLtMatmulDescAttributes_t, v: *const c_void, n: usize| {
            // SAFETY: `desc` is live; `v` points at `n` readable bytes.
            unsafe { result::set_matmul_desc_attribute(desc, attr, v, n) }
                .map_err(|e| lt_err(e, "matmul attribute"))
        };
        let (ta, tb) = (op(g.transa), op(g.transb));
        set(
            sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
            (&ta as *const cublasOperation_t).cast(),
            std::mem::size_of_val(&ta),
        )?;
        set(
            sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB,
            (&tb as *const cublasOperation_t).cast(),
            std::mem::size_of_val(&tb),
        )?;
        set(
            sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE,
            (&epilogue as *const sys::cublasLtEpilogue_t).cast(),
            std::mem::size_of_val(&epilogue),
        )?;
        // The heuristic takes the bias pointer's alignment from its value (cublasLt.h on
        // `CUBLASLT_MATMUL_DESC_BIAS_POINTER`): give it this call's, not NULL's.
        set(
            sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
            (&bias as *const u64).cast(),
            std::mem::size_of::<u64>(),
        )?;
        let (a_rows, a_cols) = if g.transa { (g.k, g.m) } else { (g.m, g.k) };
        let (b_rows, b_cols) = if g.transb { (g.n, g.k) } else { (g.k, g.n) };
        for (i, (r, c, ld)) in [
            (a_rows, a_cols, g.lda),
            (b_rows, b_cols, g.ldb),
            (g.m, g.n, g.ldd),
        ]
        .into_iter()
        .enumerate()
        {
            plan.layouts[i] = result::create_matrix_layout(ty, r as u64, c as u64, ld as i64)
                .map_err(|e| lt_err(e, "matrix layout"))?;
        }
        let pref = Pref(result::create_matmul_pref().map_err(|e| lt_err(e, "preference"))?);
        use sys::cublasLtMatmulPreferenceAttributes_t as P;
        let set_pref = |attr: P, v: *const c_void, n: usize| {
            // SAFETY: `pref` is live; `v` points at `n` readable bytes of the attribute's type.
            unsafe { result::set_matmul_pref_attribute(pref.0, attr, v, n) }
                .map_err(|e| lt_err(e, "preference attribute"))
        };
        // The workspace bound is a size_t, the operand alignments uint32_t (C is D).
        let ws = WORKSPACE_BYTES;
        set_pref(
            P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
            (&ws as *const usize).cast(),
            std::mem::size_of::<usize>(),
        )?;
        let [aa, ab, ad, _] = key.align;
        for (attr, v) in [
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, aa),
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, ab),
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, ad),
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, ad),
        ] {
            set_pref(attr, (&v as *const u32).cast(), std::mem::size_of::<u32>())?;
        }
        let [a, b, d] = plan.layouts;
        // SAFETY: every descriptor is live.
        match unsafe { result::get_matmul_algo_heuristic(handle, desc, a, b, d, d, pref.0) } {
            Ok(h) if h.workspaceSize <= WORKSPACE_BYTES => {
                plan.algo = h.algo;
                Ok(Some(plan))
            }
            Ok(_) => Ok(None),
            Err(e) => {
                tracing::debug!(?key, "cuBLASLt offers no algorithm ({e}); classic GEMM");
                Ok(None)
            }
        }
    }
}

/// A matmul preference, destroyed on drop.
struct Pref(sys::cublasLtMatmulPreference_t);

impl Drop for Pref {
    fn drop(&mut self) {
        // SAFETY: created once in `Plan::new`, destroyed once here.
        let _ = unsafe { result::destroy_matmul_pref(self.0) };
    }
}

/// Raw operands of one launch (the caller holds the views and their event guards).
struct Operands {
    a: u64,
    b: u64,
    d: u64,
    bias: u64,
}

/// Runs `g` with `epilogue` on `dev`'s stream; `Ok(false)` (nothing launched) when cuBLASLt
/// cannot.
///
/// # Safety
/// The pointers must address the elements `g` and the epilogue read and write, of type `T`.
unsafe fn launch<T: KernelFloat>(
    dev: &CudaDevice,
    g: Gemm,
    epilogue: Epilogue,
    ops: Operands,
) -> Result<bool> {
    if !enabled() {
        return Ok(false);
    }
    if !ops.bias.is_multiple_of(BIAS_ALIGN) {
        return Ok(false);
    }
    let dims = [g.m, g.n, g.k, g.lda, g.ldb, g.ldd];
    if dims.iter().any(|&d| d == 0 || d > i32::MAX as usize) {
        return Ok(false);
    }
    let bf16 = match T::DTYPE {
        DType::F32 => false,
        DType::BF16 => true,
        d => bail!("cuBLASLt GEMM: unsupported dtype {d:?}"),
    };
    let key = Key {
        device: dev.id(),
        bf16,
        gemm: g,
        epilogue,
        align: [
            alignment(ops.a),
            alignment(ops.b),
            alignment(ops.d),
            alignment(ops.bias),
        ],
    };
    let stream = dev.cuda_stream();
    STATE.with(|state| {
        let mut state = state.borrow_mut();
        let State { lts, plans } = &mut *state;
        let lt = match lts.entry(key.device) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let handle = result::create_handle().map_err(|e| lt_err(e, "handle"))?;
                // SAFETY: scratch memory, never read before cuBLASLt writes it.
                let workspace = match unsafe { dev.alloc::<u8>(WORKSPACE_BYTES) } {
                    Ok(w) => w,
                    Err(err) => {
                        // SAFETY: just created, not stored.
                        let _ = unsafe { result::destroy_handle(handle) };
                        return Err(err);
                    }
                };
                e.insert(Lt { handle, workspace })
            }
        };
        let plan = match plans.entry(key) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(Plan::new(lt.handle, &key, ops.bias)?)
            }
        };
        let Some(p) = plan.as_ref() else {
            return Ok(false);
        };
        // The bias pointer is per call (the plan is per shape).
        // SAFETY: `p.desc` is live; the pointer is a CUdeviceptr.
        unsafe {
            result::set_matmul_desc_attribute(
                p.desc,
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                (&ops.bias as *const u64).cast(),
                std::mem::size_of::<u64>(),
            )
        }
        .map_err(|e| lt_err(e, "bias pointer"))?;
        let (alpha, beta) = (1f32, 0f32);
        let (ws, _ws_guard) = lt.workspace.device_ptr_mut(&stream);
        let [la, lb, ld] = p.layouts;
        // SAFETY: the caller vouches for the operands; the plan matches them (its key holds
        // the shape, dtype and alignments); beta = 0, so C (= D) is not read.
        let launched = unsafe {
            result::matmul(
                lt.handle,
                p.desc,
                (&alpha as *const f32).cast(),
                (&beta as *const f32).cast(),
                ops.a as *const c_void,
                la,
                ops.b as *const c_void,
                lb,
                ops.d as *const c_void,
                ld,
                ops.d as *mut c_void,
                ld,
                &p.algo,
                ws as *mut c_void,
                WORKSPACE_BYTES,
                stream.cu_stream() as sys::cudaStream_t,
            )
        };
        use sys::cublasStatus_t as S;
        match launched {
            Ok(()) => Ok(true),
            // Only a refusal of this plan falls back. Anything else (an execution failure, often
            // a sticky error an earlier kernel left) is the caller's error: the classic GEMM
            // would fail next and point at the wrong op.
            Err(e)
                if matches!(
                    e.0,
                    S::CUBLAS_STATUS_NOT_SUPPORTED | S::CUBLAS_STATUS_INVALID_VALUE
                ) =>
            {
                tracing::warn!(
                    ?key,
                    "cuBLASLt refused a planned GEMM ({e}); classic GEMM from now on"
                );
                *plan = None;
                Ok(false)
            }
            Err(e) => Err(lt_err(e, "matmul")),
        }
    })
}

/// `D = op(A)·op(B) + bias` (bias: `g.m` elements, broadcast over D's columns). `Ok(false)`:
/// not launched, use the classic path.
///
/// # Safety
/// The views must hold the elements `g` addresses.
pub unsafe fn gemm_bias<T: KernelFloat>(
    dev: &CudaDevice,
    g: Gemm,
    a: &CudaView<'_, T>,
    b: &CudaView<'_, T>,
    d: &mut CudaViewMut<'_, T>,
    bias: &CudaView<'_, T>,
) -> Result<bool> {
    if bias.len() != g.m {
        bail!("cuBLASLt GEMM: bias of {} for {} rows", bias.len(), g.m);
    }
    let stream = dev.cuda_stream();
    let (pa, _ga) = a.device_ptr(&stream);
    let (pb, _gb) = b.device_ptr(&stream);
    let (pbias, _gbias) = bias.device_ptr(&stream);
    let (pd, _gd) = d.device_ptr_mut(&stream);
    let ops = Operands {
        a: pa,
        b: pb,
        d: pd,
        bias: pbias,
    };
    // SAFETY: forwarded from the caller.
    unsafe { launch::<T>(dev, g, Epilogue::Bias, ops) }
}

/// `D = op(A)·op(B)` and `bias_grad = Σ_k op(B)` (`g.n` elements: the column sums of `op(B)`
/// over the reduced dimension) in one GEMM. `Ok(false)`: not launched, use the classic path.
///
/// # Safety
/// The views must hold the elements `g` addresses.
pub unsafe fn gemm_bias_grad<T: KernelFloat>(
    dev: &CudaDevice,
    g: Gemm,
    a: &CudaView<'_, T>,
    b: &CudaView<'_, T>,
    d: &mut CudaViewMut<'_, T>,
    bias_grad: &mut CudaViewMut<'_, T>,
) -> Result<bool> {
    if bias_grad.len() != g.n {
        bail!(
            "cuBLASLt GEMM: bias gradient of {} for {} columns",
            bias_grad.len(),
            g.n
        );
    }
    let stream = dev.cuda_stream();
    let (pa, _ga) = a.device_ptr(&stream);
    let (pb, _gb) = b.device_ptr(&stream);
    let (pbias, _gbias) = bias_grad.device_ptr_mut(&stream);
    let (pd, _gd) = d.device_ptr_mut(&stream);
    let ops = Operands {
        a: pa,
        b: pb,
        d: pd,
        bias: pbias,
    };
    // SAFETY: forwarded from the caller.
    unsafe { launch::<T>(dev, g, Epilogue::BiasGradB, ops) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alignment_is_the_lowest_set_bit_capped_at_256() {
        assert_eq!(alignment(0x1000), 256);
        assert_eq!(alignment(0x1002), 2);
        assert_eq!(alignment(0x1010), 16);
        assert_eq!(alignment(0x1080), 128);
        assert_eq!(alignment(0), 256);
    }
}
