//! Decoded frames match ffmpeg's decode of the same frame numbers (issue 5, acceptance 2).
//!
//! For every codec/container the sample maker writes (H.264 in MP4 with the `moov` at the end,
//! faststart MP4 and Matroska; H.265 in MP4 and Matroska; VP9 in WebM; AV1 in Matroska and MP4),
//! a sample with several key frames (one per second) and B-frames (H.264/H.265) or hidden
//! alt-reference frames (AV1) is decoded with [`Decoder::decode_clip`] at several windows —
//! frame 0, the first 64 frames, a window deep in the file after several key frames, frames
//! around key-frame boundaries and the last frame — and with ffmpeg, which decodes the whole
//! file to RGB in presentation order (frame `n` = ffmpeg's `n`-th output frame) with the colour
//! matrix and range the stream is tagged with (read with ffprobe). Every frame must reach
//! PSNR ≥ 40 dB over RGB u8, and again after the same crop + resize + flip
//! (`vjepa_operators::transform::apply`, de-normalised back to 0..255). The production path —
//! the decoder filling a [`ClipTensor`] with the same crop, resize and flip, as the job's loader
//! does — must reach 40 dB against `transform::apply` of ffmpeg's frames too.
//!
//! The test checks that it can fail: in every compared window, ffmpeg's frame `n + 1` must be
//! below 40 dB against frame `n` (the content moves), so a decoder off by one frame is caught;
//! a failing frame is reported with the ffmpeg frame it is closest to.
//!
//! `every_codec_matches_ffmpeg_from_s3` repeats the check through [`ObjectSource`] (ranged GETs)
//! against a real `s3s-fs` (skipped when it is not on PATH, unless `VJEPA_REQUIRE_S3=1`) and
//! requires a late window of the 2.6 MB 640×360 file to read less than the whole object.
//! Ignored tests keep a known failure checkable (`-- --ignored`): a key-frame seek to the frame
//! just before a key frame in MP4 returns the key frame.
//!
//! ffmpeg/ffprobe come from `ops/setup.sh`; the test fails with that hint when they are missing.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use common::{read, vjepa_indices};
use vjepa_ingest::{
    ByteSource, ClipGeometry, ClipTensor, DecodeStats, Decoder, DecoderOptions, FrameSink,
    IngestError, ObjectSource, SampleCodec, SampleSpec, VideoInfo, YuvFrame, make_sample,
};
use vjepa_operators::transform::{self, CropBox, MEAN, STD, TransformParams};
use vjepa_storage::Store;
use vjepa_storage::testing::S3Server;

/// The acceptance threshold, per frame.
const MIN_PSNR_DB: f64 = 40.0;
/// Output side of the resize check.
const CROP_SIZE: usize = 112;

/// One sample of the corpus and the windows to compare on it.
struct Case {
    /// File name (in messages and in the S3 bucket).
    name: String,
    width: u32,
    height: u32,
    /// Frames in the file (ffmpeg's count).
    frames: u32,
    /// The sample maker's codec and container; `None` for a file made by ffmpeg.
    codec: Option<SampleCodec>,
    /// Whether the decoder may seek in it (frames numbered from timestamps): not in
    /// fragmented MP4, which it decodes through.
    seekable: bool,
    path: PathBuf,
    /// Frame-index lists, each decoded with one `decode_clip` call.
    windows: Vec<Vec<u64>>,
    /// Key frames (frame numbers, from ffprobe's packet timestamps).
    key_frames: Vec<u64>,
    /// See [`key_edge_windows`].
    edge_windows: Vec<Vec<u64>>,
}

