//! CUDA implementations of the fused op layer (one function per kernel family).
//!
//! The kernels live in `src/kernels/cuda/*.cu`; `build.rs` compiles them to PTX (sm_90) when the
//! `cuda` feature is on, and they are loaded on first use through candle's
//! [`CudaDevice::get_or_load_custom_func`] (one module per `.cu` file, cached by the device).
//! Each function takes candle [`CudaStorage`]s with their [`Layout`]s, as the `cuda_fwd` of a
//! `CustomOpN`/`InplaceOpN` receives them, checks dtype/contiguity/shape with a clear error, and
//! returns a new storage (or updates one in place). Everything computes in fp32; storage may be
//! f32 or bf16 (AdamW/EMA: f32 only, they update fp32 master weights).
//!
//! Reductions (column sums, LayerNorm dweight/dbias, sum of squares) are two-stage with a fixed
//! split that depends only on the shape, so results are deterministic run to run. The attention
//! backward uses no atomics for the same reason.

use candle_core::cuda_backend::cudarc::cublas::sys::cublasOperation_t;
use candle_core::cuda_backend::cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute_enum;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaView, CudaViewMut, DevicePtr, DeviceRepr, LaunchConfig,
    PushKernelArg, ValidAsZeroBits,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{
    CudaDevice, CudaStorage, DType, Layout, Result, Shape, Storage, Tensor, WithDType, bail,
};
use half::bf16;

pub mod cublaslt;

const ATTENTION_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/attention.ptx"));
const NORM_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/norm.ptx"));
const ELEMENTWISE_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/elementwise.ptx"));
const OPTIM_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/optim.ptx"));

/// One PTX module: the name candle caches it under, and its text.
#[derive(Clone, Copy)]
struct Module(&'static str, &'static str);

const ATTENTION: Module = Module("vjepa_attention", ATTENTION_PTX);
const NORM: Module = Module("vjepa_norm", NORM_PTX);
const ELEMENTWISE: Module = Module("vjepa_elementwise", ELEMENTWISE_PTX);
const OPTIM: Module = Module("vjepa_optim", OPTIM_PTX);

/// Rows per block of the bias/GELU forward kernels.
const ELEMWISE_ROWS: usize = 16;
/// Largest head dim the attention kernels are instantiated for.
pub const MAX_HEAD_DIM: usize = 128;
/// Query/key tile of the attention kernels.
const ATTN_TILE: usize = 64;
/// Padded stride of the transposed attention tiles (see attention.cu).
const ATTN_LD: usize = 68;
/// Elements per block of the multi-tensor optimizer kernels.
const MULTI_CHUNK: usize = 8192;

/// Storage element types the kernels accept (fp32 compute either way).
pub trait KernelFloat: CudaDType + DeviceRepr + WithDType + ValidAsZeroBits {
    /// cuBLAS GEMM for this type (fp32 accumulation), column-major as cuBLAS sees it.
    ///
    /// # Safety
    /// The views must hold the elements `cfg` addresses.
    unsafe fn gemm(
        blas: &CudaBlas,
        cfg: GemmConfig<Self>,
        a: &CudaView<'_, Self>,
        b: &CudaView<'_, Self>,
        c: &mut CudaViewMut<'_, Self>,
    ) -> Result<()>;
}

impl KernelFloat for f32 {
    unsafe fn gemm(
        blas: &CudaBlas,
        cfg: GemmConfig<Self>,
        a: &CudaView<'_, Self>,
        b: &CudaView<'_, Self>,
        c: &mut CudaViewMut<'_, Self>,
    ) -> Result<()> {
        // SAFETY: forwarded from the caller.
        unsafe { Gemm::<f32>::gemm(blas, cfg, a, b, c) }.w()
    }
}

impl KernelFloat for bf16 {
    unsafe fn gemm(
        blas: &CudaBlas,
        cfg: GemmConfig<Self>,
        a: &CudaView<'_, Self>,
        b: &CudaView<'_, Self>,
        c: &mut CudaViewMut<'_, Self>,
    ) -> Result<()> {
        // SAFETY: forwarded from the caller.
        unsafe { Gemm::<bf16>::gemm(blas, cfg, a, b, c) }.w()
    }
}

fn load(dev: &CudaDevice, m: Module, name: &str) -> Result<CudaFunction> {
    Ok(dev
        .get_or_load_custom_func(name, m.0, m.1)?
        .into_cuda_function())
}

/// The contiguous elements of `s` under `l`, or an error naming the operand.
fn view<'a, T: KernelFloat>(
    s: &'a CudaStorage,
    l: &Layout,
    op: &str,
    what: &str,
) -> Result<CudaView<'a, T>> {
    let slice: &CudaSlice<T> = s.as_cuda_slice::<T>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(slice.slice(a..b)),
        None => bail!(
            "{op}: {what} must be contiguous (got strides {:?})",
            l.stride()
        ),
    }
}

/// The storage's dtype, which must be f32 or bf16 (or only f32 when `f32_only`).
fn float_dtype(s: &CudaStorage, op: &str, f32_only: bool) -> Result<DType> {
    use candle_core::backend::BackendStorage;
    match s.dtype() {
        DType::F32 => Ok(DType::F32),
        DType::BF16 if !f32_only => Ok(DType::BF16),
        d if f32_only => bail!("{op}: only f32 is supported, got {d:?}"),
        d => bail!("{op}: only f32 and bf16 are supported, got {d:?}"),
    }
}

fn same_dtype(op: &str, a: &CudaStorage, others: &[&CudaStorage]) -> Result<DType> {
    use candle_core::backend::BackendStorage;
    let d = float_dtype(a, op, false)?;
    for o in others {
        if o.dtype() != d {
            bail!(
                "{op}: operands must share one dtype ({d:?} vs {:?})",
                o.dtype()
            );
        }
    }
    Ok(d)
}

/// `(rows, cols)` of a tensor seen as `[..., cols]` (rank ≥ 1).
fn rows_cols(l: &Layout, op: &str) -> Result<(usize, usize)> {
    let dims = l.dims();
    let Some(&cols) = dims.last() else {
        bail!("{op}: expected at least one dimension, got a scalar")
    };
    if cols == 0 {
        bail!("{op}: the last dimension is empty");
    }
    Ok((dims.iter().product::<usize>() / cols, cols))
}

fn check_vec(l: &Layout, cols: usize, op: &str, what: &str) -> Result<()> {
    if l.dims() != [cols] {
        bail!("{op}: {what} must have shape [{cols}], got {:?}", l.dims());
    }
    Ok(())
}

fn u32_of(v: usize, op: &str, what: &str) -> Result<u32> {
    u32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("{op}: {what} {v} exceeds u32")))
}

/// Rows per chunk of the column reductions: at least 32, and at most ~512 chunks (so the
/// partials stay small next to the input). A function of the row count only.
fn reduce_rows(rows: usize) -> usize {
    32usize.max(rows.div_ceil(512))
}

/// Vector width of the row kernels: 4 when the rows split into aligned 4-element vectors (every
/// operand starts at a multiple of 4 elements), else 1.
fn vec_width(cols: usize, starts: &[usize]) -> usize {
    if cols.is_multiple_of(4) && starts.iter().all(|s| s.is_multiple_of(4)) {
        4
    } else {
        1
    }
}

/// Launch of the row-chunk kernels in elementwise.cu: one block per `rpc` rows, threads over the
/// row's `cols / v` vectors (x) and the chunk's rows (y).
fn row_launch(rows: usize, cols: usize, v: usize, rpc: usize) -> (LaunchConfig, usize) {
    let cv = (cols / v).max(1);
    let bx = cv.div_ceil(32).min(8) * 32;
    let nchunks = rows.div_ceil(rpc).max(1);
    let cfg = LaunchConfig {
        grid_dim: (nchunks as u32, 1, 1),
        block_dim: (bx as u32, (256 / bx) as u32, 1),
        shared_mem_bytes: 0,
    };
    (cfg, nchunks)
}

/// Launch of `colsum_final_*` / `ln_final_*`: (32, 8) blocks over the columns.
fn final_cfg(cols: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (cols.div_ceil(32) as u32, 1, 1),
        block_dim: (32, 8, 1),
        shared_mem_bytes: 0,
    }
}

fn linear_cfg(n: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((n.div_ceil(threads as usize)).max(1) as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Grid-stride launch for `n` elements (at most 8192 blocks of 256).
fn stride_cfg(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(256).clamp(1, 8192) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The device's default memory pool (the one `cuMemAllocAsync`, and so candle, allocates from),
/// with the context bound to this thread.
fn default_pool(
    dev: &CudaDevice,
) -> Result<candle_core::cuda_backend::cudarc::driver::sys::CUmemoryPool> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let stream = dev.cuda_stream();
    let ctx = stream.context();
    ctx.bind_to_thread().w()?;
    let mut pool = std::mem::MaybeUninit::<sys::CUmemoryPool>::uninit();
    // SAFETY: the out-pointer is valid; the device handle comes from the live context.
    unsafe { sys::cuDeviceGetDefaultMemPool(pool.as_mut_ptr(), ctx.cu_device()) }
        .result()
        .w()?;
    // SAFETY: initialised by the successful call above.
    Ok(unsafe { pool.assume_init() })
}

/// Makes the device's stream-ordered memory pool keep freed memory instead of handing it back
/// to the driver at every synchronisation (CUDA's default release threshold is 0, so each
/// training step, which syncs to read its loss, would re-map all of its activations; torch's
/// caching allocator avoids the same cost). Call once after creating the device.
pub fn keep_pool_memory(dev: &CudaDevice) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let pool = default_pool(dev)?;
    let mut threshold = u64::MAX;
    // SAFETY: RELEASE_THRESHOLD takes a cuuint64_t.
    unsafe {
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )
    }
    .result()
    .w()?;
    Ok(())
}

/// The most bytes the device's default memory pool has held at once (its reserved high-water
/// mark: what `torch.cuda.max_memory_reserved` reports for torch's caching allocator), for
/// benchmarks. Excludes the CUDA context, kernel images and library workspaces allocated
/// outside the pool.
pub fn pool_reserved_high(dev: &CudaDevice) -> Result<u64> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let pool = default_pool(dev)?;
    let mut high = 0u64;
    // SAFETY: RESERVED_MEM_HIGH is a cuuint64_t.
    unsafe {
        sys::cuMemPoolGetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH,
            (&mut high as *mut u64).cast(),
        )
    }
    .result()
    .w()?;
    Ok(high)
}

/// Bytes of the device's memory in use (total − free, the CUDA context included), for
/// benchmarks: with [`keep_pool_memory`] freed blocks stay with the process, so after a run this
/// is its peak reservation plus the context.
pub fn device_memory_used(dev: &CudaDevice) -> Result<usize> {
    dev.cuda_stream().context().bind_to_thread().w()?;
    let (free, total) = candle_core::cuda_backend::cudarc::driver::result::mem_get_info().w()?;
    Ok(total.saturating_sub(free))
}

// ---------------------------------------------------------------------------------------------
// Attention

/// Shape of a fused-qkv attention problem.
#[derive(Clone, Copy, Debug)]
struct AttnDims {
    b: usize,
    n: usize,
    heads: usize,
    hd: usize,
}

