//! Where the decoder's bytes come from: a whole object in memory, or ranged GETs against an
//! object store ([`ObjectSource`]), always read through a [`ReadAhead`] cache.
//!
//! Demuxers read in small pieces (box headers, one sample at a time) and jump around (an MP4
//! whose `moov` index is at the end is read from the end first). A GET per piece would be slow
//! and a download of the whole object wasteful (a 16-frame window of an hour-long video needs a
//! few MB of it), so reads are served from a few cached chunks; a chunk's size doubles while
//! reads are sequential (up to [`ReadAheadOptions::max_chunk`]) and drops back after a jump.
//! Bytes fetched are counted, for the per-clip statistics.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use object_store::path::Path;
use object_store::{GetOptions, ObjectStore, ObjectStoreExt};
use tokio::runtime::Handle;

use crate::error::{IngestError, QuarantineReason};

/// Random access to the bytes of one video.
pub trait ByteSource: Send + Sync {
    /// Total size in bytes.
    fn size(&self) -> u64;
    /// The bytes in `range` (`range.end ≤ size()`), all of them.
    fn read(&self, range: Range<u64>) -> Result<Bytes, IngestError>;
    /// Where the bytes come from, for messages (never includes credentials).
    fn describe(&self) -> String;
    /// Names these exact bytes (location, size and version), where the source can: what a
    /// decoder learns about a video is kept under it for the video's later clips
    /// ([`crate::KnownVideos`]). `None` (the default): nothing is kept.
    fn version(&self) -> Option<String> {
        None
    }
}

impl ByteSource for Bytes {
    fn size(&self) -> u64 {
        self.len() as u64
    }

    fn read(&self, range: Range<u64>) -> Result<Bytes, IngestError> {
        let (start, end) = (to_usize(range.start)?, to_usize(range.end)?);
        if start > end || end > self.len() {
            return Err(IngestError::Fatal(format!(
                "read {start}..{end} past the end of {} bytes",
                self.len()
            )));
        }
        Ok(self.slice(start..end))
    }

    fn describe(&self) -> String {
        format!("{} bytes in memory", self.len())
    }
}

fn to_usize(x: u64) -> Result<usize, IngestError> {
    usize::try_from(x).map_err(|_| IngestError::Fatal(format!("offset {x} exceeds usize")))
}

/// One object in an [`ObjectStore`] (local directory, S3, …), read with ranged GETs.
///
/// Reads block the calling thread on `runtime` (they come from GStreamer's streaming threads,
/// which are not tokio threads); do not call [`ByteSource::read`] from inside the runtime.
pub struct ObjectSource {
    store: Arc<dyn ObjectStore>,
    path: Path,
    size: u64,
    /// The ETag of the version opened, as the store wrote it: every read asks for that
    /// version (`If-Match`) and checks the answer's, so a video replaced while it is read
    /// fails as [`IngestError::Changed`] instead of decoding a splice of two files.
    e_tag: Option<String>,
    runtime: Handle,
    timeout: Duration,
    /// Ends the reads early when the job no longer needs them.
    abandon: Option<Abandon>,
}

/// A failed request: the object is gone ([`QuarantineReason::FetchError`], for good), or the
/// store could not answer ([`IngestError::Unavailable`]: a timeout, the network, a server
/// error after the store's own retries, refused credentials — nothing wrong with the object).
fn store_error(what: String, e: object_store::Error) -> IngestError {
    match e {
        object_store::Error::NotFound { .. } => {
            IngestError::quarantine(QuarantineReason::FetchError, format!("{what}: {e}"))
        }
        object_store::Error::Precondition { .. } => IngestError::Changed(format!("{what}: {e}")),
        other => IngestError::Unavailable(format!("{what}: {other}")),
    }
}

/// An ETag's value without the weak prefix and quotes, so that a proxy that weakens or
/// unquotes ETags does not make every read look like another version (the same rule as
/// `vjepa_storage::normalize_tag`, which names versions in listings).
fn etag_value(e_tag: &str) -> &str {
    let t = e_tag.trim();
    t.strip_prefix("W/").unwrap_or(t).trim_matches('"')
}

