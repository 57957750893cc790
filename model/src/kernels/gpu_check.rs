//! GPU self-check of the fused op layer (`vjepa gpu-check`): every op forward and backward on the
//! CPU and on the GPU with the same random inputs, the max relative error per row (PASS/FAIL
//! against fp32 ≤ 1e-4, bf16 ≤ 2e-2), and CUDA-synchronised timings at ViT-L step shapes.
//!
//! Relative error = max |gpu − cpu| / max |cpu| over each output tensor (the worst output of
//! the row), i.e. relative to the output's scale, so that near-zero entries do not dominate.
//! The CPU side is the composite candle computation in f64 (autograd for the backward): an
//! independent reference. bf16 rows feed the GPU bf16 inputs and the reference the same values
//! widened, so only the GPU's arithmetic and output rounding are measured.

use std::time::Instant;

use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
use candle_core::{
    CpuStorage, CudaDevice, CudaStorage, CustomOp1, CustomOp2, CustomOp3, D, DType, Device,
    InplaceOp2, InplaceOp3, Layout, Shape, Tensor, Var, bail,
};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use serde::Serialize;

use crate::ModelError;
use crate::cuda_kernels as ck;

/// Error tolerance for fp32 rows.
pub const TOL_F32: f64 = 1e-4;
/// Error tolerance for bf16 rows.
pub const TOL_BF16: f64 = 2e-2;

/// One correctness row.
#[derive(Clone, Debug, Serialize)]
pub struct CheckRow {
    /// Op and direction, e.g. `attention bwd`.
    pub op: String,
    /// Shape description.
    pub case: String,
    /// Storage dtype on the GPU (`f32`/`bf16`).
    pub dtype: String,
    /// Worst max-relative error over the row's outputs.
    pub max_rel_err: f64,
    /// Tolerance for this dtype.
    pub tol: f64,
    /// Whether the error is finite and within tolerance.
    pub pass: bool,
}

/// One timing row (GPU time between CUDA events around the op, and host wall time with a
/// device synchronisation after each run).
#[derive(Clone, Debug, Serialize)]
pub struct TimingRow {
    /// Op and direction.
    pub op: String,
    /// Shape description.
    pub shape: String,
    /// Storage dtype.
    pub dtype: String,
    /// Median GPU time (ms).
    pub median_ms: f64,
    /// Fastest GPU time (ms).
    pub min_ms: f64,
    /// Median synchronised wall time (ms).
    pub wall_median_ms: f64,
    /// Timed runs (after 3 warm-ups).
    pub runs: usize,
    /// Effective bandwidth for memory-bound ops (GB/s of the minimal traffic), if meaningful.
    pub gbps: Option<f64>,
    /// Effective throughput for attention (TFLOP/s of the 4·B·H·N²·d fwd / 10·… bwd flops).
    pub tflops: Option<f64>,
}

fn dname(d: DType) -> String {
    format!("{d:?}").to_lowercase()
}

fn tol(d: DType) -> f64 {
    if d == DType::BF16 { TOL_BF16 } else { TOL_F32 }
}

// ---------------------------------------------------------------------------------------------
// GPU-only wrappers that hand the storages to the cuda_kernels functions.

type Fn1 = dyn Fn(&CudaStorage, &Layout) -> candle_core::Result<(CudaStorage, Shape)>;
type Fn2 = dyn Fn(
    &CudaStorage,
    &Layout,
    &CudaStorage,
    &Layout,
) -> candle_core::Result<(CudaStorage, Shape)>;
type Fn3 = dyn Fn(
    &CudaStorage,
    &Layout,
    &CudaStorage,
    &Layout,
    &CudaStorage,
    &Layout,
) -> candle_core::Result<(CudaStorage, Shape)>;

struct G1<'a>(&'static str, &'a Fn1);
struct G2<'a>(&'static str, &'a Fn2);
struct G3<'a>(&'static str, &'a Fn3);

impl CustomOp1 for G1<'_> {
    fn name(&self) -> &'static str {
        self.0
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        bail!("{}: GPU-only check wrapper", self.0)
    }
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        (self.1)(s, l)
    }
}

impl CustomOp2 for G2<'_> {
    fn name(&self) -> &'static str {
        self.0
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        bail!("{}: GPU-only check wrapper", self.0)
    }
    fn cuda_fwd(
        &self,
        a: &CudaStorage,
        la: &Layout,
        b: &CudaStorage,
        lb: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        (self.1)(a, la, b, lb)
    }
}

impl CustomOp3 for G3<'_> {
    fn name(&self) -> &'static str {
        self.0
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        bail!("{}: GPU-only check wrapper", self.0)
    }
    fn cuda_fwd(
        &self,
        a: &CudaStorage,
        la: &Layout,
        b: &CudaStorage,
        lb: &Layout,
        c: &CudaStorage,
        lc: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        (self.1)(a, la, b, lb, c, lc)
    }
}

/// AdamW on one tensor: dst = param, srcs = grad and the `[2, n]` moment state (exp_avg row 0,
/// exp_avg_sq row 1), as an in-place op would be wired.
struct AdamWOp {
    cfg: ck::AdamWConfig,
    step: ck::AdamWStep,
}

impl InplaceOp3 for AdamWOp {
    fn name(&self) -> &'static str {
        "adamw-check"
    }
    fn cpu_fwd(
        &self,
        _: &mut CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<()> {
        bail!("adamw-check: GPU-only check wrapper")
    }
    fn cuda_fwd(
        &self,
        p: &mut CudaStorage,
        lp: &Layout,
        g: &CudaStorage,
        lg: &Layout,
        st: &CudaStorage,
        ls: &Layout,
    ) -> candle_core::Result<()> {
        let lm = ls.narrow(0, 0, 1)?;
        let lv = ls.narrow(0, 1, 1)?;
        ck::adamw_inplace(p, lp, g, lg, st, &lm, st, &lv, &self.cfg, &self.step)
    }
}

/// The two passes of the model's AdamW ops: moments (dst state `[2, n]`, src grad), then the
/// parameter (dst param, src state).
struct MomentsOp(ck::AdamWConfig);
struct UpdateOp(ck::AdamWConfig, ck::AdamWStep);

impl InplaceOp2 for MomentsOp {
    fn name(&self) -> &'static str {
        "adam-moments-check"
    }
    fn cpu_fwd(
        &self,
        _: &mut CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<()> {
        bail!("adam-moments-check: GPU-only check wrapper")
    }
    fn cuda_fwd(
        &self,
        st: &mut CudaStorage,
        ls: &Layout,
        g: &CudaStorage,
        lg: &Layout,
    ) -> candle_core::Result<()> {
        ck::adam_moments(st, ls, g, lg, &self.0)
    }
}

