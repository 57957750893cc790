//! `vjepa probe`: the frozen-backbone evaluation of spec §9. The checkpoint's target encoder
//! (an `objective: pixel` checkpoint's encoder) reads the clips through [`crate::extract`]'s
//! dataflow; an attentive probe is trained on the train index's tokens and evaluated on the
//! validation index, averaging the class probabilities over views (segments are concatenated
//! into one probe pass, as the official `attend_across_segments`). Top-1 is printed and the
//! predictions written to Parquet.
//!
//! Train clips go through the official training transform, drawn anew every epoch
//! ([`Augment::Official`]: RandAugment, random resized crop, random erasing; so the backbone
//! reads the videos again every epoch), or are the fixed evaluation view ([`Augment::None`]:
//! then the tokens can be extracted once and held, [`Cache`], with the same batches either
//! way). A difference from the official recipe, said plainly: training runs in f32 (no fp16
//! autocast). The probe, its optimiser and schedules are the official ones. `vjepa finetune`
//! ([`crate::finetune`]) shares the options, the label handling and the predictions table.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context, bail};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use vjepa_model::Tensor;
use vjepa_model::probe::{AttentiveProbe, ProbeConfig, ProbeOptim, ProbeTrainer};
use vjepa_operators::records::Clip;
use vjepa_storage::eval_epochs::EpochRow;
use vjepa_storage::features::{FeatureRow, read_features};
use vjepa_storage::predictions::{self, PredictionRow};

use crate::eval_resume;
use crate::extract::{self, Backbone, ExtractOptions, VideoSet};
use crate::stream_epochs;

/// What to probe.
#[derive(Clone, Debug)]
pub struct ProbeOptions {
    /// Feature extraction settings shared by both splits (`datasets`/`out`/`views`/`tokens`
    /// are set per split).
    pub extract: ExtractOptions,
    /// Labelled train index.
    pub train: String,
    /// Labelled validation index.
    pub val: String,
    /// Views per validation segment (training uses one, the centre).
    pub val_views: usize,
    /// Epochs over the train set.
    pub epochs: usize,
    /// Videos per probe step.
    pub batch_size: usize,
    /// Peak learning rate (cosine to 0, no warmup).
    pub lr: f64,
    /// Weight decay (cosine to 1e-6).
    pub weight_decay: f64,
    /// Share of each class's train videos used (the low-shot setting).
    pub label_fraction: f64,
    /// Seeds the probe init, the label subset and the shuffling.
    pub seed: u64,
    /// Directory (local) for the features, the probe and the predictions.
    pub out_dir: std::path::PathBuf,
    /// Whether clips are read once and held (the probe: their tokens, also written to
    /// Parquet; fine-tuning: the decoded clips), or read again every epoch.
    pub cache: Cache,
    /// How train clips are made: the official training transform drawn anew every epoch, or
    /// the fixed evaluation view.
    pub augment: Augment,
    /// Evaluate on the validation split after every this many epochs as well (the official
    /// evaluation: 1); 0: only after the last.
    pub val_every: usize,
    /// Classes the evaluation config announces (`data.num_classes`): with integer labels,
    /// the head's outputs (see [`classes`]).
    pub num_classes: Option<usize>,
}

/// How the train split's clips are made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Augment {
    /// The official evaluation's training transform (spec §9): every epoch each video's
    /// segments are drawn again (random windows) and each clip goes through RandAugment
    /// `rand-m7-n4-mstd0.5-inc1`, a random resized crop (scale 0.08–1, aspect 3/4–4/3) and
    /// random erasing (p 0.25). The clips change every epoch, so they are streamed.
    #[default]
    Official,
    /// The evaluation's single view of the same segments every epoch (deterministic; the
    /// tokens or clips can be held in memory).
    None,
}

impl std::fmt::Display for Augment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Augment::Official => "official",
            Augment::None => "none",
        })
    }
}

impl std::str::FromStr for Augment {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "official" => Ok(Augment::Official),
            "none" => Ok(Augment::None),
            other => Err(format!("`{other}`: expected official or none")),
        }
    }
}

/// Why `cache` cannot go with `augment`, if it cannot: official augmentation draws new train
/// clips every epoch, so nothing can be held between epochs. `flag` names the cache option
/// (`--token-cache` for the probe, `--clip-cache` for fine-tuning).
pub fn held_augmented_clips(cache: Cache, augment: Augment, flag: &str) -> Option<String> {
    (cache == Cache::Memory && augment == Augment::Official).then(|| {
        format!(
            "--augment official draws new train clips every epoch, so they cannot be held in \
             memory ({flag} memory): use {flag} none or auto, or --augment none"
        )
    })
}

