//! The job's clip loader: pick the video for a clip, read it from its object store with ranged
//! reads, decode just the sampled window with GStreamer, and crop/resize/flip/normalise each frame
//! straight into the clip tensor (or, with `data_aug`'s RandAugment, motion shift or random
//! erasing on, hold the decoded RGB frames and augment the clip from them). Bad videos become
//! quarantine records.
//!
//! Every random choice of a clip comes from streams seeded by (seed, global clip number), and
//! the draws made for a clip do not depend on earlier outcomes, so the sequence of clips is the
//! same whichever worker loads it and whichever store (local or S3) holds the bytes.

use std::collections::HashSet;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::runtime::Handle;

use vjepa_ingest::{
    ByteSource, ClipGeometry, ClipTensor, DecodeStats, Decoder, DecoderOptions, FrameSink,
    IngestError, ObjectSource, VideoInfo, YuvFrame,
};
use vjepa_operators::load::ClipLoader;
use vjepa_operators::records::{Clip, ClipRequest, Loaded, Quarantined};

/// Failures that may be the store's before a video is quarantined for them (see
/// `StoreLoader::strikes`).
const STRIKES: u32 = 3;

/// Quarantine reason: the object is larger than `data.filter_long_videos` allows.
pub const REASON_FILE_TOO_LARGE: &str = "file_too_large";
use vjepa_operators::sampler::{Mixing, VersionDraws};
use vjepa_operators::sampling::{ClipSampling, pretrain_indices};
use vjepa_operators::seeding::{Stream, rng_for};
use vjepa_operators::train_augment::TrainAugment;
use vjepa_operators::transform::{self, AugmentConfig, TransformParams};

use crate::catalog::{Catalog, CatalogVersion, Versions, VideoRef};
use crate::telemetry::{Stage, Telemetry};

/// A job-wide stop request with its reason; set by any worker, read by all.
#[derive(Clone, Default)]
pub struct Fatal(Arc<Mutex<Option<String>>>);

impl Fatal {
    /// Records the first fatal reason (later ones are logged only).
    pub fn set(&self, why: String) {
        tracing::error!("{why}");
        if let Ok(mut slot) = self.0.lock()
            && slot.is_none()
        {
            *slot = Some(why);
        }
    }

    /// The reason, if the job must stop.
    pub fn get(&self) -> Option<String> {
        self.0.lock().ok().and_then(|s| s.clone())
    }
}

/// Loader settings taken from the config.
#[derive(Clone, Debug)]
pub struct LoaderSettings {
    pub seed: u64,
    pub sampling: ClipSampling,
    pub clip_duration: Option<f64>,
    pub augment: AugmentConfig,
    /// `data_aug`'s RandAugment, motion shift and random erasing (`None`: all off): clips are
    /// then made from their decoded RGB frames rather than straight from the decoder's.
    pub frame_augment: Option<TrainAugment>,
    pub filter_short_videos: bool,
    pub filter_long_bytes: u64,
    pub max_attempts: usize,
    pub deadline: Duration,
    /// Threads per video decoder (0: the decoder's choice); 1 when several loaders run.
    pub decoder_threads: u32,
    /// How clips are spread over datasets.
    pub mixing: Mixing,
    /// Software decoders, or NVDEC where it takes the stream (`workers.video_decoder`).
    pub video_decoder: vjepa_ingest::VideoDecoderKind,
}

/// One per loader thread: owns a GStreamer decoder and its view of known-bad videos.
pub struct StoreLoader {
    catalog: Arc<Catalog>,
    versions: Arc<Versions>,
    /// The draws of the catalog version last used (versions change rarely).
    draws: Option<(Arc<CatalogVersion>, VersionDraws)>,
    runtime: Handle,
    decoder: Decoder,
    /// Videos this loader found unusable: URI and listed object version.
    known_bad: HashSet<(String, Option<String>)>,
    /// Clips this loader has loaded (the store served them).
    served: u64,
    /// Per video, failures that may have been the store's (it did not answer, or a decode ran
    /// past its deadline), counted only when the store served another clip since the last
    /// one: [`STRIKES`] of them make the video's fault plain (an object the store will not
    /// serve while it serves others, a video that always runs out of time).
    strikes: std::collections::HashMap<String, (u32, u64)>,
    settings: LoaderSettings,
    fatal: Fatal,
    telemetry: Arc<Telemetry>,
    /// Once set, requests end without loading (the job no longer needs them).
    abandon: Option<vjepa_ingest::Abandon>,
}

