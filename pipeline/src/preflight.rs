//! `vjepa check-config`'s look at the locations a config names, with the environment it runs
//! in: a deployment (systemd unit, Kubernetes pod) runs it before the job, so a missing
//! credential or a mistyped local path is refused there, naming the key, and not hours later.
//!
//! [`check_locations`] makes no request: S3 locations are opened as the job would open them
//! (which checks the endpoint settings and that credentials are present), local ones are
//! checked on disk. [`reach_locations`] then makes one read request per object-store
//! location, so a missing bucket, a missing index file or credentials the store refuses are
//! found before the job starts, too.

use std::path::Path;

use vjepa_storage::{S3Settings, Store};

use crate::config::JobConfig;

/// A location that the job could not use.
#[derive(Debug, thiserror::Error)]
#[error("{key} ({location}): {reason}")]
pub struct LocationError {
    /// The config key, e.g. `data.datasets[1]`.
    pub key: String,
    /// The location as written in the config (object-store URLs never carry secrets).
    pub location: String,
    pub reason: String,
    /// The store could not be reached or did not answer in time: worth trying again later,
    /// unlike a location that is wrong.
    pub retryable: bool,
}

impl LocationError {
    /// Makes this key's errors at `location` from a reason (each check's `err`).
    fn maker<'a>(key: &'a str, location: &'a str) -> impl Fn(String) -> LocationError + 'a {
        move |reason| LocationError {
            key: key.to_string(),
            location: location.to_string(),
            reason,
            retryable: false,
        }
    }
}

/// How one location will be read or written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocationCheck {
    pub key: String,
    pub location: String,
    /// What was found, for the report (`s3 store s3://b/p/`, `local directory`, …).
    pub found: String,
}

/// Checks every dataset, the output location and `meta.read_checkpoint`.
pub fn check_locations(cfg: &JobConfig) -> Result<Vec<LocationCheck>, LocationError> {
    let s3 = cfg.s3_settings();
    let mut checks = Vec::new();
    for (i, spec) in cfg.raw.data.datasets.iter().enumerate() {
        checks.push(check_input(&format!("data.datasets[{i}]"), spec, &s3)?);
    }
    if let Some(path) = &cfg.raw.meta.read_checkpoint {
        checks.push(check_input("meta.read_checkpoint", path, &s3)?);
    }
    if let Some(out) = cfg.output_dir() {
        checks.push(check_output("outputs.dir", out, &s3)?);
    }
    Ok(checks)
}

/// The compute device (`workers.device`), opened as the job opens it: a GPU must be visible to
/// this process. The report says what the job will compute in there.
pub fn check_device(cfg: &JobConfig) -> Result<LocationCheck, LocationError> {
    let key = "workers.device";
    let err = LocationError::maker(key, &cfg.raw.workers.device);
    let device = cfg.device().map_err(|e| err(e.to_string()))?;
    device.open().map_err(|e| err(e.to_string()))?;
    Ok(LocationCheck {
        key: key.to_string(),
        location: device.to_string(),
        found: format!("opened, computing in {:?}", cfg.compute_dtype(device)),
    })
}

/// The GPU attention implementation (`workers.attention`): on a GPU, `cudnn` needs a binary
/// with the `cudnn` feature and a loadable libcudnn 9; says what will run.
pub fn check_attention(cfg: &JobConfig) -> Result<LocationCheck, LocationError> {
    let key = "workers.attention";
    let err = LocationError::maker(key, &cfg.raw.workers.attention);
    let backend = cfg.attention().map_err(|e| err(e.to_string()))?;
    let device = cfg.device().map_err(|e| err(e.to_string()))?;
    let found = if device.is_cuda() {
        vjepa_model::kernels::check_attention_backend(
            backend,
            cfg.compute_dtype(device),
            &cfg.attention_head_dims(),
        )
        .map_err(|e| err(e.to_string()))?
    } else {
        "the CPU kernels (the setting applies on a GPU)".to_string()
    };
    Ok(LocationCheck {
        key: key.to_string(),
        location: backend.as_str().to_string(),
        found,
    })
}

