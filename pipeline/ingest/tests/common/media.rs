//! Generators and references for the bad-input corpus (`tests/corpus.rs`): real encodes (GStreamer
//! in process; ffmpeg where GStreamer cannot express the input), byte-level edits of real files
//! (ISO-BMFF boxes, Matroska codec IDs), and ffmpeg's decode of a file as the pixel reference.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

/// Runs ffmpeg with `args` (after `-v error -nostdin -y`); panics with its stderr on failure.
///
/// ffmpeg is installed by `ops/setup.sh`; a missing binary fails the test with a message saying so.
pub fn ffmpeg(args: &[&str]) -> Vec<u8> {
    let out = Command::new("ffmpeg")
        .args(["-v", "error", "-nostdin", "-y"])
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run ffmpeg ({e}): install it with ops/setup.sh (Debian package ffmpeg)")
        });
    assert!(
        out.status.success(),
        "ffmpeg {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// `frames` frames of 160×120 `testsrc2` written to `path` with the timestamps `pts` gives,
/// in units of 1/`timescale` s (an ffmpeg expression of the frame number `N`; commas escaped),
/// passed through unchanged, then `codec` (the encoder and its options, e.g.
/// `["-c:v", "libx264", "-g", "30"]`). Variable-rate inputs without a camera.
pub fn timed_testsrc(path: &Path, frames: u32, timescale: u32, pts: &str, codec: &[&str]) {
    let frames = frames.to_string();
    let filter = format!("settb=1/{timescale},setpts='({pts})/{timescale}/TB'");
    let time_base = format!("1/{timescale}");
    let mut args = vec![
        "-f",
        "lavfi",
        "-i",
        "testsrc2=size=160x120:rate=30",
        "-frames:v",
        &frames,
        "-vf",
        &filter,
        "-fps_mode",
        "passthrough",
        "-enc_time_base:v",
        &time_base,
    ];
    args.extend_from_slice(codec);
    args.push(path.to_str().expect("utf-8 temp path"));
    ffmpeg(&args);
}

/// 300 frames of H.264 in Matroska: 60 at 30 fps, then 240 at 10 fps (26 s). GStreamer's
/// length, duration × the 30 fps the container declares, is 778 frames.
pub fn slowing_mkv(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("slowing.mkv");
    timed_testsrc(
        &path,
        300,
        1000,
        "round(if(lt(N\\,60)\\,N*100/3\\,2000+(N-60)*100))",
        &["-c:v", "libx264", "-preset", "superfast", "-g", "30"],
    );
    path
}

/// Every frame of `path` as ffmpeg decodes it (packed RGB24, `w × h`, in presentation order,
/// no frame dropped or duplicated: `-fps_mode passthrough`). `input_args` go before `-i` (e.g.
/// `-noautorotate`).
pub fn ffmpeg_frames(path: &Path, input_args: &[&str], w: u32, h: u32) -> Vec<Vec<u8>> {
    let path = path.to_str().expect("utf-8 temp path");
    let mut args: Vec<&str> = input_args.to_vec();
    args.extend([
        "-i",
        path,
        "-map",
        "0:v:0",
        "-fps_mode",
        "passthrough",
        "-f",
        "rawvideo",
        "-pix_fmt",
        "rgb24",
        "-",
    ]);
    let raw = ffmpeg(&args);
    let frame = (w * h * 3) as usize;
    assert!(
        !raw.is_empty() && raw.len().is_multiple_of(frame),
        "ffmpeg decoded {} bytes of {path}, not a multiple of {w}x{h}x3",
        raw.len()
    );
    raw.chunks_exact(frame).map(<[u8]>::to_vec).collect()
}

/// Peak signal-to-noise ratio of two equally long 8-bit images, in dB (`inf` when identical).
pub fn psnr(a: &[u8], b: &[u8]) -> f64 {
    assert_eq!(a.len(), b.len(), "psnr of images of different sizes");
    let mse = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| {
            let d = f64::from(x) - f64::from(y);
            d * d
        })
        .sum::<f64>()
        / a.len() as f64;
    if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (255.0f64 * 255.0 / mse).log10()
    }
}

/// `n` deterministic pseudo-random bytes (a 64-bit LCG, high bits).
pub fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x2545_f491_4f6c_dd1d;
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 33) as u8
        })
        .collect()
}

/// One ISO-BMFF box: where it starts, its header length (8 or 16) and its total size.
#[derive(Clone, Copy, Debug)]
pub struct BoxAt {
    pub kind: [u8; 4],
    pub start: usize,
    pub header: usize,
    pub size: usize,
}

impl BoxAt {
    /// First byte of the payload.
    pub fn body(&self) -> usize {
        self.start + self.header
    }
    /// One past the last byte.
    pub fn end(&self) -> usize {
        self.start + self.size
    }
}

fn be32(data: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(data[at..at + 4].try_into().expect("4 bytes"))
}

