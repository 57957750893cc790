//! The job's telemetry: Prometheus metrics (`/metrics`, the Prometheus org's client and its
//! OpenMetrics text encoder), a JSON feed of recent steps (`/api/status`) and the live status
//! page (`/`, HTML/JS/CSS compiled into the binary), served by a small HTTP/1 server on the
//! job's tokio runtime.
//!
//! The job updates plain atomics (cheap enough for every clip and step); the server only reads.
//! Metric names and meanings are listed in the README ("Monitoring"); keep them in step with
//! `ops/prometheus/alerts.yml` and `ops/grafana/vjepa-dashboard.json`.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use serde::Serialize;
use std::sync::atomic::AtomicU64;

/// The stages of the dataflow, in the order the data moves (the `stage` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Dataset listings (items: videos listed; queue: listings not yet applied).
    List,
    /// Opening videos in their store (items: videos opened; queue: clip requests waiting for
    /// a loader thread).
    Fetch,
    /// Decoding the sampled window (items: clips decoded; queue: clips being decoded now).
    Decode,
    /// Crop/resize/flip/normalise, fused into the decode pass (items: clips transformed;
    /// queue: clips done and waiting for the rest of their batch).
    Transform,
    /// Multi-block masks (items: batches masked; queue: batches waiting for masks).
    Mask,
    /// Optimiser steps (items: steps; queue: masked batches waiting for the trainer).
    Train,
    /// Metrics rows to Parquet (items: rows; queue: rows buffered until the next flush).
    Sink,
}

impl Stage {
    /// Every stage, in dataflow order.
    pub const ALL: [Stage; 7] = [
        Stage::List,
        Stage::Fetch,
        Stage::Decode,
        Stage::Transform,
        Stage::Mask,
        Stage::Train,
        Stage::Sink,
    ];

    /// The `stage` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::List => "list",
            Stage::Fetch => "fetch",
            Stage::Decode => "decode",
            Stage::Transform => "transform",
            Stage::Mask => "mask",
            Stage::Train => "train",
            Stage::Sink => "sink",
        }
    }
}

