//! The pixel-reconstruction baseline (`objective: pixel`, VideoMAE-style): the same encoder
//! ([`crate::vit`]) sees only the visible tubelets of a tube mask (typically 10 %); a light
//! decoder — the predictor module of [`crate::predictor`] with one mask token and a head of
//! `3·t·p·p` outputs — predicts the pixels of the masked tubelets; the loss is the mean squared
//! error over the masked tubelets only. Targets are the clip the pipeline feeds (already
//! normalised with the dataset mean/std), cut into tubelets and, with `norm_pix`, each colour
//! channel of each tubelet normalised by its own mean and unbiased std (VideoMAE's target).
//!
//! Optimiser, parameter groups, schedules and clipping are V-JEPA's (the decoder takes the
//! predictor's groups); there is no target encoder and no EMA. Checkpoints name the objective in
//! their metadata; the encoder is the one a frozen evaluation reads.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use tracing::{debug, info};

use crate::config::{EncoderConfig, Objective, OptimConfig, PixelConfig};
use crate::optim::{AdamW, ParamGroup};
use crate::params::{InitRng, ParamMap, ParamSpec};
use crate::predictor::Predictor;
use crate::tokens::TokenIndex;
use crate::vit::{self, Encoder};
use crate::{
    Digest, FlatGradients, Gradients, ModelError, OBJECTIVE_KEY, StepGrads, StepStats, TrainBatch,
    Update, add_extra_metadata, build_optimiser, checkpoint, flatten_gradients, optimiser_step,
    optimiser_tensors, read_optimiser_state, set_flat_gradients, to_json,
};

/// eps of the per-tubelet target normalisation (`norm_pix`), added to the std as VideoMAE does.
pub const NORM_PIX_EPS: f64 = 1e-6;

const FORMAT: &str = "vjepa-stream.pixel-v1";

/// The per-tubelet pixel targets `[B, N, 3·t·p·p]` of clips on `cfg`'s grid: the tubelets in
/// the patch embedding's order ([`vit::patchify`]: channel, frame, row, column). With
/// `norm_pix`, VideoMAE's target: each colour channel of each tubelet normalised over its own
/// t·p·p values, `(x − mean) / (std + 1e-6)` with the unbiased std. No graph.
pub fn pixel_targets(
    cfg: &EncoderConfig,
    clips: &Tensor,
    norm_pix: bool,
) -> Result<Tensor, ModelError> {
    let patches = vit::patchify(cfg, clips)?.detach();
    if !norm_pix {
        return Ok(patches);
    }
    let (b, n, dim) = patches.dims3()?;
    let per_channel = dim / 3;
    let x = patches.reshape((b, n, 3, per_channel))?;
    let mean = x.mean_keepdim(candle_core::D::Minus1)?;
    let centred = x.broadcast_sub(&mean)?;
    let unbiased = (per_channel.max(2) - 1) as f64;
    let var = (centred.sqr()?.sum_keepdim(candle_core::D::Minus1)? / unbiased)?;
    let std = (var.sqrt()? + NORM_PIX_EPS)?;
    Ok(centred.broadcast_div(&std)?.reshape((b, n, dim))?)
}

/// Tensors of a model before they become modules (shared by `new` and loading).
struct Parts {
    encoder: Vec<(String, Tensor)>,
    decoder: Vec<(String, Tensor)>,
    encoder_pos: Tensor,
    decoder_pos: Tensor,
    opt_state: Option<Vec<(Tensor, Tensor, u64)>>,
}

/// A model under pixel-reconstruction training: encoder, decoder and AdamW state. Its methods
/// mirror [`crate::VJepa`]'s, so the data-parallel trainer drives either through
/// [`crate::Pretrainer`].
pub struct PixelMae {
    enc_cfg: EncoderConfig,
    pix_cfg: PixelConfig,
    optim_cfg: OptimConfig,
    seed: u64,
    device: Device,
    encoder: Encoder,
    decoder: Predictor,
    /// Owns the trainable Vars: encoder params first (`encoder.*`), then the decoder's
    /// (`decoder.*`).
    pub(crate) opt: AdamW,
    num_encoder_params: usize,
    steps_done: u64,
    /// Whether training runs the blocks as fused ops ([`Self::set_fused_blocks`]).
    fused_blocks: bool,
}