/// How long one ranged GET may take by default before it is abandoned
/// ([`ObjectSource::with_timeout`] changes it).
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Set once a job no longer needs the reads it started (a stop, a failure): every read of an
/// [`ObjectSource`] opened with it, in flight or later, ends at once with
/// [`IngestError::Unavailable`]. A store that does not answer would otherwise hold the job's
/// end for each read's timeout, and a clip's further attempts for theirs.
#[derive(Clone, Debug)]
pub struct Abandon(Arc<tokio::sync::watch::Sender<bool>>);

impl Default for Abandon {
    fn default() -> Self {
        Abandon(Arc::new(tokio::sync::watch::Sender::new(false)))
    }
}

impl Abandon {
    /// Not abandoned yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Ends the reads, now and from here on.
    pub fn abandon(&self) {
        self.0.send_replace(true);
    }

    /// Whether [`Self::abandon`] was called.
    pub fn is_abandoned(&self) -> bool {
        *self.0.borrow()
    }

    async fn wait(&self) {
        let mut rx = self.0.subscribe();
        // The sender lives as long as `self`: the wait ends only when abandoned.
        let _ = rx.wait_for(|abandoned| *abandoned).await;
    }
}

/// How a bounded request ended.
enum Waited<T> {
    Done(T),
    TimedOut,
    Abandoned,
}

/// Runs `request` on `runtime` for at most `limit`, or until `abandon` is set.
fn bounded<T>(
    runtime: &Handle,
    limit: Duration,
    abandon: Option<&Abandon>,
    request: impl std::future::Future<Output = T>,
) -> Waited<T> {
    if abandon.is_some_and(Abandon::is_abandoned) {
        return Waited::Abandoned;
    }
    runtime.block_on(async {
        let timed = tokio::time::timeout(limit, request);
        match abandon {
            None => timed.await.map_or(Waited::TimedOut, Waited::Done),
            Some(a) => tokio::select! {
                r = timed => r.map_or(Waited::TimedOut, Waited::Done),
                () = a.wait() => Waited::Abandoned,
            },
        }
    })
}

/// The error of a read the job abandoned.
fn abandoned(what: &str) -> IngestError {
    IngestError::Unavailable(format!("{what}: abandoned (the run is ending)"))
}

impl ObjectSource {
    /// Opens `path` (one HEAD request for its size, bounded by [`DEFAULT_READ_TIMEOUT`]). A
    /// missing or unreadable object is [`QuarantineReason::FetchError`].
    pub fn open(
        store: Arc<dyn ObjectStore>,
        path: Path,
        runtime: Handle,
    ) -> Result<Arc<Self>, IngestError> {
        Self::open_abandonable(store, path, runtime, None)
    }

    /// [`Self::open`], with the HEAD request and every later read ending as soon as `abandon`
    /// is set.
    pub fn open_abandonable(
        store: Arc<dyn ObjectStore>,
        path: Path,
        runtime: Handle,
        abandon: Option<Abandon>,
    ) -> Result<Arc<Self>, IngestError> {
        let head = store.head(&path);
        let meta = match bounded(&runtime, DEFAULT_READ_TIMEOUT, abandon.as_ref(), head) {
            Waited::Done(meta) => meta.map_err(|e| store_error(format!("HEAD {path}"), e))?,
            Waited::TimedOut => {
                return Err(IngestError::Unavailable(format!(
                    "HEAD {path} took longer than {DEFAULT_READ_TIMEOUT:?}"
                )));
            }
            Waited::Abandoned => return Err(abandoned(&format!("HEAD {path}"))),
        };
        Ok(Arc::new(ObjectSource {
            store,
            path,
            size: meta.size,
            e_tag: meta.e_tag,
            runtime,
            timeout: DEFAULT_READ_TIMEOUT,
            abandon,
        }))
    }

    /// A source whose size is already known (from a listing), saving the HEAD request.
    pub fn with_size(
        store: Arc<dyn ObjectStore>,
        path: Path,
        size: u64,
        runtime: Handle,
    ) -> Arc<Self> {
        Arc::new(ObjectSource {
            store,
            path,
            size,
            e_tag: None,
            runtime,
            timeout: DEFAULT_READ_TIMEOUT,
            abandon: None,
        })
    }

