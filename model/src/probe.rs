//! The attentive probe of the V-JEPA evaluation (spec §9): one learned query reads all tokens
//! of a frozen encoder through one cross-attention block, then a Linear classifies. It is how
//! the paper judges frozen features, and how users judge their own runs (`vjepa probe`).
//!
//! Parameter names are the official state-dict keys without `module.`: `pooler.query_tokens`,
//! `pooler.cross_attention_block.{norm1,xattn.q,xattn.kv,xattn.proj,norm2,mlp.fc1,mlp.fc2}.*`,
//! `linear.*`. As in the released probes, `xattn.proj` exists (and is saved) but is not applied.

use candle_core::backprop::GradStore;
use candle_core::{D, DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::ModelError;
use crate::config::OptimConfig;
use crate::kernels;
use crate::layers::{LayerNorm, Linear};
use crate::optim::{self, AdamW, ParamGroup};
use crate::params::{Init, InitRng, ParamSpec};
use crate::schedule;

/// LayerNorm eps of the probe (torch's default; the encoder uses 1e-6).
pub const PROBE_LN_EPS: f64 = 1e-5;

/// Shape of a probe.
#[derive(Clone, Debug, PartialEq)]
pub struct ProbeConfig {
    /// Token width D of the encoder it reads.
    pub embed_dim: usize,
    /// Attention heads (the encoder's).
    pub num_heads: usize,
    /// Output classes.
    pub num_classes: usize,
    /// MLP hidden width as a multiple of D (4 in every released config).
    pub mlp_ratio: f64,
}

impl ProbeConfig {
    fn hidden(&self) -> usize {
        (self.embed_dim as f64 * self.mlp_ratio) as usize
    }

    /// Every parameter (name, shape, init) in a fixed order.
    pub fn specs(&self) -> Vec<ParamSpec> {
        let d = self.embed_dim;
        let b = "pooler.cross_attention_block";
        let mut s = vec![ParamSpec::new(
            "pooler.query_tokens",
            &[1, 1, d],
            Init::TruncNormal,
        )];
        LayerNorm::specs(&format!("{b}.norm1"), d, &mut s);
        Linear::specs(&format!("{b}.xattn.q"), d, d, &mut s);
        Linear::specs(&format!("{b}.xattn.kv"), d, 2 * d, &mut s);
        Linear::specs(&format!("{b}.xattn.proj"), d, d, &mut s);
        LayerNorm::specs(&format!("{b}.norm2"), d, &mut s);
        Linear::specs(&format!("{b}.mlp.fc1"), d, self.hidden(), &mut s);
        Linear::specs(&format!("{b}.mlp.fc2"), self.hidden(), d, &mut s);
        Linear::specs("linear", d, self.num_classes, &mut s);
        s
    }

    fn check(&self) -> Result<(), ModelError> {
        if self.embed_dim == 0
            || self.num_heads == 0
            || !self.embed_dim.is_multiple_of(self.num_heads)
        {
            return Err(ModelError::Config(format!(
                "probe: width {} is not divisible into {} heads",
                self.embed_dim, self.num_heads
            )));
        }
        if self.num_classes < 2 {
            return Err(ModelError::Config(format!(
                "probe: {} classes (need at least 2)",
                self.num_classes
            )));
        }
        if self.hidden() == 0 {
            return Err(ModelError::Config(
                "probe: mlp_ratio gives no hidden units".into(),
            ));
        }
        Ok(())
    }
}

/// The probe's optimisation (spec §9): AdamW, lr cosine from `lr` to `final_lr` with no warmup,
/// weight decay cosine from `weight_decay` to `final_weight_decay`, grad-norm clip.
#[derive(Clone, Debug, PartialEq)]
pub struct ProbeOptim {
    /// Learning rate at step 0 (no warmup).
    pub lr: f64,
    /// Learning rate at the last step.
    pub final_lr: f64,
    /// Weight decay at step 0 (decayed groups only).
    pub weight_decay: f64,
    /// Weight decay at the last step.
    pub final_weight_decay: f64,
    /// Schedule length in steps (epochs × iterations per epoch).
    pub total_steps: u64,
    /// Max total gradient norm; `None` disables clipping.
    pub clip_grad: Option<f64>,
}

impl ProbeOptim {
    /// The official video values: lr 1e-3 → 0, wd 0.01 → 1e-6, clip 1.0.
    pub fn video(total_steps: u64) -> Self {
        Self {
            lr: 1e-3,
            final_lr: 0.0,
            weight_decay: 0.01,
            final_weight_decay: 1e-6,
            total_steps,
            clip_grad: Some(1.0),
        }
    }

    fn schedule(&self) -> OptimConfig {
        OptimConfig {
            start_lr: self.lr,
            lr: self.lr,
            final_lr: self.final_lr,
            warmup_steps: 0,
            total_steps: self.total_steps,
            weight_decay: self.weight_decay,
            final_weight_decay: self.final_weight_decay,
            ema: (1.0, 1.0),
            clip_grad: self.clip_grad,
            clip_start_iteration: 0,
            // torch.optim.AdamW defaults.
            betas: (0.9, 0.999),
            eps: 1e-8,
            loss_exp: 1.0,
            reg_coeff: 0.0,
        }
    }
}

/// One attentive probe: query → cross-attention block → Linear.
pub struct AttentiveProbe {
    cfg: ProbeConfig,
    /// Parameters in [`ProbeConfig::specs`] order.
    vars: Vec<(String, Var)>,
}

impl AttentiveProbe {
    /// A fresh probe: Linears and the query N(0, 0.02²) (truncated), biases 0, LayerNorms 1/0,
    /// `mlp.fc2` and `xattn.proj` weights divided by √2, the classifier PyTorch's default
    /// (uniform ±1/√D for weight and bias).
    pub fn new(cfg: ProbeConfig, seed: u64, device: &Device) -> Result<Self, ModelError> {
        cfg.check()?;
        let mut init = InitRng::new(seed)?;
        let mut uniform = ChaCha8Rng::seed_from_u64(seed ^ 0x9e37_79b9_7f4a_7c15);
        let bound = 1.0 / (cfg.embed_dim as f64).sqrt();
        let mut vars = Vec::new();
        for spec in cfg.specs() {
            let mut values = if spec.name.starts_with("linear.") {
                (0..spec.numel())
                    .map(|_| uniform.random_range(-bound..bound) as f32)
                    .collect()
            } else {
                init.values(&spec)
            };
            if spec.name.ends_with("mlp.fc2.weight") || spec.name.ends_with("xattn.proj.weight") {
                let s = std::f32::consts::SQRT_2;
                values.iter_mut().for_each(|v| *v /= s);
            }
            let t = Tensor::from_vec(values, spec.shape.as_slice(), device)?;
            vars.push((spec.name.clone(), Var::from_tensor(&t)?));
        }
        Ok(Self { cfg, vars })
    }

    /// Rebuilds from named tensors (a saved probe), checking every name and shape.
    pub fn from_tensors(
        cfg: ProbeConfig,
        tensors: &std::collections::HashMap<String, Tensor>,
        device: &Device,
    ) -> Result<Self, ModelError> {
        cfg.check()?;
        let mut vars = Vec::new();
        for spec in cfg.specs() {
            let t = tensors
                .get(&spec.name)
                .ok_or_else(|| ModelError::MissingTensor(spec.name.clone()))?;
            if t.dims() != spec.shape.as_slice() {
                return Err(ModelError::TensorShape {
                    name: spec.name.clone(),
                    expected: spec.shape.clone(),
                    actual: t.dims().to_vec(),
                });
            }
            let t = t.to_dtype(DType::F32)?.to_device(device)?;
            vars.push((spec.name.clone(), Var::from_tensor(&t)?));
        }
        Ok(Self { cfg, vars })
    }

    /// The probe's shape.
    pub fn config(&self) -> &ProbeConfig {
        &self.cfg
    }

    /// Named parameters, for saving.
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        self.vars
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect()
    }

    fn get(&self, name: &str) -> Result<&Tensor, ModelError> {
        self.vars
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_tensor())
            .ok_or_else(|| ModelError::MissingTensor(name.to_string()))
    }

    fn linear(&self, prefix: &str) -> Result<Linear, ModelError> {
        Ok(Linear::new(
            self.get(&format!("{prefix}.weight"))?.clone(),
            Some(self.get(&format!("{prefix}.bias"))?.clone()),
        ))
    }

    fn norm(&self, prefix: &str) -> Result<LayerNorm, ModelError> {
        Ok(LayerNorm::new(
            self.get(&format!("{prefix}.weight"))?.clone(),
            self.get(&format!("{prefix}.bias"))?.clone(),
            PROBE_LN_EPS,
        ))
    }

    /// Tokens `[B, N, D]` → class logits `[B, classes]`.
    pub fn forward(&self, tokens: &Tensor) -> Result<Tensor, ModelError> {
        let (b, n, d) = tokens.dims3()?;
        if d != self.cfg.embed_dim {
            return Err(ModelError::Input(format!(
                "probe: tokens of width {d}, the probe reads {}",
                self.cfg.embed_dim
            )));
        }
        let blk = "pooler.cross_attention_block";
        let h = self.cfg.num_heads;
        let hd = d / h;
        let query = self.get("pooler.query_tokens")?;
        // Cross-attention: the query is not normalised; keys/values read LN1(x).
        let x = self.norm(&format!("{blk}.norm1"))?.forward(tokens)?;
        let kv = self.linear(&format!("{blk}.xattn.kv"))?.forward(&x)?;
        let kv = kv.reshape((b, n, 2, h, hd))?.permute((2, 0, 3, 1, 4))?;
        let k = kv.get(0)?.contiguous()?; // [B, h, N, hd]
        let v = kv.get(1)?.contiguous()?;
        let q = self
            .linear(&format!("{blk}.xattn.q"))?
            .forward(query)? // [1, 1, D]
            .reshape((1, h, 1, hd))?
            .broadcast_as((b, h, 1, hd))?
            .contiguous()?;
        let scores = (q.matmul(&k.t()?.contiguous()?)? * (1.0 / (hd as f64).sqrt()))?;
        let attn = softmax_last(&scores)?; // [B, h, 1, N]
        let y = attn.matmul(&v)?.transpose(1, 2)?.reshape((b, 1, d))?;
        // No output projection (spec §9: `proj` is not applied).
        let q = query.broadcast_add(&y)?;
        let hidden = self.linear(&format!("{blk}.mlp.fc1"))?;
        let z = self.norm(&format!("{blk}.norm2"))?.forward(&q)?;
        let z = match hidden.bias() {
            Some(bias) => kernels::bias_gelu(&hidden.matmul(&z)?, bias)?,
            None => hidden.matmul(&z)?.gelu_erf()?,
        };
        let z = self.linear(&format!("{blk}.mlp.fc2"))?.forward(&z)?;
        let pooled = (q + z)?.squeeze(1)?;
        self.linear("linear")?.forward(&pooled)
    }

    /// The probe as safetensors bytes (official names; the shape in the metadata as
    /// `probe.embed_dim`, `probe.num_heads`, `probe.num_classes`, `probe.mlp_ratio`).
    pub fn to_safetensors(&self) -> Result<Vec<u8>, ModelError> {
        let mut tensors = Vec::new();
        for (name, v) in &self.vars {
            tensors.push((
                name.clone(),
                crate::checkpoint::F32View::new(v.as_tensor())?,
            ));
        }
        let meta = std::collections::HashMap::from([
            (
                "probe.embed_dim".to_string(),
                self.cfg.embed_dim.to_string(),
            ),
            (
                "probe.num_heads".to_string(),
                self.cfg.num_heads.to_string(),
            ),
            (
                "probe.num_classes".to_string(),
                self.cfg.num_classes.to_string(),
            ),
            (
                "probe.mlp_ratio".to_string(),
                self.cfg.mlp_ratio.to_string(),
            ),
        ]);
        crate::checkpoint::serialize(tensors, meta)
    }

    /// Class probabilities `[B, classes]` (softmax of the logits), for averaging over views.
    pub fn probabilities(&self, tokens: &Tensor) -> Result<Tensor, ModelError> {
        softmax_last(&self.forward(tokens)?)
    }
}