/// A clip's object-store source that reports each request's latency and bytes to telemetry.
struct TimedSource {
    inner: Arc<ObjectSource>,
    telemetry: Arc<Telemetry>,
}

impl ByteSource for TimedSource {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read(&self, range: Range<u64>) -> Result<bytes::Bytes, IngestError> {
        let start = Instant::now();
        let out = self.inner.read(range);
        let bytes = out.as_ref().map_or(0, |b| b.len() as u64);
        self.telemetry.store_request(start.elapsed(), bytes);
        out
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }

    fn version(&self) -> Option<String> {
        self.inner.version()
    }
}

enum Failure {
    /// The video is unusable: quarantine it.
    Bad { reason: String, detail: String },
    /// The video is fine but filtered out by config (short videos).
    Skip,
    /// The installation is broken: stop the job.
    Fatal(String),
    /// The store could not be read (timeout, network, server error): nothing is known about
    /// the video, so it is neither quarantined nor forgotten; the clip tries another.
    Unavailable(String),
    /// The video was replaced while it was read: the clip tries another; the new version
    /// is drawn like any video.
    Changed(String),
}

impl StoreLoader {
    pub fn new(
        catalog: Arc<Catalog>,
        versions: Arc<Versions>,
        runtime: Handle,
        settings: LoaderSettings,
        fatal: Fatal,
    ) -> Result<Self, IngestError> {
        let decoder = Decoder::new(DecoderOptions {
            deadline: settings.deadline,
            decoder_threads: settings.decoder_threads,
            video_decoder: settings.video_decoder,
            ..DecoderOptions::default()
        })?;
        Ok(StoreLoader {
            catalog,
            versions,
            draws: None,
            runtime,
            decoder,
            known_bad: HashSet::new(),
            served: 0,
            strikes: std::collections::HashMap::new(),
            settings,
            fatal,
            telemetry: Arc::new(Telemetry::new()),
            abandon: None,
        })
    }