impl PixelMae {
    /// Fresh model, initialised like V-JEPA's (spec §3: N(0, 0.02²) weights, zero biases and
    /// mask token, sin-cos tables), deterministic in `seed` (encoder then decoder).
    pub fn new(
        encoder: EncoderConfig,
        pixel: PixelConfig,
        optim: OptimConfig,
        seed: u64,
        device: &Device,
    ) -> Result<Self, ModelError> {
        Self::validate_configs(&encoder, &pixel, &optim)?;
        let mut rng = InitRng::new(seed)?;
        let mut init = |specs: Vec<ParamSpec>| -> Result<Vec<(String, Tensor)>, ModelError> {
            specs
                .into_iter()
                .map(|spec| {
                    let values = rng.values(&spec);
                    Ok((
                        spec.name,
                        Tensor::from_vec(values, spec.shape.as_slice(), device)?,
                    ))
                })
                .collect()
        };
        let enc = init(Encoder::param_specs(&encoder))?;
        let dec = init(Self::decoder_specs(&encoder, &pixel))?;
        let (grid, layout) = (encoder.grid(), encoder.table_layout());
        let parts = Parts {
            encoder: enc,
            decoder: dec,
            encoder_pos: crate::pos_embed::sincos_table_tensor(
                encoder.embed_dim,
                grid,
                layout,
                device,
            )?,
            decoder_pos: crate::pos_embed::sincos_table_tensor(
                pixel.decoder_dim,
                grid,
                layout,
                device,
            )?,
            opt_state: None,
        };
        let model = Self::assemble(encoder, pixel, optim, seed, device, parts, 0)?;
        let (ne, nd) = model.num_trainable_params();
        info!(
            encoder_params = ne,
            decoder_params = nd,
            seed,
            "built pixel-reconstruction model"
        );
        Ok(model)
    }

    fn decoder_specs(enc: &EncoderConfig, pix: &PixelConfig) -> Vec<ParamSpec> {
        Predictor::param_specs_with_head(enc, &pix.decoder(), enc.patch_dim())
    }

    fn validate_configs(
        enc: &EncoderConfig,
        pix: &PixelConfig,
        optim: &OptimConfig,
    ) -> Result<(), ModelError> {
        enc.validate()?;
        pix.validate(enc)?;
        optim.validate()
    }

    fn assemble(
        enc_cfg: EncoderConfig,
        pix_cfg: PixelConfig,
        optim_cfg: OptimConfig,
        seed: u64,
        device: &Device,
        parts: Parts,
        steps_done: u64,
    ) -> Result<Self, ModelError> {
        let mut named_vars = Vec::new();
        let mut maps = [ParamMap::new(), ParamMap::new()];
        let mut num_encoder_params = 0;
        for (module, (prefix, tensors)) in [("encoder", parts.encoder), ("decoder", parts.decoder)]
            .into_iter()
            .enumerate()
        {
            for (name, t) in tensors {
                let var = Var::from_tensor(&t)?;
                maps[module].insert(name.clone(), var.as_tensor().clone());
                let group = ParamGroup::classify(module == 1, &name, t.rank());
                named_vars.push((format!("{prefix}.{name}"), var, group));
            }
            if module == 0 {
                num_encoder_params = named_vars.len();
            }
        }
        let [enc_map, dec_map] = maps;
        let encoder = Encoder::load(&enc_cfg, &enc_map, parts.encoder_pos)?;
        let decoder = Predictor::load_with_head(
            &enc_cfg,
            &pix_cfg.decoder(),
            &dec_map,
            parts.decoder_pos,
            enc_cfg.patch_dim(),
        )?;
        let opt = build_optimiser(named_vars, parts.opt_state, &optim_cfg)?;
        Ok(Self {
            enc_cfg,
            pix_cfg,
            optim_cfg,
            seed,
            device: device.clone(),
            encoder,
            decoder,
            opt,
            num_encoder_params,
            steps_done,
            fused_blocks: true,
        })
    }

    /// Training steps run each encoder and decoder block as one fused op (on, the default) or
    /// record it op by op on candle's graph (off): see [`crate::VJepa::set_fused_blocks`].
    pub fn set_fused_blocks(&mut self, on: bool) {
        self.fused_blocks = on;
    }

