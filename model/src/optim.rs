//! AdamW with the spec's four parameter groups (§7), torch semantics, and grad-norm helpers.
//! The per-tensor work runs in the fused in-place kernels of [`crate::kernels`].

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

use crate::ModelError;
use crate::kernels::{self, AdamUpdate};
use crate::params::is_decayed;

/// The four official param groups. Decayed groups follow the WD schedule; the others use 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ParamGroup {
    /// Group 0: encoder weights (name lacks "bias", ndim ≠ 1).
    EncoderDecay,
    /// Group 1: predictor weights, including mask tokens.
    PredictorDecay,
    /// Group 2: encoder biases and 1-D params (LayerNorm).
    EncoderNoDecay,
    /// Group 3: predictor biases and 1-D params.
    PredictorNoDecay,
}

impl ParamGroup {
    /// Group of a parameter by owner, name and rank (spec §7 rule).
    pub fn classify(predictor: bool, name: &str, ndim: usize) -> Self {
        match (predictor, is_decayed(name, ndim)) {
            (false, true) => Self::EncoderDecay,
            (true, true) => Self::PredictorDecay,
            (false, false) => Self::EncoderNoDecay,
            (true, false) => Self::PredictorNoDecay,
        }
    }

    /// Whether the scheduled weight decay applies.
    pub fn decayed(self) -> bool {
        matches!(self, Self::EncoderDecay | Self::PredictorDecay)
    }

    /// Whether the group belongs to the predictor (for per-module grad norms / clipping).
    pub fn is_predictor(self) -> bool {
        matches!(self, Self::PredictorDecay | Self::PredictorNoDecay)
    }
}

/// One optimised parameter with its AdamW state.
#[derive(Debug)]
pub struct OptParam {
    /// Full checkpoint name, e.g. `encoder.blocks.0.attn.qkv.weight`.
    pub name: String,
    /// The trainable tensor.
    pub var: Var,
    /// Its group.
    pub group: ParamGroup,
    /// Both moments in one `[2, ..shape]` tensor (exp_avg, then exp_avg_sq), so that one
    /// in-place kernel pass updates them together.
    pub state: Tensor,
    /// Steps taken for this parameter (torch keeps one per param; params without grad skip).
    pub step: u64,
}

impl OptParam {
    /// A parameter with saved moments (each shaped like the parameter).
    pub fn from_moments(
        name: String,
        var: Var,
        group: ParamGroup,
        exp_avg: &Tensor,
        exp_avg_sq: &Tensor,
        step: u64,
    ) -> Result<Self, ModelError> {
        for (what, t) in [("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)] {
            if t.dims() != var.dims() {
                return Err(ModelError::TensorShape {
                    name: format!("opt.{what}.{name}"),
                    expected: var.dims().to_vec(),
                    actual: t.dims().to_vec(),
                });
            }
        }
        let state = Tensor::stack(&[exp_avg, exp_avg_sq], 0)?.to_dtype(var.dtype())?;
        Ok(Self {
            name,
            var,
            group,
            state,
            step,
        })
    }

    /// First moment (a view into `state`).
    pub fn exp_avg(&self) -> Result<Tensor, ModelError> {
        Ok(self.state.get(0)?)
    }

    /// Second moment (a view into `state`).
    pub fn exp_avg_sq(&self) -> Result<Tensor, ModelError> {
        Ok(self.state.get(1)?)
    }
}

/// What one AdamW step applies besides the moments it keeps.
#[derive(Clone, Copy, Debug)]
pub struct StepArgs<'a> {
    /// Learning rate.
    pub lr: f64,
    /// Weight decay, for the decayed groups only.
    pub weight_decay: f64,
    /// Per parameter (in [`AdamW::params`] order), the factor its gradient is multiplied by as
    /// the update reads it: gradient clipping without a scaled copy of the gradients. Empty for
    /// none.
    pub grad_scale: &'a [f64],
    /// Per parameter, a lower-precision copy rewritten from the updated value (the compute
    /// weights of a mixed-precision step); `None` for none.
    pub copies: Option<&'a [Var]>,
}

/// AdamW (torch `_single_tensor_adamw`, amsgrad off, maximize off).
#[derive(Debug)]
pub struct AdamW {
    params: Vec<OptParam>,
    betas: (f64, f64),
    eps: f64,
}