    /// Videos known bad before this loader starts (a resumed run's quarantines), as (URI,
    /// object version): drawn, they are passed over without a read, like those it finds bad.
    pub fn with_known_bad<'a>(
        mut self,
        bad: impl IntoIterator<Item = (&'a str, Option<&'a str>)>,
    ) -> Self {
        self.known_bad.extend(
            bad.into_iter()
                .map(|(uri, tag)| (uri.to_string(), tag.map(str::to_string))),
        );
        self
    }

    /// Reports this loader's stages and object-store requests to `telemetry` (the default is
    /// a private, unserved instance).
    pub fn with_telemetry(mut self, telemetry: Arc<Telemetry>) -> Self {
        self.telemetry = telemetry;
        self
    }

    /// Keeps what clips teach about their videos in `known` (shared with the other loaders:
    /// each version of a video is learned once; see [`vjepa_ingest::KnownVideos`]).
    pub fn with_known_videos(mut self, known: Arc<vjepa_ingest::KnownVideos>) -> Self {
        self.decoder = self.decoder.with_known_videos(known);
        self
    }

    /// Ends this loader's work, reads in flight included, once `abandon` is set (see
    /// [`vjepa_ingest::Abandon`]).
    pub fn with_abandon(mut self, abandon: vjepa_ingest::Abandon) -> Self {
        self.abandon = Some(abandon);
        self
    }

    fn abandoned(&self) -> bool {
        self.abandon
            .as_ref()
            .is_some_and(vjepa_ingest::Abandon::is_abandoned)
    }

    fn try_video(
        &mut self,
        v: &VideoRef,
        rng: &mut ChaCha8Rng,
        request: &ClipRequest,
        opened: &mut Option<String>,
    ) -> Result<Clip, Failure> {
        let Some(store) = self.catalog.stores.get(v.dataset) else {
            return Err(Failure::Fatal(format!(
                "video {} names dataset {} of {}",
                v.uri,
                v.dataset,
                self.catalog.stores.len()
            )));
        };
        let fetch_error = |detail: String| Failure::Bad {
            reason: "fetch_error".into(),
            detail: store.scrub(&detail),
        };
        let path = store
            .path_of(&v.rel)
            .map_err(|e| fetch_error(e.to_string()))?;
        let (object_store, _) = store.inner();
        let head = Instant::now();
        let source = ObjectSource::open_abandonable(
            object_store,
            path,
            self.runtime.clone(),
            self.abandon.clone(),
        );
        self.telemetry.store_request(head.elapsed(), 0);
        let source = source.map_err(|e| match e {
            // Its own reason and detail (not "reason: detail" as the detail).
            IngestError::Quarantine { reason, detail } => Failure::Bad {
                reason: reason.as_str().to_string(),
                detail: store.scrub(&detail),
            },
            IngestError::Unavailable(detail) => Failure::Unavailable(store.scrub(&detail)),
            IngestError::Changed(detail) => Failure::Changed(store.scrub(&detail)),
            other => fetch_error(other.to_string()),
        })?;
        // The version every read of this clip is pinned to: the one judged if it fails.
        *opened = source.e_tag().and_then(vjepa_storage::normalize_tag);
        self.telemetry.items(Stage::Fetch, 1);
        if source.size() > self.settings.filter_long_bytes {
            return Err(Failure::Bad {
                reason: REASON_FILE_TOO_LARGE.into(),
                detail: format!(
                    "{} bytes > data.filter_long_videos {}",
                    source.size(),
                    self.settings.filter_long_bytes
                ),
            });
        }
        let settings = self.settings.clone();
        let mut plan = |info: &VideoInfo| -> Planned {
            let mut sampling = settings.sampling;
            if let Some(secs) = settings.clip_duration {
                let step = (secs * info.fps / sampling.frames_per_clip as f64) as usize;
                sampling.frame_step = step.max(1);
            }
            let clip_len = (sampling.frames_per_clip * sampling.frame_step) as u64;
            if settings.filter_short_videos && info.num_frames < clip_len {
                return Planned::TooShort;
            }
            // A zero frame count (unknown duration) decodes from frame 0 and pads.
            let indices = pretrain_indices(info.num_frames.max(1), sampling, rng)
                .unwrap_or_else(|_| vec![0; sampling.frames_per_clip]);
            let (h, w) = (info.height as usize, info.width as usize);
            if settings.frame_augment.is_some() {
                // Drawn from the decoded frames, after the decode.
                return Planned::Decode {
                    indices,
                    params: TransformParams::whole(h, w),
                };
            }
            match transform::sample_params(h, w, &settings.augment, rng) {
                Ok(params) => Planned::Decode { indices, params },
                Err(e) => Planned::Refuse(format!("frame size {w}x{h}: {e}")),
            }
        };
        let source = Arc::new(TimedSource {
            inner: source,
            telemetry: self.telemetry.clone(),
        });
        let (indices, params, data, stats) = match &settings.frame_augment {
            None => decode_planned(
                &mut self.decoder,
                source,
                &mut plan,
                settings.augment.crop_size,
            )?,
            Some(augment) => {
                let mut d = decode_frames(&mut self.decoder, source, &mut plan)?;
                let (h, w) = (d.height, d.width);
                let (data, params) = augment
                    .clip(&mut d.frames, d.indices.len(), h, w, rng)
                    .map_err(|e| Failure::Bad {
                        reason: "decode_error".into(),
                        detail: format!("frame size {w}x{h}: {e}"),
                    })?;
                (d.indices, params, data, d.stats)
            }
        };
        self.telemetry.items(Stage::Decode, 1);
        self.telemetry.items(Stage::Transform, 1);
        Ok(Clip {
            step: request.step,
            slot: request.slot,
            uri: v.uri.clone(),
            frame_indices: indices,
            params,
            data,
            bytes_read: stats.bytes_read,
            decode_s: stats.elapsed.as_secs_f64(),
            nvdec: stats.nvdec,
        })
    }
}

/// What the plan callback decided once the stream's size and rate were known.
enum Planned {
    /// Decode these frames and transform them with these parameters.
    Decode {
        indices: Vec<u64>,
        params: TransformParams,
    },
    /// The video is shorter than a clip and `filter_short_videos` is on.
    TooShort,
    /// The video cannot be transformed (e.g. a frame too small for the crop).
    Refuse(String),
}

