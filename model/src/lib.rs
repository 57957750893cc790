//! candle V-JEPA (v1): video ViT encoder, predictor, EMA target encoder, L1 feature loss, AdamW
//! with the official parameter groups and schedules, and safetensors checkpoints.
//!
//! The spec (`VJEPA-SPEC.md` §2–§8, §12) is the source of truth; names of parameters equal the
//! official state-dict keys so checkpoints can be compared with the PyTorch ones.
//! `objective: pixel` ([`pixel`]) trains the same encoder by pixel reconstruction instead, for
//! the paper's feature-vs-pixel comparison; [`Pretrainer`] drives either.
//! The training hot path (attention, LayerNorm, bias + GELU, AdamW, EMA) runs on the fused kernels
//! of [`kernels`], each with a hand-written backward; the rest uses candle ops with autograd.

#![warn(missing_docs)]

mod checkpoint;
pub mod checkpointing;
pub mod collapse;
pub mod config;
pub mod device;
pub mod finetune;
pub mod fused_block;
mod introspect;
pub mod kernels;
pub mod layers;
pub mod loss;
pub mod optim;
pub mod params;
pub mod pixel;
pub mod pos_embed;
pub mod predictor;
mod pretrainer;
pub mod probe;
pub mod pth;
pub mod schedule;
pub mod side_grads;
pub mod staging;
mod target_lane;
pub mod tokens;
pub mod train_state;
pub mod vit;

use std::collections::{BTreeMap, HashMap};

use candle_core::Var;
pub use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use tracing::{debug, info};

pub use config::{EncoderConfig, Objective, OptimConfig, PixelConfig, PredictorConfig};
pub use device::ComputeDevice;
pub use introspect::ForwardDetail;
use optim::{AdamW, OptParam, ParamGroup};
use params::{InitRng, ParamMap, ParamSpec};
pub use pixel::PixelMae;
use predictor::Predictor;
pub use pretrainer::Pretrainer;
pub use pth::{ModelConfigs, PthExport, PthInfo, encoder_from_pth};
pub use staging::ClipStager;
use tokens::TokenIndex;
use vit::Encoder;

/// Errors of the model crate.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A tensor operation failed (shape/dtype/device mismatch inside candle).
    #[error("candle: {0}")]
    Candle(candle_core::Error),
    /// A configuration can't be built.
    #[error("invalid config: {0}")]
    Config(String),
    /// A batch, clip or index tensor doesn't fit the model.
    #[error("invalid input: {0}")]
    Input(String),
    /// A valid request this port doesn't implement.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A named tensor is absent from a checkpoint or parameter map.
    #[error("missing tensor `{0}`")]
    MissingTensor(String),
    /// A named tensor has the wrong shape.
    #[error("tensor `{name}` has shape {actual:?}, expected {expected:?}")]
    TensorShape {
        /// Tensor name.
        name: String,
        /// Shape the model needs.
        expected: Vec<usize>,
        /// Shape found.
        actual: Vec<usize>,
    },
    /// Checkpoint metadata or dtype problem.
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    /// safetensors encoding/decoding failed.
    #[error("safetensors: {0}")]
    SafeTensors(safetensors::SafeTensorError),
    /// The loss was NaN/Inf; the step was not applied (the official code asserts here).
    #[error("non-finite loss {loss} at step {step}")]
    NonFiniteLoss {
        /// 1-based step that failed.
        step: u64,
        /// The loss value.
        loss: f64,
    },
}

// The messages above carry the inner error's text, so it is not also their `source()`: an
// error chain (`{:#}`) would print it twice ("header too large: header too large").
impl From<candle_core::Error> for ModelError {
    fn from(e: candle_core::Error) -> Self {
        ModelError::Candle(e)
    }
}

impl From<safetensors::SafeTensorError> for ModelError {
    fn from(e: safetensors::SafeTensorError) -> Self {
        ModelError::SafeTensors(e)
    }
}

/// Index tensors for one mask config: u32 `[B, K]` flat token indices (sorted ascending per row).
#[derive(Clone, Debug)]
pub struct MaskIndices {
    /// Tokens the context encoder sees.
    pub context: Tensor,
    /// Tokens the predictor must predict.
    pub target: Tensor,
}

/// One training batch: normalised clips and one [`MaskIndices`] per mask config (predictor mask
/// token i is used for `masks[i]`).
#[derive(Clone, Debug)]
pub struct TrainBatch {
    /// f32 `[B, 3, T, S, S]` on the configured grid (`[B, 3, S, S]` also accepted in image mode).
    pub clips: Tensor,
    /// One entry per mask config; must equal the predictor's `num_mask_tokens`.
    pub masks: Vec<MaskIndices>,
}

/// What a step reads back from the device: the collapse signals, the loss, the per-mask
/// losses and the per-module sums of squared gradients.
pub(crate) struct StepScalars {
    pub collapse: collapse::Signals,
    pub loss: f64,
    pub per_mask: Vec<f64>,
    pub grad_sq: Vec<f64>,
}

/// Reads the collapse terms of `h`, the loss, the per-mask losses and the gradient sums `sq`
/// in one device-to-host copy (one host sync on a GPU, after the step's backward pass and the
/// norms are queued), running `meanwhile` on the host just before waiting for it; a non-finite
/// loss of step `step` is an error (nothing has changed yet).
pub(crate) fn read_step_scalars(
    h: &Tensor,
    loss: &Tensor,
    per_mask: &[Tensor],
    sq: optim::QueuedSums,
    step: u64,
    meanwhile: impl FnOnce(),
) -> Result<StepScalars, ModelError> {
    let mut parts = Vec::with_capacity(3 + per_mask.len());
    parts.push(collapse::terms(h)?.to_dtype(DType::F64)?);
    for l in std::iter::once(loss).chain(per_mask) {
        parts.push(l.to_dtype(DType::F64)?.reshape(1)?);
    }
    let (known_sq, queued_sq) = match sq {
        optim::QueuedSums::Host(v) => (Some(v), 0),
        optim::QueuedSums::Device(t) => {
            let n = t.elem_count();
            parts.push(t.to_dtype(DType::F64)?);
            (None, n)
        }
    };
    let values = Tensor::cat(&parts, 0)?;
    meanwhile();
    let values = values.to_vec1::<f64>()?;
    let loss = values[3];
    if !loss.is_finite() {
        return Err(ModelError::NonFiniteLoss { step, loss });
    }
    let losses_end = values.len() - queued_sq;
    Ok(StepScalars {
        collapse: collapse::Signals::from_terms(&values[..3]),
        loss,
        per_mask: values[4..losses_end].to_vec(),
        grad_sq: known_sq.unwrap_or_else(|| values[losses_end..].to_vec()),
    })
}

/// The per-module sums of squared gradients of `grads` that [`optimiser_step`] clips with
/// (the first `num_encoder_params` parameters of `opt`, then the rest), queued on the device.
fn queue_grad_sq_sums(
    opt: &AdamW,
    num_encoder_params: usize,
    grads: &candle_core::backprop::GradStore,
) -> Result<optim::QueuedSums, ModelError> {
    let (enc, rest) = opt.params().split_at(num_encoder_params);
    let enc: Vec<&Var> = enc.iter().map(|p| &p.var).collect();
    let rest: Vec<&Var> = rest.iter().map(|p| &p.var).collect();
    optim::grad_sq_sums_queued(grads, &[&enc, &rest])
}

