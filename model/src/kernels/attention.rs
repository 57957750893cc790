//! Multi-head softmax attention straight from the fused qkv projection (no mask, no dropout).
//!
//! Input `[B, N, 3·D]` with columns `[q | k | v]`, head h of q at columns h·hd..(h+1)·hd; output
//! `[B, N, D]` with the heads concatenated, ready for the output projection — no reshape,
//! permute or contiguous copies. The backward pass recomputes the probabilities from q and k
//! (flash-attention style) instead of keeping `[B, H, N, N]` alive between passes.

use std::sync::atomic::{AtomicU8, Ordering};

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Shape, Tensor, WithDType};

use super::math::{Elem, Mat, dot, gemm, multiversion, softmax_row};
use super::par;
use super::{SyncPtr, check_dtype, contiguous, unsupported};
use crate::ModelError;

/// Query rows per forward task: bounds the `rows × N` score scratch (about L2-sized up to
/// N ≈ 2000) while keeping the repeated packing of K and V per block small.
const ROW_BLOCK: usize = 128;

/// softmax(q·kᵀ/√hd)·v for every head, from `[B, N, 3D]` qkv to `[B, N, D]`.
pub fn attention(qkv: &Tensor, num_heads: usize) -> Result<Tensor, ModelError> {
    if let Some(r) = super::widen_cpu_bf16(&[qkv], |t| attention(&t[0], num_heads)) {
        return r;
    }
    check_dtype("attention", qkv)?;
    let (_, _, c) = qkv.dims3().map_err(|_| {
        ModelError::Input(format!(
            "attention: qkv must be [B, N, 3D], got {:?}",
            qkv.dims()
        ))
    })?;
    if num_heads == 0 || !c.is_multiple_of(3 * num_heads) {
        return Err(ModelError::Input(format!(
            "attention: {c} qkv columns don't split into 3 × {num_heads} heads"
        )));
    }
    let qkv = qkv.contiguous()?;
    let stats = qkv.track_op();
    Ok(qkv.apply_op1(Attention { num_heads, stats })?)
}

/// Which implementation runs attention on a CUDA device (the CPU always runs its own kernel).
/// Process-wide, like the device: set once from the job's config before any step.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AttentionBackend {
    /// cuDNN's fused attention where the binary has it (the `cudnn` feature), libcudnn loads
    /// and the problem is bf16 with a head dim that is a multiple of 8; our kernels otherwise.
    #[default]
    Auto,
    /// cuDNN's fused attention or an error: never falls back (for measuring it).
    Cudnn,
    /// Our flash-style kernels only.
    Own,
}

impl AttentionBackend {
    /// Every value, as configs spell them.
    pub const NAMES: [&'static str; 3] = ["auto", "cudnn", "own"];

    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Cudnn => "cudnn",
            Self::Own => "own",
        }
    }

    /// Parses a config value; `None` for anything else.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "auto" => Some(Self::Auto),
            "cudnn" => Some(Self::Cudnn),
            "own" => Some(Self::Own),
            _ => None,
        }
    }
}

static BACKEND: AtomicU8 = AtomicU8::new(0);

/// Sets the attention implementation for CUDA devices (see [`AttentionBackend`]).
pub fn set_attention_backend(backend: AttentionBackend) {
    BACKEND.store(backend as u8, Ordering::Relaxed);
}

/// The attention implementation in force.
pub fn attention_backend() -> AttentionBackend {
    match BACKEND.load(Ordering::Relaxed) {
        1 => AttentionBackend::Cudnn,
        2 => AttentionBackend::Own,
        _ => AttentionBackend::Auto,
    }
}

/// Head dims cuDNN's fused attention takes: multiples of 8 up to 128. The one rule behind both
/// the up-front check and the per-call choice of `auto`.
pub(crate) fn cudnn_takes_head_dim(hd: usize) -> bool {
    hd.is_multiple_of(8) && hd <= 128
}

/// Whether `backend` can run in this binary on this machine every attention of a model
/// computing in `dtype` with these head dims, before any work: `cudnn` never falls back, so it
/// needs a binary built with the `cudnn` feature, a loadable libcudnn 9, the bf16 step (cuDNN's
/// fused attention has no fp32 path) and head dims it takes. Returns what will run.
pub fn check_attention_backend(
    backend: AttentionBackend,
    dtype: candle_core::DType,
    head_dims: &[usize],
) -> Result<String, ModelError> {
    check_problem(backend, dtype, head_dims)?;
    availability(backend)
}

