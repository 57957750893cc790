//! The Parquet outputs read in pyarrow, pandas and duckdb without hints, with exactly the
//! columns and types the README documents (issue 7): a short run with a bad file (a quarantine
//! row) and clip records, then a resumed run (the `-from-` files), checked by
//! `tools/check_parquet.py`; and the features table of `vjepa extract`.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::*;

/// The venv's python (made by `ops/parquet-venv.sh`), or `None` to skip: CI sets
/// `VJEPA_REQUIRE_OPS=1`, which makes a missing venv an install rather than a skip.
fn python() -> Option<PathBuf> {
    let root = repo_root();
    let venv = root.join(".tools/parquet-venv/bin/python");
    let required = std::env::var("VJEPA_REQUIRE_OPS").is_ok_and(|v| v == "1");
    if !required && !venv.exists() {
        eprintln!(
            "SKIPPED: no .tools/parquet-venv (run ops/parquet-venv.sh, or set VJEPA_REQUIRE_OPS=1)"
        );
        return None;
    }
    let out = Command::new(root.join("ops/parquet-venv.sh"))
        .output()
        .expect("run ops/parquet-venv.sh");
    assert!(
        out.status.success(),
        "ops/parquet-venv.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(PathBuf::from(
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
    ))
}

/// `tools/check_parquet.py` on the tables in `dir` (`tables` must be there): its report, after
/// asserting it found every table as the README documents it.
fn check_tables(python: &std::path::Path, dir: &std::path::Path, tables: &[&str]) -> String {
    let check = Command::new(python)
        .arg(repo_root().join("tools/check_parquet.py"))
        .arg(repo_root().join("README.md"))
        .arg(dir)
        .args(tables)
        .output()
        .expect("run tools/check_parquet.py");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(check.status.success(), "{report}");
    report
}

