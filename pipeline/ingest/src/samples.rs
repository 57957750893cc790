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
    /// H.265 (`x265enc`, B-frames) in MP4 (`mp4mux` default: `moov` index at the end).
    H265Mp4,
    /// H.264 (`x264enc`, B-frames) in Matroska (`matroskamux`, with cues).
    H264Mkv,
    /// H.265 (`x265enc`, B-frames) in Matroska.
    H265Mkv,
    /// AV1 (`av1enc`, libaom at `cpu-used` 8 with 19 frames of look-ahead, so hidden
    /// alt-reference frames reorder the stream) in Matroska. libaom is the slowest encoder
    /// here (about 0.6 s for 120 frames of 160×120 on one core): keep AV1 samples tiny.
    Av1Mkv,
    /// AV1 (as [`SampleCodec::Av1Mkv`]) in MP4 (`mp4mux`, `moov` at the end).
    Av1Mp4,
}

impl SampleCodec {
    /// The codecs of the quick-start corpus, in the order [`default_sample_specs`] cycles
    /// through them. Kept to the three fast, common ones so that corpus (and the file names it
    /// produces) stays stable and quick to make; [`SampleCodec::EVERY`] lists all of them.
    pub const ALL: [SampleCodec; 3] = [
        SampleCodec::H264Mp4,
        SampleCodec::Vp9Webm,
        SampleCodec::H264Mp4Faststart,
    ];

    /// Every codec/container [`make_sample`] can write (the [`SampleCodec::ALL`] ones first),
    /// for tests that must cover each format the decoder claims to read.
    pub const EVERY: [SampleCodec; 8] = [
        SampleCodec::H264Mp4,
        SampleCodec::Vp9Webm,
        SampleCodec::H264Mp4Faststart,
        SampleCodec::H265Mp4,
        SampleCodec::H264Mkv,
        SampleCodec::H265Mkv,
        SampleCodec::Av1Mkv,
        SampleCodec::Av1Mp4,
    ];

    /// File extension without the dot (`mp4`, `webm`, `mkv`).
    pub fn extension(&self) -> &'static str {
        match self {
            SampleCodec::H264Mp4
            | SampleCodec::H264Mp4Faststart
            | SampleCodec::H265Mp4
            | SampleCodec::Av1Mp4 => "mp4",
            SampleCodec::Vp9Webm => "webm",
            SampleCodec::H264Mkv | SampleCodec::H265Mkv | SampleCodec::Av1Mkv => "mkv",
        }
    }

    /// Short name used in file names (`h264`, `h264fs`, `vp9`, `h265`, `h264mkv`, `h265mkv`,
    /// `av1mkv`, `av1mp4`); unique per variant, so samples of different codecs never collide.
    pub fn as_str(&self) -> &'static str {
        match self {
            SampleCodec::H264Mp4 => "h264",
            SampleCodec::H264Mp4Faststart => "h264fs",
            SampleCodec::Vp9Webm => "vp9",
            SampleCodec::H265Mp4 => "h265",
            SampleCodec::H264Mkv => "h264mkv",
            SampleCodec::H265Mkv => "h265mkv",
            SampleCodec::Av1Mkv => "av1mkv",
            SampleCodec::Av1Mp4 => "av1mp4",
        }
    }
}

impl std::str::FromStr for SampleCodec {
    type Err = String;

