//! [`Store`]: one root (local directory or S3 bucket/prefix) with paths relative to it.

use std::fmt;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use crate::StorageError;
use crate::error::{error_chain, redact};
use crate::location::{Location, normalize_rel, parse_location};

/// S3 connection settings that are not secrets.
///
/// Credentials come only from the environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
/// `AWS_SESSION_TOKEN`), never from config files, so configs can be shared without leaking them.
/// When a field is `None`, the environment is consulted: `AWS_ENDPOINT_URL` (or `AWS_ENDPOINT`)
/// for the endpoint, `AWS_REGION` then `AWS_DEFAULT_REGION` for the region.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct S3Settings {
    /// Endpoint URL of an S3-compatible service (e.g. `http://127.0.0.1:9000`); `None` = AWS.
    pub endpoint: Option<String>,
    /// Region; `None` = from the environment, else `us-east-1`.
    pub region: Option<String>,
    /// Permit plain-HTTP endpoints (local test servers, MinIO without TLS).
    pub allow_http: bool,
    /// Retries of a failed request (object_store's default: 10). Reads of video bytes have
    /// their own bound ([`vjepa_ingest`]'s per-read timeout) on top.
    pub max_retries: Option<usize>,
    /// Longest time spent retrying one request, in seconds (object_store's default: 180).
    pub retry_timeout_secs: Option<f64>,
    /// Longest time one HTTP request may take, in seconds (object_store's default: 30).
    pub request_timeout_secs: Option<f64>,
    /// The EC2 instance metadata service, where credentials come from an instance profile;
    /// `None` = `AWS_EC2_METADATA_SERVICE_ENDPOINT`, then `AWS_METADATA_ENDPOINT`, else
    /// `http://169.254.169.254`.
    pub metadata_endpoint: Option<String>,
}

/// Size and path of one object, as returned by listings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Path relative to the store root, '/'-separated.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// Which version of the object this is ([`object_tag`]): an object replaced under the same
    /// name gets another, so a long run can tell a fixed video from the broken one it replaced.
    pub tag: Option<String>,
}

/// An object version's identity from its metadata: the ETag without quotes or the weak `W/`
/// prefix (S3 quotes it in headers and listings alike, other servers do not always; the local
/// store's is inode, modification time and size), so that a listing's and a HEAD's agree.
/// `None` when the store gives no ETag.
pub fn object_tag(meta: &object_store::ObjectMeta) -> Option<String> {
    normalize_tag(meta.e_tag.as_deref()?)
}

/// [`object_tag`] of a raw ETag value.
pub fn normalize_tag(e_tag: &str) -> Option<String> {
    let t = e_tag.trim();
    let t = t.strip_prefix("W/").unwrap_or(t);
    let t = t.trim_matches('"');
    (!t.is_empty()).then(|| t.to_string())
}

/// Where a store's root is, kept to decide whether dataset entries lie inside it.
#[derive(Clone, Debug)]
pub(crate) enum Root {
    /// A local directory.
    Local {
        /// Canonical directory (symlinks resolved).
        canonical: PathBuf,
        /// The directory as given, made absolute and normalised lexically.
        given: PathBuf,
    },
    /// An S3 bucket and key prefix (no leading/trailing '/'; empty = whole bucket).
    S3 { bucket: String, prefix: String },
}

struct Inner {
    store: Arc<dyn ObjectStore>,
    prefix: Path,
    url: String,
    root: Root,
    /// Secrets to scrub from backend error texts. Never printed.
    redact: Vec<String>,
}

/// A store rooted at a prefix: a local directory or an S3 bucket/prefix.
///
/// Cheap to clone (an `Arc` inside). All paths in the API are relative to the root and
/// '/'-separated; '..' may not go above the root.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Deliberately only the URL: the inner state holds secrets for redaction.
        f.debug_struct("Store")
            .field("url", &self.inner.url)
            .finish()
    }
}

/// Where S3 credentials come from.
enum Credentials<'a> {
    /// The process environment (the production path).
    Env,
    /// Given explicitly (tests and tools that must not touch the process environment).
    Explicit { key_id: &'a str, secret: &'a str },
}

fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn env_true(name: &str) -> bool {
    env_nonempty(name)
        .is_some_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes"))
}