fn spec(codec: SampleCodec, w: u32, h: u32, frames: u32, fps: u32, pattern: &str) -> SampleSpec {
    SampleSpec {
        name: format!("match-{}-{w}x{h}-{frames}f", codec.as_str()),
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

/// Windows for a `frames`-long sample whose key frames are `keys` (frame numbers, from ffprobe).
fn windows(frames: u64, keys: &[u64]) -> Vec<Vec<u64>> {
    let mut w = vec![vec![0], vjepa_indices(frames, 0)];
    let k1 = keys.iter().copied().find(|&k| k > 0).unwrap_or(frames);
    let k2 = keys.iter().copied().find(|&k| k > k1).unwrap_or(frames);
    // Deep in the file: starts between the second and third key frame and runs across the
    // later ones (frames 41..104 of 120 at one key frame per 30).
    let start = k1 + k1 / 3 + 1;
    if start + 64 <= frames {
        w.push(vjepa_indices(frames, start));
    }
    // Around key frames: the frame before one is a B-frame or follows a hidden one.
    let mut around: Vec<u64> = [k1.saturating_sub(1), k1, k1 + 1, k2 + 5, frames - 1]
        .into_iter()
        .filter(|&i| i < frames)
        .collect();
    around.sort_unstable();
    around.dedup();
    w.push(around);
    w
}

/// Spec windows starting one and two frames before a key frame at least 66 frames into the
/// file, so that the default decoder reaches them with a key-frame seek.
fn key_edge_windows(frames: u64, keys: &[u64]) -> Vec<Vec<u64>> {
    keys.iter()
        .copied()
        .find(|&k| k >= 66 && k - 2 + 64 <= frames)
        .map(|k| vec![vjepa_indices(frames, k - 1), vjepa_indices(frames, k - 2)])
        .unwrap_or_default()
}

/// The corpus: one sample per codec/container, plus a larger 640×360 one (300 frames).
fn cases() -> &'static (tempfile::TempDir, Vec<Case>) {
    static CASES: OnceLock<(tempfile::TempDir, Vec<Case>)> = OnceLock::new();
    CASES.get_or_init(|| {
        require_ffmpeg();
        let dir = tempfile::tempdir().expect("tempdir");
        let specs = [
            spec(
                SampleCodec::H264Mp4,
                320,
                240,
                120,
                30,
                "smpte horizontal-speed=4",
            ),
            spec(
                SampleCodec::H264Mp4Faststart,
                256,
                192,
                120,
                30,
                "colors horizontal-speed=3",
            ),
            spec(SampleCodec::H264Mkv, 320, 240, 120, 30, "ball motion=sweep"),
            spec(
                SampleCodec::H265Mp4,
                320,
                240,
                120,
                30,
                "pinwheel horizontal-speed=3",
            ),
            spec(
                SampleCodec::H265Mkv,
                256,
                192,
                120,
                30,
                "smpte75 horizontal-speed=3",
            ),
            spec(
                SampleCodec::Vp9Webm,
                320,
                240,
                120,
                30,
                "colors horizontal-speed=3",
            ),
            // libaom is the slow encoder: tiny AV1 samples.
            spec(
                SampleCodec::Av1Mkv,
                160,
                120,
                120,
                30,
                "smpte horizontal-speed=2",
            ),
            spec(SampleCodec::Av1Mp4, 160, 120, 120, 30, "ball"),
            // Large enough (2.6 MB) for ranged reads to matter.
            SampleSpec {
                name: "match-big-h264-640x360-300f".into(),
                ..spec(
                    SampleCodec::H264Mp4,
                    640,
                    360,
                    300,
                    30,
                    "smpte horizontal-speed=4",
                )
            },
        ];
        let mut cases = Vec::new();
        for spec in specs {
            let t = Instant::now();
            let path = make_sample(dir.path(), &spec)
                .unwrap_or_else(|e| panic!("making {}: {e}", spec.name));
            let bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            println!(
                "made {} ({bytes} bytes) in {:.2} s",
                spec.file_name(),
                t.elapsed().as_secs_f64()
            );
            let frames = u64::from(spec.frames);
            let keys: Vec<u64> = probe(&path)
                .key_times
                .iter()
                .map(|&t| (t * f64::from(spec.fps)).round() as u64)
                .collect();
            let windows = if frames >= 300 {
                vec![vec![0], vjepa_indices(frames, 200), vec![frames - 1]]
            } else {
                windows(frames, &keys)
            };
            cases.push(Case {
                edge_windows: key_edge_windows(frames, &keys),
                key_frames: keys,
                name: spec.file_name(),
                width: spec.width,
                height: spec.height,
                frames: spec.frames,
                codec: Some(spec.codec),
                seekable: true,
                path,
                windows,
            });
        }
        (dir, cases)
    })
}

/// Files made by ffmpeg the way users' files are, each once decoded wrong (found by feeding
/// the decoder files it had not seen): (name, ffmpeg output options, size, seconds). Input:
/// `testsrc2` at 30 fps (it moves, so a frame off is caught).
const FFMPEG_MADE: &[(&str, &str, (u32, u32), u32)] = &[
    // Full range with no matrix tag (`colorimetry=1:0:0:0` in the caps): GStreamer's
    // colorimetry parsing dropped the range and, from 720 lines, took BT.709.
    (
        "yuvj420p-720p.mp4",
        "-c:v libx264 -preset veryfast -pix_fmt yuvj420p -g 30",
        (1280, 720),
        3,
    ),
    // Full-range BT.709 in MP4: qtdemux tags it limited range from the `colr` box, whose
    // full-range bit it drops (the same stream in Matroska decoded right).
    (
        "fullrange-bt709.mp4",
        "-c:v libx264 -preset veryfast -color_range pc -colorspace bt709 -color_primaries bt709 -color_trc bt709 -g 30",
        (320, 240),
        3,
    ),
    // HEVC at 720p without colour tags (`2:0:0:0`): BT.601 as ffmpeg converts it, not
    // GStreamer's BT.709 for HD.
    (
        "hevc-untagged-720p.mkv",
        "-c:v libx265 -preset ultrafast -x265-params log-level=error:keyint=30",
        (1280, 720),
        3,
    ),
    // Fragmented MP4 without an edit list: its first frame's timestamp is the B-frame delay,
    // and frames numbered from timestamps after a seek came out two early.
    (
        "fragmented.mp4",
        "-c:v libx264 -preset veryfast -movflags frag_keyframe+empty_moov",
        (320, 240),
        3,
    ),
    // Several fragments: GStreamer's duration (so the frame count) covered the first ones only.
    (
        "fragmented-g30.mp4",
        "-c:v libx264 -preset veryfast -g 30 -movflags frag_keyframe+empty_moov",
        (320, 240),
        3,
    ),
];

fn ffmpeg_made() -> &'static (tempfile::TempDir, Vec<Case>) {
    static CASES: OnceLock<(tempfile::TempDir, Vec<Case>)> = OnceLock::new();
    CASES.get_or_init(|| {
        require_ffmpeg();
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cases = Vec::new();
        for &(name, options, (width, height), seconds) in FFMPEG_MADE {
            let path = dir.path().join(name);
            let out = Command::new("ffmpeg")
                .args(["-v", "error", "-nostdin", "-f", "lavfi", "-i"])
                .arg(format!("testsrc2=size={width}x{height}:rate=30"))
                .args(["-t", &seconds.to_string()])
                .args(options.split_whitespace())
                .arg(&path)
                .output()
                .expect("run ffmpeg (install it with ops/setup.sh)");
            assert!(
                out.status.success(),
                "ffmpeg making {name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let probed = probe(&path);
            let vf = colour_options(&probed);
            let (_, frames) = ffmpeg_frames(
                &path,
                width as usize,
                height as usize,
                &vf,
                &BTreeSet::new(),
            );
            let keys: Vec<u64> = probed
                .key_times
                .iter()
                .map(|&t| (t * 30.0).round() as u64)
                .collect();
            let seekable = !name.starts_with("fragmented");
            cases.push(Case {
                name: name.into(),
                width,
                height,
                frames: u32::try_from(frames).expect("frame count"),
                codec: None,
                seekable,
                windows: windows(frames, &keys),
                edge_windows: key_edge_windows(frames, &keys),
                key_frames: keys,
                path,
            });
        }
        (dir, cases)
    })
}

fn require_ffmpeg() {
    for tool in ["ffmpeg", "ffprobe"] {
        let ok = Command::new(tool)
            .arg("-version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok,
            "{tool} is not installed: run ops/setup.sh (it installs ffmpeg and ffprobe)"
        );
    }
}

/// What ffprobe says about the first video stream.
#[derive(Debug)]
struct Probe {
    codec: String,
    color_space: String,
    color_range: String,
    has_b_frames: u32,
    /// Presentation times (s) of the key frames.
    key_times: Vec<f64>,
}

fn probe(path: &Path) -> Probe {
    let out = Command::new("ffprobe")
        .args(["-v", "error", "-select_streams", "v:0", "-show_entries"])
        .arg("stream=codec_name,color_space,color_range,has_b_frames:packet=pts_time,flags")
        .args(["-of", "default=noprint_wrappers=1"])
        .arg(path)
        .output()
        .expect("run ffprobe (install it with ops/setup.sh)");
    assert!(out.status.success(), "ffprobe {}", path.display());
    let text = String::from_utf8_lossy(&out.stdout);
    let mut p = Probe {
        codec: String::new(),
        color_space: String::new(),
        color_range: String::new(),
        has_b_frames: 0,
        key_times: Vec::new(),
    };
    let mut pts = None;
    for line in text.lines() {
        match line.split_once('=') {
            Some(("codec_name", v)) => p.codec = v.into(),
            Some(("color_space", v)) => p.color_space = v.into(),
            Some(("color_range", v)) => p.color_range = v.into(),
            Some(("has_b_frames", v)) => p.has_b_frames = v.parse().unwrap_or(0),
            Some(("pts_time", v)) => pts = v.parse::<f64>().ok(),
            Some(("flags", v)) => {
                if v.starts_with('K')
                    && let Some(t) = pts
                {
                    p.key_times.push(t);
                }
                pts = None;
            }
            _ => {}
        }
    }
    p
}

/// ffmpeg `scale` options converting with the matrix and range the stream is tagged with.
/// Untagged streams get BT.601, what both ffmpeg and GStreamer assume for SD sizes.
fn colour_options(p: &Probe) -> String {
    let matrix = match p.color_space.as_str() {
        "bt709" => "bt709",
        "smpte240m" => "smpte240m",
        "bt2020nc" | "bt2020c" => "bt2020",
        _ => "bt601",
    };
    let range = if p.color_range == "pc" { "pc" } else { "tv" };
    format!("scale=in_color_matrix={matrix}:in_range={range},format=rgb24")
}

/// ffmpeg's decode of `path` (first video stream, presentation order, every frame), keeping
/// the frames in `keep`; also returns the number of frames ffmpeg output.
fn ffmpeg_frames(
    path: &Path,
    w: usize,
    h: usize,
    vf: &str,
    keep: &BTreeSet<u64>,
) -> (BTreeMap<u64, Vec<u8>>, u64) {
    let mut child = Command::new("ffmpeg")
        .args(["-v", "error", "-nostdin", "-i"])
        .arg(path)
        .args(["-map", "0:v:0", "-vf", vf, "-fps_mode", "passthrough"])
        .args(["-f", "rawvideo", "-pix_fmt", "rgb24", "-"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run ffmpeg (install it with ops/setup.sh)");
    let mut stdout = child.stdout.take().expect("ffmpeg stdout");
    let mut frame = vec![0u8; w * h * 3];
    let mut kept = BTreeMap::new();
    let mut n = 0u64;
    loop {
        match stdout.read_exact(&mut frame) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => panic!("reading ffmpeg output: {e}"),
        }
        if keep.contains(&n) {
            kept.insert(n, frame.clone());
        }
        n += 1;
    }
    let out = child.wait_with_output().expect("ffmpeg exit");
    assert!(
        out.status.success(),
        "ffmpeg failed on {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    (kept, n)
}

/// PSNR (dB, peak 255) between two equally long sequences of 0..255 values.
fn psnr<A: Copy + Into<f64>, B: Copy + Into<f64>>(a: &[A], b: &[B]) -> f64 {
    assert_eq!(a.len(), b.len());
    let sse: f64 = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| {
            let d = x.into() - y.into();
            d * d
        })
        .sum();
    let mse = sse / a.len() as f64;
    if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (255.0 * 255.0 / mse).log10()
    }
}

/// `transform::apply` output de-normalised back to 0..255, as `[T][3·S·S]` per-frame slices.
fn resized_frames(
    rgb: &[u8],
    t: usize,
    h: usize,
    w: usize,
    params: &TransformParams,
) -> Vec<Vec<f32>> {
    let out = transform::apply(rgb, t, h, w, params, CROP_SIZE).expect("transform");
    denormalise(&out, t)
}

/// A normalised `[3, T, S, S]` tensor back in 0..255 units, as `[T][3·S·S]`.
fn denormalise(out: &[f32], t: usize) -> Vec<Vec<f32>> {
    let plane = CROP_SIZE * CROP_SIZE;
    assert_eq!(out.len(), 3 * t * plane);
    (0..t)
        .map(|ti| {
            (0..3)
                .flat_map(|ch| {
                    let (m, s) = ((255.0 * MEAN[ch]) as f32, (255.0 * STD[ch]) as f32);
                    let off = (ch * t + ti) * plane;
                    out[off..off + plane].iter().map(move |&v| v * s + m)
                })
                .collect()
        })
        .collect()
}

/// The smallest PSNRs seen on one sample, what reading it cost, and what went wrong.
#[derive(Debug)]
struct Match {
    /// `decode_clip` RGB vs ffmpeg RGB, native size.
    native_min_db: f64,
    /// The same after `transform::apply` on both.
    resized_min_db: f64,
    /// The production path ([`ClipTensor`]: crop + resize before colour conversion) vs
    /// `transform::apply` of ffmpeg's RGB (default decoder only).
    tensor_min_db: f64,
    /// Frames compared per path.
    frames: usize,
    /// Seeks made over all windows.
    seeks: u32,
    /// Per window: (indices, stats of `decode_clip_from`).
    reads: Vec<(Vec<u64>, DecodeStats)>,
    /// Every mismatch and decode error, in words (the run goes on after one).
    failures: Vec<String>,
}

/// What a comparison runs.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    /// `DecoderOptions::default()` (seeks over gaps of 64+ frames): `decode_clip` RGB frames,
    /// compared at native size and after the same `transform::apply`, and the production path
    /// (the decoder filling a [`ClipTensor`]: crop + resize + colour conversion in one pass, as
    /// the job's loader does) compared with `transform::apply` of ffmpeg's RGB frames.
    Default,
    /// RGB frames only, from a decoder that seeks over any gap of 8+ frames, so windows inside
    /// the 120-frame samples (after frame 29, around key frames) are reached by a key-frame seek.
    EagerSeek,
}