impl AttnDims {
    fn of(l: &Layout, heads: usize, op: &str) -> Result<Self> {
        let (b, n, three_d) = l.shape().dims3()?;
        if heads == 0 || !three_d.is_multiple_of(3) || (three_d / 3) % heads != 0 {
            bail!("{op}: qkv last dim {three_d} is not 3·heads·head_dim with heads = {heads}");
        }
        let hd = three_d / 3 / heads;
        if hd == 0 || !hd.is_multiple_of(4) || hd > MAX_HEAD_DIM {
            bail!("{op}: head dim {hd} unsupported (a multiple of 4, at most {MAX_HEAD_DIM})");
        }
        if b * heads > 65_535 {
            bail!(
                "{op}: batch·heads = {} exceeds the grid limit 65535",
                b * heads
            );
        }
        if n == 0 || b == 0 {
            bail!("{op}: empty qkv {:?}", l.dims());
        }
        if !l.start_offset().is_multiple_of(4) {
            bail!("{op}: qkv must start at a multiple of 4 elements (vector loads)");
        }
        Ok(Self { b, n, heads, hd })
    }

    fn d(&self) -> usize {
        self.heads * self.hd
    }

    /// Head dim padded to the kernel instantiation (multiple of 16).
    fn hdp(&self) -> usize {
        self.hd.div_ceil(16) * 16
    }

    fn grid(&self, smem: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (
                self.n.div_ceil(ATTN_TILE) as u32,
                (self.b * self.heads) as u32,
                1,
            ),
            block_dim: (256, 1, 1),
            shared_mem_bytes: smem as u32,
        }
    }

    /// log2(e)/√hd: the kernels work with base-2 scores.
    fn scale_log2(&self) -> f32 {
        (std::f64::consts::LOG2_E / (self.hd as f64).sqrt()) as f32
    }

    fn scale(&self) -> f32 {
        (1.0 / (self.hd as f64).sqrt()) as f32
    }

    #[cfg(feature = "cudnn")]
    fn sdpa(&self) -> super::cudnn::Sdpa {
        super::cudnn::Sdpa {
            b: self.b,
            n: self.n,
            heads: self.heads,
            hd: self.hd,
            scale: self.scale(),
        }
    }
}

/// Loads an attention kernel and allows it the dynamic shared memory it needs (above 48 KiB).
fn attn_func(dev: &CudaDevice, name: &str, smem: usize) -> Result<CudaFunction> {
    let f = load(dev, ATTENTION, name)?;
    f.set_attribute(
        CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        smem as i32,
    )
    .w()?;
    Ok(f)
}

fn attn_fwd_smem(hdp: usize) -> usize {
    (3 * hdp * ATTN_LD + ATTN_TILE * ATTN_TILE) * 4
}
/// Shared memory of `attn_fwd_tc_bf16_*` (TcLayout in attention.cu).
fn attn_fwd_tc_smem(hdp: usize) -> usize {
    3 * ATTN_TILE * (hdp + 8) * 2
        + ATTN_TILE * (ATTN_TILE + 4) * 4
        + ATTN_TILE * (ATTN_TILE + 8) * 2
        + ATTN_TILE * (hdp + 4) * 4
}
/// Shared memory of the bf16 tensor-core backward kernels (TcBwd in attention.cu):
/// (stats, dK/dV and dQ).
fn attn_bwd_tc_smem(hdp: usize) -> (usize, usize) {
    let tile_h = ATTN_TILE * (hdp + 8) * 2;
    let tile_s = ATTN_TILE * (ATTN_TILE + 4) * 4;
    let tile_p = ATTN_TILE * (ATTN_TILE + 8) * 2;
    (
        2 * tile_h + tile_s,
        4 * tile_h + 2 * tile_s + 2 * tile_p + 2 * ATTN_TILE * 4,
    )
}
fn attn_stats_smem(hdp: usize) -> usize {
    2 * hdp * ATTN_LD * 4
}
fn attn_dkdv_smem(hdp: usize) -> usize {
    (4 * hdp * ATTN_LD + 2 * ATTN_TILE * ATTN_TILE + 2 * ATTN_TILE) * 4
}
fn attn_dq_smem(hdp: usize) -> usize {
    (4 * hdp * ATTN_LD + ATTN_TILE * ATTN_TILE + 2 * ATTN_TILE) * 4
}

/// Which forward kernel [`attention_fwd_with`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttnKernel {
    /// Tensor cores for bf16 with hd a multiple of 8, the fp32 CUDA-core kernel otherwise.
    Auto,
    /// Always the fp32 CUDA-core kernel (any supported dtype).
    Simt,
}

/// Multi-head attention on the fused projection `qkv [B, N, 3·D]` (columns `[q | k | v]`, head
/// `h` at `h·hd..(h+1)·hd`): returns `softmax(q·kᵀ/√hd)·v` as `[B, N, D]`, heads concatenated.
/// f32 or bf16; hd a multiple of 4, ≤ 128. Runs cuDNN's fused attention or our flash-style
/// kernel (one launch, online softmax, no N×N buffer) as [`super::attention_backend`] says;
/// `stats` keeps cuDNN's row statistics for a backward pass.
pub fn attention_fwd(
    qkv: &CudaStorage,
    l: &Layout,
    heads: usize,
    stats: bool,
) -> Result<(CudaStorage, Shape)> {
    use super::AttentionBackend;
    let backend = super::attention_backend();
    if backend == AttentionBackend::Own {
        return attention_fwd_with(qkv, l, heads, AttnKernel::Auto);
    }
    let dims = AttnDims::of(l, heads, "attention (cuda)")?;
    #[cfg(feature = "cudnn")]
    {
        use candle_core::backend::BackendStorage;
        let usable = super::cudnn::supports(qkv.dtype(), dims.hd, l.start_offset())
            && (backend == AttentionBackend::Cudnn || super::cudnn::available());
        if usable {
            match super::cudnn::fwd(qkv, l, dims.sdpa(), stats) {
                Ok(r) => return Ok(r),
                Err(e) if backend == AttentionBackend::Cudnn => return Err(e),
                Err(e) => cudnn_fallback_warning(&dims, &e),
            }
        }
    }
    #[cfg(not(feature = "cudnn"))]
    let _ = stats;
    if backend == AttentionBackend::Cudnn {
        bail!(
            "attention backend cudnn cannot run this problem ({:?}, head dim {}): {}",
            qkv_dtype(qkv),
            dims.hd,
            if cfg!(feature = "cudnn") {
                "cuDNN takes bf16 with head dims that are multiples of 8"
            } else {
                "this binary was built without the `cudnn` feature"
            }
        );
    }
    attention_fwd_with(qkv, l, heads, AttnKernel::Auto)
}

fn qkv_dtype(s: &CudaStorage) -> DType {
    use candle_core::backend::BackendStorage;
    s.dtype()
}

/// Says once per process that cuDNN refused a problem `auto` then ran on our kernels.
#[cfg(feature = "cudnn")]
fn cudnn_fallback_warning(dims: &AttnDims, e: &candle_core::Error) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        tracing::warn!(
            "cuDNN attention refused b={} n={} heads={} hd={} ({e}); using our kernels where it does",
            dims.b,
            dims.n,
            dims.heads,
            dims.hd
        )
    });
}

