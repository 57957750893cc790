//! `vjepa extract`: a frozen encoder over every clip of a dataset, written to a features table.
//!
//! Clips follow the evaluation's sampling (spec §9): each video is split into `segments` temporal
//! segments of one 16-frame clip each, and each clip is read in `views` spatial views (crops of
//! the short side's size, evenly spaced along the long side, resized to the encoder's input size).
//! Videos stream through the job's own machinery: a timely dataflow whose load stage decodes
//! on several threads from any object store (ranged reads; only the frames the clips need), an
//! encode stage that runs the encoder in batches, and a Parquet sink. Bad videos are
//! quarantined with their reason beside the output and the rest goes on.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::io::{IsTerminal, Write};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::core::OkErr;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::{Capability, Probe};
use timely::dataflow::{InputHandle, ProbeHandle};

use vjepa_ingest::{
    Decoder, DecoderOptions, EvalView, FrameSink, IngestError, ObjectSource, VideoInfo, ViewTensor,
    YuvFrame, eval_views,
};
use vjepa_model::vit::{self, Encoder};
use vjepa_model::{ComputeDevice, Device, EncoderConfig, Pretrainer, Tensor};
use vjepa_operators::load::{ClipLoader, load_clips_parallel};
use vjepa_operators::records::{Clip, ClipRequest, Loaded, Quarantined};
use vjepa_operators::sampling::{ClipSampling, eval_segment_indices};
use vjepa_operators::seeding::{Fnv1a, mix64};
use vjepa_operators::sinks::sink_local;
pub use vjepa_operators::train_augment::TrainAugment;
use vjepa_operators::transform::{self, CropBox, TransformParams};
use vjepa_storage::features::{FeatureRow, FeaturesWriter};
use vjepa_storage::tables::{QuarantineRow, QuarantineWriter};
use vjepa_storage::{S3Settings, Store};

/// What to extract, from where, to where.
#[derive(Clone, Debug)]
pub struct ExtractOptions {
    /// Checkpoint: our `.safetensors` (its target encoder; the encoder of an `objective: pixel`
    /// run) or an official-layout `.pth.tar` (`target_encoder`, else `encoder`).
    pub checkpoint: String,
    /// Model shape for a `.pth.tar` without our metadata (e.g. the official releases).
    pub encoder: Option<EncoderConfig>,
    /// Where index entries resolve (a directory or bucket prefix holding the videos; `None`:
    /// each index's own folder), as `data.index_root`.
    pub index_root: Option<String>,
    /// Datasets: index files (`path label` lines) or listed prefixes, any store.
    pub datasets: Vec<String>,
    /// Output table (local path or object-store URL); quarantine records go beside it.
    pub out: String,
    /// Temporal segments per video.
    pub segments: usize,
    /// Spatial views per segment.
    pub views: usize,
    /// Frame stride within a clip (the clip has the encoder's frame count).
    pub frame_step: usize,
    /// Input side; default the encoder's.
    pub size: Option<usize>,
    /// Also write every token's output.
    pub tokens: bool,
    /// Clips per encoder forward.
    pub batch_size: usize,
    /// Decoder threads.
    pub decode_threads: usize,
    /// Seeds the random window inside long segments (spec §9: random even at evaluation).
    pub seed: u64,
    /// Longest a video may take to decode.
    pub deadline: Duration,
    /// Connection settings of S3 locations.
    pub s3: S3Settings,
    /// A progress line on stderr (on a terminal: one line redrawn).
    pub progress: bool,
    /// Where the encoder computes (`--device`).
    pub device: ComputeDevice,
    /// Software decoders, or NVDEC where it takes the stream (`--video-decoder`).
    pub video_decoder: vjepa_ingest::VideoDecoderKind,
    /// Draw each segment's clip through the official evaluation's training transform
    /// (`vjepa probe`'s train split) instead of cutting evaluation views; needs `views: 1`.
    pub augment: Option<TrainAugment>,
}

/// What an extraction did.
#[derive(Clone, Debug, PartialEq)]
pub struct ExtractSummary {
    pub output: String,
    pub videos: usize,
    pub rows: u64,
    pub quarantined: usize,
    pub quarantine_output: String,
    /// The encoder's shape (for a probe reading its tokens).
    pub encoder: EncoderConfig,
}

/// The frozen encoder.
pub(crate) enum Backbone {
    /// Our checkpoint: V-JEPA's target encoder, or the encoder of an `objective: pixel` run.
    Model(Box<Pretrainer>),
    /// An encoder read from a `.pth.tar`.
    Encoder(Box<Encoder>),
}

impl Backbone {
    fn load(
        name: &str,
        bytes: &[u8],
        cfg: Option<&EncoderConfig>,
        device: &Device,
    ) -> anyhow::Result<Self> {
        if name.ends_with(".safetensors") {
            let meta = vjepa_model::checkpoint_metadata(bytes)
                .with_context(|| format!("reading {name}"))?;
            if meta.get("format").map(String::as_str) == Some(vit::ENCODER_FORMAT) {
                // An encoder alone (e.g. written by `vjepa finetune`).
                return Ok(Backbone::Encoder(Box::new(Encoder::from_safetensors(
                    bytes, device,
                )?)));
            }
            if device.is_cpu() {
                let model = Pretrainer::from_safetensors(bytes, device)?;
                tracing::info!(checkpoint = name, objective = %model.objective(), "model loaded");
                return Ok(Backbone::Model(Box::new(model)));
            }
            // On a GPU only the encoder evaluation reads goes to the device: the checkpoint
            // also holds the online encoder, the predictor and both AdamW moments, about four
            // times the memory (some 10 GB at ViT-H), which nothing here reads.
            let model = Pretrainer::from_safetensors(bytes, &Device::Cpu)?;
            tracing::info!(checkpoint = name, objective = %model.objective(), "model loaded");
            let encoder =
                Encoder::from_safetensors(&model.eval_encoder().to_safetensors()?, device)?;
            return Ok(Backbone::Encoder(Box::new(encoder)));
        }
        let (encoder, section) = vjepa_model::encoder_from_pth(bytes, cfg, device)
            .with_context(|| format!("reading {name} as an official-layout checkpoint"))?;
        tracing::info!(checkpoint = name, section, "encoder loaded");
        Ok(Backbone::Encoder(Box::new(encoder)))
    }

    pub(crate) fn config(&self) -> &EncoderConfig {
        match self {
            Backbone::Model(m) => m.encoder_config(),
            Backbone::Encoder(e) => e.config(),
        }
    }

