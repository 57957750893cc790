//! The records that flow between stages. Timestamps are step (batch) numbers.

use serde::{Deserialize, Serialize};

use crate::masking::BatchMask;
use crate::transform::TransformParams;

/// Ask for the clip in `slot` of batch `step`; `global_index = step * batch_size + slot` names it
/// in the run's deterministic sequence of draws.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClipRequest {
    pub step: u64,
    pub slot: usize,
    pub global_index: u64,
}

/// A decoded, cropped, normalised clip: f32 `[3, T, S, S]`, channel-major.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Clip {
    pub step: u64,
    pub slot: usize,
    pub uri: String,
    /// Frame numbers read from the source video (spec §1 sampling).
    pub frame_indices: Vec<u64>,
    pub params: TransformParams,
    pub data: Vec<f32>,
    /// Object-store bytes fetched to decode this clip (ranged reads, read-ahead included).
    pub bytes_read: u64,
    /// Wall-clock seconds spent fetching and decoding this clip.
    pub decode_s: f64,
    /// An NVDEC decoder decoded it (`workers.video_decoder: nvdec`); `false`: software.
    pub nvdec: bool,
}

/// A video that could not be used, with a reason from a small stable vocabulary.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quarantined {
    pub uri: String,
    pub reason: String,
    pub detail: String,
    pub time_unix_us: i64,
    /// The object version found bad (its ETag, unquoted), when known: a replacement under the
    /// same name is not covered by this record.
    #[serde(default)]
    pub object_tag: Option<String>,
}

/// What loading one clip request produced: the clip, and any videos refused on the way.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Loaded {
    Clip(Clip),
    Bad(Quarantined),
}

/// All clips of one step, in slot order.
#[derive(Clone, Debug)]
pub struct Batch {
    pub step: u64,
    pub clips: Vec<Clip>,
}

/// A batch with one [`BatchMask`] per mask config.
#[derive(Clone, Debug)]
pub struct MaskedBatch {
    pub batch: Batch,
    pub masks: Vec<BatchMask>,
}