/// Whether the environment gives S3 credentials that object_store uses before an instance
/// profile's, as it picks them: static keys (either variable: object_store then asks for the
/// other), a web identity (token file and role), a container's credentials, or unsigned
/// requests. Without them, opening S3 asks the instance metadata service for a role.
pub fn env_has_s3_credentials() -> bool {
    let set = |k: &str| env_nonempty(k).is_some();
    set("AWS_ACCESS_KEY_ID")
        || set("AWS_SECRET_ACCESS_KEY")
        || (set("AWS_WEB_IDENTITY_TOKEN_FILE") && set("AWS_ROLE_ARN"))
        || set("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")
        || (set("AWS_CONTAINER_CREDENTIALS_FULL_URI")
            && set("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"))
        || env_true("AWS_SKIP_SIGNATURE")
}

impl Store {
    /// Opens a store.
    ///
    /// Accepts `file:///abs/dir/`, an absolute or relative local path (relative → against the
    /// current directory; created if missing when `create` is true), `s3://bucket/` or
    /// `s3://bucket/some/prefix/`. S3 credentials are read from the environment only.
    pub fn open(location: &str, s3: &S3Settings, create: bool) -> Result<Store, StorageError> {
        Self::open_parsed(
            location,
            parse_location(location)?,
            s3,
            create,
            Credentials::Env,
        )
    }

    /// Opens a store with explicit S3 credentials instead of the environment's.
    ///
    /// For tests and tools that must not mutate the process environment. Local locations
    /// ignore the credentials; a missing local directory is not created.
    pub fn open_with_credentials(
        location: &str,
        s3: &S3Settings,
        key_id: &str,
        secret: &str,
    ) -> Result<Store, StorageError> {
        Self::open_parsed(
            location,
            parse_location(location)?,
            s3,
            false,
            Credentials::Explicit { key_id, secret },
        )
    }

    /// Opens the directory (or key prefix) that contains the object named by `location`,
    /// returning the store and the object's name inside it.
    pub(crate) fn open_parent_of(
        location: &str,
        s3: &S3Settings,
        creds: Option<(&str, &str)>,
    ) -> Result<(Store, String), StorageError> {
        let parsed = parse_location(location)?;
        let (dir, name) = match parsed {
            Location::Local(p) => {
                let name = p
                    .file_name()
                    .and_then(|n| n.to_str())
                    .map(str::to_string)
                    .ok_or_else(|| StorageError::InvalidLocation {
                        location: location.to_string(),
                        reason: "no file name".into(),
                    })?;
                let parent = p
                    .parent()
                    .map(|d| d.to_path_buf())
                    .unwrap_or_else(|| "/".into());
                (Location::Local(parent), name)
            }
            Location::S3 { bucket, key, .. } => {
                let (dir, name) = match key.rsplit_once('/') {
                    Some((d, n)) => (d.to_string(), n.to_string()),
                    None => (String::new(), key.clone()),
                };
                if name.is_empty() {
                    return Err(StorageError::InvalidLocation {
                        location: location.to_string(),
                        reason: "no object name after the bucket".into(),
                    });
                }
                (
                    Location::S3 {
                        bucket,
                        key: dir,
                        trailing_slash: true,
                    },
                    name,
                )
            }
        };
        let creds = match creds {
            Some((key_id, secret)) => Credentials::Explicit { key_id, secret },
            None => Credentials::Env,
        };
        let store = Self::open_parsed(location, dir, s3, false, creds)?;
        Ok((store, name))
    }

    /// Opens a store from an already parsed location.
    pub(crate) fn open_location(
        location: &str,
        parsed: Location,
        s3: &S3Settings,
        create: bool,
        creds: Option<(&str, &str)>,
    ) -> Result<Store, StorageError> {
        let creds = match creds {
            Some((key_id, secret)) => Credentials::Explicit { key_id, secret },
            None => Credentials::Env,
        };
        Self::open_parsed(location, parsed, s3, create, creds)
    }

