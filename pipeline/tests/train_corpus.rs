//! End to end with the bad-input corpus (issue 5): a directory of good videos plus one bad file
//! per quarantine reason trains to the last step, and `quarantine.parquet` holds exactly one
//! record per bad file, with that file's reason. The per-kind decoder outcomes are tested in
//! `pipeline/ingest/tests/corpus.rs`; this checks that the job turns them into records.

mod common;
// The corpus generators of the ingest crate's tests (byte edits of real files, ffmpeg).
#[path = "../ingest/tests/common/media.rs"]
mod media;

use std::collections::BTreeMap;

use common::*;

#[test]
fn bad_files_are_quarantined_with_their_reason_and_training_goes_on() {
    let tmp = tempfile::tempdir().unwrap();
    let videos = tmp.path().join("videos");
    make_corpus(&videos, 4);
    let sample = |stem: &str| std::fs::read(videos.join(stem)).expect("sample written");
    // H.264 MP4 with the index at the end, and the faststart one (index first).
    let mp4 = sample("sample-0000-h264-320x240-100f-30fps.mp4");
    let faststart = sample("sample-0002-h264fs-256x192-150f-24fps.mp4");

    let mut bad: BTreeMap<&str, &str> = BTreeMap::new();
    let mut put = |name: &'static str, reason: &'static str, bytes: &[u8]| {
        std::fs::write(videos.join(name), bytes).unwrap();
        bad.insert(name, reason);
    };
    put("bad-empty.mp4", "empty_file", &[]);
    put("bad-random.mp4", "not_a_video", &media::noise(50_000, 1));
    put("bad-cut.mp4", "truncated", &mp4[..mp4.len() / 2]);
    put(
        "bad-no-moov.mp4",
        "demux_error",
        &media::rename_box(&mp4, b"moov", b"free"),
    );
    put(
        "bad-garbage.mp4",
        "decode_error",
        &media::garbage_mdat(&mp4, 2),
    );
    put(
        "bad-codec.mp4",
        "unsupported_format",
        &media::replace_once(&faststart, b"avc1", b"xyz1"),
    );
    let png = tmp.path().join("image.png");
    let audio = tmp.path().join("audio.mp4");
    let huge = tmp.path().join("huge.mp4");
    media::ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        "testsrc2=size=64x48",
        "-frames:v",
        "1",
        png.to_str().unwrap(),
    ]);
    media::ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        "sine=duration=1",
        "-c:a",
        "aac",
        audio.to_str().unwrap(),
    ]);
    // One black 4160x4160 frame: above the decoder's 4096x4096 limit.
    media::ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        "color=black:size=4160x4160",
        "-frames:v",
        "1",
        "-c:v",
        "libx264",
        "-preset",
        "ultrafast",
        huge.to_str().unwrap(),
    ]);
    put("bad-png.mp4", "not_a_video", &std::fs::read(&png).unwrap());
    put(
        "bad-audio.mp4",
        "no_video_stream",
        &std::fs::read(&audio).unwrap(),
    );
    put("bad-huge.mp4", "too_large", &std::fs::read(&huge).unwrap());

    let out = tmp.path().join("out");
    let cfg = tmp.path().join("cfg.yaml");
    // 13 videos; 6 steps of 4 clips draw 24, so every file comes up in the first epoch.
    let steps = 6;
    write_config(&cfg, &videos, &out, steps);
    let run = run_train(&cfg, &[], &[]);
    assert_ok(&run);

    let q = read_quarantine(out.to_str().unwrap());
    let got: BTreeMap<String, String> = q
        .iter()
        .map(|r| {
            let name = r.uri.rsplit('/').next().unwrap_or_default().to_string();
            (name, r.reason.clone())
        })
        .collect();
    assert_eq!(got.len(), q.len(), "one record per file: {q:?}");
    let want: BTreeMap<String, String> = bad
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    assert_eq!(got, want, "records: {q:?}");
    assert!(q.iter().all(|r| !r.detail.is_empty()), "{q:?}");

    let rows = read_metrics(out.to_str().unwrap(), &Default::default());
    assert_eq!(rows.len() as u64, steps);
    assert!(rows.iter().all(|r| r.loss.is_finite() && r.loss > 0.0));
}