    /// Steps taken so far.
    pub fn steps_done(&self) -> u64 {
        self.steps_done
    }

    /// Encoder shape.
    pub fn encoder_config(&self) -> &EncoderConfig {
        &self.enc_cfg
    }

    /// Decoder shape and target settings.
    pub fn pixel_config(&self) -> &PixelConfig {
        &self.pix_cfg
    }

    /// Optimisation hyper-parameters.
    pub fn optim_config(&self) -> &OptimConfig {
        &self.optim_cfg
    }

    /// Init seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Trainable parameters (encoder, decoder).
    pub fn num_trainable_params(&self) -> (usize, usize) {
        let params = self.opt.params();
        let (enc, dec) = params.split_at(self.num_encoder_params.min(params.len()));
        let count = |ps: &[crate::optim::OptParam]| ps.iter().map(|p| p.var.elem_count()).sum();
        (count(enc), count(dec))
    }

    /// The encoder (what an evaluation reads), e.g. to fine-tune a copy of it.
    pub fn encoder(&self) -> &Encoder {
        &self.encoder
    }

    /// Encoder features `[B, N', D]` of full clips (no grad, after the final LayerNorm): what a
    /// frozen evaluation of this objective reads (there is no target encoder). Other clip
    /// sizes are accepted as in [`crate::VJepa::target_features`].
    pub fn encoder_features(&self, clips: &Tensor) -> Result<Tensor, ModelError> {
        vit::clip_geometry(&self.enc_cfg, clips)?;
        let clips = clips.to_device(&self.device)?.to_dtype(DType::F32)?;
        Ok(self.encoder.forward(&clips, None)?.detach())
    }

    /// Forward of one step: (loss, visible, masked, collapse signal), with the graph; with
    /// `side`, the blocks are fused ops whose weights' gradients go there.
    fn forward_loss(
        &self,
        batch: &TrainBatch,
        side: Option<&std::sync::Arc<crate::side_grads::SideGrads>>,
    ) -> Result<(Tensor, usize, usize, Tensor), ModelError> {
        let b = vit::check_clips(&self.enc_cfg, &batch.clips)?;
        let clips = batch.clips.to_device(&self.device)?.to_dtype(DType::F32)?;
        let [mask] = batch.masks.as_slice() else {
            return Err(ModelError::Input(format!(
                "the pixel objective takes one tube mask per batch, got {}",
                batch.masks.len()
            )));
        };
        let n = self.enc_cfg.num_tokens();
        let visible = TokenIndex::new(&mask.context, b, n, "visible tubelets", &self.device)?;
        let masked = TokenIndex::new(&mask.target, b, n, "masked tubelets", &self.device)?;
        let tokens = self.encoder.embed(&clips)?;
        let z = self
            .encoder
            .forward_tokens_with(&visible.gather(&tokens)?, side)?;
        let pred = self.decoder.forward_with(&z, &visible, &masked, 0, side)?;
        let target = masked.gather(&pixel_targets(
            &self.enc_cfg,
            &clips,
            self.pix_cfg.norm_pix,
        )?)?;
        let loss = (pred - target)?.sqr()?.mean_all()?;
        // Collapse signal as V-JEPA computes it, over the encoder's visible-token outputs.
        let h = crate::loss::normalize_targets(&z.detach())?;
        Ok((loss, visible.len(), masked.len(), h))
    }

    /// Mean squared error of the current weights on `batch` (no step), for tests and checks.
    pub fn loss(&self, batch: &TrainBatch) -> Result<f64, ModelError> {
        let (loss, ..) = self.forward_loss(batch, None)?;
        Ok(loss.to_dtype(DType::F64)?.to_scalar::<f64>()?)
    }

    /// The first half of a step: forward and backward on `batch` (clips plus exactly one mask:
    /// `context` = visible, `target` = masked tubelets), nothing changed. Token counts and
    /// `loss_per_mask` have one entry; `target_std` and `target_rank` are the collapse signals over the encoder's
    /// outputs (no target encoder exists).
    pub fn compute_gradients(&self, batch: &TrainBatch) -> Result<Gradients, ModelError> {
        self.compute_gradients_overlapping(batch, || {})
    }