    /// The codec of a short name ([`SampleCodec::as_str`]); the error lists the names.
    fn from_str(name: &str) -> Result<Self, Self::Err> {
        SampleCodec::EVERY
            .into_iter()
            .find(|c| c.as_str() == name)
            .ok_or_else(|| {
                let names: Vec<&str> = SampleCodec::EVERY.iter().map(|c| c.as_str()).collect();
                format!("unknown codec {name:?}; one of {}", names.join(", "))
            })
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
    /// `"zone-plate kt=20"`. A bare `"snow"` is noise of our own, seeded by the sample's name
    /// (the same in any process; `videotestsrc`'s draws from one generator per process).
    pub pattern: String,
    /// Target bitrate in kbit/s (constant-bitrate mode where the encoder has one); `None`:
    /// each encoder's default (`x264enc`/`x265enc` 2048 kbit/s CBR, `vp9enc`/`av1enc`
    /// 256 kbit/s).
    pub bitrate_kbps: Option<u32>,
    /// Frames between keyframes; `None`: one per second (`fps` frames). Longer GOPs make a
    /// seek decode more frames, as in real footage (x264's default is 250).
    pub keyframe_interval: Option<u32>,
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
    sample_specs(count, &SampleOverrides::default())
}

/// What a corpus of one kind fixes in [`sample_specs`] instead of cycling it: benchmarks want
/// every video at one resolution, length, codec and bitrate (e.g. 720p H.264 at 3 Mbit/s),
/// still with varied content.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SampleOverrides {
    /// Frame size (width, height), both even.
    pub size: Option<(u32, u32)>,
    /// Frames per video.
    pub frames: Option<u32>,
    /// Frame rate.
    pub fps: Option<u32>,
    /// Codec and container.
    pub codec: Option<SampleCodec>,
    /// See [`SampleSpec::bitrate_kbps`].
    pub bitrate_kbps: Option<u32>,
    /// See [`SampleSpec::keyframe_interval`].
    pub keyframe_interval: Option<u32>,
    /// Content patterns to cycle through instead of the default six (see
    /// [`SampleSpec::pattern`]). Several of those compress far below a set bitrate (a ball on
    /// black is mostly skipped blocks) and decode much faster than camera footage; a decode
    /// benchmark picks ones that fill the rate, e.g. `"smpte horizontal-speed=4"` and `"snow"`.
    pub patterns: Vec<String>,
}

/// [`default_sample_specs`] with `overrides` fixing some of what it cycles (the content
/// patterns always cycle, through the given ones if any). File names say the resulting codec, size, length and rate, plus
/// the bitrate when one is set (`sample-0000-h264-1280x720-300f-30fps-3000kbps`).
pub fn sample_specs(count: usize, overrides: &SampleOverrides) -> Vec<SampleSpec> {
    (0..count)
        .map(|i| {
            let codec = overrides
                .codec
                .unwrap_or(SampleCodec::ALL[i % SampleCodec::ALL.len()]);
            let (width, height) = overrides.size.unwrap_or(SIZES[i % SIZES.len()]);
            let frames = overrides.frames.unwrap_or(LENGTHS[i % LENGTHS.len()]);
            let fps = overrides.fps.unwrap_or(RATES[i % RATES.len()]);
            let pattern = if overrides.patterns.is_empty() {
                PATTERNS[i % PATTERNS.len()].to_string()
            } else {
                overrides.patterns[i % overrides.patterns.len()].clone()
            };
            let rate = overrides
                .bitrate_kbps
                .map(|k| format!("-{k}kbps"))
                .unwrap_or_default();
            SampleSpec {
                name: format!(
                    "sample-{i:04}-{}-{width}x{height}-{frames}f-{fps}fps{rate}",
                    codec.as_str()
                ),
                width,
                height,
                frames,
                fps,
                codec,
                pattern,
                bitrate_kbps: overrides.bitrate_kbps,
                keyframe_interval: overrides.keyframe_interval,
            }
        })
        .collect()
}

/// Makes `count` sample videos ([`default_sample_specs`]) in `dir` (created if needed) and
/// returns their paths in spec order. Existing files of the same name are overwritten.
pub fn make_samples(dir: &Path, count: usize) -> Result<Vec<PathBuf>, IngestError> {
    make_samples_with(dir, count, &SampleOverrides::default())
}

/// [`make_samples`] with [`sample_specs`]`(count, overrides)`, several at a time (one per
/// core). A fresh process makes the same pictures every time (the containers' creation times
/// differ): the samples whose pattern draws `videotestsrc`'s noise (`smpte`, and `snow` with
/// properties; a bare `snow` is our own, seeded per sample) are made one after another, in
/// order, from a generator the whole process shares, so a second corpus made in the same
/// process continues that generator and differs in those samples.
pub fn make_samples_with(
    dir: &Path,
    count: usize,
    overrides: &SampleOverrides,
) -> Result<Vec<PathBuf>, IngestError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| IngestError::Fatal(format!("creating {}: {e}", dir.display())))?;
    let specs = sample_specs(count, overrides);
    let workers = std::thread::available_parallelism().map_or(1, usize::from);
    make_in_parallel(dir, &specs, workers)
}

/// Whether `pattern` draws from `videotestsrc`'s noise generator: one linear congruential
/// state per process, shared by every `videotestsrc` (`snow` everywhere, `smpte` in its
/// bottom-right patch), so such samples only come out the same when made one after another,
/// in the same order. A bare `snow` is ours ([`OwnSnow`]) and draws from nothing shared.
fn draws_noise(pattern: &str) -> bool {
    !is_own_snow(pattern) && matches!(pattern.split_whitespace().next(), Some("snow" | "smpte"))
}