type Labels = Vec<(&'static str, String)>;
type FloatGauge = Gauge<f64, AtomicU64>;

/// Steps over which clips/s, tokens/s and the data-wait share are averaged.
const WINDOW: usize = 10;
/// Steps kept for the status page's charts.
const RECENT_STEPS: usize = 600;
/// Quarantine records kept for the status page.
const RECENT_QUARANTINES: usize = 50;

/// Everything one optimiser step reports.
#[derive(Clone, Debug, Default)]
pub struct StepSample {
    /// 1-based step just taken.
    pub step: u64,
    pub loss: f64,
    pub loss_per_mask: Vec<f64>,
    pub lr: f64,
    pub weight_decay: f64,
    pub ema_momentum: f64,
    pub encoder_grad_norm: f64,
    pub predictor_grad_norm: f64,
    /// Collapse signal: std of the target features across the batch, mean over dims.
    pub target_std: f64,
    /// Dimensional-collapse signal: effective rank of the target token features.
    pub target_rank: f64,
    /// Clips in the batch.
    pub clips: usize,
    /// Tokens the encoder embedded (clips × patches per clip).
    pub tokens: u64,
    /// Compute time of the step.
    pub step_s: f64,
    /// Time the step waited for its batch.
    pub data_wait_s: f64,
}

/// One point of the status page's charts.
#[derive(Clone, Debug, Serialize)]
struct StepPoint {
    step: u64,
    time_unix_ms: i64,
    loss: f64,
    target_std: f64,
    target_rank: f64,
    clips_per_s: f64,
    tokens_per_s: f64,
    data_wait_share: f64,
    step_s: f64,
    /// Queue depth per stage, in [`Stage::ALL`] order.
    queues: Vec<i64>,
}

#[derive(Clone, Debug, Serialize)]
struct QuarantinePoint {
    uri: String,
    reason: String,
    time_unix_ms: i64,
}

/// The run's state as the status page shows it.
#[derive(Default)]
struct Recent {
    steps: VecDeque<StepPoint>,
    quarantines: VecDeque<QuarantinePoint>,
    /// (clips, tokens, compute s, wait s) of the last [`WINDOW`] steps.
    window: VecDeque<(usize, u64, f64, f64)>,
    state: &'static str,
    error: Option<String>,
    total_steps: u64,
}

/// The job's metrics and recent history; shared by the workers, loaders and the server.
pub struct Telemetry {
    registry: Registry,
    loss: FloatGauge,
    loss_per_mask: Family<Labels, FloatGauge>,
    lr: FloatGauge,
    weight_decay: FloatGauge,
    ema_momentum: FloatGauge,
    grad_norm: Family<Labels, FloatGauge>,
    target_std: FloatGauge,
    target_rank: FloatGauge,
    steps: Counter,
    clips: Counter,
    tokens: Counter,
    nonfinite: Counter,
    nonfinite_seen: std::sync::atomic::AtomicBool,
    /// Mask configs the steps reported (the `loss_per_mask` series).
    masks: std::sync::atomic::AtomicUsize,
    clips_per_second: FloatGauge,
    tokens_per_second: FloatGauge,
    step_seconds: Histogram,
    data_wait_seconds: Counter<f64, AtomicU64>,
    data_wait_share: FloatGauge,
    last_step_time: FloatGauge,
    stage_items: Family<Labels, Counter>,
    stage_queue: Family<Labels, Gauge>,
    /// Handles of `stage_items` / `stage_queue` per stage, in [`Stage::ALL`] order.
    stage_item: Vec<Counter>,
    queues: Vec<Gauge>,
    decode_failures: Family<Labels, Counter>,
    store_unavailable: Counter,
    store_changed: Counter,
    store_bytes: Counter,
    store_request_seconds: Histogram,
    resident_memory: Gauge,
    catalog_videos: Family<Labels, Gauge>,
    recent: Mutex<Recent>,
    config: Mutex<serde_json::Value>,
}

impl Default for Telemetry {
    fn default() -> Self {
        Self::new()
    }
}

impl Telemetry {
    /// Registers every metric (all exist from the start, so dashboards and alerts see them
    /// before the first step).
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("vjepa");
        let t = Telemetry {
            registry: Registry::default(),
            loss: FloatGauge::default(),
            loss_per_mask: Family::default(),
            lr: FloatGauge::default(),
            weight_decay: FloatGauge::default(),
            ema_momentum: FloatGauge::default(),
            grad_norm: Family::default(),
            target_std: FloatGauge::default(),
            target_rank: FloatGauge::default(),
            steps: Counter::default(),
            clips: Counter::default(),
            tokens: Counter::default(),
            nonfinite: Counter::default(),
            nonfinite_seen: Default::default(),
            masks: Default::default(),
            clips_per_second: FloatGauge::default(),
            tokens_per_second: FloatGauge::default(),
            step_seconds: Histogram::new(exponential_buckets(0.01, 2.0, 14)),
            data_wait_seconds: Counter::default(),
            data_wait_share: FloatGauge::default(),
            last_step_time: FloatGauge::default(),
            stage_items: Family::default(),
            stage_queue: Family::default(),
            stage_item: Vec::new(),
            queues: Vec::new(),
            decode_failures: Family::default(),
            store_unavailable: Counter::default(),
            store_changed: Counter::default(),
            store_bytes: Counter::default(),
            store_request_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            resident_memory: Gauge::default(),
            catalog_videos: Family::default(),
            recent: Mutex::new(Recent {
                state: "starting",
                ..Recent::default()
            }),
            config: Mutex::new(serde_json::Value::Null),
        };
        r.register("loss", "Training loss of the last step (mean over mask configs; NaN/Inf when the step diverged)", t.loss.clone());
        r.register(
            "loss_per_mask",
            "Loss of the last step per mask config",
            t.loss_per_mask.clone(),
        );
        r.register("lr", "Learning rate of the last step", t.lr.clone());
        r.register(
            "weight_decay",
            "Weight decay of the last step",
            t.weight_decay.clone(),
        );
        r.register(
            "ema_momentum",
            "EMA momentum of the target encoder at the last step",
            t.ema_momentum.clone(),
        );
        r.register(
            "grad_norm",
            "Pre-clipping gradient norm of the last step per module (encoder, predictor)",
            t.grad_norm.clone(),
        );
        r.register("target_std", "Collapse signal: std of the target encoder's features across the batch, mean over tokens and dims (near 0: collapse)", t.target_std.clone());
        r.register("target_rank", "Dimensional-collapse signal: effective rank (participation ratio) of the target encoder's normalised token features in the last batch, between 1 and the width (near 1: collapse to one direction)", t.target_rank.clone());
        r.register(
            "steps",
            "Optimiser steps taken by this process",
            t.steps.clone(),
        );
        r.register("clips", "Clips trained on", t.clips.clone());
        r.register(
            "tokens",
            "Tokens embedded by the encoder (clips x patches per clip)",
            t.tokens.clone(),
        );
        r.register(
            "nonfinite_loss",
            "Steps whose loss was NaN or Inf (the job stops at the first)",
            t.nonfinite.clone(),
        );
        r.register(
            "clips_per_second",
            "Clips per second over the last 10 steps (compute and data wait)",
            t.clips_per_second.clone(),
        );
        r.register(
            "tokens_per_second",
            "Tokens per second over the last 10 steps",
            t.tokens_per_second.clone(),
        );
        r.register_with_unit(
            "step",
            "Compute time of a step (data wait excluded)",
            Unit::Seconds,
            t.step_seconds.clone(),
        );
        r.register_with_unit(
            "data_wait",
            "Time steps waited for their batch",
            Unit::Seconds,
            t.data_wait_seconds.clone(),
        );
        r.register(
            "data_wait_share",
            "Share of wall time the last 10 steps waited for data (0..1; above 0.2: input-bound)",
            t.data_wait_share.clone(),
        );
        r.register(
            "last_step_timestamp_seconds",
            "Unix time of the last step",
            t.last_step_time.clone(),
        );
        r.register(
            "stage_items",
            "Items through each dataflow stage (see README for the unit of each stage)",
            t.stage_items.clone(),
        );
        r.register(
            "stage_queue_depth",
            "Items waiting in or for each dataflow stage",
            t.stage_queue.clone(),
        );
        r.register(
            "decode_failures",
            "Videos quarantined, by reason",
            t.decode_failures.clone(),
        );
        r.register(
            "store_unavailable",
            "Clip attempts the object store could not serve (timeout, network, server error): \
             not quarantined, another video was tried",
            t.store_unavailable.clone(),
        );
        r.register(
            "store_changed",
            "Clip attempts that found their video replaced while reading it: not quarantined, \
             another video was tried (the new version is drawn like any video)",
            t.store_changed.clone(),
        );
        r.register_with_unit(
            "store_read",
            "Object-store bytes read for clips",
            Unit::Bytes,
            t.store_bytes.clone(),
        );
        r.register_with_unit(
            "store_request",
            "Latency of object-store requests for clips (HEAD and ranged GET)",
            Unit::Seconds,
            t.store_request_seconds.clone(),
        );
        r.register_with_unit(
            "resident_memory",
            "Resident memory of the process (VmRSS)",
            Unit::Bytes,
            t.resident_memory.clone(),
        );
        r.register(
            "catalog_videos",
            "Videos in the current catalog version, per dataset",
            t.catalog_videos.clone(),
        );
        // Every reason from the start, at 0: `rate()` and alerts see the series before the
        // first quarantine.
        for reason in quarantine_reasons() {
            let _ = t
                .decode_failures
                .get_or_create(&vec![("reason", reason.to_string())]);
        }
        let stage_item = Stage::ALL
            .iter()
            .map(|&s| t.stage_items.get_or_create(&stage(s)).clone())
            .collect();
        let queues = Stage::ALL
            .iter()
            .map(|&s| t.stage_queue.get_or_create(&stage(s)).clone())
            .collect();
        for module in ["encoder", "predictor"] {
            let _ = t
                .grad_norm
                .get_or_create(&vec![("module", module.to_string())]);
        }
        Telemetry {
            registry: r,
            stage_item,
            queues,
            ..t
        }
    }

    /// Records the run's config summary for the status page and sets the run length.
    pub fn set_config(&self, summary: serde_json::Value, total_steps: u64) {
        if let Ok(mut c) = self.config.lock() {
            *c = summary;
        }
        if let Ok(mut r) = self.recent.lock() {
            r.total_steps = total_steps;
            r.state = "running";
        }
    }

    /// True once [`Self::set_config`] was called (the run got as far as training).
    pub fn started(&self) -> bool {
        self.recent.lock().is_ok_and(|r| r.state != "starting")
    }

    /// The run ended: `Some(why)` when it failed.
    pub fn finish(&self, error: Option<String>) {
        if let Ok(mut r) = self.recent.lock() {
            r.state = if error.is_some() {
                "failed"
            } else {
                "finished"
            };
            r.error = error;
        }
    }

    /// Videos per dataset in the catalog version in effect.
    pub fn set_catalog(&self, names: &[String], counts: &[usize]) {
        for (name, count) in names.iter().zip(counts) {
            self.catalog_videos
                .get_or_create(&vec![("dataset", dataset_label(name))])
                .set(*count as i64);
        }
    }

    /// `n` items went through `s`.
    pub fn items(&self, s: Stage, n: u64) {
        self.stage_item[s as usize].inc_by(n);
    }

    /// The queue of `s` changed by `delta`.
    pub fn queue_add(&self, s: Stage, delta: i64) {
        self.queues[s as usize].inc_by(delta);
    }

    /// The queue of `s` is `depth` long.
    pub fn queue_set(&self, s: Stage, depth: i64) {
        self.queues[s as usize].set(depth);
    }

    /// An attempt the store could not serve (the video stays in the catalog).
    pub fn store_unavailable(&self) {
        self.store_unavailable.inc();
    }

    /// An attempt that found its video replaced while reading it (the new version stays).
    pub fn store_changed(&self) {
        self.store_changed.inc();
    }

    /// A video was quarantined (once per video).
    pub fn quarantined(&self, uri: &str, reason: &str) {
        self.decode_failures
            .get_or_create(&vec![("reason", reason.to_string())])
            .inc();
        if let Ok(mut r) = self.recent.lock() {
            if r.quarantines.len() == RECENT_QUARANTINES {
                r.quarantines.pop_front();
            }
            r.quarantines.push_back(QuarantinePoint {
                uri: uri.to_string(),
                reason: reason.to_string(),
                time_unix_ms: crate::now_unix_us() / 1000,
            });
        }
    }

    /// One object-store request for clip bytes: its latency and the bytes it returned.
    pub fn store_request(&self, elapsed: Duration, bytes: u64) {
        self.store_request_seconds.observe(elapsed.as_secs_f64());
        self.store_bytes.inc_by(bytes);
    }

    /// A step's loss was NaN/Inf: the gauge shows it and the counter the alert keys on grows.
    pub fn non_finite_loss(&self, loss: f64) {
        self.loss.set(loss);
        // The per-mask losses of the failed step are not known apart: none of the last good
        // step's values may stand beside it.
        let masks = self.masks.load(std::sync::atomic::Ordering::Relaxed);
        for i in 0..masks {
            self.loss_per_mask
                .get_or_create(&vec![("mask", i.to_string())])
                .set(f64::NAN);
        }
        // The run stops at its first non-finite loss: counted once, whichever workers saw it.
        if !self
            .nonfinite_seen
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            self.nonfinite.inc();
        }
    }

    /// Records one optimiser step.
    pub fn record_step(&self, s: &StepSample) {
        self.loss.set(s.loss);
        self.masks
            .fetch_max(s.loss_per_mask.len(), std::sync::atomic::Ordering::Relaxed);
        for (i, l) in s.loss_per_mask.iter().enumerate() {
            self.loss_per_mask
                .get_or_create(&vec![("mask", i.to_string())])
                .set(*l);
        }
        self.lr.set(s.lr);
        self.weight_decay.set(s.weight_decay);
        self.ema_momentum.set(s.ema_momentum);
        self.grad_norm
            .get_or_create(&vec![("module", "encoder".to_string())])
            .set(s.encoder_grad_norm);
        self.grad_norm
            .get_or_create(&vec![("module", "predictor".to_string())])
            .set(s.predictor_grad_norm);
        self.target_std.set(s.target_std);
        self.target_rank.set(s.target_rank);
        self.steps.inc();
        self.clips.inc_by(s.clips as u64);
        self.tokens.inc_by(s.tokens);
        self.step_seconds.observe(s.step_s);
        self.data_wait_seconds.inc_by(s.data_wait_s);
        let now_us = crate::now_unix_us();
        self.last_step_time.set(now_us as f64 / 1e6);
        let queues = self.queues.iter().map(Gauge::get).collect();
        let Ok(mut r) = self.recent.lock() else {
            return;
        };
        if r.window.len() == WINDOW {
            r.window.pop_front();
        }
        r.window
            .push_back((s.clips, s.tokens, s.step_s, s.data_wait_s));
        let (clips, tokens, compute, wait) = r.window.iter().fold(
            (0usize, 0u64, 0.0, 0.0),
            |(c, t, s, w), &(c1, t1, s1, w1)| (c + c1, t + t1, s + s1, w + w1),
        );
        let wall = (compute + wait).max(1e-9);
        let (cps, tps, share) = (clips as f64 / wall, tokens as f64 / wall, wait / wall);
        self.clips_per_second.set(cps);
        self.tokens_per_second.set(tps);
        self.data_wait_share.set(share);
        if r.steps.len() == RECENT_STEPS {
            r.steps.pop_front();
        }
        r.steps.push_back(StepPoint {
            step: s.step,
            time_unix_ms: now_us / 1000,
            loss: s.loss,
            target_std: s.target_std,
            target_rank: s.target_rank,
            clips_per_s: cps,
            tokens_per_s: tps,
            data_wait_share: share,
            step_s: s.step_s,
            queues,
        });
    }

    /// The OpenMetrics text exposition of every metric (resident memory read now).
    pub fn encode_metrics(&self) -> anyhow::Result<String> {
        if let Some(rss) = resident_memory_bytes() {
            self.resident_memory.set(rss as i64);
        }
        let mut text = String::new();
        encode(&mut text, &self.registry).context("encoding metrics")?;
        Ok(text)
    }

    /// The status page's feed: config summary, recent steps, queues and quarantines.
    pub fn status_json(&self) -> serde_json::Value {
        let config = self
            .config
            .lock()
            .map(|c| c.clone())
            .unwrap_or(serde_json::Value::Null);
        let Ok(r) = self.recent.lock() else {
            return serde_json::json!({ "state": "unknown" });
        };
        serde_json::json!({
            "state": r.state,
            "error": r.error,
            "step": r.steps.back().map(|p| p.step),
            "total_steps": r.total_steps,
            "stages": Stage::ALL.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
            "config": config,
            "steps": r.steps,
            "quarantines": r.quarantines,
        })
    }
}

