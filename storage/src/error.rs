//! The crate's error type.

use std::path::PathBuf;

/// What went wrong in a storage operation, with enough context (URI, operation) to act on.
///
/// Messages never contain credentials: backend error texts are passed through a redaction step
/// that removes the secret key and session token before they are stored here.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The location string could not be understood (empty, bad URL, missing bucket...).
    #[error("invalid storage location {location:?}: {reason}")]
    InvalidLocation {
        /// The location as given.
        location: String,
        /// Why it was refused.
        reason: String,
    },

    /// The location uses a scheme this crate cannot read.
    #[error(
        "unsupported scheme {scheme:?} in {location:?}: use a local path, file:///abs/dir/ or s3://bucket/prefix/"
    )]
    UnsupportedScheme {
        /// The location as given.
        location: String,
        /// The scheme found (e.g. `http`).
        scheme: String,
    },

    /// A local store's directory does not exist and was not to be created.
    #[error("local directory {} does not exist", path.display())]
    LocalDirMissing {
        /// The directory looked for.
        path: PathBuf,
    },

    /// A local store's root exists but is not a directory.
    #[error("{} is not a directory; a store root must be a directory", path.display())]
    NotADirectory {
        /// The path found.
        path: PathBuf,
    },

    /// Local file-system failure while opening a store.
    #[error("local I/O on {}: {source}", path.display())]
    LocalIo {
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A relative path leaves the store root (`..` above the root).
    #[error("path {rel:?} escapes the store root {root}")]
    PathEscapesRoot {
        /// The path as given.
        rel: String,
        /// The store's root URL.
        root: String,
    },

    /// A relative object path is malformed (absolute, empty, control characters...).
    #[error("invalid object path {rel:?}: {reason}")]
    InvalidPath {
        /// The path as given.
        rel: String,
        /// Why it was refused.
        reason: String,
    },

    /// The S3 client could not be configured.
    #[error("S3 configuration for {location}: {detail}")]
    S3Config {
        /// The location being opened.
        location: String,
        /// What is wrong and how to fix it.
        detail: String,
    },

    /// No S3 credentials: none in the environment, and no IAM role from instance metadata.
    #[error(
        "no S3 credentials for {location}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (plus AWS_SESSION_TOKEN for temporary credentials) in the environment, run where an IAM role provides them (EC2 instance profile, EKS IRSA or Pod Identity, ECS task role), or set AWS_SKIP_SIGNATURE=true for a public bucket ({why})"
    )]
    MissingCredentials {
        /// The location being opened.
        location: String,
        /// Why no instance profile could be used either.
        why: String,
    },

    /// The object does not exist.
    #[error("object {uri} not found")]
    NotFound {
        /// Full URI of the object.
        uri: String,
    },

    /// A dataset given without a trailing '/' is read as an index file, and there is none.
    #[error(
        "dataset index {uri} not found (a dataset that does not end with '/' is read as a \
         `path label` index file; to list a prefix, end it with '/': {uri}/)"
    )]
    IndexNotFound {
        /// Full URI of the index.
        uri: String,
    },

    /// The backend refused the request (bad or missing credentials, bucket policy).
    #[error(
        "access denied for {op} {uri}: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN and the bucket policy ({detail})"
    )]
    AccessDenied {
        /// The operation (get, put, list...).
        op: &'static str,
        /// Full URI of the object or prefix.
        uri: String,
        /// The backend's message, credentials redacted.
        detail: String,
    },

    /// A byte range was malformed.
    #[error("invalid byte range {start}..{end} for {uri}")]
    InvalidRange {
        /// Full URI of the object.
        uri: String,
        /// Range start.
        start: u64,
        /// Range end (exclusive).
        end: u64,
    },

    /// Any other backend failure (network, server error...).
    #[error("{op} {uri} failed: {detail}")]
    Backend {
        /// The operation (get, put, list...).
        op: &'static str,
        /// Full URI of the object or prefix.
        uri: String,
        /// The backend's message, credentials redacted.
        detail: String,
    },

    /// A dataset index file is not UTF-8 text.
    #[error(
        "dataset index {uri} is not UTF-8 text: {detail} (a dataset that does not end with '/' \
         is read as a `path label` index; a prefix to list ends with '/')"
    )]
    IndexNotText {
        /// Full URI of the index.
        uri: String,
        /// Where decoding failed.
        detail: String,
    },

    /// Writing or reading a Parquet table failed.
    #[error("parquet table {uri}: {detail}")]
    Parquet {
        /// Full URI of the table.
        uri: String,
        /// What failed.
        detail: String,
    },

    /// A Parquet table does not have the expected schema.
    #[error("parquet table {uri} does not have the expected schema: {detail}")]
    Schema {
        /// Full URI of the table.
        uri: String,
        /// The mismatch found.
        detail: String,
    },

    /// The local S3 test server could not be started.
    #[error("S3 test server: {detail}")]
    TestServer {
        /// What failed and how to fix it.
        detail: String,
    },
}