    /// The same source with another per-request timeout (a stalled store must not hold a
    /// decoder past its deadline: GStreamer cannot stop a streaming thread stuck in a read).
    pub fn with_timeout(self: Arc<Self>, timeout: Duration) -> Arc<Self> {
        Arc::new(ObjectSource {
            store: Arc::clone(&self.store),
            path: self.path.clone(),
            size: self.size,
            e_tag: self.e_tag.clone(),
            runtime: self.runtime.clone(),
            timeout,
            abandon: self.abandon.clone(),
        })
    }

    /// The ETag of the version opened, as the store gave it; `None` when the store gives
    /// none (reads are then not pinned to a version).
    pub fn e_tag(&self) -> Option<&str> {
        self.e_tag.as_deref()
    }
}

impl ByteSource for ObjectSource {
    fn size(&self) -> u64 {
        self.size
    }

    fn read(&self, range: Range<u64>) -> Result<Bytes, IngestError> {
        if range.start >= range.end {
            return Ok(Bytes::new());
        }
        let want = range.end - range.start;
        let what = || format!("GET {} bytes {}..{}", self.path, range.start, range.end);
        // `If-Match` compares strongly: a weak ETag would never match, so it is only checked
        // in the answer.
        let strong = self
            .e_tag
            .clone()
            .filter(|t| !t.trim_start().starts_with("W/"));
        let options = GetOptions::new()
            .with_range(Some(range.clone()))
            .with_if_match(strong);
        let get = async {
            let got = self.store.get_opts(&self.path, options).await?;
            // A server may ignore `If-Match` on reads (s3s-fs does): the answer's own ETag
            // still tells which version it read.
            if let (Some(want), Some(got_tag)) = (&self.e_tag, &got.meta.e_tag)
                && etag_value(want) != etag_value(got_tag)
            {
                return Err(object_store::Error::Precondition {
                    path: self.path.to_string(),
                    source: format!("opened as ETag {want}, read ETag {got_tag}").into(),
                });
            }
            got.bytes().await
        };
        let bytes = match bounded(&self.runtime, self.timeout, self.abandon.as_ref(), get) {
            Waited::Done(r) => r.map_err(|e| store_error(what(), e))?,
            Waited::TimedOut => {
                return Err(IngestError::Unavailable(format!(
                    "{} took longer than {:?}",
                    what(),
                    self.timeout
                )));
            }
            Waited::Abandoned => return Err(abandoned(&what())),
        };
        if bytes.len() as u64 != want {
            return Err(IngestError::quarantine(
                QuarantineReason::FetchError,
                format!(
                    "GET {} bytes {}..{} returned {} bytes (object changed while reading?)",
                    self.path,
                    range.start,
                    range.end,
                    bytes.len()
                ),
            ));
        }
        Ok(bytes)
    }

    fn describe(&self) -> String {
        format!("{} ({} bytes)", self.path, self.size)
    }

    /// Only a version the store names (its ETag): without one, a replaced video of the same
    /// size would look the same. The store's own name (bucket, root folder) is part of it.
    fn version(&self) -> Option<String> {
        let tag = etag_value(self.e_tag.as_deref()?);
        Some(format!(
            "{}\n{}\n{}\n{tag}",
            self.store, self.path, self.size
        ))
    }
}

/// Chunk sizes and cache bound of a [`ReadAhead`].
#[derive(Clone, Copy, Debug)]
pub struct ReadAheadOptions {
    /// First chunk size, and the size after a jump (default 256 KiB).
    pub min_chunk: u64,
    /// Largest chunk, reached by doubling on sequential reads (default 8 MiB).
    pub max_chunk: u64,
    /// Most bytes kept in cached chunks (default 32 MiB); the oldest chunks go first.
    pub max_cached: u64,
}

impl Default for ReadAheadOptions {
    fn default() -> Self {
        ReadAheadOptions {
            min_chunk: 256 << 10,
            max_chunk: 8 << 20,
            max_cached: 32 << 20,
        }
    }
}

/// Serves small reads from a few large fetched chunks (see the module docs).
pub struct ReadAhead {
    source: Arc<dyn ByteSource>,
    opts: ReadAheadOptions,
    state: Mutex<CacheState>,
    fetched: AtomicU64,
    requests: AtomicU64,
}

struct CacheState {
    /// Cached chunks `(start, bytes)`, oldest first.
    chunks: VecDeque<(u64, Bytes)>,
    cached: u64,
    /// End of the last fetch and the size of the next one.
    last_end: u64,
    next_chunk: u64,
}

