//! Monitoring, end to end against real tools: a real Prometheus server scrapes a running job
//! and fires the NaN alert for a diverging run; the Grafana dashboard's queries only use
//! metrics a live job exposes; headless Chromium renders the status page with data.
//!
//! Needs `prometheus`, `promtool` and `chromium` (ops/install-monitoring.sh); without them the
//! tests are skipped loudly, unless `VJEPA_REQUIRE_OPS=1` (set by ops/test.sh) makes them fail.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// True when every tool is on PATH; otherwise skips loudly (or fails under VJEPA_REQUIRE_OPS=1).
fn have_tools(tools: &[&str]) -> bool {
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {t}")])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .collect();
    if missing.is_empty() {
        return true;
    }
    if std::env::var("VJEPA_REQUIRE_OPS").as_deref() == Ok("1") {
        panic!("VJEPA_REQUIRE_OPS=1 but {missing:?} not found (run ops/install-monitoring.sh)");
    }
    eprintln!(
        "\n!!! SKIPPED: {missing:?} not installed (ops/install-monitoring.sh); set VJEPA_REQUIRE_OPS=1 to fail instead !!!\n"
    );
    false
}

/// A plain HTTP/1.1 GET; returns (status, body).
fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_string()))
}

fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A `vjepa train` child, killed on drop.
struct Job {
    child: Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Drop for Job {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts a job on a small corpus (with one broken file, so a quarantine shows) serving on
/// a free port; `edit` changes the config text. Returns once `<out>/telemetry.addr` exists.
fn start_job(steps: u64, edit: impl Fn(String) -> String) -> Job {
    let dir = tempfile::tempdir().unwrap();
    let videos = dir.path().join("videos");
    make_corpus(&videos, 4);
    std::fs::write(
        videos.join("broken.mp4"),
        b"not a video at all ".repeat(500),
    )
    .unwrap();
    let out = dir.path().join("out");
    let text = small_config(
        &format!("{}/", videos.display()),
        &format!("{}/", out.display()),
        steps,
    );
    // Long enough to stay up while the test looks.
    let text = edit(text.replace("  epochs: 6\n", "  epochs: 200\n"));
    let cfg = dir.path().join("cfg.yaml");
    std::fs::write(&cfg, text).unwrap();
    let log = std::fs::File::create(dir.path().join("job.log")).unwrap();
    let child = Command::new(bin())
        .args(["train", "--config", cfg.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start vjepa train");
    let addr_file = out.join("telemetry.addr");
    let addr = wait_for("telemetry.addr", Duration::from_secs(30), || {
        std::fs::read_to_string(&addr_file)
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| s.parse::<SocketAddr>().is_ok())
    });
    Job {
        child,
        addr,
        _dir: dir,
    }
}

impl Job {
    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("job.log")).unwrap_or_default()
    }

    /// Waits until the job has trained at least `n` steps and quarantined the broken file
    /// (per its status feed).
    fn wait_steps(&self, n: u64) -> Value {
        wait_for(
            &format!("{n} steps and a quarantine"),
            Duration::from_secs(40),
            || {
                let (code, body) = http_get(&self.addr, "/api/status").ok()?;
                let v: Value = serde_json::from_str(&body).ok()?;
                let quarantined = !v["quarantines"].as_array()?.is_empty();
                (code == 200 && v["step"].as_u64()? >= n && quarantined).then_some(v)
            },
        )
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A real Prometheus server on 127.0.0.1 scraping `target` every second with our alert rules
/// evaluated every second; killed on drop.
struct Prometheus {
    child: Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn alerts_file() -> PathBuf {
    repo_root().join("ops/prometheus/alerts.yml")
}

impl Prometheus {
    fn start(target: &str) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {}\n\
             scrape_configs:\n  - job_name: vjepa\n    static_configs:\n      - targets: ['{target}']\n",
            alerts_file().canonicalize().unwrap().display()
        );
        let cfg = dir.path().join("prometheus.yml");
        std::fs::write(&cfg, config).unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus");
        let p = Prometheus {
            child,
            addr,
            _dir: dir,
        };
        wait_for("prometheus ready", Duration::from_secs(20), || {
            http_get(&p.addr, "/-/ready")
                .ok()
                .filter(|(c, _)| *c == 200)
        });
        p
    }

    /// `GET /api/v1/<path>`, the `data` field of a successful answer.
    fn api(&self, path: &str) -> Option<Value> {
        let (code, body) = http_get(&self.addr, &format!("/api/v1/{path}")).ok()?;
        let v: Value = serde_json::from_str(&body).ok()?;
        (code == 200 && v["status"] == "success").then(|| v["data"].clone())
    }

    /// The instant vector of `query` (empty while the series does not exist).
    fn query(&self, query: &str) -> Vec<Value> {
        self.api(&format!("query?query={}", encode(query)))
            .and_then(|d| d["result"].as_array().cloned())
            .unwrap_or_default()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("prometheus.log")).unwrap_or_default()
    }
}

/// Percent-encodes a query parameter.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn sample_value(v: &Value) -> f64 {
    v["value"][1]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or(f64::NAN)
}

