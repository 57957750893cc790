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
mod instance_metadata;
mod location;
pub mod predictions;
mod store;
pub mod tables;
pub mod testing;

pub use error::StorageError;
pub use instance_metadata::metadata_endpoint_problem;
pub use location::{endpoint_problem, redact_url};

/// Checks that `s` names a location a [`Store`] can open (a local path, a `file://` or an
/// `s3://` URL), without any I/O: for config validation.
pub fn check_location(s: &str) -> Result<(), StorageError> {
    location::parse_location(s).map(|_| ())
}
pub use store::{ObjectInfo, S3Settings, Store, env_has_s3_credentials, normalize_tag, object_tag};

/// Replaces the local file `path` with `bytes`: written beside it (`path.partial`), flushed to
/// disk, then renamed into place, so a reader, a stopped process or a power loss sees the
/// previous complete file or the new one, never half of one (the staging file is removed when
/// the write fails). For files rewritten while a run goes (its epochs table, its resume state).
pub fn replace_local_file(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut staging = path.as_os_str().to_owned();
    staging.push(".partial");
    let staging = std::path::PathBuf::from(staging);
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&staging)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&staging, path)
    };
    write().inspect_err(|_| {
        let _ = std::fs::remove_file(&staging);
    })
}
