//! What an evaluation run (the probe, fine-tuning) continues from after a stop: every
//! optimiser's parameters with their AdamW moments and step counts, and the steps taken, as
//! safetensors with the caller's own metadata beside (where its epochs, order and generator
//! stood). Restoring writes the values into the running model's variables, so a trainer built
//! afresh with the same shape continues exactly where the saved one stopped.

use std::collections::HashMap;

use candle_core::Device;

use crate::ModelError;
use crate::checkpoint::{F32View, Reader};
use crate::optim::AdamW;

/// Metadata `format` of a saved training state.
pub const STATE_FORMAT: &str = "vjepa-eval-train-state";

/// `opts` (each under its group name) and `steps_done` as safetensors bytes, with `meta`.
pub(crate) fn write(
    opts: &[(&str, &AdamW)],
    steps_done: u64,
    mut meta: HashMap<String, String>,
) -> Result<Vec<u8>, ModelError> {
    let mut tensors = Vec::new();
    let mut steps = HashMap::new();
    for (group, opt) in opts {
        for p in opt.params() {
            let key = format!("{group}.{}", p.name);
            tensors.push((key.clone(), F32View::new(p.var.as_tensor())?));
            tensors.push((format!("{key}.exp_avg"), F32View::new(&p.exp_avg()?)?));
            tensors.push((format!("{key}.exp_avg_sq"), F32View::new(&p.exp_avg_sq()?)?));
            steps.insert(key, p.step);
        }
    }
    meta.insert("format".into(), STATE_FORMAT.into());
    meta.insert("steps_done".into(), steps_done.to_string());
    meta.insert("param_steps".into(), crate::to_json(&steps)?);
    crate::checkpoint::serialize(tensors, meta)
}

/// Restores `opts` (each under its group name) from [`write`]'s bytes, checking every name
/// and shape before changing anything; returns the steps taken and the metadata.
pub(crate) fn read(
    bytes: &[u8],
    opts: &mut [(&str, &mut AdamW)],
) -> Result<(u64, HashMap<String, String>), ModelError> {
    let r = Reader::parse(bytes)?;
    let format = r.meta("format")?;
    if format != STATE_FORMAT {
        return Err(ModelError::Checkpoint(format!(
            "format `{format}`, expected `{STATE_FORMAT}`"
        )));
    }
    let steps_done: u64 = r
        .meta("steps_done")?
        .parse()
        .map_err(|e| ModelError::Checkpoint(format!("metadata key `steps_done`: {e}")))?;
    let steps: HashMap<String, u64> = r.meta_json("param_steps")?;
    // Everything read first, so a mismatch leaves the model as it was.
    let mut loaded = Vec::new();
    for (group, opt) in opts.iter() {
        for p in opt.params() {
            let key = format!("{group}.{}", p.name);
            let device: &Device = p.var.device();
            let shape = p.var.dims();
            let value = r.tensor(&key, shape, device)?;
            let m = r.tensor(&format!("{key}.exp_avg"), shape, device)?;
            let v = r.tensor(&format!("{key}.exp_avg_sq"), shape, device)?;
            let step = *steps
                .get(&key)
                .ok_or_else(|| ModelError::Checkpoint(format!("no step count for `{key}`")))?;
            loaded.push((value, m, v, step));
        }
    }
    let mut loaded = loaded.into_iter();
    for (_, opt) in opts.iter_mut() {
        for p in opt.params_mut() {
            let Some((value, m, v, step)) = loaded.next() else {
                return Err(ModelError::Checkpoint(
                    "state shorter than the model".into(),
                ));
            };
            p.var.set(&value.to_dtype(p.var.dtype())?)?;
            p.state = candle_core::Tensor::stack(&[&m, &v], 0)?.to_dtype(p.var.dtype())?;
            p.step = step;
        }
    }
    Ok((steps_done, r.metadata().clone()))
}
