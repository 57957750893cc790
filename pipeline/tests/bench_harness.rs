//! The GPU session's issue-10 scripts keep working where no GPU is: `bench/loss-trend.sh` and
//! `bench/gpu-pipeline.sh` with `DEVICE=cpu`, on this build's `vjepa` (they make their videos
//! with `vjepa make-samples` and read the runs with `vjepa metrics` and plain python3), tiny
//! settings. A GPU session gets one try at them: a script broken by a CLI or table change must
//! show here first.

mod common;

use std::process::Command;

use common::*;

/// Runs a bench script from the repository root with `envs`; returns its stdout, failing the
/// test with both streams when it fails. `OUT` is a fresh folder under `target/` (the scripts
/// take it relative to the root).
fn run_script(script: &str, name: &str, envs: &[(&str, &str)]) -> String {
    let root = repo_root();
    let out = format!("target/bench-harness/{name}-{}", std::process::id());
    let _ = std::fs::remove_dir_all(root.join(&out));
    let result = Command::new(root.join(script))
        .current_dir(&root)
        .env("DEVICE", "cpu")
        .env("VJEPA", bin())
        .env("OUT", &out)
        .envs(envs.iter().copied())
        .output()
        .expect("run the script");
    let stdout = String::from_utf8_lossy(&result.stdout).to_string();
    assert!(
        result.status.success(),
        "{script} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&result.stderr)
    );
    let _ = std::fs::remove_dir_all(root.join(&out));
    stdout
}

#[test]
fn loss_trend_on_the_cpu_gives_two_identical_curves() {
    let text = run_script("bench/loss-trend.sh", "loss-trend", &[("STEPS", "4")]);
    assert!(text.contains("4 steps, CPU f32 vs cpu (f32)"), "{text}");
    // The CPU run is deterministic: the second curve is the first.
    assert!(
        text.contains(
            "cpu f32: largest gap between the 4-step running means: 0.00 % ; non-finite losses: 0"
        ),
        "{text}"
    );
    let row = text
        .lines()
        .find(|l| l.starts_with("| step-1 loss"))
        .unwrap_or_else(|| panic!("no step-1 row: {text}"));
    let cells: Vec<&str> = row.split('|').map(str::trim).collect();
    assert_eq!(cells[2], cells[3], "{row}");
    assert!(cells[2].parse::<f64>().is_ok_and(|l| l > 0.0), "{row}");
}

#[test]
fn gpu_pipeline_on_the_cpu_reports_each_resolution() {
    let text = run_script(
        "bench/gpu-pipeline.sh",
        "gpu-pipeline",
        &[
            ("RESOLUTIONS", "320x240 640x360"),
            ("VIDEOS", "2"),
            ("DURATION", "2"),
            ("STEPS", "4"),
            ("SKIP", "1"),
            ("THREADS", "2"),
        ],
    );
    for res in ["320x240", "640x360"] {
        let row = text
            .lines()
            .find(|l| l.starts_with(&format!("| {res} H.264 | 3 |")))
            .unwrap_or_else(|| panic!("no 3-step row for {res}: {text}"));
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let clips_per_s: f64 = cells[3].parse().expect("clips/s");
        assert!(clips_per_s > 0.0, "{row}");
        assert!(cells[5].ends_with('%'), "{row}");
    }
}