    /// [`Self::compute_gradients`], running `meanwhile` once the step is queued on the device
    /// and before waiting for it (see [`crate::VJepa::compute_gradients_overlapping`]).
    pub fn compute_gradients_overlapping(
        &self,
        batch: &TrainBatch,
        meanwhile: impl FnOnce(),
    ) -> Result<Gradients, ModelError> {
        let side = self.fused_blocks.then(|| {
            std::sync::Arc::new(crate::side_grads::SideGrads::fused(
                self.opt.params().iter().map(|p| &p.var),
            ))
        });
        let (loss, visible, masked, h) = self.forward_loss(batch, side.as_ref())?;
        // Backward, then the loss, the collapse terms and the grad norms in one read (one sync
        // on a GPU).
        let mut grads = loss.backward()?;
        if let Some(side) = &side {
            side.merge_into(&mut grads)?;
        }
        // The grad norms, queued behind the backward pass and read with the loss.
        let sq = crate::queue_grad_sq_sums(&self.opt, self.num_encoder_params, &grads)?;
        let read = crate::read_step_scalars(&h, &loss, &[], sq, self.steps_done + 1, meanwhile)?;
        let (collapse, loss_value) = (read.collapse, read.loss);
        Ok(Gradients {
            grads,
            grad_sq: Some(read.grad_sq),
            loss: loss_value,
            loss_per_mask: vec![loss_value],
            samples: batch.clips.dim(0)?,
            context_tokens: vec![visible],
            target_tokens: vec![masked],
            target_std: collapse.std,
            target_rank: collapse.rank,
            // No target encoder: `outputs.features` is refused for this objective.
            target_embeddings: Vec::new(),
        })
    }

    /// Gradients of a worker without samples in a step (weight 0 in the average).
    pub fn empty_gradients(&self) -> Gradients {
        Gradients {
            grads: candle_core::backprop::GradStore::default(),
            grad_sq: None,
            loss: 0.0,
            loss_per_mask: vec![0.0],
            samples: 0,
            context_tokens: vec![0],
            target_tokens: vec![0],
            target_std: 0.0,
            target_rank: 0.0,
            target_embeddings: Vec::new(),
        }
    }

    /// The gradient in the flat exchange layout (see [`crate::VJepa::flatten_gradients`]).
    pub fn flatten_gradients(&self, g: &Gradients) -> Result<FlatGradients, ModelError> {
        flatten_gradients(&self.opt, g)
    }

    /// Replaces the gradients in `g` by `flat` (see [`crate::VJepa::set_flat_gradients`]).
    pub fn set_flat_gradients(
        &self,
        g: &mut Gradients,
        flat: &FlatGradients,
    ) -> Result<(), ModelError> {
        set_flat_gradients(&self.opt, &self.device, g, flat)
    }