/// What `vjepa probe` (the backbone's tokens) and `vjepa finetune` (the decoded clips) keep
/// between epochs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Cache {
    /// `memory` when both splits fit in [`AUTO_MEMORY_BYTES`] (f32), else `none`.
    #[default]
    Auto,
    /// Read every clip once and hold it: fast, for small benchmarks. The probe also writes the
    /// tokens to `train-features.parquet` / `val-features.parquet`.
    Memory,
    /// Keep nothing: every epoch streams the train videos through the decoder (and, for the
    /// probe, the frozen backbone) again, as the official evaluation does, so memory and disk
    /// stay flat whatever the dataset's size; evaluation streams the validation videos each time it runs.
    None,
}

/// The most bytes (train + validation, f32) `auto` holds in memory: 4 GiB. A ViT-L/16 clip is
/// 6.4 MB of tokens (1,568 × 1,024) or 9.6 MB of pixels (3 × 16 × 224²), so about 400–600 clips.
pub const AUTO_MEMORY_BYTES: u64 = 4 << 30;

impl Cache {
    /// Whether to read the clips again every epoch, for `bytes` of held data.
    pub fn streams(self, bytes: u64) -> bool {
        match self {
            Cache::Memory => false,
            Cache::None => true,
            Cache::Auto => bytes > AUTO_MEMORY_BYTES,
        }
    }
}

impl std::str::FromStr for Cache {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Cache::Auto),
            "memory" => Ok(Cache::Memory),
            "none" => Ok(Cache::None),
            other => Err(format!(
                "unknown token cache {other:?} (expected auto, memory or none)"
            )),
        }
    }
}

/// The result.
#[derive(Clone, Debug, PartialEq)]
pub struct ProbeSummary {
    pub top1: f64,
    pub correct: usize,
    pub evaluated: usize,
    pub train_videos: usize,
    pub classes: Vec<String>,
    pub final_loss: f64,
    /// Top-1 (%) on the last epoch's train batches, each before its update (the train
    /// accuracy the official evaluation logs).
    pub train_top1: f64,
}

/// A video's tokens: its segments' outputs concatenated, per view.
struct Sample {
    uri: String,
    label: usize,
    /// One `[S·N, D]` token matrix per view (row-major).
    views: Vec<Vec<f32>>,
    tokens: usize,
}

/// Per view, per segment: the clip's tokens.
type ViewTokens = BTreeMap<u64, BTreeMap<u64, Vec<f32>>>;

fn group(
    rows: Vec<FeatureRow>,
    classes: &BTreeMap<String, usize>,
    d: usize,
) -> anyhow::Result<Vec<Sample>> {
    // Rows come in video order, segment-major then view.
    let mut by_video: BTreeMap<usize, (String, String, ViewTokens)> = BTreeMap::new();
    let mut order: BTreeMap<String, usize> = BTreeMap::new();
    for r in rows {
        if r.tokens.is_empty() || r.tokens.len() % d != 0 {
            bail!("{}: features without tokens", r.uri);
        }
        let next = order.len();
        let i = *order.entry(r.uri.clone()).or_insert(next);
        let entry = by_video
            .entry(i)
            .or_insert_with(|| (r.uri.clone(), r.label.clone(), BTreeMap::new()));
        entry
            .2
            .entry(r.view)
            .or_default()
            .insert(r.segment, r.tokens);
    }
    let mut out = Vec::new();
    for (_, (uri, label, views)) in by_video {
        let Some(&class) = classes.get(&label) else {
            bail!("{uri}: label `{label}` is not a class of the train set");
        };
        let mut per_view = Vec::new();
        let mut tokens = 0;
        for (_, segments) in views {
            let cat: Vec<f32> = segments.into_values().flatten().collect();
            tokens = cat.len() / d;
            per_view.push(cat);
        }
        out.push(Sample {
            uri,
            label: class,
            views: per_view,
            tokens,
        });
    }
    Ok(out)
}

/// Class names in order: numerically when every label is an integer, else lexically.
fn class_names(labels: &BTreeSet<String>) -> Vec<String> {
    let mut names: Vec<String> = labels.iter().cloned().collect();
    if names.iter().all(|l| l.parse::<i64>().is_ok()) {
        names.sort_by_key(|l| l.parse::<i64>().unwrap_or(0));
    }
    names
}

