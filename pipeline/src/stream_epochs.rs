//! Probe and fine-tuning with nothing held between epochs ([`crate::probe::Cache::None`]):
//! every epoch streams the train videos through [`crate::extract`]'s dataflow (shuffled into
//! the batches the in-memory paths make: same low-shot subset, same seeded order), and the
//! validation videos are streamed at each evaluation ([`probe::evaluates_after`]). What differs between the probe and
//! fine-tuning (what a video contributes, how a step and a prediction are made) is a
//! [`Learner`]; the epochs, batching, labels and outputs are here once.

use std::collections::BTreeMap;
use std::ops::Range;

use anyhow::{Context, bail};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use vjepa_operators::records::Clip;
use vjepa_operators::seeding::mix64;

use crate::eval_resume::{self, Progress};
use crate::extract::{self, ClipConsumer, Order, VideoSet};
use crate::probe::{self, Prediction, ProbeOptions, ProbeSummary};

/// The model side of a streamed probe or fine-tuning run.
pub(crate) trait Learner: Send + 'static {
    /// What one train video contributes to a batch.
    type Video: Send + 'static;

    /// The inputs of the train videos in `videos` (ranges of `clips`, each a video's segments
    /// in order), from the clips of one dataflow time.
    fn videos(
        &mut self,
        clips: &[Clip],
        videos: &[Range<usize>],
    ) -> anyhow::Result<Vec<Self::Video>>;

    /// One optimisation step on a batch of videos; returns its loss and how many of the
    /// batch the head got right before the update.
    fn step(&mut self, batch: Vec<Self::Video>, labels: &[u32]) -> anyhow::Result<(f64, usize)>;

    /// Class probabilities of each validation video in `videos`, averaged over its views
    /// (clip slot = segment · views + view).
    fn predict(
        &mut self,
        clips: &[Clip],
        videos: &[Range<usize>],
        segments: usize,
        views: usize,
    ) -> anyhow::Result<Vec<Vec<f32>>>;

    /// Writes what was trained into the run's output directory.
    fn save(&self, dir: &std::path::Path) -> anyhow::Result<()>;

    /// What the learner adds to the run's settings (for [`eval_resume::fingerprint`]).
    fn settings(&self) -> String;

    /// Its training state with `meta` beside, to continue from after a stop.
    fn save_state(
        &self,
        meta: std::collections::HashMap<String, String>,
    ) -> anyhow::Result<Vec<u8>>;

    /// Continues from [`Self::save_state`]'s bytes; unchanged when they do not fit.
    fn restore_state(&mut self, bytes: &[u8]) -> anyhow::Result<()>;
}

/// The train and validation listings, their labels checked, and whether `opts.cache` says to
/// stream them (`auto`: when both splits' clips, `bytes_per_clip` each once read, would not
/// fit in [`probe::AUTO_MEMORY_BYTES`]) rather than hold them. Either way the listings are
/// the run's: read once.
pub(crate) fn open_splits(
    opts: &ProbeOptions,
    bytes_per_clip: u64,
    handle: &tokio::runtime::Handle,
    what: &str,
) -> anyhow::Result<(VideoSet, VideoSet, bool)> {
    let augmented = opts.augment == probe::Augment::Official;
    if let Some(why) = probe::held_augmented_clips(opts.cache, opts.augment, "the cache") {
        bail!("{why}");
    }
    let s3 = &opts.extract.s3;
    let root = opts.extract.index_root.as_deref();
    let train = VideoSet::open(std::slice::from_ref(&opts.train), root, s3, handle)?;
    let val = VideoSet::open(std::slice::from_ref(&opts.val), root, s3, handle)?;
    // Labels the head cannot take fail now, in every mode, not after the clips are read.
    check_labels(opts, &train, &val)?;
    if opts.cache == probe::Cache::Memory {
        return Ok((train, val, false));
    }
    let clips = (train.len() + val.len() * opts.val_views) * opts.extract.segments;
    let bytes = clips as u64 * bytes_per_clip;
    let stream = augmented || opts.cache.streams(bytes);
    tracing::info!(
        bytes,
        cache = if augmented {
            "none: train clips drawn anew every epoch (--augment official)"
        } else if stream {
            "none: read every epoch"
        } else {
            "memory"
        },
        "{what}: data held between epochs"
    );
    Ok((train, val, stream))
}

