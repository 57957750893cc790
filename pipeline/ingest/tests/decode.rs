//! Decoding real encoded media: info, layout, frame order, agreement with ffmpeg, padding.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use common::{corpus, read, vjepa_indices};
use vjepa_ingest::{DecodedClip, Decoder, DecoderOptions, VideoInfo};

fn decode(dec: &mut Decoder, path: &Path, indices: &[u64]) -> DecodedClip {
    let want = indices.to_vec();
    dec.decode_clip(read(path), &mut |_: &VideoInfo| want.clone())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn check_clip(path: &Path, w: u32, h: u32, fps: f64, frames: u64) {
    let mut dec = Decoder::new(DecoderOptions::default()).expect("decoder");
    let indices = vjepa_indices(frames, 0);
    assert_eq!(
        indices,
        vec![0, 4, 8, 12, 17, 21, 25, 29, 34, 38, 42, 46, 51, 55, 59, 63]
    );
    let t = Instant::now();
    let mut seen: Option<VideoInfo> = None;
    let clip = dec
        .decode_clip(read(path), &mut |info: &VideoInfo| {
            seen = Some(info.clone());
            indices.clone()
        })
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    println!(
        "{}: {:?} decoded 16 frames in {:?}",
        path.display(),
        clip.info,
        t.elapsed()
    );
    assert_eq!(seen.as_ref(), Some(&clip.info));
    let info = &clip.info;
    assert_eq!((info.width, info.height), (w, h));
    assert_eq!((clip.width, clip.height), (w, h));
    assert!((info.fps - fps).abs() < 1e-6, "fps {}", info.fps);
    assert_eq!(
        info.num_frames, frames,
        "num_frames (duration {:?})",
        info.duration_ns
    );
    assert_eq!(clip.indices, indices);
    assert_eq!(clip.frames.len(), 16 * h as usize * w as usize * 3);
    // Moving patterns: consecutive chosen frames differ, and frames are not blank.
    for t in 1..16 {
        assert_ne!(
            clip.frame(t - 1),
            clip.frame(t),
            "frames {} and {} identical",
            t - 1,
            t
        );
    }
    let f0 = clip.frame(0).expect("frame 0");
    assert!(f0.iter().any(|&b| b > 16) && f0.iter().any(|&b| b < 240));

    // Frame counting is consistent: a frame decoded on its own equals the same index in the clip.
    let alone = decode(&mut dec, path, &[42]);
    assert_eq!(alone.frame(0), clip.frame(10));
    // A clip later in the file.
    let late = vjepa_indices(frames, frames - 64);
    let clip2 = decode(&mut dec, path, &late);
    assert_eq!(clip2.frames.len(), clip.frames.len());
}

#[test]
fn h264_mp4_moov_at_end() {
    check_clip(&corpus().mp4, 320, 240, 30.0, 100);
}

#[test]
fn h264_mp4_faststart() {
    check_clip(&corpus().mp4_faststart, 256, 192, 25.0, 100);
}

#[test]
fn vp9_webm() {
    check_clip(&corpus().webm, 320, 240, 24.0, 100);
}

#[test]
fn repeated_and_unsorted_indices() {
    let c = corpus();
    let mut dec = Decoder::new(DecoderOptions::default()).expect("decoder");
    let clip = decode(&mut dec, &c.mp4, &[3, 3, 7, 7, 7]);
    assert_eq!(clip.frame(0), clip.frame(1));
    assert_eq!(clip.frame(2), clip.frame(4));
    assert_ne!(clip.frame(0), clip.frame(2));
    let unsorted = decode(&mut dec, &c.mp4, &[7, 3]);
    assert_eq!(unsorted.frame(0), clip.frame(2));
    assert_eq!(unsorted.frame(1), clip.frame(0));
    // No indices: info only.
    let none = decode(&mut dec, &c.mp4, &[]);
    assert!(none.frames.is_empty());
    assert_eq!(none.info.num_frames, 100);
}

#[test]
fn short_video_is_padded_with_last_frame() {
    let c = corpus();
    let mut dec = Decoder::new(DecoderOptions::default()).expect("decoder");
    let indices = [0, 10, 20, 30, 39, 40, 45, 63];
    let clip = decode(&mut dec, &c.short, &indices);
    assert_eq!(clip.info.num_frames, 40);
    assert_eq!((clip.width, clip.height), (160, 120));
    assert_eq!(clip.frames.len(), indices.len() * 160 * 120 * 3);
    let last = clip.frame(4).expect("frame 39");
    for t in 5..indices.len() {
        assert_eq!(
            clip.frame(t),
            Some(last),
            "position {t} not padded with frame 39"
        );
    }
    assert_ne!(clip.frame(3), Some(last));
    // The spec's short-video rule only asks for existing frames.
    let spec_idx = vjepa_indices(40, 0);
    assert_eq!(
        spec_idx,
        vec![0, 4, 8, 13, 17, 22, 26, 31, 35, 39, 39, 39, 39, 39, 39, 39]
    );
    let clip = decode(&mut dec, &c.short, &spec_idx);
    assert_eq!(clip.frame(9), Some(last));
    assert_eq!(clip.frame(15), Some(last));
}

fn psnr(a: &[u8], b: &[u8]) -> f64 {
    assert_eq!(a.len(), b.len());
    let mse: f64 = a
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

fn ffmpeg_frame(path: &Path, n: u64) -> Option<Vec<u8>> {
    let out = Command::new("ffmpeg")
        .args(["-v", "error", "-nostdin", "-i"])
        .arg(path)
        .args([
            "-vf",
            &format!("select=eq(n\\,{n})"),
            "-vframes",
            "1",
            "-f",
            "rawvideo",
            "-pix_fmt",
            "rgb24",
            "-",
        ])
        .output()
        .ok()?;
    assert!(
        out.status.success(),
        "ffmpeg failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(out.stdout)
}

#[test]
fn matches_ffmpeg() {
    if Command::new("ffmpeg").arg("-version").output().is_err() {
        println!("SKIPPED matches_ffmpeg: ffmpeg not found on PATH");
        return;
    }
    let c = corpus();
    let mut dec = Decoder::new(DecoderOptions::default()).expect("decoder");
    for (path, indices) in [
        (&c.mp4, [0u64, 17, 63, 99]),
        (&c.webm, [0, 17, 63, 99]),
        (&c.mp4_faststart, [0, 17, 63, 99]),
        (&c.odd_width, [0, 1, 15, 29]),
    ] {
        let clip = decode(&mut dec, path, &indices);
        for (t, &n) in indices.iter().enumerate() {
            let Some(reference) = ffmpeg_frame(path, n) else {
                println!("SKIPPED matches_ffmpeg: ffmpeg did not run");
                return;
            };
            let ours = clip.frame(t).expect("frame");
            let p = psnr(ours, &reference);
            // Neighbouring frames must be clearly worse: checks the frame counting.
            let other = ffmpeg_frame(path, if n == 0 { 1 } else { n - 1 }).expect("ffmpeg");
            let p_other = psnr(ours, &other);
            println!(
                "{} frame {n}: PSNR vs ffmpeg {p:.1} dB (neighbour {p_other:.1} dB)",
                path.display()
            );
            assert!(
                p >= 35.0,
                "{} frame {n}: PSNR {p:.2} dB < 35",
                path.display()
            );
            assert!(
                p > p_other + 3.0,
                "{} frame {n}: neighbour frame matches as well",
                path.display()
            );
        }
    }
}

#[test]
fn decode_speed_320x240() {
    let c = corpus();
    println!("corpus made in {:?}", c.made_in);
    for threads in [0u32, 1] {
        let mut dec = Decoder::new(DecoderOptions {
            decoder_threads: threads,
            ..DecoderOptions::default()
        })
        .expect("decoder");
        for (name, path) in [("h264 mp4", &c.mp4), ("vp9 webm", &c.webm)] {
            let _ = decode(&mut dec, path, &[0]);
            let reps = 5;
            let t = Instant::now();
            for _ in 0..reps {
                let clip = decode(&mut dec, path, &[0]);
                assert_eq!(clip.indices.len(), 1);
            }
            let first = t.elapsed().as_secs_f64() * 1e3 / reps as f64;
            let indices = vjepa_indices(100, 36);
            let t = Instant::now();
            for _ in 0..reps {
                let clip = decode(&mut dec, path, &indices);
                assert_eq!(clip.indices.len(), 16);
            }
            let clip_ms = t.elapsed().as_secs_f64() * 1e3 / reps as f64;
            println!(
                "{name} 320x240, decoder threads {threads}: {clip_ms:.1} ms per 16-frame clip \
                 (frames 36..99, 100 frames decoded from 0); {first:.1} ms to the first frame"
            );
        }
    }
}

#[test]
fn sample_corpus_is_deterministic_and_decodes() {
    let specs = vjepa_ingest::default_sample_specs(6);
    assert_eq!(specs, vjepa_ingest::default_sample_specs(6));
    let dir = tempfile::tempdir().expect("tempdir");
    let t = Instant::now();
    let paths = vjepa_ingest::make_samples(dir.path(), 6).expect("samples");
    println!("6 default samples made in {:?}", t.elapsed());
    assert_eq!(paths.len(), 6);
    let mut dec = Decoder::new(DecoderOptions::default()).expect("decoder");
    for (spec, path) in specs.iter().zip(&paths) {
        assert_eq!(
            path.file_name().and_then(|f| f.to_str()),
            Some(spec.file_name().as_str())
        );
        let mut got = None;
        let clip = dec
            .decode_clip(read(path), &mut |info: &VideoInfo| {
                got = Some(info.clone());
                vjepa_indices(info.num_frames, 0)
            })
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let info = got.expect("choose called");
        assert_eq!(
            (info.width, info.height),
            (spec.width, spec.height),
            "{}",
            spec.name
        );
        assert_eq!(info.num_frames, u64::from(spec.frames), "{}", spec.name);
        assert!(
            (info.fps - f64::from(spec.fps)).abs() < 1e-6,
            "{}",
            spec.name
        );
        assert_eq!(
            clip.frames.len(),
            16 * (spec.width * spec.height * 3) as usize
        );
        assert_ne!(clip.frame(0), clip.frame(15), "{}: no motion", spec.name);
    }
}

#[test]
fn parallel_decoders_agree() {
    // Several workers (more than cores) decode concurrently; a Decoder moves into its thread.
    let c = corpus();
    let mut dec = Decoder::new(DecoderOptions::default()).expect("decoder");
    let indices = vjepa_indices(100, 20);
    let reference: Vec<DecodedClip> = [&c.mp4, &c.webm, &c.mp4_faststart]
        .iter()
        .map(|p| decode(&mut dec, p, &indices))
        .collect();
    let t = Instant::now();
    std::thread::scope(|s| {
        for w in 0..4usize {
            let reference = &reference;
            let indices = &indices;
            let mut dec = Decoder::new(DecoderOptions {
                decoder_threads: 1,
                ..DecoderOptions::default()
            })
            .expect("decoder");
            s.spawn(move || {
                for i in 0..9usize {
                    let k = (w + i) % 3;
                    let path = [&c.mp4, &c.webm, &c.mp4_faststart][k];
                    let clip = decode(&mut dec, path, indices);
                    assert_eq!(clip.frames, reference[k].frames, "worker {w} clip {i}");
                }
            });
        }
    });
    println!("4 workers x 9 clips in {:?}", t.elapsed());
}