/// Softmax over the last dimension from differentiable ops (the shift by the row maximum is a
/// constant for the gradient, so it is detached).
fn softmax_last(x: &Tensor) -> Result<Tensor, ModelError> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

/// Mean cross-entropy of logits `[B, C]` against class indices.
pub fn cross_entropy(logits: &Tensor, labels: &[u32]) -> Result<Tensor, ModelError> {
    let (b, c) = logits.dims2()?;
    if labels.len() != b {
        return Err(ModelError::Input(format!(
            "{} labels for {b} logits",
            labels.len()
        )));
    }
    if let Some(bad) = labels.iter().find(|&&l| l as usize >= c) {
        return Err(ModelError::Input(format!("label {bad} of {c} classes")));
    }
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let log_z = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let log_p = shifted.broadcast_sub(&log_z)?;
    let idx = Tensor::from_vec(labels.to_vec(), (b, 1), logits.device())?;
    let picked = log_p.gather(&idx, 1)?;
    Ok((picked.mean_all()? * -1.0)?)
}

/// A probe with its optimiser: one call per batch of (tokens, labels).
pub struct ProbeTrainer {
    probe: AttentiveProbe,
    opt: AdamW,
    optim: ProbeOptim,
    steps_done: u64,
}

/// What one probe step did.
#[derive(Clone, Debug, PartialEq)]
pub struct ProbeStep {
    /// 1-based step just taken.
    pub step: u64,
    /// Mean cross-entropy of the batch.
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Weight decay used.
    pub weight_decay: f64,
    /// Total gradient norm before clipping.
    pub grad_norm: f64,
    /// Items of the batch whose highest logit (before the update) is their label: the train
    /// accuracy the official evaluation logs.
    pub correct: usize,
}

