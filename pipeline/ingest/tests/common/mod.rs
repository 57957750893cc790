//! Shared helpers for the integration tests: a tiny corpus made once per test binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use gstreamer as gst;
use gstreamer::prelude::*;
use vjepa_ingest::{SampleCodec, SampleSpec, make_sample};

/// The test corpus.
pub struct Corpus {
    _dir: tempfile::TempDir,
    /// 320x240, 100 frames, 30 fps, H.264 MP4 with moov at the end, ball.
    pub mp4: PathBuf,
    /// 256x192, 100 frames, 25 fps, H.264 MP4 faststart, scrolling SMPTE bars.
    pub mp4_faststart: PathBuf,
    /// 320x240, 100 frames, 24 fps, VP9 WebM, scrolling pinwheel.
    pub webm: PathBuf,
    /// 160x120, 40 frames, 30 fps, H.264 MP4, ball.
    pub short: PathBuf,
    /// 170x96 (RGB rows of 510 bytes: padded to 512 by videoconvert), 30 frames, H.264.
    pub odd_width: PathBuf,
    /// A single PNG image.
    pub png: PathBuf,
    /// Audio only: Vorbis in Ogg.
    pub ogg_audio: PathBuf,
    /// Time to make all of the above.
    pub made_in: Duration,
}

fn spec(
    name: &str,
    w: u32,
    h: u32,
    frames: u32,
    fps: u32,
    codec: SampleCodec,
    pattern: &str,
) -> SampleSpec {
    SampleSpec {
        name: name.into(),
        width: w,
        height: h,
        frames,
        fps,
        codec,
        pattern: pattern.into(),
        bitrate_kbps: None,
        keyframe_interval: None,
    }
}

/// Runs a gst-launch style description that ends in `filesink location=<path>`.
pub fn launch_to_file(description: &str, path: &Path) {
    vjepa_ingest::init().expect("init");
    let desc = format!("{description} ! filesink location={}", path.display());
    let pipeline = gst::parse::launch(&desc).expect("parse pipeline");
    let bus = pipeline.bus().expect("bus");
    pipeline.set_state(gst::State::Playing).expect("play");
    let msg = bus
        .timed_pop_filtered(
            gst::ClockTime::from_seconds(60),
            &[gst::MessageType::Eos, gst::MessageType::Error],
        )
        .expect("pipeline finished");
    pipeline.set_state(gst::State::Null).expect("null");
    if let gst::MessageView::Error(e) = msg.view() {
        panic!("{desc}: {}", e.error());
    }
}

/// The corpus, made on first use.
pub fn corpus() -> &'static Corpus {
    static CORPUS: OnceLock<Corpus> = OnceLock::new();
    CORPUS.get_or_init(|| {
        let t = Instant::now();
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let mp4 = make_sample(
            d,
            &spec("mp4", 320, 240, 100, 30, SampleCodec::H264Mp4, "ball"),
        )
        .expect("mp4");
        let mp4_faststart = make_sample(
            d,
            &spec(
                "mp4fs",
                256,
                192,
                100,
                25,
                SampleCodec::H264Mp4Faststart,
                "smpte horizontal-speed=4",
            ),
        )
        .expect("mp4 faststart");
        let webm = make_sample(
            d,
            &spec(
                "webm",
                320,
                240,
                100,
                24,
                SampleCodec::Vp9Webm,
                "pinwheel horizontal-speed=3",
            ),
        )
        .expect("webm");
        let short = make_sample(
            d,
            &spec("short", 160, 120, 40, 30, SampleCodec::H264Mp4, "ball"),
        )
        .expect("short");
        let odd_width = make_sample(
            d,
            &spec(
                "odd",
                170,
                96,
                30,
                30,
                SampleCodec::H264Mp4Faststart,
                "smpte horizontal-speed=5",
            ),
        )
        .expect("odd width");
        let png = d.join("image.png");
        launch_to_file(
            "videotestsrc num-buffers=1 ! video/x-raw,width=64,height=48 ! pngenc",
            &png,
        );
        let ogg_audio = d.join("audio.ogg");
        launch_to_file(
            "audiotestsrc num-buffers=40 ! audioconvert ! vorbisenc ! oggmux",
            &ogg_audio,
        );
        Corpus {
            _dir: dir,
            mp4,
            mp4_faststart,
            webm,
            short,
            odd_width,
            png,
            ogg_audio,
            made_in: t.elapsed(),
        }
    })
}

/// Reads a file into `Bytes`.
pub fn read(path: &Path) -> bytes::Bytes {
    bytes::Bytes::from(std::fs::read(path).expect("read sample"))
}

/// The spec's pretraining indices for a video of `len` frames starting at frame `start`
/// (16 frames over 64, `floor(linspace(start, start + 64, 16))` clipped to `start + 63`), or the
/// short-video rule when `len <= 64`.
pub fn vjepa_indices(len: u64, start: u64) -> Vec<u64> {
    if len > 64 {
        let end = start + 64;
        (0..16)
            .map(|i| {
                let x = start as f64 + (end - start) as f64 * i as f64 / 15.0;
                (x.floor() as u64).min(end - 1)
            })
            .collect()
    } else {
        let k = len / 4;
        let mut v: Vec<u64> = (0..k)
            .map(|i| {
                let x = if k > 1 {
                    len as f64 * i as f64 / (k - 1) as f64
                } else {
                    0.0
                };
                x.floor() as u64
            })
            .collect();
        v.resize(16, len);
        v.into_iter()
            .map(|x| x.min(len.saturating_sub(1)))
            .collect()
    }
}
