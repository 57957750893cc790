//! Config refusal at the binary's edge: exit 2 naming the key; official presets accepted.

mod common;

use std::process::Command;

use common::*;

fn check(text: &str) -> std::process::Output {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("c.yaml");
    std::fs::write(&p, text).unwrap();
    Command::new(bin())
        .args(["check-config", "--config", p.to_str().unwrap()])
        .output()
        .unwrap()
}

fn official(name: &str) -> String {
    std::fs::read_to_string(repo_root().join("configs").join(name)).unwrap()
}

#[test]
fn official_presets_pass_with_only_data_paths_changed() {
    for name in ["vitl16.yaml", "vith16.yaml", "vith16_384.yaml"] {
        let text = official(name)
            .replace(
                "/your_path_to_kinetics710_csv_file_index.csv",
                "/data/k710.csv",
            )
            .replace("/your_path_to_ssv2_csv_file_index.csv", "/data/ssv2.csv")
            .replace(
                "/your_path_to_howto100m_csv_file_index.csv",
                "/data/ht100m.csv",
            );
        let out = check(&text);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{name}: {stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("ignored: nodes"), "{stdout}");
    }
    assert_eq!(
        check(&official("../configs/quickstart.yaml")).status.code(),
        Some(0)
    );
}

#[test]
fn misspelt_key_exits_2_naming_it() {
    let out = check(&official("vitl16.yaml").replace("  crop_size: 224", "  crop_sise: 224"));
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("data.crop_sise"), "{err}");
}

#[test]
fn string_for_number_exits_2_naming_it() {
    let out = check(&official("vitl16.yaml").replace("  batch_size: 24", "  batch_size: twenty"));
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("data.batch_size"), "{err}");
}

#[test]
fn train_refuses_a_bad_config_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let p = tmp.path().join("c.yaml");
    let text = small_config("/nonexistent/videos/", &format!("{}/", out.display()), 5)
        .replace("  lr: 0.001", "  lr: fast");
    std::fs::write(&p, text).unwrap();
    let run = run_train(&p, &[], &[]);
    assert_eq!(run.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&run.stderr).contains("optimization.lr"));
    assert!(
        !out.exists(),
        "no output may be written for a refused config"
    );
}

#[test]
fn cluster_flags_are_checked_naming_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("c.yaml");
    std::fs::write(&p, official("../configs/quickstart.yaml")).unwrap();
    let run = |args: &[&str]| {
        Command::new(bin())
            .args(["check-config", "--config", p.to_str().unwrap()])
            .args(args)
            .output()
            .unwrap()
    };
    let hosts = tmp.path().join("hosts");
    std::fs::write(&hosts, "127.0.0.1:7400\n127.0.0.1:7401\n").unwrap();
    let h = hosts.to_str().unwrap();
    let ok = run(&["--processes", "2", "--process", "1", "--hostfile", h]);
    assert_eq!(ok.status.code(), Some(0), "{ok:?}");
    for (args, key) in [
        (
            vec!["--processes", "2", "--process", "2", "--hostfile", h],
            "cluster.process",
        ),
        (vec!["--processes", "2"], "cluster.hostfile"),
        (
            vec!["--processes", "3", "--hostfile", h],
            "cluster.hostfile",
        ),
        (vec!["--processes", "0"], "cluster.processes"),
    ] {
        let out = run(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(key), "{args:?}: {err}");
    }
    std::fs::write(&hosts, "127.0.0.1:7400\nnot-an-address\n").unwrap();
    let out = run(&["--processes", "2", "--hostfile", h]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("line 2"));
}

/// `train`'s flags are checked as the keys they set, before any work; other commands' bad
/// numbers are refused by the argument parser (exit 2), not trained or extracted on.
#[test]
fn bad_flags_exit_2_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let cfg = write_config(&tmp.path().join("c.yaml"), tmp.path(), &out, 3);
    for (flags, key, flag) in [
        (
            &["--max-steps", "0"][..],
            "optimization.max_steps",
            "--max-steps",
        ),
        (&["--workers", "0"][..], "workers.count", "--workers"),
        (
            &["--listen", "localhost:1"][..],
            "telemetry.listen",
            "--listen",
        ),
        (&["--out", ""][..], "outputs.dir", "--out"),
    ] {
        let run = run_train(&cfg, &[], flags);
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert_eq!(run.status.code(), Some(2), "{flags:?}: {stderr}");
        assert!(
            stderr.contains(&format!("`{key}`")) && stderr.contains(flag),
            "{flags:?}: {stderr}"
        );
        assert!(!out.exists(), "{flags:?}: nothing written");
    }
    let vjepa = |args: &[&str]| Command::new(bin()).args(args).output().unwrap();
    let probe = |extra: &[&str]| {
        let mut args = vec![
            "probe",
            "--checkpoint",
            "c.safetensors",
            "--train",
            "t.csv",
            "--val",
            "v.csv",
            "--out",
            "o",
        ];
        args.extend_from_slice(extra);
        vjepa(&args)
    };
    for (extra, flag) in [
        (&["--lr", "-1"][..], "--lr"),
        (&["--lr", "nan"][..], "--lr"),
        (&["--lr", "0"][..], "--lr"),
        (&["--weight-decay", "-5"][..], "--weight-decay"),
        (&["--label-fraction", "1.5"][..], "--label-fraction"),
        (&["--epochs", "0"][..], "--epochs"),
    ] {
        let run = probe(extra);
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert_eq!(run.status.code(), Some(2), "{extra:?}: {stderr}");
        assert!(stderr.contains(flag), "{extra:?}: {stderr}");
    }
    let run = vjepa(&[
        "extract",
        "--checkpoint",
        "c.safetensors",
        "--index",
        "i.csv",
        "--out",
        "f.parquet",
        "--size",
        "0",
    ]);
    assert_eq!(run.status.code(), Some(2), "{run:?}");
    let init = tmp.path().join("init.pth.tar");
    let run = vjepa(&[
        "init",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        init.to_str().unwrap(),
    ]);
    assert_eq!(run.status.code(), Some(2), "{run:?}");
    assert!(String::from_utf8_lossy(&run.stderr).contains(".safetensors"));
    assert!(!init.exists());
}

/// A credential pasted into the S3 endpoint is refused by name, and never shown.
#[test]
fn an_endpoint_carrying_credentials_is_refused_without_showing_them() {
    for endpoint in [
        "http://AKIDPROBE:SECRETPROBE123@127.0.0.1:9000",
        "https://minio.internal/?X-Amz-Credential=SECRETPROBE123",
    ] {
        let text = official("../configs/quickstart.yaml").replace(
            "    endpoint: null",
            &format!("    endpoint: \"{endpoint}\""),
        );
        assert!(text.contains(endpoint), "quickstart.yaml layout changed");
        let out = check(&text);
        assert_eq!(out.status.code(), Some(2), "{endpoint}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("storage.s3.endpoint"), "{err}");
        assert!(!err.contains("SECRETPROBE123"), "{err}");
    }
}

/// An official evaluation config given where a pretraining config goes is named as such,
/// with where its settings go, instead of a refusal of its first unknown key.
#[test]
fn an_official_evaluation_config_is_recognised() {
    let text = "nodes: 8\ntag: k400-16x8x3\neval_name: video_classification_frozen\n\
                data:\n  dataset_train: /data/k400_train.csv\n  num_segments: 8\n";
    let out = check(text);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("official evaluation config") && err.contains("vjepa probe"),
        "{err}"
    );
}