impl Mode {
    fn decoder(self) -> Decoder {
        let opts = match self {
            Mode::Default => DecoderOptions::default(),
            Mode::EagerSeek => DecoderOptions {
                seek_min_frames: 8,
                ..DecoderOptions::default()
            },
        };
        Decoder::new(opts).expect("decoder")
    }
}

/// Fills a [`ClipTensor`] with the planned frames (what the training loader does).
struct TensorSink {
    want: Vec<u64>,
    tensor: ClipTensor,
}

impl FrameSink for TensorSink {
    fn plan(&mut self, _: &VideoInfo) -> Vec<u64> {
        self.want.clone()
    }

    fn frame(&mut self, slot: usize, frame: &YuvFrame<'_>) -> Result<(), IngestError> {
        self.tensor.put(slot, frame)
    }

    fn repeat(&mut self, from: usize, to: usize) -> Result<(), IngestError> {
        self.tensor.copy_slot(from, to)
    }
}

/// For a frame that failed: which of ffmpeg's frames it is closest to (all frames decoded
/// again, once per sample, only when something failed).
struct Finder<'a> {
    case: &'a Case,
    vf: String,
    all: Option<BTreeMap<u64, Vec<u8>>>,
}

impl Finder<'_> {
    fn closest(&mut self, frame: &[u8]) -> String {
        let (w, h) = (self.case.width as usize, self.case.height as usize);
        let all = self.all.get_or_insert_with(|| {
            let every: BTreeSet<u64> = (0..u64::from(self.case.frames)).collect();
            ffmpeg_frames(&self.case.path, w, h, &self.vf, &every).0
        });
        let best = all
            .iter()
            .map(|(&n, f)| (n, psnr(frame, f.as_slice())))
            .max_by(|a, b| a.1.total_cmp(&b.1));
        match best {
            Some((n, p)) => format!("closest to ffmpeg's frame {n} ({p:.1} dB)"),
            None => "ffmpeg gave no frames".into(),
        }
    }
}