impl StorageError {
    /// What the store's answer says about the *setup* when it refused a request outright: the
    /// bucket does not exist, or the credentials are not accepted. Retrying the same command
    /// cannot help; `None` for everything else (a missing object, the network, a server error).
    ///
    /// Only the store's own error codes count, and only those that a new attempt cannot
    /// change: a 403 for a skewed clock (`RequestTimeTooSkewed`) or an expired session token
    /// (a replacement process reads a rotated one) is left to the supervisor's retries.
    pub fn setup_refused(&self) -> Option<&'static str> {
        let detail = match self {
            StorageError::AccessDenied { detail, .. } | StorageError::Backend { detail, .. } => {
                detail
            }
            _ => return None,
        };
        const CREDENTIALS: [&str; 4] = [
            "SignatureDoesNotMatch",
            "InvalidAccessKeyId",
            "NotSignedUp",
            "AccessDenied",
        ];
        if detail.contains("<Code>NoSuchBucket</Code>") {
            Some("the bucket does not exist")
        } else if CREDENTIALS
            .iter()
            .any(|c| detail.contains(&format!("<Code>{c}</Code>")))
        {
            Some("the store refused the credentials")
        } else {
            None
        }
    }

    /// True when the error means the object is absent (as opposed to unreadable).
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            StorageError::NotFound { .. } | StorageError::IndexNotFound { .. }
        )
    }
}

/// Formats an error with its whole `source()` chain, skipping sources already in the text.
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let msg = s.to_string();
        if !msg.is_empty() && !out.contains(&msg) {
            out.push_str(": ");
            out.push_str(&msg);
        }
        cur = s.source();
    }
    out
}

/// Replaces every occurrence of each secret in `text` with `[REDACTED]`.
pub(crate) fn redact(text: &str, secrets: &[String]) -> String {
    let mut out = text.to_string();
    for s in secrets {
        if !s.is_empty() && out.contains(s.as_str()) {
            out = out.replace(s.as_str(), "[REDACTED]");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Store answers as object_store reports them (a list of a missing bucket, a bad secret).
    #[test]
    fn refusals_of_the_setup_are_told_apart() {
        let backend = |detail: &str| StorageError::Backend {
            op: "list",
            uri: "s3://b/p/".into(),
            detail: detail.into(),
        };
        let missing = backend(
            "Server returned non-2xx status code: 404 Not Found: <?xml version=\"1.0\"?><Error><Code>NoSuchBucket</Code></Error>",
        );
        assert_eq!(missing.setup_refused(), Some("the bucket does not exist"));
        let secret = backend("403 Forbidden: <Error><Code>SignatureDoesNotMatch</Code></Error>");
        assert_eq!(
            secret.setup_refused(),
            Some("the store refused the credentials")
        );
        assert_eq!(backend("500 Internal Server Error").setup_refused(), None);
        let skew = StorageError::AccessDenied {
            op: "get",
            uri: "s3://b/x.mp4".into(),
            detail: "403: <Error><Code>RequestTimeTooSkewed</Code></Error>".into(),
        };
        assert_eq!(skew.setup_refused(), None);
        assert_eq!(
            backend("Connection refused (os error 111)").setup_refused(),
            None
        );
        let gone = StorageError::NotFound {
            uri: "s3://b/x.mp4".into(),
        };
        assert_eq!(gone.setup_refused(), None);
    }

    #[test]
    fn redact_removes_secrets() {
        let secrets = vec!["s3cr3t".to_string(), String::new()];
        assert_eq!(
            redact("bad s3cr3t and s3cr3t", &secrets),
            "bad [REDACTED] and [REDACTED]"
        );
        assert_eq!(redact("nothing", &secrets), "nothing");
    }

    #[test]
    fn chain_includes_sources_once() {
        let inner = std::io::Error::other("disk on fire");
        let outer = StorageError::LocalIo {
            path: PathBuf::from("/x"),
            source: inner,
        };
        let text = error_chain(&outer);
        assert_eq!(text.matches("disk on fire").count(), 1, "{text}");
    }
}
