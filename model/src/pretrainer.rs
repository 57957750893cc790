//! [`Pretrainer`]: either objective behind the one interface the data-parallel trainer uses
//! (gradients, their flat exchange, the optimiser step, digests, checkpoints).

use candle_core::{Device, Tensor};

use crate::config::{EncoderConfig, Objective};
use crate::pixel::PixelMae;
use crate::vit::Encoder;
use crate::{
    FlatGradients, Gradients, ModelError, OBJECTIVE_KEY, StepStats, TrainBatch, VJepa,
    checkpoint_metadata,
};

/// A model under pretraining, of either objective.
pub enum Pretrainer {
    /// V-JEPA (feature prediction against an EMA target encoder).
    VJepa(Box<VJepa>),
    /// Pixel reconstruction of masked tubes (VideoMAE-style baseline).
    Pixel(Box<PixelMae>),
}

/// Calls the same method on whichever model it holds.
macro_rules! each {
    ($self:expr, $m:ident => $e:expr) => {
        match $self {
            Pretrainer::VJepa($m) => $e,
            Pretrainer::Pixel($m) => $e,
        }
    };
}

impl Pretrainer {
    /// The objective of the model.
    pub fn objective(&self) -> Objective {
        match self {
            Pretrainer::VJepa(_) => Objective::Vjepa,
            Pretrainer::Pixel(_) => Objective::Pixel,
        }
    }

    /// The objective a checkpoint was trained with (metadata `objective`; absent: V-JEPA, as
    /// in checkpoints written before the pixel objective existed).
    pub fn checkpoint_objective(bytes: &[u8]) -> Result<Objective, ModelError> {
        let meta = checkpoint_metadata(bytes)?;
        match meta.get(OBJECTIVE_KEY).map(String::as_str) {
            None | Some("vjepa") => Ok(Objective::Vjepa),
            Some("pixel") => Ok(Objective::Pixel),
            Some(other) => Err(ModelError::Checkpoint(format!(
                "unknown objective `{other}` (vjepa, pixel)"
            ))),
        }
    }

    /// Loads a checkpoint of either objective.
    pub fn from_safetensors(bytes: &[u8], device: &Device) -> Result<Self, ModelError> {
        Ok(match Self::checkpoint_objective(bytes)? {
            Objective::Vjepa => {
                Pretrainer::VJepa(Box::new(VJepa::from_safetensors(bytes, device)?))
            }
            Objective::Pixel => {
                Pretrainer::Pixel(Box::new(PixelMae::from_safetensors(bytes, device)?))
            }
        })
    }

    /// Steps taken so far.
    pub fn steps_done(&self) -> u64 {
        each!(self, m => m.steps_done())
    }

    /// Init seed.
    pub fn seed(&self) -> u64 {
        each!(self, m => m.seed())
    }

    /// Encoder shape.
    pub fn encoder_config(&self) -> &EncoderConfig {
        each!(self, m => m.encoder_config())
    }

    /// Trainable parameters: (encoder, predictor or decoder).
    pub fn num_trainable_params(&self) -> (usize, usize) {
        each!(self, m => m.num_trainable_params())
    }

    /// The frozen features an evaluation reads, `[B, N', D]`: V-JEPA's target encoder (spec
    /// §9), the pixel objective's encoder (it has no other).
    pub fn eval_features(&self, clips: &Tensor) -> Result<Tensor, ModelError> {
        match self {
            Pretrainer::VJepa(m) => m.target_features(clips),
            Pretrainer::Pixel(m) => m.encoder_features(clips),
        }
    }

    /// The encoder behind [`Self::eval_features`] (e.g. to fine-tune a copy of it).
    pub fn eval_encoder(&self) -> &Encoder {
        match self {
            Pretrainer::VJepa(m) => m.target_encoder(),
            Pretrainer::Pixel(m) => m.encoder(),
        }
    }

    /// See [`VJepa::set_pool_features`]; the pixel objective has no target encoder, so its
    /// gradients never carry features (a config asking for them is refused).
    pub fn set_pool_features(&mut self, on: bool) {
        if let Pretrainer::VJepa(m) = self {
            m.set_pool_features(on);
        }
    }

