//! safetensors encoding helpers (spec §8 names, f32 little-endian).
//!
//! candle-core 0.11 links safetensors 0.6 while the workspace uses 0.8, so candle's own `View`
//! impl can't be used; this small f32 view is version-independent.

use std::borrow::Cow;
use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use safetensors::tensor::{Dtype, SafeTensors, View};

use crate::ModelError;

/// An f32 tensor copied out of candle, ready for `safetensors::serialize`.
pub(crate) struct F32View {
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl F32View {
    pub(crate) fn new(t: &Tensor) -> Result<Self, ModelError> {
        let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let mut data = Vec::with_capacity(values.len() * 4);
        for v in values {
            data.extend_from_slice(&v.to_le_bytes());
        }
        Ok(Self {
            shape: t.dims().to_vec(),
            data,
        })
    }
}

impl View for F32View {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// Serialises named tensors plus string metadata.
pub(crate) fn serialize(
    tensors: Vec<(String, F32View)>,
    metadata: HashMap<String, String>,
) -> Result<Vec<u8>, ModelError> {
    Ok(safetensors::serialize(tensors, Some(metadata))?)
}

/// A parsed checkpoint: tensor lookup with named errors, plus its metadata.
pub(crate) struct Reader<'a> {
    st: SafeTensors<'a>,
    metadata: HashMap<String, String>,
}

impl<'a> Reader<'a> {
    pub(crate) fn parse(bytes: &'a [u8]) -> Result<Self, ModelError> {
        let (_, meta) = SafeTensors::read_metadata(bytes)?;
        let metadata = meta.metadata().clone().unwrap_or_default();
        Ok(Self {
            st: SafeTensors::deserialize(bytes)?,
            metadata,
        })
    }

    /// Metadata string `key`.
    pub(crate) fn meta(&self, key: &str) -> Result<&str, ModelError> {
        self.metadata
            .get(key)
            .map(String::as_str)
            .ok_or_else(|| ModelError::Checkpoint(format!("metadata key `{key}` missing")))
    }

    /// All metadata.
    pub(crate) fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    /// Metadata `key` parsed as JSON.
    pub(crate) fn meta_json<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<T, ModelError> {
        serde_json::from_str(self.meta(key)?)
            .map_err(|e| ModelError::Checkpoint(format!("metadata key `{key}`: {e}")))
    }

    /// Tensor `name`, which must be f32 with `shape`.
    pub(crate) fn tensor(
        &self,
        name: &str,
        shape: &[usize],
        device: &Device,
    ) -> Result<Tensor, ModelError> {
        let view = self
            .st
            .tensor(name)
            .map_err(|_| ModelError::MissingTensor(name.to_string()))?;
        if view.shape() != shape {
            return Err(ModelError::TensorShape {
                name: name.to_string(),
                expected: shape.to_vec(),
                actual: view.shape().to_vec(),
            });
        }
        if view.dtype() != Dtype::F32 {
            return Err(ModelError::Checkpoint(format!(
                "tensor `{name}` has dtype {:?}, expected F32",
                view.dtype()
            )));
        }
        let values: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Ok(Tensor::from_vec(values, shape, device)?)
    }
}