impl InplaceOp2 for UpdateOp {
    fn name(&self) -> &'static str {
        "adam-update-check"
    }
    fn cpu_fwd(
        &self,
        _: &mut CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<()> {
        bail!("adam-update-check: GPU-only check wrapper")
    }
    fn cuda_fwd(
        &self,
        p: &mut CudaStorage,
        lp: &Layout,
        st: &CudaStorage,
        ls: &Layout,
    ) -> candle_core::Result<()> {
        ck::adam_update(p, lp, st, ls, &self.0, &self.1)
    }
}

struct EmaOp(f64);

impl InplaceOp2 for EmaOp {
    fn name(&self) -> &'static str {
        "ema-check"
    }
    fn cpu_fwd(
        &self,
        _: &mut CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<()> {
        bail!("ema-check: GPU-only check wrapper")
    }
    fn cuda_fwd(
        &self,
        t: &mut CudaStorage,
        lt: &Layout,
        s: &CudaStorage,
        ls: &Layout,
    ) -> candle_core::Result<()> {
        ck::ema_inplace(t, lt, s, ls, self.0)
    }
}

/// The GPU side of every op, as Tensor functions over the raw kernels.
mod gpu {
    use super::*;

    pub fn attention(qkv: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
        attention_with(qkv, heads, ck::AttnKernel::Auto)
    }

    pub fn attention_with(
        qkv: &Tensor,
        heads: usize,
        k: ck::AttnKernel,
    ) -> candle_core::Result<Tensor> {
        let f = move |s: &CudaStorage, l: &Layout| ck::attention_fwd_with(s, l, heads, k);
        qkv.apply_op1_no_bwd(&G1("attention", &f))
    }

    pub fn attention_bwd(
        qkv: &Tensor,
        out: &Tensor,
        dout: &Tensor,
        heads: usize,
    ) -> candle_core::Result<Tensor> {
        attention_bwd_with(qkv, out, dout, heads, ck::AttnKernel::Auto)
    }

    pub fn attention_bwd_with(
        qkv: &Tensor,
        out: &Tensor,
        dout: &Tensor,
        heads: usize,
        k: ck::AttnKernel,
    ) -> candle_core::Result<Tensor> {
        let f =
            move |a: &CudaStorage,
                  la: &Layout,
                  b: &CudaStorage,
                  lb: &Layout,
                  c: &CudaStorage,
                  lc: &Layout| ck::attention_bwd_with(a, la, b, lb, c, lc, heads, k);
        qkv.apply_op3_no_bwd(out, dout, &G3("attention-bwd", &f))
    }

    pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f32) -> candle_core::Result<Tensor> {
        let f = move |a: &CudaStorage,
                      la: &Layout,
                      b: &CudaStorage,
                      lb: &Layout,
                      c: &CudaStorage,
                      lc: &Layout| ck::layer_norm_fwd(a, la, b, lb, c, lc, eps);
        x.apply_op3_no_bwd(w, b, &G3("layer_norm", &f))
    }

    /// (dx, dw, db)
    pub fn layer_norm_bwd(
        x: &Tensor,
        w: &Tensor,
        dy: &Tensor,
        eps: f32,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let f = move |a: &CudaStorage,
                      la: &Layout,
                      b: &CudaStorage,
                      lb: &Layout,
                      c: &CudaStorage,
                      lc: &Layout| ck::layer_norm_bwd(a, la, b, lb, c, lc, eps);
        let packed = x.apply_op3_no_bwd(w, dy, &G3("layer_norm-bwd", &f))?;
        let rows = packed.dim(0)? - 2;
        let dx = packed.narrow(0, 0, rows)?.reshape(x.shape())?;
        Ok((dx, packed.get(rows)?, packed.get(rows + 1)?))
    }

    pub fn layer_norm_plain(x: &Tensor, eps: f32) -> candle_core::Result<Tensor> {
        let f = move |s: &CudaStorage, l: &Layout| ck::layer_norm_plain_fwd(s, l, eps);
        x.apply_op1_no_bwd(&G1("layer_norm_plain", &f))
    }

    pub fn layer_norm_plain_bwd(x: &Tensor, dy: &Tensor, eps: f32) -> candle_core::Result<Tensor> {
        let f = move |a: &CudaStorage, la: &Layout, b: &CudaStorage, lb: &Layout| {
            ck::layer_norm_plain_bwd(a, la, b, lb, eps)
        };
        x.apply_op2_no_bwd(dy, &G2("layer_norm_plain-bwd", &f))
    }

    pub fn bias_add(x: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
        x.apply_op2_no_bwd(b, &G2("bias_add", &ck::bias_add))
    }

    pub fn bias_gelu(x: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
        x.apply_op2_no_bwd(b, &G2("bias_gelu", &ck::bias_gelu))
    }

    /// (dx, db)
    pub fn bias_gelu_bwd(
        x: &Tensor,
        b: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let packed = x.apply_op3_no_bwd(b, dy, &G3("bias_gelu-bwd", &ck::bias_gelu_bwd))?;
        let rows = packed.dim(0)? - 1;
        Ok((
            packed.narrow(0, 0, rows)?.reshape(x.shape())?,
            packed.get(rows)?,
        ))
    }

    pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> candle_core::Result<Tensor> {
        match b {
            Some(b) => {
                let f =
                    |a: &CudaStorage,
                     la: &Layout,
                     w: &CudaStorage,
                     lw: &Layout,
                     b: &CudaStorage,
                     lb: &Layout| ck::linear_fwd(a, la, w, lw, Some((b, lb)));
                x.apply_op3_no_bwd(w, b, &G3("linear", &f))
            }
            None => {
                let f = |a: &CudaStorage, la: &Layout, w: &CudaStorage, lw: &Layout| {
                    ck::linear_fwd(a, la, w, lw, None)
                };
                x.apply_op2_no_bwd(w, &G2("linear", &f))
            }
        }
    }

    /// (dx, dW, db)
    pub fn linear_bwd(
        x: &Tensor,
        w: &Tensor,
        dy: &Tensor,
        bias: bool,
    ) -> candle_core::Result<(Tensor, Tensor, Option<Tensor>)> {
        let f = move |a: &CudaStorage,
                      la: &Layout,
                      w: &CudaStorage,
                      lw: &Layout,
                      d: &CudaStorage,
                      ld: &Layout| ck::linear_bwd(a, la, w, lw, d, ld, bias);
        let packed = x.apply_op3_no_bwd(w, dy, &G3("linear-bwd", &f))?;
        let (out, inp) = w.dims2()?;
        let n = x.elem_count();
        let dx = packed.narrow(0, 0, n)?.reshape(x.shape())?;
        let dw = packed.narrow(0, n, out * inp)?.reshape((out, inp))?;
        let db = if bias {
            Some(packed.narrow(0, n + out * inp, out)?)
        } else {
            None
        };
        Ok((dx, dw, db))
    }

    pub fn column_sum(x: &Tensor) -> candle_core::Result<Tensor> {
        x.apply_op1_no_bwd(&G1("column_sum", &ck::column_sum))
    }

    pub fn sum_sq(x: &Tensor) -> candle_core::Result<Tensor> {
        x.apply_op1_no_bwd(&G1("sum_sq", &ck::sum_sq))
    }
}

