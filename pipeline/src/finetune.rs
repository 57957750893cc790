//! `vjepa finetune`: the attentive probe of `vjepa probe` (spec §9) trained with the backbone
//! unfrozen (end-to-end fine-tuning, issue 8). The checkpoint's encoder (our target encoder, an
//! official `.pth.tar`, or an encoder-only file) is copied and trained together with the probe.
//!
//! Clips come through `vjepa extract`'s dataflow (same segments, views and crops), decoded
//! once and held in memory, or decoded again every epoch ([`crate::probe::Cache`]); the encoder
//! runs on them at every step, with gradients. AdamW over
//! head and encoder with the probe's schedules and clip; the encoder's lr is scaled by
//! `backbone_lr_scale` (common fine-tuning practice, not the spec). Evaluation, outputs and
//! summary are the probe's, plus the fine-tuned encoder (`encoder.safetensors`).
//!
//! Differences from a full fine-tuning recipe, said plainly: by default no per-epoch
//! augmentation (the train clips are the evaluation's fixed view; `augment: official` gives
//! the frozen evaluation's training transform, drawn anew every epoch, not a fine-tuning
//! recipe's stronger one), f32 on the CPU.

use anyhow::{Context, bail};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use vjepa_model::Tensor;
use vjepa_model::finetune::FineTuner;
use vjepa_model::probe::AttentiveProbe;

use vjepa_model::vit::Encoder;
use vjepa_operators::records::Clip;
use vjepa_storage::predictions::PredictionRow;

use crate::extract::{self, ExtractOptions, VideoSet};
use crate::probe::{self, Prediction, ProbeOptions, ProbeSummary};
use crate::stream_epochs;

/// What to fine-tune: the probe's options plus the encoder's lr scale.
#[derive(Clone, Debug)]
pub struct FinetuneOptions {
    /// Everything `vjepa probe` takes (checkpoint, indexes, views, epochs, lr, …).
    pub probe: ProbeOptions,
    /// The encoder's lr as a multiple of the head's (0 keeps it frozen).
    pub backbone_lr_scale: f64,
}

/// A video's decoded clips: per view, its segments' clips one after the other
/// (`[S, 3, T, H, W]` row-major).
struct Video {
    uri: String,
    label: usize,
    views: Vec<Vec<f32>>,
}

/// A decoded video before its label is mapped to a class.
struct Decoded {
    uri: String,
    label: String,
    views: Vec<Vec<f32>>,
}

/// Decodes `index` (`views` views per segment) and groups the clips by video.
fn videos_of(
    opts: &ProbeOptions,
    encoder: &vjepa_model::EncoderConfig,
    (index, set): (&str, VideoSet),
    name: &str,
    views: usize,
    handle: &tokio::runtime::Handle,
) -> anyhow::Result<Vec<Decoded>> {
    let mut e: ExtractOptions = opts.extract.clone();
    e.datasets = vec![index.to_string()];
    e.views = views;
    let quarantine = opts.out_dir.join(format!("{name}.quarantine.parquet"));
    let (clips, streamed) =
        extract::decode_all(&e, set, encoder, &quarantine.display().to_string(), handle)
            .with_context(|| format!("decoding {index}"))?;
    if streamed.quarantined > 0 {
        tracing::warn!(
            index,
            quarantined = streamed.quarantined,
            records = %streamed.quarantine_output,
            "videos left out of fine-tuning"
        );
    }
    // Clips arrive sorted by video, then slot = segment · views + view.
    let mut out: Vec<Decoded> = Vec::new();
    for (clip, label) in clips {
        if out.last().is_none_or(|v| v.uri != clip.uri) {
            out.push(Decoded {
                uri: clip.uri.clone(),
                label,
                views: vec![Vec::new(); views],
            });
        }
        if let Some(v) = out.last_mut()
            && let Some(view) = v.views.get_mut(clip.slot % views)
        {
            view.extend_from_slice(&clip.data);
        }
    }
    Ok(out)
}