fn stage(s: Stage) -> Labels {
    vec![("stage", s.as_str().to_string())]
}

/// A dataset's name or location as a label: without user info, query or fragment (so no
/// credential or signed URL ends up in a label).
pub fn dataset_label(name: &str) -> String {
    match url::Url::parse(name) {
        Ok(mut u) if u.has_host() || u.scheme() == "file" => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.set_query(None);
            u.set_fragment(None);
            u.to_string()
        }
        _ => {
            let no_query = name.split(['?', '#']).next().unwrap_or(name);
            match no_query.rsplit_once('@') {
                Some((_, rest)) if no_query.contains("://") => {
                    let scheme = no_query.split("://").next().unwrap_or("");
                    format!("{scheme}://{rest}")
                }
                _ => no_query.to_string(),
            }
        }
    }
}

/// VmRSS of this process from `/proc/self/status`, in bytes (None off Linux).
pub fn resident_memory_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

const INDEX_HTML: &str = include_str!("telemetry/index.html");
const APP_JS: &str = include_str!("telemetry/app.js");
const STYLE_CSS: &str = include_str!("telemetry/style.css");

/// Binds `listen` now (so a taken port fails before any training) and serves on `runtime`:
/// `/metrics`, `/api/status`, `/` and its assets. Returns the bound address (port 0: the
/// port the OS chose).
pub fn serve(
    telemetry: Arc<Telemetry>,
    listen: &str,
    runtime: &tokio::runtime::Handle,
) -> anyhow::Result<SocketAddr> {
    let std_listener = std::net::TcpListener::bind(listen)
        .with_context(|| format!("telemetry.listen: cannot listen on {listen}"))?;
    std_listener
        .set_nonblocking(true)
        .context("telemetry listener")?;
    let addr = std_listener.local_addr().context("telemetry listener")?;
    let listener = {
        let _guard = runtime.enter();
        tokio::net::TcpListener::from_std(std_listener).context("telemetry listener")?
    };
    runtime.spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "telemetry: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let t = telemetry.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let t = t.clone();
                    async move { Ok::<_, Infallible>(route(&t, &req)) }
                });
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    tracing::debug!(error = %e, "telemetry: connection ended");
                }
            });
        }
    });
    Ok(addr)
}

