//! Datasets: which videos a run may read.
//!
//! A dataset spec is either an index file in the official V-JEPA format (CSV, space-separated,
//! no header: `path label`, label optional) or a prefix that is listed. Every index entry is
//! resolved against the dataset's store (the directory holding the index); entries that would
//! leave it are kept in [`Dataset::rejected`] with a reason, never read and never silently
//! dropped, so a bad index cannot make the job read arbitrary files or buckets.

use object_store::path::Path;

use crate::location::{
    Location, normalize_abs, normalize_rel, parse_entry_location, parse_location, scheme_of,
};
use crate::store::Root;
use crate::{S3Settings, StorageError, Store};

/// Reason: the entry resolves outside the dataset store ('..' above the root, an absolute
/// path elsewhere, another bucket or prefix).
pub const REASON_PATH_ESCAPES_STORE: &str = "path_escapes_store";
/// Reason: the entry is a URL whose scheme cannot be read (`http`, `gs`...).
pub const REASON_UNSUPPORTED_SCHEME: &str = "unsupported_scheme";
/// Reason: the entry is not a usable object path (names a directory, control characters...).
pub const REASON_INVALID_PATH: &str = "invalid_path";

/// File extensions (lower-case, no dot) that count as videos when listing a prefix: MP4 and
/// its relatives (phones' `.3gp`), QuickTime, Matroska/WebM, AVI, MPEG transport streams
/// (`.ts`, camcorders' `.mts`/`.m2ts`) and program streams (`.mpg`).
pub const VIDEO_EXTENSIONS: &[&str] = &[
    "mp4", "m4v", "mov", "mkv", "webm", "avi", "3gp", "ts", "mts", "m2ts", "mpg", "mpeg",
];

/// Why a dataset yielded no video although its index had entries: the first refused entry
/// and the rule it broke, for the error a user sees (`None` when nothing was refused).
pub fn why_all_refused<'a>(
    refused: impl IntoIterator<Item = (&'a str, &'a str, &'a str)>,
) -> Option<String> {
    let mut n = 0usize;
    let mut first = None;
    for (entry, reason, detail) in refused {
        n += 1;
        first.get_or_insert((entry, reason, detail));
    }
    let (entry, reason, detail) = first?;
    let rule = if reason == REASON_PATH_ESCAPES_STORE {
        "; an index entry must be a path relative to the index's folder, or an absolute path \
         or URL inside the dataset's store (the index's folder, or `data.index_root` / \
         `--index-root`: set it to a folder or bucket prefix holding the videos)"
    } else {
        ""
    };
    Some(format!(
        "all {n} index entries were refused, e.g. `{entry}`: {reason} ({detail}){rule}"
    ))
}

/// One readable video of a dataset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DatasetEntry {
    /// Path relative to the dataset's store.
    pub rel: String,
    /// The index's label column, when present (unused by pretraining, kept for probes).
    pub label: Option<String>,
    /// The object version listed ([`crate::store::object_tag`]); `None` for index entries,
    /// which are read from the index without asking the store about each.
    pub tag: Option<String>,
}

/// An index entry that was refused, with a stable reason word for quarantine records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejected {
    /// The entry's path as written in the index.
    pub entry: String,
    /// Stable short word: [`REASON_PATH_ESCAPES_STORE`], [`REASON_UNSUPPORTED_SCHEME`] or
    /// [`REASON_INVALID_PATH`].
    pub reason: String,
    /// Human-readable explanation (includes the index line number when there is one).
    pub detail: String,
}

/// An opened dataset: its store, the entries to read and the entries refused.
#[derive(Clone, Debug)]
pub struct Dataset {
    /// The spec string the dataset was opened from.
    pub name: String,
    /// The store entries are relative to (the index's directory, or the listed prefix).
    pub store: Store,
    /// Entries to read, in index order (or sorted by path for a listing).
    pub entries: Vec<DatasetEntry>,
    /// Entries refused, in index order.
    pub rejected: Vec<Rejected>,
}

impl Dataset {
    /// Full URI of an entry, for records and logs.
    pub fn uri_of(&self, entry: &DatasetEntry) -> String {
        self.store.uri_of(&entry.rel)
    }
}

/// Opens an index or lists a prefix, with credentials from the environment.
///
/// A spec ending in '/' (or naming a local directory, or a bare `s3://bucket`) is listed:
/// only files with [`VIDEO_EXTENSIONS`] become entries. Anything else is read as an index;
/// the dataset store is the directory (prefix) containing it. Relative entries (after
/// normalising '.' and '..') and absolute paths or URLs inside that store are accepted; entries
/// escaping it go to [`Dataset::rejected`].
pub async fn open(spec: &str, s3: &S3Settings) -> Result<Dataset, StorageError> {
    open_impl(spec, s3, None, None).await
}

