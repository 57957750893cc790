//! cuDNN's fused attention (SDPA) behind the `cudnn` feature: torch's fastest attention on
//! Hopper, about 4–5× our own flash kernels there (bench/GPU-RESULTS.md).
//!
//! `src/kernels/cudnn/sdpa.cpp` builds cuDNN-frontend graphs that read q, k and v out of the
//! fused projection through strides and write dq, dk and dv back the same way, so the op keeps
//! the layout of [`super::attention`]. This module is its Rust side: opening libcudnn (once, at
//! run time: a binary with the feature still runs where cuDNN is missing, on our own kernels),
//! and one forward and one backward call on candle storages.
//!
//! The backward pass needs the forward's per-row log-sum-exp. The forward writes it into a tail
//! of the output's own allocation, after the `[B, N, D]` the layout covers ([`StatsTail`]), so
//! it lives exactly as long as the output that the backward pass receives.

use std::ffi::{CStr, c_char, c_int, c_void};
use std::sync::{Arc, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result, Shape, bail};
use half::bf16;

unsafe extern "C" {
    fn vjepa_cudnn_load(path: *const c_char) -> c_int;
    fn vjepa_cudnn_version() -> usize;
    fn vjepa_cudnn_error() -> *const c_char;
    fn vjepa_cudnn_graph_stats(graphs_built: *mut i64, seconds: *mut f64);
    fn vjepa_cudnn_sdpa_prepare(
        stream: *mut c_void,
        device: c_int,
        kind: c_int,
        dtype: c_int,
        b: i64,
        h: i64,
        n: i64,
        hd: i64,
        scale: f32,
        stats: c_int,
        deterministic: c_int,
        dynamic: c_int,
        entry: *mut *mut c_void,
        workspace: *mut i64,
    ) -> c_int;
    fn vjepa_cudnn_dynamic_refusals(count: *mut i64) -> *const c_char;
    fn vjepa_cudnn_sdpa_fwd(
        entry: *mut c_void,
        stream: *mut c_void,
        qkv: *const c_void,
        out: *mut c_void,
        stats: *mut c_void,
        workspace: *mut c_void,
    ) -> c_int;
    #[allow(clippy::too_many_arguments)]
    fn vjepa_cudnn_sdpa_bwd(
        entry: *mut c_void,
        stream: *mut c_void,
        qkv: *const c_void,
        out: *const c_void,
        dout: *const c_void,
        stats: *const c_void,
        dqkv: *mut c_void,
        workspace: *mut c_void,
    ) -> c_int;
}

/// Environment variable that turns dynamic shapes on (`1`, `on`, `true`, `yes`; see
/// [`set_dynamic_shapes`]).
pub const DYNAMIC_ENV: &str = "VJEPA_CUDNN_DYNAMIC";

static DYNAMIC: super::EnvSwitch = super::EnvSwitch::new(DYNAMIC_ENV, false);

/// Whether new attention graphs are built with dynamic shapes (off unless [`DYNAMIC_ENV`] or
/// [`set_dynamic_shapes`] turns it on).
pub fn dynamic_shapes() -> bool {
    DYNAMIC.get()
}

/// Builds attention graphs from now on with dynamic shapes and one kernel cache per graph
/// structure (cuDNN ≥ 9.4), or with static shapes (the default).
///
/// Why: the context length changes every step, and each new length costs a graph build; with
/// static shapes each build compiles its own kernels (reported 55–70 ms on a B200), with
/// dynamic shapes a new length reuses the structure's kernels. The kernels may be a little
/// slower than shape-specialised ones, which is why it is a switch (`bench/gpu-step.sh` and the
/// graph build seconds `train-step` reports say which wins). Structures cuDNN refuses to build
/// dynamically fall back to static shapes ([`dynamic_refusals`]).
pub fn set_dynamic_shapes(on: bool) {
    DYNAMIC.set(on);
}

/// Graph structures cuDNN would not build with dynamic shapes (built static instead), and the
/// last reason ("" when none).
pub fn dynamic_refusals() -> (i64, String) {
    if loaded().is_err() {
        return (0, String::new());
    }
    let mut n = 0i64;
    // SAFETY: one out-pointer; the shim returns a NUL-terminated string it owns, copied at once.
    let why = unsafe { CStr::from_ptr(vjepa_cudnn_dynamic_refusals(&mut n)) }
        .to_string_lossy()
        .into_owned();
    (n, why)
}