/// Whether `pattern` is [`OwnSnow`]'s: `snow` with no properties.
fn is_own_snow(pattern: &str) -> bool {
    pattern.trim() == "snow"
}

/// Television snow of our own for the pattern `snow` (without further properties): grey noise
/// like `videotestsrc`'s (luma spread over 16–235, neutral chroma), from a generator seeded by
/// the sample's name and each frame's number, so a sample is the same whichever process or
/// thread makes it and samples can be made side by side. It fills any bitrate, which is why
/// decode benchmarks use it.
struct OwnSnow {
    width: usize,
    height: usize,
    frames: u32,
    fps: u32,
    seed: u64,
}

impl OwnSnow {
    fn of(spec: &SampleSpec) -> Option<Self> {
        is_own_snow(&spec.pattern).then(|| OwnSnow {
            width: spec.width as usize,
            height: spec.height as usize,
            frames: spec.frames,
            fps: spec.fps,
            // FNV-1a of the name: stable across runs and machines.
            seed: spec.name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
            }),
        })
    }

    /// One I420 frame: noise luma, chroma at 128.
    fn frame(&self, n: u32) -> Vec<u8> {
        let luma = self.width * self.height;
        let chroma = (self.width / 2) * (self.height / 2);
        let mut data = vec![128u8; luma + 2 * chroma];
        let mut state = self.seed ^ u64::from(n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        for chunk in data[..luma].chunks_mut(8) {
            // splitmix64 (the mixer of vjepa-operators' seeding, which this crate does not link)
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            for (d, r) in chunk.iter_mut().zip(z.to_le_bytes()) {
                *d = 16 + ((u32::from(r) * 220) >> 8) as u8;
            }
        }
        data
    }

    /// Pushes every frame (timestamped at the spec's rate) and the end of the stream; stops at
    /// the first refused push (the pipeline failed or was stopped: its error is on the bus).
    fn push_all(&self, app: &gstreamer_app::AppSrc) {
        // Frame n starts at n / fps seconds, rounded down to the nanosecond (as videotestsrc).
        let at = |n: u32| u64::from(n) * 1_000_000_000 / u64::from(self.fps.max(1));
        for n in 0..self.frames {
            let mut buffer = gst::Buffer::from_mut_slice(self.frame(n));
            if let Some(b) = buffer.get_mut() {
                b.set_pts(gst::ClockTime::from_nseconds(at(n)));
                b.set_duration(gst::ClockTime::from_nseconds(at(n + 1) - at(n)));
            }
            if app.push_buffer(buffer).is_err() {
                return;
            }
        }
        let _ = app.end_of_stream();
    }
}