/// Refuses labels the head cannot take: the train index's (too few, empty, at or above an
/// announced class count) and any validation label that is not one of its classes.
fn check_labels(opts: &ProbeOptions, train: &VideoSet, val: &VideoSet) -> anyhow::Result<()> {
    let (_, class_of) = probe::classes(train.labels().into_iter().collect(), opts.num_classes)?;
    if let Some(label) = val.labels().into_iter().find(|l| !class_of.contains_key(l)) {
        crate::refuse!(
            "{}: validation label `{label}` {}",
            vjepa_storage::redact_url(&opts.val),
            match opts.num_classes {
                Some(n) => format!(
                    "is not one of the classes (data.num_classes {n}, or the train index's labels)"
                ),
                None => "is not a class of the train index".to_string(),
            }
        );
    }
    Ok(())
}

/// Trains `make(classes, train videos)`'s learner for `opts.epochs` streamed epochs, evaluates
/// it on `val` after the epochs [`probe::evaluates_after`] names (recording each epoch in
/// `epochs.parquet`), saves it and writes the last evaluation's predictions. `what` names the run in logs.
pub(crate) fn run<L: Learner>(
    opts: &ProbeOptions,
    train: VideoSet,
    val: VideoSet,
    (frames, size): (usize, usize),
    handle: &tokio::runtime::Handle,
    what: &str,
    make: impl FnOnce(usize, usize) -> anyhow::Result<L>,
) -> anyhow::Result<ProbeSummary> {
    let labels = train.labels();
    let (classes, class_of) = probe::classes(labels.iter().cloned().collect(), opts.num_classes)?;
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    let listed: Vec<usize> = (0..train.len()).collect();
    let keep = probe::low_shot(
        listed,
        |&i| class_of.get(&labels[i]).copied().unwrap_or(usize::MAX),
        classes.len(),
        opts.label_fraction,
        &mut rng,
    );
    let segments = opts.extract.segments.max(1);
    let mut pass = TrainEpoch {
        learner: make(classes.len(), keep.len())?,
        class_of: class_of.clone(),
        segments,
        batch_size: opts.batch_size,
        pending: Vec::new(),
        score: probe::EpochScore::default(),
        videos: 0,
    };
    tracing::info!(
        train = keep.len(),
        val = val.len(),
        classes = classes.len(),
        "{what}: the clips are read again every epoch"
    );
    let mut e = opts.extract.clone();
    e.datasets = vec![opts.train.clone()];
    e.views = 1;
    e.progress = false;
    let augmented = opts.augment == probe::Augment::Official;
    if augmented {
        e.augment = Some(extract::TrainAugment::official(size));
    }
    let uris = train.uris();
    let mut keep = keep;
    let mut order: Vec<usize> = (0..keep.len()).collect();
    let mut score = probe::EpochScore::default();
    let mut trained = keep.len();
    let mut log = probe::EpochLog::new(&opts.out_dir, what);
    let listed = |set: &VideoSet| -> Vec<String> {
        set.uris()
            .into_iter()
            .zip(set.labels())
            .map(|(u, l)| format!("{u} {l}"))
            .collect()
    };
    let fingerprint = eval_resume::fingerprint(
        opts,
        &pass.learner.settings(),
        &listed(&train),
        &listed(&val),
    );
    let mut validation = Validation::new(opts, val);
    let mut rows = Vec::new();
    let mut left_out_train = std::collections::BTreeSet::new();
    let kept_after = |p: &Progress| {
        keep.iter()
            .filter(|&&i| !p.left_out_train.contains(&uris[i]))
            .count()
    };
    let saved = eval_resume::resume(
        opts,
        &fingerprint,
        what,
        &mut rng,
        &mut log,
        |p| p.order.len() == kept_after(p),
        |bytes| pass.learner.restore_state(bytes),
    )?;
    let start = match saved {
        Some(p) => {
            keep.retain(|&i| !p.left_out_train.contains(&uris[i]));
            validation.restore(&p.left_out_val, p.val_runs);
            left_out_train = p.left_out_train;
            order = p.order;
            p.epochs_done
        }
        None => {
            probe::remove_split_tables(&opts.out_dir);
            0
        }
    };
    for epoch in start..opts.epochs {
        log.start_epoch();
        order.shuffle(&mut rng);
        let videos: Vec<usize> = order.iter().map(|&p| keep[p]).collect();
        // The index lines refused while listing are recorded once, with the first epoch's.
        let set = match epoch {
            0 => train.reordered(&videos),
            _ => train.reordered(&videos).without_rejected(),
        };
        e.seed = epoch_seed(opts.extract.seed, augmented, epoch);
        // Each epoch's quarantine records in their own table (the first epoch's under the
        // split's name), so a later epoch does not replace an earlier one's.
        let name = split_table("train", epoch);
        let epoch_q = quarantine_location(opts, &name);
        let (mut done, streamed) =
            extract::stream_clips(&e, set, frames, size, &epoch_q, pass, handle)
                .with_context(|| format!("{what} epoch {}", epoch + 1))?;
        if !done.pending.is_empty() {
            done.step(done.pending.len())?; // the last, partial batch
        }
        if streamed.quarantined > 0 {
            tracing::warn!(
                epoch = epoch + 1,
                quarantined = streamed.quarantined,
                records = %streamed.quarantine_output,
                "{what}: train videos left out of this epoch"
            );
        } else if epoch > 0 {
            // Nothing to record: no empty table per epoch.
            let _ = std::fs::remove_file(opts.out_dir.join(format!("{name}.quarantine.parquet")));
        }
        trained = std::mem::take(&mut done.videos);
        if trained == 0 {
            bail!(
                "no train video could be read in epoch {}: every one was quarantined or refused \
                 (their reasons are in {})",
                epoch + 1,
                streamed.quarantine_output
            );
        }
        // A video that failed is not read again in later epochs (it would fail again, or
        // differently with other windows; its record is kept).
        if !streamed.quarantined_uris.is_empty() {
            let bad: std::collections::HashSet<&str> = streamed
                .quarantined_uris
                .iter()
                .map(String::as_str)
                .collect();
            keep.retain(|&i| !bad.contains(uris[i].as_str()));
            order = (0..keep.len()).collect();
            left_out_train.extend(streamed.quarantined_uris.iter().cloned());
        }
        score = std::mem::take(&mut done.score);
        let evaluated = probe::evaluates_after(epoch, opts.epochs, opts.val_every);
        pass = if evaluated {
            let (learner, predictions) =
                validation.run(done.learner, &class_of, epoch, (frames, size), handle, what)?;
            rows = probe::prediction_rows(&classes, &predictions);
            TrainEpoch { learner, ..done }
        } else {
            done
        };
        log.record(epoch, &score, evaluated.then_some(rows.as_slice()))?;
        if epoch + 1 == opts.epochs {
            // Once its evaluation is in: a run that fails leaves no trained head to pass for
            // a finished one (it continues from the last epoch saved).
            pass.learner.save(&opts.out_dir)?;
        } else {
            let mut progress = Progress {
                fingerprint: fingerprint.clone(),
                epochs_done: epoch + 1,
                order: order.clone(),
                left_out_train: left_out_train.clone(),
                left_out_val: validation.left_out.clone(),
                val_runs: validation.runs,
                ..Default::default()
            };
            progress.save_rng(&rng);
            eval_resume::save(&opts.out_dir, &progress, |meta| {
                pass.learner.save_state(meta)
            })?;
        }
    }
    let summary = ProbeSummary::write(&opts.out_dir, &rows, trained, classes, &score)?;
    eval_resume::finish(&opts.out_dir);
    Ok(summary)
}