impl ReadAhead {
    /// Wraps `source`.
    pub fn new(source: Arc<dyn ByteSource>, opts: ReadAheadOptions) -> Self {
        let min = opts.min_chunk.max(1);
        ReadAhead {
            source,
            opts: ReadAheadOptions {
                min_chunk: min,
                max_chunk: opts.max_chunk.max(min),
                max_cached: opts.max_cached,
            },
            state: Mutex::new(CacheState {
                chunks: VecDeque::new(),
                cached: 0,
                last_end: u64::MAX,
                next_chunk: min,
            }),
            fetched: AtomicU64::new(0),
            requests: AtomicU64::new(0),
        }
    }

    /// Total size of the object.
    pub fn size(&self) -> u64 {
        self.source.size()
    }

    /// Bytes fetched from the source so far.
    pub fn bytes_fetched(&self) -> u64 {
        self.fetched.load(Ordering::Relaxed)
    }

    /// Fetch requests made to the source so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Where the bytes come from.
    pub fn describe(&self) -> String {
        self.source.describe()
    }

    /// The bytes `offset .. offset + len` (shorter only at the end of the object).
    pub fn read_at(&self, offset: u64, len: u64) -> Result<Bytes, IngestError> {
        let size = self.source.size();
        let end = offset.saturating_add(len).min(size);
        if offset >= end {
            return Ok(Bytes::new());
        }
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        // Whole request inside one cached chunk: a zero-copy slice.
        if let Some(b) = st.slice(offset, end) {
            return Ok(b);
        }
        let mut out = BytesMut::with_capacity(usize::try_from(end - offset).unwrap_or(0));
        let mut pos = offset;
        while pos < end {
            if let Some((start, chunk)) = st.covering(pos) {
                let from = (pos - start) as usize;
                let to = (end.min(start + chunk.len() as u64) - start) as usize;
                out.extend_from_slice(&chunk[from..to]);
                pos = start + to as u64;
                continue;
            }
            // Sequential reads grow the chunk; a jump starts small again.
            let chunk_len = if pos == st.last_end {
                let n = st.next_chunk;
                st.next_chunk = (n * 2).min(self.opts.max_chunk);
                n
            } else {
                st.next_chunk = (self.opts.min_chunk * 2).min(self.opts.max_chunk);
                self.opts.min_chunk
            };
            // Never fetch less than the request itself, nor bytes already cached further on.
            let fetch_end = pos
                .saturating_add(chunk_len.max(end - pos))
                .min(size)
                .min(st.next_cached_after(pos).unwrap_or(u64::MAX));
            let bytes = self.source.read(pos..fetch_end)?;
            self.requests.fetch_add(1, Ordering::Relaxed);
            self.fetched.fetch_add(fetch_end - pos, Ordering::Relaxed);
            st.last_end = fetch_end;
            st.insert(pos, bytes, self.opts.max_cached);
        }
        Ok(out.freeze())
    }
}

impl CacheState {
    fn covering(&self, pos: u64) -> Option<(u64, &Bytes)> {
        self.chunks
            .iter()
            .rev()
            .find(|(start, b)| *start <= pos && pos < start + b.len() as u64)
            .map(|(s, b)| (*s, b))
    }

    /// Start of the first cached chunk beginning after `pos`.
    fn next_cached_after(&self, pos: u64) -> Option<u64> {
        self.chunks
            .iter()
            .map(|(start, _)| *start)
            .filter(|&start| start > pos)
            .min()
    }

    fn slice(&self, from: u64, to: u64) -> Option<Bytes> {
        let (start, b) = self.covering(from)?;
        if to > start + b.len() as u64 {
            return None;
        }
        Some(b.slice((from - start) as usize..(to - start) as usize))
    }