    /// The encoder evaluation reads (our checkpoint's target encoder; a pixel run's encoder).
    fn encoder(&self) -> &Encoder {
        match self {
            Backbone::Model(m) => m.eval_encoder(),
            Backbone::Encoder(e) => e,
        }
    }

    /// The encoder's outputs `[B, N, D]` for decoded clips of the same size.
    pub(crate) fn encode(&self, clips: &[Clip]) -> anyhow::Result<Tensor> {
        let per_clip = clips.first().map_or(0, |c| c.data.len());
        let t = self.config().num_frames;
        let s = ((per_clip / (3 * t.max(1))) as f64).sqrt() as usize;
        self.features(&crate::loader::stack_clips(clips, (t, s))?)
    }

    /// `[B, 3, T, S, S]` → `[B, N, D]` after the final LayerNorm.
    fn features(&self, clips: &Tensor) -> anyhow::Result<Tensor> {
        Ok(match self {
            Backbone::Model(m) => m.eval_features(clips)?,
            Backbone::Encoder(e) => e.forward(clips, None)?,
        })
    }
}

/// One video to read.
#[derive(Clone, Debug)]
struct Video {
    store: usize,
    rel: String,
    uri: String,
    label: String,
}

/// The region of the source frame an evaluation view covers, rounded to source pixels
/// ([`vjepa_ingest::EvalView::source_region`]): what the features table records as the crop.
fn view_box(view: &EvalView) -> CropBox {
    let (top, left, height, width) = view.source_region();
    CropBox {
        top,
        left,
        height,
        width,
    }
}

/// The evaluation's segment windows for a video (spec §9; a random window inside long
/// partitions, drawn from `rng`) and the sorted distinct frames they read, which the decoder
/// is asked for.
fn segment_plan(
    info: &VideoInfo,
    sampling: ClipSampling,
    segments: usize,
    rng: &mut ChaCha8Rng,
) -> Result<(Vec<Vec<u64>>, Vec<u64>), IngestError> {
    let plan = eval_segment_indices(info.num_frames.max(1), sampling, segments, true, rng)
        .map_err(|e| IngestError::Fatal(format!("segment sampling: {e}")))?;
    let mut union: Vec<u64> = plan.iter().flatten().copied().collect();
    union.sort_unstable();
    union.dedup();
    Ok((plan, union))
}

/// Decodes the union of the segments' frames once per view into a `[3, |U|, S, S]` tensor, then
/// cuts the clips out of it.
struct ViewsSink {
    segments: usize,
    views: usize,
    size: usize,
    sampling: ClipSampling,
    rng: ChaCha8Rng,
    /// Per segment, its frame numbers.
    plan: Vec<Vec<u64>>,
    /// Sorted distinct frame numbers decoded.
    union: Vec<u64>,
    boxes: Vec<CropBox>,
    tensors: Vec<ViewTensor>,
    error: Option<IngestError>,
}

impl FrameSink for ViewsSink {
    fn plan(&mut self, info: &VideoInfo) -> Vec<u64> {
        let (plan, union) = match segment_plan(info, self.sampling, self.segments, &mut self.rng) {
            Ok(p) => p,
            Err(e) => {
                self.error = Some(e);
                return Vec::new();
            }
        };
        let views = eval_views(
            info.height as usize,
            info.width as usize,
            self.size,
            self.views,
        );
        self.boxes = views.iter().map(view_box).collect();
        self.tensors.clear();
        for view in views {
            let tensor = ViewTensor::new(
                view,
                union.len(),
                transform::MEAN.map(|m| m as f32),
                transform::STD.map(|s| s as f32),
            );
            match tensor {
                Ok(t) => self.tensors.push(t),
                Err(e) => {
                    self.error = Some(e);
                    return Vec::new();
                }
            }
        }
        self.plan = plan;
        self.union = union.clone();
        union
    }

    fn frame(&mut self, slot: usize, frame: &YuvFrame<'_>) -> Result<(), IngestError> {
        for t in &mut self.tensors {
            t.put(slot, frame)?;
        }
        Ok(())
    }

    fn repeat(&mut self, from: usize, to: usize) -> Result<(), IngestError> {
        for t in &mut self.tensors {
            t.copy_slot(from, to)?;
        }
        Ok(())
    }
}

/// Makes each segment's clip through [`TrainAugment`] as soon as its frames are decoded
/// (RandAugment works on whole frames, before the crop, so they are held as full-resolution
/// RGB until then), and drops the frames no later segment reads: at most about one clip's
/// frames are held, whatever the number of segments. The transform draws from the video's
/// generator after its windows, segment by segment, as the official loader transforms each
/// clip in turn. A decode that starts over (a software retry after NVDEC, or a stream found
/// not to be constant-rate after a seek) delivers frames again from the first: the clips made
/// so far are dropped and the generator rewound, so the result is as if the last pass were the
/// only one.
struct AugmentSink {
    augment: TrainAugment,
    segments: usize,
    sampling: ClipSampling,
    rng: ChaCha8Rng,
    /// The generator as it was after the plan (for a restart).
    rng_after_plan: Option<ChaCha8Rng>,
    plan: Vec<Vec<u64>>,
    union: Vec<u64>,
    /// Per slot of `union`, the last segment that reads it.
    last_use: Vec<usize>,
    size: (usize, usize),
    /// Held RGB frames by slot (`None`: not decoded yet, or no longer needed).
    frames: Vec<Option<Vec<u8>>>,
    /// The last slot delivered, and its frame (a `repeat` copies from it).
    last: Option<usize>,
    /// The clips made, in segment order.
    clips: Vec<(Vec<f32>, TransformParams)>,
    error: Option<IngestError>,
}

impl AugmentSink {
    fn new(augment: TrainAugment, segments: usize, sampling: ClipSampling, seed: u64) -> Self {
        AugmentSink {
            augment,
            segments,
            sampling,
            rng: ChaCha8Rng::seed_from_u64(seed),
            rng_after_plan: None,
            plan: Vec::new(),
            union: Vec::new(),
            last_use: Vec::new(),
            size: (0, 0),
            frames: Vec::new(),
            last: None,
            clips: Vec::new(),
            error: None,
        }
    }

