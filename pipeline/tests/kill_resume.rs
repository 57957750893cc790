//! Crash recovery: `vjepa train` killed with SIGKILL and restarted with the same command
//! continues from its newest complete checkpoint with exactly the losses of an uninterrupted
//! run; a checkpoint cut short is skipped for the one before it.

mod common;

use std::path::Path;
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