    fn insert(&mut self, start: u64, bytes: Bytes, max_cached: u64) {
        self.cached += bytes.len() as u64;
        self.chunks.push_back((start, bytes));
        while self.cached > max_cached && self.chunks.len() > 1 {
            if let Some((_, old)) = self.chunks.pop_front() {
                self.cached -= old.len() as u64;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A runtime for the sources' blocking reads (they must not run inside it).
    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap()
    }

    fn local_store(dir: &tempfile::TempDir) -> Arc<dyn ObjectStore> {
        Arc::new(object_store::local::LocalFileSystem::new_with_prefix(dir.path()).unwrap())
    }

    /// A missing object is gone for good (quarantined); a store that does not answer says
    /// nothing about the object (tried again later, never quarantined for it).
    #[test]
    fn missing_objects_and_unreachable_stores_fail_differently() {
        let runtime = runtime();
        let dir = tempfile::tempdir().unwrap();
        let local = local_store(&dir);
        let missing = ObjectSource::open(local, Path::from("gone.mp4"), runtime.handle().clone());
        assert!(
            matches!(
                missing,
                Err(IngestError::Quarantine {
                    reason: QuarantineReason::FetchError,
                    ..
                })
            ),
            "{:?}",
            missing.err()
        );
        // Nothing listens on port 9 of the loopback: connection refused, no retries.
        let down: Arc<dyn ObjectStore> = Arc::new(
            object_store::aws::AmazonS3Builder::new()
                .with_bucket_name("videos")
                .with_endpoint("http://127.0.0.1:9")
                .with_allow_http(true)
                .with_region("us-east-1")
                .with_access_key_id("test")
                .with_secret_access_key("test")
                .with_retry(object_store::RetryConfig {
                    max_retries: 0,
                    ..Default::default()
                })
                .build()
                .unwrap(),
        );
        let unreachable = ObjectSource::open(down, Path::from("a.mp4"), runtime.handle().clone());
        assert!(
            matches!(unreachable, Err(IngestError::Unavailable(_))),
            "{:?}",
            unreachable.err()
        );
    }

    #[test]
    fn etags_compare_without_quotes_or_the_weak_prefix() {
        assert_eq!(etag_value("\"abc\""), "abc");
        assert_eq!(etag_value("W/\"abc\""), "abc");
        assert_eq!(etag_value("abc"), "abc");
        assert_ne!(etag_value("\"abc\""), etag_value("\"abd\""));
    }

    /// Reads ask for the version opened: once the object is replaced under the same name (by
    /// a rename, as uploads land, or rewritten in place), the next read fails as `Changed`,
    /// never returning bytes of the new file to a demuxer that parsed the old one.
    #[test]
    fn a_replaced_object_is_not_read_as_the_one_opened() {
        let runtime = runtime();
        let dir = tempfile::tempdir().unwrap();
        let local = local_store(&dir);
        let path = Path::from("v.mp4");
        let put = |bytes: &'static [u8]| {
            runtime
                .block_on(local.put(&path, Bytes::from_static(bytes).into()))
                .unwrap();
        };
        put(b"first version");
        let opened =
            ObjectSource::open(local.clone(), path.clone(), runtime.handle().clone()).unwrap();
        assert!(opened.e_tag().is_some());
        assert_eq!(opened.read(0..5).unwrap(), Bytes::from_static(b"first"));
        // Same size, other bytes: only the version tells them apart.
        put(b"other version");
        let err = opened.read(6..13).unwrap_err();
        assert!(matches!(err, IngestError::Changed(_)), "{err:?}");
        assert_eq!(
            err.quarantine_reason(),
            None,
            "nothing is wrong with the video"
        );
        // Opened again, the new version reads.
        let reopened = ObjectSource::open(local, path, runtime.handle().clone()).unwrap();
        assert_ne!(reopened.e_tag(), opened.e_tag());
        assert_eq!(reopened.read(0..5).unwrap(), Bytes::from_static(b"other"));
        // Rewritten in place (a copy into a watched folder): the modification time moves.
        std::thread::sleep(std::time::Duration::from_millis(5));
        std::fs::write(dir.path().join("v.mp4"), b"third version").unwrap();
        let err = reopened.read(0..5).unwrap_err();
        assert!(matches!(err, IngestError::Changed(_)), "{err:?}");
    }

    /// A store that accepts the connection and never answers holds a read for its whole
    /// timeout; once the job abandons its reads, the one in flight and every later one end
    /// at once, as `Unavailable` (nothing said about the object).
    #[test]
    fn abandoned_reads_end_at_once() {
        let runtime = runtime();
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", silent.local_addr().unwrap());
        let store: Arc<dyn ObjectStore> = Arc::new(
            object_store::aws::AmazonS3Builder::new()
                .with_bucket_name("videos")
                .with_endpoint(&endpoint)
                .with_allow_http(true)
                .with_region("us-east-1")
                .with_access_key_id("test")
                .with_secret_access_key("test")
                .build()
                .unwrap(),
        );
        let abandon = Abandon::new();
        let later = abandon.clone();
        let started = std::time::Instant::now();
        let stopper = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            later.abandon();
        });
        let open = ObjectSource::open_abandonable(
            Arc::clone(&store),
            Path::from("a.mp4"),
            runtime.handle().clone(),
            Some(abandon.clone()),
        );
        let took = started.elapsed();
        stopper.join().unwrap();
        match open {
            Err(IngestError::Unavailable(m)) => assert!(m.contains("abandoned"), "{m}"),
            other => panic!("{:?}", other.err()),
        }
        assert!(took >= Duration::from_millis(300), "{took:?}");
        assert!(took < Duration::from_secs(10), "{took:?}");
        // Reads of a source opened earlier end too, without a request.
        let known = ObjectSource {
            store,
            path: Path::from("b.mp4"),
            size: 100,
            e_tag: None,
            runtime: runtime.handle().clone(),
            timeout: DEFAULT_READ_TIMEOUT,
            abandon: Some(abandon),
        };
        let started = std::time::Instant::now();
        assert!(matches!(
            known.read(0..10),
            Err(IngestError::Unavailable(_))
        ));
        assert!(started.elapsed() < Duration::from_secs(1));
        drop(silent);
    }

    fn data(n: usize) -> Bytes {
        (0..n)
            .map(|i| (i * 31 % 251) as u8)
            .collect::<Vec<_>>()
            .into()
    }

    #[test]
    fn reads_are_exact_and_counted() {
        let src = data(10_000);
        let ra = ReadAhead::new(
            Arc::new(src.clone()),
            ReadAheadOptions {
                min_chunk: 1000,
                max_chunk: 4000,
                max_cached: 5000,
            },
        );
        // Sequential small reads: chunks of 1000, 2000, 4000, 4000 (clipped at the end).
        let mut pos = 0u64;
        while pos < 10_000 {
            let b = ra.read_at(pos, 100).unwrap();
            assert_eq!(&b[..], &src[pos as usize..pos as usize + 100]);
            pos += 100;
        }
        assert_eq!(ra.bytes_fetched(), 10_000);
        assert_eq!(ra.requests(), 4);
        // A read across cached chunks and past the end is stitched and clipped.
        let b = ra.read_at(9_950, 500).unwrap();
        assert_eq!(&b[..], &src[9_950..]);
        assert!(ra.read_at(10_000, 5).unwrap().is_empty());
        // A jump back to evicted data fetches a small chunk again.
        let before = ra.bytes_fetched();
        let b = ra.read_at(10, 20).unwrap();
        assert_eq!(&b[..], &src[10..30]);
        assert_eq!(ra.bytes_fetched() - before, 1000);
        // A read larger than a chunk is fetched whole.
        let b = ra.read_at(2000, 6000).unwrap();
        assert_eq!(&b[..], &src[2000..8000]);
    }

    #[test]
    fn cached_bytes_are_not_fetched_again() {
        let src = data(50_000);
        let ra = ReadAhead::new(
            Arc::new(src.clone()),
            ReadAheadOptions {
                min_chunk: 1000,
                max_chunk: 64_000,
                max_cached: 1 << 20,
            },
        );
        // The index at the end first (as for an MP4 with moov last), then the data in order.
        assert_eq!(&ra.read_at(45_000, 5000).unwrap()[..], &src[45_000..]);
        let mut pos = 0;
        while pos < 50_000 {
            assert_eq!(
                &ra.read_at(pos, 700).unwrap()[..],
                &src[pos as usize..(pos + 700).min(50_000) as usize]
            );
            pos += 700;
        }
        assert_eq!(ra.bytes_fetched(), 50_000);
    }

    #[test]
    fn cache_stays_bounded() {
        let src = data(100_000);
        let ra = ReadAhead::new(
            Arc::new(src),
            ReadAheadOptions {
                min_chunk: 1000,
                max_chunk: 8000,
                max_cached: 10_000,
            },
        );
        for pos in (0..100_000).step_by(500) {
            ra.read_at(pos, 500).unwrap();
            let st = ra.state.lock().unwrap();
            assert!(st.cached <= 10_000 + 8000, "cached {}", st.cached);
        }
    }
}
