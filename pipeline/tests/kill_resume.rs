//! Crash recovery: `vjepa train` killed with SIGKILL and restarted with the same command
//! continues from its newest complete checkpoint with exactly the losses of an uninterrupted
//! run; a checkpoint cut short is skipped for the one before it.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
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

/// The one `metrics-from-N.parquet` of a resumed run, with N.
fn resumed_metrics(out: &Path) -> (u64, Vec<MetricsRow>) {
    let mut found: Vec<(u64, String)> = std::fs::read_dir(out)
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().into_string().ok()?;
            let n = name
                .strip_prefix("metrics-from-")?
                .strip_suffix(".parquet")?
                .parse()
                .ok()?;
            Some((n, name))
        })
        .collect();
    assert_eq!(found.len(), 1, "one resumed run expected: {found:?}");
    let (from, name) = found.remove(0);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = vjepa_storage::Store::open(out.to_str().unwrap(), &Default::default(), false)
        .expect("output dir");
    let rows = rt
        .block_on(vjepa_storage::tables::read_metrics(&store, &name))
        .expect("resumed metrics readable");
    (from, rows)
}

#[test]
fn killed_run_restarted_with_the_same_command_continues_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let videos = tmp.path().join("videos");
    make_corpus(&videos, 4);
    let full = reference(&videos, tmp.path());

    let out = tmp.path().join("killed");
    let cfg = write_config(&tmp.path().join("killed.yaml"), &videos, &out, STEPS);
    let mut child = Command::new(bin())
        .args(["train", "--config", cfg.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start vjepa train");
    // Kill as soon as the second checkpoint is in place (the rename makes it appear whole).
    let second = out.join("checkpoints/step-00000008.safetensors");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !second.exists() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before its second checkpoint"
        );
        assert!(Instant::now() < deadline, "no checkpoint after 60 s");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().expect("SIGKILL");
    child.wait().unwrap();
    let last = out.join(format!("checkpoints/step-{STEPS:08}.safetensors"));
    assert!(!last.exists(), "killed too late: the run had finished");

    // The same command again: no flag, no config change.
    assert_ok(&run_train(&cfg, &[], &[]));
    let (from, rows) = resumed_metrics(&out);
    assert!(
        (8..STEPS).contains(&from) && from % 4 == 0,
        "resumed from step {from}"
    );
    assert_same_trace(&full[from as usize..], rows.iter());

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
    let (from, rows) = resumed_metrics(&out);
    assert_eq!(from, 8);
    assert_same_trace(&full[8..], rows.iter());
}
