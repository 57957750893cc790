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
//! Differences from a full fine-tuning recipe, said plainly: no per-epoch augmentation (the
//! views are the evaluation's fixed crops), f32 on the CPU.

use anyhow::{Context, bail};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use vjepa_model::Tensor;
use vjepa_model::finetune::FineTuner;
use vjepa_model::probe::{AttentiveProbe, ProbeConfig};

use vjepa_model::vit::Encoder;
use vjepa_operators::records::Clip;

use crate::extract::{self, ClipConsumer, ExtractOptions, Order, VideoSet};
use crate::probe::{self, Prediction, ProbeOptions, ProbeSummary};

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
    index: &str,
    name: &str,
    views: usize,
    handle: &tokio::runtime::Handle,
) -> anyhow::Result<Vec<Decoded>> {
    let mut e: ExtractOptions = opts.extract.clone();
    e.datasets = vec![index.to_string()];
    e.views = views;
    let quarantine = opts.out_dir.join(format!("{name}.quarantine.parquet"));
    let (clips, streamed) =
        extract::decode_all(&e, encoder, &quarantine.display().to_string(), handle)
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
        bail!("--backbone-lr-scale must be ≥ 0, got {backbone_lr_scale}");
    }
    let (runtime, encoder) = extract::load_encoder(&opts.extract)?;
    let handle = runtime.handle().clone();
    let cfg = encoder.config().clone();
    let train_set = VideoSet::open(std::slice::from_ref(&opts.train), &opts.extract.s3, &handle)?;
    let val_set = VideoSet::open(std::slice::from_ref(&opts.val), &opts.extract.s3, &handle)?;
    let size = opts.extract.size.unwrap_or(cfg.crop_size);
    let clips = (train_set.len() + val_set.len() * opts.val_views) * opts.extract.segments;
    let bytes = (clips * 3 * cfg.num_frames * size * size * 4) as u64;
    let stream = opts.cache.streams(bytes);
    tracing::info!(
        clip_bytes = bytes,
        cache = if stream {
            "none: decoded again every epoch"
        } else {
            "memory"
        },
        "fine-tuning clips"
    );
    if stream {
        return run_streaming(
            &opts,
            encoder,
            backbone_lr_scale,
            train_set,
            val_set,
            &handle,
        );
    }
    let train = videos_of(&opts, &cfg, &opts.train, "train", 1, &handle)?;
    let val = videos_of(&opts, &cfg, &opts.val, "val", opts.val_views, &handle)?;
    if train.is_empty() {
        bail!("no train clip could be read");
    }
    let (classes, class_of) = probe::classes(train.iter().map(|v| v.label.clone()).collect())?;
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
    let size = opts.extract.size.unwrap_or(cfg.crop_size);
    let per_clip = 3 * cfg.num_frames * size * size;
    let shape = |videos: usize| (videos * segments, 3, cfg.num_frames, size, size);
    for v in train.iter().chain(&val) {
        if v.views.iter().any(|x| x.len() != segments * per_clip) {
            bail!("{}: not every segment and view could be decoded", v.uri);
        }
    }
    let device = encoder.device().clone();
    let head = AttentiveProbe::new(
        ProbeConfig {
            embed_dim: cfg.embed_dim,
            num_heads: cfg.num_heads,
            num_classes: classes.len(),
            mlp_ratio: 4.0,
        },
        opts.seed,
        &device,
    )?;
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
    let mut order: Vec<usize> = (0..train.len()).collect();
    let mut final_loss = f64::NAN;
    for epoch in 0..opts.epochs {
        order.shuffle(&mut rng);
        let mut losses = Vec::new();
        for chunk in order.chunks(opts.batch_size) {
            let mut data = Vec::with_capacity(chunk.len() * segments * per_clip);
            let mut labels = Vec::with_capacity(chunk.len());
            for &i in chunk {
                data.extend_from_slice(&train[i].views[0]);
                labels.push(train[i].label as u32);
            }
            let x = Tensor::from_vec(data, shape(chunk.len()), &device)?;
            losses.push(tuner.step(&x, segments, &labels)?.loss);
        }
        final_loss = losses.iter().sum::<f64>() / losses.len().max(1) as f64;
        tracing::info!(
            epoch = epoch + 1,
            loss = format_args!("{final_loss:.4}"),
            "finetune"
        );
    }
    std::fs::write(
        opts.out_dir.join("probe.safetensors"),
        tuner.probe().to_safetensors()?,
    )?;
    std::fs::write(
        opts.out_dir.join("encoder.safetensors"),
        tuner.encoder().to_safetensors()?,
    )?;

    // Evaluation as the probe's: probabilities averaged over views.
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
    let correct = probe::write_predictions(&opts.out_dir, &classes, &predictions)?;
    Ok(ProbeSummary::new(
        correct,
        val.len(),
        train.len(),
        classes,
        final_loss,
    ))
}