/// Runs fine-tuning: decode, train probe + encoder, evaluate, write.
pub fn run(opts: FinetuneOptions) -> anyhow::Result<ProbeSummary> {
    let FinetuneOptions {
        probe: opts,
        backbone_lr_scale,
    } = opts;
    probe::prepare(&opts)?;
    if !(backbone_lr_scale.is_finite() && backbone_lr_scale >= 0.0) {
        crate::refuse!("--backbone-lr-scale must be finite and ≥ 0, got {backbone_lr_scale}");
    }
    let (runtime, encoder) = extract::load_encoder(&opts.extract)?;
    let handle = runtime.handle().clone();
    let cfg = encoder.config().clone();
    let size = opts.extract.size.unwrap_or(cfg.crop_size);
    let bytes_per_clip = (3 * cfg.num_frames * size * size * 4) as u64;
    let (train, val, stream) =
        stream_epochs::open_splits(&opts, bytes_per_clip, &handle, "fine-tuning clips")?;
    probe::clear_earlier_outputs(&opts.out_dir, !stream);
    if stream {
        return run_streaming(&opts, encoder, backbone_lr_scale, train, val, &handle);
    }
    let train = videos_of(&opts, &cfg, (&opts.train, train), "train", 1, &handle)?;
    let val = videos_of(
        &opts,
        &cfg,
        (&opts.val, val),
        "val",
        opts.val_views,
        &handle,
    )?;
    if train.is_empty() {
        bail!("no train clip could be read");
    }
    let (classes, class_of) = probe::classes(
        train.iter().map(|v| v.label.clone()).collect(),
        opts.num_classes,
    )?;
    let labelled = |videos: Vec<Decoded>| {
        videos
            .into_iter()
            .map(|v| match class_of.get(&v.label) {
                Some(&c) => Ok(Video {
                    uri: v.uri,
                    label: c,
                    views: v.views,
                }),
                None => bail!(
                    "{}: label `{}` is not a class of the train set",
                    v.uri,
                    v.label
                ),
            })
            .collect::<anyhow::Result<Vec<_>>>()
    };
    let train = labelled(train)?;
    let val = labelled(val)?;
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    let train = probe::low_shot(
        train,
        |v| v.label,
        classes.len(),
        opts.label_fraction,
        &mut rng,
    );

    let segments = opts.extract.segments.max(1);
    let per_clip = 3 * cfg.num_frames * size * size;
    let shape = |videos: usize| (videos * segments, 3, cfg.num_frames, size, size);
    for v in train.iter().chain(&val) {
        if v.views.iter().any(|x| x.len() != segments * per_clip) {
            bail!("{}: not every segment and view could be decoded", v.uri);
        }
    }
    let device = encoder.device().clone();
    let head = AttentiveProbe::new(probe::head_config(&cfg, classes.len()), opts.seed, &device)?;
    let optim = probe::probe_optim(&opts, train.len());
    let mut tuner = FineTuner::new(&encoder, head, optim, backbone_lr_scale)?;
    drop(encoder);
    tracing::info!(
        train = train.len(),
        val = val.len(),
        classes = classes.len(),
        backbone_lr_scale,
        "fine-tuning"
    );
    // Evaluation as the probe's: probabilities averaged over views.
    let evaluate = |tuner: &FineTuner| -> anyhow::Result<Vec<PredictionRow>> {
        let mut predictions = Vec::with_capacity(val.len());
        for v in &val {
            let mut mean = vec![0f32; classes.len()];
            for view in &v.views {
                let x = Tensor::from_vec(view.clone(), shape(1), &device)?;
                let p = tuner
                    .probabilities(&x, segments)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                for (m, p) in mean.iter_mut().zip(p) {
                    *m += p / v.views.len() as f32;
                }
            }
            predictions.push(Prediction {
                uri: v.uri.clone(),
                label: v.label,
                probabilities: mean,
            });
        }
        Ok(probe::prediction_rows(&classes, &predictions))
    };
    let mut order: Vec<usize> = (0..train.len()).collect();
    let mut score = probe::EpochScore::default();
    let mut log = probe::EpochLog::new(&opts.out_dir, "finetune");
    let mut rows = Vec::new();
    let uris = |v: &[Video]| {
        v.iter()
            .map(|v| format!("{} {}", v.uri, v.label))
            .collect::<Vec<_>>()
    };
    let fingerprint = crate::eval_resume::fingerprint(
        &opts,
        &tune_settings(backbone_lr_scale),
        &uris(&train),
        &uris(&val),
    );
    let start = crate::eval_resume::resume_held(
        &opts,
        &fingerprint,
        "finetune",
        &mut rng,
        &mut order,
        &mut log,
        |bytes| Ok(tuner.restore_state(bytes).map(|_| ())?),
    )?;
    for epoch in start..opts.epochs {
        log.start_epoch();
        order.shuffle(&mut rng);
        score = probe::EpochScore::default();
        for chunk in order.chunks(opts.batch_size) {
            let mut data = Vec::with_capacity(chunk.len() * segments * per_clip);
            let mut labels = Vec::with_capacity(chunk.len());
            for &i in chunk {
                data.extend_from_slice(&train[i].views[0]);
                labels.push(train[i].label as u32);
            }
            let x = Tensor::from_vec(data, shape(chunk.len()), &device)?;
            let s = tuner.step(&x, segments, &labels)?;
            score.add(s.loss, s.correct, labels.len());
        }
        let evaluated = probe::evaluates_after(epoch, opts.epochs, opts.val_every);
        if evaluated {
            rows = evaluate(&tuner)?;
        }
        log.record(epoch, &score, evaluated.then_some(rows.as_slice()))?;
        if epoch + 1 == opts.epochs {
            save_tuned(&opts.out_dir, &tuner)?;
        }
        crate::eval_resume::save_held(&opts, &fingerprint, epoch, &rng, &order, |meta| {
            Ok(tuner.save_state(meta)?)
        })?;
    }
    let summary = ProbeSummary::write(&opts.out_dir, &rows, train.len(), classes, &score)?;
    crate::eval_resume::finish(&opts.out_dir);
    Ok(summary)
}