/// Like [`open`], with the store an index's entries resolve in set to `index_root` (a
/// directory or bucket prefix holding the videos) instead of the index's own folder: an
/// official index whose absolute paths point beside it (`/data/lists/train.csv` listing
/// `/data/videos/…`) reads with `index_root = /data/`. Relative entries still count from the
/// index's folder, and every entry must lie inside the root. Listed prefixes ignore it.
pub async fn open_in(
    spec: &str,
    index_root: Option<&str>,
    s3: &S3Settings,
) -> Result<Dataset, StorageError> {
    open_impl(spec, s3, None, index_root).await
}

/// Like [`open`], with explicit S3 credentials (tests and tools that must not touch the
/// process environment).
pub async fn open_with_credentials(
    spec: &str,
    s3: &S3Settings,
    key_id: &str,
    secret: &str,
) -> Result<Dataset, StorageError> {
    open_impl(spec, s3, Some((key_id, secret)), None).await
}

async fn open_impl(
    spec: &str,
    s3: &S3Settings,
    creds: Option<(&str, &str)>,
    index_root: Option<&str>,
) -> Result<Dataset, StorageError> {
    let parsed = parse_location(spec)?;
    let is_prefix = spec.trim_end().ends_with('/')
        || match &parsed {
            Location::Local(p) => p.is_dir(),
            Location::S3 { key, .. } => key.is_empty(),
        };
    let dataset = if is_prefix {
        let store = Store::open_location(spec, parsed, s3, false, creds)?;
        let listed = store.list().await?;
        let mut entries = Vec::new();
        let mut ignored = 0usize;
        for obj in listed {
            if is_video_path(&obj.path) {
                entries.push(DatasetEntry {
                    rel: obj.path,
                    label: None,
                    tag: obj.tag,
                });
            } else {
                ignored += 1;
                tracing::debug!(uri = %store.uri_of(&obj.path), "not a video extension; ignored");
            }
        }
        if ignored > 0 {
            tracing::info!(spec, ignored, "listed prefix: non-video objects ignored");
        }
        Dataset {
            name: spec.to_string(),
            store,
            entries,
            rejected: Vec::new(),
        }
    } else {
        let (index_store, index_name) = Store::open_parent_of(spec, s3, creds)?;
        let bytes = index_store.get(&index_name).await.map_err(|e| match e {
            StorageError::NotFound { uri } => StorageError::IndexNotFound { uri },
            other => other,
        })?;
        let text = std::str::from_utf8(&bytes).map_err(|e| StorageError::IndexNotText {
            uri: index_store.uri_of(&index_name),
            detail: e.to_string(),
        })?;
        // The store entries resolve in, and where the index's folder is inside it (relative
        // entries count from there; `None`: the folder is outside the root).
        let (store, base) = match index_root {
            None => (index_store.clone(), Some(String::new())),
            Some(root) => {
                let store = Store::open_location(root, parse_location(root)?, s3, false, creds)?;
                let base = folder_in(&store, &index_store);
                (store, base)
            }
        };
        // `path label` lines: a path with a space in it cannot be written, and reads as the
        // part before the space (the official reader would refuse such a line).
        if let Some((line, fields)) = text.lines().enumerate().find_map(|(i, l)| {
            let n = l.split_whitespace().count();
            (n > 2).then_some((i + 1, n))
        }) {
            tracing::warn!(
                index = %index_store.uri_of(&index_name),
                line,
                fields,
                "index line with more than two fields (`path label`): the path is read up to its \
                 first space, the rest ignored"
            );
        }
        let mut entries = Vec::new();
        let mut refused = Vec::new();
        for (line, path, label) in parse_index(text) {
            let relative = scheme_of(&path).is_none() && !path.starts_with('/');
            let resolved = match (&base, relative) {
                (Some(base), true) if !base.is_empty() => {
                    resolve_entry(&store, &format!("{base}/{path}")).map_err(|mut r| {
                        r.entry = path.clone();
                        r
                    })
                }
                (None, true) => Err(rejected(
                    &path,
                    REASON_PATH_ESCAPES_STORE,
                    format!(
                        "relative to the index's folder {}, which is outside the index root {}",
                        index_store.url(),
                        store.url()
                    ),
                )),
                _ => resolve_entry(&store, &path),
            };
            match resolved {
                Ok(rel) => entries.push(DatasetEntry {
                    rel,
                    label,
                    tag: None,
                }),
                Err(mut r) => {
                    r.detail = format!("line {line}: {}", r.detail);
                    tracing::debug!(entry = %r.entry, reason = %r.reason, detail = %r.detail, "index entry rejected");
                    refused.push(r);
                }
            }
        }
        Dataset {
            name: spec.to_string(),
            store,
            entries,
            rejected: refused,
        }
    };
    if !dataset.rejected.is_empty() {
        let examples: Vec<String> = dataset
            .rejected
            .iter()
            .take(3)
            .map(|r| format!("{} ({})", r.entry, r.reason))
            .collect();
        tracing::warn!(
            spec,
            rejected = dataset.rejected.len(),
            examples = %examples.join(", "),
            "dataset entries outside the dataset store were rejected and will not be read"
        );
    }
    tracing::info!(
        spec,
        store = %dataset.store.url(),
        entries = dataset.entries.len(),
        rejected = dataset.rejected.len(),
        "opened dataset"
    );
    Ok(dataset)
}