/// The video decoders (`workers.video_decoder`): NVDEC must be registered in this process's
/// GStreamer, which the nvcodec plugin does only where it finds an NVIDIA driver and GPU.
pub fn check_video_decoder(cfg: &JobConfig) -> Result<LocationCheck, LocationError> {
    let key = "workers.video_decoder";
    let err = LocationError::maker(key, &cfg.raw.workers.video_decoder);
    let kind = cfg.video_decoder().map_err(|e| err(e.to_string()))?;
    vjepa_ingest::check_video_decoder(kind).map_err(|e| err(e.to_string()))?;
    let nvdec = vjepa_ingest::nvdec_decoders().map_err(|e| err(e.to_string()))?;
    let found = match kind {
        vjepa_ingest::VideoDecoderKind::Software => "software decoders only".to_string(),
        vjepa_ingest::VideoDecoderKind::Nvdec => format!("NVDEC: {}", nvdec.join(", ")),
    };
    Ok(LocationCheck {
        key: key.to_string(),
        location: kind.to_string(),
        found,
    })
}

fn is_object_url(location: &str) -> bool {
    location.contains("://") && !location.starts_with("file://")
}

fn local_path(location: &str) -> &str {
    location.strip_prefix("file://").unwrap_or(location)
}

/// A dataset (a prefix, or an index file) or a checkpoint to read.
fn check_input(key: &str, location: &str, s3: &S3Settings) -> Result<LocationCheck, LocationError> {
    let err = LocationError::maker(key, location);
    if is_object_url(location) {
        let (dir, _) = object_parts(location);
        let store = Store::open(&dir, s3, false).map_err(|e| err(e.to_string()))?;
        return Ok(LocationCheck {
            key: key.to_string(),
            location: location.to_string(),
            found: format!("object store {}", store.url()),
        });
    }
    let path = Path::new(local_path(location));
    let found = match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => "local directory",
        Ok(_) => "local file",
        Err(e) => return Err(err(format!("cannot read it: {e}"))),
    };
    Ok(LocationCheck {
        key: key.to_string(),
        location: location.to_string(),
        found: found.to_string(),
    })
}

/// An object-store input location as (the store to open, the object in it): a prefix is a
/// store itself (no object); a file lives in its directory's store. `s3://bucket` alone is the
/// bucket's root.
fn object_parts(location: &str) -> (String, Option<String>) {
    let bucket_only = location
        .split_once("://")
        .is_some_and(|(_, rest)| !rest.contains('/'));
    if location.ends_with('/') {
        (location.to_string(), None)
    } else if bucket_only {
        (format!("{location}/"), None)
    } else {
        match location.rfind('/') {
            Some(i) => (
                location[..=i].to_string(),
                Some(location[i + 1..].to_string()),
            ),
            None => (location.to_string(), None),
        }
    }
}

/// Objects a dataset prefix's check looks at for a video: one S3 listing page.
const REACH_PAGE: usize = 1000;

/// [`check_locations`], then one read request to each object-store location with this
/// environment's credentials, each bounded by `timeout`: one listing page of a dataset prefix
/// (a video must be among its objects, unless the page is full of others) and of the output
/// prefix, a HEAD of a file (an index, a checkpoint). Nothing is written. A location the store
/// refuses (no such bucket or object, access denied, a client error such as a wrong region)
/// is an error to fix; one that does not answer, or fails on the server's side, is
/// `retryable`.
pub fn reach_locations(
    cfg: &JobConfig,
    timeout: std::time::Duration,
) -> Result<Vec<LocationCheck>, LocationError> {
    let mut checks = check_locations(cfg)?;
    if !checks.iter().any(|c| is_object_url(&c.location)) {
        return Ok(checks);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| LocationError {
            key: "storage".into(),
            location: String::new(),
            reason: format!("cannot start the I/O runtime: {e}"),
            retryable: true,
        })?;
    let s3 = cfg.s3_settings();
    let reached = checks
        .iter_mut()
        .filter(|c| is_object_url(&c.location))
        .try_for_each(|check| reach(&runtime, check, &s3, timeout));
    // A request abandoned at the timeout (a DNS lookup, say) must not hold the exit.
    runtime.shutdown_background();
    reached.map(|()| checks)
}

