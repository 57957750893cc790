//! A small corpus of real encoded videos, made with GStreamer's encoders from `videotestsrc`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use gst::prelude::*;
use gstreamer as gst;

use crate::error::IngestError;

/// How long making one sample may take before it is abandoned.
const SAMPLE_TIMEOUT: Duration = Duration::from_secs(120);

/// Codec and container of a sample video.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SampleCodec {
    /// H.264 (`x264enc`, B-frames) in MP4 (`mp4mux` default: `moov` index at the end).
    H264Mp4,
    /// H.264 in MP4 with `faststart` (`moov` before the media data).
    H264Mp4Faststart,
    /// VP9 (`vp9enc`, realtime settings) in WebM (`webmmux`).
    Vp9Webm,
}

impl SampleCodec {
    /// All codecs, in the order [`default_sample_specs`] cycles through them.
    pub const ALL: [SampleCodec; 3] = [
        SampleCodec::H264Mp4,
        SampleCodec::Vp9Webm,
        SampleCodec::H264Mp4Faststart,
    ];

    /// File extension without the dot (`mp4`, `webm`).
    pub fn extension(&self) -> &'static str {
        match self {
            SampleCodec::H264Mp4 | SampleCodec::H264Mp4Faststart => "mp4",
            SampleCodec::Vp9Webm => "webm",
        }
    }

    /// Short name used in file names (`h264`, `h264fs`, `vp9`).
    pub fn as_str(&self) -> &'static str {
        match self {
            SampleCodec::H264Mp4 => "h264",
            SampleCodec::H264Mp4Faststart => "h264fs",
            SampleCodec::Vp9Webm => "vp9",
        }
    }
}

/// One sample video to make.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SampleSpec {
    /// File stem; the file is `{name}.{codec.extension()}`.
    pub name: String,
    /// Frame width (even).
    pub width: u32,
    /// Frame height (even).
    pub height: u32,
    /// Number of frames written.
    pub frames: u32,
    /// Frame rate (frames per second, integer).
    pub fps: u32,
    /// Codec and container.
    pub codec: SampleCodec,
    /// `videotestsrc` pattern nick, optionally followed by more `videotestsrc` properties as
    /// whitespace-separated `key=value`, e.g. `"ball"`, `"smpte horizontal-speed=4"`,
    /// `"zone-plate kt=20"`.
    pub pattern: String,
}

impl SampleSpec {
    /// The file name this spec is written to.
    pub fn file_name(&self) -> String {
        format!("{}.{}", self.name, self.codec.extension())
    }
}

/// Patterns used by [`default_sample_specs`]; all of them move from frame to frame.
const PATTERNS: [&str; 6] = [
    "ball",
    "smpte horizontal-speed=4",
    "snow",
    "zone-plate kt=20",
    "pinwheel horizontal-speed=3",
    "gamut horizontal-speed=2",
];
const SIZES: [(u32, u32); 4] = [(320, 240), (160, 120), (256, 192), (192, 144)];
const LENGTHS: [u32; 5] = [100, 40, 150, 72, 120];
const RATES: [u32; 4] = [30, 25, 24, 15];

/// A varied mix of `count` sample specs, cycling codecs, patterns, sizes (160×120 … 320×240),
/// lengths (40 … 150 frames) and rates (15 … 30 fps). Deterministic: the same `count` always
/// gives the same specs and file names (`sample-0000-h264-320x240-100f-30fps`, …).
pub fn default_sample_specs(count: usize) -> Vec<SampleSpec> {
    (0..count)
        .map(|i| {
            let codec = SampleCodec::ALL[i % SampleCodec::ALL.len()];
            let (width, height) = SIZES[i % SIZES.len()];
            let frames = LENGTHS[i % LENGTHS.len()];
            let fps = RATES[i % RATES.len()];
            let pattern = PATTERNS[i % PATTERNS.len()].to_string();
            SampleSpec {
                name: format!(
                    "sample-{i:04}-{}-{width}x{height}-{frames}f-{fps}fps",
                    codec.as_str()
                ),
                width,
                height,
                frames,
                fps,
                codec,
                pattern,
            }
        })
        .collect()
}

/// Makes `count` sample videos ([`default_sample_specs`]) in `dir` (created if needed) and
/// returns their paths in spec order. Existing files of the same name are overwritten.
pub fn make_samples(dir: &Path, count: usize) -> Result<Vec<PathBuf>, IngestError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| IngestError::Fatal(format!("creating {}: {e}", dir.display())))?;
    default_sample_specs(count)
        .iter()
        .map(|spec| make_sample(dir, spec))
        .collect()
}

fn make_element(factory: &str) -> Result<gst::Element, IngestError> {
    gst::ElementFactory::make(factory)
        .build()
        .map_err(|e| IngestError::Fatal(format!("cannot create GStreamer element {factory}: {e}")))
}

/// Sets a property from its string form, refusing unknown properties and bad values.
fn set_from_str(element: &gst::Element, key: &str, value: &str) -> Result<(), IngestError> {
    let bad = |why: &str| {
        IngestError::Fatal(format!(
            "cannot set {key}={value} on {}: {why}",
            element.name()
        ))
    };
    let pspec = element
        .find_property(key)
        .ok_or_else(|| bad("no such property"))?;
    if !pspec.flags().contains(gst::glib::ParamFlags::WRITABLE) {
        return Err(bad("property is not writable"));
    }
    let v = gst::glib::Value::deserialize_with_pspec(value, &pspec)
        .map_err(|_| bad("value does not parse"))?;
    element.set_property_from_value(key, &v);
    Ok(())
}