/// Compares `windows` of `case`, read from `source`, with ffmpeg's decode of the file.
fn check_case(
    case: &Case,
    windows: &[Vec<u64>],
    source: Arc<dyn ByteSource>,
    dec: &mut Decoder,
    mode: Mode,
) -> Match {
    let (w, h) = (case.width as usize, case.height as usize);
    let name = &case.name;
    let probe = probe(&case.path);
    let vf = colour_options(&probe);
    let mut keep = BTreeSet::new();
    for win in windows {
        for &i in win {
            keep.insert(i);
            keep.insert(i + 1);
        }
    }
    let (reference, total) = ffmpeg_frames(&case.path, w, h, &vf, &keep);
    assert_eq!(
        total,
        u64::from(case.frames),
        "{name}: ffmpeg decoded {total} frames"
    );
    // The content moves: a decoder one frame off would fail the threshold.
    for (&i, f) in &reference {
        if let Some(next) = reference.get(&(i + 1)) {
            let p = psnr(f.as_slice(), next.as_slice());
            assert!(
                p < MIN_PSNR_DB,
                "{name}: ffmpeg frames {i} and {} differ too little ({p:.1} dB) for the check \
                 to catch an off-by-one frame",
                i + 1
            );
        }
    }
    // One crop box and a flip for every window, as a training clip would get.
    let params = TransformParams {
        crop: CropBox {
            top: h / 8,
            left: w / 6,
            height: h * 3 / 4,
            width: w * 2 / 3,
        },
        flip: true,
    };
    let geometry = ClipGeometry {
        top: params.crop.top,
        left: params.crop.left,
        height: params.crop.height,
        width: params.crop.width,
        size: CROP_SIZE,
        flip: params.flip,
        mean: MEAN.map(|m| (255.0 * m) as f32),
        std: STD.map(|s| (255.0 * s) as f32),
    };
    let what = format!(
        "{name} ({}, {} {}, {mode:?} mode, from {})",
        probe.codec,
        probe.color_space,
        probe.color_range,
        source.describe()
    );
    let mut finder = Finder {
        case,
        vf: vf.clone(),
        all: None,
    };
    let mut m = Match {
        native_min_db: f64::INFINITY,
        resized_min_db: f64::INFINITY,
        tensor_min_db: f64::INFINITY,
        frames: 0,
        seeks: 0,
        reads: Vec::new(),
        failures: Vec::new(),
    };
    for win in windows {
        let theirs: Vec<u8> = win
            .iter()
            .flat_map(|i| reference[i].iter().copied())
            .collect();
        let theirs_resized = resized_frames(&theirs, win.len(), h, w, &params);
        m.frames += win.len();

        let wanted = win.clone();
        let clip =
            match dec.decode_clip_from(Arc::clone(&source), &mut |_: &VideoInfo| wanted.clone()) {
                Ok(clip) => clip,
                Err(e) => {
                    m.failures
                        .push(format!("{what}: decoding {win:?} failed: {e}"));
                    continue;
                }
            };
        m.seeks += clip.stats.seeks;
        m.reads.push((win.clone(), clip.stats.clone()));
        assert_eq!(clip.indices, *win, "{name}");
        assert_eq!(
            (clip.width as usize, clip.height as usize),
            (w, h),
            "{name}"
        );
        if clip.info.num_frames != total {
            m.failures.push(format!(
                "{what}: VideoInfo.num_frames {} but ffmpeg decodes {total} frames",
                clip.info.num_frames
            ));
        }
        let ours = resized_frames(&clip.frames, win.len(), h, w, &params);
        let mut bad_window = false;
        for (t, &i) in win.iter().enumerate() {
            let frame = clip.frame(t).expect("decoded frame");
            let p = psnr(frame, reference[&i].as_slice());
            m.native_min_db = m.native_min_db.min(p);
            if p < MIN_PSNR_DB {
                bad_window = true;
                let closest = finder.closest(frame);
                m.failures.push(format!(
                    "{what}: window {win:?}: frame {i} is {p:.2} dB from ffmpeg's frame {i}, \
                     {closest}; {:?}",
                    clip.stats
                ));
            }
        }
        for (t, &i) in win.iter().enumerate() {
            let p = psnr(ours[t].as_slice(), theirs_resized[t].as_slice());
            m.resized_min_db = m.resized_min_db.min(p);
            if p < MIN_PSNR_DB && !bad_window {
                m.failures.push(format!(
                    "{what}: window {win:?}: frame {i} after crop + resize to {CROP_SIZE} is \
                     {p:.2} dB from ffmpeg's"
                ));
            }
        }
        if mode == Mode::Default {
            tensor_check(
                &what,
                win,
                &mut m,
                dec,
                &source,
                geometry,
                &ours,
                &theirs_resized,
            );
        }
    }
    if mode == Mode::EagerSeek && case.seekable && m.seeks == 0 {
        m.failures.push(format!(
            "{what}: the eagerly seeking decoder never sought, so seeking was not exercised"
        ));
    }
    m
}