/// Fine-tuning with nothing held between epochs ([`probe::Cache::None`]): every epoch decodes
/// the train videos again (shuffled into the batches the in-memory path would make), and the
/// validation videos are decoded once for evaluation. Same classes, subset, batches and
/// schedule as the in-memory path.
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
    let segments = opts.extract.segments.max(1);
    let labels = train.labels();
    let (classes, class_of) = probe::classes(labels.iter().cloned().collect())?;
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    let listed: Vec<usize> = (0..train.len()).collect();
    let keep = probe::low_shot(
        listed,
        |&i| class_of.get(&labels[i]).copied().unwrap_or(usize::MAX),
        classes.len(),
        opts.label_fraction,
        &mut rng,
    );
    let device = encoder.device().clone();
    let head = AttentiveProbe::new(
        ProbeConfig {
            embed_dim: cfg.embed_dim,
            num_heads: cfg.num_heads,
            num_classes: classes.len(),
            mlp_ratio: 4.0,
        },
        opts.seed,
        &device,
    )?;
    let tuner = FineTuner::new(
        &encoder,
        head,
        probe::probe_optim(opts, keep.len()),
        backbone_lr_scale,
    )?;
    drop(encoder);
    tracing::info!(
        train = keep.len(),
        val = val.len(),
        classes = classes.len(),
        backbone_lr_scale,
        "fine-tuning (clips decoded every epoch)"
    );
    let shape = (3, cfg.num_frames, size, size);
    let mut pass = TunePass {
        tuner,
        class_of: class_of.clone(),
        segments,
        shape,
        batch_size: opts.batch_size,
        pending: Vec::new(),
        losses: Vec::new(),
        videos: 0,
    };
    let mut e = opts.extract.clone();
    e.datasets = vec![opts.train.clone()];
    e.views = 1;
    e.progress = false;
    let train_q = opts
        .out_dir
        .join("train.quarantine.parquet")
        .display()
        .to_string();
    let mut order: Vec<usize> = (0..keep.len()).collect();
    let mut final_loss = f64::NAN;
    let mut trained = keep.len();
    for epoch in 0..opts.epochs {
        order.shuffle(&mut rng);
        let videos: Vec<usize> = order.iter().map(|&p| keep[p]).collect();
        let set = train.reordered(&videos);
        let (mut done, streamed) =
            extract::stream_clips(&e, set, cfg.num_frames, size, &train_q, pass, handle)
                .with_context(|| format!("fine-tuning epoch {}", epoch + 1))?;
        done.finish_epoch()?;
        if epoch == 0 && streamed.quarantined > 0 {
            tracing::warn!(
                quarantined = streamed.quarantined,
                records = %streamed.quarantine_output,
                "train videos left out of fine-tuning"
            );
        }
        trained = done.videos;
        done.videos = 0;
        final_loss = done.losses.iter().sum::<f64>() / done.losses.len().max(1) as f64;
        done.losses.clear();
        tracing::info!(
            epoch = epoch + 1,
            loss = format_args!("{final_loss:.4}"),
            "finetune"
        );
        pass = done;
    }
    let tuner = pass.tuner;
    std::fs::write(
        opts.out_dir.join("probe.safetensors"),
        tuner.probe().to_safetensors()?,
    )?;
    std::fs::write(
        opts.out_dir.join("encoder.safetensors"),
        tuner.encoder().to_safetensors()?,
    )?;

    let mut e = opts.extract.clone();
    e.datasets = vec![opts.val.clone()];
    e.views = opts.val_views;
    let val_q = opts
        .out_dir
        .join("val.quarantine.parquet")
        .display()
        .to_string();
    let eval = TuneEval {
        tuner,
        class_of,
        segments,
        views: opts.val_views,
        shape,
        predictions: Vec::new(),
    };
    let (eval, streamed) =
        extract::stream_clips(&e, val, cfg.num_frames, size, &val_q, eval, handle)
            .context("evaluating the fine-tuned model")?;
    if streamed.quarantined > 0 {
        tracing::warn!(
            quarantined = streamed.quarantined,
            records = %streamed.quarantine_output,
            "validation videos left out of fine-tuning"
        );
    }
    let evaluated = eval.predictions.len();
    let correct = probe::write_predictions(&opts.out_dir, &classes, &eval.predictions)?;
    Ok(ProbeSummary::new(
        correct, evaluated, trained, classes, final_loss,
    ))
}

