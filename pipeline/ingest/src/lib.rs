//! GStreamer ingest for vjepa-stream.
//!
//! * [`Decoder::decode`] decodes the frames a training clip needs from one object-store object:
//!   ranged reads with read-ahead ([`ObjectSource`], [`ReadAhead`]) → `appsrc` (random access)
//!   → `decodebin` → `videoconvert` → `appsink` (8-bit I420). The caller picks the frame
//!   indices once the stream's [`VideoInfo`] is known (spec §1: the caller computes indices;
//!   this crate decodes them). Big gaps before the wanted frames are skipped with a key-frame
//!   seek; decoding stops at the last wanted frame.
//! * [`ClipTensor`] crops, resizes and colour-converts each frame straight into the normalised
//!   `[3, T, S, S]` clip tensor (scaling before colour conversion, on output pixels only);
//!   [`Decoder::decode_clip`] gives plain RGB frames instead. [`ViewTensor`] makes the official
//!   evaluation's views ([`eval_views`]: the whole frame resized as OpenCV does, then cropped).
//! * Anything wrong with the input becomes [`IngestError::Quarantine`] with a stable
//!   [`QuarantineReason`]; a corrupt video never panics and never hangs (every wait is bounded by
//!   [`DecoderOptions::deadline`]).
//! * [`make_samples`] writes a small corpus of real encoded videos (H.264/MP4 and VP9/WebM made
//!   by GStreamer's encoders) for tests and demos.
//!
//! Call [`init`] once per process before anything else (it is idempotent and the other entry
//! points call it too).

mod clock;
mod container;
mod cv2_resize;
mod decode;
mod error;
mod eval_view;
mod frame;
mod hwdecode;
mod known;
mod samples;
mod skip;
mod source;

pub use container::{ContainerFacts, FrameTimes};
pub use cv2_resize::Cv2Linear;
pub use decode::{DecodeStats, DecodedClip, Decoder, DecoderOptions, FrameSink, VideoInfo};
pub use error::{IngestError, QuarantineReason};
pub use eval_view::{EvalView, ViewTensor, eval_views, resized_size};
pub use frame::{ClipGeometry, ClipTensor, Colour, YuvFrame};
pub use hwdecode::{VideoDecoderKind, check_available as check_video_decoder, nvdec_decoders};
pub use known::{DEFAULT_KNOWN_VIDEOS, KnownVideos};
pub use samples::{
    SampleCodec, SampleOverrides, SampleSpec, default_sample_specs, make_sample, make_samples,
    make_samples_with, sample_specs,
};
pub use source::{
    Abandon, ByteSource, DEFAULT_READ_TIMEOUT, ObjectSource, ReadAhead, ReadAheadOptions,
};

use gstreamer as gst;
use std::sync::OnceLock;

/// Elements the decoder needs; missing ones are an installation problem ([`IngestError::Fatal`]).
const REQUIRED_ELEMENTS: [&str; 6] = [
    "appsrc",
    "decodebin",
    "videoconvert",
    "appsink",
    "fakesink",
    "typefind",
];

static INIT: OnceLock<Result<(), String>> = OnceLock::new();

/// Initialises GStreamer and checks that the elements the decoder needs are installed.
///
/// Call once per process (idempotent; later calls return the first call's result) before
/// anything else. Fails with [`IngestError::Fatal`] when GStreamer cannot start or a required
/// element (`appsrc`, `decodebin`, `videoconvert`, `appsink`, …) is missing.
pub fn init() -> Result<(), IngestError> {
    INIT.get_or_init(|| {
        gst::init().map_err(|e| format!("gst::init failed: {e}"))?;
        let missing: Vec<&str> = REQUIRED_ELEMENTS
            .iter()
            .copied()
            .filter(|name| gst::ElementFactory::find(name).is_none())
            .collect();
        if !missing.is_empty() {
            return Err(format!(
                "GStreamer elements missing from this installation: {}",
                missing.join(", ")
            ));
        }
        tracing::info!(version = %gst::version_string(), "GStreamer initialised");
        Ok(())
    })
    .clone()
    .map_err(IngestError::Fatal)
}
