//! The job's clip loader: pick the video for a clip, fetch it from its object store, decode the
//! sampled frames with GStreamer, crop/flip/normalise. Bad videos become quarantine records.
//!
//! Every random choice of a clip comes from streams seeded by (seed, global clip number), and
//! the draws made for a clip do not depend on earlier outcomes, so the sequence of clips is the
//! same whichever worker loads it and whichever store (local or S3) holds the bytes.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::runtime::Handle;

use vjepa_ingest::{Decoder, DecoderOptions, IngestError, VideoInfo};
use vjepa_operators::load::ClipLoader;
use vjepa_operators::records::{Clip, ClipRequest, Loaded, Quarantined};
use vjepa_operators::sampler::VideoOrder;
use vjepa_operators::sampling::{ClipSampling, pretrain_indices};
use vjepa_operators::seeding::{Stream, rng_for};
use vjepa_operators::transform::{self, AugmentConfig};

use crate::catalog::Catalog;

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
    pub filter_short_videos: bool,
    pub filter_long_bytes: u64,
    pub max_attempts: usize,
    pub deadline: Duration,
}

/// One per worker: owns a GStreamer decoder and the worker's view of known-bad videos.
pub struct StoreLoader {
    catalog: Arc<Catalog>,
    runtime: Handle,
    decoder: Decoder,
    order: VideoOrder,
    known_bad: HashSet<usize>,
    settings: LoaderSettings,
    fatal: Fatal,
}

enum Failure {
    /// The video is unusable: quarantine it.
    Bad { reason: String, detail: String },
    /// The video is fine but filtered out by config (short videos).
    Skip,
    /// The installation is broken: stop the job.
    Fatal(String),
}

impl StoreLoader {
    pub fn new(
        catalog: Arc<Catalog>,
        runtime: Handle,
        settings: LoaderSettings,
        fatal: Fatal,
    ) -> Result<Self, IngestError> {
        let decoder = Decoder::new(DecoderOptions {
            deadline: settings.deadline,
            ..DecoderOptions::default()
        })?;
        let order = VideoOrder::new(catalog.videos.len(), settings.seed);
        Ok(StoreLoader {
            catalog,
            runtime,
            decoder,
            order,
            known_bad: HashSet::new(),
            settings,
            fatal,
        })
    }

    fn try_video(
        &mut self,
        video: usize,
        rng: &mut ChaCha8Rng,
        request: &ClipRequest,
    ) -> Result<Clip, Failure> {
        let v = &self.catalog.videos[video];
        let store = &self.catalog.stores[v.dataset];
        let meta = self
            .runtime
            .block_on(store.head(&v.rel))
            .map_err(|e| Failure::Bad {
                reason: "fetch_error".into(),
                detail: e.to_string(),
            })?;
        if meta.size as f64 > self.settings.filter_long_bytes as f64 {
            return Err(Failure::Bad {
                reason: "file_too_large".into(),
                detail: format!(
                    "{} bytes > data.filter_long_videos {}",
                    meta.size, self.settings.filter_long_bytes
                ),
            });
        }
        let bytes = self
            .runtime
            .block_on(store.get(&v.rel))
            .map_err(|e| Failure::Bad {
                reason: "fetch_error".into(),
                detail: e.to_string(),
            })?;
        let settings = self.settings.clone();
        let mut too_short = false;
        let mut choose = |info: &VideoInfo| -> Vec<u64> {
            let mut sampling = settings.sampling;
            if let Some(secs) = settings.clip_duration {
                let step = (secs * info.fps / sampling.frames_per_clip as f64) as usize;
                sampling.frame_step = step.max(1);
            }
            let clip_len = (sampling.frames_per_clip * sampling.frame_step) as u64;
            if settings.filter_short_videos && info.num_frames < clip_len {
                too_short = true;
                return vec![0];
            }
            // A zero frame count (unknown duration) decodes from frame 0 and pads.
            pretrain_indices(info.num_frames.max(1), sampling, rng)
                .unwrap_or_else(|_| vec![0; sampling.frames_per_clip])
        };
        let decoded = self
            .decoder
            .decode_clip(bytes, &mut choose)
            .map_err(|e| match e {
                IngestError::Quarantine { reason, detail } => Failure::Bad {
                    reason: reason.as_str().to_string(),
                    detail,
                },
                IngestError::Fatal(msg) => Failure::Fatal(msg),
            })?;
        if too_short {
            return Err(Failure::Skip);
        }
        let (h, w) = (decoded.height as usize, decoded.width as usize);
        let t = decoded.indices.len();
        let params = transform::sample_params(h, w, &self.settings.augment, rng).map_err(|e| {
            Failure::Bad {
                reason: "decode_error".into(),
                detail: format!("frame size {w}x{h}: {e}"),
            }
        })?;
        let data = transform::apply(
            &decoded.frames,
            t,
            h,
            w,
            &params,
            self.settings.augment.crop_size,
        )
        .map_err(|e| Failure::Bad {
            reason: "decode_error".into(),
            detail: format!("transform: {e}"),
        })?;
        Ok(Clip {
            step: request.step,
            slot: request.slot,
            uri: v.uri.clone(),
            frame_indices: decoded.indices,
            params,
            data,
        })
    }
}

impl ClipLoader for StoreLoader {
    fn load(&mut self, request: ClipRequest) -> Vec<Loaded> {
        let mut out = Vec::new();
        let n = self.order.len();
        if n == 0 {
            self.fatal
                .set("the catalog is empty: no videos to train on".into());
            return out;
        }
        // Replacement choices and per-attempt seeds are drawn for every attempt whatever
        // happened before, so outcomes never shift the random stream.
        let mut draws = rng_for(self.settings.seed, Stream::Clip, request.global_index);
        for attempt in 0..self.settings.max_attempts {
            let video = if attempt == 0 {
                self.order.video_for(request.global_index).unwrap_or(0)
            } else {
                draws.random_range(0..n)
            };
            let mut rng = ChaCha8Rng::seed_from_u64(draws.next_u64());
            if self.known_bad.contains(&video) {
                continue;
            }
            match self.try_video(video, &mut rng, &request) {
                Ok(clip) => {
                    out.push(Loaded::Clip(clip));
                    return out;
                }
                Err(Failure::Skip) => {
                    self.known_bad.insert(video);
                }
                Err(Failure::Bad { reason, detail }) => {
                    self.known_bad.insert(video);
                    let uri = self.catalog.videos[video].uri.clone();
                    tracing::warn!(%uri, %reason, %detail, "video quarantined");
                    out.push(Loaded::Bad(Quarantined {
                        uri,
                        reason,
                        detail,
                        time_unix_us: crate::now_unix_us(),
                    }));
                }
                Err(Failure::Fatal(msg)) => {
                    self.fatal.set(format!("decoder failure: {msg}"));
                    return out;
                }
            }
        }
        self.fatal.set(format!(
            "no usable video for clip {} after {} attempts (workers.max_attempts_per_clip): is the corpus mostly corrupt?",
            request.global_index, self.settings.max_attempts
        ));
        out
    }
}