    /// Holds `rgb` for `slot`, then makes every segment whose frames are all in.
    fn hold(&mut self, slot: usize, rgb: Vec<u8>) -> Result<(), IngestError> {
        if self.last.is_some_and(|l| slot <= l) {
            // Delivered from the start again: begin again.
            self.clips.clear();
            self.frames.iter_mut().for_each(|f| *f = None);
            if let Some(r) = &self.rng_after_plan {
                self.rng = r.clone();
            }
        }
        self.last = Some(slot);
        let done = self.clips.len();
        match self.frames.get_mut(slot) {
            Some(held) if self.last_use.get(slot).is_some_and(|&u| u >= done) => {
                *held = Some(rgb);
            }
            Some(_) => {}
            None => {
                return Err(IngestError::Fatal(format!(
                    "frame slot {slot} out of range"
                )));
            }
        }
        while self.clips.len() < self.plan.len() {
            let k = self.clips.len();
            let (h, w) = self.size;
            let len = h * w * 3;
            let indices = &self.plan[k];
            let mut frames = Vec::with_capacity(indices.len() * len);
            for f in indices {
                let held = self
                    .union
                    .binary_search(f)
                    .ok()
                    .and_then(|p| self.frames[p].as_deref());
                match held {
                    Some(rgb) => frames.extend_from_slice(rgb),
                    None => return Ok(()), // not all decoded yet
                }
            }
            let clip = self
                .augment
                .clip(&mut frames, indices.len(), h, w, &mut self.rng)
                .map_err(|e| IngestError::Fatal(format!("training transform: {e}")))?;
            self.clips.push(clip);
            let done = self.clips.len();
            // Keep the last delivered frame for a repeat into a later slot.
            for (p, f) in self.frames.iter_mut().enumerate() {
                if self.last_use[p] < done && Some(p) != self.last {
                    *f = None;
                }
            }
        }
        Ok(())
    }
}

impl FrameSink for AugmentSink {
    fn plan(&mut self, info: &VideoInfo) -> Vec<u64> {
        let (plan, union) = match segment_plan(info, self.sampling, self.segments, &mut self.rng) {
            Ok(p) => p,
            Err(e) => {
                self.error = Some(e);
                return Vec::new();
            }
        };
        let mut last_use = vec![0; union.len()];
        for (k, indices) in plan.iter().enumerate() {
            for f in indices {
                if let Ok(p) = union.binary_search(f) {
                    last_use[p] = k;
                }
            }
        }
        self.rng_after_plan = Some(self.rng.clone());
        self.size = (info.height as usize, info.width as usize);
        self.frames = vec![None; union.len()];
        self.last_use = last_use;
        self.plan = plan;
        self.union = union.clone();
        union
    }

    fn frame(&mut self, slot: usize, frame: &YuvFrame<'_>) -> Result<(), IngestError> {
        if (frame.height, frame.width) != self.size {
            return Err(IngestError::quarantine(
                vjepa_ingest::QuarantineReason::DecodeError,
                format!(
                    "frame size changed mid-stream from {}x{} to {}x{}",
                    self.size.1, self.size.0, frame.width, frame.height
                ),
            ));
        }
        let mut rgb = vec![0u8; frame.height * frame.width * 3];
        frame.to_rgb(&mut rgb)?;
        self.hold(slot, rgb)
    }

    fn repeat(&mut self, from: usize, to: usize) -> Result<(), IngestError> {
        let copy = self.frames.get(from).cloned().flatten();
        match copy {
            Some(f) if self.last == Some(from) => self.hold(to, f),
            _ => Err(IngestError::Fatal(format!(
                "cannot repeat frame slot {from} into {to}"
            ))),
        }
    }
}

/// One loader thread: reads videos and produces their `segments × views` clips.
struct ExtractLoader {
    videos: Arc<Vec<Video>>,
    stores: Arc<Vec<Store>>,
    runtime: tokio::runtime::Handle,
    decoder: Decoder,
    opts: Arc<ExtractOptions>,
    frames: usize,
    size: usize,
    /// The last read found its video replaced meanwhile ([`IngestError::Changed`]).
    changed: bool,
}

impl ExtractLoader {
    fn bad(&self, v: &Video, reason: &str, detail: String) -> Vec<Loaded> {
        vec![Loaded::Bad(Quarantined {
            uri: v.uri.clone(),
            reason: reason.to_string(),
            detail,
            time_unix_us: crate::now_unix_us(),
            object_tag: None,
        })]
    }

    /// A decode error as a quarantine record (a store that could not be read included: one
    /// pass over the videos loses this video's rows, recorded with why).
    fn decode_failed(&mut self, v: &Video, e: IngestError) -> Vec<Loaded> {
        self.changed = matches!(e, IngestError::Changed(_));
        match e {
            IngestError::Quarantine { reason, detail } => self.bad(v, reason.as_str(), detail),
            IngestError::Fatal(msg) => self.bad(v, "decode_error", msg),
            e @ (IngestError::Unavailable(_) | IngestError::Changed(_)) => {
                self.bad(v, "fetch_error", e.to_string())
            }
        }
    }

    /// One clip per segment through the official training transform.
    fn load_augmented(
        &mut self,
        v: &Video,
        source: Arc<ObjectSource>,
        augment: &TrainAugment,
        seed: u64,
        step: u64,
    ) -> Vec<Loaded> {
        let sampling = ClipSampling {
            frames_per_clip: self.frames,
            frame_step: self.opts.frame_step,
        };
        let mut sink = AugmentSink::new(*augment, self.opts.segments.max(1), sampling, seed);
        let started = Instant::now();
        let stats = match self.decoder.decode(source, &mut sink) {
            Ok(s) => s,
            Err(e) => return self.decode_failed(v, e),
        };
        if let Some(e) = sink.error.take() {
            return self.bad(v, "decode_error", e.to_string());
        }
        if sink.clips.len() != sink.plan.len() {
            return self.bad(
                v,
                "decode_error",
                "decoder finished without every planned frame".into(),
            );
        }
        let clips = std::mem::take(&mut sink.clips);
        let decode_s = started.elapsed().as_secs_f64();
        clips
            .into_iter()
            .zip(&sink.plan)
            .enumerate()
            .map(|(seg, ((data, params), indices))| {
                Loaded::Clip(Clip {
                    step,
                    slot: seg,
                    uri: v.uri.clone(),
                    frame_indices: indices.clone(),
                    params,
                    data,
                    bytes_read: stats.bytes_read,
                    decode_s,
                    nvdec: stats.nvdec,
                })
            })
            .collect()
    }
}