/// Metrics of one training step (for logs and the CSV of spec §10).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepStats {
    /// 1-based step just taken.
    pub step: u64,
    /// Loss averaged over mask configs.
    pub loss: f64,
    /// Loss of each mask config.
    pub loss_per_mask: Vec<f64>,
    /// LR used.
    pub lr: f64,
    /// Weight decay used for the decayed groups.
    pub weight_decay: f64,
    /// EMA momentum used for the target update.
    pub ema_momentum: f64,
    /// Pre-clip total grad norm of the encoder.
    pub encoder_grad_norm: f64,
    /// Pre-clip total grad norm of the predictor.
    pub predictor_grad_norm: f64,
    /// Context tokens per sample, per mask config.
    pub context_tokens: Vec<usize>,
    /// Target tokens per sample, per mask config.
    pub target_tokens: Vec<usize>,
    /// Collapse signal: std of the (normalised) target features across the batch, averaged
    /// over tokens and dims. Near 0 when every clip maps to the same features; 0 for a batch
    /// of one clip.
    pub target_std: f64,
    /// Dimensional-collapse signal: effective rank ([`collapse::effective_rank`]) of the
    /// normalised target token features of the batch. Near 1 when they vary along one direction
    /// only, although `target_std` may look healthy.
    #[serde(default)]
    pub target_rank: f64,
}

/// One worker's half of a training step ([`VJepa::compute_gradients`]): the gradient of its
/// samples' mean loss plus what the step reports. Data-parallel training replaces the gradient
/// and the loss parts by the all-worker values before [`VJepa::apply_gradients`].
pub struct Gradients {
    grads: candle_core::backprop::GradStore,
    /// Per module (encoder, rest), the sum of squared entries of `grads`, when read with the
    /// loss; `None` once `grads` is replaced (the update then computes it).
    grad_sq: Option<Vec<f64>>,
    /// Mean loss over this worker's samples (averaged over mask configs).
    pub loss: f64,
    /// Loss of each mask config over this worker's samples.
    pub loss_per_mask: Vec<f64>,
    /// Samples the gradient was computed on (the weight of this worker in the average).
    pub samples: usize,
    /// Context tokens per sample, per mask config.
    pub context_tokens: Vec<usize>,
    /// Target tokens per sample, per mask config.
    pub target_tokens: Vec<usize>,
    /// [`StepStats::target_std`] over this worker's samples.
    pub target_std: f64,
    /// [`StepStats::target_rank`] over this worker's samples.
    pub target_rank: f64,
    /// Per sample (batch order), the target encoder's output averaged over tokens (before the
    /// loss LayerNorm): the clip's embedding, as `vjepa extract` gives it, free from the target
    /// pass the loss needs anyway. Empty unless asked for ([`VJepa::set_pool_features`]).
    pub target_embeddings: Vec<Vec<f32>>,
}

/// A gradient in the flat layout of [`VJepa::flatten_gradients`], for exchange between workers.
#[derive(Clone, Debug, PartialEq)]
pub struct FlatGradients {
    /// Every parameter's gradient elements, in optimiser order.
    pub values: Vec<f32>,
    /// Per parameter (optimiser order): whether it has a gradient (AdamW skips the others).
    pub present: Vec<bool>,
}

/// FNV-style 64-bit hash over 32-bit words, finished with splitmix64 (fast and stable across
/// machines; not cryptographic: it detects divergence, not tampering).
struct Digest(u64);