/// The boxes laid end to end in `data[from..to]` (panics on a malformed layout: inputs are ours).
pub fn boxes_in(data: &[u8], from: usize, to: usize) -> Vec<BoxAt> {
    let mut out = Vec::new();
    let mut at = from;
    while at + 8 <= to {
        let size32 = be32(data, at) as usize;
        let kind: [u8; 4] = data[at + 4..at + 8].try_into().expect("4 bytes");
        let (header, size) = match size32 {
            0 => (8, to - at),
            1 => (
                16,
                u64::from_be_bytes(data[at + 8..at + 16].try_into().expect("8 bytes")) as usize,
            ),
            n => (8, n),
        };
        assert!(size >= header && at + size <= to, "malformed box at {at}");
        out.push(BoxAt {
            kind,
            start: at,
            header,
            size,
        });
        at += size;
    }
    out
}

/// Every box reached by descending `path` (e.g. `[b"moov", b"trak", b"tkhd"]`); each path
/// element matches every box of that kind at that level.
pub fn find_boxes(data: &[u8], path: &[&[u8; 4]]) -> Vec<BoxAt> {
    let mut level = boxes_in(data, 0, data.len());
    for (i, kind) in path.iter().enumerate() {
        let hits: Vec<BoxAt> = level.into_iter().filter(|b| &b.kind == *kind).collect();
        if i + 1 == path.len() {
            return hits;
        }
        level = hits
            .iter()
            .flat_map(|b| boxes_in(data, b.body(), b.end()))
            .collect();
    }
    Vec::new()
}

/// The only box at `path`; panics if there is none or several.
pub fn the_box(data: &[u8], path: &[&[u8; 4]]) -> BoxAt {
    let hits = find_boxes(data, path);
    assert_eq!(hits.len(), 1, "boxes at {path:?}");
    hits[0]
}

/// The MP4 with its `mdat` payload overwritten by noise: box structure and index intact.
pub fn garbage_mdat(data: &[u8], seed: u64) -> Vec<u8> {
    let mut out = data.to_vec();
    let mdat = the_box(data, &[b"mdat"]);
    let n = mdat.end() - mdat.body();
    out[mdat.body()..mdat.end()].copy_from_slice(&noise(n, seed));
    out
}

/// The MP4 with its top-level `from` box renamed `to` (e.g. `moov` → `free`: index gone).
pub fn rename_box(data: &[u8], from: &[u8; 4], to: &[u8; 4]) -> Vec<u8> {
    let mut out = data.to_vec();
    let b = the_box(data, &[from]);
    out[b.start + 4..b.start + 8].copy_from_slice(to);
    out
}

/// Offset of the `duration` field in a full box of kind `mvhd`/`mdhd` (`track` false) or
/// `tkhd` (`track` true), and its width in bytes.
fn duration_field(data: &[u8], b: &BoxAt, track: bool) -> (usize, usize) {
    let version = data[b.body()];
    match (version, track) {
        // version/flags, creation, modification, timescale | track_ID(+reserved)
        (0, false) => (b.body() + 4 + 4 + 4 + 4, 4),
        (0, true) => (b.body() + 4 + 4 + 4 + 4 + 4, 4),
        (1, false) => (b.body() + 4 + 8 + 8 + 4, 8),
        (1, true) => (b.body() + 4 + 8 + 8 + 4 + 4, 8),
        _ => panic!("unknown full-box version {version}"),
    }
}

/// The MP4 with every announced duration (`mvhd`, `tkhd`, `mdhd`) set to 0; the sample
/// tables (and so the frames) are untouched.
pub fn zero_durations(data: &[u8]) -> Vec<u8> {
    scale_durations(data, 0)
}

/// The MP4 with every announced duration (`mvhd`, `tkhd`, `mdhd`) multiplied by `factor`
/// (saturating); the sample tables (and so the frames) are untouched.
pub fn scale_durations(data: &[u8], factor: u64) -> Vec<u8> {
    let mut out = data.to_vec();
    let mut fields = Vec::new();
    for b in find_boxes(data, &[b"moov", b"mvhd"]) {
        fields.push(duration_field(data, &b, false));
    }
    for b in find_boxes(data, &[b"moov", b"trak", b"tkhd"]) {
        fields.push(duration_field(data, &b, true));
    }
    for b in find_boxes(data, &[b"moov", b"trak", b"mdia", b"mdhd"]) {
        fields.push(duration_field(data, &b, false));
    }
    assert!(fields.len() >= 3, "mvhd/tkhd/mdhd not found");
    for (at, width) in fields {
        let field = &mut out[at..at + width];
        if width == 4 {
            let v = u64::from(be32(field, 0)).saturating_mul(factor);
            let v = u32::try_from(v).unwrap_or(u32::MAX);
            field.copy_from_slice(&v.to_be_bytes());
        } else {
            let v = u64::from_be_bytes(field[..8].try_into().expect("8 bytes"));
            field.copy_from_slice(&v.saturating_mul(factor).to_be_bytes());
        }
    }
    out
}