/// Items of a `[B, C]` batch of logits whose argmax is their label.
pub(crate) fn correct_of(logits: &Tensor, labels: &[u32]) -> Result<usize, ModelError> {
    let predicted = logits
        .argmax(candle_core::D::Minus1)?
        .to_dtype(candle_core::DType::U32)?
        .to_vec1::<u32>()?;
    Ok(predicted.iter().zip(labels).filter(|(p, l)| p == l).count())
}

impl ProbeTrainer {
    /// Trains `probe` with `optim` (groups as in pretraining: biases and 1-D tensors undecayed).
    pub fn new(probe: AttentiveProbe, optim: ProbeOptim) -> Result<Self, ModelError> {
        let opt = optimiser(
            probe
                .vars
                .iter()
                .map(|(n, v)| (n.clone(), v.as_tensor().clone())),
            &optim,
        )?;
        Ok(Self {
            probe,
            opt,
            optim,
            steps_done: 0,
        })
    }

    /// The probe being trained.
    pub fn probe(&self) -> &AttentiveProbe {
        &self.probe
    }

    /// Ends training, keeping the probe.
    pub fn into_probe(self) -> AttentiveProbe {
        self.probe
    }

    /// What training continues from after a stop (the probe, its AdamW moments and step
    /// counts), as safetensors bytes with the caller's `meta` beside.
    pub fn save_state(
        &self,
        meta: std::collections::HashMap<String, String>,
    ) -> Result<Vec<u8>, ModelError> {
        crate::train_state::write(&[("head", &self.opt)], self.steps_done, meta)
    }