/// The composite f64 CPU references (autograd for backward).
mod reference {
    use super::*;

    fn softmax_last(s: &Tensor) -> candle_core::Result<Tensor> {
        let m = s.max_keepdim(D::Minus1)?;
        let e = s.broadcast_sub(&m)?.exp()?;
        e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
    }

    pub fn attention(qkv: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
        let (b, n, d3) = qkv.dims3()?;
        let d = d3 / 3;
        let hd = d / heads;
        let x = qkv
            .reshape((b, n, 3, heads, hd))?
            .permute((2, 0, 3, 1, 4))?;
        let q = x.get(0)?.contiguous()?;
        let k = x.get(1)?.contiguous()?;
        let v = x.get(2)?.contiguous()?;
        let s = (q.matmul(&k.t()?.contiguous()?)? * (1.0 / (hd as f64).sqrt()))?;
        let o = softmax_last(&s)?.matmul(&v)?;
        o.transpose(1, 2)?.reshape((b, n, d))
    }

    /// (out, dqkv) for loss = Σ out·dout.
    pub fn attention_grad(
        qkv: &Tensor,
        dout: &Tensor,
        heads: usize,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let v = Var::from_tensor(qkv)?;
        let out = attention(v.as_tensor(), heads)?;
        let g = (&out * dout)?.sum_all()?.backward()?;
        let dq = g.get(v.as_tensor()).cloned();
        let Some(dq) = dq else {
            bail!("no gradient for qkv")
        };
        Ok((out.detach(), dq))
    }

    pub fn layer_norm(
        x: &Tensor,
        wb: Option<(&Tensor, &Tensor)>,
        eps: f64,
    ) -> candle_core::Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let y = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
        match wb {
            Some((w, b)) => y.broadcast_mul(w)?.broadcast_add(b),
            None => Ok(y),
        }
    }

    /// (y, dx, dw, db); dw/db are empty for the plain norm.
    pub fn layer_norm_grad(
        x: &Tensor,
        wb: Option<(&Tensor, &Tensor)>,
        dy: &Tensor,
        eps: f64,
    ) -> candle_core::Result<Vec<Tensor>> {
        let xv = Var::from_tensor(x)?;
        let wv = wb.map(|(w, b)| Var::from_tensor(w).and_then(|w| Ok((w, Var::from_tensor(b)?))));
        let wv = wv.transpose()?;
        let y = layer_norm(
            xv.as_tensor(),
            wv.as_ref().map(|(w, b)| (w.as_tensor(), b.as_tensor())),
            eps,
        )?;
        let g = (&y * dy)?.sum_all()?.backward()?;
        let mut out = vec![y.detach()];
        let mut vars = vec![xv.as_tensor().clone()];
        if let Some((w, b)) = &wv {
            vars.push(w.as_tensor().clone());
            vars.push(b.as_tensor().clone());
        }
        for v in vars {
            match g.get(&v) {
                Some(t) => out.push(t.clone()),
                None => bail!("missing layer_norm gradient"),
            }
        }
        Ok(out)
    }

    /// (y, dx, db) of gelu_erf(x + b).
    pub fn bias_gelu_grad(
        x: &Tensor,
        b: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let xv = Var::from_tensor(x)?;
        let bv = Var::from_tensor(b)?;
        let y = xv.as_tensor().broadcast_add(bv.as_tensor())?.gelu_erf()?;
        let g = (&y * dy)?.sum_all()?.backward()?;
        let (Some(dx), Some(db)) = (g.get(xv.as_tensor()), g.get(bv.as_tensor())) else {
            bail!("missing bias_gelu gradient")
        };
        Ok((y.detach(), dx.clone(), db.clone()))
    }

    /// (y, dx, dW, db) of y = x·Wᵀ + b.
    pub fn linear_grad(
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor, Tensor)> {
        let (xv, wv, bv) = (
            Var::from_tensor(x)?,
            Var::from_tensor(w)?,
            Var::from_tensor(b)?,
        );
        let y = xv
            .as_tensor()
            .broadcast_matmul(&wv.as_tensor().t()?)?
            .broadcast_add(bv.as_tensor())?;
        let g = (&y * dy)?.sum_all()?.backward()?;
        let (Some(dx), Some(dw), Some(db)) = (
            g.get(xv.as_tensor()),
            g.get(wv.as_tensor()),
            g.get(bv.as_tensor()),
        ) else {
            bail!("missing linear gradient")
        };
        Ok((y.detach(), dx.clone(), dw.clone(), db.clone()))
    }

    /// torch AdamW (as optim.rs) on f64 tensors: returns (p, m, v) after one step.
    #[allow(clippy::too_many_arguments)]
    pub fn adamw(
        p: &Tensor,
        g: &Tensor,
        m: &Tensor,
        v: &Tensor,
        cfg: &ck::AdamWConfig,
        lr: f64,
        wd: f64,
        step: u64,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let (b1, b2) = (cfg.beta1, cfg.beta2);
        let p = if wd != 0.0 {
            p.affine(1.0 - lr * wd, 0.0)?
        } else {
            p.clone()
        };
        let m = (m + (g - m)?.affine(1.0 - b1, 0.0)?)?;
        let v = (v.affine(b2, 0.0)? + g.sqr()?.affine(1.0 - b2, 0.0)?)?;
        let bc1 = 1.0 - b1.powf(step as f64);
        let bc2 = 1.0 - b2.powf(step as f64);
        let denom = (v.sqrt()? / bc2.sqrt())?.affine(1.0, cfg.eps)?;
        let upd = (&m / denom)?.affine(lr / bc1, 0.0)?;
        Ok(((p - upd)?, m, v))
    }
}