/// The spec §1 transform as a [`FrameSink`]: each frame goes straight into the clip tensor.
struct TensorSink<'a> {
    plan: &'a mut dyn FnMut(&VideoInfo) -> Planned,
    crop_size: usize,
    decided: Option<Planned>,
    tensor: Option<ClipTensor>,
    error: Option<IngestError>,
}

impl FrameSink for TensorSink<'_> {
    fn plan(&mut self, info: &VideoInfo) -> Vec<u64> {
        let decided = (self.plan)(info);
        let indices = match &decided {
            Planned::Decode { indices, params } => {
                match ClipTensor::new(geometry(params, self.crop_size), indices.len()) {
                    Ok(t) => {
                        self.tensor = Some(t);
                        indices.clone()
                    }
                    Err(e) => {
                        self.error = Some(e);
                        Vec::new()
                    }
                }
            }
            Planned::TooShort | Planned::Refuse(_) => Vec::new(),
        };
        self.decided = Some(decided);
        indices
    }

    fn frame(&mut self, slot: usize, frame: &YuvFrame<'_>) -> Result<(), IngestError> {
        match self.tensor.as_mut() {
            Some(t) => t.put(slot, frame),
            None => Err(IngestError::Fatal("frame delivered before the plan".into())),
        }
    }

    fn repeat(&mut self, from: usize, to: usize) -> Result<(), IngestError> {
        match self.tensor.as_mut() {
            Some(t) => t.copy_slot(from, to),
            None => Err(IngestError::Fatal("frame delivered before the plan".into())),
        }
    }
}

/// The clip geometry of the spec §1 transform for `params` at output side `crop_size`.
fn geometry(params: &TransformParams, crop_size: usize) -> ClipGeometry {
    ClipGeometry {
        top: params.crop.top,
        left: params.crop.left,
        height: params.crop.height,
        width: params.crop.width,
        size: crop_size,
        flip: params.flip,
        mean: transform::MEAN.map(|m| (255.0 * m) as f32),
        std: transform::STD.map(|s| (255.0 * s) as f32),
    }
}

fn ingest_failure(e: IngestError) -> Failure {
    match e {
        IngestError::Quarantine { reason, detail } => Failure::Bad {
            reason: reason.as_str().to_string(),
            detail,
        },
        IngestError::Fatal(msg) => Failure::Fatal(msg),
        IngestError::Unavailable(msg) => Failure::Unavailable(msg),
        IngestError::Changed(msg) => Failure::Changed(msg),
    }
}

/// Decodes the planned window of `source` into a normalised clip tensor.
fn decode_planned(
    decoder: &mut Decoder,
    source: Arc<dyn ByteSource>,
    plan: &mut dyn FnMut(&VideoInfo) -> Planned,
    crop_size: usize,
) -> Result<(Vec<u64>, TransformParams, Vec<f32>, DecodeStats), Failure> {
    let mut sink = TensorSink {
        plan,
        crop_size,
        decided: None,
        tensor: None,
        error: None,
    };
    let stats = decoder.decode(source, &mut sink).map_err(ingest_failure)?;
    if let Some(e) = sink.error {
        return Err(ingest_failure(e));
    }
    match (sink.decided, sink.tensor) {
        (Some(Planned::Decode { indices, params }), Some(tensor)) => {
            if !tensor.is_complete() {
                return Err(Failure::Fatal(
                    "decoder finished without delivering every planned frame".into(),
                ));
            }
            Ok((indices, params, tensor.into_data(), stats))
        }
        (Some(Planned::TooShort), _) => Err(Failure::Skip),
        (Some(Planned::Refuse(detail)), _) => Err(Failure::Bad {
            reason: "decode_error".into(),
            detail,
        }),
        _ => Err(Failure::Fatal("decoder finished without a plan".into())),
    }
}

/// Most bytes a clip's decoded RGB frames may take on the whole-frame path (16 frames of 8K).
const MAX_CLIP_FRAME_BYTES: usize = 16 * 7680 * 4320 * 3;

/// The planned frames as packed RGB (`data_aug` options that work on whole frames).
struct RgbSink<'a> {
    plan: &'a mut dyn FnMut(&VideoInfo) -> Planned,
    decided: Option<Planned>,
    size: (usize, usize),
    /// `T × H × W × 3`.
    frames: Vec<u8>,
    delivered: Vec<bool>,
}

