//! Parameter specs, seeded init and a name → tensor map (our stand-in for a VarBuilder).
//!
//! Every module lists its parameters as [`ParamSpec`]s (checkpoint name, shape, init). The same
//! list drives init, parameter counting without allocation, checkpoint validation and the
//! optimiser's group assignment, so the four can't drift apart.

use std::collections::HashMap;

use candle_core::Tensor;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::Normal;

use crate::ModelError;

/// How a fresh parameter is filled (spec §3 "Weight init", effective result).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Init {
    /// N(0, 0.02²), truncated at ±2 absolute (i.e. practically untruncated).
    TruncNormal,
    /// All zeros (biases, mask tokens).
    Zeros,
    /// All ones (LayerNorm weights).
    Ones,
}

/// One trainable parameter: checkpoint name (without module prefix), shape and init.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamSpec {
    /// Name as in the official state dict, e.g. `blocks.0.attn.qkv.weight`.
    pub name: String,
    /// Shape as stored in the checkpoint.
    pub shape: Vec<usize>,
    /// Fresh-model init.
    pub init: Init,
}

impl ParamSpec {
    pub(crate) fn new(name: impl Into<String>, shape: &[usize], init: Init) -> Self {
        Self {
            name: name.into(),
            shape: shape.to_vec(),
            init,
        }
    }

    /// Element count.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether the spec's weight-decay rule applies: name lacks "bias" and ndim ≠ 1 (so mask
    /// tokens are decayed, biases and LayerNorm parameters are not).
    pub fn decayed(&self) -> bool {
        is_decayed(&self.name, self.shape.len())
    }
}

/// The spec §7 group rule on a name and a rank.
pub fn is_decayed(name: &str, ndim: usize) -> bool {
    !name.contains("bias") && ndim != 1
}

/// Seeded generator of init values; one stream for the whole model so init is reproducible.
pub(crate) struct InitRng {
    rng: ChaCha8Rng,
    normal: Normal<f64>,
}

impl InitRng {
    pub(crate) fn new(seed: u64) -> Result<Self, ModelError> {
        let normal = Normal::new(0.0, 0.02)
            .map_err(|e| ModelError::Config(format!("init distribution: {e}")))?;
        Ok(Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
            normal,
        })
    }

    /// Values for one spec, in row-major order.
    pub(crate) fn values(&mut self, spec: &ParamSpec) -> Vec<f32> {
        let n = spec.numel();
        match spec.init {
            Init::Zeros => vec![0.0; n],
            Init::Ones => vec![1.0; n],
            Init::TruncNormal => (0..n)
                .map(|_| {
                    loop {
                        let v: f64 = self.rng.sample(self.normal);
                        if v.abs() <= 2.0 {
                            break v as f32;
                        }
                    }
                })
                .collect(),
        }
    }
}

/// Name → tensor map that modules are built from; lookups check the shape and name the culprit.
#[derive(Clone, Debug, Default)]
pub struct ParamMap {
    map: HashMap<String, Tensor>,
}

impl ParamMap {
    /// Empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces a tensor.
    pub fn insert(&mut self, name: impl Into<String>, t: Tensor) {
        self.map.insert(name.into(), t);
    }

    /// The tensor called `name`, which must have `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor, ModelError> {
        let t = self
            .map
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor(name.to_string()))?;
        if t.dims() != shape {
            return Err(ModelError::TensorShape {
                name: name.to_string(),
                expected: shape.to_vec(),
                actual: t.dims().to_vec(),
            });
        }
        Ok(t.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decay_rule() {
        assert!(is_decayed("blocks.0.attn.qkv.weight", 2));
        assert!(is_decayed("mask_tokens.0", 3));
        assert!(is_decayed("patch_embed.proj.weight", 5));
        assert!(!is_decayed("blocks.0.attn.qkv.bias", 1));
        assert!(!is_decayed("norm.weight", 1));
    }

    #[test]
    fn init_is_seeded() {
        let spec = ParamSpec::new("w", &[4, 8], Init::TruncNormal);
        let a = InitRng::new(7).unwrap().values(&spec);
        let b = InitRng::new(7).unwrap().values(&spec);
        let c = InitRng::new(8).unwrap().values(&spec);
        assert_eq!(a, b);
        assert_ne!(a, c);
        let std = (a.iter().map(|v| v * v).sum::<f32>() / a.len() as f32).sqrt();
        assert!(std > 0.01 && std < 0.04, "std {std}");
    }

    #[test]
    fn map_reports_name() {
        let mut m = ParamMap::new();
        m.insert(
            "a",
            Tensor::zeros((2, 3), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap(),
        );
        assert!(m.get("a", &[2, 3]).is_ok());
        let e = m.get("a", &[3, 2]).unwrap_err().to_string();
        assert!(e.contains('a') && e.contains("[3, 2]"), "{e}");
        let e = m.get("b", &[1]).unwrap_err().to_string();
        assert!(e.contains('b'), "{e}");
    }
}
