//! In-place optimiser kernels: AdamW (torch `_single_tensor_adamw` semantics, amsgrad and
//! maximize off) and the EMA target update. Both write into existing storage, so a training step
//! allocates no new parameter or moment tensors.
//!
//! candle's in-place ops mutate only their destination, so an AdamW step is two passes: the
//! moments `[2, ..]` (exp_avg then exp_avg_sq, one tensor per parameter) from the gradient, then
//! the parameter from the moments.

use candle_core::{CpuStorage, InplaceOp2, Layout, Tensor};

use super::math::{Elem, multiversion};
use super::{FLAT_CHUNK, check_same, contiguous, contiguous_mut, par, unsupported};
use crate::ModelError;

/// Moment update: m ← m + (1 − β₁)(g − m) (torch `lerp_`), v ← β₂·v + (1 − β₂)·g².
/// Destination: the `[2, ..]` moments; source: the gradient.
#[derive(Clone, Copy, Debug)]
pub struct AdamMoments {
    /// β₁.
    pub beta1: f64,
    /// β₂.
    pub beta2: f64,
}

/// Parameter update of one AdamW step: θ ← θ·(1 − lr·wd) (skipped when wd = 0), then
/// θ ← θ − lr/(1 − β₁ᵗ) · m / (√v / √(1 − β₂ᵗ) + eps). Destination: the parameter; source: the
/// `[2, ..]` moments after [`AdamMoments`].
#[derive(Clone, Copy, Debug)]
pub struct AdamUpdate {
    /// Learning rate.
    pub lr: f64,
    /// Decoupled weight decay (0 for the no-decay groups).
    pub weight_decay: f64,
    /// β₁.
    pub beta1: f64,
    /// β₂.
    pub beta2: f64,
    /// Added to the denominator.
    pub eps: f64,
    /// 1-based step count of this parameter (for the bias corrections).
    pub step: u64,
}

/// EMA: θ_target ← m·θ_target + (1 − m)·θ_online. Destination: the target weight.
#[derive(Clone, Copy, Debug)]
pub struct EmaUpdate {
    /// Momentum m.
    pub momentum: f64,
}

/// One AdamW step for one parameter, in place: `state` `[2, ..shape]` holds (exp_avg,
/// exp_avg_sq) and is updated from `grad`, then `param` from `state`.
pub fn adamw_step(
    param: &Tensor,
    state: &Tensor,
    grad: &Tensor,
    update: &AdamUpdate,
) -> Result<(), ModelError> {
    check_same("adamw", &[param, state, grad])?;
    let mut want = vec![2];
    want.extend_from_slice(param.dims());
    if grad.dims() != param.dims() || state.dims() != want.as_slice() {
        return Err(ModelError::Input(format!(
            "adamw: param {:?}, grad {:?}, state {:?} (expected {want:?})",
            param.dims(),
            grad.dims(),
            state.dims()
        )));
    }
    if update.step == 0 {
        return Err(ModelError::Input("adamw: step counts start at 1".into()));
    }
    state.inplace_op2(
        &grad.contiguous()?,
        &AdamMoments {
            beta1: update.beta1,
            beta2: update.beta2,
        },
    )?;
    param.inplace_op2(state, update)?;
    Ok(())
}

/// θ_target ← m·θ_target + (1 − m)·θ_online, in place.
pub fn ema_update(target: &Tensor, online: &Tensor, momentum: f64) -> Result<(), ModelError> {
    check_same("ema_update", &[target, online])?;
    if target.dims() != online.dims() {
        return Err(ModelError::Input(format!(
            "ema_update: target {:?} vs online {:?}",
            target.dims(),
            online.dims()
        )));
    }
    target.inplace_op2(&online.contiguous()?, &EmaUpdate { momentum })?;
    Ok(())
}

multiversion! {
    fn moments<T: Elem>(m: &mut [T], v: &mut [T], g: &[T], w1: T, b2: T, w2: T) {
        for ((m, v), &g) in m.iter_mut().zip(v.iter_mut()).zip(g) {
            *m = *m + w1 * (g - *m);
            *v = *v * b2 + w2 * (g * g);
        }
    }
}

multiversion! {
    fn param_update<T: Elem>(
        p: &mut [T],
        m: &[T],
        v: &[T],
        decay: Option<T>,
        step_size: T,
        bc2_sqrt: T,
        eps: T,
    ) {
        if let Some(decay) = decay {
            for p in p.iter_mut() {
                *p *= decay;
            }
        }
        for ((p, &m), &v) in p.iter_mut().zip(m).zip(v) {
            let denom = v.sqrt_() / bc2_sqrt + eps;
            *p -= step_size * (m / denom);
        }
    }
}