/// The validation split, streamed after the epochs the run evaluates after: the same clips
/// each time (the evaluation's seed), less the videos an earlier evaluation quarantined.
struct Validation {
    e: extract::ExtractOptions,
    set: VideoSet,
    segments: usize,
    views: usize,
    out_dir: std::path::PathBuf,
    /// Evaluations so far (the first records the index lines refused while listing).
    runs: usize,
    /// Videos an evaluation quarantined, left out of the later ones.
    left_out: std::collections::BTreeSet<String>,
}

impl Validation {
    fn new(opts: &ProbeOptions, set: VideoSet) -> Self {
        let mut e = opts.extract.clone();
        e.datasets = vec![opts.val.clone()];
        e.views = opts.val_views;
        e.augment = None;
        e.progress = false;
        Self {
            e,
            set,
            segments: opts.extract.segments.max(1),
            views: opts.val_views,
            out_dir: opts.out_dir.clone(),
            runs: 0,
            left_out: Default::default(),
        }
    }

    /// Continues after `runs` evaluations that left out `left_out`.
    fn restore(&mut self, left_out: &std::collections::BTreeSet<String>, runs: usize) {
        self.leave_out(left_out);
        self.runs = runs;
    }

    /// Leaves `bad` out of later evaluations.
    fn leave_out(&mut self, bad: &std::collections::BTreeSet<String>) {
        if bad.is_empty() {
            return;
        }
        let uris = self.set.uris();
        let kept: Vec<usize> = (0..self.set.len())
            .filter(|&i| !bad.contains(&uris[i]))
            .collect();
        self.set = self.set.reordered(&kept);
        self.left_out.extend(bad.iter().cloned());
    }