/// [`attention_fwd`] with an explicit kernel choice (the check runs both).
pub fn attention_fwd_with(
    qkv: &CudaStorage,
    l: &Layout,
    heads: usize,
    kernel: AttnKernel,
) -> Result<(CudaStorage, Shape)> {
    const OP: &str = "attention (cuda)";
    let dims = AttnDims::of(l, heads, OP)?;
    fn inner<T: KernelFloat>(
        qkv: &CudaStorage,
        l: &Layout,
        dm: AttnDims,
        kernel: AttnKernel,
    ) -> Result<CudaStorage> {
        let dev = &qkv.device;
        let src = view::<T>(qkv, l, OP, "qkv")?;
        let hdp = dm.hdp();
        // Tensor cores: bf16, 16-byte aligned rows (hd and the start offset multiples of 8).
        let tc = kernel == AttnKernel::Auto
            && T::DTYPE == DType::BF16
            && dm.hd.is_multiple_of(8)
            && l.start_offset().is_multiple_of(8);
        let (name, smem, threads) = if tc {
            (
                format!("attn_fwd_tc_bf16_{hdp}"),
                attn_fwd_tc_smem(hdp),
                128,
            )
        } else {
            (
                format!("attn_fwd_{}_{hdp}", T::DTYPE.as_str()),
                attn_fwd_smem(hdp),
                256,
            )
        };
        let f = attn_func(dev, &name, smem)?;
        // SAFETY: every element is written by the kernel (rows < N, d < hd cover [B, N, D]).
        let out = unsafe { dev.alloc::<T>(dm.b * dm.n * dm.d())? };
        let (n, h, hd) = (dm.n as i32, dm.heads as i32, dm.hd as i32);
        let sl2 = dm.scale_log2();
        let stream = dev.cuda_stream();
        let mut bld = stream.launch_builder(&f);
        bld.arg(&src).arg(&out).arg(&n).arg(&h).arg(&hd).arg(&sl2);
        let mut cfg = dm.grid(smem);
        cfg.block_dim.0 = threads;
        // SAFETY: argument list matches attn_fwd_* / attn_fwd_tc_* in attention.cu.
        unsafe { bld.launch(cfg) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
    let s = match float_dtype(qkv, OP, false)? {
        DType::F32 => inner::<f32>(qkv, l, dims, kernel)?,
        _ => inner::<bf16>(qkv, l, dims, kernel)?,
    };
    Ok((s, Shape::from((dims.b, dims.n, dims.d()))))
}

/// Backward of [`attention_fwd`]: from `qkv`, the forward output `out` and its gradient `dout`
/// (both `[B, N, D]`) returns `dqkv [B, N, 3·D]`. Three launches, no atomics: row statistics
/// (log-sum-exp recomputed from q·kᵀ, and Dᵢ = Σ dO∘O), dK/dV per key tile, dQ per query tile.
/// bf16 with hd a multiple of 8 runs on tensor cores.
pub fn attention_bwd(
    qkv: &CudaStorage,
    lq: &Layout,
    out: &CudaStorage,
    lo: &Layout,
    dout: &CudaStorage,
    ld: &Layout,
    heads: usize,
) -> Result<(CudaStorage, Shape)> {
    #[cfg(feature = "cudnn")]
    {
        let dims = AttnDims::of(lq, heads, "attention backward (cuda)")?;
        let p = dims.sdpa();
        // A forward that ran on cuDNN left its statistics with `out`; anything else ran ours.
        if super::cudnn::has_stats(out, lo, p) {
            match super::cudnn::bwd(qkv, lq, out, lo, dout, ld, p, false) {
                Ok(r) => return Ok(r),
                Err(e) if super::attention_backend() == super::AttentionBackend::Cudnn => {
                    return Err(e);
                }
                Err(e) => cudnn_fallback_warning(&dims, &e),
            }
        }
    }
    attention_bwd_with(qkv, lq, out, lo, dout, ld, heads, AttnKernel::Auto)
}

/// [`attention_bwd`] with an explicit kernel choice (the check runs both).
#[allow(clippy::too_many_arguments)]
pub fn attention_bwd_with(
    qkv: &CudaStorage,
    lq: &Layout,
    out: &CudaStorage,
    lo: &Layout,
    dout: &CudaStorage,
    ld: &Layout,
    heads: usize,
    kernel: AttnKernel,
) -> Result<(CudaStorage, Shape)> {
    const OP: &str = "attention backward (cuda)";
    let dm = AttnDims::of(lq, heads, OP)?;
    let o_shape = [dm.b, dm.n, dm.d()];
    for (what, l) in [("out", lo), ("dout", ld)] {
        if l.dims() != o_shape {
            bail!(
                "{OP}: {what} must have shape {o_shape:?}, got {:?}",
                l.dims()
            );
        }
        if !l.start_offset().is_multiple_of(4) {
            bail!("{OP}: {what} must start at a multiple of 4 elements (vector loads)");
        }
    }
    let dtype = same_dtype(OP, qkv, &[out, dout])?;
    let tc = kernel == AttnKernel::Auto
        && dtype == DType::BF16
        && dm.hd.is_multiple_of(8)
        && [lq, lo, ld]
            .iter()
            .all(|l| l.start_offset().is_multiple_of(8));
    #[allow(clippy::too_many_arguments)]
    fn inner<T: KernelFloat>(
        qkv: &CudaStorage,
        lq: &Layout,
        out: &CudaStorage,
        lo: &Layout,
        dout: &CudaStorage,
        ld: &Layout,
        dm: AttnDims,
        tc: bool,
    ) -> Result<CudaStorage> {
        let dev = &qkv.device;
        let stream = dev.cuda_stream();
        let q = view::<T>(qkv, lq, OP, "qkv")?;
        let o = view::<T>(out, lo, OP, "out")?;
        let d_o = view::<T>(dout, ld, OP, "dout")?;
        let hdp = dm.hdp();
        let ty = T::DTYPE.as_str();
        let rows = dm.b * dm.heads * dm.n;
        // SAFETY: lse/delta get one value per (b, h, row < N), all written by the stats kernel.
        let lse = unsafe { dev.alloc::<f32>(rows)? };
        let delta = unsafe { dev.alloc::<f32>(rows)? };
        // SAFETY: dK/dV columns by the dkdv kernel, dQ columns by the dq kernel (all rows < N).
        let dqkv = unsafe { dev.alloc::<T>(dm.b * dm.n * 3 * dm.d())? };
        let (n, h, hd) = (dm.n as i32, dm.heads as i32, dm.hd as i32);
        let (sl2, sc) = (dm.scale_log2(), dm.scale());
        let (names, smems, threads) = if tc {
            let (st, main) = attn_bwd_tc_smem(hdp);
            (
                [
                    format!("attn_bwd_stats_tc_bf16_{hdp}"),
                    format!("attn_bwd_dkdv_tc_bf16_{hdp}"),
                    format!("attn_bwd_dq_tc_bf16_{hdp}"),
                ],
                [st, main, main],
                128,
            )
        } else {
            (
                [
                    format!("attn_bwd_stats_{ty}_{hdp}"),
                    format!("attn_bwd_dkdv_{ty}_{hdp}"),
                    format!("attn_bwd_dq_{ty}_{hdp}"),
                ],
                [attn_stats_smem(hdp), attn_dkdv_smem(hdp), attn_dq_smem(hdp)],
                256,
            )
        };
        let cfg = |smem: usize| {
            let mut c = dm.grid(smem);
            c.block_dim.0 = threads;
            c
        };

        let f = attn_func(dev, &names[0], smems[0])?;
        let mut bld = stream.launch_builder(&f);
        bld.arg(&q).arg(&o).arg(&d_o).arg(&lse).arg(&delta);
        bld.arg(&n).arg(&h).arg(&hd).arg(&sl2);
        // SAFETY: matches attn_bwd_stats[_tc]_* in attention.cu.
        unsafe { bld.launch(cfg(smems[0])) }.w()?;

        for (name, smem) in names[1..].iter().zip(&smems[1..]) {
            let f = attn_func(dev, name, *smem)?;
            let mut bld = stream.launch_builder(&f);
            bld.arg(&q).arg(&d_o).arg(&lse).arg(&delta).arg(&dqkv);
            bld.arg(&n).arg(&h).arg(&hd).arg(&sl2).arg(&sc);
            // SAFETY: matches attn_bwd_dkdv[_tc]_* / attn_bwd_dq[_tc]_* in attention.cu.
            unsafe { bld.launch(cfg(*smem)) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(dqkv, dev.clone()))
    }
    let s = match dtype {
        DType::F32 => inner::<f32>(qkv, lq, out, lo, dout, ld, dm, tc)?,
        _ => inner::<bf16>(qkv, lq, out, lo, dout, ld, dm, tc)?,
    };
    Ok((s, Shape::from((dm.b, dm.n, 3 * dm.d()))))
}

// ---------------------------------------------------------------------------------------------
// LayerNorm

fn ln_rows_cfg(rows: usize) -> LaunchConfig {
    // One warp per row, 8 rows per block.
    linear_cfg(rows * 32, 256)
}

/// Vectors per lane of the register fast path (`cols = nv·128`, nv ≤ 8, operands 4-aligned).
fn ln_fast_nv(cols: usize, starts: &[usize]) -> Option<usize> {
    (cols.is_multiple_of(128) && cols <= 1024 && vec_width(cols, starts) == 4).then_some(cols / 128)
}

/// LayerNorm over the last dim, affine (`weight`/`bias` `[C]`) when `wb` is given; biased
/// variance, fp32 statistics. One launch: a warp per row (row in registers for C = k·128 ≤ 1024).
fn ln_forward(
    x: &CudaStorage,
    lx: &Layout,
    wb: Option<(&CudaStorage, &Layout, &CudaStorage, &Layout)>,
    eps: f32,
    op: &'static str,
) -> Result<(CudaStorage, Shape)> {
    let (rows, cols) = rows_cols(lx, op)?;
    let mut starts = vec![lx.start_offset()];
    let dtype = match wb {
        Some((w, lw, b, lb)) => {
            check_vec(lw, cols, op, "weight")?;
            check_vec(lb, cols, op, "bias")?;
            starts.extend([lw.start_offset(), lb.start_offset()]);
            same_dtype(op, x, &[w, b])?
        }
        None => float_dtype(x, op, false)?,
    };
    let fast = ln_fast_nv(cols, &starts);
    #[allow(clippy::type_complexity, clippy::too_many_arguments)]
    fn inner<T: KernelFloat>(
        x: &CudaStorage,
        lx: &Layout,
        wb: Option<(&CudaStorage, &Layout, &CudaStorage, &Layout)>,
        rows: usize,
        cols: usize,
        eps: f32,
        fast: Option<usize>,
        op: &str,
    ) -> Result<CudaStorage> {
        let dev = &x.device;
        let ty = T::DTYPE.as_str();
        let xs = view::<T>(x, lx, op, "x")?;
        let wbs = match wb {
            Some((w, lw, b, lb)) => Some((
                view::<T>(w, lw, op, "weight")?,
                view::<T>(b, lb, op, "bias")?,
            )),
            None => None,
        };
        let kind = if wbs.is_some() { "ln" } else { "ln_plain" };
        let name = match fast {
            Some(nv) => format!("{kind}_fwd_fast_{ty}_{nv}"),
            None => format!("{kind}_fwd_{ty}"),
        };
        let f = load(dev, NORM, &name)?;
        // SAFETY: every row is written.
        let y = unsafe { dev.alloc::<T>(rows * cols)? };
        let (r, c) = (u32_of(rows, op, "rows")?, u32_of(cols, op, "cols")?);
        let stream = dev.cuda_stream();
        let mut bld = stream.launch_builder(&f);
        bld.arg(&xs);
        if let Some((w, b)) = &wbs {
            bld.arg(w).arg(b);
        }
        bld.arg(&y).arg(&r);
        if fast.is_none() {
            bld.arg(&c);
        }
        bld.arg(&eps);
        // SAFETY: matches ln[_plain]_fwd[_fast]_* in norm.cu.
        unsafe { bld.launch(ln_rows_cfg(rows)) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
    }
    let s = match dtype {
        DType::F32 => inner::<f32>(x, lx, wb, rows, cols, eps, fast, op)?,
        _ => inner::<bf16>(x, lx, wb, rows, cols, eps, fast, op)?,
    };
    Ok((s, lx.shape().clone()))
}

/// LayerNorm over the last dim with affine `weight`/`bias` (`[C]`). One launch.
pub fn layer_norm_fwd(
    x: &CudaStorage,
    lx: &Layout,
    w: &CudaStorage,
    lw: &Layout,
    b: &CudaStorage,
    lb: &Layout,
    eps: f32,
) -> Result<(CudaStorage, Shape)> {
    ln_forward(x, lx, Some((w, lw, b, lb)), eps, "layer_norm (cuda)")
}

/// LayerNorm without affine parameters (the target normalisation). One launch.
pub fn layer_norm_plain_fwd(
    x: &CudaStorage,
    lx: &Layout,
    eps: f32,
) -> Result<(CudaStorage, Shape)> {
    ln_forward(x, lx, None, eps, "layer_norm_plain (cuda)")
}

/// LayerNorm backward from x (and weight when affine) and dy. Affine: one packed `[rows + 2, C]`
/// tensor, rows `0..rows` dx, then dweight, then dbias; plain: dx.
///
/// Fast path (C = k·128 ≤ 1024): one launch computes dx and per-chunk dweight/dbias partials
/// with each row read once, a second adds the partials. Otherwise three: dx per row (stashing
/// mean/rstd), the column partials, their sum.
fn ln_backward(
    x: &CudaStorage,
    lx: &Layout,
    w: Option<(&CudaStorage, &Layout)>,
    dy: &CudaStorage,
    ldy: &Layout,
    eps: f32,
    op: &'static str,
) -> Result<(CudaStorage, Shape)> {
    let (rows, cols) = rows_cols(lx, op)?;
    if ldy.dims() != lx.dims() {
        bail!("{op}: dy {:?} must match x {:?}", ldy.dims(), lx.dims());
    }
    let mut starts = vec![lx.start_offset(), ldy.start_offset()];
    let dtype = match w {
        Some((ws, lw)) => {
            check_vec(lw, cols, op, "weight")?;
            starts.push(lw.start_offset());
            same_dtype(op, x, &[ws, dy])?
        }
        None => same_dtype(op, x, &[dy])?,
    };
    let fast = ln_fast_nv(cols, &starts);
    #[allow(clippy::too_many_arguments)]
    fn inner<T: KernelFloat>(
        x: &CudaStorage,
        lx: &Layout,
        w: Option<(&CudaStorage, &Layout)>,
        dy: &CudaStorage,
        ldy: &Layout,
        rows: usize,
        cols: usize,
        eps: f32,
        fast: Option<usize>,
        op: &str,
    ) -> Result<CudaStorage> {
        let dev = &x.device;
        let stream = dev.cuda_stream();
        let ty = T::DTYPE.as_str();
        let xs = view::<T>(x, lx, op, "x")?;
        let dys = view::<T>(dy, ldy, op, "dy")?;
        let ws = match w {
            Some((ws, lw)) => Some(view::<T>(ws, lw, op, "weight")?),
            None => None,
        };
        let affine = ws.is_some();
        let extra = if affine { 2 } else { 0 };
        // SAFETY: dx rows by the dx kernel, the dweight/dbias rows by ln_final.
        let mut packed = unsafe { dev.alloc::<T>((rows + extra) * cols)? };
        let (r, c) = (u32_of(rows, op, "rows")?, u32_of(cols, op, "cols")?);
        let rpc = reduce_rows(rows);
        let nchunks = rows.div_ceil(rpc).max(1);
        let rpcu = rpc as u32;
        let mut partial = None;
        if let Some(nv) = fast {
            let kind = if affine { "ln" } else { "ln_plain" };
            let f = load(dev, NORM, &format!("{kind}_bwd_fast_{ty}_{nv}"))?;
            // SAFETY: every (chunk, 2·C) partial is written by its block.
            let part = unsafe { dev.alloc::<f32>(if affine { nchunks * 2 * cols } else { 1 })? };
            let mut dx = packed.slice_mut(0..rows * cols);
            let mut bld = stream.launch_builder(&f);
            bld.arg(&xs);
            if let Some(w) = &ws {
                bld.arg(w);
            }
            bld.arg(&dys).arg(&mut dx);
            if affine {
                bld.arg(&part);
            }
            bld.arg(&r).arg(&eps).arg(&rpcu);
            let cfg = LaunchConfig {
                grid_dim: (nchunks as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: matches ln[_plain]_bwd_fast_* in norm.cu.
            unsafe { bld.launch(cfg) }.w()?;
            partial = Some(part);
        } else if let Some(w) = &ws {
            // SAFETY: one (mean, rstd) per row, all written by ln_bwd_dx.
            let stats = unsafe { dev.alloc::<f32>(2 * rows)? };
            {
                let mut dx = packed.slice_mut(0..rows * cols);
                let f = load(dev, NORM, &format!("ln_bwd_dx_{ty}"))?;
                let mut bld = stream.launch_builder(&f);
                bld.arg(&xs).arg(w).arg(&dys).arg(&mut dx).arg(&stats);
                bld.arg(&r).arg(&c).arg(&eps);
                // SAFETY: matches ln_bwd_dx_* in norm.cu.
                unsafe { bld.launch(ln_rows_cfg(rows)) }.w()?;
            }
            // SAFETY: every (chunk, column) partial is written.
            let part = unsafe { dev.alloc::<f32>(nchunks * 2 * cols)? };
            let f = load(dev, NORM, &format!("ln_dwdb_partial_{ty}"))?;
            let mut bld = stream.launch_builder(&f);
            bld.arg(&xs).arg(&dys).arg(&stats).arg(&part);
            bld.arg(&r).arg(&c).arg(&rpcu);
            let cfg = LaunchConfig {
                grid_dim: (cols.div_ceil(32) as u32, nchunks as u32, 1),
                block_dim: (32, 8, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: matches ln_dwdb_partial_* in norm.cu.
            unsafe { bld.launch(cfg) }.w()?;
            partial = Some(part);
        } else {
            let mut dx = packed.slice_mut(0..rows * cols);
            let f = load(dev, NORM, &format!("ln_plain_bwd_{ty}"))?;
            let mut bld = stream.launch_builder(&f);
            bld.arg(&xs)
                .arg(&dys)
                .arg(&mut dx)
                .arg(&r)
                .arg(&c)
                .arg(&eps);
            // SAFETY: matches ln_plain_bwd_* in norm.cu.
            unsafe { bld.launch(ln_rows_cfg(rows)) }.w()?;
        }
        if affine && let Some(part) = &partial {
            let mut dwdb = packed.slice_mut(rows * cols..(rows + 2) * cols);
            let f = load(dev, NORM, &format!("ln_final_{ty}"))?;
            let (nc, c2) = (nchunks as u32, 2 * c);
            let mut bld = stream.launch_builder(&f);
            bld.arg(part).arg(&mut dwdb).arg(&nc).arg(&c2);
            // SAFETY: matches ln_final_* in norm.cu.
            unsafe { bld.launch(final_cfg(2 * cols)) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(packed, dev.clone()))
    }
    let s = match dtype {
        DType::F32 => inner::<f32>(x, lx, w, dy, ldy, rows, cols, eps, fast, op)?,
        _ => inner::<bf16>(x, lx, w, dy, ldy, rows, cols, eps, fast, op)?,
    };
    let shape = if w.is_some() {
        Shape::from((rows + 2, cols))
    } else {
        lx.shape().clone()
    };
    Ok((s, shape))
}

/// Backward of [`layer_norm_fwd`]: one packed `[rows + 2, C]` tensor, rows `0..rows` dx (in x's
/// row order), then dweight, then dbias. Two launches on the fast path (C = k·128 ≤ 1024).
pub fn layer_norm_bwd(
    x: &CudaStorage,
    lx: &Layout,
    w: &CudaStorage,
    lw: &Layout,
    dy: &CudaStorage,
    ldy: &Layout,
    eps: f32,
) -> Result<(CudaStorage, Shape)> {
    ln_backward(
        x,
        lx,
        Some((w, lw)),
        dy,
        ldy,
        eps,
        "layer_norm backward (cuda)",
    )
}

/// Backward of [`layer_norm_plain_fwd`]: dx, same shape as x. One launch.
pub fn layer_norm_plain_bwd(
    x: &CudaStorage,
    lx: &Layout,
    dy: &CudaStorage,
    ldy: &Layout,
    eps: f32,
) -> Result<(CudaStorage, Shape)> {
    ln_backward(
        x,
        lx,
        None,
        dy,
        ldy,
        eps,
        "layer_norm_plain backward (cuda)",
    )
}

// ---------------------------------------------------------------------------------------------
// Bias, GELU, reductions

fn bias_act(
    name: &'static str,
    op: &'static str,
    x: &CudaStorage,
    lx: &Layout,
    b: &CudaStorage,
    lb: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let (rows, cols) = rows_cols(lx, op)?;
    check_vec(lb, cols, op, "bias")?;
    let dtype = same_dtype(op, x, &[b])?;
    let v = vec_width(cols, &[lx.start_offset(), lb.start_offset()]);
    #[allow(clippy::too_many_arguments)]
    fn inner<T: KernelFloat>(
        name: &str,
        op: &str,
        x: &CudaStorage,
        lx: &Layout,
        b: &CudaStorage,
        lb: &Layout,
        rows: usize,
        cols: usize,
        v: usize,
    ) -> Result<CudaStorage> {
        let dev = &x.device;
        let xs = view::<T>(x, lx, op, "x")?;
        let bs = view::<T>(b, lb, op, "bias")?;
        let f = load(
            dev,
            ELEMENTWISE,
            &format!("{name}_{}_v{v}", T::DTYPE.as_str()),
        )?;
        // SAFETY: every element is written.
        let y = unsafe { dev.alloc::<T>(rows * cols)? };
        let (cfg, _) = row_launch(rows, cols, v, ELEMWISE_ROWS);
        let (r, c, rpc) = (
            u32_of(rows, op, "rows")?,
            u32_of(cols, op, "cols")?,
            ELEMWISE_ROWS as u32,
        );
        let stream = dev.cuda_stream();
        let mut bld = stream.launch_builder(&f);
        bld.arg(&xs).arg(&bs).arg(&y).arg(&r).arg(&c).arg(&rpc);
        // SAFETY: matches bias_add_* / bias_gelu_fwd_* in elementwise.cu.
        unsafe { bld.launch(cfg) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
    }
    let s = match dtype {
        DType::F32 => inner::<f32>(name, op, x, lx, b, lb, rows, cols, v)?,
        _ => inner::<bf16>(name, op, x, lx, b, lb, rows, cols, v)?,
    };
    Ok((s, lx.shape().clone()))
}

/// `x + b` with `b` broadcast over the last dim. One launch.
pub fn bias_add(
    x: &CudaStorage,
    lx: &Layout,
    b: &CudaStorage,
    lb: &Layout,
) -> Result<(CudaStorage, Shape)> {
    bias_act("bias_add", "bias_add (cuda)", x, lx, b, lb)
}

/// `gelu_erf(x + b)` with `b` broadcast over the last dim (fc1 bias + GELU). One launch.
pub fn bias_gelu(
    x: &CudaStorage,
    lx: &Layout,
    b: &CudaStorage,
    lb: &Layout,
) -> Result<(CudaStorage, Shape)> {
    bias_act("bias_gelu_fwd", "bias_gelu (cuda)", x, lx, b, lb)
}

/// Backward of [`bias_gelu`] from x, b and dy: one packed `[rows + 1, C]` tensor, rows `0..rows`
/// dx = dy·gelu'(x + b), the last row db = Σ_rows dx. Two launches (dx with per-chunk db
/// partials, then their sum in a fixed order).
pub fn bias_gelu_bwd(
    x: &CudaStorage,
    lx: &Layout,
    b: &CudaStorage,
    lb: &Layout,
    dy: &CudaStorage,
    ldy: &Layout,
) -> Result<(CudaStorage, Shape)> {
    const OP: &str = "bias_gelu backward (cuda)";
    let (rows, cols) = rows_cols(lx, OP)?;
    check_vec(lb, cols, OP, "bias")?;
    if ldy.dims() != lx.dims() {
        bail!("{OP}: dy {:?} must match x {:?}", ldy.dims(), lx.dims());
    }
    let dtype = same_dtype(OP, x, &[b, dy])?;
    let v = vec_width(
        cols,
        &[lx.start_offset(), lb.start_offset(), ldy.start_offset()],
    );
    #[allow(clippy::too_many_arguments)]
    fn inner<T: KernelFloat>(
        x: &CudaStorage,
        lx: &Layout,
        b: &CudaStorage,
        lb: &Layout,
        dy: &CudaStorage,
        ldy: &Layout,
        rows: usize,
        cols: usize,
        v: usize,
    ) -> Result<CudaStorage> {
        let dev = &x.device;
        let ty = T::DTYPE.as_str();
        let xs = view::<T>(x, lx, OP, "x")?;
        let bs = view::<T>(b, lb, OP, "bias")?;
        let dys = view::<T>(dy, ldy, OP, "dy")?;
        // SAFETY: dx rows by bias_gelu_bwd, the last row by colsum_final.
        let mut packed = unsafe { dev.alloc::<T>((rows + 1) * cols)? };
        let rpc = reduce_rows(rows);
        let (cfg, nchunks) = row_launch(rows, cols, v, rpc);
        // SAFETY: every (chunk, column) partial is written.
        let partial = unsafe { dev.alloc::<f32>(nchunks * cols)? };
        let (r, c, rpcu) = (
            u32_of(rows, OP, "rows")?,
            u32_of(cols, OP, "cols")?,
            rpc as u32,
        );
        {
            let mut dx = packed.slice_mut(0..rows * cols);
            let f = load(dev, ELEMENTWISE, &format!("bias_gelu_bwd_{ty}_v{v}"))?;
            let stream = dev.cuda_stream();
            let mut bld = stream.launch_builder(&f);
            bld.arg(&xs).arg(&bs).arg(&dys).arg(&mut dx).arg(&partial);
            bld.arg(&r).arg(&c).arg(&rpcu);
            // SAFETY: matches bias_gelu_bwd_* in elementwise.cu.
            unsafe { bld.launch(cfg) }.w()?;
        }
        let mut db = packed.slice_mut(rows * cols..(rows + 1) * cols);
        colsum_final_launch::<T>(dev, &partial, &mut db, nchunks, cols)?;
        Ok(CudaStorage::wrap_cuda_slice(packed, dev.clone()))
    }
    let s = match dtype {
        DType::F32 => inner::<f32>(x, lx, b, lb, dy, ldy, rows, cols, v)?,
        _ => inner::<bf16>(x, lx, b, lb, dy, ldy, rows, cols, v)?,
    };
    Ok((s, Shape::from((rows + 1, cols))))
}

fn colsum_final_launch<T: KernelFloat>(
    dev: &CudaDevice,
    partial: &CudaSlice<f32>,
    out: &mut CudaViewMut<'_, T>,
    nchunks: usize,
    cols: usize,
) -> Result<()> {
    let f = load(
        dev,
        ELEMENTWISE,
        &format!("colsum_final_{}", T::DTYPE.as_str()),
    )?;
    let (nc, c) = (nchunks as u32, cols as u32);
    let stream = dev.cuda_stream();
    let mut bld = stream.launch_builder(&f);
    bld.arg(partial).arg(out).arg(&nc).arg(&c);
    // SAFETY: matches colsum_final_* in elementwise.cu.
    unsafe { bld.launch(final_cfg(cols)) }.w()?;
    Ok(())
}

/// Column sums of the contiguous `[rows, cols]` view `x` into `out` (two launches).
fn column_sum_into<T: KernelFloat>(
    dev: &CudaDevice,
    x: &CudaView<'_, T>,
    x_start: usize,
    rows: usize,
    cols: usize,
    out: &mut CudaViewMut<'_, T>,
    op: &str,
) -> Result<()> {
    let v = vec_width(cols, &[x_start]);
    let rpc = reduce_rows(rows);
    let (cfg, nchunks) = row_launch(rows, cols, v, rpc);
    // SAFETY: every (chunk, column) partial is written.
    let partial = unsafe { dev.alloc::<f32>(nchunks * cols)? };
    let (r, c, rpcu) = (
        u32_of(rows, op, "rows")?,
        u32_of(cols, op, "cols")?,
        rpc as u32,
    );
    let f = load(
        dev,
        ELEMENTWISE,
        &format!("colsum_partial_{}_v{v}", T::DTYPE.as_str()),
    )?;
    let stream = dev.cuda_stream();
    let mut bld = stream.launch_builder(&f);
    bld.arg(x).arg(&partial).arg(&r).arg(&c).arg(&rpcu);
    // SAFETY: matches colsum_partial_* in elementwise.cu.
    unsafe { bld.launch(cfg) }.w()?;
    colsum_final_launch::<T>(dev, &partial, out, nchunks, cols)
}

/// Sum over all leading dims: `[..., C] → [C]` (the reduction behind every bias gradient).
/// Two launches: per-chunk fp32 partials, then their sum in a fixed order.
pub fn column_sum(x: &CudaStorage, lx: &Layout) -> Result<(CudaStorage, Shape)> {
    const OP: &str = "column_sum (cuda)";
    let (rows, cols) = rows_cols(lx, OP)?;
    fn inner<T: KernelFloat>(
        x: &CudaStorage,
        lx: &Layout,
        rows: usize,
        cols: usize,
    ) -> Result<CudaStorage> {
        let dev = &x.device;
        let xs = view::<T>(x, lx, OP, "x")?;
        // SAFETY: every column is written by colsum_final.
        let mut out = unsafe { dev.alloc::<T>(cols)? };
        let mut ov = out.slice_mut(0..cols);
        column_sum_into::<T>(dev, &xs, lx.start_offset(), rows, cols, &mut ov, OP)?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
    let s = match float_dtype(x, OP, false)? {
        DType::F32 => inner::<f32>(x, lx, rows, cols)?,
        _ => inner::<bf16>(x, lx, rows, cols)?,
    };
    Ok((s, Shape::from(cols)))
}

/// Blocks and launch of the first stage of a reduction to one scalar (`*_partial` kernels: a
/// grid-stride loop, one fp32 partial per block): fixed by the element count alone, so the
/// summation order never changes.
fn scalar_partial_grid(n: usize) -> (usize, LaunchConfig) {
    let blocks = n.div_ceil(256 * 8).clamp(1, 1024);
    let cfg = LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    (blocks, cfg)
}

/// The second stage: the `blocks` partials summed in a fixed order, times `scale`, into a new
/// one-element storage of `T`.
fn scalar_final<T: KernelFloat>(
    dev: &CudaDevice,
    partial: &CudaSlice<f32>,
    blocks: usize,
    scale: f32,
) -> Result<CudaStorage> {
    // SAFETY: written by scaled_final.
    let out = unsafe { dev.alloc::<T>(1)? };
    let f = load(
        dev,
        ELEMENTWISE,
        &format!("scaled_final_{}", T::DTYPE.as_str()),
    )?;
    let nb = blocks as u32;
    let stream = dev.cuda_stream();
    let mut bld = stream.launch_builder(&f);
    bld.arg(partial).arg(&out).arg(&nb).arg(&scale);
    // SAFETY: matches scaled_final_* in elementwise.cu.
    unsafe { bld.launch(linear_cfg(256, 256)) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// Σ x² over all elements as a scalar of x's dtype (fp32 accumulation; grad norms). Two
/// launches with a grid fixed by the element count, so the summation order never changes.
pub fn sum_sq(x: &CudaStorage, lx: &Layout) -> Result<(CudaStorage, Shape)> {
    const OP: &str = "sum_sq (cuda)";
    let n = lx.shape().elem_count();
    fn inner<T: KernelFloat>(x: &CudaStorage, lx: &Layout, n: usize) -> Result<CudaStorage> {
        let dev = &x.device;
        let xs = view::<T>(x, lx, OP, "x")?;
        let (blocks, cfg) = scalar_partial_grid(n);
        // SAFETY: one partial per block, all written.
        let partial = unsafe { dev.alloc::<f32>(blocks)? };
        let f = load(
            dev,
            ELEMENTWISE,
            &format!("sumsq_partial_{}", T::DTYPE.as_str()),
        )?;
        let stream = dev.cuda_stream();
        let mut bld = stream.launch_builder(&f);
        bld.arg(&xs).arg(&partial).arg(&n);
        // SAFETY: matches sumsq_partial_* in elementwise.cu.
        unsafe { bld.launch(cfg) }.w()?;
        scalar_final::<T>(dev, &partial, blocks, 1.0)
    }
    let s = match float_dtype(x, OP, false)? {
        DType::F32 => inner::<f32>(x, lx, n)?,
        _ => inner::<bf16>(x, lx, n)?,
    };
    Ok((s, Shape::from(())))
}

/// mean |a − b| over all elements as a scalar of their dtype (the L1 loss of one mask): per-block
/// fp32 partial sums of a grid fixed by the element count, then their sum in a fixed order times
/// 1/n — two launches, one read of each operand, where candle's `(a - b).abs().mean_all()` makes
/// two full-size temporaries and sums them in one block.
pub fn l1_mean(
    a: &CudaStorage,
    la: &Layout,
    b: &CudaStorage,
    lb: &Layout,
) -> Result<(CudaStorage, Shape)> {
    const OP: &str = "l1_mean (cuda)";
    let n = la.shape().elem_count();
    if lb.shape().elem_count() != n || n == 0 {
        bail!("{OP}: operands {:?} and {:?}", la.dims(), lb.dims());
    }
    let dtype = same_dtype(OP, a, &[b])?;
    fn inner<T: KernelFloat>(
        a: &CudaStorage,
        la: &Layout,
        b: &CudaStorage,
        lb: &Layout,
        n: usize,
    ) -> Result<CudaStorage> {
        let dev = &a.device;
        let (av, bv) = (view::<T>(a, la, OP, "a")?, view::<T>(b, lb, OP, "b")?);
        let (blocks, cfg) = scalar_partial_grid(n);
        // SAFETY: one partial per block, all written.
        let partial = unsafe { dev.alloc::<f32>(blocks)? };
        let f = load(
            dev,
            ELEMENTWISE,
            &format!("absdiff_partial_{}", T::DTYPE.as_str()),
        )?;
        let stream = dev.cuda_stream();
        let mut bld = stream.launch_builder(&f);
        bld.arg(&av).arg(&bv).arg(&partial).arg(&n);
        // SAFETY: matches absdiff_partial_* in elementwise.cu.
        unsafe { bld.launch(cfg) }.w()?;
        scalar_final::<T>(dev, &partial, blocks, (1.0 / n as f64) as f32)
    }
    let s = match dtype {
        DType::F32 => inner::<f32>(a, la, b, lb, n)?,
        _ => inner::<bf16>(a, la, b, lb, n)?,
    };
    Ok((s, Shape::from(())))
}

/// Gradient of [`l1_mean`] with respect to `a`: `sign(a − b) · g / n` with `g` the upstream
/// gradient (a one-element tensor read on the device), in one launch.
pub fn l1_mean_grad(
    a: &CudaStorage,
    la: &Layout,
    b: &CudaStorage,
    lb: &Layout,
    g: &CudaStorage,
    lg: &Layout,
) -> Result<(CudaStorage, Shape)> {
    const OP: &str = "l1_mean backward (cuda)";
    let n = la.shape().elem_count();
    if lb.shape().elem_count() != n || lg.shape().elem_count() != 1 || n == 0 {
        bail!(
            "{OP}: operands {:?}, {:?} and gradient {:?}",
            la.dims(),
            lb.dims(),
            lg.dims()
        );
    }
    let dtype = same_dtype(OP, a, &[b, g])?;
    fn inner<T: KernelFloat>(
        (a, la): (&CudaStorage, &Layout),
        (b, lb): (&CudaStorage, &Layout),
        (g, lg): (&CudaStorage, &Layout),
        n: usize,
    ) -> Result<CudaStorage> {
        let dev = &a.device;
        let (av, bv, gv) = (
            view::<T>(a, la, OP, "a")?,
            view::<T>(b, lb, OP, "b")?,
            view::<T>(g, lg, OP, "gradient")?,
        );
        // SAFETY: every element is written by l1_grad.
        let mut da = unsafe { dev.alloc::<T>(n)? };
        let f = load(dev, ELEMENTWISE, &format!("l1_grad_{}", T::DTYPE.as_str()))?;
        let inv = (1.0 / n as f64) as f32;
        let stream = dev.cuda_stream();
        let mut bld = stream.launch_builder(&f);
        bld.arg(&av)
            .arg(&bv)
            .arg(&gv)
            .arg(&mut da)
            .arg(&n)
            .arg(&inv);
        // SAFETY: matches l1_grad_* in elementwise.cu.
        unsafe { bld.launch(stride_cfg(n)) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(da, dev.clone()))
    }
    let s = match dtype {
        DType::F32 => inner::<f32>((a, la), (b, lb), (g, lg), n)?,
        _ => inner::<bf16>((a, la), (b, lb), (g, lg), n)?,
    };
    Ok((s, la.shape().clone()))
}

/// The backward of a gather of distinct rows: `[rows, D]` zeros with row `idx[m]` = `g[m]`, every
/// element in parallel (one launch after the zero fill). Indices past `rows` are skipped (the
/// gather would have refused them).
pub fn scatter_rows(
    g: &CudaStorage,
    lg: &Layout,
    idx: &CudaStorage,
    li: &Layout,
    rows: usize,
) -> Result<CudaStorage> {
    const OP: &str = "scatter_rows (cuda)";
    let (m, d) = lg.shape().dims2()?;
    if li.shape().elem_count() != m {
        bail!("{OP}: {m} gradient rows for indices {:?}", li.dims());
    }
    let ids: &CudaSlice<u32> = idx.as_cuda_slice::<u32>()?;
    let Some((i0, i1)) = li.contiguous_offsets() else {
        bail!("{OP}: indices must be contiguous");
    };
    fn inner<T: KernelFloat>(
        g: &CudaStorage,
        lg: &Layout,
        ids: CudaView<'_, u32>,
        (m, d, rows): (usize, usize, usize),
    ) -> Result<CudaStorage> {
        let dev = &g.device;
        let gv = view::<T>(g, lg, OP, "gradient")?;
        let mut out = dev.alloc_zeros::<T>(rows * d)?;
        let f = load(
            dev,
            ELEMENTWISE,
            &format!("scatter_rows_{}", T::DTYPE.as_str()),
        )?;
        let n = m * d;
        let (du, ru) = (u32_of(d, OP, "row length")?, u32_of(rows, OP, "rows")?);
        let stream = dev.cuda_stream();
        let mut bld = stream.launch_builder(&f);
        bld.arg(&gv)
            .arg(&ids)
            .arg(&mut out)
            .arg(&n)
            .arg(&du)
            .arg(&ru);
        // SAFETY: matches scatter_rows_* in elementwise.cu.
        unsafe { bld.launch(stride_cfg(n)) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
    let ids = ids.slice(i0..i1);
    match float_dtype(g, OP, false)? {
        DType::F32 => inner::<f32>(g, lg, ids, (m, d, rows)),
        _ => inner::<bf16>(g, lg, ids, (m, d, rows)),
    }
}

// ---------------------------------------------------------------------------------------------
// Linear (cuBLAS GEMM + our bias kernels)

thread_local! {
    static BLAS: std::cell::RefCell<std::collections::HashMap<candle_core::cuda_backend::DeviceId, std::sync::Arc<CudaBlas>>> =
        std::cell::RefCell::new(std::collections::HashMap::new());
}

/// This thread's cuBLAS handle on `dev`. candle's device has one handle for all threads, and
/// its stream is the calling thread's default stream: two threads sharing it would share the
/// handle's workspace across two streams at once (the target pass may run on a thread of its
/// own, see `crate::target_lane`). A handle per thread, created on first use, avoids that.
fn thread_blas(dev: &CudaDevice) -> Result<std::sync::Arc<CudaBlas>> {
    BLAS.with(|m| {
        let mut m = m.borrow_mut();
        if let Some(b) = m.get(&dev.id()) {
            return Ok(b.clone());
        }
        let b = std::sync::Arc::new(CudaBlas::new(dev.cuda_stream()).w()?);
        m.insert(dev.id(), b.clone());
        Ok(b)
    })
}

/// `(rows, in, out)` of x `[.., in]` against W `[out, in]`.
fn linear_dims(lx: &Layout, lw: &Layout, op: &str) -> Result<(usize, usize, usize)> {
    let (out, inp) = lw.shape().dims2()?;
    match lx.dims().last() {
        Some(&c) if c == inp && inp > 0 && out > 0 => Ok((lx.shape().elem_count() / inp, inp, out)),
        _ => bail!("{op}: input {:?} for weight {:?}", lx.dims(), lw.dims()),
    }
}

fn gemm_cfg<T: KernelFloat>(
    transa: bool,
    transb: bool,
    (m, n, k): (usize, usize, usize),
    (lda, ldb, ldc): (usize, usize, usize),
) -> GemmConfig<T> {
    let op = |t| {
        if t {
            cublasOperation_t::CUBLAS_OP_T
        } else {
            cublasOperation_t::CUBLAS_OP_N
        }
    };
    GemmConfig {
        transa: op(transa),
        transb: op(transb),
        m: m as i32,
        n: n as i32,
        k: k as i32,
        alpha: T::one(),
        lda: lda as i32,
        ldb: ldb as i32,
        beta: T::zero(),
        ldc: ldc as i32,
    }
}

fn check_i32(op: &str, dims: &[usize]) -> Result<()> {
    if dims.iter().any(|&d| d > i32::MAX as usize) {
        bail!("{op}: a GEMM dimension exceeds i32 ({dims:?})");
    }
    Ok(())
}

/// `y = x·Wᵀ (+ b)` for x `[.., in]`, W `[out, in]` (torch layout), b `[out]`: one cuBLASLt
/// GEMM with the bias in its epilogue ([`cublaslt`]), or, without a bias or where cuBLASLt
/// cannot, one cuBLAS GEMM (fp32 accumulation) and one in-place bias kernel.
pub fn linear_fwd(
    x: &CudaStorage,
    lx: &Layout,
    w: &CudaStorage,
    lw: &Layout,
    b: Option<(&CudaStorage, &Layout)>,
) -> Result<(CudaStorage, Shape)> {
    const OP: &str = "linear (cuda)";
    let (rows, inp, out) = linear_dims(lx, lw, OP)?;
    check_i32(OP, &[rows, inp, out])?;
    let dtype = match b {
        Some((bs, lb)) => {
            check_vec(lb, out, OP, "bias")?;
            same_dtype(OP, x, &[w, bs])?
        }
        None => same_dtype(OP, x, &[w])?,
    };
    #[allow(clippy::too_many_arguments)]
    fn inner<T: KernelFloat>(
        x: &CudaStorage,
        lx: &Layout,
        w: &CudaStorage,
        lw: &Layout,
        b: Option<(&CudaStorage, &Layout)>,
        rows: usize,
        inp: usize,
        out: usize,
    ) -> Result<CudaStorage> {
        let dev = &x.device;
        let xs = view::<T>(x, lx, OP, "x")?;
        let ws = view::<T>(w, lw, OP, "weight")?;
        // SAFETY: fully written by the GEMM (beta = 0).
        let mut y = unsafe { dev.alloc::<T>(rows * out)? };
        // Column-major: yᵀ [out, rows] = W [out, in] (stored as Wᵀ, so op T) · xᵀ [in, rows].
        let g = cublaslt::Gemm {
            transa: true,
            transb: false,
            m: out,
            n: rows,
            k: inp,
            lda: inp,
            ldb: inp,
            ldd: out,
        };
        // With a bias: one cuBLASLt GEMM adding it in its epilogue, where it can.
        if let Some((bs, lb)) = b {
            let bv = view::<T>(bs, lb, OP, "bias")?;
            let fused = {
                let mut yv = y.slice_mut(0..rows * out);
                // SAFETY: the views hold out·in, rows·in, rows·out and out elements.
                unsafe { cublaslt::gemm_bias(dev, g, &ws, &xs, &mut yv, &bv) }?
            };
            if fused {
                return Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()));
            }
        }
        {
            let mut yv = y.slice_mut(0..rows * out);
            let cfg = gemm_cfg::<T>(g.transa, g.transb, (g.m, g.n, g.k), (g.lda, g.ldb, g.ldd));
            // SAFETY: the views hold out·in, rows·in and rows·out elements.
            unsafe { T::gemm(&*thread_blas(dev)?, cfg, &ws, &xs, &mut yv) }?;
        }
        if let Some((bs, lb)) = b {
            let bv = view::<T>(bs, lb, OP, "bias")?;
            let v = vec_width(out, &[lb.start_offset()]);
            let f = load(
                dev,
                ELEMENTWISE,
                &format!("bias_add_inplace_{}_v{v}", T::DTYPE.as_str()),
            )?;
            let (cfg, _) = row_launch(rows, out, v, ELEMWISE_ROWS);
            let (r, c, rpc) = (rows as u32, out as u32, ELEMWISE_ROWS as u32);
            let stream = dev.cuda_stream();
            let mut bld = stream.launch_builder(&f);
            bld.arg(&mut y).arg(&bv).arg(&r).arg(&c).arg(&rpc);
            // SAFETY: matches bias_add_inplace_* in elementwise.cu.
            unsafe { bld.launch(cfg) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
    }
    let s = match dtype {
        DType::F32 => inner::<f32>(x, lx, w, lw, b, rows, inp, out)?,
        _ => inner::<bf16>(x, lx, w, lw, b, rows, inp, out)?,
    };
    let mut dims = lx.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = out;
    }
    Ok((s, Shape::from(dims)))
}

/// Backward of [`linear_fwd`] from x, W and dy: one flat tensor `[dx (rows·in) | dW (out·in) |
/// db (out, when bias)]`. dx = dy·W and dW = dyᵀ·x are GEMMs written straight into the packed
/// buffer; db comes out of the dW GEMM's cuBLASLt epilogue ([`cublaslt`]), or, where cuBLASLt
/// cannot, from the two-launch column sum.
pub fn linear_bwd(
    x: &CudaStorage,
    lx: &Layout,
    w: &CudaStorage,
    lw: &Layout,
    dy: &CudaStorage,
    ldy: &Layout,
    bias: bool,
) -> Result<(CudaStorage, Shape)> {
    const OP: &str = "linear backward (cuda)";
    let (rows, inp, out) = linear_dims(lx, lw, OP)?;
    check_i32(OP, &[rows, inp, out])?;
    if ldy.shape().elem_count() != rows * out || ldy.dims().last() != Some(&out) {
        bail!("{OP}: grad {:?} for input {:?}", ldy.dims(), lx.dims());
    }
    let dtype = same_dtype(OP, x, &[w, dy])?;
    let len = rows * inp + out * inp + if bias { out } else { 0 };
    #[allow(clippy::too_many_arguments)]
    fn inner<T: KernelFloat>(
        x: &CudaStorage,
        lx: &Layout,
        w: &CudaStorage,
        lw: &Layout,
        dy: &CudaStorage,
        ldy: &Layout,
        (rows, inp, out): (usize, usize, usize),
        bias: bool,
        len: usize,
    ) -> Result<CudaStorage> {
        let dev = &x.device;
        let blas = thread_blas(dev)?;
        let xs = view::<T>(x, lx, OP, "x")?;
        let ws = view::<T>(w, lw, OP, "weight")?;
        let dys = view::<T>(dy, ldy, OP, "dy")?;
        // SAFETY: dx and dW by the GEMMs (beta = 0), db by the column sum.
        let mut packed = unsafe { dev.alloc::<T>(len)? };
        let n_dx = rows * inp;
        let n_dw = out * inp;
        {
            let mut dx = packed.slice_mut(0..n_dx);
            // dxᵀ [in, rows] = Wᵀ [in, out] · dyᵀ [out, rows].
            let cfg = gemm_cfg::<T>(false, false, (inp, rows, out), (inp, out, inp));
            // SAFETY: views sized as the GEMM addresses them.
            unsafe { T::gemm(&blas, cfg, &ws, &dys, &mut dx) }?;
        }
        // dWᵀ [in, out] = xᵀ [in, rows] · dy [rows, out]; with a bias, db (the column sums
        // of dy) in the same cuBLASLt GEMM where it can.
        let g = cublaslt::Gemm {
            transa: false,
            transb: true,
            m: inp,
            n: out,
            k: rows,
            lda: inp,
            ldb: out,
            ldd: inp,
        };
        let mut db_done = false;
        if bias {
            let mut tail = packed.slice_mut(n_dx..len);
            let (mut dw, mut db) = tail.split_at_mut(n_dw);
            // SAFETY: views sized as the GEMM and its epilogue address them.
            db_done = unsafe { cublaslt::gemm_bias_grad(dev, g, &xs, &dys, &mut dw, &mut db) }?;
        }
        if !db_done {
            let mut dw = packed.slice_mut(n_dx..n_dx + n_dw);
            let cfg = gemm_cfg::<T>(g.transa, g.transb, (g.m, g.n, g.k), (g.lda, g.ldb, g.ldd));
            // SAFETY: views sized as the GEMM addresses them.
            unsafe { T::gemm(&blas, cfg, &xs, &dys, &mut dw) }?;
        }
        if bias && !db_done {
            let mut db = packed.slice_mut(n_dx + n_dw..len);
            column_sum_into::<T>(dev, &dys, ldy.start_offset(), rows, out, &mut db, OP)?;
        }
        Ok(CudaStorage::wrap_cuda_slice(packed, dev.clone()))
    }
    let dims = (rows, inp, out);
    let s = match dtype {
        DType::F32 => inner::<f32>(x, lx, w, lw, dy, ldy, dims, bias, len)?,
        _ => inner::<bf16>(x, lx, w, lw, dy, ldy, dims, bias, len)?,
    };
    Ok((s, Shape::from(len)))
}

// ---------------------------------------------------------------------------------------------
// AdamW and EMA (f32, in place)

/// Per-tensor AdamW scalars, derived in f64 exactly as `optim.rs` does, then rounded to f32.
#[derive(Clone, Copy, Debug)]
pub struct AdamWStep {
    /// Learning rate.
    pub lr: f64,
    /// Weight decay for this tensor's group (0 for the no-decay groups).
    pub weight_decay: f64,
    /// Steps taken by this parameter, including this one (≥ 1).
    pub step: u64,
}

/// AdamW constants shared by all tensors of one optimizer.
#[derive(Clone, Copy, Debug)]
pub struct AdamWConfig {
    /// β1.
    pub beta1: f64,
    /// β2.
    pub beta2: f64,
    /// ε (added after the bias-corrected square root).
    pub eps: f64,
}

impl AdamWConfig {
    /// `(1 − β1, β2, 1 − β2, eps)` as f32, the differences taken in f64.
    fn scalars(&self) -> (f32, f32, f32, f32) {
        (
            (1.0 - self.beta1) as f32,
            self.beta2 as f32,
            (1.0 - self.beta2) as f32,
            self.eps as f32,
        )
    }
}

impl AdamWStep {
    /// `(1 − lr·wd, lr / bc1, √bc2)`.
    fn scalars(&self, c: &AdamWConfig) -> (f32, f32, f32) {
        let decay = if self.weight_decay != 0.0 {
            1.0 - self.lr * self.weight_decay
        } else {
            1.0
        };
        let step = self.step.max(1) as f64;
        let bc1 = 1.0 - c.beta1.powf(step);
        let bc2 = 1.0 - c.beta2.powf(step);
        (decay as f32, (self.lr / bc1) as f32, bc2.sqrt() as f32)
    }
}

fn f32_view<'a>(s: &'a CudaStorage, l: &Layout, op: &str, what: &str) -> Result<CudaView<'a, f32>> {
    float_dtype(s, op, true)?;
    view::<f32>(s, l, op, what)
}

fn f32_dst<'a>(
    s: &'a mut CudaStorage,
    l: &Layout,
    op: &str,
    what: &str,
) -> Result<CudaViewMut<'a, f32>> {
    float_dtype(s, op, true)?;
    let Some((a, b)) = l.contiguous_offsets() else {
        bail!("{op}: {what} must be contiguous")
    };
    Ok(s.as_cuda_slice_mut::<f32>()?.slice_mut(a..b))
}

/// One fused AdamW pass over one tensor (torch `_single_tensor_adamw` semantics, see
/// `optim.rs`): updates `p` (the destination) and the moments `m`, `v` in place.
///
/// `m` and `v` are written through their device pointers although they arrive as shared
/// references (candle's in-place ops hand out only the destination mutably): they must be
/// storages owned by the optimizer state, not views shared with other live tensors.
#[allow(clippy::too_many_arguments)]
pub fn adamw_inplace(
    p: &mut CudaStorage,
    lp: &Layout,
    g: &CudaStorage,
    lg: &Layout,
    m: &CudaStorage,
    lm: &Layout,
    v: &CudaStorage,
    lv: &Layout,
    cfg: &AdamWConfig,
    step: &AdamWStep,
) -> Result<()> {
    const OP: &str = "adamw (cuda)";
    let n = lp.shape().elem_count();
    for (what, l) in [("grad", lg), ("exp_avg", lm), ("exp_avg_sq", lv)] {
        if l.shape().elem_count() != n {
            bail!("{OP}: {what} has {:?}, param has {:?}", l.dims(), lp.dims());
        }
    }
    let gs = f32_view(g, lg, OP, "grad")?;
    let ms = f32_view(m, lm, OP, "exp_avg")?;
    let vs = f32_view(v, lv, OP, "exp_avg_sq")?;
    let dev = p.device.clone();
    let mut ps = f32_dst(p, lp, OP, "param")?;
    let (decay, step_size, sqrt_bc2) = step.scalars(cfg);
    let (omb1, b2, omb2, eps) = cfg.scalars();
    let f = load(&dev, OPTIM, "adamw_f32")?;
    let stream = dev.cuda_stream();
    let mut bld = stream.launch_builder(&f);
    bld.arg(&mut ps).arg(&gs).arg(&ms).arg(&vs).arg(&n);
    bld.arg(&decay)
        .arg(&omb1)
        .arg(&b2)
        .arg(&omb2)
        .arg(&step_size)
        .arg(&sqrt_bc2)
        .arg(&eps);
    // SAFETY: matches adamw_f32 in optim.cu.
    unsafe { bld.launch(stride_cfg(n.div_ceil(4))) }.w()?;
    Ok(())
}

/// First pass of the two-pass AdamW (the model's `AdamMoments` op): `state [2, n]` (exp_avg row
/// 0, exp_avg_sq row 1) updated in place from `g`. One launch.
pub fn adam_moments(
    state: &mut CudaStorage,
    ls: &Layout,
    g: &CudaStorage,
    lg: &Layout,
    cfg: &AdamWConfig,
) -> Result<()> {
    const OP: &str = "adam moments (cuda)";
    let n = lg.shape().elem_count();
    if ls.shape().elem_count() != 2 * n {
        bail!("{OP}: state {:?} must hold 2 × {n} elements", ls.dims());
    }
    let gs = f32_view(g, lg, OP, "grad")?;
    let dev = state.device.clone();
    let mut st = f32_dst(state, ls, OP, "state")?;
    let (mut m, mut v) = st.split_at_mut(n);
    let (omb1, b2, omb2, _) = cfg.scalars();
    let f = load(&dev, OPTIM, "adam_moments_f32")?;
    let stream = dev.cuda_stream();
    let mut bld = stream.launch_builder(&f);
    bld.arg(&mut m)
        .arg(&mut v)
        .arg(&gs)
        .arg(&n)
        .arg(&omb1)
        .arg(&b2)
        .arg(&omb2);
    // SAFETY: matches adam_moments_f32 in optim.cu.
    unsafe { bld.launch(stride_cfg(n)) }.w()?;
    Ok(())
}

/// Second pass of the two-pass AdamW (the model's `AdamUpdate` op): the parameter from the
/// updated `state [2, n]`. One launch.
pub fn adam_update(
    p: &mut CudaStorage,
    lp: &Layout,
    state: &CudaStorage,
    ls: &Layout,
    cfg: &AdamWConfig,
    step: &AdamWStep,
) -> Result<()> {
    const OP: &str = "adamw update (cuda)";
    let n = lp.shape().elem_count();
    if ls.shape().elem_count() != 2 * n {
        bail!("{OP}: state {:?} must hold 2 × {n} elements", ls.dims());
    }
    let st = f32_view(state, ls, OP, "state")?;
    let (m, v) = (st.slice(0..n), st.slice(n..2 * n));
    let dev = p.device.clone();
    let mut ps = f32_dst(p, lp, OP, "param")?;
    let (decay, step_size, sqrt_bc2) = step.scalars(cfg);
    let eps = cfg.eps as f32;
    let f = load(&dev, OPTIM, "adam_update_f32")?;
    let stream = dev.cuda_stream();
    let mut bld = stream.launch_builder(&f);
    bld.arg(&mut ps).arg(&m).arg(&v).arg(&n);
    bld.arg(&decay).arg(&step_size).arg(&sqrt_bc2).arg(&eps);
    // SAFETY: matches adam_update_f32 in optim.cu.
    unsafe { bld.launch(stride_cfg(n)) }.w()?;
    Ok(())
}

/// EMA in place: `t ← m·t + (1 − m)·s` (target-encoder update). One launch.
pub fn ema_inplace(
    t: &mut CudaStorage,
    lt: &Layout,
    s: &CudaStorage,
    ls: &Layout,
    momentum: f64,
) -> Result<()> {
    const OP: &str = "ema (cuda)";
    let n = lt.shape().elem_count();
    if ls.shape().elem_count() != n {
        bail!("{OP}: source {:?} vs target {:?}", ls.dims(), lt.dims());
    }
    let ss = f32_view(s, ls, OP, "source")?;
    let dev = t.device.clone();
    let mut ts = f32_dst(t, lt, OP, "target")?;
    let (mom, rest) = (momentum as f32, (1.0 - momentum) as f32);
    let f = load(&dev, OPTIM, "ema_f32")?;
    let stream = dev.cuda_stream();
    let mut bld = stream.launch_builder(&f);
    bld.arg(&mut ts).arg(&ss).arg(&n).arg(&mom).arg(&rest);
    // SAFETY: matches ema_f32 in optim.cu.
    unsafe { bld.launch(stride_cfg(n.div_ceil(4))) }.w()?;
    Ok(())
}

/// One tensor of a multi-tensor AdamW launch.
#[derive(Clone, Copy, Debug)]
pub struct AdamWSlot<'a> {
    /// The parameter (f32, updated in place).
    pub param: &'a Tensor,
    /// Its gradient: f32, or bf16 when the step ran on bf16 copies of the weights.
    pub grad: &'a Tensor,
    /// First moment (updated in place).
    pub exp_avg: &'a Tensor,
    /// Second moment (updated in place).
    pub exp_avg_sq: &'a Tensor,
    /// This tensor's lr / weight decay / step.
    pub step: AdamWStep,
    /// Factor the gradient is multiplied by as it is read (the clipping factor; 1 for none).
    pub grad_scale: f64,
    /// A bf16 copy of the parameter, rewritten from the updated values in the same pass.
    pub copy: Option<&'a Tensor>,
}

/// Device address of a contiguous CUDA tensor's first element (f32, or bf16 where `bf16_ok`),
/// with the storage guard that keeps it alive, its element count and dtype.
///
/// For the pointer tables of the multi-tensor kernels: the address waits for the tensor's
/// last recorded writer, but the read event is recorded here, before the launch, and writes
/// through a table record none. So these launches are ordered only within the calling
/// thread's stream; a reader on another stream needs an explicit marker (as
/// `crate::target_lane` sets for the weights the optimiser and the EMA rewrite).
fn dev_ptr<'a>(
    t: &'a Tensor,
    op: &str,
    what: &str,
    bf16_ok: bool,
) -> Result<(u64, candle_core::StorageRef<'a>, usize, DType)> {
    let (guard, layout) = t.storage_and_layout();
    let (ptr, n, dtype) = match &*guard {
        Storage::Cuda(cs) => {
            let dtype = float_dtype(cs, op, !bf16_ok)?;
            let Some((a, b)) = layout.contiguous_offsets() else {
                bail!("{op}: {what} must be contiguous")
            };
            let stream = cs.device.cuda_stream();
            let base = match dtype {
                DType::F32 => cs.as_cuda_slice::<f32>()?.device_ptr(&stream).0 + (a * 4) as u64,
                _ => cs.as_cuda_slice::<bf16>()?.device_ptr(&stream).0 + (a * 2) as u64,
            };
            (base, b - a, dtype)
        }
        _ => bail!("{op}: {what} is not on a CUDA device"),
    };
    Ok((ptr, guard, n, dtype))
}

/// [`dev_ptr`] of an f32 tensor.
fn f32_ptr<'a>(
    t: &'a Tensor,
    op: &str,
    what: &str,
) -> Result<(u64, candle_core::StorageRef<'a>, usize)> {
    let (p, g, n, _) = dev_ptr(t, op, what, false)?;
    Ok((p, g, n))
}

/// Device address of a multi-tensor entry's bf16 copy of an `n`-element tensor (0 for none),
/// its storage guard joining `guards`.
fn copy_ptr<'a>(
    copy: Option<&'a Tensor>,
    n: usize,
    op: &str,
    guards: &mut Vec<candle_core::StorageRef<'a>>,
) -> Result<u64> {
    let Some(c) = copy else {
        return Ok(0);
    };
    let (p, guard, nc, dtype) = dev_ptr(c, op, "copy", true)?;
    if dtype != DType::BF16 {
        bail!("{op}: the copy must be bf16, got {dtype:?}");
    }
    if nc != n {
        bail!("{op}: the copy has {nc} elements, its tensor {n}");
    }
    guards.push(guard);
    Ok(p)
}

/// Builds the block → (tensor, chunk) map of a multi-tensor launch.
fn block_map(sizes: &[usize]) -> Vec<u64> {
    let mut map = Vec::new();
    for (t, &n) in sizes.iter().enumerate() {
        for k in 0..n.div_ceil(MULTI_CHUNK) {
            map.push(t as u64 | ((k as u64) << 32));
        }
    }
    map
}

/// Uploads `table ++ map` in one host→device copy; returns the buffer and the table length.
fn upload_table(
    dev: &CudaDevice,
    mut table: Vec<u64>,
    map: Vec<u64>,
) -> Result<(CudaSlice<u64>, usize)> {
    let ntab = table.len();
    table.extend(map);
    Ok((dev.clone_htod(&table)?, ntab))
}

fn multi_cfg(nblocks: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (nblocks, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// AdamW over many tensors in ONE launch per gradient dtype (plus one small host→device copy
/// of the table): the same per-element update as [`adamw_inplace`], with per-tensor lr / weight
/// decay / step / gradient scale, and each slot's bf16 copy (if any) rewritten in the same pass.
/// Params and moments must be contiguous f32, gradients f32 or bf16, all on the same CUDA
/// device; params, moments and copies are written in place (they must not alias each other or
/// other live tensors).
pub fn adamw_multi(slots: &[AdamWSlot<'_>], cfg: &AdamWConfig) -> Result<()> {
    const OP: &str = "adamw_multi (cuda)";
    let Some(first) = slots.first() else {
        return Ok(());
    };
    let dev = match first.param.device() {
        candle_core::Device::Cuda(d) => d.clone(),
        _ => bail!("{OP}: tensors must be on a CUDA device"),
    };
    for (grad_dtype, kernel) in [
        (DType::F32, "adamw_multi_f32"),
        (DType::BF16, "adamw_multi_bf16g"),
    ] {
        let part: Vec<&AdamWSlot<'_>> = slots
            .iter()
            .filter(|s| s.grad.dtype() == grad_dtype)
            .collect();
        if !part.is_empty() {
            adamw_multi_launch(&dev, &part, cfg, kernel)?;
        }
    }
    if let Some(s) = slots
        .iter()
        .find(|s| !matches!(s.grad.dtype(), DType::F32 | DType::BF16))
    {
        bail!(
            "{OP}: gradients must be f32 or bf16, got {:?}",
            s.grad.dtype()
        );
    }
    Ok(())
}

/// One launch of `kernel` over `slots`, whose gradients all have the kernel's dtype.
fn adamw_multi_launch(
    dev: &CudaDevice,
    slots: &[&AdamWSlot<'_>],
    cfg: &AdamWConfig,
    kernel: &str,
) -> Result<()> {
    const OP: &str = "adamw_multi (cuda)";
    let mut guards = Vec::with_capacity(5 * slots.len());
    let mut table: Vec<u64> = Vec::with_capacity(8 * slots.len());
    let mut sizes = Vec::with_capacity(slots.len());
    for s in slots {
        let (p, gp, n) = f32_ptr(s.param, OP, "param")?;
        let (g, gg, ng, _) = dev_ptr(s.grad, OP, "grad", true)?;
        let (m, gm, nm) = f32_ptr(s.exp_avg, OP, "exp_avg")?;
        let (v, gv, nv) = f32_ptr(s.exp_avg_sq, OP, "exp_avg_sq")?;
        if ng != n || nm != n || nv != n {
            bail!("{OP}: param/grad/moments sizes differ ({n}, {ng}, {nm}, {nv})");
        }
        guards.extend([gp, gg, gm, gv]);
        let copy = copy_ptr(s.copy, n, OP, &mut guards)?;
        let (decay, step_size, sqrt_bc2) = s.step.scalars(cfg);
        let gscale = s.grad_scale as f32;
        // Layout of AdamWEntry in optim.cu: 5 u64, 4 f32, 1 u64.
        table.extend([p, g, m, v, n as u64]);
        table.push(u64::from(decay.to_bits()) | (u64::from(step_size.to_bits()) << 32));
        table.push(u64::from(sqrt_bc2.to_bits()) | (u64::from(gscale.to_bits()) << 32));
        table.push(copy);
        sizes.push(n);
    }
    let map = block_map(&sizes);
    if map.is_empty() {
        return Ok(());
    }
    let nblocks = u32_of(map.len(), OP, "blocks")?;
    let (dtable, ntab) = upload_table(dev, table, map)?;
    let tab = dtable.slice(0..ntab);
    let bmap = dtable.slice(ntab..);
    let (omb1, b2, omb2, eps) = cfg.scalars();
    let chunk = MULTI_CHUNK as u32;
    let f = load(dev, OPTIM, kernel)?;
    let stream = dev.cuda_stream();
    let mut bld = stream.launch_builder(&f);
    bld.arg(&tab)
        .arg(&bmap)
        .arg(&omb1)
        .arg(&b2)
        .arg(&omb2)
        .arg(&eps)
        .arg(&chunk);
    // SAFETY: matches adamw_multi_f32 / adamw_multi_bf16g in optim.cu (the gradients have the
    // kernel's dtype); the guards keep every tensor alive.
    unsafe { bld.launch(multi_cfg(nblocks)) }.w()?;
    drop(guards);
    Ok(())
}

/// EMA over many `(target, source, copy)` triples in ONE launch: `t ← m·t + (1 − m)·s`, and
/// the new `t` in bf16 to `copy` where there is one.
pub fn ema_multi(pairs: &[(&Tensor, &Tensor, Option<&Tensor>)], momentum: f64) -> Result<()> {
    const OP: &str = "ema_multi (cuda)";
    let Some((first, ..)) = pairs.first() else {
        return Ok(());
    };
    let dev = match first.device() {
        candle_core::Device::Cuda(d) => d.clone(),
        _ => bail!("{OP}: tensors must be on a CUDA device"),
    };
    let mut guards = Vec::with_capacity(3 * pairs.len());
    let mut table: Vec<u64> = Vec::with_capacity(4 * pairs.len());
    let mut sizes = Vec::with_capacity(pairs.len());
    for (t, s, copy) in pairs {
        let (tp, gt, n) = f32_ptr(t, OP, "target")?;
        let (sp, gs, ns) = f32_ptr(s, OP, "source")?;
        if ns != n {
            bail!("{OP}: target has {n} elements, source {ns}");
        }
        guards.extend([gt, gs]);
        let cp = copy_ptr(*copy, n, OP, &mut guards)?;
        table.extend([tp, sp, n as u64, cp]);
        sizes.push(n);
    }
    let map = block_map(&sizes);
    if map.is_empty() {
        return Ok(());
    }
    let nblocks = u32_of(map.len(), OP, "blocks")?;
    let (dtable, ntab) = upload_table(&dev, table, map)?;
    let tab = dtable.slice(0..ntab);
    let bmap = dtable.slice(ntab..);
    let (mom, rest, chunk) = (momentum as f32, (1.0 - momentum) as f32, MULTI_CHUNK as u32);
    let f = load(&dev, OPTIM, "ema_multi_f32")?;
    let stream = dev.cuda_stream();
    let mut bld = stream.launch_builder(&f);
    bld.arg(&tab).arg(&bmap).arg(&mom).arg(&rest).arg(&chunk);
    // SAFETY: matches ema_multi_f32 in optim.cu; the guards keep every tensor alive.
    unsafe { bld.launch(multi_cfg(nblocks)) }.w()?;
    drop(guards);
    Ok(())
}

/// Σ x² over every tensor of each group, in two launches and one read — the per-module
/// gradient norms of a step, which per tensor cost four or five candle ops each (about two
/// thousand launches at ViT-L, issued while the GPU waits). fp32 partials per 8192-element chunk,
/// added per group in a fixed order. The tensors must be contiguous, on one CUDA device, and all
/// f32 or all bf16. Reads the sums back (a synchronisation).
pub fn sum_sq_groups(groups: &[&[&Tensor]]) -> Result<Vec<f32>> {
    match sum_sq_groups_queued(groups)? {
        Some(sums) => sums.to_vec1::<f32>(),
        None => Ok(vec![0.0; groups.len()]),
    }
}

/// [`sum_sq_groups`] without the read: the `[groups]` f32 sums stay on the device, queued
/// behind the launches, for a caller that reads them together with other values (a training
/// step reads them with its loss: one synchronisation, not two). `None` when the groups hold no
/// elements at all (every sum is 0).
pub fn sum_sq_groups_queued(groups: &[&[&Tensor]]) -> Result<Option<Tensor>> {
    const OP: &str = "sum_sq_groups (cuda)";
    let Some(first) = groups.iter().flat_map(|g| g.iter()).next() else {
        return Ok(None);
    };
    let dev = match first.device() {
        candle_core::Device::Cuda(d) => d.clone(),
        _ => bail!("{OP}: tensors must be on a CUDA device"),
    };
    let dtype = first.dtype();
    let kernel = match dtype {
        DType::F32 => "sumsq_multi_f32",
        DType::BF16 => "sumsq_multi_bf16",
        d => bail!("{OP}: only f32 and bf16 are supported, got {d:?}"),
    };
    let mut guards = Vec::new();
    let mut table: Vec<u64> = Vec::new();
    let mut sizes = Vec::new();
    let mut bounds: Vec<u64> = vec![0];
    let mut blocks = 0u64;
    for g in groups {
        for t in g.iter() {
            if t.dtype() != dtype {
                bail!("{OP}: mixed dtypes ({dtype:?} and {:?})", t.dtype());
            }
            let (p, guard, n, _) = dev_ptr(t, OP, "tensor", true)?;
            guards.push(guard);
            table.extend([p, n as u64]);
            sizes.push(n);
            blocks += n.div_ceil(MULTI_CHUNK) as u64;
        }
        bounds.push(blocks);
    }
    let map = block_map(&sizes);
    if map.is_empty() {
        return Ok(None);
    }
    let nblocks = u32_of(map.len(), OP, "blocks")?;
    let ngroups = u32_of(groups.len(), OP, "groups")?;
    let nmap = map.len();
    let (dtable, ntab) = upload_table(&dev, table, [map, bounds].concat())?;
    let tab = dtable.slice(0..ntab);
    let bmap = dtable.slice(ntab..ntab + nmap);
    let bnds = dtable.slice(ntab + nmap..);
    // SAFETY: every block writes its partial; every group its sum.
    let partial = unsafe { dev.alloc::<f32>(nmap)? };
    let out = unsafe { dev.alloc::<f32>(groups.len())? };
    let chunk = MULTI_CHUNK as u32;
    let stream = dev.cuda_stream();
    let f = load(&dev, OPTIM, kernel)?;
    let mut bld = stream.launch_builder(&f);
    bld.arg(&tab).arg(&bmap).arg(&partial).arg(&chunk);
    // SAFETY: matches sumsq_multi_* in optim.cu (the tensors have the kernel's dtype); the
    // guards keep every tensor alive.
    unsafe { bld.launch(multi_cfg(nblocks)) }.w()?;
    let f = load(&dev, OPTIM, "sum_ranges_f32")?;
    let mut bld = stream.launch_builder(&f);
    bld.arg(&partial).arg(&bnds).arg(&out);
    let cfg = LaunchConfig {
        grid_dim: (ngroups, 1, 1),
        block_dim: (1024, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: matches sum_ranges_f32 in optim.cu: `bounds` has groups + 1 entries, each within
    // the partials.
    unsafe { bld.launch(cfg) }.w()?;
    // The guards (event-tracked reads of the gradients) are released once the launches are
    // queued: the stream orders any later write after them.
    drop(guards);
    let storage = CudaStorage::wrap_cuda_slice(out, dev.clone());
    Ok(Some(Tensor::from_storage(
        candle_core::Storage::Cuda(storage),
        groups.len(),
        candle_core::op::BackpropOp::none(),
        false,
    )))
}
