//! `make-samples`' benchmark options reach the encoders: the keyframe interval is what ffprobe
//! finds in the stream, a higher bitrate gives a proportionally larger file, and the patterns
//! given are the ones cycled.

use std::path::Path;
use std::process::Command;

use vjepa_ingest::{SampleCodec, SampleOverrides, make_samples_with, sample_specs};

/// Packet flags of the video stream, in stream order (`K` first for a keyframe), via ffprobe.
fn keyframe_positions(path: &Path) -> Vec<usize> {
    let out = Command::new("ffprobe")
        .args(["-v", "error", "-select_streams", "v:0"])
        .args(["-show_entries", "packet=flags", "-of", "csv=p=0"])
        .arg(path)
        .output()
        .expect("ffprobe (ops/setup.sh installs it)");
    assert!(out.status.success(), "ffprobe failed on {}", path.display());
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .lines()
        .enumerate()
        .filter(|(_, flags)| flags.starts_with('K'))
        .map(|(i, _)| i)
        .collect()
}

#[test]
fn keyframe_interval_and_bitrate_reach_the_encoders() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (codec, interval) in [(SampleCodec::H264Mp4, 12), (SampleCodec::Vp9Webm, 8)] {
        let overrides = SampleOverrides {
            size: Some((160, 120)),
            frames: Some(48),
            fps: Some(24),
            codec: Some(codec),
            keyframe_interval: Some(interval),
            ..SampleOverrides::default()
        };
        let paths = make_samples_with(&dir.path().join(codec.as_str()), 1, &overrides)
            .expect("make sample");
        let keys = keyframe_positions(&paths[0]);
        let want: Vec<usize> = (0..48).step_by(interval as usize).collect();
        assert_eq!(keys, want, "{codec:?}: keyframes in stream order");
    }

    // Noise fills any rate, so the file size follows the target.
    let size_at = |kbps: u32| {
        let overrides = SampleOverrides {
            size: Some((320, 240)),
            frames: Some(60),
            fps: Some(30),
            codec: Some(SampleCodec::H264Mp4),
            bitrate_kbps: Some(kbps),
            patterns: vec!["snow".into(), "smpte horizontal-speed=4".into()],
            ..SampleOverrides::default()
        };
        let specs = sample_specs(3, &overrides);
        let patterns: Vec<&str> = specs.iter().map(|s| s.pattern.as_str()).collect();
        assert_eq!(patterns, ["snow", "smpte horizontal-speed=4", "snow"]);
        assert!(
            specs[0].name.ends_with(&format!("-{kbps}kbps")),
            "{:?}",
            specs[0]
        );
        let out = dir.path().join(format!("rate-{kbps}"));
        let paths = make_samples_with(&out, 1, &overrides).expect("make sample");
        std::fs::metadata(&paths[0]).expect("stat").len() as f64
    };
    let (low, high) = (size_at(200), size_at(1600));
    // 2 s of video: 200 kbit/s ≈ 50 kB, 1600 kbit/s ≈ 400 kB.
    assert!(
        (5.0..11.0).contains(&(high / low)),
        "8× the bitrate gave {high} vs {low} bytes"
    );
}
