//! Crash recovery: `vjepa train` killed with SIGKILL and restarted with the same command
//! continues from its newest complete checkpoint with exactly the losses of an uninterrupted
//! run; a checkpoint cut short is skipped for the one before it.

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use vjepa_storage::tables::MetricsRow;

/// Long enough (~0.1 s a step) that the kill lands well before the end; checkpoints every 4.
const STEPS: u64 = 24;

/// The uninterrupted run's metrics.
fn reference(videos: &Path, root: &Path) -> Vec<MetricsRow> {
    let out = root.join("full");
    let cfg = write_config(&root.join("full.yaml"), videos, &out, STEPS);
    assert_ok(&run_train(&cfg, &[], &[]));
    let rows = read_metrics(out.to_str().unwrap(), &Default::default());
    assert_eq!(rows.len() as u64, STEPS);
    rows
}

/// The step a run resumed from, from its log line `resuming … step=N`.
fn resumed_from(log: &str) -> u64 {
    let line = log
        .lines()
        .find(|l| l.contains("resuming"))
        .unwrap_or_else(|| panic!("no resume in the log:\n{log}"));
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("step=")?.parse().ok())
        .unwrap_or_else(|| panic!("no step in {line}"))
}

/// Starts `vjepa train --config cfg` and returns once `checkpoint` (relative to `out`) is in
/// place (the rename makes it appear whole), the run still going.
fn start_until_checkpoint(cfg: &Path, out: &Path, checkpoint: &str, stderr: Stdio) -> Child {
    let mut child = Command::new(bin())
        .args(["train", "--config", cfg.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("start vjepa train");
    let path = out.join(checkpoint);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !path.exists() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before {checkpoint}"
        );
        assert!(Instant::now() < deadline, "no {checkpoint} after 60 s");
        std::thread::sleep(Duration::from_millis(5));
    }
    child
}

#[test]
fn killed_run_restarted_with_the_same_command_continues_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let videos = tmp.path().join("videos");
    make_corpus(&videos, 4);
    let full = reference(&videos, tmp.path());

    let out = tmp.path().join("killed");
    let cfg = write_config(&tmp.path().join("killed.yaml"), &videos, &out, STEPS);
    // Kill as soon as the second checkpoint is in place.
    let mut child = start_until_checkpoint(
        &cfg,
        &out,
        "checkpoints/step-00000008.safetensors",
        Stdio::null(),
    );
    child.kill().expect("SIGKILL");
    child.wait().unwrap();
    let last = out.join(format!("checkpoints/step-{STEPS:08}.safetensors"));
    assert!(!last.exists(), "killed too late: the run had finished");
    // The tables are rolled at every checkpoint: what the killed run published survives it, at
    // least the steps up to its first checkpoint.
    let published = read_metrics(out.to_str().unwrap(), &Default::default());
    assert!(
        published.len() >= 4,
        "{} rows survived the kill",
        published.len()
    );
    assert_same_trace(&full[..published.len()], published.iter());

    // The same command again: no flag, no config change.
    let resumed = run_train(&cfg, &[], &[]);
    assert_ok(&resumed);
    let from = resumed_from(&String::from_utf8_lossy(&resumed.stderr));
    assert!(
        (8..STEPS).contains(&from) && from.is_multiple_of(4),
        "resumed from step {from}"
    );
    // The whole table (the killed run's files and the resumed run's) is the uninterrupted run's.
    let rows = read_metrics(out.to_str().unwrap(), &Default::default());
    assert_same_trace(&full, rows.iter());

    // And once more: the run is complete, nothing is trained or overwritten.
    let again = run_train(&cfg, &[], &[]);
    assert_ok(&again);
    assert!(
        String::from_utf8_lossy(&again.stdout).contains("nothing to train"),
        "{}",
        String::from_utf8_lossy(&again.stdout)
    );
}

#[test]
fn a_truncated_latest_checkpoint_is_skipped_for_the_previous_one() {
    let tmp = tempfile::tempdir().unwrap();
    let videos = tmp.path().join("videos");
    make_corpus(&videos, 4);
    let full = reference(&videos, tmp.path());

    let out = tmp.path().join("cut");
    let cfg = write_config(&tmp.path().join("cut.yaml"), &videos, &out, STEPS);
    assert_ok(&run_train(&cfg, &[], &["--max-steps", "12"]));
    // The newest checkpoint loses its tail, as after a crash of the disk rather than of us.
    let newest = out.join("checkpoints/step-00000012.safetensors");
    let len = std::fs::metadata(&newest).unwrap().len();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&newest)
        .unwrap();
    file.set_len(len / 2).unwrap();
    drop(file);

    let run = run_train(&cfg, &[], &[]);
    assert_ok(&run);
    let log = String::from_utf8_lossy(&run.stderr);
    assert!(
        log.contains("WARN") && log.contains("step-00000012.safetensors"),
        "no warning about the cut checkpoint:\n{log}"
    );
    assert_eq!(resumed_from(&log), 8);
    let rows = read_metrics(out.to_str().unwrap(), &Default::default());
    assert_same_trace(&full, rows.iter());
}