/// The clip-tensor part of [`Mode::Default`] on one window: the clip tensor vs `transform::apply` of ffmpeg's frames
/// (`ours`: `transform::apply` of our own RGB frames, to tell decode problems from
/// resize-order ones).
#[allow(clippy::too_many_arguments)]
fn tensor_check(
    what: &str,
    win: &[u64],
    m: &mut Match,
    dec: &mut Decoder,
    source: &Arc<dyn ByteSource>,
    geometry: ClipGeometry,
    ours: &[Vec<f32>],
    theirs_resized: &[Vec<f32>],
) {
    let mut sink = TensorSink {
        want: win.to_vec(),
        tensor: ClipTensor::new(geometry, win.len()).expect("clip tensor"),
    };
    if let Err(e) = dec.decode(Arc::clone(source), &mut sink) {
        m.failures.push(format!(
            "{what}: decoding {win:?} into a clip tensor failed: {e}"
        ));
        return;
    }
    if !sink.tensor.is_complete() {
        m.failures
            .push(format!("{what}: clip tensor for {win:?} not filled"));
        return;
    }
    let tensor = denormalise(&sink.tensor.into_data(), win.len());
    for (t, &i) in win.iter().enumerate() {
        let p = psnr(tensor[t].as_slice(), theirs_resized[t].as_slice());
        m.tensor_min_db = m.tensor_min_db.min(p);
        if p < MIN_PSNR_DB {
            let own = psnr(tensor[t].as_slice(), ours[t].as_slice());
            m.failures.push(format!(
                "{what}: window {win:?}: frame {i} of the clip tensor (crop + resize to \
                 {CROP_SIZE} before colour conversion) is {p:.2} dB from transform::apply of \
                 ffmpeg's frame ({own:.2} dB from transform::apply of our own RGB frame)"
            ));
        }
    }
}

