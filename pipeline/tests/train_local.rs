//! End to end on a local directory: real videos → GStreamer → dataflow → candle → Parquet and
//! checkpoints; and a corrupt file among them is quarantined while the job goes on.

mod common;

use common::*;

#[test]
fn trains_writes_metrics_and_loadable_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let videos = tmp.path().join("videos");
    make_corpus(&videos, 6);
    let out = tmp.path().join("out");
    let cfg = tmp.path().join("cfg.yaml");
    let steps = 8;
    write_config(&cfg, &videos, &out, steps);
    let run = run_train(&cfg, &[], &["--workers", "2"]);
    assert_ok(&run);

    let rows = read_metrics(out.to_str().unwrap(), &Default::default());
    assert_eq!(rows.len() as u64, steps);
    for (i, r) in rows.iter().enumerate() {
        assert_eq!(r.step, i as u64 + 1);
        assert!(
            r.loss.is_finite() && r.loss > 0.0,
            "step {} loss {}",
            r.step,
            r.loss
        );
        assert_eq!(r.loss_per_mask.len(), 2);
        assert_eq!(r.context_tokens.len(), 2);
        assert!(r.lr > 0.0 && r.weight_decay > 0.0 && r.ema_momentum >= 0.998);
        assert!(r.step_time_s > 0.0 && r.clips_per_sec > 0.0);
        // Every step's clips were read from the store and decoded.
        assert!(r.bytes_read > 0 && r.decode_s > 0.0, "{r:?}");
    }
    assert!(read_quarantine(out.to_str().unwrap()).is_empty());

    // Checkpoints every 4 steps and at the end; the last one loads back and is at the end step.
    for step in [4u64, 8] {
        let path = out.join(format!("checkpoints/step-{step:08}.safetensors"));
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let model = vjepa_model::VJepa::from_safetensors(&bytes, &vjepa_model::Device::Cpu)
            .expect("checkpoint loads");
        assert_eq!(model.steps_done(), step);
    }
}

#[test]
fn corrupt_video_is_quarantined_and_the_job_goes_on() {
    let tmp = tempfile::tempdir().unwrap();
    let videos = tmp.path().join("videos");
    make_corpus(&videos, 4);
    // Random bytes named .mp4, and a real video cut in half.
    let mut junk = vec![0u8; 50_000];
    let mut x: u32 = 12345;
    for b in junk.iter_mut() {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *b = x as u8;
    }
    std::fs::write(videos.join("zz_random_bytes.mp4"), &junk).unwrap();
    let out = tmp.path().join("out");
    let cfg = tmp.path().join("cfg.yaml");
    let steps = 6; // 24 clips over 5 videos: the corrupt one is drawn in every epoch
    write_config(&cfg, &videos, &out, steps);
    let run = run_train(&cfg, &[], &[]);
    assert_ok(&run);
    let q = read_quarantine(out.to_str().unwrap());
    assert_eq!(q.len(), 1, "{q:?}");
    assert!(q[0].uri.ends_with("zz_random_bytes.mp4"), "{:?}", q[0]);
    assert!(!q[0].reason.is_empty());
    let rows = read_metrics(out.to_str().unwrap(), &Default::default());
    assert_eq!(rows.len() as u64, steps);
    assert!(rows.iter().all(|r| r.loss.is_finite()));
}