multiversion! {
    fn ema<T: Elem>(t: &mut [T], o: &[T], mom: T, rest: T) {
        for (t, &o) in t.iter_mut().zip(o) {
            *t = *t * mom + o * rest;
        }
    }
}

fn check_len(op: &str, dst: usize, src: usize, ratio: usize) -> candle_core::Result<()> {
    if dst != src * ratio {
        candle_core::bail!("{op}: destination has {dst} elements, source {src}");
    }
    Ok(())
}

impl InplaceOp2 for AdamMoments {
    fn name(&self) -> &'static str {
        "vjepa-adam-moments"
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let cfg = super::cuda::AdamWConfig {
            beta1: self.beta1,
            beta2: self.beta2,
            eps: 0.0,
        };
        super::cuda::adam_moments(s1, l1, s2, l2, &cfg)
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        fn run<T: Elem>(
            op: &AdamMoments,
            s1: &mut CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
        ) -> candle_core::Result<()> {
            let name = "vjepa-adam-moments";
            let g = contiguous::<T>(name, s2, l2)?;
            let state = contiguous_mut::<T>(name, s1, l1)?;
            check_len(name, state.len(), g.len(), 2)?;
            let (m, v) = state.split_at_mut(g.len());
            // 1 − β in f64 like torch (its Python floats): 1 − 0.999 taken in f32 is off by 1.3e-5.
            let w1 = T::from_f64(1.0 - op.beta1);
            let (b2, w2) = (T::from_f64(op.beta2), T::from_f64(1.0 - op.beta2));
            par::chunks2_mut(m, v, FLAT_CHUNK, |i, m, v| {
                moments(
                    m,
                    v,
                    &g[i * FLAT_CHUNK..i * FLAT_CHUNK + m.len()],
                    w1,
                    b2,
                    w2,
                )
            });
            Ok(())
        }
        match s2 {
            CpuStorage::F32(_) => run::<f32>(self, s1, l1, s2, l2),
            CpuStorage::F64(_) => run::<f64>(self, s1, l1, s2, l2),
            _ => Err(unsupported(self.name(), s2)),
        }
    }
}

impl InplaceOp2 for AdamUpdate {
    fn name(&self) -> &'static str {
        "vjepa-adamw-update"
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let cfg = super::cuda::AdamWConfig {
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
        };
        let step = super::cuda::AdamWStep {
            lr: self.lr,
            weight_decay: self.weight_decay,
            step: self.step,
        };
        super::cuda::adam_update(s1, l1, s2, l2, &cfg, &step)
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        fn run<T: Elem>(
            op: &AdamUpdate,
            s1: &mut CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
        ) -> candle_core::Result<()> {
            let name = "vjepa-adamw-update";
            let state = contiguous::<T>(name, s2, l2)?;
            let p = contiguous_mut::<T>(name, s1, l1)?;
            check_len(name, state.len(), p.len(), 2)?;
            let (m, v) = state.split_at(p.len());
            let step = op.step as f64;
            let bc1 = 1.0 - op.beta1.powf(step);
            let bc2 = 1.0 - op.beta2.powf(step);
            let decay =
                (op.weight_decay != 0.0).then(|| T::from_f64(1.0 - op.lr * op.weight_decay));
            let step_size = T::from_f64(op.lr / bc1);
            let bc2_sqrt = T::from_f64(bc2.sqrt());
            let eps = T::from_f64(op.eps);
            par::chunks_mut(p, FLAT_CHUNK, |i, p| {
                let span = i * FLAT_CHUNK..i * FLAT_CHUNK + p.len();
                param_update(
                    p,
                    &m[span.clone()],
                    &v[span],
                    decay,
                    step_size,
                    bc2_sqrt,
                    eps,
                )
            });
            Ok(())
        }
        match s2 {
            CpuStorage::F32(_) => run::<f32>(self, s1, l1, s2, l2),
            CpuStorage::F64(_) => run::<f64>(self, s1, l1, s2, l2),
            _ => Err(unsupported(self.name(), s2)),
        }
    }
}

