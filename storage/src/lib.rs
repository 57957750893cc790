//! Storage for vjepa-stream: where videos are read from and where the run writes its outputs.
//!
//! A long-lived training job reads videos from object storage (S3 or a local directory that stands
//! in for it) and writes metrics, quarantine records and checkpoints back as it goes. Everything
//! here goes through one type, [`Store`], so the rest of the pipeline never cares which backend a
//! path lives on:
//!
//! - [`Store`]: a local directory or an `s3://bucket/prefix/`, with paths relative to its root.
//! - [`dataset`]: opens a V-JEPA CSV index (or lists a prefix) and decides, entry by entry, which
//!   videos may be read; entries pointing outside the dataset's store are rejected, never read.
//! - [`tables`]: Parquet outputs (metrics, quarantine) written row group by row group.
//! - [`checkpoints`]: checkpoint file naming and discovery of the latest one.
//! - [`testing`]: starts a local `s3s-fs` S3 server for integration tests.
//!
//! Credentials come only from the environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
//! `AWS_SESSION_TOKEN`) and never appear in logs or error messages.

pub mod checkpoints;
pub mod dataset;
mod error;
pub mod eval_epochs;
pub mod features;
mod location;
pub mod predictions;
mod store;
pub mod tables;
pub mod testing;

pub use error::StorageError;
pub use location::{endpoint_problem, redact_url};

/// Checks that `s` names a location a [`Store`] can open (a local path, a `file://` or an
/// `s3://` URL), without any I/O: for config validation.
pub fn check_location(s: &str) -> Result<(), StorageError> {
    location::parse_location(s).map(|_| ())
}
pub use store::{ObjectInfo, S3Settings, Store};
