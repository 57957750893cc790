//! Seeking to the window gives exactly the frames a decode from the start gives, and skips work.

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use vjepa_ingest::{DecodedClip, Decoder, DecoderOptions, SampleCodec, SampleSpec, make_sample};

fn sample(dir: &Path, name: &str, codec: SampleCodec) -> Bytes {
    let spec = SampleSpec {
        name: name.into(),
        width: 160,
        height: 120,
        frames: 240,
        fps: 30,
        codec,
        pattern: "ball motion=sweep".into(),
        bitrate_kbps: None,
        keyframe_interval: None,
    };
    let path = make_sample(dir, &spec).expect("sample");
    std::fs::read(path).expect("read sample").into()
}

fn decode(dec: &mut Decoder, data: &Bytes, indices: &[u64]) -> DecodedClip {
    let want = indices.to_vec();
    dec.decode_clip_from(Arc::new(data.clone()), &mut |_| want.clone())
        .expect("decode")
}

#[test]
fn seek_to_window_equals_sequential_decode() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut seeking = Decoder::new(DecoderOptions::default()).expect("decoder");
    let mut sequential = Decoder::new(DecoderOptions {
        seek_min_frames: u64::MAX,
        ..DecoderOptions::default()
    })
    .expect("decoder");
    // Spec §1 spacing: 16 frames over a 64-frame window late in the file, plus a repeat.
    let late: Vec<u64> = (0..16)
        .map(|i| 170 + (i * 64) / 15)
        .map(|x| x.min(233))
        .collect();
    for (name, codec) in [
        ("h264", SampleCodec::H264Mp4),
        ("h264fs", SampleCodec::H264Mp4Faststart),
        ("vp9", SampleCodec::Vp9Webm),
    ] {
        let data = sample(dir.path(), name, codec);
        let a = decode(&mut seeking, &data, &late);
        let b = decode(&mut sequential, &data, &late);
        println!("{name}: seek {:?} vs sequential {:?}", a.stats, b.stats);
        assert_eq!(a.stats.seeks, 1, "{name}: expected one seek");
        assert_eq!(b.stats.seeks, 0);
        assert!(
            a.stats.frames_decoded < 120,
            "{name}: decoded {} frames after seeking",
            a.stats.frames_decoded
        );
        // Sequentially, every frame up to 233 is decoded or skipped as unreferenced.
        assert!(b.stats.frames_decoded + b.stats.frames_skipped >= 234);
        assert_eq!(a.indices, b.indices);
        for (t, n) in late.iter().enumerate() {
            assert!(
                a.frame(t) == b.frame(t),
                "{name}: frame {n} differs after a seek"
            );
        }
        // Neighbouring frames differ (the ball moves), so equality above checks numbering.
        assert_ne!(a.frame(0), a.frame(1));
        // Frame 0 plus a late window: the seek happens mid-clip.
        let mixed: Vec<u64> = [0u64, 1]
            .iter()
            .copied()
            .chain(late.iter().copied())
            .collect();
        let c = decode(&mut seeking, &data, &mixed);
        assert_eq!(c.stats.seeks, 1);
        for t in 0..late.len() {
            assert!(c.frame(t + 2) == a.frame(t), "{name}: mixed clip frame {t}");
        }
        assert!(c.frame(0) == decode(&mut sequential, &data, &[0]).frame(0));
    }
}

/// A Matroska file that claims 30 fps but whose frames later come every 100 ms: numbers from
/// timestamps would be wrong after a seek, so the decoder must notice and count instead.
#[test]
fn irregular_timestamps_after_a_seek_fall_back_to_counting() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("vfr.mkv");
    let out = std::process::Command::new("ffmpeg")
        .args(["-v", "error", "-y", "-f", "lavfi", "-i"])
        .arg("testsrc2=size=160x120:rate=30:duration=3")
        .args(["-vf", "setpts='if(lt(N,30),N/30,1+(N-30)/10)/TB'"])
        .args([
            "-fps_mode",
            "passthrough",
            "-c:v",
            "libx264",
            "-g",
            "15",
            "-bf",
            "2",
        ])
        .arg(&path)
        .output()
        .expect("ffmpeg not found: run ops/setup.sh");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let data: Bytes = std::fs::read(&path).expect("read").into();
    let mut eager = Decoder::new(DecoderOptions {
        seek_min_frames: 8,
        ..DecoderOptions::default()
    })
    .expect("decoder");
    let mut sequential = Decoder::new(DecoderOptions {
        seek_min_frames: u64::MAX,
        ..DecoderOptions::default()
    })
    .expect("decoder");
    let window: Vec<u64> = (60..90).step_by(2).collect();
    let a = decode(&mut eager, &data, &window);
    let b = decode(&mut sequential, &data, &window);
    println!("eager {:?}\nsequential {:?}", a.stats, b.stats);
    assert_eq!(b.stats.seeks, 0);
    for (t, n) in window.iter().enumerate() {
        assert!(a.frame(t) == b.frame(t), "frame {n} differs");
    }
    assert_ne!(a.frame(0), a.frame(1));
}

/// Dropping unreferenced, unwanted H.264/H.265 frames before the decoder changes no delivered
/// frame.
#[test]
fn skipping_unreferenced_frames_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut skipping = Decoder::new(DecoderOptions::default()).expect("decoder");
    let mut full = Decoder::new(DecoderOptions {
        skip_unneeded: false,
        ..DecoderOptions::default()
    })
    .expect("decoder");
    let early: Vec<u64> = (0..16).map(|i| 3 + (i * 64) / 15).collect();
    let late: Vec<u64> = (0..16)
        .map(|i| 170 + (i * 64) / 15)
        .map(|x| x.min(233))
        .collect();
    for (name, codec) in [
        ("h264", SampleCodec::H264Mp4),
        ("h264fs", SampleCodec::H264Mp4Faststart),
        ("h264mkv", SampleCodec::H264Mkv),
        ("h265", SampleCodec::H265Mp4),
    ] {
        let data = sample(dir.path(), name, codec);
        for window in [&early, &late] {
            let a = decode(&mut skipping, &data, window);
            let b = decode(&mut full, &data, window);
            println!(
                "{name}: skipped {} of {} decoded",
                a.stats.frames_skipped, b.stats.frames_decoded
            );
            assert_eq!(b.stats.frames_skipped, 0);
            for (t, n) in window.iter().enumerate() {
                assert!(
                    a.frame(t) == b.frame(t),
                    "{name}: frame {n} differs when skipping"
                );
            }
            if codec != SampleCodec::H264Mkv || window == &late {
                // MP4 numbers from timestamps from the start; Matroska only after a seek.
                assert!(a.stats.frames_skipped > 0, "{name}: nothing skipped");
            }
        }
    }
}