// ---------------------------------------------------------------------------------------------
// Inputs and error measures

struct Inputs {
    rng: ChaCha8Rng,
    gpu: Device,
}

impl Inputs {
    /// A random f32 CPU tensor.
    fn randn(&mut self, shape: &[usize], std: f32) -> candle_core::Result<Tensor> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| {
                let z: f32 = StandardNormal.sample(&mut self.rng);
                z * std
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu)
    }

    /// The same random values for both sides: (GPU tensor in `dtype`, CPU f64 reference).
    fn pair(
        &mut self,
        shape: &[usize],
        std: f32,
        dtype: DType,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let x = self.randn(shape, std)?.to_dtype(dtype)?;
        Ok((x.to_device(&self.gpu)?, x.to_dtype(DType::F64)?))
    }
}

/// max |gpu − cpu| / max |cpu| (NaN/Inf anywhere → +∞).
fn rel_err(gpu: &Tensor, cpu: &Tensor) -> candle_core::Result<f64> {
    let g = gpu
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?;
    let c = cpu.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    if g.len() != c.len() {
        bail!("gpu output has {} elements, reference {}", g.len(), c.len());
    }
    let mut diff = 0f64;
    let mut scale = 0f64;
    for (a, b) in g.iter().zip(&c) {
        if !a.is_finite() || !b.is_finite() {
            return Ok(f64::INFINITY);
        }
        diff = diff.max((a - b).abs());
        scale = scale.max(b.abs());
    }
    Ok(diff / scale.max(1e-30))
}

fn worst(pairs: &[(&Tensor, &Tensor)]) -> candle_core::Result<f64> {
    let mut w = 0f64;
    for (g, c) in pairs {
        w = w.max(rel_err(g, c)?);
    }
    Ok(w)
}

fn row(op: &str, case: String, dtype: DType, err: f64) -> CheckRow {
    let t = tol(dtype);
    CheckRow {
        op: op.to_string(),
        case,
        dtype: dname(dtype),
        max_rel_err: err,
        tol: t,
        pass: err.is_finite() && err <= t,
    }
}

fn cuda_device(dev: &Device) -> Result<CudaDevice, ModelError> {
    match dev {
        Device::Cuda(d) => Ok(d.clone()),
        _ => Err(ModelError::Unsupported(
            "gpu-check needs a CUDA device".into(),
        )),
    }
}

/// Attention shapes of the check: every N × head dim; (batch, heads) kept small for the CPU.
pub const CHECK_SEQ_LENS: [usize; 4] = [95, 357, 1568, 2048];
/// Head dims of the check.
pub const CHECK_HEAD_DIMS: [usize; 4] = [24, 64, 80, 88];