/// The dtype and head-dim part of [`check_attention_backend`].
fn check_problem(
    backend: AttentionBackend,
    dtype: candle_core::DType,
    head_dims: &[usize],
) -> Result<(), ModelError> {
    if backend != AttentionBackend::Cudnn {
        return Ok(());
    }
    if dtype != candle_core::DType::BF16 {
        return Err(ModelError::Unsupported(format!(
            "attention backend cudnn needs the bf16 step (meta.dtype: bfloat16); this one computes in {dtype:?}"
        )));
    }
    match head_dims.iter().find(|&&hd| !cudnn_takes_head_dim(hd)) {
        Some(hd) => Err(ModelError::Unsupported(format!(
            "attention backend cudnn takes head dims that are multiples of 8 up to 128, not {hd}"
        ))),
        None => Ok(()),
    }
}

/// The binary-and-machine part of [`check_attention_backend`]: `cudnn` needs the `cudnn`
/// feature and a loadable libcudnn 9. Returns what will run.
fn availability(backend: AttentionBackend) -> Result<String, ModelError> {
    #[cfg(feature = "cudnn")]
    let cudnn = super::cudnn::load();
    #[cfg(not(feature = "cudnn"))]
    let cudnn: Result<usize, String> =
        Err("this binary was built without the `cudnn` feature".to_string());
    let own = "our flash-style kernels";
    match (backend, cudnn) {
        (AttentionBackend::Own, _) => Ok(own.to_string()),
        (AttentionBackend::Auto, Ok(v)) | (AttentionBackend::Cudnn, Ok(v)) => Ok(format!(
            "cuDNN {}.{}.{} fused attention for bf16 (head dims multiple of 8), {own} otherwise",
            v / 10_000,
            v % 10_000 / 100,
            v % 100
        )),
        (AttentionBackend::Auto, Err(why)) => Ok(format!("{own} (no cuDNN: {why})")),
        (AttentionBackend::Cudnn, Err(why)) => Err(ModelError::Unsupported(format!(
            "attention backend cudnn: {why}"
        ))),
    }
}

/// Shape facts of one attention call.
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    n: usize,
    d: usize,
    h: usize,
    hd: usize,
}

impl Dims {
    fn new(op: &str, l: &Layout, num_heads: usize) -> candle_core::Result<Self> {
        let (b, n, c) = l.shape().dims3()?;
        if num_heads == 0 || !c.is_multiple_of(3 * num_heads) {
            candle_core::bail!("{op}: {c} columns don't split into 3 × {num_heads} heads");
        }
        let d = c / 3;
        Ok(Self {
            b,
            n,
            d,
            h: num_heads,
            hd: d / num_heads,
        })
    }

    fn scale<T: Elem>(&self) -> T {
        T::from_f64(1.0 / (self.hd as f64).sqrt())
    }
}

/// Forward op: qkv `[B, N, 3D]` → `[B, N, D]`.
#[derive(Clone, Debug)]
pub struct Attention {
    /// Number of heads H (D must be a multiple).
    pub num_heads: usize,
    /// Keep what a backward pass needs beyond the output (cuDNN's row statistics); false where
    /// nothing differentiates through the call (the target encoder, feature extraction).
    pub stats: bool,
}

impl CustomOp1 for Attention {
    fn name(&self) -> &'static str {
        "vjepa-attention"
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::attention_fwd(s, l, self.num_heads, self.stats)
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = Dims::new(self.name(), l, self.num_heads)?;
        let shape = Shape::from((dims.b, dims.n, dims.d));
        let out = match s {
            CpuStorage::F32(_) => {
                f32::to_cpu_storage_owned(forward::<f32>(contiguous(self.name(), s, l)?, dims))
            }
            CpuStorage::F64(_) => {
                f64::to_cpu_storage_owned(forward::<f64>(contiguous(self.name(), s, l)?, dims))
            }
            _ => return Err(unsupported(self.name(), s)),
        };
        Ok((out, shape))
    }

    fn bwd(
        &self,
        qkv: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        let dqkv = qkv.apply_op3_no_bwd(
            out,
            &grad,
            &AttentionBackward {
                num_heads: self.num_heads,
            },
        )?;
        Ok(Some(dqkv))
    }
}

