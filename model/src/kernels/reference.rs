//! The composite candle implementations the kernels replaced (every op has candle's autograd),
//! kept as references for the kernel tests and timings.

use candle_core::{D, DType, Device, Result, Tensor};

/// LayerNorm over the last dimension without affine (biased variance, like torch).
pub(crate) fn layer_norm_plain(x: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let inv = (var + eps)?.sqrt()?.recip()?;
    xc.broadcast_mul(&inv)
}

/// Affine LayerNorm over the last dimension.
pub(crate) fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    layer_norm_plain(x, eps)?.broadcast_mul(w)?.broadcast_add(b)
}

/// Softmax over the last dimension (max detached: softmax is shift-invariant).
pub(crate) fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&s)
}

/// Multi-head attention from fused qkv `[B, N, 3D]` via reshape/permute and batched matmuls.
pub(crate) fn attention(qkv: &Tensor, h: usize) -> Result<Tensor> {
    let (b, n, c) = qkv.dims3()?;
    let d = c / 3;
    let hd = d / h;
    let qkv = qkv
        .reshape((b, n, 3, h, hd))?
        .permute((2, 0, 3, 1, 4))?
        .contiguous()?;
    let q = (qkv.get(0)? * (1.0 / (hd as f64).sqrt()))?;
    let k = qkv.get(1)?;
    let v = qkv.get(2)?;
    let att = softmax_last_dim(&q.matmul(&k.t()?)?)?;
    att.matmul(&v)?.transpose(1, 2)?.reshape((b, n, d))
}

/// x·Wᵀ (+ b) through a 2-D matmul, as the model's Linear did before the kernels.
pub(crate) fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let mut dims = x.dims().to_vec();
    let inp = x.dim(D::Minus1)?;
    let y = x.reshape(((), inp))?.matmul(&w.t()?)?;
    let y = match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    if let Some(last) = dims.last_mut() {
        *last = w.dim(0)?;
    }
    y.reshape(dims)
}

/// x + b over the last dimension.
pub(crate) fn bias_add(x: &Tensor, b: &Tensor) -> Result<Tensor> {
    x.broadcast_add(b)
}

/// gelu_erf(x + b).
pub(crate) fn bias_gelu(x: &Tensor, b: &Tensor) -> Result<Tensor> {
    x.broadcast_add(b)?.gelu_erf()
}

/// Sum over all leading dimensions → `[last]`.
pub(crate) fn column_sum(x: &Tensor) -> Result<Tensor> {
    let c = x.dim(D::Minus1)?;
    x.reshape(((), c))?.sum(0)
}

/// Deterministic test input: uniform in [-1.5, 1.5).
pub(crate) fn randn(shape: &[usize], dtype: DType, seed: u64) -> Tensor {
    let n = shape.iter().product();
    let v: Vec<f64> = crate::layers::tests::values(n, seed)
        .iter()
        .map(|x| 1.5 * x)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
        .and_then(|t| t.to_dtype(dtype))
        .expect("test tensor")
}

/// Asserts max |a − b| ≤ tol · max |b| (the output scale), with matching shapes.
pub(crate) fn assert_close(a: &Tensor, b: &Tensor, tol: f64, what: &str) {
    assert_eq!(a.dims(), b.dims(), "{what}: shapes");
    let flat = |t: &Tensor| -> Vec<f64> {
        t.to_dtype(DType::F64)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f64>())
            .expect("tensor values")
    };
    let (a, b) = (flat(a), flat(b));
    let scale = b
        .iter()
        .fold(0f64, |m, x| m.max(x.abs()))
        .max(f64::MIN_POSITIVE);
    let err = a
        .iter()
        .zip(&b)
        .fold(0f64, |m, (x, y)| m.max((x - y).abs()));
    assert!(
        err <= tol * scale,
        "{what}: max abs error {err:e} > {tol:e} × scale {scale:e}"
    );
    assert!(a.iter().all(|x| x.is_finite()), "{what}: non-finite output");
}
