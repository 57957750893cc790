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
///
/// The metadata is written with its keys sorted, so that one state always gives the same
/// bytes: safetensors writes its `HashMap` in the process's random order, which made two
/// identical checkpoints hash differently.
pub(crate) fn serialize(
    tensors: Vec<(String, F32View)>,
    metadata: HashMap<String, String>,
) -> Result<Vec<u8>, ModelError> {
    let bytes = safetensors::serialize(tensors, Some(metadata))?;
    sorted_metadata(bytes)
}

/// Rewrites a safetensors header with its `__metadata__` keys in sorted order. The header
/// keeps its length (the same entries, reordered), so the tensor bytes stay where they are.
fn sorted_metadata(mut bytes: Vec<u8>) -> Result<Vec<u8>, ModelError> {
    let bad = |why: &str| ModelError::Checkpoint(format!("safetensors header: {why}"));
    let len_bytes: [u8; 8] = bytes
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| bad("shorter than 8 bytes"))?;
    let len = usize::try_from(u64::from_le_bytes(len_bytes)).map_err(|_| bad("length"))?;
    let end = len.checked_add(8).ok_or_else(|| bad("length"))?;
    let header = bytes
        .get(8..end)
        .ok_or_else(|| bad("length past the end"))?;
    let mut entries: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(header).map_err(|e| bad(&e.to_string()))?;
    let mut out = serde_json::Map::new();
    if let Some(meta) = entries.remove("__metadata__") {
        let meta: std::collections::BTreeMap<String, String> =
            serde_json::from_value(meta).map_err(|e| bad(&e.to_string()))?;
        let sorted: serde_json::Map<String, serde_json::Value> = meta
            .into_iter()
            .map(|(k, v)| (k, serde_json::Value::String(v)))
            .collect();
        out.insert("__metadata__".into(), serde_json::Value::Object(sorted));
    }
    out.extend(entries);
    let mut text = serde_json::to_vec(&out).map_err(|e| bad(&e.to_string()))?;
    if text.len() > len {
        return Err(bad("grew when its metadata was sorted"));
    }
    text.resize(len, b' ');
    bytes[8..end].copy_from_slice(&text);
    Ok(bytes)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn checkpoint_bytes() -> Vec<u8> {
        let t = Tensor::arange(0f32, 6.0, &Device::Cpu)
            .and_then(|t| t.reshape((2, 3)))
            .expect("tensor");
        let u = Tensor::new(&[7f32], &Device::Cpu).expect("tensor");
        let tensors = vec![
            ("b.weight".to_string(), F32View::new(&t).expect("view")),
            ("a.bias".to_string(), F32View::new(&u).expect("view")),
        ];
        // A fresh `HashMap` per call: each gets its own random iteration order.
        let meta: HashMap<String, String> = (0..24)
            .map(|i| (format!("key{i:02}"), format!("value \"{i}\"")))
            .collect();
        serialize(tensors, meta).expect("serialize")
    }

    #[test]
    fn one_state_always_gives_the_same_bytes() {
        let first = checkpoint_bytes();
        for _ in 0..8 {
            assert_eq!(checkpoint_bytes(), first);
        }
        let reader = Reader::parse(&first).expect("parse");
        assert_eq!(reader.meta("key07").expect("key"), "value \"7\"");
        assert_eq!(reader.metadata().len(), 24);
        let len = u64::from_le_bytes(first[..8].try_into().expect("8 bytes")) as usize;
        assert_eq!(len % 8, 0, "header stays padded to 8 bytes");
        let header = std::str::from_utf8(&first[8..8 + len]).expect("utf-8");
        let positions: Vec<usize> = (0..24)
            .map(|i| {
                header
                    .find(&format!("\"key{i:02}\""))
                    .expect("key in header")
            })
            .collect();
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "{header}");
        let st = SafeTensors::deserialize(&first).expect("deserialize");
        let a = st.tensor("a.bias").expect("a.bias");
        assert_eq!(a.data(), 7f32.to_le_bytes());
        assert_eq!(st.tensor("b.weight").expect("b.weight").shape(), [2, 3]);
    }
}