    fn open_parsed(
        location: &str,
        parsed: Location,
        s3: &S3Settings,
        create: bool,
        creds: Credentials<'_>,
    ) -> Result<Store, StorageError> {
        let inner = match parsed {
            Location::Local(dir) => open_local(dir, create)?,
            Location::S3 { bucket, key, .. } => open_s3(location, bucket, key, s3, creds)?,
        };
        tracing::info!(url = %inner.url, "opened store");
        Ok(Store {
            inner: Arc::new(inner),
        })
    }

    /// Canonical root URL, e.g. `file:///abs/dir/` or `s3://bucket/prefix/` (no credentials).
    pub fn url(&self) -> &str {
        &self.inner.url
    }

    /// Full URI of an object, for records and logs.
    ///
    /// The path is normalised when possible; a malformed path is appended as given so the
    /// record still shows what was asked for.
    pub fn uri_of(&self, rel: &str) -> String {
        match normalize_rel(rel) {
            Ok(n) => format!("{}{}", self.inner.url, n),
            Err(_) => format!("{}{}", self.inner.url, rel),
        }
    }

    /// True when the store is a local directory.
    pub fn is_local(&self) -> bool {
        matches!(self.inner.root, Root::Local { .. })
    }

    /// The local file-system path of an object, for local stores only (e.g. for tools that
    /// want to open the file directly). `None` for S3 or a malformed path.
    pub fn local_path(&self, rel: &str) -> Option<PathBuf> {
        match &self.inner.root {
            Root::Local { canonical, .. } => {
                let n = self.normalized(rel).ok()?;
                Some(canonical.join(n))
            }
            Root::S3 { .. } => None,
        }
    }

    pub(crate) fn root(&self) -> &Root {
        &self.inner.root
    }

    /// The underlying object store and the root prefix inside it, for writers that need the
    /// raw `object_store` API (e.g. multipart uploads). Join relative paths with
    /// [`Store::path_of`] rather than by hand.
    pub fn inner(&self) -> (Arc<dyn ObjectStore>, Path) {
        (self.inner.store.clone(), self.inner.prefix.clone())
    }

    /// The full `object_store` path of a relative path (root prefix included), validated.
    pub fn path_of(&self, rel: &str) -> Result<Path, StorageError> {
        let n = self.normalized(rel)?;
        if n.is_empty() {
            return Err(StorageError::InvalidPath {
                rel: rel.to_string(),
                reason: "names the store root, not an object".into(),
            });
        }
        self.join(rel, &n)
    }

    fn normalized(&self, rel: &str) -> Result<String, StorageError> {
        if rel.starts_with('/') {
            return Err(StorageError::InvalidPath {
                rel: rel.to_string(),
                reason: "must be relative to the store root (no leading '/')".into(),
            });
        }
        normalize_rel(rel).map_err(|_| StorageError::PathEscapesRoot {
            rel: rel.to_string(),
            root: self.inner.url.clone(),
        })
    }

    fn join(&self, rel: &str, normalized: &str) -> Result<Path, StorageError> {
        let relpath = Path::parse(normalized).map_err(|e| StorageError::InvalidPath {
            rel: rel.to_string(),
            reason: e.to_string(),
        })?;
        Ok(self
            .inner
            .prefix
            .parts()
            .chain(relpath.parts())
            .collect::<Path>())
    }

    /// Maps an `object_store` error to ours, scrubbing credentials from its text.
    fn map_err(&self, op: &'static str, rel: &str, e: object_store::Error) -> StorageError {
        let uri = self.uri_of(rel);
        let detail = shorten(redact(&error_chain(&e), &self.inner.redact));
        match e {
            object_store::Error::NotFound { .. } => StorageError::NotFound { uri },
            object_store::Error::PermissionDenied { .. }
            | object_store::Error::Unauthenticated { .. } => {
                StorageError::AccessDenied { op, uri, detail }
            }
            _ => StorageError::Backend { op, uri, detail },
        }
    }

    /// Redacts secrets from an arbitrary message (for errors wrapped by other modules).
    pub fn scrub(&self, text: &str) -> String {
        redact(text, &self.inner.redact)
    }