/// Runs every correctness check on `dev` (a CUDA device). `progress` is called after each row.
pub fn run_checks(
    dev: &Device,
    mut progress: impl FnMut(&CheckRow),
) -> Result<Vec<CheckRow>, ModelError> {
    cuda_device(dev)?;
    let mut inp = Inputs {
        rng: ChaCha8Rng::seed_from_u64(0x6a65_7061),
        gpu: dev.clone(),
    };
    let mut rows = Vec::new();
    let mut push = |r: CheckRow, rows: &mut Vec<CheckRow>| {
        progress(&r);
        rows.push(r);
    };
    let dtypes = [DType::F32, DType::BF16];

    for &n in &CHECK_SEQ_LENS {
        for &hd in &CHECK_HEAD_DIMS {
            let (b, h) = if n <= 400 { (2, 3) } else { (1, 2) };
            for &dt in &dtypes {
                let case = format!("B={b} H={h} N={n} d={hd}");
                let (qkv_g, qkv_c) = inp.pair(&[b, n, 3 * h * hd], 1.0, dt)?;
                let (dout_g, dout_c) = inp.pair(&[b, n, h * hd], 1.0, dt)?;
                let (out_c, dqkv_c) = reference::attention_grad(&qkv_c, &dout_c, h)?;
                let out_g = gpu::attention(&qkv_g, h)?;
                let fwd = if dt == DType::BF16 {
                    "attention fwd (tensor cores)"
                } else {
                    "attention fwd"
                };
                push(
                    row(fwd, case.clone(), dt, rel_err(&out_g, &out_c)?),
                    &mut rows,
                );
                if dt == DType::BF16 {
                    let o = gpu::attention_with(&qkv_g, h, ck::AttnKernel::Simt)?;
                    push(
                        row(
                            "attention fwd (simt)",
                            case.clone(),
                            dt,
                            rel_err(&o, &out_c)?,
                        ),
                        &mut rows,
                    );
                }
                let dqkv_g = gpu::attention_bwd(&qkv_g, &out_g, &dout_g, h)?;
                let bwd = if dt == DType::BF16 {
                    "attention bwd (tensor cores)"
                } else {
                    "attention bwd"
                };
                push(
                    row(bwd, case.clone(), dt, rel_err(&dqkv_g, &dqkv_c)?),
                    &mut rows,
                );
                if dt == DType::BF16 {
                    let k = ck::AttnKernel::Simt;
                    let d = gpu::attention_bwd_with(&qkv_g, &out_g, &dout_g, h, k)?;
                    push(
                        row("attention bwd (simt)", case, dt, rel_err(&d, &dqkv_c)?),
                        &mut rows,
                    );
                }
            }
        }
    }

    for &(r, c) in &[(2 * 257, 384usize), (3 * 77, 200), (64, 1024)] {
        for &dt in &dtypes {
            let case = format!("[{r},{c}]");
            let (x_g, x_c) = inp.pair(&[r, c], 1.5, dt)?;
            let (w_g, w_c) = inp.pair(&[c], 1.0, dt)?;
            let (b_g, b_c) = inp.pair(&[c], 1.0, dt)?;
            let (dy_g, dy_c) = inp.pair(&[r, c], 1.0, dt)?;
            // Affine, eps 1e-6 (encoder norms).
            let refs = reference::layer_norm_grad(&x_c, Some((&w_c, &b_c)), &dy_c, 1e-6)?;
            let y_g = gpu::layer_norm(&x_g, &w_g, &b_g, 1e-6)?;
            push(
                row("layer_norm fwd", case.clone(), dt, rel_err(&y_g, &refs[0])?),
                &mut rows,
            );
            let (dx, dw, db) = gpu::layer_norm_bwd(&x_g, &w_g, &dy_g, 1e-6)?;
            let e = worst(&[(&dx, &refs[1]), (&dw, &refs[2]), (&db, &refs[3])])?;
            push(row("layer_norm bwd", case.clone(), dt, e), &mut rows);
            // Plain, eps 1e-5 (target normalisation).
            let refs = reference::layer_norm_grad(&x_c, None, &dy_c, 1e-5)?;
            let y_g = gpu::layer_norm_plain(&x_g, 1e-5)?;
            push(
                row(
                    "layer_norm_plain fwd",
                    case.clone(),
                    dt,
                    rel_err(&y_g, &refs[0])?,
                ),
                &mut rows,
            );
            let dx = gpu::layer_norm_plain_bwd(&x_g, &dy_g, 1e-5)?;
            push(
                row(
                    "layer_norm_plain bwd",
                    case.clone(),
                    dt,
                    rel_err(&dx, &refs[1])?,
                ),
                &mut rows,
            );
            // Bias + GELU and bias add.
            let (bb_g, bb_c) = inp.pair(&[c], 0.5, dt)?;
            let (y_c, dx_c, db_c) = reference::bias_gelu_grad(&x_c, &bb_c, &dy_c)?;
            let y_g = gpu::bias_gelu(&x_g, &bb_g)?;
            push(
                row("bias_gelu fwd", case.clone(), dt, rel_err(&y_g, &y_c)?),
                &mut rows,
            );
            let (dx_g, db_g) = gpu::bias_gelu_bwd(&x_g, &bb_g, &dy_g)?;
            let e = worst(&[(&dx_g, &dx_c), (&db_g, &db_c)])?;
            push(row("bias_gelu bwd", case.clone(), dt, e), &mut rows);
            let y_g = gpu::bias_add(&x_g, &bb_g)?;
            let y_c = x_c.broadcast_add(&bb_c)?;
            push(
                row("bias_add fwd", case.clone(), dt, rel_err(&y_g, &y_c)?),
                &mut rows,
            );
            // bias_add backward: dx = dy (no kernel), db = column_sum(dy).
            let db_g = gpu::column_sum(&dy_g)?;
            push(
                row(
                    "bias_add bwd (column_sum)",
                    case.clone(),
                    dt,
                    rel_err(&db_g, &dy_c.sum(0)?)?,
                ),
                &mut rows,
            );
        }
    }
    // Linear (cuBLAS): odd and ViT-like shapes, with and without bias.
    for &(r, i, o) in &[
        (2 * 95usize, 200usize, 72usize),
        (3 * 128, 384, 1536),
        (77, 96, 96),
    ] {
        for &dt in &dtypes {
            let case = format!("[{r},{i}]x[{o},{i}]T");
            let (x_g, x_c) = inp.pair(&[r, i], 1.0, dt)?;
            let (w_g, w_c) = inp.pair(&[o, i], 0.05, dt)?;
            let (b_g, b_c) = inp.pair(&[o], 1.0, dt)?;
            let (dy_g, dy_c) = inp.pair(&[r, o], 1.0, dt)?;
            let (y_c, dx_c, dw_c, db_c) = reference::linear_grad(&x_c, &w_c, &b_c, &dy_c)?;
            let y_g = gpu::linear(&x_g, &w_g, Some(&b_g))?;
            push(
                row("linear fwd", case.clone(), dt, rel_err(&y_g, &y_c)?),
                &mut rows,
            );
            let y_g = gpu::linear(&x_g, &w_g, None)?;
            let y_nb = y_c.broadcast_sub(&b_c)?;
            push(
                row(
                    "linear fwd (no bias)",
                    case.clone(),
                    dt,
                    rel_err(&y_g, &y_nb)?,
                ),
                &mut rows,
            );
            let (dx, dw, db) = gpu::linear_bwd(&x_g, &w_g, &dy_g, true)?;
            let Some(db) = db else {
                return Err(ModelError::Input("linear backward lost db".into()));
            };
            let e = worst(&[(&dx, &dx_c), (&dw, &dw_c), (&db, &db_c)])?;
            push(row("linear bwd", case, dt, e), &mut rows);
        }
    }
    for &dt in &dtypes {
        let (x_g, x_c) = inp.pair(&[3, 517, 333], 1.0, dt)?;
        let s_g = gpu::column_sum(&x_g)?;
        let s_c = x_c.sum(0)?.sum(0)?;
        push(
            row("column_sum", "[3,517,333]".into(), dt, rel_err(&s_g, &s_c)?),
            &mut rows,
        );
        let (x_g, x_c) = inp.pair(&[1_000_003], 1.0, dt)?;
        let q_g = gpu::sum_sq(&x_g)?;
        let q_c = x_c.sqr()?.sum_all()?;
        push(
            row("sum_sq", "[1000003]".into(), dt, rel_err(&q_g, &q_c)?),
            &mut rows,
        );
    }

    // AdamW: three tensors (one without decay), three steps; per-tensor op and multi-tensor.
    let cfg = ck::AdamWConfig {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
    };
    let sizes = [10_007usize, 4096, 333];
    let wds = [0.05, 0.0, 0.04];
    let (lr, steps) = (1e-3, 3u64);
    let mut ps_c = Vec::new();
    let mut ms_c = Vec::new();
    let mut vs_c = Vec::new();
    let mut single = Vec::new();
    let mut two_pass = Vec::new();
    let mut multi = Vec::new();
    for &n in &sizes {
        let p = inp.randn(&[n], 0.02)?;
        ps_c.push(p.to_dtype(DType::F64)?);
        ms_c.push(Tensor::zeros(n, DType::F64, &Device::Cpu)?);
        vs_c.push(Tensor::zeros(n, DType::F64, &Device::Cpu)?);
        single.push((p.to_device(dev)?, Tensor::zeros((2, n), DType::F32, dev)?));
        two_pass.push((p.to_device(dev)?, Tensor::zeros((2, n), DType::F32, dev)?));
        multi.push((
            p.to_device(dev)?,
            Tensor::zeros(n, DType::F32, dev)?,
            Tensor::zeros(n, DType::F32, dev)?,
        ));
    }
    for step in 1..=steps {
        let mut grads = Vec::new();
        for (i, &n) in sizes.iter().enumerate() {
            let g = inp.randn(&[n], 1e-2)?;
            let (p, m, v) = reference::adamw(
                &ps_c[i],
                &g.to_dtype(DType::F64)?,
                &ms_c[i],
                &vs_c[i],
                &cfg,
                lr,
                wds[i],
                step,
            )?;
            (ps_c[i], ms_c[i], vs_c[i]) = (p, m, v);
            grads.push(g.to_device(dev)?);
        }
        for (i, (p, st)) in single.iter().enumerate() {
            let op = AdamWOp {
                cfg,
                step: ck::AdamWStep {
                    lr,
                    weight_decay: wds[i],
                    step,
                },
            };
            p.inplace_op3(&grads[i], st, &op)?;
        }
        for (i, (p, st)) in two_pass.iter().enumerate() {
            st.inplace_op2(&grads[i], &MomentsOp(cfg))?;
            let step = ck::AdamWStep {
                lr,
                weight_decay: wds[i],
                step,
            };
            p.inplace_op2(st, &UpdateOp(cfg, step))?;
        }
        let slots: Vec<_> = multi
            .iter()
            .zip(&grads)
            .enumerate()
            .map(|(i, ((p, m, v), g))| ck::AdamWSlot {
                param: p,
                grad: g,
                exp_avg: m,
                exp_avg_sq: v,
                step: ck::AdamWStep {
                    lr,
                    weight_decay: wds[i],
                    step,
                },
            })
            .collect();
        ck::adamw_multi(&slots, &cfg)?;
    }
    let mut e_single = 0f64;
    let mut e_two = 0f64;
    let mut e_multi = 0f64;
    for i in 0..sizes.len() {
        let (p, st) = &two_pass[i];
        e_two = e_two.max(worst(&[
            (p, &ps_c[i]),
            (&st.get(0)?, &ms_c[i]),
            (&st.get(1)?, &vs_c[i]),
        ])?);
        let (p, st) = &single[i];
        e_single = e_single.max(worst(&[
            (p, &ps_c[i]),
            (&st.get(0)?, &ms_c[i]),
            (&st.get(1)?, &vs_c[i]),
        ])?);
        let (p, m, v) = &multi[i];
        e_multi = e_multi.max(worst(&[(p, &ps_c[i]), (m, &ms_c[i]), (v, &vs_c[i])])?);
    }
    let case = format!("3 tensors {sizes:?}, 3 steps");
    push(
        row("adamw (per tensor)", case.clone(), DType::F32, e_single),
        &mut rows,
    );
    push(row("adamw_multi", case, DType::F32, e_multi), &mut rows);

    // EMA.
    let mom = 0.996;
    let mut e_single = 0f64;
    let mut e_multi = 0f64;
    let mut pairs_g = Vec::new();
    let mut refs = Vec::new();
    for &n in &sizes {
        let t = inp.randn(&[n], 1.0)?;
        let s = inp.randn(&[n], 1.0)?;
        let r = (t.to_dtype(DType::F64)?.affine(mom, 0.0)?
            + s.to_dtype(DType::F64)?.affine(1.0 - mom, 0.0)?)?;
        let (tg, sg) = (t.to_device(dev)?, s.to_device(dev)?);
        tg.inplace_op2(&sg, &EmaOp(mom))?;
        e_single = e_single.max(rel_err(&tg, &r)?);
        pairs_g.push((t.to_device(dev)?, sg));
        refs.push(r);
    }
    let pairs: Vec<_> = pairs_g.iter().map(|(t, s)| (t, s)).collect();
    ck::ema_multi(&pairs, mom)?;
    for ((t, _), r) in pairs_g.iter().zip(&refs) {
        e_multi = e_multi.max(rel_err(t, r)?);
    }
    let case = format!("3 tensors {sizes:?}");
    push(
        row("ema (per tensor)", case.clone(), DType::F32, e_single),
        &mut rows,
    );
    push(row("ema_multi", case, DType::F32, e_multi), &mut rows);
    Ok(rows)
}