impl FrameSink for RgbSink<'_> {
    fn plan(&mut self, info: &VideoInfo) -> Vec<u64> {
        let decided = (self.plan)(info);
        let indices = match &decided {
            Planned::Decode { indices, .. } => {
                self.size = (info.height as usize, info.width as usize);
                let bytes = indices
                    .len()
                    .checked_mul(self.size.0)
                    .and_then(|n| n.checked_mul(self.size.1))
                    .and_then(|n| n.checked_mul(3))
                    .filter(|&n| n <= MAX_CLIP_FRAME_BYTES);
                let Some(bytes) = bytes else {
                    // A header claiming frames no clip could hold: refused, not an abort.
                    self.decided = Some(Planned::Refuse(format!(
                        "{} frames of {}x{} are more than the {} MiB a clip's frames may take",
                        indices.len(),
                        info.width,
                        info.height,
                        MAX_CLIP_FRAME_BYTES >> 20
                    )));
                    return Vec::new();
                };
                self.frames = vec![0; bytes];
                self.delivered = vec![false; indices.len()];
                indices.clone()
            }
            Planned::TooShort | Planned::Refuse(_) => Vec::new(),
        };
        self.decided = Some(decided);
        indices
    }

    fn frame(&mut self, slot: usize, frame: &YuvFrame<'_>) -> Result<(), IngestError> {
        let (h, w) = self.size;
        if (frame.height, frame.width) != (h, w) {
            return Err(IngestError::quarantine(
                vjepa_ingest::QuarantineReason::DecodeError,
                format!(
                    "frame size changed mid-stream from {w}x{h} to {}x{}",
                    frame.width, frame.height
                ),
            ));
        }
        let len = h * w * 3;
        let Some(out) = self.frames.get_mut(slot * len..(slot + 1) * len) else {
            return Err(IngestError::Fatal(format!(
                "frame slot {slot} out of range"
            )));
        };
        frame.to_rgb(out)?;
        self.delivered[slot] = true;
        Ok(())
    }

    fn repeat(&mut self, from: usize, to: usize) -> Result<(), IngestError> {
        let len = self.size.0 * self.size.1 * 3;
        if !self.delivered.get(from).copied().unwrap_or(false) || to >= self.delivered.len() {
            return Err(IngestError::Fatal(format!(
                "cannot repeat frame slot {from} into {to}"
            )));
        }
        self.frames
            .copy_within(from * len..(from + 1) * len, to * len);
        self.delivered[to] = true;
        Ok(())
    }
}

/// A clip's planned frames, decoded to packed RGB.
struct DecodedFrames {
    indices: Vec<u64>,
    /// `T × H × W × 3`.
    frames: Vec<u8>,
    height: usize,
    width: usize,
    stats: DecodeStats,
}

/// Decodes the planned window of `source` into packed RGB frames.
fn decode_frames(
    decoder: &mut Decoder,
    source: Arc<dyn ByteSource>,
    plan: &mut dyn FnMut(&VideoInfo) -> Planned,
) -> Result<DecodedFrames, Failure> {
    let mut sink = RgbSink {
        plan,
        decided: None,
        size: (0, 0),
        frames: Vec::new(),
        delivered: Vec::new(),
    };
    let stats = decoder.decode(source, &mut sink).map_err(ingest_failure)?;
    match sink.decided {
        Some(Planned::Decode { indices, .. }) => {
            if !sink.delivered.iter().all(|&d| d) {
                return Err(Failure::Fatal(
                    "decoder finished without delivering every planned frame".into(),
                ));
            }
            Ok(DecodedFrames {
                indices,
                frames: sink.frames,
                height: sink.size.0,
                width: sink.size.1,
                stats,
            })
        }
        Some(Planned::TooShort) => Err(Failure::Skip),
        Some(Planned::Refuse(detail)) => Err(Failure::Bad {
            reason: "decode_error".into(),
            detail,
        }),
        None => Err(Failure::Fatal("decoder finished without a plan".into())),
    }
}