    /// The first object under the root (recursively, in the store's listing order) that
    /// `accept` takes, looking at no more than `max` objects: with `max` at most a page (1000 on
    /// S3), one listing request. For a pre-start check that must not walk a bucket of millions
    /// of videos. `Ok(Err(seen))` when none was taken: `seen` objects were looked at (`max`
    /// when the listing went on).
    pub async fn first_object(
        &self,
        accept: impl Fn(&str) -> bool,
        max: usize,
    ) -> Result<Result<ObjectInfo, usize>, StorageError> {
        let prefix = &self.inner.prefix;
        let mut listing = self.inner.store.list((!prefix.is_root()).then_some(prefix));
        let mut seen = 0;
        while seen < max {
            let Some(meta) = listing
                .try_next()
                .await
                .map_err(|e| self.map_err("list", "", e))?
            else {
                break;
            };
            seen += 1;
            let Some(rel) = self.rel_of(&meta.location) else {
                continue;
            };
            if accept(&rel) {
                return Ok(Ok(ObjectInfo {
                    path: rel,
                    size: meta.size,
                    tag: object_tag(&meta),
                }));
            }
        }
        Ok(Err(seen))
    }

    /// A listed object's path relative to the store root (`None` outside the root's prefix).
    fn rel_of(&self, location: &Path) -> Option<String> {
        let parts = location.prefix_match(&self.inner.prefix)?;
        let rel: Vec<String> = parts.map(|p| p.as_ref().to_string()).collect();
        Some(rel.join("/"))
    }

    /// Lists every object under the root, recursively, sorted by path.
    pub async fn list(&self) -> Result<Vec<ObjectInfo>, StorageError> {
        self.list_prefix("").await
    }

    /// Lists every object under a sub-directory of the root (`""` = everything), recursively,
    /// sorted by path. Paths in the result are relative to the store root.
    pub async fn list_prefix(&self, rel_dir: &str) -> Result<Vec<ObjectInfo>, StorageError> {
        let n = self.normalized(rel_dir)?;
        let full = if n.is_empty() {
            self.inner.prefix.clone()
        } else {
            self.join(rel_dir, &n)?
        };
        let prefix_opt = if full.is_root() { None } else { Some(&full) };
        let metas: Vec<object_store::ObjectMeta> = self
            .inner
            .store
            .list(prefix_opt)
            .try_collect()
            .await
            .map_err(|e| self.map_err("list", rel_dir, e))?;
        let mut out = Vec::with_capacity(metas.len());
        for m in metas {
            let Some(path) = self.rel_of(&m.location) else {
                tracing::warn!(location = %m.location, "listed object outside the store prefix; skipped");
                continue;
            };
            out.push(ObjectInfo {
                path,
                size: m.size,
                tag: object_tag(&m),
            });
        }
        out.sort_by(|a, b| a.path.cmp(&b.path));
        tracing::debug!(url = %self.uri_of(rel_dir), objects = out.len(), "listed");
        Ok(out)
    }

    /// Reads a whole object.
    pub async fn get(&self, rel: &str) -> Result<Bytes, StorageError> {
        let path = self.path_of(rel)?;
        let res = self
            .inner
            .store
            .get(&path)
            .await
            .map_err(|e| self.map_err("get", rel, e))?;
        let bytes = res.bytes().await.map_err(|e| self.map_err("get", rel, e))?;
        tracing::debug!(uri = %self.uri_of(rel), bytes = bytes.len(), "get");
        Ok(bytes)
    }

    /// Reads the bytes `range` of an object (end exclusive). An empty range returns no bytes
    /// without a request.
    pub async fn get_range(&self, rel: &str, range: Range<u64>) -> Result<Bytes, StorageError> {
        let path = self.path_of(rel)?;
        if range.start > range.end {
            return Err(StorageError::InvalidRange {
                uri: self.uri_of(rel),
                start: range.start,
                end: range.end,
            });
        }
        if range.start == range.end {
            return Ok(Bytes::new());
        }
        let (start, end) = (range.start, range.end);
        let bytes = self
            .inner
            .store
            .get_range(&path, range)
            .await
            .map_err(|e| self.map_err("get_range", rel, e))?;
        tracing::trace!(uri = %self.uri_of(rel), start, end, "get_range");
        Ok(bytes)
    }