// ---------------------------------------------------------------------------------------------
// Timings

struct Timer {
    dev: CudaDevice,
    runs: usize,
}

impl Timer {
    fn time(
        &self,
        mut f: impl FnMut() -> candle_core::Result<()>,
    ) -> candle_core::Result<(f64, f64, f64)> {
        use candle_core::cuda_backend::WrapErr;
        for _ in 0..3 {
            f()?;
        }
        let stream = self.dev.cuda_stream();
        stream.synchronize().w()?;
        let mut ev = Vec::with_capacity(self.runs);
        let mut wall = Vec::with_capacity(self.runs);
        for _ in 0..self.runs {
            let t = Instant::now();
            let e0 = stream
                .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .w()?;
            f()?;
            let e1 = stream
                .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .w()?;
            stream.synchronize().w()?;
            wall.push(t.elapsed().as_secs_f64() * 1e3);
            ev.push(f64::from(e0.elapsed_ms(&e1).w()?));
        }
        let med = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let min = ev.iter().copied().fold(f64::INFINITY, f64::min);
        Ok((med(&mut ev), min, med(&mut wall)))
    }
}

#[allow(clippy::too_many_arguments)]
fn timing_row(
    t: &Timer,
    op: &str,
    shape: &str,
    dtype: DType,
    bytes: Option<f64>,
    flops: Option<f64>,
    f: impl FnMut() -> candle_core::Result<()>,
) -> candle_core::Result<TimingRow> {
    let (median_ms, min_ms, wall_median_ms) = t.time(f)?;
    Ok(TimingRow {
        op: op.into(),
        shape: shape.into(),
        dtype: dname(dtype),
        median_ms,
        min_ms,
        wall_median_ms,
        runs: t.runs,
        gbps: bytes.map(|b| b / (median_ms * 1e-3) / 1e9),
        tflops: flops.map(|f| f / (median_ms * 1e-3) / 1e12),
    })
}