/// Environment variable naming the libcudnn to open (a path or a soname); default
/// `libcudnn.so.9` from the loader's search path.
pub const LIB_ENV: &str = "VJEPA_CUDNN_LIB";

fn last_error() -> String {
    // SAFETY: the shim returns a NUL-terminated thread-local string, valid until its next call
    // on this thread; it is copied at once.
    unsafe { CStr::from_ptr(vjepa_cudnn_error()) }
        .to_string_lossy()
        .into_owned()
}

/// Opens libcudnn once per process: `Ok(version)` (9.10.2 → 91002) when cuDNN can be used,
/// otherwise why not (the same answer on every call).
pub fn load() -> std::result::Result<usize, String> {
    loaded().clone()
}

/// Whether libcudnn loaded (the per-call question of `auto`: no allocation).
pub fn available() -> bool {
    loaded().is_ok()
}

fn loaded() -> &'static std::result::Result<usize, String> {
    static LOADED: OnceLock<std::result::Result<usize, String>> = OnceLock::new();
    LOADED.get_or_init(|| {
        let path = std::env::var(LIB_ENV).ok();
        let c_path = path
            .as_deref()
            .map(std::ffi::CString::new)
            .transpose()
            .map_err(|_| format!("{LIB_ENV} contains a NUL byte"))?;
        let ptr = c_path.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
        // SAFETY: a valid C string or null; the shim serialises loading.
        if unsafe { vjepa_cudnn_load(ptr) } != 0 {
            return Err(last_error());
        }
        // SAFETY: no arguments; answers 0 if the library stopped answering.
        match unsafe { vjepa_cudnn_version() } {
            0 => Err("libcudnn loaded but reports no version".to_string()),
            v if v < 90000 => Err(format!(
                "cuDNN {v} is too old: fused attention needs cuDNN 9"
            )),
            v => Ok(v),
        }
    })
}

/// Graphs built so far in this process (one per shape, direction and options; each new
/// context length adds some) and the seconds spent building them.
pub fn graph_stats() -> (usize, f64) {
    let (mut n, mut secs) = (0i64, 0f64);
    // SAFETY: two valid out-pointers; the shim reads its cache under its lock.
    unsafe { vjepa_cudnn_graph_stats(&mut n, &mut secs) };
    (n.max(0) as usize, secs)
}

/// Whether [`fwd`] takes a problem of this dtype and head dim: bf16 only (cuDNN's fused SDPA
/// has no fp32 kernels), head dims that are multiples of 8 up to 128, rows 16-byte aligned.
pub fn supports(dtype: DType, hd: usize, start_offset: usize) -> bool {
    dtype == DType::BF16
        && super::attention::cudnn_takes_head_dim(hd)
        && start_offset.is_multiple_of(8)
}

/// Where the forward's statistics sit in its output allocation: `[B, N, D]` bf16 elements,
/// padded to 256 bytes, then `[B, H, N]` f32 (two bf16 slots each).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatsTail {
    /// First bf16 slot of the statistics.
    pub start: usize,
    /// Total bf16 slots of the allocation.
    pub len: usize,
}

/// Problem sizes and options of one call.
#[derive(Clone, Copy, Debug)]
pub struct Sdpa {
    /// Batch B.
    pub b: usize,
    /// Sequence length N.
    pub n: usize,
    /// Heads H.
    pub heads: usize,
    /// Head dim.
    pub hd: usize,
    /// Softmax scale (1/√hd).
    pub scale: f32,
}

impl Sdpa {
    /// Where this problem's forward keeps its statistics.
    pub fn tail(&self) -> StatsTail {
        let out = self.b * self.n * self.heads * self.hd;
        let start = out.div_ceil(128) * 128;
        StatsTail {
            start,
            len: start + 2 * self.b * self.heads * self.n,
        }
    }
}

