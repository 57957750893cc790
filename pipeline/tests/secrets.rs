//! Credentials never leak (issue 7, acceptance 5): a run reading its datasets from S3 (a real,
//! signature-checking `s3s-fs`), with debug logs in JSON, a missing object and a corrupt video
//! (so error paths with store messages run), scraped on `/metrics`, `/api/status` and `/` while
//! it trains; then the same run with a wrong secret (refused). The secret key appears in none of
//! the logs, pages, metrics, Parquet tables, checkpoints or catalog records.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use vjepa_storage::testing::S3Server;

fn http_get(addr: &str, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    Some(String::from_utf8_lossy(&raw).to_string())
}

/// Every file under `dir`, as bytes (lossy text search is enough: the secret is ASCII).
fn all_files(dir: &Path, out: &mut Vec<(String, Vec<u8>)>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            all_files(&p, out);
        } else {
            out.push((p.display().to_string(), std::fs::read(&p).unwrap()));
        }
    }
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[test]
fn the_secret_key_appears_in_no_log_metric_page_or_output() {
    let Some(server) =
        S3Server::start_or_skip("the_secret_key_appears_in_no_log_metric_page_or_output").unwrap()
    else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let videos = tmp.path().join("videos");
    make_corpus(&videos, 3);
    let dst = videos_into_bucket(&server, "corpus", &videos);
    let bucket = server.root.join("corpus");
    std::fs::write(dst.join("corrupt.mp4"), b"not a video ".repeat(200)).unwrap();
    // An index naming a video and an object that does not exist (a fetch error).
    std::fs::write(
        bucket.join("index.csv"),
        "videos/corrupt.mp4 1\nvideos/missing.mp4 2\n",
    )
    .unwrap();

    let out = tmp.path().join("out");
    let config = tmp.path().join("s3.yaml");
    let text = s3_small_config(
        &server,
        "s3://corpus/videos/",
        &format!("{}/", out.display()),
        10,
    )
    .replace(
        "    - s3://corpus/videos/ ",
        "    - s3://corpus/index.csv\n    - s3://corpus/videos/ ",
    );
    assert!(
        text.contains("s3://corpus/index.csv"),
        "config layout changed"
    );
    std::fs::write(&config, text).unwrap();

    let secret = server.secret_key.clone();
    // Logs go to a file: a pipe nobody reads while the job runs would stall it.
    let run = |secret_key: &str, dir: &Path| {
        let log = std::fs::File::create(dir.with_extension("log")).unwrap();
        Command::new(bin())
            .args(["--log-format", "json", "train", "--config"])
            .arg(&config)
            .arg("--out")
            .arg(dir)
            .env("RUST_LOG", "debug")
            .env("AWS_ACCESS_KEY_ID", &server.access_key)
            .env("AWS_SECRET_ACCESS_KEY", secret_key)
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap()
    };

    // The good run, scraped while it trains.
    let mut child = run(&secret, &out);
    let mut pages = Vec::new();
    let started = Instant::now();
    let addr_file = out.join("telemetry.addr");
    while child.try_wait().unwrap().is_none() && started.elapsed() < Duration::from_secs(120) {
        if let Ok(addr) = std::fs::read_to_string(&addr_file) {
            for path in ["/metrics", "/api/status", "/"] {
                if let Some(body) = http_get(addr.trim(), path) {
                    pages.push((path, body));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let status = child.wait().unwrap();
    eprintln!("good run: {:.1} s", started.elapsed().as_secs_f64());
    let logs = std::fs::read_to_string(out.with_extension("log")).unwrap();
    assert!(status.success(), "{logs}");
    assert!(logs.contains("\"level\":\"DEBUG\""), "debug JSON logs");
    assert!(logs.contains("fetch_error"), "the missing object was met");
    let metrics = pages
        .iter()
        .find(|(p, b)| *p == "/metrics" && b.contains("vjepa_loss"))
        .map(|(_, b)| b.clone());
    assert!(metrics.is_some(), "no scrape of /metrics with the loss");
    assert!(
        pages
            .iter()
            .any(|(p, b)| *p == "/api/status" && b.contains("quarantine")),
        "no status with quarantines"
    );
    assert!(!logs.contains(&secret), "the secret key is in the logs");
    for (path, body) in &pages {
        assert!(
            !body.contains(&secret),
            "the secret key is served on {path}"
        );
    }
    let mut files = Vec::new();
    all_files(&out, &mut files);
    assert!(files.iter().any(|(p, _)| p.ends_with("quarantine.parquet")));
    assert!(files.iter().any(|(p, _)| p.ends_with(".safetensors")));
    for (path, bytes) in &files {
        assert!(!contains(bytes, &secret), "the secret key is in {path}");
    }

    // A wrong secret: refused, and neither key is printed.
    let wrong = "sk-wrong-0123456789abcdef0123456789abcdef";
    let started = Instant::now();
    let wrong_out = tmp.path().join("out-wrong");
    let refused = run(wrong, &wrong_out).wait().unwrap();
    let text = std::fs::read_to_string(wrong_out.with_extension("log")).unwrap();
    eprintln!("refused run: {:.1} s", started.elapsed().as_secs_f64());
    assert!(!refused.success(), "{text}");
    assert!(!text.contains(wrong), "the wrong secret is printed: {text}");
    assert!(!text.contains(&secret), "{text}");
}