impl AdamW {
    /// Fresh optimiser (zero moments) over `(name, var, group)`.
    pub fn new(
        params: Vec<(String, Var, ParamGroup)>,
        betas: (f64, f64),
        eps: f64,
    ) -> Result<Self, ModelError> {
        let params = params
            .into_iter()
            .map(|(name, var, group)| {
                let mut shape = vec![2];
                shape.extend_from_slice(var.dims());
                let state = Tensor::zeros(shape, var.dtype(), var.device())?;
                Ok(OptParam {
                    name,
                    group,
                    state,
                    var,
                    step: 0,
                })
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        Ok(Self { params, betas, eps })
    }

    /// Rebuilds from saved state (moments and per-param step counts).
    pub fn from_state(params: Vec<OptParam>, betas: (f64, f64), eps: f64) -> Self {
        Self { params, betas, eps }
    }

    /// The parameters in group-insertion order.
    pub fn params(&self) -> &[OptParam] {
        &self.params
    }

    /// The parameters, to restore a saved state into ([`crate::train_state`]).
    pub(crate) fn params_mut(&mut self) -> &mut [OptParam] {
        &mut self.params
    }

    /// One update with the scheduled `lr` and `weight_decay` (the latter for decayed groups only),
    /// in place. Parameters with no gradient in `grads` are skipped, as torch does.
    pub fn step(
        &mut self,
        grads: &GradStore,
        lr: f64,
        weight_decay: f64,
    ) -> Result<(), ModelError> {
        self.step_with(
            grads,
            &StepArgs {
                lr,
                weight_decay,
                grad_scale: &[],
                copies: None,
            },
        )
    }

    /// [`Self::step`] with per-parameter gradient scales and rewritten copies ([`StepArgs`]).
    /// A gradient may have a lower precision than its parameter (mixed precision): it is
    /// widened as it is read.
    pub fn step_with(&mut self, grads: &GradStore, args: &StepArgs<'_>) -> Result<(), ModelError> {
        let n = self.params.len();
        if !args.grad_scale.is_empty() && args.grad_scale.len() != n {
            return Err(ModelError::Input(format!(
                "adamw: {} gradient scales for {n} parameters",
                args.grad_scale.len()
            )));
        }
        if let Some(c) = args.copies {
            if c.len() != n {
                return Err(ModelError::Input(format!(
                    "adamw: {} weight copies for {n} parameters",
                    c.len()
                )));
            }
            if let Some((p, c)) = self
                .params
                .iter()
                .zip(c)
                .find(|(p, c)| c.dims() != p.var.dims())
            {
                return Err(ModelError::Input(format!(
                    "adamw: copy of {} is {:?}, the parameter {:?}",
                    p.name,
                    c.dims(),
                    p.var.dims()
                )));
            }
        }
        #[cfg(feature = "cuda")]
        if self
            .params
            .first()
            .is_some_and(|p| p.var.device().is_cuda() && p.var.dtype() == DType::F32)
            && args
                .copies
                .is_none_or(|c| c.iter().all(|v| v.dtype() == DType::BF16))
        {
            return self.step_cuda(grads, args);
        }
        let (beta1, beta2) = self.betas;
        for (i, p) in self.params.iter_mut().enumerate() {
            let Some(g) = grads.get(p.var.as_tensor()) else {
                continue;
            };
            let mut g = if g.dtype() == p.var.dtype() {
                g.clone()
            } else {
                g.to_dtype(p.var.dtype())?
            };
            let scale = args.grad_scale.get(i).copied().unwrap_or(1.0);
            if scale != 1.0 {
                g = g.affine(scale, 0.0)?;
            }
            let update = AdamUpdate {
                lr: args.lr,
                weight_decay: if p.group.decayed() {
                    args.weight_decay
                } else {
                    0.0
                },
                beta1,
                beta2,
                eps: self.eps,
                step: p.step + 1,
            };
            kernels::adamw_step(p.var.as_tensor(), &p.state, &g, &update)?;
            p.step = update.step;
            if let Some(c) = args.copies.and_then(|c| c.get(i)) {
                c.set(&p.var.as_tensor().to_dtype(c.dtype())?)?;
            }
        }
        Ok(())
    }
}

#[cfg(feature = "cuda")]
impl AdamW {
    /// On a CUDA device: every parameter with a gradient in ONE multi-tensor launch, with the
    /// per-element update of [`kernels::adamw_step`] (moments in place in each `[2, ..]` state).
    fn step_cuda(&mut self, grads: &GradStore, args: &StepArgs<'_>) -> Result<(), ModelError> {
        use crate::kernels::cuda::{AdamWConfig, AdamWSlot, AdamWStep, adamw_multi};
        let (beta1, beta2) = self.betas;
        let cfg = AdamWConfig {
            beta1,
            beta2,
            eps: self.eps,
        };
        let mut held = Vec::new();
        for (i, p) in self.params.iter().enumerate() {
            if let Some(g) = grads.get(p.var.as_tensor()) {
                held.push((i, g.contiguous()?, p.state.get(0)?, p.state.get(1)?));
            }
        }
        let slots: Vec<AdamWSlot<'_>> = held
            .iter()
            .map(|(i, g, m, v)| {
                let p = &self.params[*i];
                let wd = if p.group.decayed() {
                    args.weight_decay
                } else {
                    0.0
                };
                AdamWSlot {
                    param: p.var.as_tensor(),
                    grad: g,
                    exp_avg: m,
                    exp_avg_sq: v,
                    step: AdamWStep {
                        lr: args.lr,
                        weight_decay: wd,
                        step: p.step + 1,
                    },
                    grad_scale: args.grad_scale.get(*i).copied().unwrap_or(1.0),
                    copy: args.copies.and_then(|c| c.get(*i)).map(|v| v.as_tensor()),
                }
            })
            .collect();
        adamw_multi(&slots, &cfg)?;
        for (i, ..) in &held {
            self.params[*i].step += 1;
        }
        Ok(())
    }
}

/// Sum of squared gradient entries of `vars` (missing grads count as zero); one
/// device-to-host read on a GPU.
pub fn grad_sq_sum<'a>(
    grads: &GradStore,
    vars: impl Iterator<Item = &'a Var>,
) -> Result<f64, ModelError> {
    let vars: Vec<&Var> = vars.collect();
    Ok(grad_sq_sums(grads, &[&vars])?[0])
}

/// [`grad_sq_sum`] of several groups of vars with one device-to-host read on a GPU (per
/// group: the sum of squared gradient entries, missing grads counting as zero).
pub fn grad_sq_sums(grads: &GradStore, groups: &[&[&Var]]) -> Result<Vec<f64>, ModelError> {
    grad_sq_sums_queued(grads, groups)?.read()
}

/// Per-group sums of squared gradients as [`grad_sq_sums_queued`] leaves them: known on the
/// host, or still on the device behind the launches that compute them.
#[derive(Debug)]
pub enum QueuedSums {
    /// Already read (the CPU, where reads are free).
    Host(Vec<f64>),
    /// A `[groups]` f32 or f64 tensor on the device, not read yet.
    Device(Tensor),
}

impl QueuedSums {
    /// The sums on the host (one read for [`QueuedSums::Device`]: a synchronisation on a GPU).
    pub fn read(self) -> Result<Vec<f64>, ModelError> {
        match self {
            QueuedSums::Host(v) => Ok(v),
            QueuedSums::Device(t) => Ok(t.to_dtype(DType::F64)?.to_vec1::<f64>()?),
        }
    }
}

/// [`grad_sq_sums`] without the read on a GPU: the sums are queued on the device, so a caller
/// can read them together with other values in one synchronisation.
pub fn grad_sq_sums_queued(
    grads: &GradStore,
    groups: &[&[&Var]],
) -> Result<QueuedSums, ModelError> {
    #[cfg(feature = "cuda")]
    if let Some(sums) = grad_sq_sums_cuda(grads, groups)? {
        return Ok(sums);
    }
    let mut per_group: Vec<Vec<Tensor>> = Vec::with_capacity(groups.len());
    let mut device = None;
    for vars in groups {
        let mut sums = Vec::new();
        for v in vars.iter() {
            if let Some(g) = grads.get(v.as_tensor()) {
                // bf16 gradients (mixed precision) widened first: a bf16 total would cost the
                // norm three digits. (On a GPU the norms take `grad_sq_sums_cuda` above.)
                let s = kernels::sum_sq(&g.to_dtype(DType::F32)?)?
                    .to_dtype(DType::F64)?
                    .reshape(1)?;
                device.get_or_insert_with(|| s.device().clone());
                sums.push(s);
            }
        }
        per_group.push(sums);
    }
    let Some(device) = device.filter(|d| !d.is_cpu()) else {
        // On the CPU every read is free: sum in f64, tensor by tensor.
        return per_group
            .iter()
            .map(|sums| {
                sums.iter().try_fold(0.0f64, |acc, s| {
                    Ok(acc + s.to_vec1::<f64>()?.first().copied().unwrap_or(0.0))
                })
            })
            .collect::<Result<Vec<f64>, ModelError>>()
            .map(QueuedSums::Host);
    };
    // One [groups] f64 tensor (an empty group sums to 0).
    let mut totals = Vec::with_capacity(per_group.len());
    for sums in &per_group {
        totals.push(match sums.first() {
            None => Tensor::zeros(1, DType::F64, &device)?,
            Some(_) => Tensor::cat(sums, 0)?.sum_all()?.reshape(1)?,
        });
    }
    Ok(QueuedSums::Device(Tensor::cat(&totals, 0)?))
}

/// [`grad_sq_sums_queued`] on a GPU in two launches (`kernels::cuda::sum_sq_groups_queued`),
/// when every gradient is on a CUDA device and all are f32 or all bf16; `None` otherwise.
#[cfg(feature = "cuda")]
fn grad_sq_sums_cuda(
    grads: &GradStore,
    groups: &[&[&Var]],
) -> Result<Option<QueuedSums>, ModelError> {
    let mut held: Vec<Vec<Tensor>> = Vec::with_capacity(groups.len());
    let mut dtype = None;
    for vars in groups {
        let mut gs = Vec::new();
        for v in vars.iter() {
            if let Some(g) = grads.get(v.as_tensor()) {
                let same = *dtype.get_or_insert(g.dtype()) == g.dtype();
                if !g.device().is_cuda() || !same || !matches!(g.dtype(), DType::F32 | DType::BF16)
                {
                    return Ok(None);
                }
                gs.push(g.contiguous()?);
            }
        }
        held.push(gs);
    }
    if dtype.is_none() {
        return Ok(None);
    }
    let refs: Vec<Vec<&Tensor>> = held.iter().map(|g| g.iter().collect()).collect();
    let slices: Vec<&[&Tensor]> = refs.iter().map(Vec::as_slice).collect();
    Ok(Some(match kernels::cuda::sum_sq_groups_queued(&slices)? {
        Some(t) => QueuedSums::Device(t),
        None => QueuedSums::Host(vec![0.0; groups.len()]),
    }))
}

/// torch `clip_grad_norm_`: scales the grads of `vars` by max_norm / (norm + 1e-6) when that is
/// below 1. `norm` is the pre-clip total norm (computed by the caller for its metrics).
pub fn clip_grads<'a>(
    grads: &mut GradStore,
    vars: impl Iterator<Item = &'a Var>,
    norm: f64,
    max_norm: f64,
) -> Result<(), ModelError> {
    let coef = clip_factor(norm, max_norm);
    if coef >= 1.0 {
        return Ok(());
    }
    for v in vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            let scaled = g.affine(coef, 0.0)?;
            grads.insert(v.as_tensor(), scaled);
        }
    }
    Ok(())
}