impl ClipLoader for ExtractLoader {
    /// One video's clips; a video replaced while it was read is read again, once, at its new
    /// version (a second change is recorded as a `fetch_error`).
    fn load(&mut self, request: ClipRequest) -> Vec<Loaded> {
        self.changed = false;
        let out = self.load_video(&request);
        if self.changed {
            return self.load_video(&request);
        }
        out
    }
}

impl ExtractLoader {
    fn load_video(&mut self, request: &ClipRequest) -> Vec<Loaded> {
        let Some(v) = self.videos.get(request.slot).cloned() else {
            return Vec::new();
        };
        let Some(store) = self.stores.get(v.store) else {
            return self.bad(&v, "fetch_error", "unknown dataset".into());
        };
        let source = match store
            .path_of(&v.rel)
            .map_err(|e| e.to_string())
            .and_then(|p| {
                let (os, _) = store.inner();
                ObjectSource::open(os, p, self.runtime.clone()).map_err(|e| e.to_string())
            }) {
            Ok(s) => s,
            Err(e) => return self.bad(&v, "fetch_error", store.scrub(&e)),
        };
        let seed = mix64(self.opts.seed ^ mix64(Fnv1a::of(v.uri.as_bytes())));
        if let Some(augment) = self.opts.augment {
            return self.load_augmented(&v, source, &augment, seed, request.step);
        }
        let mut sink = ViewsSink {
            segments: self.opts.segments.max(1),
            views: self.opts.views.max(1),
            size: self.size,
            sampling: ClipSampling {
                frames_per_clip: self.frames,
                frame_step: self.opts.frame_step,
            },
            rng: ChaCha8Rng::seed_from_u64(seed),
            plan: Vec::new(),
            union: Vec::new(),
            boxes: Vec::new(),
            tensors: Vec::new(),
            error: None,
        };
        let started = Instant::now();
        let stats = match self.decoder.decode(source, &mut sink) {
            Ok(s) => s,
            Err(e) => return self.decode_failed(&v, e),
        };
        if let Some(e) = sink.error.take() {
            return self.bad(&v, "decode_error", e.to_string());
        }
        if sink.tensors.iter().any(|t| !t.is_complete()) {
            return self.bad(
                &v,
                "decode_error",
                "decoder finished without every planned frame".into(),
            );
        }
        let (s, u) = (self.size, sink.union.len());
        let plane = s * s;
        let per_clip = 3 * self.frames * plane;
        let decode_s = started.elapsed().as_secs_f64();
        let boxes = sink.boxes.clone();
        let views: Vec<Vec<f32>> = sink.tensors.into_iter().map(|t| t.into_data()).collect();
        let mut out = Vec::with_capacity(sink.plan.len() * views.len());
        for (seg, indices) in sink.plan.iter().enumerate() {
            let positions: Vec<usize> = indices
                .iter()
                .map(|f| sink.union.binary_search(f).unwrap_or(0))
                .collect();
            for (view, data) in views.iter().enumerate() {
                let mut clip = Vec::with_capacity(per_clip);
                for c in 0..3 {
                    for &p in &positions {
                        let at = (c * u + p) * plane;
                        clip.extend_from_slice(&data[at..at + plane]);
                    }
                }
                out.push(Loaded::Clip(Clip {
                    step: request.step,
                    slot: seg * boxes.len() + view,
                    uri: v.uri.clone(),
                    frame_indices: indices.clone(),
                    params: TransformParams {
                        crop: boxes[view],
                        flip: false,
                    },
                    data: clip,
                    bytes_read: stats.bytes_read,
                    decode_s,
                    nvdec: stats.nvdec,
                }));
            }
        }
        out
    }
}

/// The quarantine table's location beside the features table.
fn quarantine_location(out: &str) -> String {
    let stem = out.strip_suffix(".parquet").unwrap_or(out);
    format!("{stem}.quarantine.parquet")
}

/// Mutable state of the single worker.
struct State {
    quarantine: Option<QuarantineWriter>,
    rows: u64,
    videos_done: usize,
    quarantined: usize,
    /// The videos quarantined while decoding (not the index lines refused before).
    quarantined_uris: Vec<String>,
    error: Option<String>,
}

/// Each video's position in the index and its label, by uri.
pub(crate) type Order = HashMap<String, (usize, String)>;

/// Where the extract dataflow's decoded clips go: an encoder writing features (`vjepa extract`)
/// or memory (`vjepa finetune`, which encodes them again every step).
pub(crate) trait ClipConsumer: Send + 'static {
    /// All clips of one dataflow time, sorted by video (index order), then slot
    /// (`segment · views + view`). Returns the rows produced, for the progress line.
    fn consume(&mut self, clips: Vec<Clip>, order: &Order) -> anyhow::Result<u64>;
}

/// The videos of the datasets, and the index lines refused while listing them.
pub(crate) struct VideoSet {
    videos: Vec<Video>,
    stores: Vec<Store>,
    rejected: Vec<QuarantineRow>,
}

impl VideoSet {
    /// Lists the datasets (index files or prefixes, any store).
    pub(crate) fn open(
        datasets: &[String],
        index_root: Option<&str>,
        s3: &S3Settings,
        handle: &tokio::runtime::Handle,
    ) -> anyhow::Result<Self> {
        let mut videos = Vec::new();
        let mut stores = Vec::new();
        let mut rejected = Vec::new();
        for spec in datasets {
            let d = handle
                .block_on(vjepa_storage::dataset::open_in(spec, index_root, s3))
                .with_context(|| format!("opening dataset {}", vjepa_storage::redact_url(spec)))?;
            for e in &d.entries {
                videos.push(Video {
                    store: stores.len(),
                    rel: e.rel.clone(),
                    uri: d.uri_of(e),
                    label: e.label.clone().unwrap_or_default(),
                });
            }
            for r in &d.rejected {
                rejected.push(QuarantineRow {
                    uri: r.entry.clone(),
                    reason: r.reason.clone(),
                    detail: r.detail.clone(),
                    time_unix_us: crate::now_unix_us(),
                    object_version: None,
                });
            }
            stores.push(d.store.clone());
        }
        // A video listed twice (in one index or across several) is read once: its clips are
        // keyed by URI downstream, and an evaluation should not count it twice. Two labels
        // for one video cannot both be right.
        let mut seen: HashMap<String, String> = HashMap::new();
        let mut repeats = Vec::new();
        let mut unique = Vec::with_capacity(videos.len());
        for v in videos {
            match seen.get(&v.uri) {
                Some(label) if *label != v.label => crate::refuse!(
                    "{}: listed twice with different labels (`{label}` and `{}`)",
                    vjepa_storage::redact_url(&v.uri),
                    v.label
                ),
                Some(_) => repeats.push(v.uri),
                None => {
                    seen.insert(v.uri.clone(), v.label.clone());
                    unique.push(v);
                }
            }
        }
        let videos = unique;
        if let Some(first) = repeats.first() {
            tracing::warn!(
                repeats = repeats.len(),
                first = %vjepa_storage::redact_url(first),
                "videos listed more than once are read once"
            );
        }
        if videos.is_empty() {
            let why = vjepa_storage::dataset::why_all_refused(
                rejected
                    .iter()
                    .map(|r| (r.uri.as_str(), r.reason.as_str(), r.detail.as_str())),
            );
            match why {
                Some(why) => crate::refuse!("no videos in {}: {why}", datasets.join(", ")),
                None => crate::refuse!("no videos in {}", datasets.join(", ")),
            }
        }
        Ok(Self {
            videos,
            stores,
            rejected,
        })
    }