fn route(t: &Telemetry, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return respond(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET only\n");
    }
    match req.uri().path() {
        "/metrics" => match t.encode_metrics() {
            Ok(text) => respond(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                text,
            ),
            Err(e) => respond(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                format!("{e:#}\n"),
            ),
        },
        "/api/status" => respond(
            StatusCode::OK,
            "application/json",
            t.status_json().to_string(),
        ),
        "/" | "/index.html" => respond(StatusCode::OK, "text/html; charset=utf-8", INDEX_HTML),
        "/app.js" => respond(StatusCode::OK, "text/javascript; charset=utf-8", APP_JS),
        "/style.css" => respond(StatusCode::OK, "text/css; charset=utf-8", STYLE_CSS),
        _ => respond(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}

fn respond(
    status: StatusCode,
    content_type: &str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
        resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    resp.headers_mut().insert(
        hyper::header::CACHE_CONTROL,
        hyper::header::HeaderValue::from_static("no-store"),
    );
    resp
}

/// The quarantine vocabulary (README, *Outputs*): the decoder's reasons, the loader's, and
/// the index files'.
pub fn quarantine_reasons() -> Vec<&'static str> {
    use vjepa_storage::dataset::{
        REASON_INVALID_PATH, REASON_PATH_ESCAPES_STORE, REASON_UNSUPPORTED_SCHEME,
    };
    let mut reasons: Vec<&'static str> = vjepa_ingest::QuarantineReason::ALL
        .iter()
        .map(|r| r.as_str())
        .collect();
    reasons.extend([
        crate::loader::REASON_FILE_TOO_LARGE,
        REASON_PATH_ESCAPES_STORE,
        REASON_UNSUPPORTED_SCHEME,
        REASON_INVALID_PATH,
    ]);
    reasons.sort_unstable();
    reasons.dedup();
    reasons
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dataset_labels_carry_no_credentials() {
        assert_eq!(
            dataset_label("s3://AKIAXXX:secret@bucket/videos/?X-Amz-Signature=abc"),
            "s3://bucket/videos/"
        );
        assert_eq!(dataset_label("samples/videos/"), "samples/videos/");
        assert_eq!(
            dataset_label("http://user:pw@host:9000/b/p?token=1"),
            "http://host:9000/b/p"
        );
    }

    #[test]
    fn metrics_encode_with_prefix_and_nan() {
        let t = Telemetry::new();
        t.record_step(&StepSample {
            step: 1,
            loss: 0.5,
            loss_per_mask: vec![0.4, 0.6],
            clips: 4,
            tokens: 64,
            step_s: 0.5,
            data_wait_s: 0.5,
            ..StepSample::default()
        });
        t.queue_add(Stage::Fetch, 3);
        let text = t.encode_metrics().unwrap();
        assert!(text.contains("vjepa_loss 0.5"), "{text}");
        assert!(
            text.contains("vjepa_loss_per_mask{mask=\"1\"} 0.6"),
            "{text}"
        );
        assert!(text.contains("vjepa_data_wait_share 0.5"), "{text}");
        assert!(
            text.contains("vjepa_stage_queue_depth{stage=\"fetch\"} 3"),
            "{text}"
        );
        assert!(text.contains("vjepa_clips_total 4"), "{text}");
        for reason in quarantine_reasons() {
            let zero = format!("vjepa_decode_failures_total{{reason=\"{reason}\"}} 0");
            assert!(text.contains(&zero), "{zero} in {text}");
        }
        t.quarantined("file:///v/a.mp4", "not_a_video");
        let text = t.encode_metrics().unwrap();
        assert!(
            text.contains("vjepa_decode_failures_total{reason=\"not_a_video\"} 1"),
            "{text}"
        );
        t.non_finite_loss(f64::NAN);
        let text = t.encode_metrics().unwrap();
        assert!(text.contains("vjepa_loss NaN"), "{text}");
        assert!(
            text.contains("vjepa_loss_per_mask{mask=\"1\"} NaN"),
            "no per-mask loss of the last good step beside a NaN loss: {text}"
        );
        assert!(text.contains("vjepa_nonfinite_loss_total 1"), "{text}");
    }
}