/// Fine-tuning with nothing held between epochs ([`probe::Cache::None`]; see
/// [`crate::stream_epochs`]): every epoch decodes the train videos again.
fn run_streaming(
    opts: &ProbeOptions,
    encoder: Encoder,
    backbone_lr_scale: f64,
    train: VideoSet,
    val: VideoSet,
    handle: &tokio::runtime::Handle,
) -> anyhow::Result<ProbeSummary> {
    let cfg = encoder.config().clone();
    let size = opts.extract.size.unwrap_or(cfg.crop_size);
    let frames = cfg.num_frames;
    // The tuner trains its own copy of the encoder: this one is dropped once it is made.
    let make = move |classes: usize, videos: usize| -> anyhow::Result<TuneLearner> {
        let head = AttentiveProbe::new(
            probe::head_config(&cfg, classes),
            opts.seed,
            encoder.device(),
        )?;
        let optim = probe::probe_optim(opts, videos);
        let tuner = FineTuner::new(&encoder, head, optim, backbone_lr_scale)?;
        drop(encoder);
        Ok(TuneLearner {
            tuner,
            segments: opts.extract.segments.max(1),
            shape: (3, frames, size, size),
            settings: tune_settings(backbone_lr_scale),
        })
    };
    stream_epochs::run(opts, train, val, (frames, size), handle, "finetune", make)
}

/// Writes the head (`probe.safetensors`) and the fine-tuned encoder (`encoder.safetensors`).
fn save_tuned(dir: &std::path::Path, tuner: &FineTuner) -> anyhow::Result<()> {
    std::fs::write(
        dir.join("probe.safetensors"),
        tuner.probe().to_safetensors()?,
    )?;
    std::fs::write(
        dir.join("encoder.safetensors"),
        tuner.encoder().to_safetensors()?,
    )?;
    Ok(())
}

/// The encoder and head being fine-tuned on decoded clips.
struct TuneLearner {
    tuner: FineTuner,
    segments: usize,
    /// One clip's shape `(3, T, S, S)`.
    shape: (usize, usize, usize, usize),
    /// [`tune_settings`].
    settings: String,
}

impl TuneLearner {
    /// `videos` clips' pixels, one after the other, as a `[videos · S, 3, T, S, S]` tensor.
    fn tensor(&self, data: Vec<f32>, videos: usize) -> anyhow::Result<Tensor> {
        let (c, t, h, w) = self.shape;
        let shape = (videos * self.segments, c, t, h, w);
        Ok(Tensor::from_vec(
            data,
            shape,
            self.tuner.encoder().device(),
        )?)
    }
}

impl stream_epochs::Learner for TuneLearner {
    /// A video's segments' pixels, one clip after the other.
    type Video = Vec<f32>;

    fn videos(
        &mut self,
        clips: &[Clip],
        videos: &[std::ops::Range<usize>],
    ) -> anyhow::Result<Vec<Vec<f32>>> {
        Ok(videos
            .iter()
            .map(|r| {
                clips[r.clone()]
                    .iter()
                    .flat_map(|c| c.data.iter().copied())
                    .collect()
            })
            .collect())
    }

    fn step(&mut self, batch: Vec<Vec<f32>>, labels: &[u32]) -> anyhow::Result<(f64, usize)> {
        let x = self.tensor(batch.concat(), labels.len())?;
        let s = self.tuner.step(&x, self.segments, labels)?;
        Ok((s.loss, s.correct))
    }

    fn predict(
        &mut self,
        clips: &[Clip],
        videos: &[std::ops::Range<usize>],
        segments: usize,
        views: usize,
    ) -> anyhow::Result<Vec<Vec<f32>>> {
        let classes = self.tuner.probe().config().num_classes;
        let mut out = Vec::with_capacity(videos.len());
        for r in videos {
            // As the in-memory path: per view, its segments in order; probabilities averaged.
            let mut mean = vec![0f32; classes];
            for v in 0..views {
                let data: Vec<f32> = (0..segments)
                    .flat_map(|s| clips[r.start + s * views + v].data.iter().copied())
                    .collect();
                let p = self
                    .tuner
                    .probabilities(&self.tensor(data, 1)?, segments)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                for (m, p) in mean.iter_mut().zip(p) {
                    *m += p / views as f32;
                }
            }
            out.push(mean);
        }
        Ok(out)
    }

    fn save(&self, dir: &std::path::Path) -> anyhow::Result<()> {
        save_tuned(dir, &self.tuner)
    }

    fn settings(&self) -> String {
        self.settings.clone()
    }

    fn save_state(
        &self,
        meta: std::collections::HashMap<String, String>,
    ) -> anyhow::Result<Vec<u8>> {
        Ok(self.tuner.save_state(meta)?)
    }

    fn restore_state(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        self.tuner.restore_state(bytes)?;
        Ok(())
    }
}

/// What fine-tuning adds to the run's settings (for [`crate::eval_resume::fingerprint`]).
fn tune_settings(backbone_lr_scale: f64) -> String {
    format!("finetune backbone_lr_scale {backbone_lr_scale}")
}