/// The MP4 with the first video track's sample-table box `kind` (`stts` or `stsz`) claiming
/// `count` samples in its first count field (the entries themselves are unchanged: an index
/// that promises far more samples than the file holds).
pub fn claim_samples(data: &[u8], kind: &[u8; 4], count: u32) -> Vec<u8> {
    let b = find_boxes(data, &[b"moov", b"trak", b"mdia", b"minf", b"stbl", kind])
        .into_iter()
        .next()
        .unwrap_or_else(|| panic!("no {}", String::from_utf8_lossy(kind)));
    // Full box header (4), then stts: entry_count, sample_count…; stsz: sample_size, sample_count.
    let at = b.body() + 8;
    let mut out = data.to_vec();
    out[at..at + 4].copy_from_slice(&count.to_be_bytes());
    out
}

/// The MP4 with the first track's display matrix set to a 90° rotation (what phones write
/// for portrait video; ffprobe reports `rotation=-90`). The coded frames are unchanged.
pub fn rotate_90(data: &[u8]) -> Vec<u8> {
    let mut out = data.to_vec();
    let tkhd = find_boxes(data, &[b"moov", b"trak", b"tkhd"])
        .into_iter()
        .next()
        .expect("tkhd");
    let (duration_at, width) = duration_field(data, &tkhd, true);
    // duration, reserved[2], layer, alternate_group, volume, reserved, then the matrix.
    let matrix_at = duration_at + width + 8 + 2 + 2 + 2 + 2;
    let matrix: [i32; 9] = [0, 0x10000, 0, -0x10000, 0, 0, 0, 0, 0x4000_0000];
    for (i, v) in matrix.iter().enumerate() {
        out[matrix_at + 4 * i..matrix_at + 4 * i + 4].copy_from_slice(&v.to_be_bytes());
    }
    out
}

/// `data` with the first occurrence of `from` replaced by `to` (same length; e.g. a codec ID).
pub fn replace_once(data: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    assert_eq!(from.len(), to.len());
    let at = data
        .windows(from.len())
        .position(|w| w == from)
        .unwrap_or_else(|| panic!("{:?} not found", String::from_utf8_lossy(from)));
    let mut out = data.to_vec();
    out[at..at + to.len()].copy_from_slice(to);
    out
}

/// Whether `data` contains the byte string `needle` (e.g. a Matroska element ID).
pub fn contains(data: &[u8], needle: &[u8]) -> bool {
    data.windows(needle.len()).any(|w| w == needle)
}

/// The first WebM/Matroska Cluster element (ID `1F 43 B6 75`).
pub fn first_cluster(data: &[u8]) -> usize {
    data.windows(4)
        .position(|w| w == [0x1f, 0x43, 0xb6, 0x75])
        .expect("a Cluster element")
}

/// Every frame of `path` decoded by ffmpeg to 8-bit 4:2:0 (`-pix_fmt yuv420p`, no colour
/// conversion) and turned into RGB here with the BT.601 limited-range matrix and nearest
/// chroma. For odd frame sizes, where swscale's own YUV→RGB drifts the chroma across the
/// frame (171x97: 23 dB against this exact conversion, GStreamer 42 dB).
pub fn ffmpeg_frames_bt601(path: &Path, w: u32, h: u32) -> Vec<Vec<u8>> {
    let p = path.to_str().expect("utf-8 temp path");
    let raw = ffmpeg(&[
        "-i",
        p,
        "-map",
        "0:v:0",
        "-fps_mode",
        "passthrough",
        "-f",
        "rawvideo",
        "-pix_fmt",
        "yuv420p",
        "-",
    ]);
    let (w, h) = (w as usize, h as usize);
    let (cw, ch) = (w.div_ceil(2), h.div_ceil(2));
    let frame = w * h + 2 * cw * ch;
    assert!(
        !raw.is_empty() && raw.len().is_multiple_of(frame),
        "ffmpeg decoded {} bytes of {p}, not a multiple of a {w}x{h} 4:2:0 frame",
        raw.len()
    );
    raw.chunks_exact(frame)
        .map(|f| {
            let (y, uv) = f.split_at(w * h);
            let (u, v) = uv.split_at(cw * ch);
            let mut rgb = Vec::with_capacity(w * h * 3);
            for row in 0..h {
                for col in 0..w {
                    let c = (row / 2) * cw + col / 2;
                    let luma = (f64::from(y[row * w + col]) - 16.0) * 255.0 / 219.0;
                    let cb = (f64::from(u[c]) - 128.0) * 255.0 / 224.0;
                    let cr = (f64::from(v[c]) - 128.0) * 255.0 / 224.0;
                    let r = luma + 1.402 * cr;
                    let b = luma + 1.772 * cb;
                    let g = (luma - 0.299 * r - 0.114 * b) / 0.587;
                    for x in [r, g, b] {
                        rgb.push(x.round().clamp(0.0, 255.0) as u8);
                    }
                }
            }
            rgb
        })
        .collect()
}
