//! Basic layers: Linear and affine LayerNorm on the fused kernels (`crate::kernels`),
//! which carry their own backward passes (candle's fused `layer_norm` / `softmax_last_dim` stop
//! the gradient, see STACK-NOTES "candle traps").

use candle_core::Tensor;

use crate::ModelError;
use crate::kernels;
use crate::params::{Init, ParamMap, ParamSpec};

/// Linear layer y = x·Wᵀ + b with W stored `[out, in]` (torch layout, so checkpoints map 1:1).
#[derive(Clone, Debug)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// Wraps existing tensors (Var-backed for training, plain for the target encoder).
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    /// Specs of `{prefix}.weight` / `{prefix}.bias`.
    pub fn specs(prefix: &str, in_dim: usize, out_dim: usize, out: &mut Vec<ParamSpec>) {
        out.push(ParamSpec::new(
            format!("{prefix}.weight"),
            &[out_dim, in_dim],
            Init::TruncNormal,
        ));
        out.push(ParamSpec::new(
            format!("{prefix}.bias"),
            &[out_dim],
            Init::Zeros,
        ));
    }

    /// Builds from `{prefix}.weight` / `{prefix}.bias` in `params`.
    pub fn load(
        params: &ParamMap,
        prefix: &str,
        in_dim: usize,
        out_dim: usize,
    ) -> Result<Self, ModelError> {
        let weight = params.get(&format!("{prefix}.weight"), &[out_dim, in_dim])?;
        let bias = params.get(&format!("{prefix}.bias"), &[out_dim])?;
        Ok(Self::new(weight, Some(bias)))
    }

    /// Applies the layer to the last dimension of `x` (any rank ≥ 1).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor, ModelError> {
        kernels::linear(x, &self.weight, self.bias.as_ref())
    }

    /// x·Wᵀ without the bias, for callers that fuse the bias into the next op (`bias_gelu`).
    pub fn matmul(&self, x: &Tensor) -> Result<Tensor, ModelError> {
        kernels::linear(x, &self.weight, None)
    }

    /// The `[out]` bias, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// The same layer on detached tensors (same storage, no gradient recorded through it).
    pub fn detached(&self) -> Self {
        Self {
            weight: self.weight.detach(),
            bias: self.bias.as_ref().map(Tensor::detach),
        }
    }

    /// The `[out, in]` weight.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
}