/// Asserts the sample really has what the comparison should exercise.
fn check_sample_structure(case: &Case) {
    let p = probe(&case.path);
    let name = &case.name;
    let Some(codec) = case.codec else {
        return;
    };
    let expected = match codec {
        SampleCodec::H264Mp4 | SampleCodec::H264Mp4Faststart | SampleCodec::H264Mkv => "h264",
        SampleCodec::H265Mp4 | SampleCodec::H265Mkv => "hevc",
        SampleCodec::Vp9Webm => "vp9",
        SampleCodec::Av1Mkv | SampleCodec::Av1Mp4 => "av1",
    };
    assert_eq!(p.codec, expected, "{name}");
    assert!(
        case.key_frames.len() >= 3 && p.key_times.len() == case.key_frames.len(),
        "{name}: key frames {:?}, want several so seeking is exercised",
        case.key_frames
    );
    if expected == "h264" || expected == "hevc" {
        assert!(p.has_b_frames > 0, "{name}: no B-frames");
    }
}

fn report(from: &str, case: &Case, m: &Match, secs: f64) {
    let db = |x: f64| {
        if x.is_finite() {
            format!("{x:.2} dB")
        } else {
            "-".into()
        }
    };
    println!(
        "{from:<5} {:<34} {:>3} frames: min PSNR {} native, {} after resize to {CROP_SIZE}, {} \
         clip tensor; {} seeks, {} failures ({secs:.2} s)",
        case.name,
        m.frames,
        db(m.native_min_db),
        db(m.resized_min_db),
        db(m.tensor_min_db),
        m.seeks,
        m.failures.len(),
    );
}