/// A run that fails still leaves its tables: every bad video of an all-bad corpus in the
/// quarantine table, and the metrics of the steps trained before a non-finite loss.
#[test]
fn a_failed_run_still_writes_its_tables() {
    let tmp = tempfile::tempdir().unwrap();
    let junk = tmp.path().join("junk");
    std::fs::create_dir_all(&junk).unwrap();
    for i in 0..4 {
        std::fs::write(junk.join(format!("bad{i}.mp4")), format!("not a video {i}")).unwrap();
    }
    std::fs::write(junk.join("empty.webm"), b"").unwrap();
    // Failed runs exit at once (no lingering metrics server).
    let no_linger = |cfg: &std::path::Path| {
        let text = std::fs::read_to_string(cfg).unwrap();
        let text = text.replace("  linger_secs: 30", "  linger_secs: 0");
        assert!(
            text.contains("  linger_secs: 0"),
            "quickstart.yaml layout changed"
        );
        std::fs::write(cfg, text).unwrap();
    };
    let out = tmp.path().join("out-junk");
    let cfg = tmp.path().join("junk.yaml");
    write_config(&cfg, &junk, &out, 3);
    no_linger(&cfg);
    let run = run_train(&cfg, &[], &[]);
    assert_eq!(run.status.code(), Some(1), "{run:?}");
    let mut q: Vec<String> = read_quarantine(out.to_str().unwrap())
        .into_iter()
        .map(|r| format!("{} {}", r.uri.rsplit('/').next().unwrap_or(""), r.reason))
        .collect();
    q.sort();
    assert_eq!(
        q,
        [
            "bad0.mp4 not_a_video",
            "bad1.mp4 not_a_video",
            "bad2.mp4 not_a_video",
            "bad3.mp4 not_a_video",
            "empty.webm empty_file"
        ]
    );
    assert!(read_metrics(out.to_str().unwrap(), &Default::default()).is_empty());

    // A learning rate that blows up: the steps before the non-finite loss are in the table.
    let videos = tmp.path().join("videos");
    make_corpus(&videos, 3);
    let out = tmp.path().join("out-nan");
    let cfg = tmp.path().join("nan.yaml");
    write_config(&cfg, &videos, &out, 6);
    let text = std::fs::read_to_string(&cfg).unwrap();
    let blown: Vec<&str> = text
        .lines()
        .map(|l| {
            if l.starts_with("  lr: ") {
                "  lr: 1.0e20"
            } else {
                l
            }
        })
        .collect();
    assert!(
        blown.contains(&"  lr: 1.0e20"),
        "the config sets optimization.lr"
    );
    std::fs::write(&cfg, blown.join("\n")).unwrap();
    no_linger(&cfg);
    let run = run_train(&cfg, &[], &[]);
    assert_eq!(
        run.status.code(),
        Some(3),
        "a diverged run exits 3: {run:?}"
    );
    assert!(
        String::from_utf8_lossy(&run.stderr).contains("non-finite loss"),
        "{run:?}"
    );
    let rows = read_metrics(out.to_str().unwrap(), &Default::default());
    assert!(!rows.is_empty(), "the steps before the failure");
    assert!(rows.iter().all(|r| r.loss.is_finite()), "{rows:?}");
    assert!(read_quarantine(out.to_str().unwrap()).is_empty());
}

/// An official-style index beside the videos (absolute paths into a sibling folder) trains
/// with `data.index_root` set to their common folder.
#[test]
fn index_root_reads_an_index_beside_the_videos() {
    let tmp = tempfile::tempdir().unwrap();
    let root = std::fs::canonicalize(tmp.path()).unwrap();
    let videos = root.join("videos");
    make_corpus(&videos, 3);
    let mut names: Vec<_> = std::fs::read_dir(&videos)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    names.sort();
    let index: String = names
        .iter()
        .enumerate()
        .map(|(i, p)| format!("{} {i}\n", p.display()))
        .collect();
    std::fs::create_dir_all(root.join("lists")).unwrap();
    let index_path = root.join("lists/train.csv");
    std::fs::write(&index_path, index).unwrap();
    let out = root.join("out");
    let cfg = root.join("cfg.yaml");
    let text = small_config(
        index_path.to_str().unwrap(),
        &format!("{}/", out.display()),
        2,
    );
    let text = text.replacen(
        "data:\n",
        &format!("data:\n  index_root: {}/\n", root.display()),
        1,
    );
    assert!(
        text.contains("index_root"),
        "quickstart.yaml layout changed"
    );
    std::fs::write(&cfg, text).unwrap();
    let run = run_train(&cfg, &[], &[]);
    assert_ok(&run);
    assert!(read_quarantine(out.to_str().unwrap()).is_empty());
    assert_eq!(
        read_metrics(out.to_str().unwrap(), &Default::default()).len(),
        2
    );
}

#[test]
fn csv_index_entries_escaping_the_store_are_refused_and_recorded() {
    let tmp = tempfile::tempdir().unwrap();
    let videos = tmp.path().join("videos");
    make_corpus(&videos, 3);
    std::fs::write(tmp.path().join("outside.mp4"), b"never read").unwrap();
    let mut index = String::new();
    let mut names: Vec<_> = std::fs::read_dir(&videos)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    for (i, n) in names.iter().enumerate() {
        index.push_str(&format!("{n} {i}\n"));
    }
    index.push_str("../outside.mp4 7\n");
    index.push_str(&format!("{} 8\n", tmp.path().join("outside.mp4").display()));
    index.push_str("s3://another-bucket/x.mp4 9\n");
    let index_path = videos.join("train.csv");
    std::fs::write(&index_path, index).unwrap();

    let out = tmp.path().join("out");
    let cfg = tmp.path().join("cfg.yaml");
    std::fs::write(
        &cfg,
        small_config(
            index_path.to_str().unwrap(),
            &format!("{}/", out.display()),
            3,
        ),
    )
    .unwrap();
    assert_ok(&run_train(&cfg, &[], &[]));
    let q = read_quarantine(out.to_str().unwrap());
    assert_eq!(q.len(), 3, "{q:?}");
    assert!(
        q.iter()
            .any(|r| r.uri.contains("../outside.mp4") && r.reason == "path_escapes_store"),
        "{q:?}"
    );
    assert!(q.iter().any(|r| r.uri.contains("another-bucket")), "{q:?}");
    assert_eq!(
        read_metrics(out.to_str().unwrap(), &Default::default()).len(),
        3
    );
}