/// SIGTERM (`kubectl delete`, `systemctl stop`) ends the run after the step in progress, with
/// a checkpoint of it and complete tables; exit status 143. The same command continues
/// exactly, from that step rather than the last periodic checkpoint.
#[test]
fn sigterm_stops_after_a_step_with_its_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let videos = tmp.path().join("videos");
    make_corpus(&videos, 4);
    let full = reference(&videos, tmp.path());

    let out = tmp.path().join("stopped");
    let cfg = write_config(&tmp.path().join("stopped.yaml"), &videos, &out, STEPS);
    // Stop once training is under way (the first periodic checkpoint is in place).
    let child = start_until_checkpoint(
        &cfg,
        &out,
        "checkpoints/step-00000004.safetensors",
        Stdio::piped(),
    );
    sigterm(child.id());
    let output = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(143), "{log}");
    assert!(log.contains("stopped by SIGTERM after step"), "{log}");
    let rows = read_metrics(out.to_str().unwrap(), &Default::default());
    let stopped_at = rows.len() as u64;
    assert!(
        (4..STEPS).contains(&stopped_at),
        "stopped at step {stopped_at}"
    );
    assert!(
        out.join(format!("checkpoints/step-{stopped_at:08}.safetensors"))
            .exists(),
        "a checkpoint of the last step trained"
    );
    assert_same_trace(&full[..rows.len()], rows.iter());

    let resumed = run_train(&cfg, &[], &[]);
    assert_ok(&resumed);
    assert_eq!(
        resumed_from(&String::from_utf8_lossy(&resumed.stderr)),
        stopped_at
    );
    let rows = read_metrics(out.to_str().unwrap(), &Default::default());
    assert_same_trace(&full, rows.iter());
}

/// A corpus of `good` videos and one that is not a video (`broken.mp4`); returns its URI.
fn corpus_with_a_broken_video(videos: &Path, good: usize) -> String {
    make_corpus(videos, good);
    let broken = videos.join("broken.mp4");
    std::fs::write(&broken, b"not a video at all ".repeat(400)).unwrap();
    vjepa_storage::Store::open(
        &format!("{}/", videos.display()),
        &Default::default(),
        false,
    )
    .unwrap()
    .uri_of("broken.mp4")
}

/// The small config with clip records and the catalog re-listed every `refresh_secs`.
fn resume_config(root: &Path, name: &str, videos: &Path, refresh_secs: f64) -> (PathBuf, PathBuf) {
    let out = root.join(name);
    let text = with_clip_records(small_config(
        &format!("{}/", videos.display()),
        &format!("{}/", out.display()),
        STEPS,
    ));
    let cfg = root.join(format!("{name}.yaml"));
    std::fs::write(
        &cfg,
        format!("{text}\ncatalog:\n  refresh_secs: {refresh_secs}\n"),
    )
    .unwrap();
    (cfg, out)
}

/// How many quarantine records of `uri` the run's tables hold, over all their files.
fn records_of(out: &Path, uri: &str) -> usize {
    read_quarantine(out.to_str().unwrap())
        .iter()
        .filter(|r| r.uri == uri)
        .count()
}

/// A run stopped and resumed knows what it quarantined: the broken video is neither read nor
/// recorded again, and the losses are those of the run that was never stopped (the broken
/// video stays in the catalog version the whole time, as no refresh comes).
#[test]
fn a_resumed_run_knows_its_quarantined_videos() {
    let tmp = tempfile::tempdir().unwrap();
    let videos = tmp.path().join("videos");
    let broken = corpus_with_a_broken_video(&videos, 4);

    let (cfg, out) = resume_config(tmp.path(), "full", &videos, 3600.0);
    assert_ok(&run_train(&cfg, &[], &[]));
    let full = read_metrics(out.to_str().unwrap(), &Default::default());
    assert_eq!(full.len() as u64, STEPS);
    assert_eq!(records_of(&out, &broken), 1);

    let (cfg, out) = resume_config(tmp.path(), "split", &videos, 3600.0);
    let first = run_train(&cfg, &[], &["--max-steps", "8"]);
    assert_ok(&first);
    assert_eq!(
        records_of(&out, &broken),
        1,
        "found bad in the first 8 steps"
    );
    let second = run_train(&cfg, &[], &[]);
    assert_ok(&second);
    let log = String::from_utf8_lossy(&second.stderr);
    assert_eq!(resumed_from(&log), 8);
    assert!(
        !log.contains("video quarantined") && !log.contains("catalog changed"),
        "{log}"
    );
    assert_eq!(records_of(&out, &broken), 1, "recorded once");
    let rows = read_metrics(out.to_str().unwrap(), &Default::default());
    assert_same_trace(&full, rows.iter());
    let clips = read_clips(&out);
    assert!(clips.iter().all(|c| c.uri != broken));
    assert_eq!(clips.len() as u64, STEPS * 4);
}