/// Encodes one sample video into `dir` and returns its path (`dir/{spec.file_name()}`).
///
/// `videotestsrc` (pattern and properties from `spec.pattern`) → I420 at the spec's size and
/// rate → `x264enc` (superfast, 2 B-frames, one keyframe per second) + `mp4mux`, or `vp9enc`
/// (realtime, cpu-used 8) + `webmmux` → file. Errors are [`IngestError::Fatal`] (a missing
/// encoder plugin, a bad spec, an I/O error).
pub fn make_sample(dir: &Path, spec: &SampleSpec) -> Result<PathBuf, IngestError> {
    crate::init()?;
    let bad_spec =
        |why: String| IngestError::Fatal(format!("bad sample spec {}: {why}", spec.name));
    if spec.width == 0
        || spec.height == 0
        || !spec.width.is_multiple_of(2)
        || !spec.height.is_multiple_of(2)
    {
        return Err(bad_spec(format!(
            "size {}x{} must be even and non-zero",
            spec.width, spec.height
        )));
    }
    if spec.frames == 0 || spec.fps == 0 {
        return Err(bad_spec("frames and fps must be positive".into()));
    }
    let path = dir.join(spec.file_name());
    let started = Instant::now();

    let src = make_element("videotestsrc")?;
    src.set_property(
        "num-buffers",
        i32::try_from(spec.frames).unwrap_or(i32::MAX),
    );
    let mut words = spec.pattern.split_whitespace();
    if let Some(pattern) = words.next() {
        set_from_str(&src, "pattern", pattern)?;
    }
    for word in words {
        let (key, value) = word
            .split_once('=')
            .ok_or_else(|| bad_spec(format!("expected key=value, got {word:?}")))?;
        set_from_str(&src, key, value)?;
    }
    let caps = gst::Caps::builder("video/x-raw")
        .field("format", "I420")
        .field("width", i32::try_from(spec.width).unwrap_or(i32::MAX))
        .field("height", i32::try_from(spec.height).unwrap_or(i32::MAX))
        .field(
            "framerate",
            gst::Fraction::new(i32::try_from(spec.fps).unwrap_or(i32::MAX), 1),
        )
        .build();
    let filter = gst::ElementFactory::make("capsfilter")
        .property("caps", &caps)
        .build()
        .map_err(|e| IngestError::Fatal(format!("cannot create capsfilter: {e}")))?;
    let gop = spec.fps.max(1);
    let mut chain = vec![src, filter];
    match spec.codec {
        SampleCodec::H264Mp4 | SampleCodec::H264Mp4Faststart => {
            let enc = make_element("x264enc")?;
            set_from_str(&enc, "speed-preset", "superfast")?;
            enc.set_property("bframes", 2u32);
            enc.set_property("key-int-max", gop);
            let parse = make_element("h264parse")?;
            let mux = make_element("mp4mux")?;
            if spec.codec == SampleCodec::H264Mp4Faststart {
                mux.set_property("faststart", true);
            }
            chain.extend([enc, parse, mux]);
        }
        SampleCodec::Vp9Webm => {
            let enc = make_element("vp9enc")?;
            enc.set_property("deadline", 1i64);
            enc.set_property("cpu-used", 8i32);
            enc.set_property("keyframe-max-dist", i32::try_from(gop).unwrap_or(30));
            let mux = make_element("webmmux")?;
            chain.extend([enc, mux]);
        }
    }
    let sink = make_element("filesink")?;
    sink.set_property("location", path.to_string_lossy().as_ref());
    chain.push(sink);

    let pipeline = gst::Pipeline::with_name("vjepa-make-sample");
    pipeline
        .add_many(chain.iter())
        .map_err(|e| IngestError::Fatal(format!("assembling sample pipeline: {e}")))?;
    gst::Element::link_many(chain.iter())
        .map_err(|e| IngestError::Fatal(format!("linking sample pipeline: {e}")))?;
    let result = run_to_eos(&pipeline);
    if let Err(e) = pipeline.set_state(gst::State::Null) {
        tracing::warn!(error = %e, "setting the sample pipeline to Null failed");
    }
    result.map_err(|e| IngestError::Fatal(format!("making sample {}: {e}", spec.name)))?;
    tracing::debug!(
        path = %path.display(),
        elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
        "sample written"
    );
    Ok(path)
}

/// Plays `pipeline` until EOS; the first error (or the timeout) is returned as text.
fn run_to_eos(pipeline: &gst::Pipeline) -> Result<(), String> {
    let bus = pipeline.bus().ok_or("pipeline has no bus")?;
    pipeline
        .set_state(gst::State::Playing)
        .map_err(|e| format!("cannot start: {e}"))?;
    let deadline = Instant::now() + SAMPLE_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("not finished after {SAMPLE_TIMEOUT:?}"));
        }
        let Some(msg) = bus.timed_pop_filtered(
            gst::ClockTime::from_nseconds(left.as_nanos() as u64),
            &[gst::MessageType::Eos, gst::MessageType::Error],
        ) else {
            continue;
        };
        match msg.view() {
            gst::MessageView::Eos(_) => return Ok(()),
            gst::MessageView::Error(err) => {
                return Err(format!("{} ({:?})", err.error(), err.debug()));
            }
            _ => {}
        }
    }
}