/// Decodes frames `indices` of `source` and applies the spec §1 transform with fixed `params`
/// (crop box, flip) at output side `crop_size`: the normalised `[3, T, S, S]` clip tensor.
///
/// The job draws indices and parameters at random once the stream is known; this entry point
/// is for benchmarks and tools that replay a fixed plan.
pub fn decode_to_tensor(
    decoder: &mut Decoder,
    source: Arc<dyn ByteSource>,
    indices: &[u64],
    params: &TransformParams,
    crop_size: usize,
) -> Result<(Vec<f32>, DecodeStats), IngestError> {
    let mut plan = |_: &VideoInfo| Planned::Decode {
        indices: indices.to_vec(),
        params: *params,
    };
    match decode_planned(decoder, source, &mut plan, crop_size) {
        Ok((_, _, data, stats)) => Ok((data, stats)),
        Err(Failure::Bad { reason, detail }) => Err(IngestError::quarantine(
            vjepa_ingest::QuarantineReason::from_str_opt(&reason)
                .unwrap_or(vjepa_ingest::QuarantineReason::DecodeError),
            detail,
        )),
        Err(Failure::Skip) => Err(IngestError::Fatal("unexpected skip".into())),
        Err(Failure::Fatal(msg)) => Err(IngestError::Fatal(msg)),
        Err(Failure::Unavailable(msg)) => Err(IngestError::Unavailable(msg)),
        Err(Failure::Changed(msg)) => Err(IngestError::Changed(msg)),
    }
}

impl StoreLoader {
    /// The catalog version in effect at `step` and its draws.
    fn draws_at(&mut self, step: u64) -> Result<(Arc<CatalogVersion>, &mut VersionDraws), String> {
        let version = self.versions.at_step(step);
        let stale = self
            .draws
            .as_ref()
            .is_none_or(|(v, _)| !Arc::ptr_eq(v, &version));
        if stale {
            let draws = VersionDraws::new(
                self.settings.seed,
                version.key,
                version.counts.clone(),
                &self.settings.mixing,
            )
            .map_err(|e| format!("catalog version {}: {e}", version.version))?;
            self.draws = Some((version, draws));
        }
        match self.draws.as_mut() {
            Some((v, d)) => Ok((v.clone(), d)),
            None => Err("no catalog version".into()),
        }
    }
}

impl ClipLoader for StoreLoader {
    /// Loads the request's clip, keeping the fetch/decode/transform queue gauges: the request
    /// leaves the fetch queue, is decoded, and its clip waits in the transform queue for the
    /// rest of its batch (the job takes it out when the batch is assembled).
    fn load(&mut self, request: ClipRequest) -> Vec<Loaded> {
        self.telemetry.queue_add(Stage::Fetch, -1);
        self.telemetry.queue_add(Stage::Decode, 1);
        let out = self.load_request(request);
        self.telemetry.queue_add(Stage::Decode, -1);
        let clips = out.iter().filter(|l| matches!(l, Loaded::Clip(_))).count();
        self.telemetry.queue_add(Stage::Transform, clips as i64);
        out
    }
}

impl StoreLoader {
    /// Counts a failure of `uri` that may be the store's; true once it reached [`STRIKES`].
    /// A failure counts only when the store served another clip since this video's last
    /// one, so a store that serves nothing (an outage) never convicts a video.
    fn strike(&mut self, uri: &str) -> bool {
        let served = self.served;
        let (count, at) = self.strikes.entry(uri.to_string()).or_insert((0, served));
        if *count == 0 || served > *at {
            *count += 1;
            *at = served;
        }
        *count >= STRIKES
    }