/// One location's request (see [`reach_locations`]); adds what was found to `check.found`.
fn reach(
    runtime: &tokio::runtime::Runtime,
    check: &mut LocationCheck,
    s3: &S3Settings,
    timeout: std::time::Duration,
) -> Result<(), LocationError> {
    let err = LocationError::maker(&check.key, &check.location);
    let output = check.key == "outputs.dir";
    let (dir, object) = if output {
        (check.location.clone(), None)
    } else {
        object_parts(&check.location)
    };
    let store = Store::open(&dir, s3, false).map_err(|e| err(e.to_string()))?;
    let asked = runtime.block_on(async {
        tokio::time::timeout(timeout, async {
            match &object {
                Some(name) => store
                    .head(name)
                    .await
                    .map(|o| format!("HEAD: {} bytes", o.size)),
                None if output => store
                    .first_object(|_| true, 1)
                    .await
                    .map(|first| match first {
                        Ok(_) => "listed: not empty".to_string(),
                        Err(_) => "listed: empty".to_string(),
                    }),
                None => store
                    .first_object(vjepa_storage::dataset::is_video_path, REACH_PAGE)
                    .await
                    .map(|first| match first {
                        Ok(video) => format!("listed: a video, {}", video.path),
                        Err(seen) if seen == REACH_PAGE => {
                            format!("listed: no video among the first {seen} objects")
                        }
                        Err(_) => String::new(),
                    }),
            }
        })
        .await
    });
    let found = match asked {
        Ok(Ok(found)) if found.is_empty() => {
            return Err(err("the store lists no video file under this prefix".into()));
        }
        Ok(Ok(found)) => found,
        Ok(Err(e)) if e.is_not_found() => {
            return Err(err(
                "the store has no such object (or no such bucket)".into()
            ));
        }
        Ok(Err(e)) => {
            let refused = e.setup_refused().or_else(|| refused_status(&e));
            return Err(LocationError {
                retryable: refused.is_none(),
                ..err(match refused {
                    Some(why) => why.to_string(),
                    None => format!("could not be reached: {}", store.scrub(&e.to_string())),
                })
            });
        }
        Err(_) => {
            return Err(LocationError {
                retryable: true,
                ..err(format!("no answer within {} s", timeout.as_secs_f64()))
            });
        }
    };
    check.found = format!("{}, reached ({found})", check.found);
    Ok(())
}

/// A refusal the store's error code does not name: a HEAD's answer has no body, and a wrong
/// region comes back as a redirect or a bad request. By HTTP status: access denied, any
/// client error but a timeout (408) or throttling (429), a redirect.
fn refused_status(e: &vjepa_storage::StorageError) -> Option<&'static str> {
    use vjepa_storage::StorageError;
    let detail = match e {
        StorageError::AccessDenied { .. } => {
            return Some("the store refused access (credentials, permissions, clock or token)");
        }
        StorageError::Backend { detail, .. } => detail,
        _ => return None,
    };
    const REFUSED: [(&str, &str); 5] = [
        (
            "400 Bad Request",
            "the store refused the request (400: a wrong region?)",
        ),
        ("401 Unauthorized", "the store refused the credentials"),
        (
            "403 Forbidden",
            "the store refused access (credentials, permissions, clock or token)",
        ),
        (
            "301 Moved Permanently",
            "the bucket is in another region (301)",
        ),
        (
            "307 Temporary Redirect",
            "the bucket is in another region (307)",
        ),
    ];
    REFUSED
        .iter()
        .find(|(status, _)| detail.contains(status))
        .map(|&(_, why)| why)
}