    /// Number of videos listed.
    pub(crate) fn len(&self) -> usize {
        self.videos.len()
    }

    /// The uri of each video, in listing order.
    pub(crate) fn uris(&self) -> Vec<String> {
        self.videos.iter().map(|v| v.uri.clone()).collect()
    }

    /// The same listing without the index lines refused while listing it (already recorded
    /// by an earlier pass).
    pub(crate) fn without_rejected(mut self) -> Self {
        self.rejected.clear();
        self
    }

    /// The label of each video, in listing order.
    pub(crate) fn labels(&self) -> Vec<String> {
        self.videos.iter().map(|v| v.label.clone()).collect()
    }

    /// The same listing with the videos in `order` (indices into the current order; videos not
    /// named are left out). Streams read videos in listing order.
    pub(crate) fn reordered(&self, order: &[usize]) -> Self {
        Self {
            videos: order.iter().map(|&i| self.videos[i].clone()).collect(),
            stores: self.stores.clone(),
            rejected: self.rejected.clone(),
        }
    }
}

/// What a clip stream did.
pub(crate) struct Streamed {
    pub(crate) rows: u64,
    pub(crate) quarantined: usize,
    /// The videos quarantined while decoding.
    pub(crate) quarantined_uris: Vec<String>,
    pub(crate) quarantine_output: String,
}

/// Reads every video of `set` through the dataflow (decode threads → per-time gather →
/// `consumer`), `frames`-frame clips of side `size` in `opts`' segments and views; bad videos
/// go to the quarantine table at `quarantine`. Returns the consumer when all is done.
pub(crate) fn stream_clips<C: ClipConsumer>(
    opts: &ExtractOptions,
    set: VideoSet,
    frames: usize,
    size: usize,
    quarantine: &str,
    consumer: C,
    handle: &tokio::runtime::Handle,
) -> anyhow::Result<(C, Streamed)> {
    let VideoSet {
        videos,
        stores,
        rejected,
    } = set;
    let (q_store, q_name) = crate::job::split_location_with(quarantine, &opts.s3, true)?;
    vjepa_ingest::init().map_err(|e| anyhow!("GStreamer: {e}"))?;

    let total = videos.len();
    let clips_per_video = opts.segments * opts.views;
    let videos_per_time = (opts.batch_size / clips_per_video).max(1);
    let threads = opts.decode_threads.max(1);
    let videos = Arc::new(videos);
    let stores = Arc::new(stores);
    let opts = Arc::new(opts.clone());
    let order: Arc<Order> = Arc::new(
        videos
            .iter()
            .enumerate()
            .map(|(i, v)| (v.uri.clone(), (i, v.label.clone())))
            .collect(),
    );

    let consumer = std::sync::Mutex::new(Some(consumer));
    // A video's clips may go to different threads: each version is learned once.
    let known_videos = Arc::new(vjepa_ingest::KnownVideos::default());
    let worker_q = (q_store.clone(), q_name.clone());
    let worker_handle = handle.clone();
    let started = Instant::now();
    let result = timely::execute_directly(
        move |worker| -> anyhow::Result<(C, u64, usize, Vec<String>)> {
            let mut input = InputHandle::new();
            let probe = ProbeHandle::new();
            let handle = worker_handle.clone();
            let Some(consumer) = consumer.lock().ok().and_then(|mut c| c.take()) else {
                bail!("the clip consumer was taken by another worker");
            };
            let quarantine = handle.block_on(QuarantineWriter::create(&worker_q.0, &worker_q.1))?;
            let loaders = (0..threads)
                .map(|_| {
                    Decoder::new(DecoderOptions {
                        deadline: opts.deadline,
                        decoder_threads: if threads > 1 { 1 } else { 0 },
                        video_decoder: opts.video_decoder,
                        ..DecoderOptions::default()
                    })
                    .map(|decoder| ExtractLoader {
                        decoder: decoder.with_known_videos(known_videos.clone()),
                        videos: videos.clone(),
                        stores: stores.clone(),
                        runtime: handle.clone(),
                        opts: opts.clone(),
                        frames,
                        size,
                        changed: false,
                    })
                })
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| anyhow!("GStreamer decoder: {e}"))?;

            let state = Rc::new(RefCell::new(State {
                quarantine: Some(quarantine),
                rows: 0,
                videos_done: 0,
                quarantined: 0,
                quarantined_uris: Vec::new(),
                error: None,
            }));
            {
                let mut s = state.borrow_mut();
                s.quarantined += rejected.len();
                if let Some(q) = s.quarantine.as_mut() {
                    for r in rejected.iter().cloned() {
                        q.push(r);
                    }
                }
            }
            let consume_state = state.clone();
            let bad_state = state.clone();
            let consumer = Rc::new(RefCell::new(Some(consumer)));
            let op_consumer = consumer.clone();
            let order = order.clone();
            worker.dataflow::<u64, _, _>(|scope| {
                let requests = input.to_stream(scope);
                let loaded = load_clips_parallel(requests, loaders);
                let (clips, bad) = loaded.ok_err(|l: Loaded| match l {
                    Loaded::Clip(c) => Ok(c),
                    Loaded::Bad(q) => Err(q),
                });
                // Hand each time's clips over once all of them are in (its frontier has passed);
                // the output (one unit per time) tells the probe that the time is done.
                clips
                    .unary_frontier::<CapacityContainerBuilder<Vec<()>>, _, _, _>(
                        Pipeline,
                        "Consume",
                        |_cap, _info| {
                            let mut pending: BTreeMap<u64, (Capability<u64>, Vec<Clip>)> =
                                BTreeMap::new();
                            move |(input, frontier), output| {
                                input.for_each_stamp(|cap, data| {
                                    let Some(cap) = cap.retain_least(output.output_index()) else {
                                        return;
                                    };
                                    let entry = pending
                                        .entry(*cap.time())
                                        .or_insert_with(|| (cap.clone(), Vec::new()));
                                    for container in data {
                                        entry.1.append(container);
                                    }
                                });
                                let ready: Vec<u64> = pending
                                    .keys()
                                    .copied()
                                    .filter(|t| !frontier.less_equal(t))
                                    .collect();
                                for t in ready {
                                    if let Some((cap, batch)) = pending.remove(&t) {
                                        consume(batch, &op_consumer, &order, &consume_state);
                                        output.session(&cap).give(());
                                    }
                                }
                            }
                        },
                    )
                    .probe_with(&probe);
                sink_local(bad, "Quarantine", move |_t, q: Quarantined| {
                    let mut s = bad_state.borrow_mut();
                    s.quarantined += 1;
                    s.quarantined_uris.push(q.uri.clone());
                    s.videos_done += 1;
                    if let Some(w) = s.quarantine.as_mut() {
                        w.push(QuarantineRow {
                            uri: q.uri,
                            reason: q.reason,
                            detail: q.detail,
                            time_unix_us: q.time_unix_us,
                            object_version: q.object_tag,
                        });
                    }
                });
            });
            let in_flight = (2 * threads).div_ceil(videos_per_time).max(2) as u64;
            let times = total.div_ceil(videos_per_time) as u64;
            let mut last_report = Instant::now();
            for t in 0..times {
                let floor = t.saturating_sub(in_flight);
                while probe.less_than(&floor) {
                    worker.step_or_park(Some(Duration::from_millis(20)));
                }
                let first = t as usize * videos_per_time;
                for slot in first..(first + videos_per_time).min(total) {
                    input.send(ClipRequest {
                        step: t,
                        slot,
                        global_index: slot as u64,
                    });
                }
                input.advance_to(t + 1);
                worker.step();
                if opts.progress && last_report.elapsed() > Duration::from_millis(500) {
                    report(&state.borrow(), total, started, false);
                    last_report = Instant::now();
                }
                if state.borrow().error.is_some() {
                    break;
                }
            }
            drop(input);
            // Until every operator has finished (the quarantine sink included).
            while worker.step_or_park(Some(Duration::from_millis(20))) {}
            let mut s = state.borrow_mut();
            if let Some(e) = s.error.take() {
                bail!("{e}");
            }
            if opts.progress {
                report(&s, total, started, true);
            }
            if let Some(q) = s.quarantine.take() {
                handle.block_on(q.close())?;
            }
            let Some(consumer) = consumer.borrow_mut().take() else {
                bail!("the clip consumer is gone");
            };
            Ok((
                consumer,
                s.rows,
                s.quarantined,
                std::mem::take(&mut s.quarantined_uris),
            ))
        },
    );
    let (consumer, rows, quarantined, quarantined_uris) = result?;
    Ok((
        consumer,
        Streamed {
            rows,
            quarantined,
            quarantined_uris,
            quarantine_output: q_store.uri_of(&q_name),
        },
    ))
}

