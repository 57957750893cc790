//! Parsing of location strings (local paths, `file://` and `s3://` URLs) and lexical path
//! normalisation, shared by [`crate::Store`] and [`crate::dataset`].

use std::path::{Component, Path as FsPath, PathBuf};

use crate::StorageError;

/// A parsed location: where a store root, an index file or a dataset entry lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Location {
    /// An absolute, lexically normalised local path.
    Local(PathBuf),
    /// An S3 bucket and key (key normalised: no leading/trailing '/', no '.'/'..' segments).
    S3 {
        bucket: String,
        key: String,
        /// Whether the original string ended with '/'.
        trailing_slash: bool,
    },
}

/// Why a relative path could not be normalised.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum NormError {
    /// '..' went above the root.
    Escapes,
}

/// Returns the URL scheme of `s` (lower-cased) when it looks like `scheme://...`.
pub(crate) fn scheme_of(s: &str) -> Option<String> {
    let (scheme, _) = s.split_once("://")?;
    let mut chars = scheme.chars();
    let first = chars.next()?;
    if !first.is_ascii_alphabetic() {
        return None;
    }
    if !chars.all(|c| c.is_ascii_alphanumeric() || c == '+' || c == '-' || c == '.') {
        return None;
    }
    Some(scheme.to_ascii_lowercase())
}

/// Resolves '.', '..' and empty segments of a '/'-separated relative path.
///
/// Returns the normalised path (possibly empty, meaning the root itself).
pub(crate) fn normalize_rel(rel: &str) -> Result<String, NormError> {
    let mut parts: Vec<&str> = Vec::new();
    for seg in rel.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                if parts.pop().is_none() {
                    return Err(NormError::Escapes);
                }
            }
            s => parts.push(s),
        }
    }
    Ok(parts.join("/"))
}

/// Lexically normalises an absolute path: removes '.', resolves '..' (never above '/').
pub(crate) fn normalize_abs(path: &FsPath) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Prefix(p) => out.push(p.as_os_str()),
            Component::RootDir => out.push(Component::RootDir.as_os_str()),
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
        }
    }
    out
}

/// Makes a local path absolute (against the current directory) and normalises it lexically.
pub(crate) fn absolutize(path: &FsPath) -> Result<PathBuf, StorageError> {
    if path.is_absolute() {
        return Ok(normalize_abs(path));
    }
    let cwd = std::env::current_dir().map_err(|source| StorageError::LocalIo {
        path: PathBuf::from("."),
        source,
    })?;
    Ok(normalize_abs(&cwd.join(path)))
}

/// `s` with what a URL could carry as secrets cut out: the user info before `@` in the
/// authority and any query or fragment (for messages about a location that is refused).
pub fn redact_url(s: &str) -> String {
    let Some((scheme, rest)) = s.split_once("://") else {
        return s.to_string();
    };
    let (rest, cut) = match rest.find(['?', '#']) {
        Some(i) => (&rest[..i], format!("{}<redacted>", &rest[i..=i])),
        None => (rest, String::new()),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let authority = match authority.rsplit_once('@') {
        Some((_, host)) => format!("<redacted>@{host}"),
        None => authority.to_string(),
    };
    format!("{scheme}://{authority}{path}{cut}")
}

/// Why an S3 endpoint URL cannot be used, if it cannot: one carrying user info or a query
/// string (a credential pasted into it would be sent and logged; credentials come from the
/// environment), or one without an `http(s)://` scheme.
pub fn endpoint_problem(endpoint: &str) -> Option<&'static str> {
    let lower = endpoint.trim().to_ascii_lowercase();
    let Some(rest) = lower
        .strip_prefix("https://")
        .or_else(|| lower.strip_prefix("http://"))
    else {
        return Some("must be an http:// or https:// URL");
    };
    if carries_credentials(rest) {
        return Some(
            "user info, query strings and fragments are refused: credentials come from the \
             environment only (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)",
        );
    }
    None
}