impl InplaceOp2 for EmaUpdate {
    fn name(&self) -> &'static str {
        "vjepa-ema-update"
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        super::cuda::ema_inplace(s1, l1, s2, l2, self.momentum)
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        fn run<T: Elem>(
            momentum: f64,
            s1: &mut CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
        ) -> candle_core::Result<()> {
            let name = "vjepa-ema-update";
            let o = contiguous::<T>(name, s2, l2)?;
            let t = contiguous_mut::<T>(name, s1, l1)?;
            check_len(name, t.len(), o.len(), 1)?;
            let (mom, rest) = (T::from_f64(momentum), T::from_f64(1.0 - momentum));
            par::chunks_mut(t, FLAT_CHUNK, |i, t| {
                ema(t, &o[i * FLAT_CHUNK..i * FLAT_CHUNK + t.len()], mom, rest)
            });
            Ok(())
        }
        match s2 {
            CpuStorage::F32(_) => run::<f32>(self.momentum, s1, l1, s2, l2),
            CpuStorage::F64(_) => run::<f64>(self.momentum, s1, l1, s2, l2),
            _ => Err(unsupported(self.name(), s2)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn adamw_matches_torch_formula() {
        let dev = Device::Cpu;
        let p0 = [1.0f64, -2.0, 0.5];
        let gs = [[0.5f64, -0.1, 0.0], [-0.3, 0.2, 1e-3]];
        let (lr, wd, b1, b2, eps) = (0.1, 0.1, 0.9, 0.999, 1e-8);
        let param = Tensor::new(&p0, &dev).unwrap();
        let state = Tensor::zeros((2, 3), DType::F64, &dev).unwrap();
        let (mut p, mut m, mut v) = (p0, [0.0f64; 3], [0.0f64; 3]);
        for (s, g) in gs.iter().enumerate() {
            let step = s as u64 + 1;
            let grad = Tensor::new(g, &dev).unwrap();
            let update = AdamUpdate {
                lr,
                weight_decay: wd,
                beta1: b1,
                beta2: b2,
                eps,
                step,
            };
            adamw_step(&param, &state, &grad, &update).unwrap();
            for i in 0..3 {
                p[i] *= 1.0 - lr * wd;
                m[i] = b1 * m[i] + (1.0 - b1) * g[i];
                v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
                let bc1 = 1.0 - b1.powi(step as i32);
                let bc2 = 1.0 - b2.powi(step as i32);
                p[i] -= (lr / bc1) * m[i] / (v[i].sqrt() / bc2.sqrt() + eps);
            }
            let got = param.to_vec1::<f64>().unwrap();
            let st = state.to_vec2::<f64>().unwrap();
            for i in 0..3 {
                assert!(
                    (got[i] - p[i]).abs() < 1e-12,
                    "step {step} p{i}: {} vs {}",
                    got[i],
                    p[i]
                );
                assert!((st[0][i] - m[i]).abs() < 1e-15);
                assert!((st[1][i] - v[i]).abs() < 1e-15);
            }
        }
    }

    #[test]
    fn no_decay_and_f32_path() {
        let dev = Device::Cpu;
        let param = Tensor::new(&[1f32, 1.0], &dev).unwrap();
        let state = Tensor::zeros((2, 2), DType::F32, &dev).unwrap();
        let grad = Tensor::new(&[0f32, 0.0], &dev).unwrap();
        let mut update = AdamUpdate {
            lr: 0.5,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            step: 1,
        };
        adamw_step(&param, &state, &grad, &update).unwrap();
        assert_eq!(param.to_vec1::<f32>().unwrap(), vec![1.0, 1.0]);
        update.weight_decay = 0.2;
        update.step = 2;
        adamw_step(&param, &state, &grad, &update).unwrap();
        assert_eq!(param.to_vec1::<f32>().unwrap(), vec![0.9, 0.9]);
    }

    #[test]
    fn refuses_mismatched_state() {
        let dev = Device::Cpu;
        let p = Tensor::zeros(3, DType::F32, &dev).unwrap();
        let bad = Tensor::zeros((3, 3), DType::F32, &dev).unwrap();
        let update = AdamUpdate {
            lr: 0.1,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            step: 1,
        };
        assert!(matches!(
            adamw_step(&p, &bad, &p, &update),
            Err(ModelError::Input(_))
        ));
        assert!(matches!(
            ema_update(&p, &bad, 0.5),
            Err(ModelError::Input(_))
        ));
    }

    #[test]
    fn ema_is_in_place_and_matches_formula() {
        let dev = Device::Cpu;
        let t = Tensor::new(&[1f32, -2.0, 4.0], &dev).unwrap();
        let alias = t.clone(); // shares storage: sees the update
        let o = Tensor::new(&[3f32, 0.0, 4.0], &dev).unwrap();
        ema_update(&t, &o, 0.75).unwrap();
        let want = [0.75f32 + 0.25 * 3.0, -1.5, 4.0];
        assert_eq!(alias.to_vec1::<f32>().unwrap(), want);
    }
}