/// Opens a runtime for the object stores and the checkpoint's backbone.
pub(crate) fn open_backbone(
    opts: &ExtractOptions,
) -> anyhow::Result<(tokio::runtime::Runtime, Backbone)> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the I/O runtime")?;
    let bytes = crate::job::read_location(runtime.handle(), &opts.checkpoint, &opts.s3)
        .with_context(|| {
            format!(
                "reading checkpoint {}",
                vjepa_storage::redact_url(&opts.checkpoint)
            )
        })?;
    let device = opts
        .device
        .open()
        .with_context(|| format!("opening device {}", opts.device))?;
    // Bytes that are not a checkpoint this model can read are the input's fault (a store
    // that could not serve them failed above, as a run failure).
    let backbone = Backbone::load(&opts.checkpoint, &bytes, opts.encoder.as_ref(), &device)
        .map_err(|e| {
            anyhow::Error::new(crate::Refused(format!(
                "{}: {e:#}",
                vjepa_storage::redact_url(&opts.checkpoint)
            )))
        })?;
    // Clips of another size than the checkpoint's: the backbone is built for them, as the
    // official evaluation builds its own at the evaluation resolution (a fresh sin-cos table,
    // not the checkpoint's interpolated), whatever the checkpoint's format.
    let built = backbone.config().crop_size;
    let size = input_size(opts, backbone.config())?;
    if size == built {
        return Ok((runtime, backbone));
    }
    let encoder = backbone.encoder().for_input_size(size)?;
    tracing::info!(
        checkpoint_size = built,
        input_size = size,
        "backbone built for the input size: the checkpoint's weights, a sin-cos table built \
         for the input's grid (the official evaluation's way)"
    );
    Ok((runtime, Backbone::Encoder(Box::new(encoder))))
}

/// The encoder of `opts.checkpoint` as evaluation reads it (our target encoder or a pixel run's encoder, an official
/// `.pth.tar`'s `target_encoder`, or an encoder-only file), with the runtime that reads the
/// datasets.
pub(crate) fn load_encoder(
    opts: &ExtractOptions,
) -> anyhow::Result<(tokio::runtime::Runtime, Encoder)> {
    let (runtime, backbone) = open_backbone(opts)?;
    let encoder = backbone.encoder().clone();
    Ok((runtime, encoder))
}

/// The clips of every video of `set` (the listing of `opts.datasets`) in memory, sorted by
/// video then slot, with the stream's record (quarantine beside `quarantine`).
pub(crate) fn decode_all(
    opts: &ExtractOptions,
    set: VideoSet,
    encoder: &EncoderConfig,
    quarantine: &str,
    handle: &tokio::runtime::Handle,
) -> anyhow::Result<(Vec<(Clip, String)>, Streamed)> {
    check(opts)?;
    let size = input_size(opts, encoder)?;
    tracing::info!(
        videos = set.len(),
        segments = opts.segments,
        views = opts.views,
        size,
        "decoding clips"
    );
    let (collected, streamed) = stream_clips(
        opts,
        set,
        encoder.num_frames,
        size,
        quarantine,
        Collect(Vec::new()),
        handle,
    )?;
    Ok((collected.0, streamed))
}