/// Times every op on `dev` at the ViT-L step shapes (median of `runs` ≥ 20 synchronised runs).
pub fn run_timings(
    dev: &Device,
    runs: usize,
    mut progress: impl FnMut(&TimingRow),
) -> Result<Vec<TimingRow>, ModelError> {
    let t = Timer {
        dev: cuda_device(dev)?,
        runs: runs.max(20),
    };
    // As a trainer would: without it every timed run re-maps its output buffers.
    ck::keep_pool_memory(&t.dev)?;
    let mut inp = Inputs {
        rng: ChaCha8Rng::seed_from_u64(7),
        gpu: dev.clone(),
    };
    let mut rows = Vec::new();
    // One timed row: (op, shape, dtype, bytes, flops, body).
    macro_rules! time {
        ($op:expr, $shape:expr, $dt:expr, $bytes:expr, $flops:expr, $body:expr) => {{
            let r = timing_row(&t, $op, &$shape, $dt, $bytes, $flops, $body)?;
            progress(&r);
            rows.push(r);
        }};
    }
    let simt = ck::AttnKernel::Simt;
    for &dt in &[DType::BF16, DType::F32] {
        let es = dt.size_in_bytes() as f64;
        let bf = dt == DType::BF16;
        // Attention B=8, H=16, N=1568, d=64 (ViT-L/16 on 16×224×224 clips).
        let (b, h, n, hd) = (8usize, 16usize, 1568usize, 64usize);
        let d = h * hd;
        let shape = format!("B={b} H={h} N={n} d={hd}");
        let qkv = inp.pair(&[b, n, 3 * d], 1.0, dt)?.0;
        let dout = inp.pair(&[b, n, d], 1.0, dt)?.0;
        let out = gpu::attention(&qkv, h)?;
        let fl = 4.0 * (b * h * n * n * hd) as f64;
        let tc = if bf { " (tensor cores)" } else { "" };
        time!(
            &format!("attention fwd{tc}"),
            shape,
            dt,
            None,
            Some(fl),
            || { gpu::attention(&qkv, h).map(drop) }
        );
        if bf {
            time!("attention fwd (simt)", shape, dt, None, Some(fl), || {
                gpu::attention_with(&qkv, h, simt).map(drop)
            });
        }
        // Backward flops counted as the usual 2.5× forward (ours recomputes more: stats 1,
        // dK/dV 4, dQ 3 GEMM-equivalents against the forward's 2).
        time!(
            &format!("attention bwd{tc}"),
            shape,
            dt,
            None,
            Some(2.5 * fl),
            || { gpu::attention_bwd(&qkv, &out, &dout, h).map(drop) }
        );
        if bf {
            time!(
                "attention bwd (simt)",
                shape,
                dt,
                None,
                Some(2.5 * fl),
                || { gpu::attention_bwd_with(&qkv, &out, &dout, h, simt).map(drop) }
            );
        }

        // LayerNorm [12544, 1024] (8 × 1568 tokens, D = 1024).
        let (r, c) = (8 * 1568usize, 1024usize);
        let shape = format!("[{r},{c}]");
        let x = inp.pair(&[r, c], 1.0, dt)?.0;
        let w = inp.pair(&[c], 1.0, dt)?.0;
        let bb = inp.pair(&[c], 1.0, dt)?.0;
        let dy = inp.pair(&[r, c], 1.0, dt)?.0;
        let nb = (r * c) as f64 * es;
        time!("layer_norm fwd", shape, dt, Some(2.0 * nb), None, || {
            gpu::layer_norm(&x, &w, &bb, 1e-6).map(drop)
        });
        time!("layer_norm bwd", shape, dt, Some(3.0 * nb), None, || {
            gpu::layer_norm_bwd(&x, &w, &dy, 1e-6).map(drop)
        });

        // fc1 bias + GELU [12544, 4096].
        let (r, c) = (8 * 1568usize, 4096usize);
        let shape = format!("[{r},{c}]");
        let x = inp.pair(&[r, c], 1.0, dt)?.0;
        let bb = inp.pair(&[c], 1.0, dt)?.0;
        let dy = inp.pair(&[r, c], 1.0, dt)?.0;
        let nb = (r * c) as f64 * es;
        time!("bias_gelu fwd", shape, dt, Some(2.0 * nb), None, || {
            gpu::bias_gelu(&x, &bb).map(drop)
        });
        time!(
            "bias_gelu bwd (dx, db)",
            shape,
            dt,
            Some(3.0 * nb),
            None,
            || { gpu::bias_gelu_bwd(&x, &bb, &dy).map(drop) }
        );
        time!("bias_add fwd", shape, dt, Some(2.0 * nb), None, || {
            gpu::bias_add(&x, &bb).map(drop)
        });
        time!("column_sum (bias grad)", shape, dt, Some(nb), None, || {
            gpu::column_sum(&dy).map(drop)
        });

        // fc1 as a Linear: [12544, 1024] · [4096, 1024]ᵀ + b.
        let (r, i, o) = (8 * 1568usize, 1024usize, 4096usize);
        let shape = format!("[{r},{i}]x[{o},{i}]T");
        let x = inp.pair(&[r, i], 1.0, dt)?.0;
        let w = inp.pair(&[o, i], 0.02, dt)?.0;
        let bb = inp.pair(&[o], 1.0, dt)?.0;
        let dy = inp.pair(&[r, o], 1.0, dt)?.0;
        let fl = 2.0 * (r * i * o) as f64;
        time!(
            "linear fwd (cuBLAS + bias)",
            shape,
            dt,
            None,
            Some(fl),
            || { gpu::linear(&x, &w, Some(&bb)).map(drop) }
        );
        time!(
            "linear bwd (dx, dW, db)",
            shape,
            dt,
            None,
            Some(2.0 * fl),
            || { gpu::linear_bwd(&x, &w, &dy, true).map(drop) }
        );
    }

    // Optimizer over the ViT-L MLP pair: 2 × 4096×1024 = 8.4 M f32 params.
    let cfg = ck::AdamWConfig {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
    };
    let mut ts = Vec::new();
    for &(a, b) in &[(4096usize, 1024usize), (1024, 4096)] {
        ts.push((
            inp.pair(&[a, b], 0.02, DType::F32)?.0,
            inp.pair(&[a, b], 1e-3, DType::F32)?.0,
            Tensor::zeros((a, b), DType::F32, dev)?,
            Tensor::zeros((a, b), DType::F32, dev)?,
        ));
    }
    let np: usize = ts.iter().map(|(p, ..)| p.elem_count()).sum();
    let shape = format!("2 tensors, {np} params");
    let f32_ = DType::F32;
    let step = ck::AdamWStep {
        lr: 1e-4,
        weight_decay: 0.04,
        step: 10,
    };
    let slots: Vec<_> = ts
        .iter()
        .map(|(p, g, m, v)| ck::AdamWSlot {
            param: p,
            grad: g,
            exp_avg: m,
            exp_avg_sq: v,
            step,
        })
        .collect();
    // p, m, v read + written, g read: 7 × 4 bytes per parameter.
    let bytes = Some(28.0 * np as f64);
    time!("adamw_multi (1 launch)", shape, f32_, bytes, None, || {
        ck::adamw_multi(&slots, &cfg)
    });
    let single: Vec<_> = ts
        .iter()
        .map(|(p, g, m, v)| -> candle_core::Result<_> {
            Ok((p.clone(), g.clone(), Tensor::stack(&[m, v], 0)?))
        })
        .collect::<candle_core::Result<_>>()?;
    time!(
        "adamw fused per tensor (2 launches)",
        shape,
        f32_,
        bytes,
        None,
        || {
            for (p, g, st) in &single {
                p.inplace_op3(g, st, &AdamWOp { cfg, step })?;
            }
            Ok(())
        }
    );
    time!(
        "adamw moments+update (4 launches)",
        shape,
        f32_,
        bytes,
        None,
        || {
            for (p, g, st) in &single {
                st.inplace_op2(g, &MomentsOp(cfg))?;
                p.inplace_op2(st, &UpdateOp(cfg, step))?;
            }
            Ok(())
        }
    );
    let pairs: Vec<_> = ts.iter().map(|(p, g, _, _)| (p, g)).collect();
    time!(
        "ema_multi (1 launch)",
        shape,
        f32_,
        Some(12.0 * np as f64),
        None,
        || { ck::ema_multi(&pairs, 0.996) }
    );
    let g0 = &ts[0].1;
    let n0 = g0.elem_count();
    time!(
        "sum_sq (grad norm)",
        format!("[{n0}]"),
        f32_,
        Some(4.0 * n0 as f64),
        None,
        || { gpu::sum_sq(g0).map(drop) }
    );
    Ok(rows)
}