    /// See [`VJepa::set_compute_dtype`]. The pixel objective computes in f32 only: asking it
    /// for anything else is refused.
    pub fn set_compute_dtype(&mut self, dtype: candle_core::DType) -> Result<(), ModelError> {
        match self {
            Pretrainer::VJepa(m) => m.set_compute_dtype(dtype),
            Pretrainer::Pixel(_) if dtype == candle_core::DType::F32 => Ok(()),
            Pretrainer::Pixel(_) => Err(ModelError::Unsupported(format!(
                "compute dtype {dtype:?} with objective pixel (f32 only)"
            ))),
        }
    }

    /// See [`VJepa::compute_gradients`] / [`PixelMae::compute_gradients`].
    pub fn compute_gradients(&self, batch: &TrainBatch) -> Result<Gradients, ModelError> {
        each!(self, m => m.compute_gradients(batch))
    }

    /// Activation checkpointing ([`VJepa::set_activation_checkpointing`]); the pixel objective
    /// has none and refuses `true`.
    pub fn set_activation_checkpointing(&mut self, on: bool) -> Result<(), ModelError> {
        match self {
            Pretrainer::VJepa(m) => {
                m.set_activation_checkpointing(on);
                Ok(())
            }
            Pretrainer::Pixel(_) if on => Err(ModelError::Config(
                "activation checkpointing is V-JEPA's; the pixel objective has none".into(),
            )),
            Pretrainer::Pixel(_) => Ok(()),
        }
    }

    /// The target pass on a thread and stream of its own ([`VJepa::set_target_stream`]); the
    /// pixel objective has no target encoder and refuses `true`.
    pub fn set_target_stream(&mut self, on: bool) -> Result<(), ModelError> {
        match self {
            Pretrainer::VJepa(m) => m.set_target_stream(on),
            Pretrainer::Pixel(_) if on => Err(ModelError::Config(
                "a target stream is V-JEPA's; the pixel objective has no target encoder".into(),
            )),
            Pretrainer::Pixel(_) => Ok(()),
        }
    }

    /// [`Self::compute_gradients`], running `meanwhile` on the host while the device computes
    /// the step (after it is queued, before it is waited for).
    pub fn compute_gradients_overlapping(
        &self,
        batch: &TrainBatch,
        meanwhile: impl FnOnce(),
    ) -> Result<Gradients, ModelError> {
        each!(self, m => m.compute_gradients_overlapping(batch, meanwhile))
    }

    /// Gradients of a worker without samples; `masks` is the number of mask configs of a
    /// V-JEPA batch (the pixel objective always has one tube mask).
    pub fn empty_gradients(&self, masks: usize) -> Gradients {
        match self {
            Pretrainer::VJepa(m) => m.empty_gradients(masks),
            Pretrainer::Pixel(m) => m.empty_gradients(),
        }
    }

    /// See [`VJepa::flatten_gradients`].
    pub fn flatten_gradients(&self, g: &Gradients) -> Result<FlatGradients, ModelError> {
        each!(self, m => m.flatten_gradients(g))
    }

    /// See [`VJepa::set_flat_gradients`].
    pub fn set_flat_gradients(
        &self,
        g: &mut Gradients,
        flat: &FlatGradients,
    ) -> Result<(), ModelError> {
        each!(self, m => m.set_flat_gradients(g, flat))
    }

    /// See [`VJepa::apply_gradients`] / [`PixelMae::apply_gradients`].
    pub fn apply_gradients(&mut self, g: Gradients) -> Result<StepStats, ModelError> {
        each!(self, m => m.apply_gradients(g))
    }

    /// See [`VJepa::params_digest`].
    pub fn params_digest(&self) -> Result<u64, ModelError> {
        each!(self, m => m.params_digest())
    }

    /// See [`VJepa::to_safetensors_with`] / [`PixelMae::to_safetensors_with`].
    pub fn to_safetensors_with(&self, extra: &[(String, String)]) -> Result<Vec<u8>, ModelError> {
        each!(self, m => m.to_safetensors_with(extra))
    }
}