fn forward<E: Elem>(qkv: &[E], dims: Dims) -> Vec<E> {
    let Dims { b, n, d, h, hd } = dims;
    let mut out = vec![E::ZERO; b * n * d];
    let blocks = n.div_ceil(ROW_BLOCK);
    let out_ptr = SyncPtr(out.as_mut_ptr());
    let scale: E = dims.scale();
    par::for_each_range(b * h * blocks, |tasks| {
        let mut scores: Vec<E> = Vec::new();
        for task in tasks {
            let (bh, blk) = (task / blocks, task % blocks);
            let (bi, hi) = (bh / h, bh % h);
            let r0 = blk * ROW_BLOCK;
            let rows = ROW_BLOCK.min(n - r0);
            scores.resize(rows * n, E::ZERO);
            let base = bi * n * 3 * d;
            let q = &qkv[base + r0 * 3 * d + hi * hd..];
            let k = &qkv[base + d + hi * hd..];
            let v = &qkv[base + 2 * d + hi * hd..];
            let rs = (3 * d) as isize;
            // SAFETY: operands index rows < n and columns < hd of this (batch, head) inside qkv;
            // the destination rows r0..r0+rows, columns of head hi belong to this task only.
            unsafe {
                gemm(
                    rows,
                    n,
                    hd,
                    scores.as_mut_ptr(),
                    n as isize,
                    Mat {
                        ptr: q.as_ptr(),
                        rs,
                        cs: 1,
                    },
                    Mat {
                        ptr: k.as_ptr(),
                        rs: 1,
                        cs: rs,
                    },
                    scale,
                    false,
                );
                softmax_rows(&mut scores, n);
                let dst = out_ptr.get().add((bi * n + r0) * d + hi * hd);
                gemm(
                    rows,
                    hd,
                    n,
                    dst,
                    d as isize,
                    Mat {
                        ptr: scores.as_ptr(),
                        rs: n as isize,
                        cs: 1,
                    },
                    Mat {
                        ptr: v.as_ptr(),
                        rs,
                        cs: 1,
                    },
                    E::ONE,
                    false,
                );
            }
        }
    });
    out
}

multiversion! {
    /// Softmax of each `n`-wide row of `s`.
    fn softmax_rows<T: Elem>(s: &mut [T], n: usize) {
        for row in s.chunks_exact_mut(n) {
            softmax_row(row);
        }
    }
}

multiversion! {
    /// dS = P ∘ (dP − Dᵢ) row by row, with Dᵢ = dOᵢ·Oᵢ; dP is overwritten by dS.
    fn softmax_grad_rows<T: Elem>(
        p: &[T],
        dp: &mut [T],
        n: usize,
        d_out: &[T],
        out: &[T],
        row_stride: usize,
        hd: usize,
    ) {
        for (i, (pr, dpr)) in p.chunks_exact(n).zip(dp.chunks_exact_mut(n)).enumerate() {
            let o = i * row_stride;
            let di = dot(&d_out[o..o + hd], &out[o..o + hd]);
            for (g, &pv) in dpr.iter_mut().zip(pr) {
                *g = pv * (*g - di);
            }
        }
    }
}

/// Backward op: (qkv, out, grad_out) → dqkv `[B, N, 3D]`.
#[derive(Clone, Debug)]
pub struct AttentionBackward {
    /// Number of heads H.
    pub num_heads: usize,
}

impl CustomOp3 for AttentionBackward {
    fn name(&self) -> &'static str {
        "vjepa-attention-backward"
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
        super::cuda::attention_bwd(s1, l1, s2, l2, s3, l3, self.num_heads)
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
        let dims = Dims::new(name, l1, self.num_heads)?;
        let want = [dims.b, dims.n, dims.d];
        if l2.dims() != want || l3.dims() != want {
            candle_core::bail!(
                "{name}: out {:?} / grad {:?} don't match qkv {:?}",
                l2.dims(),
                l3.dims(),
                l1.dims()
            );
        }
        let out = match s1 {
            CpuStorage::F32(_) => f32::to_cpu_storage_owned(backward::<f32>(
                contiguous(name, s1, l1)?,
                contiguous(name, s2, l2)?,
                contiguous(name, s3, l3)?,
                dims,
            )),
            CpuStorage::F64(_) => f64::to_cpu_storage_owned(backward::<f64>(
                contiguous(name, s1, l1)?,
                contiguous(name, s2, l2)?,
                contiguous(name, s3, l3)?,
                dims,
            )),
            _ => return Err(unsupported(name, s1)),
        };
        Ok((out, l1.shape().clone()))
    }
}