/// Makes `specs` on up to `workers` threads and returns the paths in spec order (or the first
/// error, in spec order). The specs that draw noise ([`draws_noise`]) are one unit of work,
/// made in spec order on one thread, so a fresh process makes the same corpus every time; the
/// others (each encoder single-threaded, see [`make_sample`]) are one unit each.
fn make_in_parallel(
    dir: &Path,
    specs: &[SampleSpec],
    workers: usize,
) -> Result<Vec<PathBuf>, IngestError> {
    let (noisy, rest): (Vec<usize>, Vec<usize>) =
        (0..specs.len()).partition(|&i| draws_noise(&specs[i].pattern));
    let mut units: Vec<Vec<usize>> = Vec::with_capacity(rest.len() + 1);
    if !noisy.is_empty() {
        units.push(noisy);
    }
    units.extend(rest.into_iter().map(|i| vec![i]));
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut made: Vec<(usize, Result<PathBuf, IngestError>)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..workers.clamp(1, units.len().max(1)))
            .map(|_| {
                scope.spawn(|| {
                    let mut made = Vec::new();
                    while let Some(unit) =
                        units.get(next.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
                    {
                        made.extend(unit.iter().map(|&i| (i, make_sample(dir, &specs[i]))));
                    }
                    made
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    made.sort_by_key(|(i, _)| *i);
    made.into_iter().map(|(_, r)| r).collect()
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
/// rate → encoder with one keyframe per second (`spec.fps` frames) → muxer → file. Encoders:
/// `x264enc` / `x265enc` (superfast, 2 B-frames), `vp9enc` (realtime, cpu-used 8), `av1enc`
/// (cpu-used 8, 19 frames look-ahead); muxers: `mp4mux` (`moov` at the end unless faststart),
/// `webmmux`, `matroskamux`. Errors are [`IngestError::Fatal`] (a missing encoder plugin, a bad
/// spec, an I/O error).
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
    if spec.bitrate_kbps == Some(0) || spec.keyframe_interval == Some(0) {
        return Err(bad_spec(
            "bitrate and keyframe interval must be positive".into(),
        ));
    }
    let path = dir.join(spec.file_name());
    let started = Instant::now();

    // `snow` on its own is our noise (see `OwnSnow`); any other pattern is videotestsrc's.
    let snow = OwnSnow::of(spec);
    let src = match &snow {
        Some(_) => make_element("appsrc")?,
        None => {
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
            src
        }
    };
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
    let gop = spec.keyframe_interval.unwrap_or(spec.fps).max(1);
    let mut chain = vec![src, filter];
    let encoder = match spec.codec {
        SampleCodec::H264Mp4 | SampleCodec::H264Mp4Faststart | SampleCodec::H264Mkv => {
            let enc = make_element("x264enc")?;
            // One thread: x264's frame threads make its rate control (CBR here) depend on
            // timing, so the same input encoded twice differs; `make_samples_with` runs
            // samples side by side instead.
            enc.set_property("threads", 1u32);
            set_from_str(&enc, "speed-preset", "superfast")?;
            enc.set_property("bframes", 2u32);
            enc.set_property("key-int-max", gop);
            if let Some(k) = spec.bitrate_kbps {
                enc.set_property("bitrate", k);
            }
            vec![enc, make_element("h264parse")?]
        }
        SampleCodec::H265Mp4 | SampleCodec::H265Mkv => {
            let enc = make_element("x265enc")?;
            set_from_str(&enc, "speed-preset", "superfast")?;
            set_from_str(&enc, "key-int-max", &gop.to_string())?;
            // x265's own logging goes to stderr unless silenced; 2 B-frames as for H.264.
            set_from_str(&enc, "option-string", "bframes=2:log-level=error")?;
            if let Some(k) = spec.bitrate_kbps {
                set_from_str(&enc, "bitrate", &k.to_string())?;
            }
            vec![enc, make_element("h265parse")?]
        }
        SampleCodec::Vp9Webm => {
            let enc = make_element("vp9enc")?;
            enc.set_property("deadline", 1i64);
            enc.set_property("cpu-used", 8i32);
            enc.set_property("keyframe-max-dist", i32::try_from(gop).unwrap_or(30));
            if let Some(k) = spec.bitrate_kbps {
                // vp9enc counts bits per second.
                set_from_str(&enc, "target-bitrate", &(u64::from(k) * 1000).to_string())?;
            }
            vec![enc]
        }
        SampleCodec::Av1Mkv | SampleCodec::Av1Mp4 => {
            let enc = make_element("av1enc")?;
            // Property types differ between plugin versions: set them from strings, checked.
            set_from_str(&enc, "cpu-used", "8")?;
            set_from_str(&enc, "keyframe-max-dist", &gop.to_string())?;
            set_from_str(&enc, "lag-in-frames", "19")?;
            set_from_str(&enc, "row-mt", "true")?;
            if let Some(k) = spec.bitrate_kbps {
                set_from_str(&enc, "target-bitrate", &k.to_string())?;
            }
            vec![enc, make_element("av1parse")?]
        }
    };
    let mux = match spec.codec {
        SampleCodec::H264Mp4
        | SampleCodec::H264Mp4Faststart
        | SampleCodec::H265Mp4
        | SampleCodec::Av1Mp4 => {
            let mux = make_element("mp4mux")?;
            if spec.codec == SampleCodec::H264Mp4Faststart {
                mux.set_property("faststart", true);
            }
            mux
        }
        SampleCodec::Vp9Webm => make_element("webmmux")?,
        SampleCodec::H264Mkv | SampleCodec::H265Mkv | SampleCodec::Av1Mkv => {
            make_element("matroskamux")?
        }
    };
    chain.extend(encoder);
    chain.push(mux);
    let sink = make_element("filesink")?;
    sink.set_property("location", path.to_string_lossy().as_ref());
    chain.push(sink);

    let pipeline = gst::Pipeline::with_name("vjepa-make-sample");
    pipeline
        .add_many(chain.iter())
        .map_err(|e| IngestError::Fatal(format!("assembling sample pipeline: {e}")))?;
    gst::Element::link_many(chain.iter())
        .map_err(|e| IngestError::Fatal(format!("linking sample pipeline: {e}")))?;
    let appsrc = match &snow {
        Some(_) => Some(
            chain[0]
                .clone()
                .dynamic_cast::<gstreamer_app::AppSrc>()
                .map_err(|_| IngestError::Fatal("appsrc is not an AppSrc".into()))?,
        ),
        None => None,
    };
    if let Some(app) = &appsrc {
        app.set_caps(Some(&caps));
        app.set_format(gst::Format::Time);
        // Pushing blocks while a few frames wait: the noise is made as the encoder takes it.
        app.set_block(true);
        app.set_max_bytes(4 * u64::from(spec.width) * u64::from(spec.height));
    }
    let result = std::thread::scope(|scope| {
        if let (Some(app), Some(snow)) = (&appsrc, &snow) {
            scope.spawn(move || snow.push_all(app));
        }
        let result = run_to_eos(&pipeline);
        if result.is_err() {
            // Unblocks a push waiting for room (it then fails and the pusher stops).
            let _ = pipeline.set_state(gst::State::Null);
        }
        result
    });
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn own_snow_is_seeded_by_name_and_frame_and_looks_like_videotestsrc_snow() {
        let spec = |name: &str| SampleSpec {
            name: name.into(),
            width: 64,
            height: 48,
            frames: 3,
            fps: 30,
            codec: SampleCodec::H264Mp4,
            pattern: " snow ".into(),
            bitrate_kbps: None,
            keyframe_interval: None,
        };
        let a = OwnSnow::of(&spec("a")).expect("a bare snow is ours");
        let again = OwnSnow::of(&spec("a")).expect("ours");
        let b = OwnSnow::of(&spec("b")).expect("ours");
        let f0 = a.frame(0);
        assert_eq!(f0.len(), 64 * 48 * 3 / 2);
        assert_eq!(f0, again.frame(0), "same name and frame, same noise");
        assert_ne!(f0, a.frame(1), "frames differ");
        assert_ne!(f0, b.frame(0), "names differ");
        let (luma, chroma) = f0.split_at(64 * 48);
        assert!(luma.iter().all(|&y| (16..=235).contains(&y)));
        assert!(luma.iter().min() < Some(&40) && luma.iter().max() > Some(&210));
        assert!(chroma.iter().all(|&c| c == 128));
        // With properties it is videotestsrc's, whose generator the process shares.
        let mut props = spec("c");
        props.pattern = "snow foreground-color=0xff00ff00".into();
        assert!(OwnSnow::of(&props).is_none());
        assert!(draws_noise(&props.pattern));
        assert!(!draws_noise("snow"));
        assert!(draws_noise("smpte horizontal-speed=4"));
        assert!(!draws_noise("smpte75"));
        assert!(!draws_noise("ball"));
    }

    #[test]
    fn every_lists_each_variant_once_with_the_quickstart_ones_first() {
        assert_eq!(
            SampleCodec::EVERY[..SampleCodec::ALL.len()],
            SampleCodec::ALL
        );
        let names: HashSet<&str> = SampleCodec::EVERY.iter().map(|c| c.as_str()).collect();
        assert_eq!(
            names.len(),
            SampleCodec::EVERY.len(),
            "file-name tags collide"
        );
        let variants: HashSet<SampleCodec> = SampleCodec::EVERY.into_iter().collect();
        assert_eq!(variants.len(), SampleCodec::EVERY.len());
    }

    #[test]
    fn codecs_parse_from_their_names() {
        for c in SampleCodec::EVERY {
            assert_eq!(c.as_str().parse::<SampleCodec>(), Ok(c));
        }
        let err = "h266".parse::<SampleCodec>().unwrap_err();
        assert!(err.contains("h266") && err.contains("av1mp4"), "{err}");
    }

    #[test]
    fn quickstart_corpus_keeps_its_names() {
        let names: Vec<String> = default_sample_specs(4)
            .iter()
            .map(SampleSpec::file_name)
            .collect();
        assert_eq!(
            names,
            [
                "sample-0000-h264-320x240-100f-30fps.mp4",
                "sample-0001-vp9-160x120-40f-25fps.webm",
                "sample-0002-h264fs-256x192-150f-24fps.mp4",
                "sample-0003-h264-192x144-72f-15fps.mp4",
            ]
        );
    }
}