/// Keeps every clip with its label.
struct Collect(Vec<(Clip, String)>);

impl ClipConsumer for Collect {
    fn consume(&mut self, clips: Vec<Clip>, order: &Order) -> anyhow::Result<u64> {
        let n = clips.len() as u64;
        for c in clips {
            let label = order.get(&c.uri).map(|o| o.1.clone()).unwrap_or_default();
            self.0.push((c, label));
        }
        Ok(n)
    }
}

fn check(opts: &ExtractOptions) -> anyhow::Result<()> {
    if opts.datasets.is_empty() {
        crate::refuse!("no dataset given (--index)");
    }
    if opts.segments == 0 || opts.views == 0 || opts.batch_size == 0 || opts.frame_step == 0 {
        crate::refuse!("--segments, --views, --batch-size and --frame-step must be positive");
    }
    if opts.size == Some(0) {
        crate::refuse!("--size must be positive");
    }
    if opts.augment.is_some() && opts.views != 1 {
        bail!(
            "the training transform draws one view per segment, not {}",
            opts.views
        );
    }
    check_video_decoder(opts)
}

/// The input side: `--size`, else the encoder's; a whole number of patches (the encoder would
/// otherwise drop the pixels past the last whole patch without a word).
fn input_size(opts: &ExtractOptions, encoder: &EncoderConfig) -> anyhow::Result<usize> {
    let size = opts.size.unwrap_or(encoder.crop_size);
    if size == 0 || !size.is_multiple_of(encoder.patch_size) {
        crate::refuse!(
            "--size {size} is not a positive multiple of the encoder's patch size {}",
            encoder.patch_size
        );
    }
    Ok(size)
}

/// `--video-decoder nvdec` needs NVDEC decoders registered here; refused before any work.
pub(crate) fn check_video_decoder(opts: &ExtractOptions) -> anyhow::Result<()> {
    vjepa_ingest::check_video_decoder(opts.video_decoder).map_err(|e| {
        anyhow::Error::new(crate::Refused(format!(
            "--video-decoder {}: {e}",
            opts.video_decoder
        )))
    })
}

/// Runs the extraction to completion.
pub fn run(opts: ExtractOptions) -> anyhow::Result<ExtractSummary> {
    check(&opts)?;
    let (runtime, backbone) = open_backbone(&opts)?;
    let (out, s3) = (opts.out.clone(), opts.s3.clone());
    let summary = run_with(opts, None, backbone, runtime.handle())?.0;
    if summary.rows == 0 {
        // No video could be read: no empty table left to pass for a result (the quarantine
        // table beside says why).
        let (store, name) = crate::job::split_location_with(&out, &s3, true)?;
        if let Err(e) = runtime.handle().block_on(store.delete(&name)) {
            tracing::warn!(error = %e, "removing the empty features table");
        }
    }
    Ok(summary)
}

/// [`run`] with a backbone already loaded (from `opts.checkpoint`), which it hands back, and
/// the listing of `opts.datasets` when the caller has read it (`None`: read here).
pub(crate) fn run_with(
    opts: ExtractOptions,
    set: Option<VideoSet>,
    backbone: Backbone,
    handle: &tokio::runtime::Handle,
) -> anyhow::Result<(ExtractSummary, Backbone)> {
    check(&opts)?;
    let handle = handle.clone();
    let enc = backbone.config().clone();
    let size = input_size(&opts, &enc)?;
    let frames = enc.num_frames;
    let set = match set {
        Some(set) => set,
        None => VideoSet::open(
            &opts.datasets,
            opts.index_root.as_deref(),
            &opts.s3,
            &handle,
        )?,
    };
    let total = set.len();
    let (out_store, out_name) = crate::job::split_location_with(&opts.out, &opts.s3, true)?;
    tracing::info!(
        videos = total,
        segments = opts.segments,
        views = opts.views,
        size,
        frames,
        output = %out_store.uri_of(&out_name),
        "extracting features"
    );
    let writer = handle.block_on(FeaturesWriter::create(&out_store, &out_name))?;
    let consumer = EncodeClips {
        backbone,
        writer,
        tokens: opts.tokens,
        batch_size: opts.batch_size,
        views: opts.views.max(1),
        handle: handle.clone(),
    };
    let (consumer, streamed) = stream_clips(
        &opts,
        set,
        frames,
        size,
        &quarantine_location(&opts.out),
        consumer,
        &handle,
    )?;
    handle.block_on(consumer.writer.close())?;
    let summary = ExtractSummary {
        output: out_store.uri_of(&out_name),
        videos: total,
        rows: streamed.rows,
        quarantined: streamed.quarantined,
        quarantine_output: streamed.quarantine_output,
        encoder: enc,
    };
    Ok((summary, consumer.backbone))
}

fn report(s: &State, total: usize, started: Instant, last: bool) {
    let secs = started.elapsed().as_secs_f64().max(1e-9);
    let line = format!(
        "{}/{} videos, {} clips, {} quarantined, {:.1} clips/s",
        s.videos_done,
        total,
        s.rows,
        s.quarantined,
        s.rows as f64 / secs
    );
    let mut err = std::io::stderr();
    if err.is_terminal() {
        let _ = write!(err, "\r{line}{}", if last { "\n" } else { "" });
        let _ = err.flush();
    } else {
        tracing::info!("{line}");
    }
}

/// Sorts one time's clips into video / segment / view order and hands them to the consumer;
/// counts the videos done, or records the consumer's error (which stops the stream).
fn consume<C: ClipConsumer>(
    mut clips: Vec<Clip>,
    consumer: &Rc<RefCell<Option<C>>>,
    order: &Order,
    state: &Rc<RefCell<State>>,
) {
    if state.borrow().error.is_some() {
        return;
    }
    clips.sort_by_key(|c| (order.get(&c.uri).map_or(usize::MAX, |o| o.0), c.slot));
    let videos = {
        let mut uris: Vec<&str> = clips.iter().map(|c| c.uri.as_str()).collect();
        uris.dedup();
        uris.len()
    };
    let result = match consumer.borrow_mut().as_mut() {
        Some(c) => c.consume(clips, order),
        None => Err(anyhow!("the clip consumer is gone")),
    };
    let mut s = state.borrow_mut();
    match result {
        Ok(rows) => {
            s.videos_done += videos;
            s.rows += rows;
        }
        Err(e) => s.error = Some(format!("{e:#}")),
    }
}