    /// Evaluates `learner` after epoch `epoch` (0-based); returns it with its predictions.
    fn run<L: Learner>(
        &mut self,
        learner: L,
        class_of: &BTreeMap<String, usize>,
        epoch: usize,
        (frames, size): (usize, usize),
        handle: &tokio::runtime::Handle,
        what: &str,
    ) -> anyhow::Result<(L, Vec<Prediction>)> {
        let everyone: Vec<usize> = (0..self.set.len()).collect();
        let set = match self.runs {
            0 => self.set.reordered(&everyone),
            _ => self.set.reordered(&everyone).without_rejected(),
        };
        // The first evaluation's records under the split's name; a later one's, where it has
        // any, under its epoch's.
        let name = match self.runs {
            0 => "val".to_string(),
            _ => split_table("val", epoch),
        };
        let eval = Evaluate {
            learner,
            class_of: class_of.clone(),
            segments: self.segments,
            views: self.views,
            predictions: Vec::new(),
        };
        let location = self.out_dir.join(format!("{name}.quarantine.parquet"));
        let (eval, streamed) = extract::stream_clips(
            &self.e,
            set,
            frames,
            size,
            &location.display().to_string(),
            eval,
            handle,
        )
        .with_context(|| format!("{what}: evaluating after epoch {}", epoch + 1))?;
        warn_quarantined(&streamed, what, "validation");
        if self.runs > 0 && streamed.quarantined == 0 {
            let _ = std::fs::remove_file(&location);
        }
        self.leave_out(&streamed.quarantined_uris.iter().cloned().collect());
        self.runs += 1;
        Ok((eval.learner, eval.predictions))
    }
}

/// The quarantine table name of `split`'s pass in epoch `epoch` (0-based): the split's name
/// for the first epoch, `split.epoch-N` after it.
fn split_table(split: &str, epoch: usize) -> String {
    match epoch {
        0 => split.to_string(),
        n => format!("{split}.epoch-{}", n + 1),
    }
}

/// The seed of epoch `epoch`'s train clips: with the official training transform a new one
/// every epoch (new segment windows and new draws per clip, as the official loader), else
/// `base` (the same clips every epoch, as the in-memory paths hold them).
fn epoch_seed(base: u64, augmented: bool, epoch: usize) -> u64 {
    if augmented {
        mix64(base ^ mix64(epoch as u64 + 1))
    } else {
        base
    }
}

fn quarantine_location(opts: &ProbeOptions, split: &str) -> String {
    opts.out_dir
        .join(format!("{split}.quarantine.parquet"))
        .display()
        .to_string()
}

fn warn_quarantined(streamed: &extract::Streamed, what: &str, split: &str) {
    if streamed.quarantined > 0 {
        tracing::warn!(
            quarantined = streamed.quarantined,
            records = %streamed.quarantine_output,
            "{what}: {split} videos left out"
        );
    }
}

