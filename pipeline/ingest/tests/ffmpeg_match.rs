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
//! (`vjepa_operators::transform::apply`, de-normalised back to 0..255).
//!
//! The test checks that it can fail: in every compared window, ffmpeg's frame `n + 1` must be
//! below 40 dB against frame `n` (the content moves), so a decoder off by one frame is caught.
//!
//! ffmpeg/ffprobe come from `ops/setup.sh`; the test fails with that hint when they are missing.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Instant;

use common::{read, vjepa_indices};
use vjepa_ingest::{Decoder, DecoderOptions, SampleCodec, SampleSpec, VideoInfo, make_sample};
use vjepa_operators::transform::{self, CropBox, MEAN, STD, TransformParams};
use vjepa_storage::Store;
use vjepa_storage::testing::S3Server;

/// The acceptance threshold, per frame.
const MIN_PSNR_DB: f64 = 40.0;
/// Output side of the resize check.
const CROP_SIZE: usize = 112;

/// One sample of the corpus and the windows to compare on it.
struct Case {
    spec: SampleSpec,
    path: PathBuf,
    /// Frame-index lists, each decoded with one `decode_clip` call.
    windows: Vec<Vec<u64>>,
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
    }
}

/// Windows for a `frames`-long sample with a key frame every `gop` frames.
fn windows(frames: u64, gop: u64) -> Vec<Vec<u64>> {
    let mut w = vec![vec![0], vjepa_indices(frames, 0)];
    // Deep in the file: starts between the second and third key frame and runs across the
    // later ones (frames 41..104 of 120 at one key frame per 30).
    let start = gop + gop / 3 + 1;
    if start + 64 <= frames {
        w.push(vjepa_indices(frames, start));
    }
    // Around key-frame boundaries (the frame before a key frame is often a B/hidden-ref frame).
    let mut around: Vec<u64> = [gop - 1, gop, gop + 1, 2 * gop + 5, frames - 1]
        .into_iter()
        .filter(|&i| i < frames)
        .collect();
    around.sort_unstable();
    around.dedup();
    w.push(around);
    w
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
            let gop = u64::from(spec.fps);
            let windows = if frames >= 300 {
                vec![vec![0], vjepa_indices(frames, 200), vec![frames - 1]]
            } else {
                windows(frames, gop)
            };
            cases.push(Case {
                spec,
                path,
                windows,
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
    key_frames: usize,
    packets: usize,
}

fn probe(path: &Path) -> Probe {
    let out = Command::new("ffprobe")
        .args(["-v", "error", "-select_streams", "v:0", "-show_entries"])
        .arg("stream=codec_name,color_space,color_range,has_b_frames:packet=flags")
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
        key_frames: 0,
        packets: 0,
    };
    for line in text.lines() {
        match line.split_once('=') {
            Some(("codec_name", v)) => p.codec = v.into(),
            Some(("color_space", v)) => p.color_space = v.into(),
            Some(("color_range", v)) => p.color_range = v.into(),
            Some(("has_b_frames", v)) => p.has_b_frames = v.parse().unwrap_or(0),
            Some(("flags", v)) => {
                p.packets += 1;
                if v.starts_with('K') {
                    p.key_frames += 1;
                }
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
    let plane = CROP_SIZE * CROP_SIZE;
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

/// The smallest PSNRs seen on one sample.
#[derive(Debug)]
struct Match {
    native_min_db: f64,
    resized_min_db: f64,
    frames: usize,
}

/// Compares `decode` (which decodes one window of `case`) with ffmpeg on every window.
fn check_case(
    case: &Case,
    decode: &mut dyn FnMut(&Case, &[u64]) -> vjepa_ingest::DecodedClip,
) -> Match {
    let (w, h) = (case.spec.width as usize, case.spec.height as usize);
    let name = case.spec.file_name();
    let probe = probe(&case.path);
    let mut keep = BTreeSet::new();
    for win in &case.windows {
        for &i in win {
            keep.insert(i);
            keep.insert(i + 1);
        }
    }
    let (reference, total) = ffmpeg_frames(&case.path, w, h, &colour_options(&probe), &keep);
    assert_eq!(
        total,
        u64::from(case.spec.frames),
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
    let mut m = Match {
        native_min_db: f64::INFINITY,
        resized_min_db: f64::INFINITY,
        frames: 0,
    };
    for win in &case.windows {
        let clip = decode(case, win);
        assert_eq!(clip.indices, *win, "{name}");
        assert_eq!(
            (clip.width as usize, clip.height as usize),
            (w, h),
            "{name}"
        );
        assert_eq!(clip.info.num_frames, total, "{name}: frame count");
        let ours: Vec<u8> = clip.frames.clone();
        let theirs: Vec<u8> = win
            .iter()
            .flat_map(|i| reference[i].iter().copied())
            .collect();
        for (t, &i) in win.iter().enumerate() {
            let p = psnr(
                clip.frame(t).expect("decoded frame"),
                reference[&i].as_slice(),
            );
            assert!(
                p >= MIN_PSNR_DB,
                "{name} ({}, {} {}): frame {i} is {p:.2} dB from ffmpeg's (window {win:?})",
                probe.codec,
                probe.color_space,
                probe.color_range
            );
            m.native_min_db = m.native_min_db.min(p);
        }
        let a = resized_frames(&ours, win.len(), h, w, &params);
        let b = resized_frames(&theirs, win.len(), h, w, &params);
        for (t, &i) in win.iter().enumerate() {
            let p = psnr(a[t].as_slice(), b[t].as_slice());
            assert!(
                p >= MIN_PSNR_DB,
                "{name}: frame {i} after crop+resize to {CROP_SIZE} is {p:.2} dB from ffmpeg's"
            );
            m.resized_min_db = m.resized_min_db.min(p);
        }
        m.frames += win.len();
    }
    m
}

/// Asserts the sample really has what the comparison should exercise.
fn check_sample_structure(case: &Case) {
    let p = probe(&case.path);
    let name = case.spec.file_name();
    let expected = match case.spec.codec {
        SampleCodec::H264Mp4 | SampleCodec::H264Mp4Faststart | SampleCodec::H264Mkv => "h264",
        SampleCodec::H265Mp4 | SampleCodec::H265Mkv => "hevc",
        SampleCodec::Vp9Webm => "vp9",
        SampleCodec::Av1Mkv | SampleCodec::Av1Mp4 => "av1",
    };
    assert_eq!(p.codec, expected, "{name}");
    assert!(
        p.key_frames >= 3,
        "{name}: {} key frames, want several so seeking is exercised",
        p.key_frames
    );
    if expected == "h264" || expected == "hevc" {
        assert!(p.has_b_frames > 0, "{name}: no B-frames");
    }
}

#[test]
fn every_codec_matches_ffmpeg_from_local_bytes() {
    let t = Instant::now();
    let (_, cases) = cases();
    println!("corpus ready in {:.1} s", t.elapsed().as_secs_f64());
    let mut dec = Decoder::new(DecoderOptions::default()).expect("decoder");
    let mut decode = |case: &Case, win: &[u64]| {
        let wanted = win.to_vec();
        dec.decode_clip(read(&case.path), &mut |_: &VideoInfo| wanted.clone())
            .unwrap_or_else(|e| panic!("{}: decoding {win:?}: {e}", case.spec.file_name()))
    };
    let mut seen = BTreeSet::new();
    for case in cases {
        check_sample_structure(case);
        let t = Instant::now();
        let m = check_case(case, &mut decode);
        seen.insert(case.spec.codec.as_str());
        println!(
            "local {:<34} {:>3} frames: min PSNR {:.2} dB native, {:.2} dB after resize to \
             {CROP_SIZE} ({:.2} s)",
            case.spec.file_name(),
            m.frames,
            m.native_min_db,
            m.resized_min_db,
            t.elapsed().as_secs_f64()
        );
    }
    for codec in SampleCodec::EVERY {
        assert!(seen.contains(codec.as_str()), "{codec:?} not covered");
    }
    println!("total {:.1} s", t.elapsed().as_secs_f64());
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
        let name = case.spec.file_name();
        std::fs::copy(&case.path, bucket.join(&name)).expect("copy into the bucket");
    }
    let store = Store::open_with_credentials(
        "s3://videos/",
        &server.settings(),
        &server.access_key,
        &server.secret_key,
    )
    .expect("S3 store");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let mut dec = Decoder::new(DecoderOptions::default()).expect("decoder");
    let mut decode = |case: &Case, win: &[u64]| {
        let name = case.spec.file_name();
        let data = rt
            .block_on(store.get(&name))
            .unwrap_or_else(|e| panic!("GET {name}: {e}"));
        let wanted = win.to_vec();
        dec.decode_clip(data, &mut |_: &VideoInfo| wanted.clone())
            .unwrap_or_else(|e| panic!("{name}: decoding {win:?} from S3: {e}"))
    };
    for case in cases {
        let t = Instant::now();
        let m = check_case(case, &mut decode);
        println!(
            "s3    {:<34} {:>3} frames: min PSNR {:.2} dB native, {:.2} dB after resize to \
             {CROP_SIZE} ({:.2} s)",
            case.spec.file_name(),
            m.frames,
            m.native_min_db,
            m.resized_min_db,
            t.elapsed().as_secs_f64()
        );
    }
    println!("total {:.1} s", t.elapsed().as_secs_f64());
}