/// What one call needs besides its operands: the device's stream (raw, for the shim), the
/// prepared graph and its workspace.
struct Call {
    stream: Arc<CudaStream>,
    raw_stream: *mut c_void,
    entry: *mut c_void,
    workspace: CudaSlice<u8>,
}

/// Finds or builds the graph for `p` and allocates its workspace on `dev`'s stream.
fn prepare(
    dev: &CudaDevice,
    backward: bool,
    p: Sdpa,
    stats: bool,
    deterministic: bool,
) -> Result<Call> {
    let stream = dev.cuda_stream();
    let raw_stream = stream.cu_stream() as *mut c_void;
    // With the stream and the calling thread, where the shim's handle and graphs may be used.
    let device = c_int::try_from(stream.context().ordinal()).map_err(|_| {
        candle_core::Error::Msg("cuDNN attention: device ordinal out of range".into())
    })?;
    if let Err(e) = loaded() {
        bail!("cuDNN attention unavailable: {e}");
    }
    let mut entry = std::ptr::null_mut();
    let mut workspace = 0i64;
    // SAFETY: plain values and two valid out-pointers; the shim keeps the graph alive for the
    // life of the process and serialises graph building.
    let rc = unsafe {
        vjepa_cudnn_sdpa_prepare(
            raw_stream,
            device,
            c_int::from(backward),
            0,
            p.b as i64,
            p.heads as i64,
            p.n as i64,
            p.hd as i64,
            p.scale,
            c_int::from(stats),
            c_int::from(deterministic),
            c_int::from(dynamic_shapes()),
            &mut entry,
            &mut workspace,
        )
    };
    if rc != 0 {
        bail!("cuDNN attention: {}", last_error());
    }
    // SAFETY: scratch for cuDNN only.
    let workspace = unsafe { dev.alloc::<u8>((workspace.max(0) as usize).max(1))? };
    Ok(Call {
        stream,
        raw_stream,
        entry,
        workspace,
    })
}

/// softmax(q·kᵀ·scale)·v from `qkv [B, N, 3D]` (contiguous bf16, as [`super::attention`] lays
/// it out) into a new `[B, N, D]` storage. With `stats` the allocation carries the backward
/// pass's statistics in its [`StatsTail`].
pub fn fwd(qkv: &CudaStorage, l: &Layout, p: Sdpa, stats: bool) -> Result<(CudaStorage, Shape)> {
    if qkv.dtype() != DType::BF16 {
        bail!("cuDNN attention: bf16 only, got {:?}", qkv.dtype());
    }
    let Some((a, b_end)) = l.contiguous_offsets() else {
        bail!("cuDNN attention: qkv must be contiguous");
    };
    let d = p.heads * p.hd;
    if b_end - a != p.b * p.n * 3 * d {
        bail!(
            "cuDNN attention: qkv holds {} elements, not B·N·3D",
            b_end - a
        );
    }
    let dev = &qkv.device;
    let mut call = prepare(dev, false, p, stats, false)?;
    let stream = &call.stream;
    let tail = p.tail();
    let len = if stats { tail.len } else { p.b * p.n * d };
    // SAFETY: cuDNN writes all B·N·D outputs (and every statistic when asked); the padding
    // between them is never read.
    let mut out = unsafe { dev.alloc::<bf16>(len)? };
    let src: &CudaSlice<bf16> = qkv.as_cuda_slice::<bf16>()?;
    {
        let (q_ptr, _q) = src.device_ptr(stream);
        let (o_ptr, _o) = out.device_ptr_mut(stream);
        let (w_ptr, _w) = call.workspace.device_ptr_mut(stream);
        let q_ptr = q_ptr + (a * 2) as u64;
        let stats_ptr = if stats {
            (o_ptr + (tail.start * 2) as u64) as *mut c_void
        } else {
            std::ptr::null_mut()
        };
        // SAFETY: the pointers address live allocations of the sizes the graph was built for
        // (checked above), all on `stream`, which the shim's handle runs on.
        let rc = unsafe {
            vjepa_cudnn_sdpa_fwd(
                call.entry,
                call.raw_stream,
                q_ptr as *const c_void,
                o_ptr as *mut c_void,
                stats_ptr,
                w_ptr as *mut c_void,
            )
        };
        if rc != 0 {
            bail!("cuDNN attention: {}", last_error());
        }
    }
    Ok((
        CudaStorage::wrap_cuda_slice(out, dev.clone()),
        Shape::from((p.b, p.n, d)),
    ))
}