/// Affine LayerNorm over the last dimension (fused kernel with backward); eps 1e-6 in the ViTs.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// The same layer on detached tensors (same storage, no gradient recorded through it).
    pub fn detached(&self) -> Self {
        Self {
            weight: self.weight.detach(),
            bias: self.bias.detach(),
            eps: self.eps,
        }
    }

    /// Wraps existing weight / bias `[D]`.
    pub fn new(weight: Tensor, bias: Tensor, eps: f64) -> Self {
        Self { weight, bias, eps }
    }

    /// Specs of `{prefix}.weight` (ones) / `{prefix}.bias` (zeros).
    pub fn specs(prefix: &str, dim: usize, out: &mut Vec<ParamSpec>) {
        out.push(ParamSpec::new(
            format!("{prefix}.weight"),
            &[dim],
            Init::Ones,
        ));
        out.push(ParamSpec::new(
            format!("{prefix}.bias"),
            &[dim],
            Init::Zeros,
        ));
    }

    /// Builds from `{prefix}.weight` / `{prefix}.bias`.
    pub fn load(params: &ParamMap, prefix: &str, dim: usize, eps: f64) -> Result<Self, ModelError> {
        Ok(Self::new(
            params.get(&format!("{prefix}.weight"), &[dim])?,
            params.get(&format!("{prefix}.bias"), &[dim])?,
            eps,
        ))
    }

    /// Normalises the last dimension, then scales and shifts.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor, ModelError> {
        kernels::layer_norm(x, &self.weight, &self.bias, self.eps)
    }

    /// The scale γ.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The shift β.
    pub fn bias(&self) -> &Tensor {
        &self.bias
    }

    /// Added to the variance.
    pub fn eps(&self) -> f64 {
        self.eps
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    /// Deterministic pseudo-random f64 values in [-1, 1) for tests.
    pub(crate) fn values(n: usize, seed: u64) -> Vec<f64> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
            })
            .collect()
    }

    /// Central finite differences of `f` against the analytic gradient of every element of `var`.
    pub(crate) fn check_grad(var: &Var, analytic: &Tensor, f: &dyn Fn() -> f64, tol: f64) {
        let base = var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let ana = analytic.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let h = 1e-6;
        for i in 0..base.len() {
            let mut v = base.clone();
            v[i] += h;
            var.set(&Tensor::from_vec(v.clone(), var.shape(), &Device::Cpu).unwrap())
                .unwrap();
            let fp = f();
            v[i] -= 2.0 * h;
            var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                .unwrap();
            let fm = f();
            let num = (fp - fm) / (2.0 * h);
            let err = (num - ana[i]).abs() / (1.0 + num.abs());
            assert!(
                err < tol,
                "elem {i}: numeric {num} analytic {} (err {err})",
                ana[i]
            );
        }
        var.set(&Tensor::from_vec(base, var.shape(), &Device::Cpu).unwrap())
            .unwrap();
    }

    #[test]
    fn layer_norm_matches_formula() {
        let x = Tensor::new(&[[1f32, 2., 3., 4.], [0., 0., 0., 8.]], &Device::Cpu).unwrap();
        let y = kernels::layer_norm_plain(&x, 1e-5)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let row = [1f64, 2., 3., 4.];
        let var = 1.25f64;
        for (j, v) in row.iter().enumerate() {
            let want = (v - 2.5) / (var + 1e-5).sqrt();
            assert!((y[0][j] as f64 - want).abs() < 1e-5);
        }
        assert!((y[1][3] as f64 - 6.0 / (12.0f64 + 1e-5).sqrt()).abs() < 1e-5);
    }

    #[test]
    fn layer_norm_finite_difference() {
        let dev = Device::Cpu;
        let x = Var::from_vec(values(12, 1), (3, 4), &dev).unwrap();
        let w = Var::from_vec(values(4, 2), 4, &dev).unwrap();
        let b = Var::from_vec(values(4, 3), 4, &dev).unwrap();
        let r = Tensor::from_vec(values(12, 4), (3, 4), &dev).unwrap();
        let ln = LayerNorm::new(w.as_tensor().clone(), b.as_tensor().clone(), 1e-6);
        let f = || -> f64 {
            ln.forward(x.as_tensor())
                .unwrap()
                .mul(&r)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar()
                .unwrap()
        };
        let loss = ln
            .forward(x.as_tensor())
            .unwrap()
            .mul(&r)
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        for v in [&x, &w, &b] {
            let g = grads.get(v.as_tensor()).expect("grad present");
            assert_eq!(g.dtype(), DType::F64);
            check_grad(v, g, &f, 1e-6);
        }
    }

    #[test]
    fn linear_with_and_without_bias() {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[1f32, 2., 3.]], &dev).unwrap();
        let w = Tensor::new(&[[1f32, 0., 1.], [0., 2., 0.]], &dev).unwrap();
        let b = Tensor::new(&[10f32, 20.], &dev).unwrap();
        let y = Linear::new(w, Some(b))
            .forward(&x.unsqueeze(0).unwrap())
            .unwrap();
        assert_eq!(y.dims(), &[1, 1, 2]);
        assert_eq!(
            y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![14., 24.]
        );
        let w = Tensor::new(&[[1f32, 0., 1.]], &dev).unwrap();
        let y = Linear::new(w, None).forward(&x).unwrap();
        assert_eq!(y.to_vec2::<f32>().unwrap(), vec![vec![4f32]]);
    }
}