/// Acceptance 1: Prometheus scrapes a running job and its HTTP API returns the loss, clips
/// and data-wait series.
#[test]
fn prometheus_scrapes_loss_clips_and_data_wait() {
    if !have_tools(&["prometheus"]) {
        return;
    }
    let job = start_job(400, |t| t);
    let prom = Prometheus::start(&job.addr);
    let started = Instant::now();
    let series = [
        "vjepa_loss",
        "vjepa_clips_total",
        "vjepa_data_wait_seconds_total",
        "vjepa_data_wait_share",
    ];
    let found = wait_for("series in Prometheus", Duration::from_secs(40), || {
        let got: Vec<Vec<Value>> = series.iter().map(|s| prom.query(s)).collect();
        // Data only counts once a step has been taken (clips > 0).
        (got.iter().all(|r| !r.is_empty()) && sample_value(&got[1][0]) > 0.0).then_some(got)
    });
    let loss = sample_value(&found[0][0]);
    assert!(loss.is_finite() && loss > 0.0, "loss {loss}");
    let wait = sample_value(&found[2][0]);
    assert!(wait >= 0.0, "data wait {wait}");
    assert_eq!(found[1][0]["metric"]["job"], "vjepa");
    // A rate over the scrapes: clips keep coming.
    let rate = wait_for("clips rate", Duration::from_secs(20), || {
        prom.query("rate(vjepa_clips_total[5s])")
            .first()
            .map(sample_value)
            .filter(|r| *r > 0.0)
    });
    let up = prom.query("up");
    assert_eq!(sample_value(&up[0]), 1.0, "target up: {up:?}");
    println!(
        "prometheus saw loss {loss:.4}, clips {}, data wait {wait:.3}s, {rate:.2} clips/s after {:.1}s",
        sample_value(&found[1][0]),
        started.elapsed().as_secs_f64()
    );
    drop(prom);
    drop(job);
}