impl Digest {
    fn new() -> Self {
        Digest(0xcbf2_9ce4_8422_2325)
    }
    fn word(&mut self, w: u64) {
        self.0 = (self.0 ^ w)
            .wrapping_mul(0x0000_0100_0000_01b3)
            .rotate_left(29);
    }
    fn tensor(&mut self, t: &Tensor) -> Result<(), ModelError> {
        let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        self.word(v.len() as u64);
        for pair in v.chunks(2) {
            let lo = u64::from(pair[0].to_bits());
            let hi = pair.get(1).map_or(0, |x| u64::from(x.to_bits()));
            self.word(lo | (hi << 32));
        }
        Ok(())
    }
    /// Every trainable parameter, its AdamW moments and step count.
    fn optimiser(&mut self, opt: &AdamW) -> Result<(), ModelError> {
        for p in opt.params() {
            self.tensor(p.var.as_tensor())?;
            self.tensor(&p.state)?;
            self.word(p.step);
        }
        Ok(())
    }
    fn finish(&self) -> u64 {
        let mut z = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// Trainable parameter counts (encoder, predictor) from shapes alone — no allocation, so it
/// works for ViT-H/G on small machines.
pub fn trainable_param_counts(
    encoder: &EncoderConfig,
    predictor: &PredictorConfig,
) -> (usize, usize) {
    let count = |specs: Vec<ParamSpec>| specs.iter().map(ParamSpec::numel).sum();
    (
        count(Encoder::param_specs(encoder)),
        count(Predictor::param_specs(encoder, predictor)),
    )
}

const FORMAT: &str = "vjepa-stream.vjepa-v1";

/// Tensors that make up a model, before they become modules (shared by `new` and loading).
struct Parts {
    encoder: Vec<(String, Tensor)>,
    predictor: Vec<(String, Tensor)>,
    target: Vec<(String, Tensor)>,
    encoder_pos: Tensor,
    predictor_pos: Tensor,
    target_pos: Tensor,
    /// (exp_avg, exp_avg_sq, step) for encoder params then predictor params.
    opt_state: Option<Vec<(Tensor, Tensor, u64)>>,
}

/// The V-JEPA model under training: encoder, predictor, EMA target encoder and AdamW state.
pub struct VJepa {
    enc_cfg: EncoderConfig,
    pred_cfg: PredictorConfig,
    optim_cfg: OptimConfig,
    seed: u64,
    device: Device,
    encoder: Encoder,
    predictor: Predictor,
    target: Encoder,
    /// Target weights by local name (spec order), shared with `target`; the EMA update writes
    /// into them in place.
    target_params: Vec<(String, Tensor)>,
    /// Owns the trainable Vars: encoder params first (`encoder.*`), then predictor (`predictor.*`).
    opt: AdamW,
    num_encoder_params: usize,
    steps_done: u64,
    /// Whether [`Self::compute_gradients`] returns the mean-pooled target features (off by
    /// default: pooling and copying them to the host every step is wasted work, and on a GPU a
    /// host synchronisation, unless a run writes `features.parquet`).
    pool_features: bool,
    /// dtype of the training forward/backward ([`Self::set_compute_dtype`]); the master weights
    /// and the optimiser stay f32.
    compute_dtype: DType,
    /// Whether the encoder and predictor blocks recompute their activations in the backward
    /// pass ([`Self::set_activation_checkpointing`]).
    checkpointing: bool,
    /// Whether training runs the blocks as fused ops with their own backward pass
    /// ([`Self::set_fused_blocks`]; on by default).
    fused_blocks: bool,
    /// Whether a mixed-precision model keeps its compute copies of the weights
    /// ([`Self::set_keep_weight_copies`]; on by default).
    keep_copies: bool,
    /// The kept compute copies, present while `compute_dtype` is not f32 and `keep_copies`.
    copies: Option<WeightCopies>,
    /// The thread the target pass runs on, when it has one ([`Self::set_target_stream`]).
    target_lane: Option<target_lane::TargetLane>,
}

/// Mixed precision with kept compute weights: `compute_dtype` copies of every trainable and
/// target weight, and the three networks built on them once. The optimiser and the EMA rewrite
/// each copy as they update its f32 master (on a GPU in the same kernel pass), so a step runs on
/// them as they are, instead of casting the whole model at its start (issue 10: per step and
/// parameter, the 6 bytes of each forward cast and the 6 of each gradient cast back, against 2
/// written by the update, and a thousand launches fewer at ViT-L), with the same numbers: each
/// copy holds exactly the cast of its master, and the gradients land on the copies in the
/// compute dtype, as they reach a cast's input, and are widened only where the update reads them.
struct WeightCopies {
    /// One per trainable parameter, in optimiser order: the leaves the step differentiates.
    trainable: Vec<Var>,
    /// One per target-encoder parameter, in `target_params` order (Vars only to be written in
    /// place; the target network holds detached views of them, so it records no graph).
    target: Vec<Var>,
    encoder: Encoder,
    predictor: Predictor,
    target_net: Encoder,
}

impl VJepa {
    /// Fresh model with the spec's effective init (§3 "Weight init"): Linear and patch weights
    /// N(0, 0.02²), biases 0, LayerNorm (1, 0), mask tokens 0, sin-cos pos tables; the target
    /// encoder is a copy of the encoder. Deterministic in `seed` (ChaCha8 stream, encoder then
    /// predictor, in registration order).
    pub fn new(
        encoder: EncoderConfig,
        predictor: PredictorConfig,
        optim: OptimConfig,
        seed: u64,
        device: &Device,
    ) -> Result<Self, ModelError> {
        Self::validate_configs(&encoder, &predictor, &optim)?;
        let mut rng = InitRng::new(seed)?;
        let mut enc = Vec::new();
        let mut target = Vec::new();
        for spec in Encoder::param_specs(&encoder) {
            let values = rng.values(&spec);
            target.push((
                spec.name.clone(),
                Tensor::from_vec(values.clone(), spec.shape.as_slice(), device)?,
            ));
            enc.push((
                spec.name,
                Tensor::from_vec(values, spec.shape.as_slice(), device)?,
            ));
        }
        let mut pred = Vec::new();
        for spec in Predictor::param_specs(&encoder, &predictor) {
            let values = rng.values(&spec);
            pred.push((
                spec.name,
                Tensor::from_vec(values, spec.shape.as_slice(), device)?,
            ));
        }
        let (grid, layout) = (encoder.grid(), encoder.table_layout());
        let encoder_pos = pos_embed::sincos_table_tensor(encoder.embed_dim, grid, layout, device)?;
        let predictor_pos =
            pos_embed::sincos_table_tensor(predictor.embed_dim, grid, layout, device)?;
        let parts = Parts {
            encoder: enc,
            predictor: pred,
            target,
            target_pos: encoder_pos.copy()?,
            encoder_pos,
            predictor_pos,
            opt_state: None,
        };
        let model = Self::assemble(encoder, predictor, optim, seed, device, parts, 0)?;
        let (ne, np) = model.num_trainable_params();
        info!(
            encoder_params = ne,
            predictor_params = np,
            seed,
            "built V-JEPA model"
        );
        Ok(model)
    }

    fn validate_configs(
        enc: &EncoderConfig,
        pred: &PredictorConfig,
        optim: &OptimConfig,
    ) -> Result<(), ModelError> {
        enc.validate()?;
        pred.validate(enc)?;
        optim.validate()
    }

    fn assemble(
        enc_cfg: EncoderConfig,
        pred_cfg: PredictorConfig,
        optim_cfg: OptimConfig,
        seed: u64,
        device: &Device,
        parts: Parts,
        steps_done: u64,
    ) -> Result<Self, ModelError> {
        let mut named_vars = Vec::new();
        let mut enc_map = ParamMap::new();
        for (name, t) in parts.encoder {
            let var = Var::from_tensor(&t)?;
            enc_map.insert(name.clone(), var.as_tensor().clone());
            let group = ParamGroup::classify(false, &name, t.rank());
            named_vars.push((format!("encoder.{name}"), var, group));
        }
        let num_encoder_params = named_vars.len();
        let mut pred_map = ParamMap::new();
        for (name, t) in parts.predictor {
            let var = Var::from_tensor(&t)?;
            pred_map.insert(name.clone(), var.as_tensor().clone());
            let group = ParamGroup::classify(true, &name, t.rank());
            named_vars.push((format!("predictor.{name}"), var, group));
        }
        let mut tgt_map = ParamMap::new();
        for (name, t) in &parts.target {
            tgt_map.insert(name.clone(), t.clone());
        }
        let encoder = Encoder::load(&enc_cfg, &enc_map, parts.encoder_pos)?;
        let predictor = Predictor::load(&enc_cfg, &pred_cfg, &pred_map, parts.predictor_pos)?;
        let target = Encoder::load(&enc_cfg, &tgt_map, parts.target_pos)?;
        let opt = build_optimiser(named_vars, parts.opt_state, &optim_cfg)?;
        Ok(Self {
            enc_cfg,
            pred_cfg,
            optim_cfg,
            seed,
            device: device.clone(),
            encoder,
            predictor,
            target,
            target_params: parts.target,
            opt,
            num_encoder_params,
            steps_done,
            pool_features: false,
            checkpointing: false,
            fused_blocks: true,
            compute_dtype: DType::F32,
            keep_copies: true,
            copies: None,
            target_lane: None,
        })
    }

    /// Mixed precision: with `BF16`, each training step runs the three networks on bf16 copies
    /// of the f32 weights (kept by the model and rewritten by each update, see
    /// [`Self::set_keep_weight_copies`]), with bf16 activations and fp32 math inside the
    /// kernels — what torch's bf16 autocast does in the official trainer. The targets'
    /// LayerNorm, the loss, the gradient norms, AdamW and the EMA stay f32. `F32` (the default)
    /// is the exact path.
    pub fn set_compute_dtype(&mut self, dtype: DType) -> Result<(), ModelError> {
        match dtype {
            DType::F32 | DType::BF16 => {
                self.compute_dtype = dtype;
                self.refresh_copies()
            }
            other => Err(ModelError::Unsupported(format!(
                "compute dtype {other:?} (f32 or bf16)"
            ))),
        }
    }

    /// Mixed precision only: keep compute-dtype copies of the weights that the optimiser and the
    /// EMA update in place (on, the default), or cast the f32 weights inside each step's graph
    /// (off). Both give the same numbers; the kept copies save the casts' memory traffic and
    /// launches. (Issue 10's A/B switch: `train-step --cast-weights` times the other way.)
    pub fn set_keep_weight_copies(&mut self, on: bool) -> Result<(), ModelError> {
        if self.keep_copies == on {
            return Ok(());
        }
        self.keep_copies = on;
        self.refresh_copies()
    }

    /// Whether a mixed-precision step runs on kept copies of the weights.
    pub fn keeps_weight_copies(&self) -> bool {
        self.copies.is_some()
    }

    /// (Re)builds or drops the kept copies to match `compute_dtype` and `keep_copies`.
    fn refresh_copies(&mut self) -> Result<(), ModelError> {
        self.copies = None;
        if self.compute_dtype == DType::F32 || !self.keep_copies {
            return Ok(());
        }
        let dtype = self.compute_dtype;
        let copy = |t: &Tensor| -> Result<Var, ModelError> {
            Ok(Var::from_tensor(&t.detach().to_dtype(dtype)?)?)
        };
        let trainable = self
            .opt
            .params()
            .iter()
            .map(|p| copy(p.var.as_tensor()))
            .collect::<Result<Vec<_>, _>>()?;
        let target = self
            .target_params
            .iter()
            .map(|(_, t)| copy(t))
            .collect::<Result<Vec<_>, _>>()?;
        let (mut enc, mut pred) = (ParamMap::new(), ParamMap::new());
        for (p, c) in self.opt.params().iter().zip(&trainable) {
            if let Some(name) = p.name.strip_prefix("encoder.") {
                enc.insert(name, c.as_tensor().clone());
            } else if let Some(name) = p.name.strip_prefix("predictor.") {
                pred.insert(name, c.as_tensor().clone());
            }
        }
        let mut tgt = ParamMap::new();
        for ((name, _), c) in self.target_params.iter().zip(&target) {
            tgt.insert(name.clone(), c.as_tensor().detach());
        }
        let (encoder, predictor, target_net) = self.networks_on(&enc, &pred, &tgt, dtype)?;
        self.copies = Some(WeightCopies {
            trainable,
            target,
            encoder,
            predictor,
            target_net,
        });
        Ok(())
    }

    /// The dtype training steps compute in.
    pub fn compute_dtype(&self) -> DType {
        self.compute_dtype
    }

    /// The encoder, predictor and target encoder on `dtype` copies of their weights: the
    /// trainable ones cast from their Vars (so backward reaches the f32 Vars), the target's
    /// without a graph.
    fn cast_networks(&self, dtype: DType) -> Result<(Encoder, Predictor, Encoder), ModelError> {
        let mut enc = ParamMap::new();
        let mut pred = ParamMap::new();
        for p in self.opt.params() {
            let t = p.var.as_tensor().to_dtype(dtype)?;
            if let Some(name) = p.name.strip_prefix("encoder.") {
                enc.insert(name, t);
            } else if let Some(name) = p.name.strip_prefix("predictor.") {
                pred.insert(name, t);
            }
        }
        let mut tgt = ParamMap::new();
        for (name, t) in &self.target_params {
            tgt.insert(name.clone(), t.to_dtype(dtype)?);
        }
        self.networks_on(&enc, &pred, &tgt, dtype)
    }

    /// The encoder, predictor and target encoder on the given weights (local names), with
    /// their fixed position tables in `dtype`.
    fn networks_on(
        &self,
        enc: &ParamMap,
        pred: &ParamMap,
        tgt: &ParamMap,
        dtype: DType,
    ) -> Result<(Encoder, Predictor, Encoder), ModelError> {
        let encoder = Encoder::load(
            &self.enc_cfg,
            enc,
            self.encoder.pos_embed().to_dtype(dtype)?,
        )?;
        let predictor = Predictor::load(
            &self.enc_cfg,
            &self.pred_cfg,
            pred,
            self.predictor.pos_embed().to_dtype(dtype)?,
        )?;
        let target = Encoder::load(&self.enc_cfg, tgt, self.target.pos_embed().to_dtype(dtype)?)?;
        Ok((encoder, predictor, target))
    }

    /// Activation checkpointing (off by default): the encoder's and predictor's blocks keep only
    /// their inputs for the backward pass and recompute the rest there — about one more forward
    /// of both per step for most of their activation memory. Same gradients either way.
    pub fn set_activation_checkpointing(&mut self, on: bool) {
        self.checkpointing = on;
    }

    /// Training steps run each encoder and predictor block as one op with a written-out
    /// backward pass ([`crate::fused_block`]: on, the default), or record every op of it on
    /// candle's graph (off). The same gradients to the bit; the fused op saves candle's
    /// zero-fill-and-add of every gradient inside the block. With activation checkpointing the
    /// blocks recompute their inside, and this chooses how that recomputation is
    /// differentiated.
    pub fn set_fused_blocks(&mut self, on: bool) {
        self.fused_blocks = on;
    }

    /// Whether training steps run fused blocks.
    pub fn fused_blocks(&self) -> bool {
        self.fused_blocks
    }

    /// Runs each training step's target-encoder pass on a thread of its own (off by default;
    /// [`crate::target_lane`]): on a GPU its kernels then go to a second stream and run beside
    /// the two context passes, queued by a second host thread. The same losses and gradients to
    /// the bit. Peak memory grows by the target pass's working set (one block's activations),
    /// which then overlaps the context passes instead of preceding them.
    pub fn set_target_stream(&mut self, on: bool) -> Result<(), ModelError> {
        match (on, self.target_lane.is_some()) {
            (true, false) => self.target_lane = Some(target_lane::TargetLane::new(&self.device)?),
            (false, true) => self.target_lane = None,
            _ => {}
        }
        Ok(())
    }

    /// Whether the target pass runs on a thread (and, on a GPU, a stream) of its own.
    pub fn target_stream(&self) -> bool {
        self.target_lane.is_some()
    }

    /// Target passes handed to the current target lane so far (0 without one): a check that
    /// the lane is really taken.
    pub fn target_lane_passes(&self) -> usize {
        self.target_lane.as_ref().map_or(0, |l| l.jobs_run())
    }

    /// Whether activation checkpointing is on.
    pub fn activation_checkpointing(&self) -> bool {
        self.checkpointing
    }

    /// Makes [`Self::compute_gradients`] fill [`Gradients::target_embeddings`] (the target
    /// encoder's mean-pooled feature of each clip), which it leaves empty by default.
    pub fn set_pool_features(&mut self, on: bool) {
        self.pool_features = on;
    }

    /// Steps taken so far (the next step is `steps_done() + 1`).
    pub fn steps_done(&self) -> u64 {
        self.steps_done
    }

    /// Encoder shape.
    pub fn encoder_config(&self) -> &EncoderConfig {
        &self.enc_cfg
    }

    /// Predictor shape.
    pub fn predictor_config(&self) -> &PredictorConfig {
        &self.pred_cfg
    }

    /// Optimisation hyper-parameters.
    pub fn optim_config(&self) -> &OptimConfig {
        &self.optim_cfg
    }

    /// Init seed (kept in checkpoints for provenance).
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Device the model lives on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Number of trainable parameters (encoder, predictor), for logs and tests against §3/§4.
    pub fn num_trainable_params(&self) -> (usize, usize) {
        let params = self.opt.params();
        let (enc, pred) = params.split_at(self.num_encoder_params.min(params.len()));
        let count = |ps: &[OptParam]| ps.iter().map(|p| p.var.elem_count()).sum();
        (count(enc), count(pred))
    }

    /// Training input: clips on the configured token grid (see [`vit::check_clips`]), on the
    /// device, in f32 or already in the compute dtype (what [`ClipStager`] uploads: the step
    /// casts the clips to it first thing, so nothing is lost).
    fn prepare_clips(&self, clips: &Tensor) -> Result<(Tensor, usize), ModelError> {
        let b = vit::check_clips(&self.enc_cfg, clips)?;
        let clips = clips.to_device(&self.device)?;
        let clips = if clips.dtype() == self.compute_dtype {
            clips
        } else {
            clips.to_dtype(DType::F32)?
        };
        Ok((clips, b))
    }

    /// Feature-extraction input: any clip size the encoder can embed (its position table is
    /// resized to the clips' grid, spec §2).
    fn prepare_eval_clips(&self, clips: &Tensor) -> Result<Tensor, ModelError> {
        vit::clip_geometry(&self.enc_cfg, clips)?;
        Ok(clips.to_device(&self.device)?.to_dtype(DType::F32)?)
    }

    /// Target-encoder features `[B, N', D]` of full clips (no grad; after the encoder's final
    /// LayerNorm, without the loss's extra normalisation) — for extraction and evaluation. The
    /// clips may have another size than the training one (N' tokens of their own grid).
    pub fn target_features(&self, clips: &Tensor) -> Result<Tensor, ModelError> {
        let clips = self.prepare_eval_clips(clips)?;
        Ok(self.target.forward(&clips, None)?.detach())
    }

    /// The target encoder (the one evaluation reads, spec §9), e.g. to fine-tune a copy of it.
    pub fn target_encoder(&self) -> &Encoder {
        &self.target
    }

    /// Online-encoder features `[B, N', D]` of full clips (no grad), e.g. to compare with the
    /// target; other clip sizes as in [`Self::target_features`].
    pub fn encoder_features(&self, clips: &Tensor) -> Result<Tensor, ModelError> {
        let clips = self.prepare_eval_clips(clips)?;
        Ok(self.encoder.forward(&clips, None)?.detach())
    }

    fn mask_indices(
        &self,
        batch: &TrainBatch,
        b: usize,
    ) -> Result<Vec<(TokenIndex, TokenIndex)>, ModelError> {
        if batch.masks.len() != self.pred_cfg.num_mask_tokens {
            return Err(ModelError::Input(format!(
                "{} mask configs in the batch, the predictor has {} mask tokens",
                batch.masks.len(),
                self.pred_cfg.num_mask_tokens
            )));
        }
        let n = self.enc_cfg.num_tokens();
        batch
            .masks
            .iter()
            .enumerate()
            .map(|(i, m)| {
                Ok((
                    TokenIndex::new(&m.context, b, n, &format!("mask {i} context"), &self.device)?,
                    TokenIndex::new(&m.target, b, n, &format!("mask {i} target"), &self.device)?,
                ))
            })
            .collect()
    }

    /// Forward of one iteration: (total loss, per-mask losses), with the graph for backward.
    fn forward_loss(
        &self,
        clips: &Tensor,
        masks: &[(TokenIndex, TokenIndex)],
    ) -> Result<(Tensor, Vec<Tensor>), ModelError> {
        let (loss, per_mask, _, _) = self.forward_loss_stats(clips, masks, false, None)?;
        Ok((loss, per_mask))
    }

    /// [`Self::forward_loss`] plus the normalised target features `[B, N, D]` (for the collapse
    /// signals) and, with `pool`, the mean-pooled target features `[B, D]`, from the target
    /// pass the loss needs anyway.
    fn forward_loss_stats(
        &self,
        clips: &Tensor,
        masks: &[(TokenIndex, TokenIndex)],
        pool: bool,
        checkpoint: Option<&std::sync::Arc<side_grads::SideGrads>>,
    ) -> Result<(Tensor, Vec<Tensor>, Tensor, Option<Tensor>), ModelError> {
        let cast;
        let (encoder, predictor, target, clips) = match &self.copies {
            _ if self.compute_dtype == DType::F32 => {
                (&self.encoder, &self.predictor, &self.target, clips.clone())
            }
            Some(c) => (
                &c.encoder,
                &c.predictor,
                &c.target_net,
                clips.to_dtype(self.compute_dtype)?,
            ),
            None => {
                cast = self.cast_networks(self.compute_dtype)?;
                (
                    &cast.0,
                    &cast.1,
                    &cast.2,
                    clips.to_dtype(self.compute_dtype)?,
                )
            }
        };
        // Target branch: first, or on the lane beside the context passes (then its features
        // are gathered once the context passes are queued).
        // The clips are cut into tubelets once for both encoders.
        let patches = vit::Patches::new(&self.enc_cfg, &clips)?;
        let features = match &self.target_lane {
            Some(lane) => {
                let (target, patches) = (target.clone(), patches.clone());
                TargetFeatures::Pending(lane.run(&self.device, move || {
                    target_features(&target, &patches, pool)
                })?)
            }
            None => TargetFeatures::Ready(target_features(target, &patches, pool)?),
        };
        // The patch embedding is identical for both context passes: compute it once.
        let tokens = encoder.embed_patches(&patches)?;
        let mut preds = Vec::with_capacity(masks.len());
        let mut targets = Vec::with_capacity(masks.len());
        for (i, (ctx, tgt)) in masks.iter().enumerate() {
            let z = encoder.forward_tokens_with(&ctx.gather(&tokens)?, checkpoint)?;
            preds.push(
                predictor
                    .forward_with(&z, ctx, tgt, i, checkpoint)?
                    .to_dtype(DType::F32)?,
            );
            if let TargetFeatures::Ready((h, _)) = &features {
                targets.push(tgt.gather(h)?);
            }
        }
        let (h, pooled) = match features {
            TargetFeatures::Ready(f) => f,
            TargetFeatures::Pending(p) => {
                let f = p.wait()?;
                for (_, tgt) in masks {
                    targets.push(tgt.gather(&f.0)?);
                }
                f
            }
        };
        let (loss, per_mask) = loss::jepa_loss(&preds, &targets, &self.optim_cfg)?;
        Ok((loss, per_mask, h, pooled))
    }

    /// One full V-JEPA iteration (spec §6–§7): target pass (no grad) → LN without affine (eps
    /// 1e-5) → targets per mask; per mask an encoder pass on the context tokens and a predictor
    /// pass; L1 loss averaged over masks; backward; encoder / predictor grad norms (always, for
    /// metrics; clipping only from `clip_start_iteration`); schedules at the 1-based step; AdamW;
    /// EMA update of the target with the momentum of the 0-based iteration.
    ///
    /// Equals [`Self::compute_gradients`] then [`Self::apply_gradients`] (what data-parallel
    /// training does with an averaged gradient in between).
    ///
    /// On error (bad input, non-finite loss) the model is left unchanged.
    pub fn train_step(&mut self, batch: &TrainBatch) -> Result<StepStats, ModelError> {
        let grads = self.compute_gradients(batch)?;
        self.apply_gradients(grads)
    }

    /// The first half of a step: forward and backward on `batch` with the current weights,
    /// nothing changed. The gradient is that of the batch's mean loss.
    pub fn compute_gradients(&self, batch: &TrainBatch) -> Result<Gradients, ModelError> {
        self.compute_gradients_overlapping(batch, || {})
    }

    /// [`Self::compute_gradients`], running `meanwhile` on the host once the step's forward and
    /// backward are queued on the device and before the step waits for them: on a GPU, host
    /// work done there (e.g. staging the next batch) overlaps the step instead of following it.
    pub fn compute_gradients_overlapping(
        &self,
        batch: &TrainBatch,
        meanwhile: impl FnOnce(),
    ) -> Result<Gradients, ModelError> {
        let (clips, b) = self.prepare_clips(&batch.clips)?;
        let masks = self.mask_indices(batch, b)?;
        // The step differentiates the kept copies where there are, the masters otherwise.
        let leaves: Vec<&Var> = match &self.copies {
            Some(c) => c.trainable.iter().collect(),
            None => self.opt.params().iter().map(|p| &p.var).collect(),
        };
        let side = if self.checkpointing {
            Some(
                side_grads::SideGrads::new(leaves.iter().copied())
                    .written_backward(self.fused_blocks),
            )
        } else if self.fused_blocks {
            Some(side_grads::SideGrads::fused(leaves.iter().copied()))
        } else {
            None
        }
        .map(std::sync::Arc::new);
        let (loss, per_mask, h, pooled) =
            self.forward_loss_stats(&clips, &masks, self.pool_features, side.as_ref())?;
        // Backward first, then the loss, the per-mask losses, the collapse terms and the grad
        // norms in one device-to-host read: one sync on a GPU, after the step's heavy work is
        // queued. (A non-finite loss has a useless gradient, dropped below; nothing has changed
        // yet.)
        let mut grads = loss.backward()?;
        if let Some(side) = &side {
            side.merge_into(&mut grads)?;
        }
        // Gradients of the copies, in the compute dtype, filed under their masters (the update
        // widens them as it reads them).
        if self.copies.is_some() {
            for (p, leaf) in self.opt.params().iter().zip(&leaves) {
                if let Some(g) = grads.remove(leaf.as_tensor()) {
                    grads.insert(p.var.as_tensor(), g);
                }
            }
        }
        // The grad norms the update clips with, queued behind the backward pass and read with
        // the loss: the step's only synchronisation.
        let sq = queue_grad_sq_sums(&self.opt, self.num_encoder_params, &grads)?;
        let read = read_step_scalars(&h, &loss, &per_mask, sq, self.steps_done + 1, meanwhile)?;
        let collapse = read.collapse;
        Ok(Gradients {
            grads,
            grad_sq: Some(read.grad_sq),
            loss: read.loss,
            loss_per_mask: read.per_mask,
            samples: b,
            context_tokens: masks.iter().map(|(c, _)| c.len()).collect(),
            target_tokens: masks.iter().map(|(_, t)| t.len()).collect(),
            target_std: collapse.std,
            target_rank: collapse.rank,
            target_embeddings: match pooled {
                Some(p) => p.to_vec2::<f32>()?,
                None => Vec::new(),
            },
        })
    }

    /// Gradients of a worker that has no samples in a step (it still takes part in the
    /// averaging, with weight 0): no parameter has a gradient.
    pub fn empty_gradients(&self, masks: usize) -> Gradients {
        Gradients {
            grads: candle_core::backprop::GradStore::default(),
            grad_sq: None,
            loss: 0.0,
            loss_per_mask: vec![0.0; masks],
            samples: 0,
            context_tokens: vec![0; masks],
            target_tokens: vec![0; masks],
            target_std: 0.0,
            target_rank: 0.0,
            target_embeddings: Vec::new(),
        }
    }

    /// Values in the flat gradient layout: every trainable parameter's elements, in optimiser
    /// order (encoder then predictor, registration order), row-major.
    pub fn flat_len(&self) -> usize {
        flat_len(&self.opt)
    }

    /// The gradient as one flat f32 vector ([`Self::flat_len`] values; a parameter without a
    /// gradient contributes zeros) and which parameters have one, for exchange between workers.
    pub fn flatten_gradients(&self, g: &Gradients) -> Result<FlatGradients, ModelError> {
        flatten_gradients(&self.opt, g)
    }

    /// Replaces the gradients in `g` by `flat` (e.g. the average over all workers): parameters
    /// marked present get their slice, the others none.
    pub fn set_flat_gradients(
        &self,
        g: &mut Gradients,
        flat: &FlatGradients,
    ) -> Result<(), ModelError> {
        set_flat_gradients(&self.opt, &self.device, g, flat)
    }

    /// The second half of a step: grad norms, clipping, schedules, AdamW and EMA with the
    /// gradients in `g`; the stats report `g`'s loss parts and token counts.
    pub fn apply_gradients(&mut self, g: Gradients) -> Result<StepStats, ModelError> {
        let Gradients {
            grads,
            grad_sq,
            loss,
            loss_per_mask,
            context_tokens,
            target_tokens,
            target_std,
            target_rank,
            ..
        } = g;
        let iter0 = self.steps_done;
        let step1 = iter0 + 1;
        let momentum = schedule::ema_momentum(&self.optim_cfg, iter0);
        let Update {
            lr,
            wd,
            enc_norm,
            pred_norm,
        } = optimiser_step(
            &mut self.opt,
            self.num_encoder_params,
            &self.optim_cfg,
            StepGrads {
                grads,
                sq: grad_sq,
                loss,
            },
            iter0,
            self.copies.as_ref().map(|c| c.trainable.as_slice()),
        )?;
        self.ema_update(momentum)?;
        self.steps_done = step1;

        let stats = StepStats {
            step: step1,
            loss,
            loss_per_mask,
            lr,
            weight_decay: wd,
            ema_momentum: momentum,
            encoder_grad_norm: enc_norm,
            predictor_grad_norm: pred_norm,
            context_tokens,
            target_tokens,
            target_std,
            target_rank,
        };
        debug!(
            step = stats.step,
            loss = stats.loss,
            lr,
            wd,
            momentum,
            enc_grad_norm = enc_norm,
            pred_grad_norm = pred_norm,
            "train step"
        );
        Ok(stats)
    }

    /// A 64-bit digest of every parameter's bytes (encoder, predictor, target encoder and the
    /// AdamW moments) and the step count: equal digests on two workers mean (up to a hash
    /// collision) bit-identical models, which data-parallel training checks after every step.
    pub fn params_digest(&self) -> Result<u64, ModelError> {
        let mut h = Digest::new();
        h.word(self.steps_done);
        h.optimiser(&self.opt)?;
        for (_, t) in &self.target_params {
            h.tensor(t)?;
        }
        Ok(h.finish())
    }

    /// θ_tgt ← m·θ_tgt + (1 - m)·θ_enc for every encoder parameter, in place: the target
    /// encoder holds the same tensors, so nothing is allocated or rebuilt.
    fn ema_update(&mut self, m: f64) -> Result<(), ModelError> {
        let enc_params = &self.opt.params()[..self.num_encoder_params];
        let copies = self.copies.as_ref().map(|c| c.target.as_slice());
        let copy = |i: usize| copies.and_then(|c| c.get(i));
        // On a GPU: all pairs in one multi-tensor launch, which also rewrites the kept copies.
        #[cfg(feature = "cuda")]
        if self.device.is_cuda()
            && enc_params.iter().all(|p| p.var.dtype() == DType::F32)
            && copies.is_none_or(|c| c.iter().all(|v| v.dtype() == DType::BF16))
        {
            let triples: Vec<(&Tensor, &Tensor, Option<&Tensor>)> = self
                .target_params
                .iter()
                .zip(enc_params)
                .enumerate()
                .map(|(i, ((_, tgt), p))| (tgt, p.var.as_tensor(), copy(i).map(|v| v.as_tensor())))
                .collect();
            kernels::cuda::ema_multi(&triples, m)?;
            return Ok(());
        }
        for (i, ((_, tgt), p)) in self.target_params.iter().zip(enc_params).enumerate() {
            kernels::ema_update(tgt, p.var.as_tensor(), m)?;
            if let Some(c) = copy(i) {
                c.set(&tgt.to_dtype(c.dtype())?)?;
            }
        }
        Ok(())
    }

    /// Checkpoint as safetensors bytes. Names are the official keys without `module.backbone.`
    /// (spec §8): `encoder.<key>`, `predictor.<key>`, `target_encoder.<key>` (patch weight in
    /// conv shape `[D, 3, t, p, p]`, fixed tables as `encoder.pos_embed` /
    /// `target_encoder.pos_embed` / `predictor.predictor_pos_embed`), AdamW moments as
    /// `opt.exp_avg.<name>` / `opt.exp_avg_sq.<name>`; metadata holds the three configs (JSON),
    /// seed, steps_done and per-parameter AdamW step counts.
    pub fn to_safetensors(&self) -> Result<Vec<u8>, ModelError> {
        self.to_safetensors_with(&[])
    }

    /// [`Self::to_safetensors`] plus caller metadata (e.g. the job's data cursor and catalog
    /// version), so that everything a resume needs lives in one atomically written file.
    /// Keys must not clash with the model's own (`format`, `*_config`, `seed`, `steps_done`,
    /// `opt_steps`); read them back with [`checkpoint_metadata`].
    pub fn to_safetensors_with(&self, extra: &[(String, String)]) -> Result<Vec<u8>, ModelError> {
        use checkpoint::F32View;
        let mut tensors = Vec::new();
        tensors.push((
            "encoder.pos_embed".to_string(),
            F32View::new(self.encoder.pos_embed())?,
        ));
        tensors.push((
            "target_encoder.pos_embed".to_string(),
            F32View::new(self.target.pos_embed())?,
        ));
        tensors.push((
            "predictor.predictor_pos_embed".to_string(),
            F32View::new(self.predictor.pos_embed())?,
        ));
        let steps = optimiser_tensors(&self.opt, &mut tensors)?;
        for (name, t) in &self.target_params {
            tensors.push((format!("target_encoder.{name}"), F32View::new(t)?));
        }
        let mut meta = HashMap::new();
        meta.insert("format".to_string(), FORMAT.to_string());
        meta.insert(OBJECTIVE_KEY.to_string(), "vjepa".to_string());
        meta.insert("encoder_config".to_string(), to_json(&self.enc_cfg)?);
        meta.insert("predictor_config".to_string(), to_json(&self.pred_cfg)?);
        meta.insert("optim_config".to_string(), to_json(&self.optim_cfg)?);
        meta.insert("seed".to_string(), self.seed.to_string());
        meta.insert("steps_done".to_string(), self.steps_done.to_string());
        meta.insert("opt_steps".to_string(), to_json(&steps)?);
        add_extra_metadata(&mut meta, extra)?;
        checkpoint::serialize(tensors, meta)
    }

    /// Rebuilds a model from [`Self::to_safetensors`] output (resume / verification). Errors
    /// name the missing or mis-shaped tensor.
    pub fn from_safetensors(bytes: &[u8], device: &Device) -> Result<Self, ModelError> {
        let r = checkpoint::Reader::parse(bytes)?;
        let format = r.meta("format")?;
        if format != FORMAT {
            return Err(ModelError::Checkpoint(format!(
                "format `{format}`, expected `{FORMAT}`"
            )));
        }
        let enc_cfg: EncoderConfig = r.meta_json("encoder_config")?;
        let pred_cfg: PredictorConfig = r.meta_json("predictor_config")?;
        let optim_cfg: OptimConfig = r.meta_json("optim_config")?;
        let seed: u64 = r.meta_json("seed")?;
        let steps_done: u64 = r.meta_json("steps_done")?;
        let opt_steps: BTreeMap<String, u64> = r.meta_json("opt_steps")?;
        Self::validate_configs(&enc_cfg, &pred_cfg, &optim_cfg)?;

        let load =
            |prefix: &str, specs: &[ParamSpec]| -> Result<Vec<(String, Tensor)>, ModelError> {
                specs
                    .iter()
                    .map(|s| {
                        Ok((
                            s.name.clone(),
                            r.tensor(&format!("{prefix}.{}", s.name), &s.shape, device)?,
                        ))
                    })
                    .collect()
            };
        let enc_specs = Encoder::param_specs(&enc_cfg);
        let pred_specs = Predictor::param_specs(&enc_cfg, &pred_cfg);
        let encoder = load("encoder", &enc_specs)?;
        let predictor = load("predictor", &pred_specs)?;
        let target = load("target_encoder", &enc_specs)?;
        let n = enc_cfg.num_tokens();
        let enc_pos_shape = [1, n, enc_cfg.embed_dim];
        let encoder_pos = r.tensor("encoder.pos_embed", &enc_pos_shape, device)?;
        let target_pos = r.tensor("target_encoder.pos_embed", &enc_pos_shape, device)?;
        let predictor_pos = r.tensor(
            "predictor.predictor_pos_embed",
            &[1, n, pred_cfg.embed_dim],
            device,
        )?;
        let full_names = enc_specs
            .iter()
            .map(|s| (format!("encoder.{}", s.name), &s.shape))
            .chain(
                pred_specs
                    .iter()
                    .map(|s| (format!("predictor.{}", s.name), &s.shape)),
            );
        let opt_state = read_optimiser_state(&r, full_names, &opt_steps, steps_done, device)?;
        let parts = Parts {
            encoder,
            predictor,
            target,
            encoder_pos,
            predictor_pos,
            target_pos,
            opt_state: Some(opt_state),
        };
        let model = Self::assemble(
            enc_cfg, pred_cfg, optim_cfg, seed, device, parts, steps_done,
        )?;
        info!(steps_done, "loaded V-JEPA checkpoint");
        Ok(model)
    }
}

/// Checkpoint metadata key naming the training objective (`vjepa` or `pixel`); checkpoints
/// without it are V-JEPA ones (they predate the pixel objective).
pub const OBJECTIVE_KEY: &str = "objective";

/// AdamW over `(name, var, group)`: fresh, or with saved `(exp_avg, exp_avg_sq, step)` states
/// in the same order (shared by both objectives).
fn build_optimiser(
    named_vars: Vec<(String, Var, ParamGroup)>,
    state: Option<Vec<(Tensor, Tensor, u64)>>,
    cfg: &OptimConfig,
) -> Result<AdamW, ModelError> {
    let Some(state) = state else {
        return AdamW::new(named_vars, cfg.betas, cfg.eps);
    };
    if state.len() != named_vars.len() {
        return Err(ModelError::Checkpoint(format!(
            "{} optimiser states for {} parameters",
            state.len(),
            named_vars.len()
        )));
    }
    let params = named_vars
        .into_iter()
        .zip(state)
        .map(|((name, var, group), (exp_avg, exp_avg_sq, step))| {
            OptParam::from_moments(name, var, group, &exp_avg, &exp_avg_sq, step)
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(AdamW::from_state(params, cfg.betas, cfg.eps))
}

/// Values in the flat gradient layout of `opt`'s parameters.
fn flat_len(opt: &AdamW) -> usize {
    opt.params().iter().map(|p| p.var.elem_count()).sum()
}

/// `g` in the flat layout of `opt` (see [`VJepa::flatten_gradients`]).
fn flatten_gradients(opt: &AdamW, g: &Gradients) -> Result<FlatGradients, ModelError> {
    let mut values = Vec::with_capacity(flat_len(opt));
    let mut present = Vec::with_capacity(opt.params().len());
    for p in opt.params() {
        match g.grads.get(p.var.as_tensor()) {
            Some(t) => {
                let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                values.extend_from_slice(&v);
                present.push(true);
            }
            None => {
                values.resize(values.len() + p.var.elem_count(), 0.0);
                present.push(false);
            }
        }
    }
    Ok(FlatGradients { values, present })
}

/// Replaces `g`'s gradients by `flat` (see [`VJepa::set_flat_gradients`]).
fn set_flat_gradients(
    opt: &AdamW,
    device: &Device,
    g: &mut Gradients,
    flat: &FlatGradients,
) -> Result<(), ModelError> {
    let params = opt.params();
    if flat.values.len() != flat_len(opt) || flat.present.len() != params.len() {
        return Err(ModelError::Input(format!(
            "flat gradient of {} values for {} parameters, expected {} values for {}",
            flat.values.len(),
            flat.present.len(),
            flat_len(opt),
            params.len()
        )));
    }
    g.grad_sq = None;
    let mut at = 0;
    for (p, &present) in params.iter().zip(&flat.present) {
        let n = p.var.elem_count();
        if present {
            let t = Tensor::from_slice(&flat.values[at..at + n], p.var.dims(), device)?
                .to_dtype(p.var.dtype())?;
            g.grads.insert(p.var.as_tensor(), t);
        } else {
            g.grads.remove(p.var.as_tensor());
        }
        at += n;
    }
    Ok(())
}

/// The target pass's normalised features `[B, N, D]` (f32) and, when asked, their mean over
/// tokens `[B, D]`.
type Features = (Tensor, Option<Tensor>);

/// Target features computed already, or on their way from the target lane.
enum TargetFeatures {
    Ready(Features),
    Pending(target_lane::Pending<Features>),
}

/// The target branch of a step: the target encoder on the full clips (cut into `patches`), with plain (non-Var)
/// weights, so no graph is recorded; its features normalised in f32 whatever the compute dtype,
/// as the loss is taken (spec §6: LayerNorm without affine), and mean-pooled with `pool`.
fn target_features(
    target: &Encoder,
    patches: &vit::Patches,
    pool: bool,
) -> Result<Features, ModelError> {
    let raw = target
        .forward_tokens(&target.embed_patches(patches)?)?
        .detach()
        .to_dtype(DType::F32)?;
    let pooled = if pool { Some(raw.mean(1)?) } else { None };
    let h = loss::normalize_targets(&raw)?.detach();
    Ok((h, pooled))
}

/// What [`optimiser_step`] used and measured.
struct Update {
    lr: f64,
    wd: f64,
    enc_norm: f64,
    pred_norm: f64,
}

/// What [`optimiser_step`] applies: the gradients, their per-module sums of squares when the
/// step already read them (`None`: computed here, one more read), and the loss they came from.
struct StepGrads {
    grads: candle_core::backprop::GradStore,
    sq: Option<Vec<f64>>,
    loss: f64,
}

/// The optimiser half of a step, shared by both objectives: schedules at the 1-based step,
/// pre-clip grad norms of the encoder (the first `num_encoder_params` parameters) and the rest
/// (predictor or pixel decoder), clipping each from `clip_start_iteration`, AdamW. A
/// non-finite loss changes nothing.
fn optimiser_step(
    opt: &mut AdamW,
    num_encoder_params: usize,
    c: &OptimConfig,
    g: StepGrads,
    iter0: u64,
    copies: Option<&[Var]>,
) -> Result<Update, ModelError> {
    let StepGrads { grads, sq, loss } = g;
    let step1 = iter0 + 1;
    let lr = schedule::lr(c, step1);
    let wd = schedule::weight_decay(c, step1);
    if !loss.is_finite() {
        return Err(ModelError::NonFiniteLoss { step: step1, loss });
    }
    let sq = match sq {
        Some(sq) => sq,
        // Replaced since (a data-parallel exchange): both pre-clip norms in one read.
        None => queue_grad_sq_sums(opt, num_encoder_params, &grads)?.read()?,
    };
    let [enc_sq, rest_sq] = sq[..] else {
        return Err(ModelError::Input(format!(
            "{} gradient norms for 2 modules",
            sq.len()
        )));
    };
    let (enc_norm, pred_norm) = (enc_sq.sqrt(), rest_sq.sqrt());
    // Clipping scales each gradient as the update reads it (no scaled copy of the gradients).
    let mut grad_scale = Vec::new();
    if let Some(max_norm) = c.clip_grad
        && iter0 >= c.clip_start_iteration
    {
        let (enc, rest) = (
            optim::clip_factor(enc_norm, max_norm),
            optim::clip_factor(pred_norm, max_norm),
        );
        grad_scale = (0..opt.params().len())
            .map(|i| if i < num_encoder_params { enc } else { rest })
            .collect();
    }
    opt.step_with(
        &grads,
        &optim::StepArgs {
            lr,
            weight_decay: wd,
            grad_scale: &grad_scale,
            copies,
        },
    )?;
    Ok(Update {
        lr,
        wd,
        enc_norm,
        pred_norm,
    })
}

/// Appends every parameter of `opt` (under its full name) and its AdamW moments
/// (`opt.exp_avg.<name>`, `opt.exp_avg_sq.<name>`) to `tensors`; returns the per-parameter
/// step counts for the `opt_steps` metadata.
fn optimiser_tensors(
    opt: &AdamW,
    tensors: &mut Vec<(String, checkpoint::F32View)>,
) -> Result<BTreeMap<String, u64>, ModelError> {
    use checkpoint::F32View;
    let mut steps = BTreeMap::new();
    for p in opt.params() {
        tensors.push((p.name.clone(), F32View::new(p.var.as_tensor())?));
        tensors.push((
            format!("opt.exp_avg.{}", p.name),
            F32View::new(&p.exp_avg()?)?,
        ));
        tensors.push((
            format!("opt.exp_avg_sq.{}", p.name),
            F32View::new(&p.exp_avg_sq()?)?,
        ));
        steps.insert(p.name.clone(), p.step);
    }
    Ok(steps)
}

/// The AdamW states of the parameters `names` (full name, shape), as [`optimiser_tensors`]
/// wrote them.
fn read_optimiser_state<'s>(
    r: &checkpoint::Reader<'_>,
    names: impl Iterator<Item = (String, &'s Vec<usize>)>,
    opt_steps: &BTreeMap<String, u64>,
    steps_done: u64,
    device: &Device,
) -> Result<Vec<(Tensor, Tensor, u64)>, ModelError> {
    names
        .map(|(name, shape)| {
            let m = r.tensor(&format!("opt.exp_avg.{name}"), shape, device)?;
            let v = r.tensor(&format!("opt.exp_avg_sq.{name}"), shape, device)?;
            let step = opt_steps.get(&name).copied().unwrap_or(steps_done);
            Ok((m, v, step))
        })
        .collect()
}

/// Adds caller metadata, refusing keys the model writes itself.
fn add_extra_metadata(
    meta: &mut HashMap<String, String>,
    extra: &[(String, String)],
) -> Result<(), ModelError> {
    for (key, value) in extra {
        if meta.contains_key(key) {
            return Err(ModelError::Checkpoint(format!(
                "metadata key `{key}` is reserved for the model"
            )));
        }
        meta.insert(key.clone(), value.clone());
    }
    Ok(())
}

/// The string metadata of a checkpoint written by [`VJepa::to_safetensors_with`], without
/// loading its tensors (a truncated file still fails: the header must fit in the bytes).
pub fn checkpoint_metadata(bytes: &[u8]) -> Result<HashMap<String, String>, ModelError> {
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes)?;
    Ok(meta.metadata().clone().unwrap_or_default())
}

/// Metadata value as JSON.
fn to_json<T: Serialize + ?Sized>(v: &T) -> Result<String, ModelError> {
    serde_json::to_string(v).map_err(|e| ModelError::Checkpoint(format!("metadata encoding: {e}")))
}

#[cfg(test)]
mod tests;