    fn load_request(&mut self, request: ClipRequest) -> Vec<Loaded> {
        let mut out = Vec::new();
        if self.abandoned() {
            return out;
        }
        let (version, first) = match self.draws_at(request.step) {
            Ok((version, draws)) => {
                let first = draws.video_for(request.global_index);
                (version, first)
            }
            Err(why) => {
                self.fatal.set(why);
                return out;
            }
        };
        // Replacement choices and per-attempt seeds are drawn for every attempt whatever
        // happened before, so outcomes never shift the random stream.
        let mut draws = rng_for(self.settings.seed, Stream::Clip, request.global_index);
        // Attempts the store could not serve, and its last message.
        let mut unavailable: Option<(usize, String)> = None;
        // Attempts whose video was replaced while it was read, and the last message.
        let mut changed: Option<(usize, String)> = None;
        for attempt in 0..self.settings.max_attempts {
            let video = if attempt == 0 {
                first
            } else {
                match self.draws.as_ref() {
                    Some((_, d)) => d.replacement(&mut draws),
                    None => first,
                }
            };
            let mut rng = ChaCha8Rng::seed_from_u64(draws.next_u64());
            let Some(v) = version.videos.get(video) else {
                self.fatal.set(format!(
                    "catalog version {} has {} videos, drew number {video}",
                    version.version,
                    version.videos.len()
                ));
                return out;
            };
            let listed = (v.uri.clone(), v.tag.clone());
            if self.known_bad.contains(&listed) {
                continue;
            }
            let mut opened = None;
            let tried = self.try_video(v, &mut rng, &request, &mut opened);
            // The version found bad: the one read, else the one listed; none where the listing
            // knows no versions (the quarantine then covers the name, and says so).
            let object_tag = v.tag.as_ref().and(opened.or_else(|| v.tag.clone()));
            // A failure of an abandoned read says nothing about the video.
            if self.abandoned() {
                return out;
            }
            match tried {
                Ok(clip) => {
                    tracing::trace!(
                        step = request.step,
                        slot = request.slot,
                        uri = %clip.uri,
                        catalog_version = version.version,
                        "clip loaded"
                    );
                    self.served += 1;
                    self.strikes.remove(&v.uri);
                    out.push(Loaded::Clip(clip));
                    return out;
                }
                // A decode that ran out of time may have waited on a stalled store: the video
                // is only at fault once it also times out while the store serves other clips.
                Err(Failure::Bad { reason, detail })
                    if reason == vjepa_ingest::QuarantineReason::Timeout.as_str()
                        && !self.strike(&v.uri) =>
                {
                    tracing::warn!(uri = %v.uri, %detail, "decode ran out of time; the clip tries another video, this one stays for now");
                }
                Err(Failure::Skip) => {
                    self.known_bad.insert(listed);
                }
                Err(Failure::Changed(detail)) => {
                    self.telemetry.store_changed();
                    tracing::info!(uri = %v.uri, %detail, "video replaced while it was read; the clip tries another video, the new version stays in the catalog");
                    changed = Some((changed.map_or(0, |(n, _)| n) + 1, detail));
                }
                Err(Failure::Bad { reason, detail }) => {
                    self.known_bad.insert(listed);
                    let uri = v.uri.clone();
                    // Each decode thread that meets the video reports it; the job logs it
                    // once, where the reports are deduplicated.
                    tracing::debug!(%uri, %reason, %detail, "video failed, reported for quarantine");
                    out.push(Loaded::Bad(Quarantined {
                        uri,
                        reason,
                        detail,
                        time_unix_us: crate::now_unix_us(),
                        object_tag,
                    }));
                }
                Err(Failure::Fatal(msg)) => {
                    self.fatal.set(format!("decoder failure: {msg}"));
                    return out;
                }
                Err(Failure::Unavailable(detail)) => {
                    self.telemetry.store_unavailable();
                    if self.strike(&v.uri) {
                        // Refused again and again while other objects are served: the
                        // object's fault (permissions, a broken key), not the store's.
                        self.known_bad.insert(listed);
                        out.push(Loaded::Bad(Quarantined {
                            uri: v.uri.clone(),
                            reason: "fetch_error".into(),
                            detail: format!(
                                "not served in {STRIKES} tries while the store served other videos; last: {detail}"
                            ),
                            time_unix_us: crate::now_unix_us(),
                            object_tag,
                        }));
                        continue;
                    }
                    tracing::warn!(
                        uri = %v.uri,
                        %detail,
                        "store could not be read; the clip tries another video, this one stays"
                    );
                    unavailable = Some((unavailable.map_or(0, |(n, _)| n) + 1, detail));
                }
            }
        }
        let bad = version
            .videos
            .iter()
            .filter(|v| self.known_bad.contains(&(v.uri.clone(), v.tag.clone())))
            .count();
        let why = if let Some((n, last)) = unavailable {
            format!(
                "the store could not be read ({n} of the attempts; last: {last}); the videos \
                 were not quarantined: rerun the same command once the store is back to resume"
            )
        } else if let Some((n, last)) = changed {
            format!(
                "{n} of the attempts found their video replaced while it was read (last: {last}); \
                 nothing was quarantined. If the videos are not being rewritten, the store's \
                 ETags change between requests (a proxy rewriting them?)"
            )
        } else if bad == version.videos.len() {
            format!(
                "every video of the catalog ({bad}) failed: see the quarantine table for the reasons"
            )
        } else {
            format!(
                "{bad} of the catalog's {} videos failed here; is the corpus mostly corrupt?",
                version.videos.len()
            )
        };
        self.fatal.set(format!(
            "no usable video for clip {} after {} attempts (workers.max_attempts_per_clip): {why}",
            request.global_index, self.settings.max_attempts
        ));
        out
    }
}