    /// The second half of a step: V-JEPA's schedules, grad norms (the decoder's in
    /// `predictor_grad_norm`), clipping and AdamW; no EMA (`ema_momentum` is reported as 0).
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
            None,
        )?;
        self.steps_done = iter0 + 1;
        debug!(step = self.steps_done, loss, lr, "pixel train step");
        Ok(StepStats {
            step: self.steps_done,
            loss,
            loss_per_mask,
            lr,
            weight_decay: wd,
            ema_momentum: 0.0,
            encoder_grad_norm: enc_norm,
            predictor_grad_norm: pred_norm,
            context_tokens,
            target_tokens,
            target_std,
            target_rank,
        })
    }

    /// [`Self::compute_gradients`] then [`Self::apply_gradients`].
    pub fn train_step(&mut self, batch: &TrainBatch) -> Result<StepStats, ModelError> {
        let g = self.compute_gradients(batch)?;
        self.apply_gradients(g)
    }

    /// Digest of every parameter, AdamW moment and the step count (see
    /// [`crate::VJepa::params_digest`]).
    pub fn params_digest(&self) -> Result<u64, ModelError> {
        let mut h = Digest::new();
        h.word(self.steps_done);
        h.optimiser(&self.opt)?;
        Ok(h.finish())
    }

    /// Checkpoint as safetensors bytes: `encoder.<key>` (the V-JEPA encoder's names),
    /// `decoder.<key>` (the predictor's names), fixed tables `encoder.pos_embed` /
    /// `decoder.predictor_pos_embed`, AdamW moments as in V-JEPA checkpoints; metadata
    /// `objective: pixel`, the configs (JSON), seed, steps and per-parameter AdamW steps, plus
    /// `extra` (keys must not clash).
    pub fn to_safetensors_with(&self, extra: &[(String, String)]) -> Result<Vec<u8>, ModelError> {
        use checkpoint::F32View;
        let mut tensors = vec![
            (
                "encoder.pos_embed".to_string(),
                F32View::new(self.encoder.pos_embed())?,
            ),
            (
                "decoder.predictor_pos_embed".to_string(),
                F32View::new(self.decoder.pos_embed())?,
            ),
        ];
        let steps = optimiser_tensors(&self.opt, &mut tensors)?;
        let mut meta = HashMap::new();
        meta.insert("format".to_string(), FORMAT.to_string());
        meta.insert(
            OBJECTIVE_KEY.to_string(),
            Objective::Pixel.as_str().to_string(),
        );
        meta.insert("encoder_config".to_string(), to_json(&self.enc_cfg)?);
        meta.insert("pixel_config".to_string(), to_json(&self.pix_cfg)?);
        meta.insert("optim_config".to_string(), to_json(&self.optim_cfg)?);
        meta.insert("seed".to_string(), self.seed.to_string());
        meta.insert("steps_done".to_string(), self.steps_done.to_string());
        meta.insert("opt_steps".to_string(), to_json(&steps)?);
        add_extra_metadata(&mut meta, extra)?;
        checkpoint::serialize(tensors, meta)
    }

    /// Rebuilds a model from [`Self::to_safetensors_with`] output (resume, extraction).
    pub fn from_safetensors(bytes: &[u8], device: &Device) -> Result<Self, ModelError> {
        let r = checkpoint::Reader::parse(bytes)?;
        let format = r.meta("format")?;
        if format != FORMAT {
            return Err(ModelError::Checkpoint(format!(
                "format `{format}`, expected `{FORMAT}`"
            )));
        }
        let enc_cfg: EncoderConfig = r.meta_json("encoder_config")?;
        let pix_cfg: PixelConfig = r.meta_json("pixel_config")?;
        let optim_cfg: OptimConfig = r.meta_json("optim_config")?;
        let seed: u64 = r.meta_json("seed")?;
        let steps_done: u64 = r.meta_json("steps_done")?;
        let opt_steps: std::collections::BTreeMap<String, u64> = r.meta_json("opt_steps")?;
        Self::validate_configs(&enc_cfg, &pix_cfg, &optim_cfg)?;
        let enc_specs = Encoder::param_specs(&enc_cfg);
        let dec_specs = Self::decoder_specs(&enc_cfg, &pix_cfg);
        let load =
            |prefix: &str, specs: &[ParamSpec]| -> Result<Vec<(String, Tensor)>, ModelError> {
                specs
                    .iter()
                    .map(|s| {
                        let t = r.tensor(&format!("{prefix}.{}", s.name), &s.shape, device)?;
                        Ok((s.name.clone(), t))
                    })
                    .collect()
            };
        let n = enc_cfg.num_tokens();
        let names = enc_specs
            .iter()
            .map(|s| (format!("encoder.{}", s.name), &s.shape))
            .chain(
                dec_specs
                    .iter()
                    .map(|s| (format!("decoder.{}", s.name), &s.shape)),
            );
        let parts = Parts {
            encoder: load("encoder", &enc_specs)?,
            decoder: load("decoder", &dec_specs)?,
            encoder_pos: r.tensor("encoder.pos_embed", &[1, n, enc_cfg.embed_dim], device)?,
            decoder_pos: r.tensor(
                "decoder.predictor_pos_embed",
                &[1, n, pix_cfg.decoder_dim],
                device,
            )?,
            opt_state: Some(read_optimiser_state(
                &r, names, &opt_steps, steps_done, device,
            )?),
        };
        let model = Self::assemble(enc_cfg, pix_cfg, optim_cfg, seed, device, parts, steps_done)?;
        info!(steps_done, "loaded pixel-reconstruction checkpoint");
        Ok(model)
    }
}
