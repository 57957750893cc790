//! The vjepa-stream job: configuration, catalog, clip loading and the training dataflow.

pub mod catalog;
pub mod config;
pub mod convert;
pub mod eval_config;
mod eval_resume;
pub mod extract;
pub mod finetune;
pub mod job;
pub mod loader;
pub mod metrics_export;
pub mod preflight;
pub mod probe;
pub mod shutdown;
mod stream_epochs;
pub mod telemetry;

/// Microseconds since the Unix epoch, for record timestamps.
pub fn now_unix_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}