/// Stacks clips (`[3, t, s, s]` values each) into one `[B, 3, t, s, s]` f32 CPU tensor: the
/// model's [`vjepa_model::ClipStager`] on the CPU, naming the clip that does not fit.
pub(crate) fn stack_clips(
    clips: &[Clip],
    (t, s): (usize, usize),
) -> anyhow::Result<vjepa_model::Tensor> {
    let data: Vec<&[f32]> = clips.iter().map(|c| c.data.as_slice()).collect();
    vjepa_model::ClipStager::new(&vjepa_model::Device::Cpu)
        .stage(&data, (3, t, s, s), vjepa_model::DType::F32)
        .map_err(
            |e| match clips.iter().find(|c| c.data.len() != 3 * t * s * s) {
                Some(c) => anyhow::anyhow!("clip {}: {e}", c.uri),
                None => e.into(),
            },
        )
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use vjepa_ingest::{SampleCodec, SampleSpec, make_sample};
    use vjepa_operators::transform::CropBox;

    /// The fast path (convert only the source pixels the output reads, straight into the clip
    /// tensor) equals the spec's order: native RGB frames, then crop/resize/flip/normalise.
    #[test]
    fn tensor_path_matches_rgb_reference_transform() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spec = SampleSpec {
            name: "clip".into(),
            width: 176,
            height: 144,
            frames: 90,
            fps: 30,
            codec: SampleCodec::H264Mp4,
            pattern: "smpte horizontal-speed=3".into(),
            bitrate_kbps: None,
            keyframe_interval: None,
        };
        let data: Bytes = std::fs::read(make_sample(dir.path(), &spec).expect("sample"))
            .expect("read")
            .into();
        let mut dec = Decoder::new(DecoderOptions::default()).expect("decoder");
        let indices: Vec<u64> = (0..16)
            .map(|i| 20 + (i * 64) / 15)
            .map(|x| x.min(83))
            .collect();
        let want = indices.clone();
        let rgb = dec
            .decode_clip(data.clone(), &mut |_| want.clone())
            .expect("rgb decode");
        for (crop, flip, size) in [
            (
                CropBox {
                    top: 0,
                    left: 0,
                    height: 144,
                    width: 176,
                },
                false,
                96,
            ),
            (
                CropBox {
                    top: 13,
                    left: 40,
                    height: 101,
                    width: 77,
                },
                true,
                64,
            ),
            (
                CropBox {
                    top: 1,
                    left: 3,
                    height: 50,
                    width: 60,
                },
                false,
                112,
            ),
            // Over 2x down: only the columns the output reads are converted.
            (
                CropBox {
                    top: 5,
                    left: 7,
                    height: 130,
                    width: 161,
                },
                true,
                36,
            ),
        ] {
            let params = TransformParams { crop, flip };
            let reference = transform::apply(&rgb.frames, indices.len(), 144, 176, &params, size)
                .expect("apply");
            let (ours, stats) =
                decode_to_tensor(&mut dec, Arc::new(data.clone()), &indices, &params, size)
                    .expect("tensor decode");
            assert_eq!(ours.len(), reference.len());
            assert_eq!(stats.object_bytes, data.len() as u64);
            // Same pixels, same float operations in the same order: equal up to float noise.
            let worst = ours
                .iter()
                .zip(&reference)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            let mse = ours
                .iter()
                .zip(&reference)
                .map(|(a, b)| f64::from(a - b).powi(2))
                .sum::<f64>()
                / ours.len() as f64;
            println!(
                "crop {crop:?} flip {flip} size {size}: max diff {worst:.4}, rms {:.5}",
                mse.sqrt()
            );
            assert!(worst < 1e-5, "max difference {worst} in normalised units");
        }
    }
}