    /// Size of an object (fails with [`StorageError::NotFound`] when absent).
    pub async fn head(&self, rel: &str) -> Result<ObjectInfo, StorageError> {
        let path = self.path_of(rel)?;
        let meta = self
            .inner
            .store
            .head(&path)
            .await
            .map_err(|e| self.map_err("head", rel, e))?;
        Ok(ObjectInfo {
            path: normalize_rel(rel).unwrap_or_else(|_| rel.to_string()),
            size: meta.size,
            tag: object_tag(&meta),
        })
    }

    /// Writes a whole object, replacing any previous one.
    ///
    /// Atomic from a reader's view: S3 puts are, and the local store writes a staging file and
    /// renames it into place.
    pub async fn put(&self, rel: &str, data: Bytes) -> Result<(), StorageError> {
        let path = self.path_of(rel)?;
        let len = data.len();
        self.inner
            .store
            .put(&path, PutPayload::from(data))
            .await
            .map_err(|e| self.map_err("put", rel, e))?;
        tracing::debug!(uri = %self.uri_of(rel), bytes = len, "put");
        Ok(())
    }

    /// Deletes an object. Deleting an absent object is not an error on S3; locally it is
    /// reported as [`StorageError::NotFound`].
    pub async fn delete(&self, rel: &str) -> Result<(), StorageError> {
        let path = self.path_of(rel)?;
        self.inner
            .store
            .delete(&path)
            .await
            .map_err(|e| self.map_err("delete", rel, e))?;
        tracing::debug!(uri = %self.uri_of(rel), "deleted");
        Ok(())
    }