/// Parses a location string: `file:///abs`, `s3://bucket/key`, `s3a://bucket/key`, or a local
/// path (absolute, or relative to the current directory).
///
/// A URL carrying user info (`s3://KEY:SECRET@bucket/`) or a query string is refused, and the
/// error shows it without them: credentials come from the environment only.
pub(crate) fn parse_location(s: &str) -> Result<Location, StorageError> {
    parse_location_with(s, true)
}

/// [`parse_location`] for an index entry naming an S3 object: `?` and `#` are legal in keys
/// (`s3://b/clip#1.mp4`), so only user info is refused.
pub(crate) fn parse_entry_location(s: &str) -> Result<Location, StorageError> {
    parse_location_with(s, false)
}

/// Whether the part of a URL after `scheme://` has user info, a query or a fragment: where a
/// credential or a signature would sit.
fn carries_credentials(rest: &str) -> bool {
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    authority.contains('@') || rest.contains(['?', '#'])
}

fn parse_location_with(s: &str, refuse_query: bool) -> Result<Location, StorageError> {
    let trimmed = s.trim();
    if scheme_of(trimmed).is_some() {
        let rest = trimmed.split_once("://").map_or("", |(_, r)| r);
        // In an index entry `?` and `#` belong to the key: only user info is refused.
        let refused = if refuse_query {
            carries_credentials(rest)
        } else {
            rest.split('/').next().unwrap_or("").contains('@')
        };
        if refused {
            return Err(StorageError::InvalidLocation {
                location: redact_url(trimmed),
                reason: "user info, query strings and fragments are refused in URLs: \
                         credentials come from the environment only (AWS_ACCESS_KEY_ID, …)"
                    .into(),
            });
        }
    }
    if trimmed.is_empty() {
        return Err(StorageError::InvalidLocation {
            location: s.to_string(),
            reason: "empty location".into(),
        });
    }
    match scheme_of(trimmed).as_deref() {
        None => {
            let p = absolutize(FsPath::new(trimmed))?;
            Ok(Location::Local(p))
        }
        Some("file") => {
            let url = url::Url::parse(trimmed).map_err(|e| StorageError::InvalidLocation {
                location: s.to_string(),
                reason: format!("bad file:// URL: {e}"),
            })?;
            let p = url
                .to_file_path()
                .map_err(|()| StorageError::InvalidLocation {
                    location: s.to_string(),
                    reason: "a file:// URL must be absolute with an empty or 'localhost' host, e.g. file:///data/videos/".into(),
                })?;
            Ok(Location::Local(normalize_abs(&p)))
        }
        Some("s3") | Some("s3a") => {
            let rest = trimmed
                .split_once("://")
                .map(|(_, r)| r)
                .unwrap_or_default();
            let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(StorageError::InvalidLocation {
                    location: s.to_string(),
                    reason: "missing bucket name, expected s3://bucket/prefix/".into(),
                });
            }
            let norm = normalize_rel(key).map_err(|_| StorageError::InvalidLocation {
                location: s.to_string(),
                reason: "'..' goes above the bucket root".into(),
            })?;
            Ok(Location::S3 {
                bucket: bucket.to_string(),
                key: norm,
                trailing_slash: trimmed.ends_with('/'),
            })
        }
        Some(other) => Err(StorageError::UnsupportedScheme {
            location: s.to_string(),
            scheme: other.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_with_credentials_are_refused_without_echoing_them() {
        for url in [
            "s3://AKIDEXAMPLE:s3cr3t@bucket/videos/",
            "s3://token@bucket/",
            "s3://bucket/videos/?X-Amz-Signature=s3cr3t",
            "file://user:s3cr3t@localhost/data/",
            "s3://bucket/videos/#s3cr3t",
        ] {
            let err = parse_location(url).unwrap_err().to_string();
            assert!(err.contains("refused"), "{url}: {err}");
            assert!(
                !err.contains("s3cr3t") && !err.contains("AKIDEXAMPLE"),
                "{url}: {err}"
            );
        }
        assert_eq!(
            redact_url("s3://AK:SK@bucket/a/b.mp4?x=1"),
            "s3://<redacted>@bucket/a/b.mp4?<redacted>"
        );
        assert_eq!(redact_url("s3://bucket/a/"), "s3://bucket/a/");
        assert_eq!(
            redact_url("s3://bucket/a/hash#1.mp4"),
            "s3://bucket/a/hash#<redacted>"
        );
        assert_eq!(redact_url("/local/p@th/x?.mp4"), "/local/p@th/x?.mp4");
        // S3 endpoints: a credential or signed query in them is refused, never used.
        for bad in [
            "http://AKID:SECRET@127.0.0.1:9000",
            "https://minio.internal/?X-Amz-Credential=AKID",
            "https://minio.internal/#x",
            "minio.internal:9000",
        ] {
            assert!(endpoint_problem(bad).is_some(), "{bad}");
        }
        for good in [
            "http://127.0.0.1:9000",
            "https://s3.eu-west-1.amazonaws.com/",
        ] {
            assert_eq!(endpoint_problem(good), None, "{good}");
        }
        // Local paths may hold '@' and '?'.
        assert!(parse_location("/data/user@host/clip?1.mp4").is_ok());
    }

    #[test]
    fn schemes() {
        assert_eq!(scheme_of("s3://b/k").as_deref(), Some("s3"));
        assert_eq!(scheme_of("HTTP://x").as_deref(), Some("http"));
        assert_eq!(scheme_of("/abs/path"), None);
        assert_eq!(scheme_of("rel/a://b"), None);
        assert_eq!(scheme_of("c:/x"), None);
    }

    #[test]
    fn normalise_relative() {
        assert_eq!(normalize_rel("a/./b//c/").unwrap(), "a/b/c");
        assert_eq!(normalize_rel("a/../b").unwrap(), "b");
        assert_eq!(normalize_rel("a/..").unwrap(), "");
        assert_eq!(normalize_rel("../x"), Err(NormError::Escapes));
        assert_eq!(normalize_rel("a/../../x"), Err(NormError::Escapes));
    }

    #[test]
    fn normalise_absolute() {
        assert_eq!(
            normalize_abs(FsPath::new("/a/./b/../c")),
            PathBuf::from("/a/c")
        );
        assert_eq!(normalize_abs(FsPath::new("/../x")), PathBuf::from("/x"));
    }

    #[test]
    fn parse_forms() {
        assert_eq!(
            parse_location("file:///data/v/").unwrap(),
            Location::Local(PathBuf::from("/data/v"))
        );
        assert_eq!(
            parse_location("/data/./v/../w").unwrap(),
            Location::Local(PathBuf::from("/data/w"))
        );
        assert_eq!(
            parse_location("s3://bkt/some/prefix/").unwrap(),
            Location::S3 {
                bucket: "bkt".into(),
                key: "some/prefix".into(),
                trailing_slash: true
            }
        );
        assert_eq!(
            parse_location("s3://bkt").unwrap(),
            Location::S3 {
                bucket: "bkt".into(),
                key: String::new(),
                trailing_slash: false
            }
        );
        assert!(matches!(
            parse_location("gs://bkt/x"),
            Err(StorageError::UnsupportedScheme { .. })
        ));
        assert!(matches!(
            parse_location("s3:///x"),
            Err(StorageError::InvalidLocation { .. })
        ));
        assert!(matches!(
            parse_location("file://host/x"),
            Err(StorageError::InvalidLocation { .. })
        ));
        assert!(matches!(
            parse_location("s3://b/../x"),
            Err(StorageError::InvalidLocation { .. })
        ));
        let rel = parse_location("some/rel").unwrap();
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(rel, Location::Local(normalize_abs(&cwd.join("some/rel"))));
    }
}