/// One task per (batch, head): P = softmax(s·q·kᵀ) (recomputed), dV = Pᵀ·dO, dP = dO·Vᵀ,
/// dS = P∘(dP − rowsum(dO∘O)), dQ = s·dS·K, dK = s·dSᵀ·Q. Each task writes its own columns of
/// dqkv, so there is nothing to reduce across tasks.
fn backward<E: Elem>(qkv: &[E], out: &[E], d_out: &[E], dims: Dims) -> Vec<E> {
    let Dims { b, n, d, h, hd } = dims;
    let mut dqkv = vec![E::ZERO; b * n * 3 * d];
    let dst = SyncPtr(dqkv.as_mut_ptr());
    let scale: E = dims.scale();
    par::for_each_range(b * h, |tasks| {
        let (mut p, mut dp): (Vec<E>, Vec<E>) = (Vec::new(), Vec::new());
        for task in tasks {
            let (bi, hi) = (task / h, task % h);
            p.resize(n * n, E::ZERO);
            dp.resize(n * n, E::ZERO);
            let base = bi * n * 3 * d;
            let q = &qkv[base + hi * hd..];
            let k = &qkv[base + d + hi * hd..];
            let v = &qkv[base + 2 * d + hi * hd..];
            let ob = bi * n * d + hi * hd;
            let (o, go) = (&out[ob..], &d_out[ob..]);
            let rs = (3 * d) as isize;
            let ors = d as isize;
            let nn = n as isize;
            // SAFETY: all operands stay inside this batch's rows and this head's columns; the
            // three destinations (q, k, v columns of head hi in batch bi) are this task's alone.
            unsafe {
                gemm(
                    n,
                    n,
                    hd,
                    p.as_mut_ptr(),
                    nn,
                    Mat {
                        ptr: q.as_ptr(),
                        rs,
                        cs: 1,
                    },
                    Mat {
                        ptr: k.as_ptr(),
                        rs: 1,
                        cs: rs,
                    },
                    scale,
                    false,
                );
                softmax_rows(&mut p, n);
                gemm(
                    n,
                    n,
                    hd,
                    dp.as_mut_ptr(),
                    nn,
                    Mat {
                        ptr: go.as_ptr(),
                        rs: ors,
                        cs: 1,
                    },
                    Mat {
                        ptr: v.as_ptr(),
                        rs: 1,
                        cs: rs,
                    },
                    E::ONE,
                    false,
                );
                softmax_grad_rows(&p, &mut dp, n, go, o, d, hd);
                let dq = dst.get().add(base + hi * hd);
                let dk = dst.get().add(base + d + hi * hd);
                let dv = dst.get().add(base + 2 * d + hi * hd);
                gemm(
                    n,
                    hd,
                    n,
                    dv,
                    rs,
                    Mat {
                        ptr: p.as_ptr(),
                        rs: 1,
                        cs: nn,
                    },
                    Mat {
                        ptr: go.as_ptr(),
                        rs: ors,
                        cs: 1,
                    },
                    E::ONE,
                    false,
                );
                gemm(
                    n,
                    hd,
                    n,
                    dq,
                    rs,
                    Mat {
                        ptr: dp.as_ptr(),
                        rs: nn,
                        cs: 1,
                    },
                    Mat {
                        ptr: k.as_ptr(),
                        rs,
                        cs: 1,
                    },
                    scale,
                    false,
                );
                gemm(
                    n,
                    hd,
                    n,
                    dk,
                    rs,
                    Mat {
                        ptr: dp.as_ptr(),
                        rs: 1,
                        cs: nn,
                    },
                    Mat {
                        ptr: q.as_ptr(),
                        rs,
                        cs: 1,
                    },
                    scale,
                    false,
                );
            }
        }
    });
    dqkv
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::reference::{self, assert_close, randn};

    #[test]
    fn backend_names_round_trip() {
        for name in AttentionBackend::NAMES {
            let b = AttentionBackend::parse(name).unwrap();
            assert_eq!(b.as_str(), name);
        }
        assert_eq!(AttentionBackend::parse("cuDNN"), None);
        assert_eq!(AttentionBackend::default(), AttentionBackend::Auto);
    }

    /// Without the `cudnn` feature (CI), `cudnn` is refused with the reason and the others say
    /// they run our kernels; with it, the answer depends on whether libcudnn loads here.
    #[test]
    fn cudnn_problems_are_checked_before_any_work() {
        use candle_core::DType;
        let bf16 = DType::BF16;
        assert!(check_problem(AttentionBackend::Cudnn, bf16, &[64, 32]).is_ok());
        let e = check_problem(AttentionBackend::Cudnn, DType::F32, &[64]).unwrap_err();
        assert!(e.to_string().contains("bf16"), "{e}");
        let e = check_problem(AttentionBackend::Cudnn, bf16, &[64, 20]).unwrap_err();
        assert!(e.to_string().contains("not 20"), "{e}");
        for b in [AttentionBackend::Auto, AttentionBackend::Own] {
            assert!(check_problem(b, DType::F32, &[20]).is_ok());
        }
    }

    #[test]
    #[cfg(not(feature = "cudnn"))]
    fn cudnn_backend_is_refused_without_the_feature() {
        let err = availability(AttentionBackend::Cudnn).unwrap_err();
        assert!(
            err.to_string().contains("without the `cudnn` feature"),
            "{err}"
        );
        for b in [AttentionBackend::Auto, AttentionBackend::Own] {
            let runs = availability(b).unwrap();
            assert!(runs.contains("our flash-style kernels"), "{runs}");
        }
    }
    use candle_core::{DType, Device, Var};

    fn check(b: usize, n: usize, h: usize, hd: usize, dtype: DType, seed: u64) {
        let d = h * hd;
        let qkv = Var::from_tensor(&randn(&[b, n, 3 * d], dtype, seed)).unwrap();
        let g = randn(&[b, n, d], dtype, seed + 1);
        let ours = attention(qkv.as_tensor(), h).unwrap();
        let want = reference::attention(qkv.as_tensor(), h).unwrap();
        assert_close(&ours, &want, 1e-5, &format!("fwd b{b} n{n} h{h} hd{hd}"));
        let ga = (ours * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (want * &g).unwrap().sum_all().unwrap().backward().unwrap();
        assert_close(
            ga.get(qkv.as_tensor()).unwrap(),
            gb.get(qkv.as_tensor()).unwrap(),
            1e-5,
            &format!("bwd b{b} n{n} h{h} hd{hd}"),
        );
    }

    #[test]
    fn matches_composite_reference() {
        for (i, &(b, n, h, hd)) in [
            (2, 1, 2, 24),
            (2, 95, 3, 32),
            (1, 357, 2, 64),
            (3, 70, 1, 80),
            (2, 130, 2, 88),
            (4, 17, 3, 16),
        ]
        .iter()
        .enumerate()
        {
            check(b, n, h, hd, DType::F32, 10 * i as u64);
        }
    }

    #[test]
    fn finite_difference() {
        let qkv = Var::from_tensor(&randn(&[2, 5, 3 * 4], DType::F64, 3)).unwrap();
        let r = randn(&[2, 5, 4], DType::F64, 4);
        let f = || -> f64 {
            (attention(qkv.as_tensor(), 2).unwrap() * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar()
                .unwrap()
        };
        let loss = (attention(qkv.as_tensor(), 2).unwrap() * &r)
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        crate::layers::tests::check_grad(&qkv, grads.get(qkv.as_tensor()).unwrap(), &f, 1e-7);
    }

    #[test]
    fn refuses_bad_shapes_and_dtypes() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((1, 4, 10), DType::F32, &dev).unwrap();
        assert!(matches!(attention(&x, 2), Err(ModelError::Input(_))));
        let x = Tensor::zeros((4, 12), DType::F32, &dev).unwrap();
        assert!(matches!(attention(&x, 2), Err(ModelError::Input(_))));
        let x = Tensor::zeros((1, 4, 12), DType::F16, &dev).unwrap();
        assert!(matches!(attention(&x, 2), Err(ModelError::Unsupported(_))));
    }

    /// bf16 on the CPU: the f32 op on the widened values, rounded back to bf16, with gradients
    /// reaching a bf16 input.
    #[test]
    fn cpu_bf16_is_the_f32_op_on_widened_values() {
        let qkv = randn(&[2, 7, 24], DType::F32, 9)
            .to_dtype(DType::BF16)
            .unwrap();
        let got = attention(&qkv, 2).unwrap();
        assert_eq!(got.dtype(), DType::BF16);
        let want = attention(&qkv.to_dtype(DType::F32).unwrap(), 2)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        // bf16 → f32 is exact, so equal f32 vectors mean equal bf16 values.
        let values = |t: &Tensor| {
            t.flatten_all()
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        assert_eq!(values(&got), values(&want));
        let v = candle_core::Var::from_tensor(&qkv).unwrap();
        let g = attention(v.as_tensor(), 2)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g = g.get(v.as_tensor()).unwrap();
        assert_eq!(g.dtype(), DType::BF16);
        assert!(
            g.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.0
        );
    }

    #[test]
    fn strided_input_is_made_contiguous() {
        let qkv = randn(&[3, 6, 2, 12], DType::F32, 5);
        let strided = qkv.narrow(1, 1, 5).unwrap().get_on_dim(2, 0).unwrap(); // [3, 5, 12]
        assert!(!strided.is_contiguous());
        let want = reference::attention(&strided, 2).unwrap();
        assert_close(&attention(&strided, 2).unwrap(), &want, 1e-5, "strided");
    }
}
