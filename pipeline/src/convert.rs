//! `vjepa convert`: official `.pth.tar` checkpoints ↔ our safetensors checkpoints.
//!
//! The direction comes from the extensions (`.pth.tar` / `.pth` vs `.safetensors`); locations
//! are local paths or store URLs as elsewhere. An official file does not record head counts or
//! the optimisation settings, so reading one needs the job config; our own files carry theirs.

use anyhow::Context;
use bytes::Bytes;

use vjepa_model::{Device, ModelConfigs, ModelError, PthExport, VJepa};

use crate::config::JobConfig;
use crate::job::{read_location, split_location_with};

/// Checkpoint file kinds, by extension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `torch.save` zip pickle in the official layout (spec §8).
    Pth,
    /// Our safetensors checkpoint.
    SafeTensors,
}

impl Format {
    /// The kind a location names, from its extension.
    pub fn of(location: &str) -> Option<Self> {
        let l = location.to_ascii_lowercase();
        if l.ends_with(".pth.tar") || l.ends_with(".pth") {
            Some(Self::Pth)
        } else if l.ends_with(".safetensors") {
            Some(Self::SafeTensors)
        } else {
            None
        }
    }
}

/// Why a conversion failed; the binary maps the first two to exit code 2.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// Arguments that can't work (extensions, a missing config).
    #[error("{0}")]
    Usage(String),
    /// The input is not a valid checkpoint for the model (the message names the tensor).
    #[error("{location}: {source}")]
    BadCheckpoint {
        /// Input location.
        location: String,
        /// What is wrong.
        source: ModelError,
    },
    /// Reading or writing failed.
    #[error(transparent)]
    Io(#[from] anyhow::Error),
}

/// What a conversion did.
#[derive(Clone, Debug)]
pub struct ConvertSummary {
    pub steps_done: u64,
    /// The official file's `epoch`, when the input was one and had it.
    pub epoch: Option<u64>,
    /// Whether AdamW state was carried over (false: the output has fresh optimiser state).
    pub optimizer_state: bool,
    pub bytes_written: usize,
}

/// The model configs a job config describes (for reading official files).
pub fn model_configs(cfg: &JobConfig) -> Result<ModelConfigs, ConvertError> {
    let ipe = cfg.raw.optimization.ipe.ok_or_else(|| {
        ConvertError::Usage(
            "the config has no optimization.ipe: the optimiser schedules of the converted \
             checkpoint need it"
                .into(),
        )
    })?;
    Ok(ModelConfigs {
        encoder: cfg.encoder_config(),
        predictor: cfg.predictor_config(),
        optim: cfg.optim_config(ipe),
        seed: cfg.raw.meta.seed,
    })
}

/// Converts the checkpoint at `input` into the other format at `output`.
pub fn convert(
    input: &str,
    output: &str,
    cfg: Option<&JobConfig>,
) -> Result<ConvertSummary, ConvertError> {
    let kind = |loc: &str| {
        Format::of(loc).ok_or_else(|| {
            ConvertError::Usage(format!(
                "{loc}: unknown checkpoint extension (use .pth.tar, .pth or .safetensors)"
            ))
        })
    };
    let (from, to) = (kind(input)?, kind(output)?);
    if from == to {
        return Err(ConvertError::Usage(format!(
            "{input} and {output} are both {}: nothing to convert",
            match from {
                Format::Pth => "official .pth.tar checkpoints",
                Format::SafeTensors => ".safetensors checkpoints",
            }
        )));
    }
    let s3 = cfg.map(JobConfig::s3_settings).unwrap_or_default();
    let runtime = crate::job::io_runtime()?;
    let bytes = read_location(runtime.handle(), input, &s3)?;
    let bad = |source| ConvertError::BadCheckpoint {
        location: input.to_string(),
        source,
    };
    let (out, summary) = match from {
        Format::Pth => {
            let configs = cfg.map(model_configs).transpose()?;
            let (model, info) =
                VJepa::from_pth(&bytes, configs.as_ref(), &Device::Cpu).map_err(|e| match e {
                    ModelError::Config(m) if configs.is_none() => {
                        ConvertError::Usage(format!("{input}: {m} (--config job.yaml)"))
                    }
                    e => bad(e),
                })?;
            let out = model.to_safetensors().map_err(bad)?;
            let summary = ConvertSummary {
                steps_done: model.steps_done(),
                epoch: info.epoch,
                optimizer_state: info.optimizer_state,
                bytes_written: out.len(),
            };
            (out, summary)
        }
        Format::SafeTensors => {
            let model = VJepa::from_safetensors(&bytes, &Device::Cpu).map_err(bad)?;
            let export = PthExport {
                iterations_per_epoch: cfg.and_then(|c| c.raw.optimization.ipe),
                batch_size: cfg.map(|c| c.raw.data.batch_size as u64),
                world_size: None,
            };
            let out = model.to_pth(&export).map_err(bad)?;
            let summary = ConvertSummary {
                steps_done: model.steps_done(),
                epoch: None,
                optimizer_state: true,
                bytes_written: out.len(),
            };
            (out, summary)
        }
    };
    let (store, rel) = split_location_with(output, &s3, true)?;
    runtime
        .block_on(store.put(&rel, Bytes::from(out)))
        .with_context(|| format!("writing {}", vjepa_storage::redact_url(output)))?;
    Ok(summary)
}