/// Extracts `index`'s tokens into `out_dir/name` with the loaded backbone and reads them back.
fn features_of(
    opts: &ProbeOptions,
    backbone: Backbone,
    handle: &tokio::runtime::Handle,
    (index, set): (&str, VideoSet),
    name: &str,
    views: usize,
) -> anyhow::Result<(Vec<FeatureRow>, vjepa_model::EncoderConfig, Backbone)> {
    let path = opts.out_dir.join(name);
    let mut e = opts.extract.clone();
    e.datasets = vec![index.to_string()];
    e.out = path.display().to_string();
    e.views = views;
    e.tokens = true;
    let (summary, backbone) = extract::run_with(e, Some(set), backbone, handle)
        .with_context(|| format!("extracting features of {index}"))?;
    if summary.quarantined > 0 {
        tracing::warn!(
            index,
            quarantined = summary.quarantined,
            records = %summary.quarantine_output,
            "videos left out of the probe"
        );
    }
    let store = vjepa_storage::Store::open(
        &opts.out_dir.display().to_string(),
        &Default::default(),
        false,
    )?;
    let rows = handle.block_on(read_features(&store, name))?;
    Ok((rows, summary.encoder, backbone))
}

/// The probe with nothing held between epochs ([`Cache::None`]; see
/// [`crate::stream_epochs`]): the frozen backbone encodes every epoch's train clips.
fn run_streaming(
    opts: &ProbeOptions,
    backbone: Backbone,
    train: VideoSet,
    val: VideoSet,
    handle: &tokio::runtime::Handle,
) -> anyhow::Result<ProbeSummary> {
    let enc = backbone.config().clone();
    let size = opts.extract.size.unwrap_or(enc.crop_size);
    let device = open_device(opts)?;
    let make = |classes: usize, videos: usize| -> anyhow::Result<ProbeLearner> {
        let probe = AttentiveProbe::new(head_config(&enc, classes), opts.seed, &device)?;
        Ok(ProbeLearner {
            backbone,
            trainer: ProbeTrainer::new(probe, probe_optim(opts, videos))?,
            encode_batch: opts.extract.batch_size,
        })
    };
    stream_epochs::run(
        opts,
        train,
        val,
        (enc.num_frames, size),
        handle,
        "probe",
        make,
    )
}

/// The probe's head for an encoder of shape `enc` (spec §9: the encoder's width and heads).
pub(crate) fn head_config(enc: &vjepa_model::EncoderConfig, classes: usize) -> ProbeConfig {
    ProbeConfig {
        embed_dim: enc.embed_dim,
        num_heads: enc.num_heads,
        num_classes: classes,
        mlp_ratio: 4.0,
    }
}

fn open_device(opts: &ProbeOptions) -> anyhow::Result<vjepa_model::Device> {
    opts.extract
        .device
        .open()
        .with_context(|| format!("opening device {}", opts.extract.device))
}

/// The frozen backbone and the probe being trained on its tokens.
struct ProbeLearner {
    backbone: Backbone,
    trainer: ProbeTrainer,
    encode_batch: usize,
}

impl ProbeLearner {
    /// `[1, N, D]` tokens per clip.
    fn encode(&self, clips: &[Clip]) -> anyhow::Result<Vec<Tensor>> {
        let mut out = Vec::with_capacity(clips.len());
        for chunk in clips.chunks(self.encode_batch.max(1)) {
            let features = self.backbone.encode(chunk)?;
            for i in 0..chunk.len() {
                out.push(features.narrow(0, i, 1)?);
            }
        }
        Ok(out)
    }
}

impl stream_epochs::Learner for ProbeLearner {
    /// A video's segments' tokens, concatenated: `[1, S·N, D]`.
    type Video = Tensor;

    fn videos(
        &mut self,
        clips: &[Clip],
        videos: &[std::ops::Range<usize>],
    ) -> anyhow::Result<Vec<Tensor>> {
        let tokens = self.encode(clips)?;
        videos
            .iter()
            .map(|r| Ok(Tensor::cat(&tokens[r.clone()], 1)?))
            .collect()
    }

    fn step(&mut self, batch: Vec<Tensor>, labels: &[u32]) -> anyhow::Result<(f64, usize)> {
        let s = self.trainer.step(&Tensor::cat(&batch, 0)?, labels)?;
        Ok((s.loss, s.correct))
    }

