//! A local S3 server (`s3s-fs`) for integration tests.
//!
//! Tests that need real S3 semantics (SigV4, multipart, listings) start one with
//! [`S3Server::start`]; it listens on a free port of 127.0.0.1, stores buckets as directories of
//! a fresh temporary root, and is killed (root removed) on drop. The binary is not a build
//! dependency: when it is not on `PATH`, `start` returns `Ok(None)` and tests skip, unless
//! `VJEPA_REQUIRE_S3=1` asks them to fail instead (CI).

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::error::redact;
use crate::{S3Settings, StorageError};

/// Name of the server binary looked up on `PATH`.
pub const BINARY: &str = "s3s-fs";
/// How to install it (pinned: newer versions need a newer rustc).
pub const INSTALL_HINT: &str = "cargo install s3s-fs@0.14.1 --features binary --locked";
/// Environment variable that turns "binary absent" from a skip into a failure.
pub const REQUIRE_ENV: &str = "VJEPA_REQUIRE_S3";

static COUNTER: AtomicU64 = AtomicU64::new(0);

fn random_hex() -> String {
    let mut h = RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u32(std::process::id());
    if let Ok(t) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        h.write_u128(t.as_nanos());
    }
    format!("{:016x}", h.finish())
}

/// The `s3s-fs` binary on `PATH`, if any.
pub fn binary_path() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(BINARY))
        .find(|p| p.is_file())
}

/// A running `s3s-fs` server; killed and its root removed on drop.
pub struct S3Server {
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    /// Directory holding the buckets (one subdirectory each).
    pub root: PathBuf,
    /// Access key id the server accepts.
    pub access_key: String,
    /// Secret key the server accepts (test-only, random per server).
    pub secret_key: String,
    child: Child,
    dir: PathBuf,
}

impl std::fmt::Debug for S3Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Server")
            .field("endpoint", &self.endpoint)
            .field("root", &self.root)
            .finish_non_exhaustive()
    }
}

fn server_err(detail: impl Into<String>) -> StorageError {
    StorageError::TestServer {
        detail: detail.into(),
    }
}

fn free_port() -> Result<u16, StorageError> {
    let l = TcpListener::bind("127.0.0.1:0")
        .map_err(|e| server_err(format!("cannot bind a free port: {e}")))?;
    let port = l
        .local_addr()
        .map_err(|e| server_err(format!("cannot read the bound port: {e}")))?
        .port();
    Ok(port)
}

fn log_tail(log: &Path, secret: &str) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let start = text.len().saturating_sub(2000);
    let tail = text.get(start..).unwrap_or(&text);
    redact(tail, &[secret.to_string()])
}

impl S3Server {
    /// Starts a server, or returns `Ok(None)` when `s3s-fs` is not on `PATH`.
    pub fn start() -> Result<Option<S3Server>, StorageError> {
        let Some(bin) = binary_path() else {
            return Ok(None);
        };
        let dir = std::env::temp_dir().join(format!("vjepa-s3s-{}", random_hex()));
        let root = dir.join("data");
        std::fs::create_dir_all(&root)
            .map_err(|e| server_err(format!("cannot create {}: {e}", root.display())))?;
        let access_key = format!("AKTEST{}", random_hex().to_ascii_uppercase());
        let secret_key = format!("sk-{}{}", random_hex(), random_hex());
        let log = dir.join("s3s-fs.log");
        let mut last_err = String::new();
        // The port is free when probed but could be taken before the server binds it: retry.
        for attempt in 0..3 {
            let port = free_port()?;
            let logf = std::fs::File::create(&log)
                .map_err(|e| server_err(format!("cannot create {}: {e}", log.display())))?;
            let logf2 = logf
                .try_clone()
                .map_err(|e| server_err(format!("cannot open log: {e}")))?;
            let mut child = Command::new(&bin)
                .arg("--host")
                .arg("127.0.0.1")
                .arg("--port")
                .arg(port.to_string())
                .arg("--access-key")
                .arg(&access_key)
                .arg("--secret-key")
                .arg(&secret_key)
                .arg(&root)
                .stdin(Stdio::null())
                .stdout(logf)
                .stderr(logf2)
                .spawn()
                .map_err(|e| server_err(format!("cannot run {}: {e}", bin.display())))?;
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Ok(Some(status)) = child.try_wait() {
                    last_err = format!(
                        "attempt {attempt}: s3s-fs exited with {status}; log: {}",
                        log_tail(&log, &secret_key)
                    );
                    break;
                }
                if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                    let endpoint = format!("http://127.0.0.1:{port}");
                    tracing::info!(endpoint = %endpoint, root = %root.display(), "s3s-fs started");
                    return Ok(Some(S3Server {
                        endpoint,
                        root,
                        access_key,
                        secret_key,
                        child,
                        dir,
                    }));
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    last_err = format!(
                        "attempt {attempt}: s3s-fs did not listen on {addr} within 10 s; log: {}",
                        log_tail(&log, &secret_key)
                    );
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
        Err(server_err(last_err))
    }

    /// Like [`S3Server::start`], for tests: when the binary is absent, fails if
    /// `VJEPA_REQUIRE_S3=1`, else prints why `test` is skipped and returns `Ok(None)`.
    pub fn start_or_skip(test: &str) -> Result<Option<S3Server>, StorageError> {
        match Self::start()? {
            Some(s) => Ok(Some(s)),
            None => {
                let required = std::env::var(REQUIRE_ENV).is_ok_and(|v| v.trim() == "1");
                if required {
                    Err(server_err(format!(
                        "{REQUIRE_ENV}=1 but `{BINARY}` is not on PATH; install it with `{INSTALL_HINT}`"
                    )))
                } else {
                    eprintln!(
                        "SKIPPED {test}: `{BINARY}` not on PATH (install: `{INSTALL_HINT}`; set {REQUIRE_ENV}=1 to make this a failure)"
                    );
                    Ok(None)
                }
            }
        }
    }

    /// Creates a bucket (a directory under the root); returns its directory.
    pub fn create_bucket(&self, name: &str) -> Result<PathBuf, StorageError> {
        let valid = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        if !valid {
            return Err(server_err(format!(
                "bucket name {name:?}: use lower-case letters, digits, '-' and '.'"
            )));
        }
        let p = self.root.join(name);
        std::fs::create_dir_all(&p)
            .map_err(|e| server_err(format!("cannot create bucket dir {}: {e}", p.display())))?;
        Ok(p)
    }

    /// Connection settings for this server (plain HTTP allowed, region `us-east-1`).
    pub fn settings(&self) -> S3Settings {
        S3Settings {
            endpoint: Some(self.endpoint.clone()),
            region: Some("us-east-1".into()),
            allow_http: true,
            ..Default::default()
        }
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