#[test]
fn resumed_run_continues_with_the_same_losses() {
    let tmp = tempfile::tempdir().unwrap();
    let videos = tmp.path().join("videos");
    make_corpus(&videos, 4);

    let full_out = tmp.path().join("full");
    let full_cfg = tmp.path().join("full.yaml");
    write_config(&full_cfg, &videos, &full_out, 6);
    assert_ok(&run_train(&full_cfg, &[], &[]));

    let part_out = tmp.path().join("part");
    let part_cfg = tmp.path().join("part.yaml");
    write_config(&part_cfg, &videos, &part_out, 6);
    assert_ok(&run_train(&part_cfg, &[], &["--max-steps", "3"]));
    assert_ok(&run_train(&part_cfg, &[], &["--resume"]));

    let full = read_metrics(full_out.to_str().unwrap(), &Default::default());
    // The first run's table (steps 1-3), then the resumed run's `metrics-from-00000003`
    // (and its rolls): together the uninterrupted run's trace.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store =
        vjepa_storage::Store::open(part_out.to_str().unwrap(), &Default::default(), false).unwrap();
    let files = rt
        .block_on(vjepa_storage::tables::table_files(&store, "metrics"))
        .unwrap();
    assert_eq!(
        files[..2],
        ["metrics.parquet", "metrics-from-00000003.parquet"]
    );
    let first = rt
        .block_on(vjepa_storage::tables::read_metrics(
            &store,
            "metrics.parquet",
        ))
        .unwrap();
    assert_eq!(first.len(), 3);
    let all = read_metrics(part_out.to_str().unwrap(), &Default::default());
    assert_same_trace(&full, all.iter());
}

/// `data_aug`'s frame augmentations (RandAugment, motion shift, random erasing) train through
/// the whole-frame path. With an erasing probability too small to ever draw a box, that path
/// gives the direct crop path's clips and so its losses, to the bit (same frames, crops and
/// flips drawn in the same order); with all three on, the run trains on other clips (other
/// losses), the same again for the same seed.
#[test]
fn frame_augmentations_train_through_the_whole_frame_path() {
    let tmp = tempfile::tempdir().unwrap();
    let videos = tmp.path().join("videos");
    make_corpus(&videos, 4);
    let run = |name: &str, replace: &[(&str, &str)]| {
        let out = tmp.path().join(name);
        let mut text = small_config(
            &format!("{}/", videos.display()),
            &format!("{}/", out.display()),
            4,
        );
        for (from, to) in replace {
            assert!(text.contains(from), "{from}");
            text = text.replace(from, to);
        }
        let cfg = tmp.path().join(format!("{name}.yaml"));
        std::fs::write(&cfg, text).unwrap();
        assert_ok(&run_train(&cfg, &[], &[]));
        read_metrics(out.to_str().unwrap(), &Default::default())
    };
    let plain = run("plain", &[]);
    let whole_frames = run("whole-frames", &[("reprob: 0.0", "reprob: 1.0e-300")]);
    assert_eq!(plain.len(), 4);
    assert_same_trace(&plain, whole_frames.iter());

    let all: &[(&str, &str)] = &[
        ("auto_augment: false", "auto_augment: true"),
        ("motion_shift: false", "motion_shift: true"),
        ("reprob: 0.0", "reprob: 0.5"),
    ];
    let augmented = run("augmented", all);
    assert_same_trace(&augmented, run("augmented-again", all).iter());
    assert!(augmented.iter().all(|m| m.loss.is_finite()));
    assert!(
        augmented
            .iter()
            .zip(&plain)
            .any(|(a, p)| a.loss.to_bits() != p.loss.to_bits()),
        "augmented clips train to other losses"
    );
}
