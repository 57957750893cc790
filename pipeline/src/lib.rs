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

/// Input refused before any work (a flag out of range, an index that is not there, labels the
/// head cannot take, a file that is not a checkpoint): the command line exits 2 for it, as for
/// a bad config, and 1 for a run that failed.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

impl Refused {
    /// Whether `e` (or an error it wraps) is a refusal.
    pub fn in_chain(e: &anyhow::Error) -> bool {
        e.chain().any(|c| c.is::<Refused>())
    }
}

/// Refuses with `msg` (an `anyhow::Error` carrying [`Refused`]).
#[macro_export]
macro_rules! refuse {
    ($($arg:tt)*) => {
        return Err(anyhow::Error::new($crate::Refused(format!($($arg)*))))
    };
}

/// Microseconds since the Unix epoch, for record timestamps.
pub fn now_unix_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}