    fn predict(
        &mut self,
        clips: &[Clip],
        videos: &[std::ops::Range<usize>],
        segments: usize,
        views: usize,
    ) -> anyhow::Result<Vec<Vec<f32>>> {
        let tokens = self.encode(clips)?;
        let mut out = Vec::with_capacity(videos.len());
        for r in videos {
            // Per view, its segments in order, one probe pass each; the probabilities averaged
            // over the views in the order and arithmetic of the held-tokens path, so both
            // give the same numbers to the bit.
            let mut mean: Vec<f32> = Vec::new();
            for v in 0..views {
                let segs: Vec<&Tensor> = (0..segments)
                    .map(|s| &tokens[r.start + s * views + v])
                    .collect();
                let p = self
                    .trainer
                    .probe()
                    .probabilities(&Tensor::cat(&segs, 1)?)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                mean.resize(p.len(), 0.0);
                for (m, p) in mean.iter_mut().zip(p) {
                    *m += p / views as f32;
                }
            }
            out.push(mean);
        }
        Ok(out)
    }

    fn save(&self, dir: &std::path::Path) -> anyhow::Result<()> {
        let bytes = self.trainer.probe().to_safetensors()?;
        Ok(std::fs::write(dir.join("probe.safetensors"), bytes)?)
    }

    fn settings(&self) -> String {
        "probe".to_string()
    }

    fn save_state(
        &self,
        meta: std::collections::HashMap<String, String>,
    ) -> anyhow::Result<Vec<u8>> {
        Ok(self.trainer.save_state(meta)?)
    }

    fn restore_state(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        self.trainer.restore_state(bytes)?;
        Ok(())
    }
}

/// Checks the options shared by `probe` and `finetune` and creates the output directory.
pub(crate) fn prepare(opts: &ProbeOptions) -> anyhow::Result<()> {
    if !(opts.label_fraction > 0.0 && opts.label_fraction <= 1.0) {
        crate::refuse!(
            "--label-fraction must be in (0, 1], got {}",
            opts.label_fraction
        );
    }
    if opts.epochs == 0 || opts.batch_size == 0 || opts.val_views == 0 {
        crate::refuse!("--epochs, --batch-size and --views must be positive");
    }
    extract::check_video_decoder(&opts.extract)?;
    // A local index that is not there fails now, not after the checkpoint has loaded (an
    // object-store index is read, and reported, when the split is opened).
    for (flag, index) in [("--train", &opts.train), ("--val", &opts.val)] {
        let local = !index.contains("://");
        if local && !std::path::Path::new(index).exists() {
            crate::refuse!("{flag} {index}: no such file or directory");
        }
    }
    let checkpoint = &opts.extract.checkpoint;
    if !checkpoint.contains("://") && !std::path::Path::new(checkpoint).exists() {
        crate::refuse!("--checkpoint {checkpoint}: no such file or directory");
    }
    let state = opts.out_dir.join(crate::eval_resume::FILE);
    if state.is_dir() {
        crate::refuse!(
            "{} is a directory: the run's state file goes there",
            state.display()
        );
    }
    if opts.out_dir.exists() && !opts.out_dir.is_dir() {
        crate::refuse!(
            "--out {}: exists and is not a directory",
            opts.out_dir.display()
        );
    }
    std::fs::create_dir_all(&opts.out_dir)
        .with_context(|| format!("creating {}", opts.out_dir.display()))?;
    // The run replaces these as it finishes: a checkpoint among them would be lost.
    let checkpoint = std::path::Path::new(&opts.extract.checkpoint);
    if let Ok(input) = checkpoint.canonicalize() {
        for name in RESULTS {
            if opts.out_dir.join(name).canonicalize().ok().as_ref() == Some(&input) {
                crate::refuse!(
                    "--checkpoint {} is this run's own output {name} in --out: give another --out",
                    checkpoint.display()
                );
            }
        }
    }
    Ok(())
}

/// What a finished run leaves in `--out`.
const RESULTS: [&str; 3] = [
    "predictions.parquet",
    "probe.safetensors",
    "encoder.safetensors",
];

/// Removes an earlier run's results from `--out`, once the inputs are open and checked (a run
/// refused before any work leaves them): they must not pass for this run's if it fails (they
/// are written again when it is done). A run that holds its clips (`held`) also removes the
/// streamed runs' split quarantine tables (it writes none; a streamed run removes them itself
/// when it does not continue a stopped one), and a streamed run the held runs' token tables.
pub(crate) fn clear_earlier_outputs(dir: &std::path::Path, held: bool) {
    for name in RESULTS {
        let _ = std::fs::remove_file(dir.join(name));
    }
    if held {
        remove_split_tables(dir);
    } else {
        for name in [
            "train-features.parquet",
            "val-features.parquet",
            "train-features.quarantine.parquet",
            "val-features.quarantine.parquet",
        ] {
            let _ = std::fs::remove_file(dir.join(name));
        }
    }
}