/// The class of the video `uri` (its label from the index).
fn class_of_video(
    class_of: &std::collections::BTreeMap<String, usize>,
    order: &Order,
    uri: &str,
) -> anyhow::Result<usize> {
    let label = order.get(uri).map(|o| o.1.as_str()).unwrap_or_default();
    match class_of.get(label) {
        Some(&c) => Ok(c),
        None => bail!("{uri}: label `{label}` is not a class of the train set"),
    }
}

/// One epoch of fine-tuning on clips as they are decoded.
struct TunePass {
    tuner: FineTuner,
    class_of: std::collections::BTreeMap<String, usize>,
    segments: usize,
    /// One clip's shape `(3, T, S, S)`.
    shape: (usize, usize, usize, usize),
    batch_size: usize,
    /// Videos decoded but not yet trained on: their segments' pixels and the class.
    pending: Vec<(Vec<f32>, u32)>,
    losses: Vec<f64>,
    /// Videos trained on this epoch.
    videos: usize,
}

impl TunePass {
    fn step(&mut self, n: usize) -> anyhow::Result<()> {
        let batch: Vec<(Vec<f32>, u32)> = self.pending.drain(..n).collect();
        let labels: Vec<u32> = batch.iter().map(|(_, l)| *l).collect();
        let data: Vec<f32> = batch.into_iter().flat_map(|(d, _)| d).collect();
        let (c, t, h, w) = self.shape;
        let x = Tensor::from_vec(
            data,
            (n * self.segments, c, t, h, w),
            self.tuner.encoder().device(),
        )?;
        self.losses
            .push(self.tuner.step(&x, self.segments, &labels)?.loss);
        Ok(())
    }

    /// The last, partial batch of the epoch.
    fn finish_epoch(&mut self) -> anyhow::Result<()> {
        if !self.pending.is_empty() {
            self.step(self.pending.len())?;
        }
        Ok(())
    }
}

impl ClipConsumer for TunePass {
    fn consume(&mut self, clips: Vec<Clip>, order: &Order) -> anyhow::Result<u64> {
        for range in probe::by_video(&clips) {
            let uri = &clips[range.start].uri;
            if range.len() != self.segments {
                bail!("{uri}: {} clips, expected {}", range.len(), self.segments);
            }
            let class = class_of_video(&self.class_of, order, uri)?;
            let data: Vec<f32> = clips[range]
                .iter()
                .flat_map(|c| c.data.iter().copied())
                .collect();
            self.pending.push((data, class as u32));
            self.videos += 1;
            if self.pending.len() >= self.batch_size {
                self.step(self.batch_size)?;
            }
        }
        Ok(clips.len() as u64)
    }
}

/// The fine-tuned model over the validation clips as they are decoded.
struct TuneEval {
    tuner: FineTuner,
    class_of: std::collections::BTreeMap<String, usize>,
    segments: usize,
    views: usize,
    shape: (usize, usize, usize, usize),
    predictions: Vec<Prediction>,
}

impl ClipConsumer for TuneEval {
    fn consume(&mut self, clips: Vec<Clip>, order: &Order) -> anyhow::Result<u64> {
        let (c, t, h, w) = self.shape;
        for range in probe::by_video(&clips) {
            let uri = &clips[range.start].uri;
            if range.len() != self.segments * self.views {
                bail!(
                    "{uri}: {} clips, expected {}",
                    range.len(),
                    self.segments * self.views
                );
            }
            let label = class_of_video(&self.class_of, order, uri)?;
            // As the in-memory path: per view (slot = segment · views + view), its segments
            // in order; probabilities averaged over the views.
            let mut mean = vec![0f32; self.tuner.probe().config().num_classes];
            for v in 0..self.views {
                let data: Vec<f32> = (0..self.segments)
                    .flat_map(|s| clips[range.start + s * self.views + v].data.iter().copied())
                    .collect();
                let x = Tensor::from_vec(
                    data,
                    (self.segments, c, t, h, w),
                    self.tuner.encoder().device(),
                )?;
                let p = self
                    .tuner
                    .probabilities(&x, self.segments)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                for (m, p) in mean.iter_mut().zip(p) {
                    *m += p / self.views as f32;
                }
            }
            self.predictions.push(Prediction {
                uri: uri.clone(),
                label,
                probabilities: mean,
            });
        }
        Ok(clips.len() as u64)
    }
}