/// Whether `out` (a forward output, given to the backward op) carries cuDNN statistics: it was
/// made by [`fwd`] with stats exactly when its allocation has the [`StatsTail`] length.
pub fn has_stats(out: &CudaStorage, lo: &Layout, p: Sdpa) -> bool {
    out.dtype() == DType::BF16
        && lo.start_offset() == 0
        && lo.is_contiguous()
        && out
            .as_cuda_slice::<bf16>()
            .is_ok_and(|s| s.len() == p.tail().len)
}

/// Backward of [`fwd`] (made with stats): `dqkv [B, N, 3D]` from qkv, the forward's output and
/// the output's gradient. `deterministic` picks cuDNN's engine without atomics.
#[allow(clippy::too_many_arguments)]
pub fn bwd(
    qkv: &CudaStorage,
    lq: &Layout,
    out: &CudaStorage,
    lo: &Layout,
    dout: &CudaStorage,
    ld: &Layout,
    p: Sdpa,
    deterministic: bool,
) -> Result<(CudaStorage, Shape)> {
    if !has_stats(out, lo, p) {
        bail!("cuDNN attention backward: the forward output carries no cuDNN statistics");
    }
    let d = p.heads * p.hd;
    let (Some((qa, _)), Some((da, db))) = (lq.contiguous_offsets(), ld.contiguous_offsets()) else {
        bail!("cuDNN attention backward: qkv and dout must be contiguous");
    };
    if db - da != p.b * p.n * d || !qa.is_multiple_of(8) || !da.is_multiple_of(8) {
        bail!("cuDNN attention backward: dout must be [B, N, D], rows 16-byte aligned");
    }
    if dout.dtype() != DType::BF16 || qkv.dtype() != DType::BF16 {
        bail!("cuDNN attention backward: bf16 only");
    }
    let dev = &qkv.device;
    let mut call = prepare(dev, true, p, true, deterministic)?;
    let stream = &call.stream;
    let tail = p.tail();
    // SAFETY: cuDNN writes every dq, dk and dv element.
    let mut dqkv = unsafe { dev.alloc::<bf16>(p.b * p.n * 3 * d)? };
    {
        let (q_ptr, _q) = qkv.as_cuda_slice::<bf16>()?.device_ptr(stream);
        let (o_ptr, _o) = out.as_cuda_slice::<bf16>()?.device_ptr(stream);
        let (g_ptr, _g) = dout.as_cuda_slice::<bf16>()?.device_ptr(stream);
        let (dq_ptr, _dq) = dqkv.device_ptr_mut(stream);
        let (w_ptr, _w) = call.workspace.device_ptr_mut(stream);
        // SAFETY: as in `fwd`; the statistics are the tail of `out` that `has_stats` checked.
        let rc = unsafe {
            vjepa_cudnn_sdpa_bwd(
                call.entry,
                call.raw_stream,
                (q_ptr + (qa * 2) as u64) as *const c_void,
                o_ptr as *const c_void,
                (g_ptr + (da * 2) as u64) as *const c_void,
                (o_ptr + (tail.start * 2) as u64) as *const c_void,
                dq_ptr as *mut c_void,
                w_ptr as *mut c_void,
            )
        };
        if rc != 0 {
            bail!("cuDNN attention backward: {}", last_error());
        }
    }
    Ok((
        CudaStorage::wrap_cuda_slice(dqkv, dev.clone()),
        Shape::from((p.b, p.n, 3 * d)),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_tail_is_aligned_and_sized() {
        let sdpa = |b, n, heads, hd| Sdpa {
            b,
            n,
            heads,
            hd,
            scale: 1.0,
        };
        let t = sdpa(8, 1568, 16, 64).tail();
        assert_eq!(t.start, 8 * 1568 * 1024);
        assert_eq!(t.len, t.start + 2 * 8 * 16 * 1568);
        let t = sdpa(2, 95, 3, 24).tail();
        assert!(t.start >= 2 * 95 * 72 && t.start.is_multiple_of(128));
    }
}