/// Acceptance 1: the alert rules load in promtool, and the NaN alert fires for a run whose
/// learning rate is so large (1e30) that the loss becomes NaN within its first steps (the job stops, but
/// serves its final metrics for telemetry.linger_secs).
#[test]
fn nan_alert_fires_for_a_diverging_run() {
    if !have_tools(&["prometheus", "promtool"]) {
        return;
    }
    let check = Command::new("promtool")
        .args(["check", "rules"])
        .arg(alerts_file())
        .output()
        .expect("run promtool");
    assert!(
        check.status.success(),
        "promtool check rules failed:\n{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    // The job lingers long enough after its NaN for Prometheus to scrape and evaluate even
    // on a loaded 2-core CI machine.
    let mut job = start_job(400, |t| {
        let t = t
            .replace("  start_lr: 0.0002\n", "  start_lr: 1.0e+30\n")
            .replace("  lr: 0.001\n", "  lr: 1.0e+30\n")
            .replace("  linger_secs: 30", "  linger_secs: 90");
        assert!(t.contains("lr: 1.0e+30") && t.contains("linger_secs: 90"));
        t
    });
    let prom = Prometheus::start(&job.addr);
    // First the job must reach its NaN (decode and the first steps take a while under load);
    // a job that exits before lingering fails here with its log.
    wait_for(
        "non-finite loss in the job log",
        Duration::from_secs(300),
        || {
            if job.log().contains("non-finite loss") {
                return Some(());
            }
            if let Ok(Some(status)) = job.child.try_wait() {
                panic!("job exited ({status}) before lingering:\n{}", job.log());
            }
            None
        },
    );
    let started = Instant::now();
    let mut alert = None;
    while alert.is_none() && started.elapsed() < Duration::from_secs(60) {
        alert = prom.api("alerts").and_then(|data| {
            data["alerts"]
                .as_array()?
                .iter()
                .find(|a| {
                    a["labels"]["alertname"] == "VjepaLossNotFinite" && a["state"] == "firing"
                })
                .cloned()
        });
        std::thread::sleep(Duration::from_millis(200));
    }
    let Some(alert) = alert else {
        panic!(
            "VjepaLossNotFinite did not fire within 60 s of the NaN\nalerts: {:?}\njob log:\n{}\nprometheus log:\n{}",
            prom.api("alerts"),
            job.log(),
            prom.log()
        );
    };
    let nonfinite = prom.query("vjepa_nonfinite_loss_total");
    assert_eq!(sample_value(&nonfinite[0]), 1.0, "{nonfinite:?}");
    // The gauge carries the NaN itself.
    let loss = prom.query("vjepa_loss");
    assert!(sample_value(&loss[0]).is_nan(), "{loss:?}");
    println!("alert: {alert}");
    // No other alert fires for this short run (rules that need minutes stay pending or quiet).
    let firing: Vec<String> = prom.api("alerts").unwrap()["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["state"] == "firing")
        .map(|a| a["labels"]["alertname"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(firing, ["VjepaLossNotFinite"], "{}", prom.log());
}

/// Every `vjepa_*` series name in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(pos) = expr[i..].find("vjepa_") {
        let start = i + pos;
        let boundary =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        if boundary {
            names.push(expr[start..end].to_string());
        }
        i = end;
    }
    names
}

/// The structure Grafana needs to import a dashboard JSON as it is.
fn check_dashboard_schema(d: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    for key in ["title", "uid"] {
        if !d[key].is_string() {
            problems.push(format!("missing string `{key}`"));
        }
    }
    if d["schemaVersion"].as_u64().is_none_or(|v| v < 30) {
        problems.push("schemaVersion missing or older than 30".into());
    }
    let vars = d["templating"]["list"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if !vars.iter().any(|v| {
        v["type"] == "datasource" && v["query"] == "prometheus" && v["name"] == "datasource"
    }) {
        problems.push("no `datasource` template variable of type datasource (prometheus)".into());
    }
    let panels = d["panels"].as_array().cloned().unwrap_or_default();
    if panels.is_empty() {
        problems.push("no panels".into());
    }
    let mut ids = std::collections::HashSet::new();
    for p in &panels {
        let title = p["title"].as_str().unwrap_or("?");
        if !p["id"].as_u64().is_some_and(|id| ids.insert(id)) {
            problems.push(format!("panel {title}: missing or duplicate id"));
        }
        if !p["type"].is_string() {
            problems.push(format!("panel {title}: no type"));
        }
        let g = &p["gridPos"];
        if ["h", "w", "x", "y"].iter().any(|k| g[k].as_u64().is_none())
            || g["x"].as_u64().unwrap_or(0) + g["w"].as_u64().unwrap_or(0) > 24
        {
            problems.push(format!("panel {title}: bad gridPos {g}"));
        }
        if p["datasource"]["uid"] != "${datasource}" {
            problems.push(format!("panel {title}: datasource is not ${{datasource}}"));
        }
        let targets = p["targets"].as_array().cloned().unwrap_or_default();
        if targets.is_empty() {
            problems.push(format!("panel {title}: no targets"));
        }
        for t in &targets {
            if !t["refId"].is_string() || t["expr"].as_str().is_none_or(|e| e.is_empty()) {
                problems.push(format!("panel {title}: target without refId/expr"));
            }
        }
    }
    problems
}

/// Acceptance 2: the dashboard passes the schema check and every metric its queries use
/// exists in a live scrape of a running job.
#[test]
fn dashboard_uses_only_live_metrics() {
    let path = repo_root().join("ops/grafana/vjepa-dashboard.json");
    let d: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).expect("dashboard is JSON");
    let problems = check_dashboard_schema(&d);
    assert!(problems.is_empty(), "dashboard schema: {problems:#?}");
    // The check itself catches a broken dashboard.
    let mut broken = d.clone();
    broken["panels"][0]["gridPos"] = Value::Null;
    broken["templating"]["list"] = Value::Array(vec![]);
    assert_eq!(check_dashboard_schema(&broken).len(), 2);

    let mut used: Vec<String> = Vec::new();
    let mut exprs: Vec<String> = d["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(String::from))
        .collect();
    for v in d["templating"]["list"].as_array().unwrap() {
        if let Some(q) = v["definition"].as_str() {
            exprs.push(q.to_string());
        }
    }
    for e in &exprs {
        used.extend(metric_names(e));
    }
    used.sort();
    used.dedup();
    assert!(used.len() >= 15, "{used:?}");

    let job = start_job(400, |t| t);
    job.wait_steps(3);
    // The broken file is quarantined at the first listing; decode failures have a series.
    let (code, text) = http_get(&job.addr, "/metrics").unwrap();
    assert_eq!(code, 200);
    let live: std::collections::HashSet<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    let missing: Vec<&String> = used.iter().filter(|n| !live.contains(n.as_str())).collect();
    assert!(
        missing.is_empty(),
        "dashboard queries metrics the job does not expose: {missing:?}\n{text}"
    );
    assert!(
        text.ends_with("# EOF\n"),
        "OpenMetrics text ends with # EOF"
    );
    println!(
        "dashboard: {} panels, {} metrics, all live",
        d["panels"].as_array().unwrap().len(),
        used.len()
    );
}

/// Acceptance 3: headless Chromium opens the status page of a running job; after a few steps
/// its charts have data points; a screenshot is kept under `<target>/test-artifacts/`.
#[test]
fn status_page_renders_live_charts() {
    if !have_tools(&["chromium"]) {
        return;
    }
    let job = start_job(400, |t| t);
    let status = job.wait_steps(4);
    assert!(
        status["quarantines"].as_array().is_some_and(|q| q
            .iter()
            .any(|r| r["uri"].as_str().is_some_and(|u| u.ends_with("broken.mp4")))),
        "{status}"
    );
    let profile = tempfile::tempdir().unwrap();
    let url = format!("http://{}/", job.addr);
    let chromium = |extra: &[&str]| {
        let out = Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                "--virtual-time-budget=4000",
                "--window-size=1280,1100",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .args(extra)
            .arg(&url)
            .output()
            .expect("run chromium");
        assert!(
            out.status.success(),
            "chromium failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    };
    let dom = String::from_utf8_lossy(&chromium(&["--dump-dom"]).stdout).to_string();
    for (chart, series) in [
        ("chart-loss", "loss"),
        ("chart-throughput", "clips_per_s"),
        ("chart-wait", "data_wait_share"),
        ("chart-queues", "fetch"),
    ] {
        let points = series_points(&dom, chart, series)
            .unwrap_or_else(|| panic!("no {series} path in #{chart}:\n{dom}"));
        assert!(points >= 4, "#{chart} {series}: {points} points\n{dom}");
    }
    assert!(
        dom.contains("broken.mp4"),
        "quarantine table shows the broken file"
    );
    assert!(dom.contains("vit_tiny"), "config summary shows the model");
    assert!(dom.contains("data-state=\"running\""), "state badge");

    let artifacts = bin()
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join("test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let shot = artifacts.join("status-page.png");
    let _ = std::fs::remove_file(&shot);
    chromium(&[&format!("--screenshot={}", shot.display())]);
    let png = std::fs::read(&shot).expect("screenshot written");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
    println!("screenshot: {} ({} bytes)", shot.display(), png.len());
}

/// `data-points` of the path of `series` inside the SVG with id `chart`.
fn series_points(dom: &str, chart: &str, series: &str) -> Option<usize> {
    let svg_start = dom.find(&format!("id=\"{chart}\""))?;
    let svg = &dom[svg_start..];
    let svg = &svg[..svg.find("</svg>")?];
    let path_start = svg.find(&format!("data-series=\"{series}\""))?;
    let path = &svg[path_start..];
    let path = &path[..path.find('>')?];
    let attr = path.split("data-points=\"").nth(1)?;
    attr.split('"').next()?.parse().ok()
}

/// A port that is taken is a clear error before any training (nothing is written).
#[test]
fn taken_port_fails_before_training() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let videos = dir.path().join("videos");
    make_corpus(&videos, 1);
    let out = dir.path().join("out");
    let cfg = write_config(&dir.path().join("cfg.yaml"), &videos, &out, 3);
    let run = run_train(&cfg, &[], &["--listen", &format!("127.0.0.1:{port}")]);
    assert_eq!(run.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        stderr.contains(&format!(
            "telemetry.listen: cannot listen on 127.0.0.1:{port}"
        )),
        "{stderr}"
    );
    assert!(!stderr.contains("starting training"), "{stderr}");
    assert!(!out.join("metrics.parquet").exists());
    assert!(!out.join("telemetry.addr").exists());
    drop(taken);
}