/// Runs `mode` on the `windows` of every sample, from local bytes; returns the failures.
fn run_local(mode: Mode, windows: &dyn Fn(&Case) -> Vec<Vec<u64>>) -> Vec<String> {
    let t = Instant::now();
    let (_, cases) = cases();
    println!("corpus ready in {:.1} s", t.elapsed().as_secs_f64());
    let mut dec = mode.decoder();
    let mut failures = Vec::new();
    for case in cases {
        let windows = windows(case);
        if windows.is_empty() {
            continue;
        }
        let t = Instant::now();
        let source: Arc<dyn ByteSource> = Arc::new(read(&case.path));
        let m = check_case(case, &windows, source, &mut dec, mode);
        report("local", case, &m, t.elapsed().as_secs_f64());
        failures.extend(m.failures);
    }
    println!("total {:.1} s", t.elapsed().as_secs_f64());
    failures
}

fn assert_no_failures(failures: &[String]) {
    assert!(
        failures.is_empty(),
        "{} mismatches or errors:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn every_codec_matches_ffmpeg_from_local_bytes() {
    let (_, cases) = cases();
    for case in cases {
        check_sample_structure(case);
    }
    let covered: Vec<SampleCodec> = cases.iter().filter_map(|c| c.codec).collect();
    for codec in SampleCodec::EVERY {
        assert!(covered.contains(&codec), "{codec:?} not covered");
    }
    assert_no_failures(&run_local(Mode::Default, &|c| c.windows.clone()));
}

/// Files made by ffmpeg as users make them ([`FFMPEG_MADE`]): the same frames and colours as
/// ffmpeg's decode, with the default decoder (which seeks over the 64-frame gaps where the
/// file allows) and with one that seeks at every window, and the frame count ffmpeg gives.
#[test]
fn files_made_by_ffmpeg_match_ffmpeg() {
    let (_, cases) = ffmpeg_made();
    let mut failures = Vec::new();
    for mode in [Mode::Default, Mode::EagerSeek] {
        let mut dec = mode.decoder();
        for case in cases {
            let t = Instant::now();
            let source: Arc<dyn ByteSource> = Arc::new(read(&case.path));
            let m = check_case(case, &case.windows, source, &mut dec, mode);
            report("local", case, &m, t.elapsed().as_secs_f64());
            failures.extend(m.failures);
        }
    }
    assert_no_failures(&failures);
}

/// A decoder that seeks for every window (gap ≥ 8 frames): with B-frames, demuxers snap key-frame
/// seeks by decode time, so a seek aimed just before a key frame must not land on it.
#[test]
fn every_codec_matches_ffmpeg_when_seeking_to_every_window() {
    assert_no_failures(&run_local(Mode::EagerSeek, &|c| c.windows.clone()));
}

/// The same with default options: spec windows starting one and two frames before a key frame,
/// far enough into the file that the default decoder seeks.
#[test]
fn window_starting_just_before_a_key_frame_matches_ffmpeg() {
    let failures = run_local(Mode::Default, &|c| c.edge_windows.clone());
    assert_no_failures(&failures);
}

#[test]
fn every_codec_matches_ffmpeg_from_s3() {
    let test = "every_codec_matches_ffmpeg_from_s3";
    let Some(server) = S3Server::start_or_skip(test).expect("start s3s-fs") else {
        return;
    };
    let t = Instant::now();
    let (_, cases) = cases();
    // A bucket is a directory of s3s-fs: put the samples there directly.
    let bucket = server.create_bucket("videos").expect("bucket");
    for case in cases {
        let name = &case.name;
        std::fs::copy(&case.path, bucket.join(name)).expect("copy into the bucket");
    }
    let store = Store::open_with_credentials(
        "s3://videos/",
        &server.settings(),
        &server.access_key,
        &server.secret_key,
    )
    .expect("S3 store");
    let (object_store, _) = store.inner();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let mut dec = Mode::Default.decoder();
    let mut failures = Vec::new();
    for case in cases {
        let t = Instant::now();
        let name = &case.name;
        let path = store.path_of(name).expect("object path");
        let source: Arc<dyn ByteSource> =
            ObjectSource::open(Arc::clone(&object_store), path, rt.handle().clone())
                .unwrap_or_else(|e| panic!("opening {name} on S3: {e}"));
        let size = source.size();
        assert_eq!(
            size,
            std::fs::metadata(&case.path).expect("sample size").len()
        );
        let m = check_case(case, &case.windows, source, &mut dec, Mode::Default);
        report("s3", case, &m, t.elapsed().as_secs_f64());
        for (win, stats) in &m.reads {
            println!(
                "      {:>3}..={:<3} ({:>2} frames): read {} of {size} bytes ({:.0} %) in {} \
                 requests, {} seeks, {} frames decoded",
                win.first().copied().unwrap_or(0),
                win.last().copied().unwrap_or(0),
                win.len(),
                stats.bytes_read,
                100.0 * stats.bytes_read as f64 / size as f64,
                stats.read_requests,
                stats.seeks,
                stats.frames_decoded
            );
            assert_eq!(stats.object_bytes, size, "{name}");
        }
        if case.frames >= 300 {
            // A 64-frame window late in a 2.6 MB file (moov at the end) needs the index and
            // about a third of the media data, not the whole object.
            let (win, stats) = m
                .reads
                .iter()
                .find(|(w, _)| w.len() == 16)
                .expect("a 16-frame window");
            assert!(
                stats.bytes_read < size,
                "{name}: the window {win:?} read {} bytes of a {size}-byte object: ranged \
                 reads fetched everything",
                stats.bytes_read
            );
        }
        failures.extend(m.failures);
    }
    println!("total {:.1} s", t.elapsed().as_secs_f64());
    assert_no_failures(&failures);
}