    /// Continues from [`Self::save_state`]'s bytes (a probe of the same shape); returns their
    /// metadata. Nothing changes when they do not fit.
    pub fn restore_state(
        &mut self,
        bytes: &[u8],
    ) -> Result<std::collections::HashMap<String, String>, ModelError> {
        let (steps, meta) = crate::train_state::read(bytes, &mut [("head", &mut self.opt)])?;
        self.steps_done = steps;
        Ok(meta)
    }

    /// One AdamW step on cross-entropy; schedules at the 1-based step (as the official loop
    /// steps its schedulers before the update). A non-finite loss leaves the probe unchanged.
    pub fn step(&mut self, tokens: &Tensor, labels: &[u32]) -> Result<ProbeStep, ModelError> {
        let logits = self.probe.forward(tokens)?;
        let correct = correct_of(&logits, labels)?;
        let loss = cross_entropy(&logits, labels)?;
        let mut s = optimise(
            &loss,
            self.steps_done + 1,
            &self.optim,
            &mut [(&mut self.opt, 1.0)],
            None,
        )?;
        self.steps_done = s.step;
        s.correct = correct;
        Ok(s)
    }
}

/// A fresh AdamW (torch defaults) over `params`, grouped as in pretraining (biases and 1-D
/// tensors undecayed). Tensors that are already variables are optimised in place.
pub(crate) fn optimiser(
    params: impl Iterator<Item = (String, Tensor)>,
    optim: &ProbeOptim,
) -> Result<AdamW, ModelError> {
    let params = params
        .map(|(n, t)| {
            let group = ParamGroup::classify(false, &n, t.dims().len());
            Ok((n, Var::from_tensor(&t)?, group))
        })
        .collect::<Result<Vec<_>, ModelError>>()?;
    let c = optim.schedule();
    AdamW::new(params, c.betas, c.eps)
}