/// The check rows as an aligned text table.
pub fn format_checks(rows: &[CheckRow]) -> String {
    let mut s = format!(
        "{:<28} {:<24} {:<5} {:>12} {:>8}  result\n",
        "op", "case", "dtype", "max rel err", "tol"
    );
    for r in rows {
        s += &format!(
            "{:<28} {:<24} {:<5} {:>12.3e} {:>8.0e}  {}\n",
            r.op,
            r.case,
            r.dtype,
            r.max_rel_err,
            r.tol,
            if r.pass { "PASS" } else { "FAIL" }
        );
    }
    s
}

/// The timing rows as an aligned text table.
pub fn format_timings(rows: &[TimingRow]) -> String {
    let mut s = format!(
        "{:<30} {:<24} {:<5} {:>10} {:>10} {:>10} {:>14}\n",
        "op", "shape", "dtype", "median ms", "min ms", "wall ms", "throughput"
    );
    for r in rows {
        let thr = match (r.gbps, r.tflops) {
            (_, Some(t)) => format!("{t:.1} TFLOP/s"),
            (Some(g), None) => format!("{g:.0} GB/s"),
            _ => String::new(),
        };
        s += &format!(
            "{:<30} {:<24} {:<5} {:>10.3} {:>10.3} {:>10.3} {:>14}\n",
            r.op, r.shape, r.dtype, r.median_ms, r.min_ms, r.wall_median_ms, thr
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::{AdamW, ParamGroup};

    /// The references run on the CPU alone: shapes and gradients line up.
    #[test]
    fn references_have_the_expected_shapes() -> candle_core::Result<()> {
        let mut inp = Inputs {
            rng: ChaCha8Rng::seed_from_u64(1),
            gpu: Device::Cpu,
        };
        let (_, qkv) = inp.pair(&[2, 7, 3 * 3 * 8], 1.0, DType::F32)?;
        let (_, dout) = inp.pair(&[2, 7, 3 * 8], 1.0, DType::F32)?;
        let (out, dqkv) = reference::attention_grad(&qkv, &dout, 3)?;
        assert_eq!(out.dims(), &[2, 7, 24]);
        assert_eq!(dqkv.dims(), &[2, 7, 72]);
        // Rows of the output are convex combinations of v rows: bounded by |v|max.
        let vmax = qkv
            .narrow(2, 48, 24)?
            .abs()?
            .max_all()?
            .to_scalar::<f64>()?;
        assert!(out.abs()?.max_all()?.to_scalar::<f64>()? <= vmax + 1e-12);
        let (_, x) = inp.pair(&[5, 12], 1.0, DType::F32)?;
        let (_, w) = inp.pair(&[12], 1.0, DType::F32)?;
        let (_, b) = inp.pair(&[12], 1.0, DType::F32)?;
        let (_, dy) = inp.pair(&[5, 12], 1.0, DType::F32)?;
        let g = reference::layer_norm_grad(&x, Some((&w, &b)), &dy, 1e-6)?;
        assert_eq!(g.len(), 4);
        // dbias = Σ_rows dy.
        assert!(rel_err(&g[3], &dy.sum(0)?)? < 1e-12);
        let g = reference::layer_norm_grad(&x, None, &dy, 1e-5)?;
        assert_eq!(g.len(), 2);
        let (y, dx, db) = reference::bias_gelu_grad(&x, &b, &dy)?;
        assert_eq!(
            (y.dims(), dx.dims(), db.dims()),
            (&[5usize, 12][..], &[5usize, 12][..], &[12usize][..])
        );
        assert!(rel_err(&db, &dx.sum(0)?)? < 1e-12);
        Ok(())
    }

    /// The f64 AdamW reference matches the model's optimizer (optim.rs) on the CPU.
    #[test]
    fn adamw_reference_matches_optim() -> Result<(), ModelError> {
        let mut inp = Inputs {
            rng: ChaCha8Rng::seed_from_u64(2),
            gpu: Device::Cpu,
        };
        let p0 = inp.randn(&[33], 0.02)?;
        let var = Var::from_tensor(&p0)?;
        let mut opt = AdamW::new(
            vec![("blocks.0.w".into(), var.clone(), ParamGroup::EncoderDecay)],
            (0.9, 0.999),
            1e-8,
        )?;
        let cfg = ck::AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        };
        let mut p = p0.to_dtype(DType::F64)?;
        let mut m = p.zeros_like()?;
        let mut v = p.zeros_like()?;
        for step in 1..=3u64 {
            let g = inp.randn(&[33], 0.01)?;
            // Gradient of Σ p·g is g.
            let grads = (var.as_tensor() * &g)?.sum_all()?.backward()?;
            opt.step(&grads, 1e-3, 0.05)?;
            (p, m, v) =
                reference::adamw(&p, &g.to_dtype(DType::F64)?, &m, &v, &cfg, 1e-3, 0.05, step)?;
        }
        assert!(rel_err(var.as_tensor(), &p)? < 1e-6);
        Ok(())
    }
}