/// `vjepa extract`'s consumer: the frozen encoder over the clips, rows to the features table.
struct EncodeClips {
    backbone: Backbone,
    writer: FeaturesWriter,
    tokens: bool,
    batch_size: usize,
    views: usize,
    handle: tokio::runtime::Handle,
}

impl ClipConsumer for EncodeClips {
    fn consume(&mut self, clips: Vec<Clip>, order: &Order) -> anyhow::Result<u64> {
        let mut rows = Vec::with_capacity(clips.len());
        for chunk in clips.chunks(self.batch_size.max(1)) {
            let features =
                encode_chunk(chunk, &self.backbone, self.tokens).context("encoding clips")?;
            for (c, (embedding, tokens)) in chunk.iter().zip(features) {
                rows.push(FeatureRow {
                    uri: c.uri.clone(),
                    label: order.get(&c.uri).map(|o| o.1.clone()).unwrap_or_default(),
                    segment: (c.slot / self.views) as u64,
                    view: (c.slot % self.views) as u64,
                    step: 0,
                    frames: c.frame_indices.iter().map(|&f| f as i64).collect(),
                    embedding,
                    tokens,
                });
            }
        }
        let n = rows.len() as u64;
        for r in rows {
            self.writer.push(r);
        }
        self.handle
            .block_on(self.writer.flush())
            .context("writing features")?;
        Ok(n)
    }
}

/// (mean-pooled embedding, tokens or empty) per clip of `chunk`.
fn encode_chunk(
    chunk: &[Clip],
    backbone: &Backbone,
    tokens: bool,
) -> anyhow::Result<Vec<(Vec<f32>, Vec<f32>)>> {
    let features = backbone.encode(chunk)?; // [B, N, D]
    let pooled = features.mean(1)?.to_vec2::<f32>()?;
    let all = if tokens {
        features
            .flatten_from(1)?
            .to_vec2::<f32>()?
            .into_iter()
            .collect()
    } else {
        vec![Vec::new(); chunk.len()]
    };
    Ok(pooled.into_iter().zip(all).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view_boxes(height: usize, width: usize, size: usize, views: usize) -> Vec<CropBox> {
        eval_views(height, width, size, views)
            .iter()
            .map(view_box)
            .collect()
    }

    #[test]
    fn views_follow_uniform_crop() {
        // 320x240 → short side 240 to 224: long side int(320/240·224) = 298, slack 74.
        let b = view_boxes(240, 320, 224, 3);
        assert_eq!(b.len(), 3);
        assert_eq!(
            (b[0].top, b[0].left, b[0].height, b[0].width),
            (0, 0, 240, 240)
        );
        // ceil(37) = 37 resized pixels = 37·240/224 = 39.6 → 40 source pixels.
        assert_eq!(b[1].left, 40);
        // The last crop starts at resized pixel 74 = source 79.3 (the truncated long side
        // leaves the official last crop short of the right edge, by under one source pixel).
        assert_eq!(b[2].left, 79);
        // Four views: step (298 − 224) // 3 = 24 resized pixels, the last crop 2 short of the
        // edge (the official floor).
        let four: Vec<usize> = view_boxes(240, 320, 224, 4)
            .iter()
            .map(|b| b.left)
            .collect();
        assert_eq!(four, vec![0, 26, 51, 77]);
        // One view: short side to 256 (long int(256·320/240) = 341), centre crop at
        // round(58.5) = 58, 16 → source box of round(224·240/256) = 210 at (15, 54).
        let centre = view_boxes(240, 320, 224, 1);
        assert_eq!(
            (
                centre[0].top,
                centre[0].left,
                centre[0].height,
                centre[0].width
            ),
            (15, 54, 210, 210)
        );
        let tall = view_boxes(320, 240, 224, 1);
        assert_eq!((tall[0].top, tall[0].left, tall[0].height), (54, 15, 210));
        // A short side already at 256: no resize, the crop is 224 source pixels.
        let hd = view_boxes(256, 456, 224, 1);
        assert_eq!((hd[0].top, hd[0].left, hd[0].height), (16, 116, 224));
        // Portrait: along the height.
        let p = view_boxes(320, 240, 224, 3);
        assert_eq!((p[2].top, p[2].left), (79, 0));
        // Square: all the same.
        assert!(
            view_boxes(64, 64, 64, 3)
                .iter()
                .all(|b| b.left == 0 && b.top == 0)
        );
    }

    /// Delivers `slots` (frame content = its frame number) to an augmenting sink planned for
    /// a 400-frame 12×16 video in 4 segments of 4 frames, step 2; returns the sink and the
    /// largest number of frames it held at once.
    fn deliver(slots: &[usize]) -> (AugmentSink, usize) {
        let sampling = ClipSampling {
            frames_per_clip: 4,
            frame_step: 2,
        };
        let mut sink = AugmentSink::new(TrainAugment::official(8), 4, sampling, 7);
        let info = VideoInfo {
            width: 16,
            height: 12,
            fps: 25.0,
            duration_ns: Some(16_000_000_000),
            num_frames: 400,
        };
        let wanted = sink.plan(&info);
        assert_eq!(wanted.len(), 16, "four disjoint windows");
        let mut most = 0;
        for &slot in slots {
            let rgb = vec![wanted[slot] as u8; 12 * 16 * 3];
            sink.hold(slot, rgb).unwrap();
            most = most.max(sink.frames.iter().filter(|f| f.is_some()).count());
        }
        (sink, most)
    }

    #[test]
    fn augmented_clips_are_made_segment_by_segment_and_survive_a_restart() {
        let all: Vec<usize> = (0..16).collect();
        let (once, most) = deliver(&all);
        assert_eq!(once.clips.len(), 4);
        assert!(
            most <= 4,
            "held {most} frames: one segment's, not the video's"
        );
        // Started over after the second segment (slots 0..8, then 0..16 again): the same clips,
        // as if the last pass were the only one.
        let mut twice: Vec<usize> = (0..8).collect();
        twice.extend(0..16);
        let (again, _) = deliver(&twice);
        assert_eq!(again.clips, once.clips);
        // An unfinished pass makes only the segments it completed.
        let (part, _) = deliver(&all[..9]);
        assert_eq!(part.clips.len(), 2);
        assert_eq!(part.clips[..], once.clips[..2]);
    }

    #[test]
    fn quarantine_beside_output() {
        assert_eq!(
            quarantine_location("s3://b/f/features.parquet"),
            "s3://b/f/features.quarantine.parquet"
        );
    }
}