#[test]
fn outputs_read_in_pyarrow_pandas_and_duckdb_as_documented() {
    let Some(python) = python() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let videos = tmp.path().join("videos");
    make_corpus(&videos, 2);
    std::fs::write(videos.join("bad-random.mp4"), b"this is not a video at all").unwrap();
    let out = tmp.path().join("out");
    let config = tmp.path().join("c.yaml");
    let text = small_config(
        &format!("{}/", videos.display()),
        &format!("{}/", out.display()),
        6,
    )
    .replace("outputs:\n", "outputs:\n  clips: true\n");
    assert!(
        text.contains("clips: true"),
        "quickstart.yaml layout changed"
    );
    std::fs::write(&config, text).unwrap();
    // Steps 1-4 (a checkpoint at 4), then the same command resumed for steps 5-6.
    assert_ok(&run_train(&config, &[], &["--max-steps", "4"]));
    assert_ok(&run_train(&config, &[], &[]));
    for name in [
        "metrics.parquet",
        "metrics-from-00000004.parquet",
        "quarantine.parquet",
        "clips.parquet",
    ] {
        assert!(out.join(name).exists(), "{name} written");
    }

    // The features table of `vjepa extract`, with tokens.
    let features = out.join("features.parquet");
    assert_ok(
        &Command::new(bin())
            .args(["extract", "--checkpoint"])
            .arg(out.join("checkpoints/step-00000004.safetensors"))
            .arg("--index")
            .arg(format!("{}/", videos.display()))
            .arg("--out")
            .arg(&features)
            .args(["--tokens", "--views", "2"])
            .output()
            .unwrap(),
    );

    let report = check_tables(
        &python,
        &out,
        &["metrics", "quarantine", "clips", "features"],
    );
    assert!(report.contains("metrics: 2 file(s), 6 rows"), "{report}");
    assert!(report.contains("clips: 2 file(s)"), "{report}");
    assert!(report.contains("features: 1 file(s), 4 rows"), "{report}");
    // The bad file may be found once in each run (the resumed run lists the catalog again).
    assert!(report.contains("quarantine: 2 file(s)"), "{report}");

    // The evaluation's tables, from `vjepa probe` (labels: the container).
    let index = tmp.path().join("labelled.csv");
    let mut lines = Vec::new();
    for entry in std::fs::read_dir(&videos).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().to_string();
        if let Some(label) = name
            .strip_suffix(".webm")
            .map(|_| "webm")
            .or_else(|| (name.ends_with(".mp4") && !name.starts_with("bad")).then_some("mp4"))
        {
            lines.push(format!("{} {label}", videos.join(&name).display()));
        }
    }
    lines.sort();
    std::fs::write(&index, lines.join("\n")).unwrap();
    let probe_out = tmp.path().join("probe");
    assert_ok(
        &Command::new(bin())
            .args(["probe", "--checkpoint"])
            .arg(out.join("checkpoints/step-00000004.safetensors"))
            .arg("--train")
            .arg(&index)
            .arg("--val")
            .arg(&index)
            .arg("--out")
            .arg(&probe_out)
            .args(["--epochs", "3", "--val-every", "2", "--augment", "none"])
            .output()
            .unwrap(),
    );
    let report = check_tables(&python, &probe_out, &["predictions", "epochs"]);
    assert!(
        report.contains("predictions: 1 file(s), 2 rows"),
        "{report}"
    );
    assert!(report.contains("epochs: 1 file(s), 3 rows"), "{report}");

    // `vjepa metrics` (JSON Lines) says what pyarrow reads from both metrics files, merged by
    // step with the later file winning.
    let exported = Command::new(bin())
        .arg("metrics")
        .arg(format!("{}/", out.display()))
        .output()
        .unwrap();
    assert_ok(&exported);
    let jsonl = tmp.path().join("metrics.jsonl");
    std::fs::write(&jsonl, &exported.stdout).unwrap();
    let compare = Command::new(&python)
        .arg("-c")
        .arg(
            r#"
import glob, json, math, sys
import pyarrow.parquet as pq
out, jsonl = sys.argv[1:3]
files = sorted(glob.glob(f"{out}/metrics*.parquet"), key=lambda f: (f.count("-from-"), f))
rows = {}
for f in files:
    for r in pq.read_table(f).to_pylist():
        rows[r["step"]] = r
ours = [json.loads(l) for l in open(jsonl)]
assert [r["step"] for r in ours] == sorted(rows), ([r["step"] for r in ours], sorted(rows))
for o in ours:
    p = rows[o["step"]]
    for k, v in o.items():
        if k == "time_unix_us":
            want = int(p["time"].timestamp() * 1e6)
            assert abs(v - want) <= 1, (k, v, want)
        elif k == "params_digest":
            assert v == f"{p[k]:016x}", (k, v, p[k])
        elif isinstance(v, float) or p[k] is None or isinstance(p[k], float):
            assert (v is None and not math.isfinite(p[k])) or v == p[k], (k, v, p[k])
        else:
            assert v == p[k], (k, v, p[k])
    assert set(o) - {"time_unix_us"} == set(p) - {"time"}, (set(o), set(p))
print(len(ours), "rows equal")
"#,
        )
        .arg(&out)
        .arg(&jsonl)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&compare.stdout),
        String::from_utf8_lossy(&compare.stderr)
    );
    assert!(compare.status.success(), "{text}");
    assert!(text.contains("6 rows equal"), "{text}");

    // tools/feature_stats.py (collapse and layout statistics) reads the same tokens: 16 frames
    // in tubelets of 2 make 8 time steps.
    let stats = Command::new(&python)
        .arg(repo_root().join("tools/feature_stats.py"))
        .args(["--time-steps", "8"])
        .arg(&features)
        .output()
        .expect("run tools/feature_stats.py");
    let text = String::from_utf8_lossy(&stats.stdout).to_string();
    assert!(
        stats.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&stats.stderr)
    );
    let row: Vec<f64> = text
        .lines()
        .last()
        .unwrap_or_default()
        .split('|')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .skip(1)
        .map(|c| c.parse().unwrap_or(f64::NAN))
        .collect();
    let [clips, dim, rank, clip, time, position] = row[..] else {
        panic!("one row of 6 numbers expected: {text}");
    };
    assert_eq!((clips, dim), (4.0, 96.0), "{text}");
    assert!((1.0..=dim).contains(&rank), "{text}");
    for share in [clip, time, position] {
        assert!((0.0..=1.0).contains(&share), "{text}");
    }
}