/// `clips` (sorted by video, then slot) split into each video's clips, each checked to be
/// `per_video` long, with the video's class.
fn videos_of(
    clips: &[Clip],
    order: &Order,
    class_of: &BTreeMap<String, usize>,
    per_video: usize,
) -> anyhow::Result<(Vec<Range<usize>>, Vec<u32>)> {
    let uris: Vec<&str> = clips.iter().map(|c| c.uri.as_str()).collect();
    let ranges = runs(&uris);
    let mut classes = Vec::with_capacity(ranges.len());
    for range in &ranges {
        let uri = &clips[range.start].uri;
        if range.len() != per_video {
            bail!("{uri}: {} clips, expected {per_video}", range.len());
        }
        let label = order.get(uri).map(|o| o.1.as_str()).unwrap_or_default();
        let Some(&class) = class_of.get(label) else {
            bail!("{uri}: label `{label}` is not a class of the train set");
        };
        classes.push(class as u32);
    }
    Ok((ranges, classes))
}

/// The ranges of equal neighbours in `keys`.
fn runs<T: PartialEq>(keys: &[T]) -> Vec<Range<usize>> {
    let mut ranges = Vec::new();
    let mut start = 0;
    for i in 1..=keys.len() {
        if i == keys.len() || keys[i] != keys[start] {
            ranges.push(start..i);
            start = i;
        }
    }
    ranges
}

/// One epoch of training on clips as they stream in.
struct TrainEpoch<L: Learner> {
    learner: L,
    class_of: BTreeMap<String, usize>,
    segments: usize,
    batch_size: usize,
    /// Videos read but not yet trained on, with their class.
    pending: Vec<(L::Video, u32)>,
    score: probe::EpochScore,
    /// Videos trained on this epoch.
    videos: usize,
}

impl<L: Learner> TrainEpoch<L> {
    fn step(&mut self, n: usize) -> anyhow::Result<()> {
        let (batch, labels): (Vec<L::Video>, Vec<u32>) = self.pending.drain(..n).unzip();
        let (loss, right) = self.learner.step(batch, &labels)?;
        self.score.add(loss, right, labels.len());
        Ok(())
    }
}

impl<L: Learner> ClipConsumer for TrainEpoch<L> {
    fn consume(&mut self, clips: Vec<Clip>, order: &Order) -> anyhow::Result<u64> {
        let (ranges, classes) = videos_of(&clips, order, &self.class_of, self.segments)?;
        let videos = self.learner.videos(&clips, &ranges)?;
        for (video, class) in videos.into_iter().zip(classes) {
            self.pending.push((video, class));
            self.videos += 1;
            if self.pending.len() >= self.batch_size {
                self.step(self.batch_size)?;
            }
        }
        Ok(clips.len() as u64)
    }
}

/// The trained learner over the validation clips as they stream in.
struct Evaluate<L: Learner> {
    learner: L,
    class_of: BTreeMap<String, usize>,
    segments: usize,
    views: usize,
    predictions: Vec<Prediction>,
}

impl<L: Learner> ClipConsumer for Evaluate<L> {
    fn consume(&mut self, clips: Vec<Clip>, order: &Order) -> anyhow::Result<u64> {
        let per_video = self.segments * self.views;
        let (ranges, classes) = videos_of(&clips, order, &self.class_of, per_video)?;
        let probabilities = self
            .learner
            .predict(&clips, &ranges, self.segments, self.views)?;
        for ((range, class), probabilities) in ranges.iter().zip(classes).zip(probabilities) {
            self.predictions.push(Prediction {
                uri: clips[range.start].uri.clone(),
                label: class as usize,
                probabilities,
            });
        }
        Ok(clips.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn augmented_epochs_draw_new_clips_and_fixed_ones_do_not() {
        let seeds: Vec<u64> = (0..5).map(|e| epoch_seed(9, true, e)).collect();
        let distinct: std::collections::BTreeSet<_> = seeds.iter().collect();
        assert_eq!(distinct.len(), 5);
        assert!(!seeds.contains(&9));
        assert_eq!(epoch_seed(9, true, 3), seeds[3], "reproducible");
        assert!((0..5).all(|e| epoch_seed(9, false, e) == 9));
    }

    #[test]
    fn clips_split_by_video() {
        assert_eq!(runs(&["a", "a", "b", "c", "c"]), vec![0..2, 2..3, 3..5]);
        assert_eq!(runs(&["a"]), vec![0..1]);
        assert!(runs::<&str>(&[]).is_empty());
    }
}