/// torch `clip_grad_norm_`'s factor for gradients of total norm `norm`: max_norm / (norm + 1e-6)
/// unless that is 1 or more (then 1). A NaN norm gives NaN, as in torch.
pub fn clip_factor(norm: f64, max_norm: f64) -> f64 {
    let coef = max_norm / (norm + 1e-6);
    if coef >= 1.0 { 1.0 } else { coef }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Grads equal to `g` via backward of sum(p · g).
    fn grads_for(vars: &[&Var], gs: &[Vec<f64>]) -> GradStore {
        let mut loss: Option<Tensor> = None;
        for (v, g) in vars.iter().zip(gs) {
            let gt = Tensor::from_vec(g.clone(), v.shape(), &Device::Cpu).unwrap();
            let term = v.as_tensor().mul(&gt).unwrap().sum_all().unwrap();
            loss = Some(match loss {
                None => term,
                Some(l) => (l + term).unwrap(),
            });
        }
        loss.unwrap().backward().unwrap()
    }

    #[test]
    fn adamw_matches_torch_formula_two_steps() {
        let dev = Device::Cpu;
        let p0 = [1.0f64, -2.0];
        let gs = [[0.5f64, -0.1], [-0.3, 0.2]];
        let (lr, wd, b1, b2, eps) = (0.1, 0.1, 0.9, 0.999, 1e-8);
        let var = Var::from_vec(p0.to_vec(), 2, &dev).unwrap();
        let mut opt = AdamW::new(
            vec![("w".into(), var.clone(), ParamGroup::EncoderDecay)],
            (b1, b2),
            eps,
        )
        .unwrap();
        // hand computation
        let (mut p, mut m, mut v) = (p0, [0.0f64; 2], [0.0f64; 2]);
        for (s, g) in gs.iter().enumerate() {
            let step = (s + 1) as i32;
            let grads = grads_for(&[&var], &[g.to_vec()]);
            opt.step(&grads, lr, wd).unwrap();
            for i in 0..2 {
                p[i] *= 1.0 - lr * wd;
                m[i] = b1 * m[i] + (1.0 - b1) * g[i];
                v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
                let bc1 = 1.0 - b1.powi(step);
                let bc2 = 1.0 - b2.powi(step);
                p[i] -= (lr / bc1) * m[i] / (v[i].sqrt() / bc2.sqrt() + eps);
            }
            let got = var.as_tensor().to_vec1::<f64>().unwrap();
            for i in 0..2 {
                assert!(
                    (got[i] - p[i]).abs() < 1e-12,
                    "step {step} elem {i}: {} vs {}",
                    got[i],
                    p[i]
                );
            }
        }
        assert_eq!(opt.params()[0].step, 2);
    }

    #[test]
    fn no_decay_group_ignores_weight_decay() {
        let dev = Device::Cpu;
        let a = Var::from_vec(vec![1.0f64, 1.0], 2, &dev).unwrap();
        let b = Var::from_vec(vec![1.0f64, 1.0], 2, &dev).unwrap();
        let mut opt = AdamW::new(
            vec![
                ("a".into(), a.clone(), ParamGroup::EncoderDecay),
                ("b.bias".into(), b.clone(), ParamGroup::PredictorNoDecay),
            ],
            (0.9, 0.999),
            1e-8,
        )
        .unwrap();
        let grads = grads_for(&[&a, &b], &[vec![0.0, 0.0], vec![0.0, 0.0]]);
        opt.step(&grads, 0.5, 0.2).unwrap();
        assert_eq!(a.as_tensor().to_vec1::<f64>().unwrap(), vec![0.9, 0.9]);
        assert_eq!(b.as_tensor().to_vec1::<f64>().unwrap(), vec![1.0, 1.0]);
    }

    #[test]
    fn groups_follow_spec_rule() {
        use ParamGroup::*;
        assert_eq!(
            ParamGroup::classify(false, "blocks.0.attn.qkv.weight", 2),
            EncoderDecay
        );
        assert_eq!(
            ParamGroup::classify(false, "blocks.0.attn.qkv.bias", 1),
            EncoderNoDecay
        );
        assert_eq!(
            ParamGroup::classify(false, "norm.weight", 1),
            EncoderNoDecay
        );
        assert_eq!(
            ParamGroup::classify(false, "patch_embed.proj.weight", 5),
            EncoderDecay
        );
        assert_eq!(
            ParamGroup::classify(true, "mask_tokens.0", 3),
            PredictorDecay
        );
        assert_eq!(
            ParamGroup::classify(true, "predictor_norm.weight", 1),
            PredictorNoDecay
        );
        assert_eq!(
            ParamGroup::classify(true, "predictor_embed.bias", 1),
            PredictorNoDecay
        );
    }

    #[test]
    fn clipping_scales_to_max_norm() {
        let dev = Device::Cpu;
        let a = Var::from_vec(vec![0.0f64, 0.0], 2, &dev).unwrap();
        let mut grads = grads_for(&[&a], &[vec![3.0, 4.0]]);
        let n = grad_sq_sum(&grads, [&a].into_iter()).unwrap().sqrt();
        assert_eq!(n, 5.0);
        clip_grads(&mut grads, [&a].into_iter(), n, 1.0).unwrap();
        let n2 = grad_sq_sum(&grads, [&a].into_iter()).unwrap().sqrt();
        assert!((n2 - 1.0).abs() < 1e-6);
        clip_grads(&mut grads, [&a].into_iter(), n2, 10.0).unwrap(); // no-op
        assert!((grad_sq_sum(&grads, [&a].into_iter()).unwrap().sqrt() - n2).abs() < 1e-15);
    }

    #[test]
    fn grouped_sums_equal_the_single_sums() {
        let dev = Device::Cpu;
        let a = Var::from_vec(vec![1.0f64, 2.0], 2, &dev).unwrap();
        let b = Var::from_vec(vec![0.5f64, -1.0, 3.0], 3, &dev).unwrap();
        let c = Var::from_vec(vec![7.0f64], 1, &dev).unwrap(); // no gradient
        let grads = grads_for(&[&a, &b], &[vec![3.0, -4.0], vec![1.0, 2.0, 2.0]]);
        let sums = grad_sq_sums(&grads, &[&[&a], &[&b, &c], &[&c]]).unwrap();
        assert_eq!(sums, vec![25.0, 9.0, 0.0]);
        assert_eq!(sums[1], grad_sq_sum(&grads, [&b, &c].into_iter()).unwrap());
    }
}