/// The output location: an object-store prefix, or a local directory that exists or can be
/// created under an existing, writable ancestor.
fn check_output(
    key: &str,
    location: &str,
    s3: &S3Settings,
) -> Result<LocationCheck, LocationError> {
    let err = LocationError::maker(key, location);
    if is_object_url(location) {
        let store = Store::open(location, s3, false).map_err(|e| err(e.to_string()))?;
        return Ok(LocationCheck {
            key: key.to_string(),
            location: location.to_string(),
            found: format!("object store {}", store.url()),
        });
    }
    let path = Path::new(local_path(location));
    let mut existing = path;
    loop {
        match std::fs::metadata(existing) {
            Ok(m) if m.is_dir() => break,
            Ok(_) => return Err(err(format!("{} is a file", existing.display()))),
            Err(_) => match existing.parent() {
                Some(p) if !p.as_os_str().is_empty() => existing = p,
                _ => {
                    existing = Path::new(".");
                    break;
                }
            },
        }
    }
    let readonly = std::fs::metadata(existing)
        .map(|m| m.permissions().readonly())
        .unwrap_or(true);
    if readonly {
        return Err(err(format!("{} is not writable", existing.display())));
    }
    let found = if existing == path {
        "local directory".to_string()
    } else {
        format!("local directory, created under {}", existing.display())
    };
    Ok(LocationCheck {
        key: key.to_string(),
        location: location.to_string(),
        found,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const QUICKSTART: &str = include_str!("../../configs/quickstart.yaml");

    fn config(datasets: &[&str], out: &str) -> JobConfig {
        let mut cfg = JobConfig::parse(QUICKSTART).expect("quickstart config parses");
        cfg.raw.data.datasets = datasets.iter().map(|d| d.to_string()).collect();
        cfg.raw.outputs.dir = Some(out.to_string());
        cfg
    }

    #[test]
    fn attention_is_checked_on_a_gpu_only() {
        let mut cfg = config(&[], "out/");
        cfg.raw.workers.attention = "cudnn".into();
        let c = check_attention(&cfg).unwrap();
        assert_eq!(c.location, "cudnn");
        assert!(c.found.contains("applies on a GPU"), "{}", c.found);
        cfg.raw.workers.attention = "fastest".into();
        let e = check_attention(&cfg).unwrap_err();
        assert_eq!(e.key, "workers.attention");
    }

    #[test]
    fn local_locations() {
        let dir = tempfile::tempdir().expect("tempdir");
        let videos = dir.path().join("videos");
        std::fs::create_dir(&videos).expect("mkdir");
        let out = dir.path().join("runs/a");
        let cfg = config(
            &[&format!("{}/", videos.display())],
            &out.display().to_string(),
        );
        let checks = check_locations(&cfg).expect("locations are usable");
        assert_eq!(checks.len(), 2);
        assert_eq!(checks[0].found, "local directory");
        assert!(
            checks[1]
                .found
                .starts_with("local directory, created under")
        );

        let missing = config(&[&format!("{}/nope/", dir.path().display())], "out");
        let e = check_locations(&missing).expect_err("missing dataset");
        assert_eq!(e.key, "data.datasets[0]");
    }

    #[test]
    fn device_is_opened() {
        let cfg = config(&["videos/"], "out");
        let c = check_device(&cfg).expect("the CPU opens");
        assert_eq!(
            (c.key.as_str(), c.location.as_str()),
            ("workers.device", "cpu")
        );
        assert_eq!(c.found, "opened, computing in F32");
    }

    #[test]
    fn video_decoder_is_checked_here() {
        let mut cfg = config(&["videos/"], "out");
        let c = check_video_decoder(&cfg).expect("software decoders are always there");
        assert_eq!(
            (c.location.as_str(), c.found.as_str()),
            ("software", "software decoders only")
        );
        cfg.raw.workers.video_decoder = "nvdec".into();
        let nvdec = vjepa_ingest::nvdec_decoders().expect("GStreamer starts");
        match check_video_decoder(&cfg) {
            Ok(c) => assert!(c.found.contains("nvh264dec"), "{}", c.found),
            Err(e) => {
                // No NVIDIA driver here (CI): refused, naming the key and the plugin.
                assert!(nvdec.is_empty(), "{nvdec:?}");
                assert_eq!(e.key, "workers.video_decoder");
                assert!(e.reason.contains("nvcodec"), "{}", e.reason);
            }
        }
    }
}