/// Removes the streamed runs' quarantine tables (`train[.epoch-N]`, `val[.epoch-N]`) of an
/// earlier run in `dir`, so a run starting afresh leaves only its own.
pub(crate) fn remove_split_tables(dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let split_table = ["train", "val"].iter().any(|split| {
            name == format!("{split}.quarantine.parquet")
                || (name.starts_with(&format!("{split}.epoch-"))
                    && name.ends_with(".quarantine.parquet"))
        });
        if split_table {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// The classes, in the head's output order, and each label's index. With `announced`
/// classes (an evaluation config's `data.num_classes`) and integer labels below it, as the
/// official CSVs have, the head has one output per announced class and label `k` is output
/// `k` (the official classifier's layout); otherwise one per label found, with a warning when
/// an announced count differs (in [`class_names`] order). At least two labels, none empty.
pub(crate) fn classes(
    labels: BTreeSet<String>,
    announced: Option<usize>,
) -> anyhow::Result<(Vec<String>, BTreeMap<String, usize>)> {
    if labels.len() < 2 || labels.contains("") {
        crate::refuse!(
            "the train index needs a label column with at least two classes (found {:?})",
            labels
        );
    }
    let integer = |l: &String| l.parse::<usize>().is_ok_and(|k| k.to_string() == *l);
    let names = match announced {
        Some(n) if labels.iter().all(integer) => {
            // The official classifier: output k is label k, for k below num_classes.
            if let Some(big) = labels
                .iter()
                .find(|l| l.parse::<usize>().is_ok_and(|k| k >= n))
            {
                crate::refuse!(
                    "train label `{big}` is not below data.num_classes {n} (the official labels \
                     are 0 … num_classes − 1)"
                );
            }
            (0..n).map(|k| k.to_string()).collect()
        }
        Some(n) => {
            let example = labels
                .iter()
                .find(|l| !integer(l))
                .cloned()
                .unwrap_or_default();
            tracing::warn!(
                announced = n,
                found = labels.len(),
                example = %example,
                "the train index's labels are not integers (data.num_classes counts integer \
                 labels 0 … num_classes − 1): the probe has one output per label found"
            );
            class_names(&labels)
        }
        None => class_names(&labels),
    };
    let index = names
        .iter()
        .enumerate()
        .map(|(i, c)| (c.clone(), i))
        .collect();
    Ok((names, index))
}

/// The low-shot subset: per class, a seeded choice of ceil(fraction · count) items (at least
/// one); everything when the fraction is 1.
pub(crate) fn low_shot<T>(
    items: Vec<T>,
    label: impl Fn(&T) -> usize,
    classes: usize,
    fraction: f64,
    rng: &mut ChaCha8Rng,
) -> Vec<T> {
    if fraction >= 1.0 {
        return items;
    }
    let mut by_class: Vec<Vec<T>> = (0..classes).map(|_| Vec::new()).collect();
    for item in items {
        let c = label(&item);
        if let Some(v) = by_class.get_mut(c) {
            v.push(item);
        }
    }
    let mut keep = Vec::new();
    for mut of_class in by_class {
        of_class.shuffle(rng);
        let n = ((of_class.len() as f64 * fraction).ceil() as usize).max(1);
        keep.extend(of_class.into_iter().take(n));
    }
    keep
}

/// The probe's optimisation for `train` videos per epoch (the official video values with the
/// given lr and weight decay).
pub(crate) fn probe_optim(opts: &ProbeOptions, train: usize) -> ProbeOptim {
    let steps_per_epoch = train.div_ceil(opts.batch_size.max(1)) as u64;
    let mut optim = ProbeOptim::video(steps_per_epoch * opts.epochs as u64);
    optim.lr = opts.lr;
    optim.weight_decay = opts.weight_decay;
    optim
}

/// One validation video's class probabilities, averaged over its views.
pub(crate) struct Prediction {
    pub(crate) uri: String,
    pub(crate) label: usize,
    pub(crate) probabilities: Vec<f32>,
}

/// The predictions table's rows: each video's predicted class and whether it is right.
pub(crate) fn prediction_rows(
    classes: &[String],
    predictions: &[Prediction],
) -> Vec<PredictionRow> {
    predictions
        .iter()
        .map(|p| PredictionRow::new(p.uri.clone(), p.label, p.probabilities.clone(), classes))
        .collect()
}

/// Whether the run evaluates on the validation split after epoch `epoch` (0-based) of
/// `epochs`: after every `every`-th epoch (the official evaluation: every epoch; 0: none),
/// and always after the last, whose evaluation is the run's result.
pub(crate) fn evaluates_after(epoch: usize, epochs: usize, every: usize) -> bool {
    epoch + 1 == epochs || (every > 0 && (epoch + 1).is_multiple_of(every))
}

/// `epochs.parquet` in the output directory, rewritten whole after every epoch (so it can be
/// read while the run goes and survives a run that fails later), and the epoch's log line.
pub(crate) struct EpochLog {
    path: std::path::PathBuf,
    what: String,
    rows: Vec<EpochRow>,
    started: std::time::Instant,
}

impl EpochLog {
    /// The log of a run writing into `dir`; `what` names it in log lines.
    pub(crate) fn new(dir: &std::path::Path, what: &str) -> Self {
        Self {
            path: dir.join("epochs.parquet"),
            what: what.to_string(),
            rows: Vec::new(),
            started: std::time::Instant::now(),
        }
    }

    /// Starts the table again (a run that does not continue a stopped one: an earlier run's
    /// table is not left to look like this one's).
    pub(crate) fn fresh(&mut self) {
        self.rows.clear();
        let _ = std::fs::remove_file(&self.path);
    }

    /// Starts the clock of the next epoch (its row's `seconds`: its training and validation).
    pub(crate) fn start_epoch(&mut self) {
        self.started = std::time::Instant::now();
    }

    /// Continues after `epochs_done` epochs of a stopped run: their rows are kept from the
    /// table it wrote (a table that cannot be read is started again, with a warning).
    pub(crate) fn resume(&mut self, epochs_done: usize) {
        match vjepa_storage::eval_epochs::read_file(&self.path) {
            Ok(rows) => {
                self.rows = rows
                    .into_iter()
                    .filter(|r| r.epoch as usize <= epochs_done)
                    .collect();
            }
            Err(e) => tracing::warn!(
                error = %e,
                "{}: the epochs table of the stopped run cannot be read; it restarts here",
                self.what
            ),
        }
    }

    /// Records epoch `epoch` (0-based): its training, and its validation rows where the run
    /// evaluated after it. A validation with no video is an error (every one quarantined).
    pub(crate) fn record(
        &mut self,
        epoch: usize,
        score: &EpochScore,
        val: Option<&[PredictionRow]>,
    ) -> anyhow::Result<()> {
        let (val_top1, val_videos) = match val {
            Some([]) => bail!("{}", no_validation_video()),
            Some(rows) => (
                100.0 * rows.iter().filter(|r| r.correct).count() as f64 / rows.len() as f64,
                rows.len(),
            ),
            None => (f64::NAN, 0),
        };
        match val {
            Some(_) => tracing::info!(
                epoch = epoch + 1,
                loss = rounded(score.loss(), 4),
                train_top1 = rounded(score.top1(), 2),
                val_top1 = rounded(val_top1, 2),
                val_videos,
                "{}",
                self.what
            ),
            None => tracing::info!(
                epoch = epoch + 1,
                loss = rounded(score.loss(), 4),
                train_top1 = rounded(score.top1(), 2),
                "{}",
                self.what
            ),
        }
        self.rows.push(EpochRow {
            epoch: epoch as u64 + 1,
            time_unix_us: crate::now_unix_us(),
            train_loss: score.loss(),
            train_top1: score.top1(),
            train_videos: score.seen as u64,
            val_top1,
            val_videos: val_videos as u64,
            seconds: self.started.elapsed().as_secs_f64(),
        });
        predictions::write_file(&self.path, &self.rows)?;
        Ok(())
    }
}

/// `x` to `digits` decimals, as a number (a JSON log keeps it a number, a text log short).
fn rounded(x: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    (x * scale).round() / scale
}

fn no_validation_video() -> &'static str {
    "no validation video could be read: every one was quarantined or refused (their reasons \
     are in the `val*.quarantine.parquet` table in the output directory)"
}

/// One epoch's training record, shared by the probe and fine-tuning on either path: the mean
/// loss of its steps and its train top-1 (each batch scored before its update, the train
/// accuracy the official evaluation logs).
#[derive(Clone, Debug, Default)]
pub(crate) struct EpochScore {
    losses: Vec<f64>,
    right: usize,
    seen: usize,
}

impl EpochScore {
    /// One step: its loss, and how many of its `n` videos the head got right.
    pub(crate) fn add(&mut self, loss: f64, right: usize, n: usize) {
        self.losses.push(loss);
        self.right += right;
        self.seen += n;
    }

    /// Mean loss over the steps (NaN before any).
    pub(crate) fn loss(&self) -> f64 {
        if self.losses.is_empty() {
            return f64::NAN;
        }
        self.losses.iter().sum::<f64>() / self.losses.len() as f64
    }

    /// Train top-1 in % (NaN before any step).
    pub(crate) fn top1(&self) -> f64 {
        if self.seen == 0 {
            return f64::NAN;
        }
        100.0 * self.right as f64 / self.seen as f64
    }
}

impl ProbeSummary {
    /// The result of the last evaluation (`rows`, one per validation video), after writing it
    /// to `predictions.parquet` in `dir`; an error when no validation video could be read (a
    /// top-1 of nothing is not a score, and no empty table is left).
    pub(crate) fn write(
        dir: &std::path::Path,
        rows: &[PredictionRow],
        train_videos: usize,
        classes: Vec<String>,
        last_epoch: &EpochScore,
    ) -> anyhow::Result<Self> {
        if rows.is_empty() {
            anyhow::bail!("{}", no_validation_video());
        }
        predictions::write_file(&dir.join("predictions.parquet"), rows)?;
        let correct = rows.iter().filter(|r| r.correct).count();
        Ok(Self {
            top1: 100.0 * correct as f64 / rows.len() as f64,
            correct,
            evaluated: rows.len(),
            train_videos,
            classes,
            final_loss: last_epoch.loss(),
            train_top1: last_epoch.top1(),
        })
    }
}

/// Runs the probe: extract, train, evaluate, write.
pub fn run(opts: ProbeOptions) -> anyhow::Result<ProbeSummary> {
    prepare(&opts)?;
    let (runtime, backbone) = extract::open_backbone(&opts.extract)?;
    let handle = runtime.handle();
    let enc = backbone.config();
    let size = opts.extract.size.unwrap_or(enc.crop_size);
    let tokens = (enc.num_frames / enc.tubelet_size.max(1)) * (size / enc.patch_size.max(1)).pow(2);
    let bytes_per_clip = (tokens * enc.embed_dim * 4) as u64;
    let (train, val, stream) =
        stream_epochs::open_splits(&opts, bytes_per_clip, handle, "probe tokens")?;
    clear_earlier_outputs(&opts.out_dir, !stream);
    if stream {
        run_streaming(&opts, backbone, train, val, handle)
    } else {
        run_in_memory(&opts, backbone, train, val, handle)
    }
}

/// The probe on tokens extracted once and held in memory ([`Cache::Memory`]).
fn run_in_memory(
    opts: &ProbeOptions,
    backbone: Backbone,
    train: VideoSet,
    val: VideoSet,
    handle: &tokio::runtime::Handle,
) -> anyhow::Result<ProbeSummary> {
    let (train_rows, encoder, backbone) = features_of(
        opts,
        backbone,
        handle,
        (&opts.train, train),
        "train-features.parquet",
        1,
    )?;
    let (val_rows, _, _) = features_of(
        opts,
        backbone,
        handle,
        (&opts.val, val),
        "val-features.parquet",
        opts.val_views,
    )?;
    let d = train_rows
        .first()
        .map(|r| r.embedding.len())
        .context("no train clip could be read")?;
    let (classes, class_of) = classes(
        train_rows.iter().map(|r| r.label.clone()).collect(),
        opts.num_classes,
    )?;
    let train = group(train_rows, &class_of, d)?;
    let val = group(val_rows, &class_of, d)?;
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    let train = low_shot(
        train,
        |s| s.label,
        classes.len(),
        opts.label_fraction,
        &mut rng,
    );
    let device = open_device(opts)?;
    let probe = AttentiveProbe::new(head_config(&encoder, classes.len()), opts.seed, &device)?;
    let mut trainer = ProbeTrainer::new(probe, probe_optim(opts, train.len()))?;
    // Probabilities averaged over views.
    let evaluate = |probe: &AttentiveProbe| -> anyhow::Result<Vec<PredictionRow>> {
        let mut predictions = Vec::with_capacity(val.len());
        for s in &val {
            let mut mean = vec![0f32; classes.len()];
            for view in &s.views {
                let x = Tensor::from_vec(view.clone(), (1, s.tokens, d), &device)?;
                let p = probe.probabilities(&x)?.flatten_all()?.to_vec1::<f32>()?;
                for (m, v) in mean.iter_mut().zip(p) {
                    *m += v / s.views.len() as f32;
                }
            }
            predictions.push(Prediction {
                uri: s.uri.clone(),
                label: s.label,
                probabilities: mean,
            });
        }
        Ok(prediction_rows(&classes, &predictions))
    };
    let mut order: Vec<usize> = (0..train.len()).collect();
    let mut score = EpochScore::default();
    let mut log = EpochLog::new(&opts.out_dir, "probe");
    let mut rows = Vec::new();
    let uris = |s: &[Sample]| {
        s.iter()
            .map(|s| format!("{} {}", s.uri, s.label))
            .collect::<Vec<_>>()
    };
    let fingerprint = eval_resume::fingerprint(opts, "probe", &uris(&train), &uris(&val));
    let start = eval_resume::resume_held(
        opts,
        &fingerprint,
        "probe",
        &mut rng,
        &mut order,
        &mut log,
        |bytes| Ok(trainer.restore_state(bytes).map(|_| ())?),
    )?;
    for epoch in start..opts.epochs {
        log.start_epoch();
        order.shuffle(&mut rng);
        score = EpochScore::default();
        for chunk in order.chunks(opts.batch_size) {
            let n = train[chunk[0]].tokens;
            let mut data = Vec::with_capacity(chunk.len() * n * d);
            let mut labels = Vec::with_capacity(chunk.len());
            for &i in chunk {
                if train[i].tokens != n {
                    bail!("{}: {} tokens, others {n}", train[i].uri, train[i].tokens);
                }
                data.extend_from_slice(&train[i].views[0]);
                labels.push(train[i].label as u32);
            }
            let x = Tensor::from_vec(data, (chunk.len(), n, d), &device)?;
            let s = trainer.step(&x, &labels)?;
            score.add(s.loss, s.correct, labels.len());
        }
        let evaluated = evaluates_after(epoch, opts.epochs, opts.val_every);
        if evaluated {
            rows = evaluate(trainer.probe())?;
        }
        log.record(epoch, &score, evaluated.then_some(rows.as_slice()))?;
        if epoch + 1 == opts.epochs {
            std::fs::write(
                opts.out_dir.join("probe.safetensors"),
                trainer.probe().to_safetensors()?,
            )?;
        }
        eval_resume::save_held(opts, &fingerprint, epoch, &rng, &order, |meta| {
            Ok(trainer.save_state(meta)?)
        })?;
    }
    let summary = ProbeSummary::write(&opts.out_dir, &rows, train.len(), classes, &score)?;
    eval_resume::finish(&opts.out_dir);
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announced_integer_classes_keep_the_official_layout() {
        let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        // Labels 0, 2 and 7 of 10 announced: ten outputs, label k at output k.
        let (names, of) = classes(set(&["7", "0", "2"]), Some(10)).unwrap();
        assert_eq!(names.len(), 10);
        assert_eq!((of["0"], of["2"], of["7"]), (0, 2, 7));
        // Without an announcement, or with labels that are not its integers: one output per
        // label found (integers in numeric order).
        let (names, of) = classes(set(&["7", "10", "2"]), None).unwrap();
        assert_eq!(names, vec!["2", "7", "10"]);
        assert_eq!(of["10"], 2);
        assert!(
            classes(set(&["7", "12"]), Some(10))
                .unwrap_err()
                .to_string()
                .contains("`12` is not below data.num_classes 10")
        );
        assert!(
            classes(set(&["1", "2", "3"]), Some(3)).is_err(),
            "1-based labels"
        );
        assert_eq!(
            classes(set(&["cat", "dog"]), Some(2)).unwrap().0,
            vec!["cat", "dog"]
        );
        assert_eq!(
            classes(set(&["01", "x"]), Some(5)).unwrap().0.len(),
            2,
            "not all canonical integers: one output per label"
        );
    }

    #[test]
    fn evaluations_follow_val_every_and_always_end_the_run() {
        let after = |epochs, every| {
            (0..epochs)
                .filter(|&e| evaluates_after(e, epochs, every))
                .map(|e| e + 1)
                .collect::<Vec<_>>()
        };
        assert_eq!(after(5, 0), [5]);
        assert_eq!(after(5, 1), [1, 2, 3, 4, 5]);
        assert_eq!(after(5, 2), [2, 4, 5]);
        assert_eq!(after(6, 3), [3, 6]);
        assert_eq!(after(3, 10), [3]);
        assert_eq!(after(1, 0), [1]);
    }

    #[test]
    fn cache_names_and_the_auto_rule() {
        assert_eq!("auto".parse::<Cache>(), Ok(Cache::Auto));
        assert_eq!("memory".parse::<Cache>(), Ok(Cache::Memory));
        assert_eq!("none".parse::<Cache>(), Ok(Cache::None));
        assert!(
            "disk"
                .parse::<Cache>()
                .unwrap_err()
                .contains("auto, memory or none")
        );
        assert!(!Cache::Auto.streams(AUTO_MEMORY_BYTES));
        assert!(Cache::Auto.streams(AUTO_MEMORY_BYTES + 1));
        assert!(!Cache::Memory.streams(u64::MAX));
        assert!(Cache::None.streams(0));
    }
}