/// A resumed run continues the catalog version the stopped run had in effect (here one that
/// the first refresh made without the broken video), numbering on from it, instead of starting
/// over from a listing that still holds the broken video.
#[test]
fn a_resumed_run_continues_the_catalog_version_in_effect() {
    let tmp = tempfile::tempdir().unwrap();
    let videos = tmp.path().join("videos");
    let broken = corpus_with_a_broken_video(&videos, 4);
    let (cfg, out) = resume_config(tmp.path(), "run", &videos, 0.2);
    // Long enough for a refresh to take the broken video out before the stop.
    let first = run_train(&cfg, &[], &["--max-steps", "16"]);
    assert_ok(&first);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store =
        vjepa_storage::Store::open(out.to_str().unwrap(), &Default::default(), false).unwrap();
    // Versions that take effect after step 16 (a refresh while the last steps were being
    // requested) are the stopped run's future: the resumed run deletes their records.
    let records_before: Vec<_> = version_records(&rt, &store)
        .into_iter()
        .filter(|r| r.from_step <= 16)
        .collect();
    assert!(
        records_before
            .iter()
            .any(|r| r.removed.iter().any(|v| v.uri == broken)),
        "no version without the broken video by step 16: {records_before:?}"
    );
    let in_effect = vjepa_pipeline::catalog::CatalogVersion::replay_to(&records_before, 16)
        .unwrap()
        .version;
    assert!(in_effect >= 1);

    let second = run_train(&cfg, &[], &[]);
    assert_ok(&second);
    let log = String::from_utf8_lossy(&second.stderr);
    assert_eq!(resumed_from(&log), 16);
    assert!(
        log.lines().any(|l| l.contains("resuming")
            && l.split_whitespace()
                .any(|w| w == format!("catalog_version={in_effect}"))),
        "{log}"
    );
    assert!(
        !log.contains("catalog changed") && !log.contains("video quarantined"),
        "{log}"
    );
    // Nothing new to record at the resume: the records up to it are the first run's.
    let records: Vec<_> = version_records(&rt, &store)
        .into_iter()
        .filter(|r| r.from_step <= 16)
        .collect();
    assert_eq!(records, records_before);
    assert_eq!(records_of(&out, &broken), 1);
    assert_eq!(
        read_metrics(out.to_str().unwrap(), &Default::default()).len() as u64,
        STEPS
    );
}

/// Videos added while the run was stopped: the resumed run draws from them at once (a new
/// catalog version from its first step, recorded in full), and keeps the stopped run's
/// iterations per epoch, so its length and epochs stay those the checkpoint was trained for.
#[test]
fn videos_added_while_stopped_are_drawn_and_the_run_keeps_its_length() {
    let tmp = tempfile::tempdir().unwrap();
    let (made, names, videos) = partial_corpus(tmp.path(), 8, 4);
    let (cfg, out) = resume_config(tmp.path(), "run", &videos, 3600.0);
    // iterations per epoch from the catalog: 4 videos, batch 4 → 1 (epoch = step).
    let text = std::fs::read_to_string(&cfg).unwrap();
    assert!(
        text.contains("  ipe: 10\n") && text.contains("  epochs: 6\n"),
        "quickstart.yaml layout changed"
    );
    let text = text
        .replace("  ipe: 10\n", "")
        .replace("  epochs: 6\n", "  epochs: 100\n");
    std::fs::write(&cfg, text).unwrap();
    assert_ok(&run_train(&cfg, &[], &["--max-steps", "8"]));
    for n in &names[4..] {
        std::fs::copy(made.join(n), videos.join(n)).unwrap();
    }
    let second = run_train(&cfg, &[], &["--max-steps", "16"]);
    assert_ok(&second);
    let log = String::from_utf8_lossy(&second.stderr);
    assert!(
        log.contains("the datasets changed while the run was stopped")
            && log.contains("keeping the stopped run's iterations per epoch"),
        "{log}"
    );
    let rows = read_metrics(out.to_str().unwrap(), &Default::default());
    assert_eq!(rows.len(), 16);
    assert!(
        rows.iter().all(|r| r.epoch == r.step),
        "{:?}",
        rows.iter().map(|r| (r.step, r.epoch)).collect::<Vec<_>>()
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store =
        vjepa_storage::Store::open(out.to_str().unwrap(), &Default::default(), false).unwrap();
    let records = version_records(&rt, &store);
    let new = records.last().unwrap();
    assert_eq!(
        (new.version, new.from_step, new.videos),
        (1, 8, 8),
        "{new:?}"
    );
    assert!(new.is_full());
    let added: HashSet<&str> = names[4..].iter().map(String::as_str).collect();
    let clips = read_clips(&out);
    assert!(
        clips
            .iter()
            .filter(|c| c.step < 8)
            .all(|c| !added.iter().any(|n| c.uri.ends_with(n)))
    );
    assert!(
        clips
            .iter()
            .any(|c| c.step >= 8 && added.iter().any(|n| c.uri.ends_with(n)))
    );
}