/// The update shared by the probe and fine-tuning: schedules at the 1-based `step`, one
/// gradient norm over every optimiser's parameters (clipped together, as `clip_grad_norm_` over
/// all of them), then each AdamW with the scheduled lr times its scale. A non-finite loss is an
/// error and changes nothing. `side` holds the gradients fused blocks found
/// ([`crate::fused_block`]); they join the backward pass's before the norm.
pub(crate) fn optimise(
    loss: &Tensor,
    step: u64,
    optim: &ProbeOptim,
    opts: &mut [(&mut AdamW, f64)],
    side: Option<&crate::side_grads::SideGrads>,
) -> Result<ProbeStep, ModelError> {
    let c = optim.schedule();
    let lr = schedule::lr(&c, step);
    let wd = schedule::weight_decay(&c, step);
    // The backward pass is queued before the loss is read: on a GPU the read then waits for
    // the whole pass instead of stalling the host between forward and backward.
    let mut grads: GradStore = loss.backward()?;
    let loss_value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    if !loss_value.is_finite() {
        return Err(ModelError::NonFiniteLoss {
            step,
            loss: loss_value,
        });
    }
    if let Some(side) = side {
        side.merge_into(&mut grads)?;
    }
    let mut sq = 0.0;
    for (opt, _) in opts.iter() {
        sq += optim::grad_sq_sum(&grads, opt.params().iter().map(|p| &p.var))?;
    }
    let norm = sq.sqrt();
    if let Some(max) = c.clip_grad {
        let vars = opts
            .iter()
            .flat_map(|(opt, _)| opt.params().iter().map(|p| &p.var));
        optim::clip_grads(&mut grads, vars, norm, max)?;
    }
    for (opt, scale) in opts.iter_mut() {
        opt.step(&grads, lr * *scale, wd)?;
    }
    Ok(ProbeStep {
        step,
        loss: loss_value,
        lr,
        weight_decay: wd,
        grad_norm: norm,
        correct: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn correct_counts_the_argmax_hits() {
        let logits = Tensor::from_vec(
            vec![0.1f32, 0.9, 0.0, 0.8, 0.2, 0.0, 0.1, 0.2, 0.7],
            (3, 3),
            &Device::Cpu,
        )
        .unwrap();
        assert_eq!(correct_of(&logits, &[1, 1, 2]).unwrap(), 2);
        assert_eq!(correct_of(&logits, &[0, 0, 0]).unwrap(), 1);
    }

    fn cfg(classes: usize) -> ProbeConfig {
        ProbeConfig {
            embed_dim: 16,
            num_heads: 4,
            num_classes: classes,
            mlp_ratio: 4.0,
        }
    }

    #[test]
    fn shapes_names_and_init() {
        let p = AttentiveProbe::new(cfg(5), 1, &Device::Cpu).unwrap();
        let names: Vec<String> = p.tensors().into_iter().map(|(n, _)| n).collect();
        assert!(names.contains(&"pooler.query_tokens".to_string()));
        assert!(names.contains(&"pooler.cross_attention_block.xattn.proj.weight".to_string()));
        assert!(names.contains(&"linear.bias".to_string()));
        let x = Tensor::randn(0f32, 1.0, (3, 7, 16), &Device::Cpu).unwrap();
        let logits = p.forward(&x).unwrap();
        assert_eq!(logits.dims(), &[3, 5]);
        let probs = p.probabilities(&x).unwrap().sum(1).unwrap();
        for s in probs.to_vec1::<f32>().unwrap() {
            assert!((s - 1.0).abs() < 1e-5);
        }
        // The classifier's default init is bounded by 1/sqrt(D).
        let w = p.get("linear.weight").unwrap().flatten_all().unwrap();
        let max = w.abs().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(max <= 0.25, "{max}");
    }

    #[test]
    fn saves_and_loads() {
        let p = AttentiveProbe::new(cfg(4), 5, &Device::Cpu).unwrap();
        let bytes = p.to_safetensors().unwrap();
        let loaded = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).unwrap();
        let back = AttentiveProbe::from_tensors(cfg(4), &loaded, &Device::Cpu).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 3, 16), &Device::Cpu).unwrap();
        assert_eq!(
            p.forward(&x).unwrap().to_vec2::<f32>().unwrap(),
            back.forward(&x).unwrap().to_vec2::<f32>().unwrap()
        );
    }

    #[test]
    fn proj_is_not_applied() {
        let mut p = AttentiveProbe::new(cfg(3), 2, &Device::Cpu).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 5, 16), &Device::Cpu).unwrap();
        let before = p.forward(&x).unwrap().to_vec2::<f32>().unwrap();
        for (n, v) in &mut p.vars {
            if n.contains("xattn.proj") {
                *v = Var::from_tensor(&(v.as_tensor() * 100.0).unwrap()).unwrap();
            }
        }
        assert_eq!(p.forward(&x).unwrap().to_vec2::<f32>().unwrap(), before);
    }

    #[test]
    fn cross_entropy_matches_the_formula() {
        let logits = Tensor::new(&[[1.0f32, 2.0, 0.5], [0.0, -1.0, 3.0]], &Device::Cpu).unwrap();
        let got = cross_entropy(&logits, &[1, 2])
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let lse = |r: [f64; 3]| r.iter().map(|v| v.exp()).sum::<f64>().ln();
        let want = ((lse([1.0, 2.0, 0.5]) - 2.0) + (lse([0.0, -1.0, 3.0]) - 3.0)) / 2.0;
        assert!((got as f64 - want).abs() < 1e-5, "{got} vs {want}");
        assert!(cross_entropy(&logits, &[3, 0]).is_err());
    }

    /// Stopped after two steps and continued from the saved state in a trainer built afresh,
    /// the probe ends where an uninterrupted run does, to the bit; a state of another shape is
    /// refused and changes nothing.
    #[test]
    fn continues_from_a_saved_state() {
        let dev = Device::Cpu;
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let batches: Vec<(Tensor, Vec<u32>)> = (0..6)
            .map(|_| {
                let data: Vec<f32> = (0..4 * 5 * 16)
                    .map(|_| rng.random_range(-1.0f32..1.0))
                    .collect();
                let labels = (0..4).map(|_| rng.random_range(0..3u32)).collect();
                (Tensor::from_vec(data, (4, 5, 16), &dev).unwrap(), labels)
            })
            .collect();
        let fresh = || {
            ProbeTrainer::new(
                AttentiveProbe::new(cfg(3), 1, &dev).unwrap(),
                ProbeOptim::video(6),
            )
            .unwrap()
        };
        let values = |t: &ProbeTrainer| {
            t.probe()
                .tensors()
                .into_iter()
                .map(|(_, t)| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
                .collect::<Vec<_>>()
        };
        let mut whole = fresh();
        for (x, y) in &batches {
            whole.step(x, y).unwrap();
        }
        let mut first = fresh();
        for (x, y) in &batches[..2] {
            first.step(x, y).unwrap();
        }
        let bytes = first.save_state(Default::default()).unwrap();
        let mut resumed = fresh();
        resumed.restore_state(&bytes).unwrap();
        for (x, y) in &batches[2..] {
            resumed.step(x, y).unwrap();
        }
        assert_eq!(values(&resumed), values(&whole));
        let mut other = ProbeTrainer::new(
            AttentiveProbe::new(cfg(4), 1, &dev).unwrap(),
            ProbeOptim::video(6),
        )
        .unwrap();
        let before = values(&other);
        assert!(other.restore_state(&bytes).is_err());
        assert_eq!(values(&other), before);
    }

    /// The probe learns a task that needs attention over tokens: the class is which of a few
    /// fixed directions is hidden in one random token among noise tokens.
    #[test]
    fn learns_a_token_task() {
        let dev = Device::Cpu;
        let classes = 3;
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let dirs: Vec<Vec<f32>> = (0..classes)
            .map(|_| {
                (0..16)
                    .map(|_| rng.random_range(-1.0f32..1.0) * 2.0)
                    .collect()
            })
            .collect();
        let mut batch = |n: usize| {
            let mut data = Vec::new();
            let mut labels = Vec::new();
            for _ in 0..n {
                let label = rng.random_range(0..classes);
                let at = rng.random_range(0..6);
                for t in 0..6 {
                    for d in &dirs[label] {
                        let noise = rng.random_range(-0.3f32..0.3);
                        data.push(if t == at { d + noise } else { noise });
                    }
                }
                labels.push(label as u32);
            }
            (Tensor::from_vec(data, (n, 6, 16), &dev).unwrap(), labels)
        };
        let probe = AttentiveProbe::new(cfg(classes), 3, &dev).unwrap();
        let mut optim = ProbeOptim::video(150);
        optim.lr = 3e-3;
        let mut trainer = ProbeTrainer::new(probe, optim).unwrap();
        let mut first = None;
        for _ in 0..150 {
            let (x, y) = batch(16);
            let s = trainer.step(&x, &y).unwrap();
            first.get_or_insert(s.loss);
        }
        let (x, y) = batch(200);
        let pred = trainer
            .probe()
            .forward(&x)
            .unwrap()
            .argmax(1)
            .unwrap()
            .to_vec1::<u32>()
            .unwrap();
        let correct = pred.iter().zip(&y).filter(|(a, b)| a == b).count();
        assert!(correct >= 180, "{correct}/200 correct");
    }
}