/// Where `folder` (a store's root) lies inside `root`: its path relative to `root` (`""` when
/// they are the same), or `None` when it is elsewhere.
fn folder_in(root: &Store, folder: &Store) -> Option<String> {
    if root.url() == folder.url() {
        return Some(String::new());
    }
    resolve_entry(root, folder.url().trim_end_matches('/')).ok()
}

/// Parses an index in the official format: one entry per line, space-separated fields, no
/// header; the first field is the path, the second (optional) the label, further fields are
/// ignored. Empty lines are skipped. Returns `(line number from 1, path, label)`.
pub fn parse_index(text: &str) -> Vec<(usize, String, Option<String>)> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    text.lines()
        .enumerate()
        .filter_map(|(i, line)| {
            let mut fields = line.split_whitespace();
            let path = fields.next()?;
            let label = fields.next().map(str::to_string);
            Some((i + 1, path.to_string(), label))
        })
        .collect()
}

/// Whether a path has one of the [`VIDEO_EXTENSIONS`] (case-insensitive).
pub fn is_video_path(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or(path);
    match name.rsplit_once('.') {
        Some((stem, ext)) if !stem.is_empty() => {
            let ext = ext.to_ascii_lowercase();
            VIDEO_EXTENSIONS.contains(&ext.as_str())
        }
        _ => false,
    }
}

fn rejected(entry: &str, reason: &str, detail: String) -> Rejected {
    Rejected {
        // Recorded in the quarantine table and logged: never with user info.
        entry: crate::location::redact_url(entry),
        reason: reason.to_string(),
        detail,
    }
}

/// Checks a normalised relative path is a usable object path.
fn valid_rel(entry: &str, rel: String) -> Result<String, Rejected> {
    if rel.is_empty() {
        return Err(rejected(
            entry,
            REASON_INVALID_PATH,
            "names the store root (a directory), not a file".into(),
        ));
    }
    match Path::parse(&rel) {
        Ok(_) => Ok(rel),
        Err(e) => Err(rejected(entry, REASON_INVALID_PATH, e.to_string())),
    }
}

/// Resolves one index entry against a store: the path relative to the store when the entry
/// lies inside it, else why not.
///
/// Relative entries are normalised ('.', '..'); absolute local paths, `file://` and `s3://`
/// URLs are accepted when they point inside the store's root.
pub fn resolve_entry(store: &Store, entry: &str) -> Result<String, Rejected> {
    match scheme_of(entry).as_deref() {
        Some("s3") | Some("s3a") => {
            let location = match parse_entry_location(entry) {
                Ok(Location::S3 { bucket, key, .. }) => Ok((bucket, key)),
                // Its own reason (user info refused, no bucket, '..' above the root).
                Err(StorageError::InvalidLocation { reason, .. }) => Err(reason),
                Ok(_) | Err(_) => Err("not an S3 object URL".to_string()),
            };
            let (bucket, key) =
                location.map_err(|reason| rejected(entry, REASON_PATH_ESCAPES_STORE, reason))?;
            match store.root() {
                Root::S3 {
                    bucket: sb,
                    prefix: sp,
                } if *sb == bucket => {
                    let rel = if sp.is_empty() {
                        Some(key.as_str())
                    } else if key == *sp {
                        Some("")
                    } else {
                        key.strip_prefix(sp.as_str())
                            .and_then(|r| r.strip_prefix('/'))
                    };
                    match rel {
                        Some(r) => valid_rel(entry, r.to_string()),
                        None => Err(rejected(
                            entry,
                            REASON_PATH_ESCAPES_STORE,
                            format!("outside the dataset store {}", store.url()),
                        )),
                    }
                }
                _ => Err(rejected(
                    entry,
                    REASON_PATH_ESCAPES_STORE,
                    format!(
                        "another store than the dataset's ({}); only entries inside it are read",
                        store.url()
                    ),
                )),
            }
        }
        Some("file") => match parse_location(entry) {
            Ok(Location::Local(p)) => resolve_local_abs(store, entry, &p),
            _ => Err(rejected(
                entry,
                REASON_INVALID_PATH,
                "malformed file:// URL".into(),
            )),
        },
        Some(other) => Err(rejected(
            entry,
            REASON_UNSUPPORTED_SCHEME,
            format!(
                "scheme {other:?} is not readable; use paths relative to the index, or s3:// / file:// inside the dataset store"
            ),
        )),
        None if entry.starts_with('/') => {
            let p = normalize_abs(std::path::Path::new(entry));
            resolve_local_abs(store, entry, &p)
        }
        None => match normalize_rel(entry) {
            Ok(rel) => valid_rel(entry, rel),
            Err(_) => Err(rejected(
                entry,
                REASON_PATH_ESCAPES_STORE,
                format!("'..' goes above the dataset store {}", store.url()),
            )),
        },
    }
}