    /// Whether an object exists (errors other than "not found" are returned, not hidden).
    pub async fn exists(&self, rel: &str) -> Result<bool, StorageError> {
        match self.head(rel).await {
            Ok(_) => Ok(true),
            Err(StorageError::NotFound { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

fn open_local(dir: PathBuf, create: bool) -> Result<Inner, StorageError> {
    match std::fs::metadata(&dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(StorageError::NotADirectory { path: dir }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if !create {
                return Err(StorageError::LocalDirMissing { path: dir });
            }
            std::fs::create_dir_all(&dir).map_err(|source| StorageError::LocalIo {
                path: dir.clone(),
                source,
            })?;
            tracing::info!(dir = %dir.display(), "created local store directory");
        }
        Err(source) => return Err(StorageError::LocalIo { path: dir, source }),
    }
    let canonical = std::fs::canonicalize(&dir).map_err(|source| StorageError::LocalIo {
        path: dir.clone(),
        source,
    })?;
    let fs = LocalFileSystem::new_with_prefix(&canonical).map_err(|e| StorageError::LocalIo {
        path: canonical.clone(),
        source: std::io::Error::other(error_chain(&e)),
    })?;
    let url = url::Url::from_directory_path(&canonical)
        .map_err(|()| StorageError::InvalidLocation {
            location: canonical.display().to_string(),
            reason: "cannot be expressed as a file:// URL".into(),
        })?
        .to_string();
    Ok(Inner {
        store: Arc::new(fs),
        prefix: Path::default(),
        url,
        root: Root::Local {
            canonical,
            given: dir,
        },
        redact: Vec::new(),
    })
}

fn open_s3(
    location: &str,
    bucket: String,
    prefix: String,
    s3: &S3Settings,
    creds: Credentials<'_>,
) -> Result<Inner, StorageError> {
    let url = if prefix.is_empty() {
        format!("s3://{bucket}/")
    } else {
        format!("s3://{bucket}/{prefix}/")
    };
    let endpoint = s3
        .endpoint
        .clone()
        .or_else(|| env_nonempty("AWS_ENDPOINT_URL_S3"))
        .or_else(|| env_nonempty("AWS_ENDPOINT_URL"))
        .or_else(|| env_nonempty("AWS_ENDPOINT"));
    let region = s3
        .region
        .clone()
        .or_else(|| env_nonempty("AWS_REGION"))
        .or_else(|| env_nonempty("AWS_DEFAULT_REGION"));
    let allow_http = s3.allow_http || env_true("AWS_ALLOW_HTTP");
    if let Some(ep) = &endpoint
        && let Some(why) = crate::location::endpoint_problem(ep)
    {
        return Err(StorageError::S3Config {
            location: url,
            detail: format!("endpoint {}: {why}", crate::location::redact_url(ep)),
        });
    }
    if let Some(ep) = &endpoint
        && ep.to_ascii_lowercase().starts_with("http://")
        && !allow_http
    {
        return Err(StorageError::S3Config {
            location: url,
            detail: format!(
                "endpoint {ep} is plain HTTP but allow_http is off; enable allow_http in the S3 settings (or set AWS_ALLOW_HTTP=true), or use https"
            ),
        });
    }

    let (mut builder, secrets) = match creds {
        Credentials::Env => {
            // Where the instance metadata service answers, as object_store is to ask it.
            let metadata = s3
                .metadata_endpoint
                .clone()
                .or_else(|| env_nonempty("AWS_EC2_METADATA_SERVICE_ENDPOINT"))
                .or_else(|| env_nonempty("AWS_METADATA_ENDPOINT"))
                .unwrap_or_else(|| crate::instance_metadata::DEFAULT_ENDPOINT.to_string());
            let metadata = crate::instance_metadata::host_of(&metadata)
                .map(crate::instance_metadata::normalized)
                .unwrap_or(metadata);
            // Neither keys nor another provider: an EC2 instance profile, if this machine has
            // one (object_store then fetches and renews the role's credentials).
            if !env_has_s3_credentials() {
                if env_true("AWS_EC2_METADATA_DISABLED") {
                    return Err(StorageError::MissingCredentials {
                        location: url,
                        why: "the instance metadata service is off (AWS_EC2_METADATA_DISABLED)"
                            .into(),
                    });
                }
                match crate::instance_metadata::instance_role(
                    &metadata,
                    env_true("AWS_IMDSV1_FALLBACK"),
                ) {
                    Ok(role) => {
                        tracing::debug!(%role, endpoint = %metadata, "S3 credentials from this machine's IAM role (instance metadata)");
                    }
                    Err(why) => {
                        return Err(StorageError::MissingCredentials { location: url, why });
                    }
                }
            }
            let half = match (
                env_nonempty("AWS_ACCESS_KEY_ID").is_some(),
                env_nonempty("AWS_SECRET_ACCESS_KEY").is_some(),
            ) {
                (true, false) => Some("AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not"),
                (false, true) => Some("AWS_SECRET_ACCESS_KEY is set but AWS_ACCESS_KEY_ID is not"),
                _ => None,
            };
            if let Some(detail) = half {
                return Err(StorageError::S3Config {
                    location: url,
                    detail: detail.into(),
                });
            }
            let secrets: Vec<String> = ["AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"]
                .iter()
                .filter_map(|k| env_nonempty(k))
                .collect();
            (
                AmazonS3Builder::from_env().with_metadata_endpoint(metadata),
                secrets,
            )
        }
        Credentials::Explicit { key_id, secret } => (
            AmazonS3Builder::new()
                .with_access_key_id(key_id)
                .with_secret_access_key(secret),
            vec![secret.to_string()],
        ),
    };
    builder = builder.with_bucket_name(&bucket);
    if s3.max_retries.is_some() || s3.retry_timeout_secs.is_some() {
        let default = object_store::RetryConfig::default();
        builder = builder.with_retry(object_store::RetryConfig {
            max_retries: s3.max_retries.unwrap_or(default.max_retries),
            retry_timeout: s3
                .retry_timeout_secs
                .map_or(default.retry_timeout, Duration::from_secs_f64),
            ..default
        });
    }
    if let Some(secs) = s3.request_timeout_secs {
        // As a config key, so that client options from the environment stay.
        builder = builder.with_config(
            AmazonS3ConfigKey::Client(object_store::ClientConfigKey::Timeout),
            format!("{}ms", (secs * 1000.0).round().max(1.0) as u64),
        );
    }
    if let Some(ep) = &endpoint {
        builder = builder
            .with_endpoint(ep)
            .with_config(AmazonS3ConfigKey::S3Endpoint, ep);
    }
    if let Some(r) = &region {
        builder = builder.with_region(r);
    }
    if allow_http {
        builder = builder.with_allow_http(true);
    }
    let store = builder.build().map_err(|e| StorageError::S3Config {
        location: url.clone(),
        detail: redact(&error_chain(&e), &secrets),
    })?;
    tracing::info!(
        location,
        endpoint = endpoint
            .as_deref()
            .map_or_else(|| "(AWS default)".to_string(), crate::location::redact_url),
        region = region.as_deref().unwrap_or("us-east-1"),
        "configured S3 store"
    );
    let prefix_path = Path::parse(&prefix).map_err(|e| StorageError::InvalidLocation {
        location: location.to_string(),
        reason: e.to_string(),
    })?;
    Ok(Inner {
        store: Arc::new(store),
        prefix: prefix_path,
        url,
        root: Root::S3 { bucket, prefix },
        redact: secrets,
    })
}

/// Longest backend message kept in an error: a server that is not S3 can answer with a whole
/// HTML page, which would bury the message.
const MAX_DETAIL: usize = 1000;

/// `detail` cut to [`MAX_DETAIL`] bytes (at a character boundary), saying how much was cut.
fn shorten(detail: String) -> String {
    if detail.len() <= MAX_DETAIL {
        return detail;
    }
    let mut end = MAX_DETAIL;
    while !detail.is_char_boundary(end) {
        end -= 1;
    }
    format!(
        "{} … ({} more bytes of the response)",
        &detail[..end],
        detail.len() - end
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_tags_drop_quotes_and_the_weak_prefix() {
        assert_eq!(normalize_tag("\"abc\"").as_deref(), Some("abc"));
        assert_eq!(normalize_tag("W/\"abc\"").as_deref(), Some("abc"));
        assert_eq!(normalize_tag(" abc-2 ").as_deref(), Some("abc-2"));
        assert_eq!(normalize_tag("\"\""), None);
        assert_eq!(normalize_tag(""), None);
    }

    #[test]
    fn long_backend_messages_are_cut_at_a_character() {
        assert_eq!(shorten("short".into()), "short");
        let page = format!("404 Not Found: <html>{}</html>", "é".repeat(2000));
        let cut = shorten(page.clone());
        assert!(
            cut.len() < 1100 && cut.starts_with("404 Not Found: <html>"),
            "{cut}"
        );
        assert!(cut.ends_with("more bytes of the response)"), "{cut}");
    }

    #[test]
    fn s3_open_builds_url_without_network() {
        let s = Store::open_with_credentials(
            "s3://bkt/a/b/",
            &S3Settings {
                endpoint: Some("http://127.0.0.1:1".into()),
                region: Some("eu-west-1".into()),
                allow_http: true,
                ..Default::default()
            },
            "AKTEST",
            "very-secret-value",
        )
        .unwrap();
        assert_eq!(s.url(), "s3://bkt/a/b/");
        assert_eq!(s.uri_of("x/./y.mp4"), "s3://bkt/a/b/x/y.mp4");
        assert_eq!(s.path_of("c.mp4").unwrap().as_ref(), "a/b/c.mp4");
        assert!(!format!("{s:?}").contains("very-secret-value"));
        assert!(!s.is_local());
        assert!(s.local_path("c.mp4").is_none());
    }

    #[test]
    fn s3_plain_http_needs_allow_http() {
        let err = Store::open_with_credentials(
            "s3://bkt/",
            &S3Settings {
                endpoint: Some("http://127.0.0.1:1".into()),
                region: None,
                allow_http: false,
                ..Default::default()
            },
            "AKTEST",
            "very-secret-value",
        )
        .unwrap_err();
        assert!(matches!(err, StorageError::S3Config { .. }), "{err}");
        assert!(err.to_string().contains("allow_http"));
    }

    #[test]
    fn path_validation() {
        let s = Store::open_with_credentials(
            "s3://bkt/",
            &S3Settings {
                endpoint: Some("https://example.invalid".into()),
                ..Default::default()
            },
            "AKTEST",
            "x",
        )
        .unwrap();
        assert_eq!(s.path_of("a/b").unwrap().as_ref(), "a/b");
        assert!(matches!(
            s.path_of("../a"),
            Err(StorageError::PathEscapesRoot { .. })
        ));
        assert!(matches!(
            s.path_of("/a"),
            Err(StorageError::InvalidPath { .. })
        ));
        assert!(matches!(
            s.path_of("a/.."),
            Err(StorageError::InvalidPath { .. })
        ));
        assert!(matches!(
            s.path_of("a\u{1}b"),
            Err(StorageError::InvalidPath { .. })
        ));
    }
}