fn resolve_local_abs(store: &Store, entry: &str, p: &std::path::Path) -> Result<String, Rejected> {
    let Root::Local { canonical, given } = store.root() else {
        return Err(rejected(
            entry,
            REASON_PATH_ESCAPES_STORE,
            format!(
                "local path, but the dataset store is {}; only entries inside it are read",
                store.url()
            ),
        ));
    };
    let inside = p.strip_prefix(canonical).or_else(|_| p.strip_prefix(given));
    match inside {
        Ok(rest) => {
            let mut parts = Vec::new();
            for c in rest.components() {
                match c.as_os_str().to_str() {
                    Some(s) => parts.push(s),
                    None => {
                        return Err(rejected(entry, REASON_INVALID_PATH, "not UTF-8".into()));
                    }
                }
            }
            valid_rel(entry, parts.join("/"))
        }
        Err(_) => Err(rejected(
            entry,
            REASON_PATH_ESCAPES_STORE,
            format!("outside the dataset store {}", store.url()),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_index_fields() {
        let text = "\u{feff}a.mp4 3\n\n  b.mp4\r\nc.mp4 1 extra fields\n   \n/abs/d.mp4 7";
        assert_eq!(
            parse_index(text),
            vec![
                (1, "a.mp4".into(), Some("3".into())),
                (3, "b.mp4".into(), None),
                (4, "c.mp4".into(), Some("1".into())),
                (6, "/abs/d.mp4".into(), Some("7".into())),
            ]
        );
    }

    #[test]
    fn video_extensions() {
        assert!(is_video_path("a/b.MP4"));
        assert!(is_video_path("x.webm"));
        assert!(is_video_path("camcorder/00001.MTS") && is_video_path("phone.3gp"));
        assert!(!is_video_path("x.txt"));
        assert!(!is_video_path("mp4"));
        assert!(!is_video_path(".mp4"));
        assert!(!is_video_path("dir.mp4/readme"));
    }

    #[test]
    fn resolve_against_s3_store() {
        let store = Store::open_with_credentials(
            "s3://bkt/data/",
            &S3Settings {
                endpoint: Some("https://example.invalid".into()),
                ..Default::default()
            },
            "AK",
            "SK",
        )
        .unwrap();
        assert_eq!(resolve_entry(&store, "v/a.mp4").unwrap(), "v/a.mp4");
        assert_eq!(
            resolve_entry(&store, "s3://bkt/data/v/a.mp4").unwrap(),
            "v/a.mp4"
        );
        let r = resolve_entry(&store, "s3://bkt/database/a.mp4").unwrap_err();
        assert_eq!(r.reason, REASON_PATH_ESCAPES_STORE);
        let r = resolve_entry(&store, "s3://other/data/a.mp4").unwrap_err();
        assert_eq!(r.reason, REASON_PATH_ESCAPES_STORE);
        let r = resolve_entry(&store, "/data/a.mp4").unwrap_err();
        assert_eq!(r.reason, REASON_PATH_ESCAPES_STORE);
        let r = resolve_entry(&store, "https://x/a.mp4").unwrap_err();
        assert_eq!(r.reason, REASON_UNSUPPORTED_SCHEME);
        let r = resolve_entry(&store, "s3://bkt/data/").unwrap_err();
        assert_eq!(r.reason, REASON_INVALID_PATH);
        // '?' and '#' are legal in keys; user info never is.
        assert_eq!(
            resolve_entry(&store, "s3://bkt/data/v/clip#1?.mp4").unwrap(),
            "v/clip#1?.mp4"
        );
        let r = resolve_entry(&store, "s3://AK:SK@bkt/data/v/a.mp4").unwrap_err();
        assert!(r.detail.contains("user info"), "{}", r.detail);
        assert!(
            !r.entry.contains("SK") && !r.detail.contains("SK@"),
            "{r:?}"
        );
    }
}
