//! `vjepa train`: the dataflow, wired in the order the data moves (catalog → sample → load →
//! batch → mask → train → sinks), plus the run's outputs.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashSet};
use std::rc::Rc;
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::operators::core::OkErr;
use timely::dataflow::operators::vec::Broadcast;
use timely::dataflow::operators::{Inspect, Probe};
use timely::dataflow::{InputHandle, ProbeHandle};

use vjepa_model::{
    Device, FlatGradients, MaskIndices, Objective, PixelMae, Pretrainer, Tensor, TrainBatch, VJepa,
};
use vjepa_operators::batching::collect_local;
use vjepa_operators::catalog::{CatalogCounts, catalog_counts};
use vjepa_operators::collective::{Collective, shard_range, weighted_mean};
use vjepa_operators::load::load_clips_parallel;
use vjepa_operators::masking::{BatchMask, Grid, MaskError, MaskGenerator, TubeMaskGenerator};
use vjepa_operators::records::{Clip, ClipRequest, Loaded, Quarantined};
use vjepa_operators::sampler::VersionDraws;
use vjepa_operators::sampling::ClipSampling;
use vjepa_operators::seeding::{Stream, rng_for};
use vjepa_operators::sinks::sink_records;
use vjepa_storage::features::{FeatureRow, FeaturesWriter};
use vjepa_storage::tables::{ClipRow, ClipsWriter, MetricsRow, MetricsWriter, QuarantineWriter};
use vjepa_storage::{Store, checkpoints};

use crate::catalog::{
    Catalog, CatalogVersion, Listing, QuarantineSet, VersionRecord, Versions, VideoRef,
};
use crate::config::JobConfig;
use crate::loader::{Fatal, LoaderSettings, StoreLoader};
use crate::telemetry::{Stage, StepSample, Telemetry};

/// Command-line overrides of the config.
#[derive(Clone, Debug, Default)]
pub struct TrainOverrides {
    pub workers: Option<usize>,
    pub datasets: Vec<String>,
    pub out: Option<String>,
    pub max_steps: Option<u64>,
    pub seed: Option<u64>,
    /// Require a resume (the default resumes anyway when checkpoints exist; this only adds the
    /// log line when there are none).
    pub resume: bool,
    /// Start from step 0 even when the output location holds checkpoints (deleting them).
    pub fresh: bool,
    /// Serve metrics and the status page here instead of `telemetry.listen`.
    pub listen: Option<String>,
}

/// What a finished run reports.
#[derive(Clone, Debug)]
pub struct TrainSummary {
    pub output: String,
    pub steps: u64,
    pub first_step: u64,
    pub last_loss: Option<f64>,
    pub quarantined: usize,
    pub checkpoints: Vec<String>,
    /// The signal that ended the run early (after a step, with its checkpoint).
    pub stopped_by: Option<i32>,
}

/// Runs the training job to completion.
impl TrainOverrides {
    /// Puts the flags into `cfg` and checks the result as a config file's values are checked
    /// (`vjepa train` does this before any work: exit 2 naming the key and the flag).
    pub fn apply(&self, cfg: &mut JobConfig) -> Result<(), crate::config::ConfigError> {
        let mut flags = Vec::new();
        if self.workers.is_some() {
            flags.push(("workers.count", "--workers"));
        }
        if !self.datasets.is_empty() {
            flags.push(("data.datasets", "--dataset"));
            flags.push(("data.datasets_weights", "--dataset"));
        }
        if self.out.is_some() {
            flags.push(("outputs.dir", "--out"));
        }
        if self.max_steps.is_some() {
            flags.push(("optimization.max_steps", "--max-steps"));
        }
        if self.seed.is_some() {
            flags.push(("meta.seed", "--seed"));
        }
        if self.listen.is_some() {
            flags.push(("telemetry.listen", "--listen"));
        }
        cfg.apply_flags(&flags, |raw| {
            if let Some(w) = self.workers {
                raw.workers.count = w;
            }
            if !self.datasets.is_empty() {
                raw.data.datasets = self.datasets.clone();
            }
            if let Some(out) = &self.out {
                raw.outputs.dir = Some(out.clone());
            }
            if let Some(m) = self.max_steps {
                raw.optimization.max_steps = Some(m);
            }
            if let Some(s) = self.seed {
                raw.meta.seed = s;
            }
            if let Some(l) = &self.listen {
                raw.telemetry.listen = Some(l.clone());
            }
        })
    }
}

/// Runs a training job; `cfg` has `overrides` applied already ([`TrainOverrides::apply`], which
/// `vjepa train` runs before any work so that a refused flag exits 2).
pub fn run(mut cfg: JobConfig, overrides: TrainOverrides) -> anyhow::Result<TrainSummary> {
    // Only process 0 serves metrics and the status page.
    if cfg.raw.cluster.process != 0 {
        cfg.raw.telemetry.listen = None;
    }
    let cfg = Arc::new(cfg);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the I/O runtime")?;
    let handle = runtime.handle().clone();
    let s3 = cfg.s3_settings();

    let out_location = cfg
        .output_dir()
        .ok_or_else(|| anyhow!("outputs.dir is not set"))?
        .to_string();
    let out = Store::open(&out_location, &s3, true).with_context(|| {
        format!(
            "opening output location {}",
            vjepa_storage::redact_url(&out_location)
        )
    })?;
    let telemetry = Arc::new(Telemetry::new());
    if let Some(listen) = &cfg.raw.telemetry.listen {
        let addr = crate::telemetry::serve(telemetry.clone(), listen, &handle)?;
        tracing::info!(%addr, "serving metrics and status page");
        if let Some(path) = out.local_path("telemetry.addr") {
            std::fs::write(&path, format!("{addr}\n"))
                .with_context(|| format!("writing {}", path.display()))?;
        }
    }
    let result = run_training(&cfg, &overrides, &runtime, &out, &telemetry);
    let started = telemetry.started();
    telemetry.finish(result.as_ref().err().map(|e| format!("{e:#}")));
    // Only a run that got as far as training lingers (a config mistake has nothing to show).
    if let Err(e) = &result
        && started
        && cfg.raw.telemetry.listen.is_some()
        && cfg.raw.telemetry.linger_secs > 0.0
    {
        tracing::info!(
            error = %format!("{e:#}"),
            linger_secs = cfg.raw.telemetry.linger_secs,
            "the run failed: serving metrics a while longer (telemetry.linger_secs)"
        );
        std::thread::sleep(Duration::from_secs_f64(cfg.raw.telemetry.linger_secs));
    }
    result
}

/// [`run`] after the output location is open and telemetry is served.
fn run_training(
    cfg: &Arc<JobConfig>,
    overrides: &TrainOverrides,
    runtime: &tokio::runtime::Runtime,
    out: &Store,
    telemetry: &Arc<Telemetry>,
) -> anyhow::Result<TrainSummary> {
    let cfg = cfg.clone();
    let device = cfg.device()?;
    let compute = device
        .open()
        .with_context(|| format!("opening workers.device {device}"))?;
    // NVDEC must exist here before any work (the nvcodec plugin registers it only with a GPU).
    let video_decoder = cfg.video_decoder()?;
    vjepa_ingest::check_video_decoder(video_decoder)
        .map_err(|e| anyhow!("workers.video_decoder: {video_decoder}: {e}"))?;
    // The attention implementation, before any work: `cudnn` must be able to run here.
    let attention = crate::preflight::check_attention(&cfg)?;
    if device.is_cuda() {
        tracing::info!("attention {}: {}", attention.location, attention.found);
    }
    vjepa_model::kernels::set_attention_backend(cfg.attention()?);
    let dtype = cfg.compute_dtype(device);
    if cfg.bf16_requested() && dtype != vjepa_model::DType::BF16 {
        tracing::info!(
            %device,
            "meta.dtype bfloat16: mixed precision applies to V-JEPA on a GPU; computing in float32"
        );
    } else if device.is_cuda() {
        tracing::info!(%device, ?dtype, "training on the GPU");
    }
    let cluster = cfg.raw.cluster.clone();
    let addresses = cfg.cluster_addresses()?;
    let process = cluster.process;
    let out = out.clone();
    let handle = runtime.handle().clone();
    let s3 = cfg.s3_settings();
    let catalog = handle
        .block_on(Catalog::open(
            &cfg.raw.data.datasets,
            cfg.raw.data.index_root.as_deref(),
            &s3,
        ))
        .context("opening datasets")?;
    // The listing at start, as a version (a fresh run's version 0).
    let listed = CatalogVersion::build(
        0,
        0,
        &catalog.first,
        &QuarantineSet::default(),
        catalog.names.len(),
    );
    if listed.videos.is_empty() {
        let why = vjepa_storage::dataset::why_all_refused(
            catalog
                .first
                .rejected
                .iter()
                .map(|r| (r.uri.as_str(), r.reason.as_str(), r.detail.as_str())),
        );
        bail!(
            "no videos found in data.datasets ({}): nothing to train on{}",
            cfg.raw.data.datasets.join(", "),
            why.map(|w| format!(" ({w})")).unwrap_or_default()
        );
    }
    let mixing = cfg.mixing();
    VersionDraws::new(
        cfg.raw.meta.seed,
        listed.key,
        listed.counts.clone(),
        &mixing,
    )
    .context("data.datasets_weights")?;
    let enc = cfg.encoder_config();

    // Where the run starts: by default it continues from the newest complete checkpoint in its
    // own output location (so the same command resumes after a crash or `kill -9`); `--fresh`
    // discards them; `meta.read_checkpoint` seeds a run that has none of its own yet.
    if overrides.fresh && (overrides.resume || cfg.raw.meta.load_checkpoint) {
        bail!("--fresh contradicts --resume / meta.load_checkpoint: true");
    }
    let batch_size = cfg.raw.data.batch_size;
    let mut resumed_own = false;
    let start: Option<Resumed> = if overrides.fresh {
        // Only process 0 writes to the outputs; the others start fresh without touching them.
        let removed = if process == 0 {
            let tables = handle.block_on(remove_run_tables(&out, None))?;
            if tables > 0 {
                tracing::warn!(
                    removed = tables,
                    "--fresh: deleted the earlier run's -from- tables and catalog records"
                );
            }
            handle.block_on(checkpoints::remove_all(&out))?
        } else {
            0
        };
        if removed > 0 {
            tracing::warn!(
                removed,
                output = %out.url(),
                "--fresh: deleted the earlier run's checkpoints"
            );
        }
        None
    } else {
        let own = newest_complete_checkpoint(&handle, &out)?;
        resumed_own = own.is_some();
        if own.is_none() && (cfg.raw.meta.load_checkpoint || overrides.resume) {
            tracing::info!(
                "no checkpoint to resume from in {}; starting fresh",
                out.url()
            );
        }
        own
    };
    let start = match (start, &cfg.raw.meta.read_checkpoint) {
        (Some(r), _) => Some(r),
        (None, Some(path)) => {
            let bytes = read_location(&handle, path, &s3)
                .with_context(|| format!("reading meta.read_checkpoint {path}"))?;
            Some(
                Resumed::parse(path.clone(), &bytes)
                    .with_context(|| format!("loading checkpoint {path}"))?,
            )
        }
        (None, None) => None,
    };
    if let Some(r) = &start {
        if r.model.objective() != cfg.raw.model.objective {
            bail!(
                "{} was trained with objective {}, this run's model.objective is {}",
                r.uri,
                r.model.objective(),
                cfg.raw.model.objective
            );
        }
        if resumed_own && r.model.seed() != cfg.raw.meta.seed {
            bail!(
                "{} was trained with meta.seed {}, this run has seed {}: the data would not \
                 continue where it stopped (use the same seed, another outputs.dir, or --fresh)",
                r.uri,
                r.model.seed(),
                cfg.raw.meta.seed
            );
        }
    }
    let first_step = start.as_ref().map_or(0, |r| r.model.steps_done());
    // Tables and catalog records of steps after the first belong to a run that stopped (or
    // crashed before its first checkpoint): this one trains those steps again and writes its
    // own. (Not with --fresh, which deleted them all.)
    if process == 0 && !overrides.fresh {
        remove_later_tables(&handle, &out, first_step);
    }
    // The catalog a run starts from: a fresh run's is the listing; a resumed run continues the
    // version the stopped run had in effect, and what that run quarantined stays known.
    let Continued {
        version: first_version,
        quarantined,
        mut record_first,
    } = match start.as_ref().filter(|_| resumed_own) {
        Some(r) => continue_catalog(&handle, &out, r, &catalog, first_step, process == 0),
        None => {
            if let Some(r) = &start {
                warn_if_catalog_changed(r, &listed);
            }
            Continued {
                version: CatalogVersion {
                    from_step: first_step,
                    ..listed.clone()
                },
                quarantined: QuarantineSet::default(),
                record_first: true,
            }
        }
    };
    // Left without anything to draw from (what was quarantined, or `data.datasets_weights`
    // changed since the stop): the listing, as it is, as a version of its own.
    let first_version = match VersionDraws::new(
        cfg.raw.meta.seed,
        first_version.key,
        first_version.counts.clone(),
        &mixing,
    ) {
        Ok(_) => first_version,
        Err(e) => {
            tracing::warn!(error = %e, "the catalog less the quarantined videos leaves nothing to draw from: starting from the whole listing");
            let version = first_version.version + u64::from(!record_first);
            record_first = true;
            CatalogVersion {
                version,
                from_step: first_step,
                ..listed.clone()
            }
        }
    };
    if let Some(r) = &start {
        tracing::info!(
            checkpoint = %r.uri,
            step = r.model.steps_done(),
            next_clip = r.next_clip,
            catalog_version = first_version.version,
            "resuming"
        );
    }
    // Iterations per epoch come from the listing at the run's start (or `optimization.ipe`); a
    // resumed run keeps the stopped run's, so that its length and schedules stay those the
    // checkpoint was trained for whatever the bucket holds now.
    let listed_ipe = cfg.iterations_per_epoch(listed.videos.len());
    let ipe = match start.as_ref().filter(|_| resumed_own).and_then(|r| r.ipe) {
        Some(saved) if cfg.raw.optimization.ipe.is_none() => {
            if saved != listed_ipe {
                tracing::info!(
                    ipe = saved,
                    listed = listed_ipe,
                    "keeping the stopped run's iterations per epoch (the catalog's size changed)"
                );
            }
            saved
        }
        _ => listed_ipe,
    };
    let total = cfg.total_steps(ipe);
    if let Some(max) = cfg.raw.optimization.max_steps
        && max > total
    {
        tracing::warn!(
            max_steps = max,
            epochs = cfg.raw.optimization.epochs,
            ipe,
            "optimization.max_steps is past epochs × ipe: the run ends after {total} steps"
        );
    }
    // The sampler cursor: the global number of the next clip (a pure function of the step for
    // an unchanged batch size, stored so that a changed one continues the same clip sequence).
    let first_clip = start
        .as_ref()
        .map_or(0, |r| r.next_clip.unwrap_or(first_step * batch_size as u64));
    let resumed = start.map(|r| r.bytes);
    if first_step >= total {
        if resumed_own {
            tracing::info!(
                step = first_step,
                steps = total,
                output = %out.url(),
                "the run is already complete: nothing to train (--fresh starts it again)"
            );
            return Ok(TrainSummary {
                output: out.url().to_string(),
                steps: 0,
                first_step,
                last_loss: None,
                quarantined: 0,
                checkpoints: Vec::new(),
                stopped_by: None,
            });
        }
        bail!("the checkpoint is at step {first_step}, the run has {total} steps: nothing to do");
    }

    let table_name = |name: &str| {
        if first_step == 0 {
            format!("{name}.parquet")
        } else {
            format!("{name}-from-{first_step:08}.parquet")
        }
    };
    let (metrics_name, quarantine_name, clips_name, features_name) = (
        table_name("metrics"),
        table_name("quarantine"),
        table_name("clips"),
        table_name("features"),
    );
    tracing::info!(
        videos = first_version.videos.len(),
        datasets = catalog.names.len(),
        steps = total,
        ipe,
        first_step,
        workers = cfg.raw.workers.count,
        processes = cluster.processes,
        process,
        output = %out.url(),
        encoder = ?enc,
        "starting training"
    );
    telemetry.set_catalog(&catalog.names, &first_version.counts);
    telemetry.set_config(
        config_summary(&cfg, &catalog.names, total, first_step, out.url()),
        total,
    );

    let fatal = Fatal::default();
    let grid = {
        let (t, h, w) = enc.grid();
        Grid { t, h, w }
    };
    let masking = match cfg.raw.model.objective {
        Objective::Vjepa => Masking::Blocks(
            cfg.mask_configs()
                .into_iter()
                .map(|m| MaskGenerator::new(m, grid))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| anyhow!("mask config: {e}"))?,
        ),
        Objective::Pixel => Masking::Tube(
            TubeMaskGenerator::new(cfg.raw.model.pixel.mask_ratio, grid)
                .map_err(|e| anyhow!("model.pixel.mask_ratio: {e}"))?,
        ),
    };
    let settings = LoaderSettings {
        seed: cfg.raw.meta.seed,
        sampling: ClipSampling {
            frames_per_clip: cfg.raw.data.num_frames,
            frame_step: cfg.raw.data.sampling_rate,
        },
        clip_duration: cfg.raw.data.clip_duration,
        augment: cfg.augment(),
        frame_augment: cfg.train_augment(),
        filter_short_videos: cfg.raw.data.filter_short_videos,
        filter_long_bytes: cfg.raw.data.filter_long_videos as u64,
        max_attempts: cfg.raw.workers.max_attempts_per_clip,
        deadline: Duration::from_secs_f64(cfg.raw.workers.decode_deadline_secs),
        // Several decoders at once: one thread each; a lone decoder may use every core.
        decoder_threads: if cfg.decode_threads() > 1 { 1 } else { 0 },
        mixing,
        video_decoder,
    };
    let workers = cfg.raw.workers.count;
    let clips_per_worker = batch_size.div_ceil(workers * cluster.processes).max(1);
    let batches_in_flight = (cfg.max_clips_in_flight() / clips_per_worker).max(1) as u64;

    vjepa_ingest::init().map_err(|e| anyhow!("GStreamer: {e}"))?;

    // Re-read the datasets every `catalog.refresh_secs` in the background; worker 0 turns each
    // listing into a catalog version at a step boundary.
    let (listings_tx, listings_rx) = mpsc::channel::<Listing>();
    let period = Duration::from_secs_f64(cfg.raw.catalog.refresh_secs);
    // Only process 0 re-lists: the other processes get its versions through the dataflow.
    let relist = process == 0;
    let refresher = handle.spawn({
        let catalog = catalog.clone();
        let s3 = s3.clone();
        let telemetry = telemetry.clone();
        async move {
            if !relist {
                return;
            }
            loop {
                tokio::time::sleep(period).await;
                match catalog.relist(&s3).await {
                    Ok(listing) => {
                        telemetry.items(Stage::List, listing.videos.len() as u64);
                        telemetry.queue_add(Stage::List, 1);
                        if listings_tx.send(listing).is_err() {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "catalog refresh failed; keeping the current catalog")
                    }
                }
            }
        }
    });

    let tokens_per_clip = {
        let (t, h, w) = enc.grid();
        (t * h * w) as u64
    };
    let shared = Arc::new(Shared {
        cfg: cfg.clone(),
        versions: Arc::new(Versions::new(first_version)),
        listings: Mutex::new(Some(listings_rx)),
        clips_name,
        features_name,
        catalog: catalog.clone(),
        out: out.clone(),
        handle: handle.clone(),
        fatal: fatal.clone(),
        abandon: vjepa_ingest::Abandon::new(),
        known_videos: Arc::new(vjepa_ingest::KnownVideos::default()),
        masking,
        settings,
        resumed,
        quarantined,
        record_first,
        ipe,
        metrics_name,
        quarantine_name,
        first_step,
        first_clip,
        total,
        threads: workers,
        process,
        check_params_every: cluster.check_params_every(workers * cluster.processes),
        telemetry: telemetry.clone(),
        tokens_per_clip,
        device: compute,
        dtype,
    });

    let config = if cluster.processes > 1 {
        timely::Config {
            communication: timely::CommunicationConfig::Cluster {
                threads: workers,
                process,
                addresses,
                report: false,
                zerocopy: false,
            },
            worker: timely::WorkerConfig::default(),
        }
    } else {
        timely::Config::process(workers)
    };
    // Timely connects the processes before any worker runs, and waits for a missing one for
    // ever: give up after `cluster.connect_timeout_secs`, naming the processes.
    let connected = Arc::new(std::sync::atomic::AtomicBool::new(false));
    if cluster.processes > 1 {
        let connected = Arc::clone(&connected);
        let timeout = Duration::try_from_secs_f64(cfg.raw.cluster.connect_timeout_secs)
            .unwrap_or(Duration::MAX);
        let (processes, process) = (cluster.processes, cluster.process);
        std::thread::spawn(move || {
            let started = Instant::now();
            while started.elapsed() < timeout {
                if connected.load(std::sync::atomic::Ordering::SeqCst) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            let msg = format!(
                "process {process} of {processes}: the other processes did not all connect \
                 within cluster.connect_timeout_secs ({:.0} s): start every process of the job \
                 (same hostfile, --processes {processes}, each its own --process)",
                timeout.as_secs_f64()
            );
            tracing::error!("{msg}");
            eprintln!("error: {msg}");
            std::process::exit(1);
        });
    }
    let guards = timely::execute(config, move |worker| {
        connected.store(true, std::sync::atomic::Ordering::SeqCst);
        run_worker(worker, &shared, batches_in_flight)
    })
    .map_err(|e| anyhow!("starting dataflow workers: {e}"));
    let guards = match guards {
        Ok(g) => g,
        Err(e) => {
            refresher.abort();
            return Err(e);
        }
    };
    // Timely's network threads panic when another process's connection drops, and joining
    // them panics in turn: that is a lost peer, reported as an error like any other failure.
    let joined = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| guards.join()));
    refresher.abort();
    let results = match joined {
        Ok(results) => results,
        Err(_) => {
            let cause = fatal.get().map(|f| format!(" ({f})")).unwrap_or_default();
            bail!(
                "lost the connection to another process of the job{cause}: this process's \
                 tables are completed up to here; run every process's command again to resume \
                 from the last checkpoint"
            );
        }
    };
    // The first failure anywhere in this process is the cause; later ones follow from it.
    if let Some(why) = fatal.get() {
        bail!("{why}");
    }
    let mut summary = None;
    for result in results {
        match result {
            Ok(Ok(Some(s))) => summary = summary.or(Some(s)),
            Ok(Ok(None)) => {}
            Ok(Err(e)) => return Err(e),
            Err(e) => bail!("a dataflow worker panicked: {e}"),
        }
    }
    if let Some(why) = fatal.get() {
        bail!("{why}");
    }
    summary.ok_or_else(|| anyhow!("no worker returned a summary"))
}

/// Checkpoint metadata: global number of the next clip to train on (the sampler cursor).
const META_NEXT_CLIP: &str = "run.next_clip";
/// Checkpoint metadata: the batch size the run used.
const META_BATCH_SIZE: &str = "run.batch_size";
/// Checkpoint metadata: the contents key ([`catalog_key`]) of the catalog version in effect for
/// the next step.
const META_CATALOG: &str = "run.catalog_key";
/// Checkpoint metadata: that version's number within the run (a resumed run continues the
/// numbering).
const META_CATALOG_VERSION: &str = "run.catalog_version";
/// Checkpoint metadata: the run's iterations per epoch (a resumed run keeps them, whatever the
/// catalog holds by then).
const META_IPE: &str = "run.ipe";

/// A checkpoint to continue from, with the job's state recorded beside the model.
struct Resumed {
    uri: String,
    model: Pretrainer,
    /// The checkpoint file: every worker loads its own replica from it.
    bytes: Bytes,
    /// [`META_NEXT_CLIP`], absent in checkpoints of older builds.
    next_clip: Option<u64>,
    /// [`META_CATALOG`], absent in checkpoints of older builds.
    catalog: Option<String>,
    /// [`META_IPE`], absent in checkpoints of older builds.
    ipe: Option<u64>,
}

impl Resumed {
    fn parse(uri: String, bytes: &Bytes) -> anyhow::Result<Self> {
        let model = Pretrainer::from_safetensors(bytes, &Device::Cpu)?;
        let meta = vjepa_model::checkpoint_metadata(bytes)?;
        let number = |key: &str| {
            meta.get(key)
                .map(|v| {
                    v.parse::<u64>()
                        .map_err(|e| anyhow!("metadata {key} `{v}`: {e}"))
                })
                .transpose()
        };
        Ok(Self {
            uri,
            model,
            bytes: bytes.clone(),
            next_clip: number(META_NEXT_CLIP)?,
            catalog: meta.get(META_CATALOG).cloned(),
            ipe: number(META_IPE)?.filter(|&n| n > 0),
        })
    }
}

/// The newest checkpoint in `out` that loads completely. A file that is cut short or otherwise
/// unreadable is skipped, with a warning, for the one before it (checkpoints are written whole
/// and renamed into place, but a disk can still lose the tail of one).
fn newest_complete_checkpoint(
    handle: &tokio::runtime::Handle,
    out: &Store,
) -> anyhow::Result<Option<Resumed>> {
    for (step, rel) in handle.block_on(checkpoints::all_newest_first(out))? {
        let uri = out.uri_of(&rel);
        let loaded = handle
            .block_on(out.get(&rel))
            .map_err(anyhow::Error::from)
            .and_then(|bytes| Resumed::parse(uri.clone(), &bytes));
        match loaded {
            Ok(r) if r.model.steps_done() == step => return Ok(Some(r)),
            Ok(r) => tracing::warn!(
                checkpoint = %uri,
                steps_done = r.model.steps_done(),
                "skipping a checkpoint whose step does not match its name"
            ),
            Err(e) => tracing::warn!(
                checkpoint = %uri,
                error = %format!("{e:#}"),
                "skipping an incomplete or unreadable checkpoint; trying the previous one"
            ),
        }
    }
    Ok(None)
}

/// The [`META_CATALOG`] value for a catalog version: its contents key (what the sampler's draws
/// are keyed by), as hex. Equal values mean a resumed run draws exactly the clips the
/// interrupted one would have.
fn catalog_key(version: &CatalogVersion) -> String {
    format!("{:016x}", version.key)
}

/// The catalog a resumed run starts from.
struct Continued {
    /// Its first version (in effect from the run's first step).
    version: CatalogVersion,
    /// What the stopped run quarantined, by object version: left out of the catalog, not read
    /// again, not recorded again.
    quarantined: QuarantineSet,
    /// The first version is new (not one the stopped run recorded): its record is written.
    record_first: bool,
}

/// A resumed run's catalog: the version in effect at `first_step` in the run that stopped,
/// replayed from its `catalog/` records (checked against the checkpoint's [`META_CATALOG`]),
/// continued by the listing taken at restart ([`CatalogVersion::resumed`]); the stopped run's
/// quarantine records up to the checkpoint (`quarantine*.parquet`). Without usable records
/// (older builds, records lost) the run starts from the listing, less the quarantined videos.
/// Unreadable records or tables are warnings: they cost exactness, not the run. Only process 0
/// replays (the others adopt its first version, and must not read records it is rewriting).
fn continue_catalog(
    handle: &tokio::runtime::Handle,
    out: &Store,
    resumed: &Resumed,
    catalog: &Catalog,
    first_step: u64,
    replay: bool,
) -> Continued {
    let mut quarantined = QuarantineSet::default();
    for (file, rows) in handle.block_on(vjepa_storage::tables::read_quarantine_before(
        out, first_step,
    )) {
        match rows {
            Ok(rows) => {
                for r in &rows {
                    quarantined.insert(&r.uri, r.object_version.as_deref());
                }
            }
            Err(e) => tracing::warn!(
                file = %out.uri_of(&file),
                error = %e,
                "could not read the stopped run's quarantine records: those bad videos will be read again"
            ),
        }
    }
    let records = if replay {
        handle
            .block_on(VersionRecord::read_all(out, first_step))
            .unwrap_or_else(|e| {
                tracing::warn!(error = %format!("{e:#}"), "could not read the stopped run's catalog records");
                Vec::new()
            })
    } else {
        Vec::new()
    };
    let replayed = CatalogVersion::replay_to(&records, first_step);
    let datasets = catalog.names.len();
    if let Some(replayed) = &replayed
        && resumed.catalog.as_deref() == Some(catalog_key(replayed).as_str())
    {
        let version =
            CatalogVersion::resumed(replayed, &catalog.first, &quarantined, first_step, datasets);
        let record_first = version.version != replayed.version;
        if record_first {
            let (added, removed) = version.diff(replayed);
            tracing::info!(
                version = version.version,
                added = added.len(),
                removed = removed.len(),
                "the datasets changed while the run was stopped: a new catalog version from its first step"
            );
        }
        if version.key != replayed.key {
            warn_if_catalog_changed(resumed, &version);
        }
        quarantined.settle_held(&version);
        return Continued {
            version,
            quarantined,
            record_first,
        };
    }
    let version = CatalogVersion::build(
        replayed.as_ref().map_or(0, |r| r.version + 1),
        first_step,
        &catalog.first,
        &quarantined,
        datasets,
    );
    if replay {
        if resumed.catalog.is_some() {
            tracing::warn!(
                checkpoint = %resumed.uri,
                records = records.len(),
                "the catalog/ records do not rebuild the checkpoint's catalog version: starting from the listing"
            );
        }
        warn_if_catalog_changed(resumed, &version);
    }
    Continued {
        version,
        quarantined,
        record_first: true,
    }
}

/// Warns when the catalog a run starts from is not the checkpoint's: the clips differ from
/// those the stopped run would have drawn.
fn warn_if_catalog_changed(resumed: &Resumed, now: &CatalogVersion) {
    if let Some(saved) = &resumed.catalog
        && *saved != catalog_key(now)
    {
        tracing::warn!(
            checkpoint = %resumed.uri,
            saved = %saved,
            now = %catalog_key(now),
            "the catalog changed since this checkpoint: the clips from here on differ from \
             those the interrupted run would have used"
        );
    }
}

/// How a step's masks are drawn: V-JEPA's multiblock masks (one per mask config) or the
/// pixel objective's single tube mask.
enum Masking {
    Blocks(Vec<MaskGenerator>),
    Tube(TubeMaskGenerator),
}

impl Masking {
    /// The masks of a global batch of `batch` clips for `step`, from the step's position stream.
    fn draw(&self, seed: u64, step: u64, batch: usize) -> Result<Vec<BatchMask>, MaskError> {
        let mut positions = rng_for(seed, Stream::MaskPositions, step);
        match self {
            Masking::Blocks(generators) => generators
                .iter()
                .map(|g| g.generate(seed, 0, step, batch, &mut positions))
                .collect(),
            Masking::Tube(tube) => Ok(vec![tube.generate(batch, &mut positions)]),
        }
    }
}

/// Longest a worker sleeps waiting for clips or peers before checking for a fatal error.
const PARK: Duration = Duration::from_millis(20);

/// Everything a worker needs, shared read-only across worker threads.
struct Shared {
    cfg: Arc<JobConfig>,
    catalog: Arc<Catalog>,
    /// The catalog versions of this run (worker 0 adds them; in the other processes, their
    /// first worker adds the versions worker 0 broadcasts).
    versions: Arc<Versions>,
    /// Listings from the background refresher, taken by worker 0.
    listings: Mutex<Option<mpsc::Receiver<Listing>>>,
    /// Name of the clips table (when `outputs.clips`).
    clips_name: String,
    /// Name of the features table (when `outputs.features`).
    features_name: String,
    out: Store,
    handle: tokio::runtime::Handle,
    fatal: Fatal,
    /// Set when this process's workers are done: the loaders give up what they still load.
    abandon: vjepa_ingest::Abandon,
    /// What clips taught about their videos (frame counts nobody announced, …), shared by
    /// every loader of this process so that each video version is learned once.
    known_videos: Arc<vjepa_ingest::KnownVideos>,
    masking: Masking,
    settings: LoaderSettings,
    /// Iterations per epoch (for the metrics' epoch column).
    ipe: u64,
    /// The checkpoint the run resumes from: every worker loads its own replica of it.
    resumed: Option<Bytes>,
    /// What the run it resumes quarantined (empty for a fresh run).
    quarantined: QuarantineSet,
    /// The first catalog version is new to the outputs: worker 0 writes its record.
    record_first: bool,
    metrics_name: String,
    quarantine_name: String,
    /// The step the run started after (0, or the resumed checkpoint's).
    first_step: u64,
    /// Global number of the clip of slot 0 of `first_step + 1` (the resumed sampler cursor).
    first_clip: u64,
    /// Steps of the run (as this process computed them; process 0's value is used).
    total: u64,
    /// Worker threads per process.
    threads: usize,
    /// This process's number in the cluster (0 for a single process).
    process: usize,
    /// `cluster.check_params_every`.
    check_params_every: u64,
    /// Metrics and the status page's history.
    telemetry: Arc<Telemetry>,
    /// Patches the encoder embeds per clip (for tokens/s).
    tokens_per_clip: u64,
    /// Where the workers' models compute (`workers.device`).
    device: Device,
    /// What they compute in ([`JobConfig::compute_dtype`]).
    dtype: vjepa_model::DType,
}

impl Shared {
    fn stopped(&self) -> bool {
        self.fatal.get().is_some()
    }
}

/// Worker 0's outputs: the Parquet writers and the run's counters.
struct Outputs {
    /// Where the tables' writes run (closing them on drop).
    handle: tokio::runtime::Handle,
    metrics: Option<MetricsWriter>,
    quarantine: Option<QuarantineWriter>,
    clips: Option<ClipsWriter>,
    features: Option<FeaturesWriter>,
    seen_bad: QuarantineSet,
    quarantined: usize,
    rows_since_flush: u64,
    last_loss: Option<f64>,
    steps: u64,
    checkpoints: Vec<String>,
    /// The step of the last checkpoint this run wrote.
    checkpointed_at: Option<u64>,
}

/// A run that fails still completes its tables: the quarantine records and the metrics of the
/// steps it trained are what its user needs to see why. The last reference goes with the
/// dataflow, once timely has drained it, so the quarantine records still in flight are in
/// (on success too: the quarantine table is left to this; the others are closed before).
/// Failures to write are logged; the run's own error is what the caller reports.
impl Drop for Outputs {
    fn drop(&mut self) {
        let (metrics, quarantine, clips, features) = (
            self.metrics.take(),
            self.quarantine.take(),
            self.clips.take(),
            self.features.take(),
        );
        let handle = &self.handle;
        let report = |what: &str, result: Result<u64, vjepa_storage::StorageError>| match result {
            Ok(rows) => tracing::debug!(rows, "{what} table completed as the run ended"),
            Err(e) => tracing::warn!(error = %e, "{what} table could not be completed"),
        };
        if let Some(w) = metrics {
            report("metrics", handle.block_on(w.close()));
        }
        if let Some(w) = quarantine {
            report("quarantine", handle.block_on(w.close()));
        }
        if let Some(w) = clips {
            report("clips", handle.block_on(w.close()));
        }
        if let Some(w) = features {
            report("features", handle.block_on(w.close()));
        }
    }
}

/// What worker 0 tells every worker before training (and every worker reports back, for the
/// checks): the run's shape, version 0 of the catalog, and where it resumed.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct SetupMsg {
    videos: Vec<VideoRef>,
    /// The first version's number (a resumed run continues the stopped run's numbering).
    catalog_version: u64,
    listed_unix_us: i64,
    first_step: u64,
    first_clip: u64,
    total: u64,
    ipe: u64,
    catalog_key: u64,
    resumed_from: Option<u64>,
    /// `meta.seed` and `data.batch_size`: processes with other values would train other
    /// replicas (caught later, less clearly, as diverged parameters).
    seed: u64,
    batch_size: usize,
}

/// One clip of a worker's share, as the clips table records it (the pixels stay put).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct ClipMeta {
    slot: usize,
    uri: String,
    frames: Vec<u64>,
    crop: [i64; 4],
    flip: bool,
    bytes_read: u64,
    decode_s: f64,
    nvdec: bool,
}

/// A worker's contribution to one shard of the averaged gradient, with its loss parts.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct ReduceMsg {
    samples: usize,
    loss: f64,
    /// The collapse signals over this worker's clips (the job reports clip-weighted means).
    target_std: f64,
    target_rank: f64,
    loss_per_mask: Vec<f64>,
    present: Vec<bool>,
    shard: Vec<f32>,
    failed: Option<String>,
    /// The loss, when the failure is a non-finite loss (counted once, by worker 0).
    nonfinite: Option<f64>,
    /// To worker 0 with `outputs.features`: (slot, mean-pooled target feature) of each of
    /// this worker's clips.
    embeddings: Vec<(usize, Vec<f32>)>,
}

/// The messages of the training collective (rounds between all workers of all processes).
#[derive(Clone, Debug, Serialize, Deserialize)]
enum Msg {
    Setup(Box<SetupMsg>),
    /// Which slots of the step this worker holds (and, to worker 0, their records).
    Slots {
        slots: Vec<usize>,
        clips: Vec<ClipMeta>,
        /// The sender's process was asked to stop (SIGTERM/SIGINT): every worker makes this
        /// step the last.
        stop: bool,
        /// The sender stopped waiting for its clips (asked to stop): no worker trains this
        /// step; the one before is the last.
        starved: bool,
    },
    Reduce(Box<ReduceMsg>),
    /// A reduced shard of the averaged gradient, from the worker that owns it.
    Shard(Vec<f32>),
    /// The sender's parameter digest after a step.
    Digest(u64),
}

fn unexpected(what: &str, got: &Msg) -> anyhow::Error {
    let kind = match got {
        Msg::Setup(_) => "setup",
        Msg::Slots { .. } => "slots",
        Msg::Reduce(_) => "reduce",
        Msg::Shard(_) => "shard",
        Msg::Digest(_) => "digest",
    };
    anyhow!("collective out of step: expected a {what} message, got a {kind} message")
}

/// The training side of one worker: its model replica, the clips it loaded, and its end of
/// the collective every worker trains through (data parallel: same masks, own clips,
/// averaged gradients, identical parameters after every step).
struct Trainer {
    model: Pretrainer,
    /// Packs each step's clips into one tensor on the model's device, in its compute dtype.
    stager: vjepa_model::ClipStager,
    /// The next step's clips, staged on the GPU while this step computed (when they were all
    /// loaded by then): (step, their slots in order, the tensor).
    prefetched: Option<(u64, Vec<usize>, vjepa_model::Tensor)>,
    collective: Collective<Msg>,
    /// This worker's loaded clips by step.
    clips: Rc<RefCell<BTreeMap<u64, Vec<Clip>>>>,
    /// Passes step `t` once `clips` holds all of this worker's clips of `t`.
    loaded: ProbeHandle<u64>,
    /// Steps trained (the next batch to train is number `trained`).
    trained: u64,
    total: u64,
}

fn run_worker(
    worker: &mut timely::worker::Worker,
    shared: &Arc<Shared>,
    batches_in_flight: u64,
) -> anyhow::Result<Option<TrainSummary>> {
    let result = run_worker_inner(worker, shared, batches_in_flight);
    // Whatever ended the run (its last step, a stop, a failure), no clip still loading is
    // needed: timely drains the dataflow only once the loaders give them up, which a store
    // that does not answer would otherwise delay by each read's timeout and attempt.
    shared.abandon.abandon();
    if let Err(e) = &result {
        // Stop this process's other workers and loaders; other processes notice that this
        // worker left the collective.
        // A failure another worker reported already names that worker.
        let why = format!("{e:#}");
        let why = if why.starts_with("worker ") {
            why
        } else {
            format!("worker {}: {why}", worker.index())
        };
        shared.fatal.set(why);
    }
    result
}

fn run_worker_inner(
    worker: &mut timely::worker::Worker,
    shared: &Arc<Shared>,
    batches_in_flight: u64,
) -> anyhow::Result<Option<TrainSummary>> {
    let index = worker.index();
    let peers = worker.peers();
    let cfg = shared.cfg.clone();
    let batch_size = cfg.raw.data.batch_size;
    let first_in_process = index.is_multiple_of(shared.threads);
    let loaders = (0..cfg.decode_threads())
        .map(|_| {
            StoreLoader::new(
                shared.catalog.clone(),
                shared.versions.clone(),
                shared.handle.clone(),
                shared.settings.clone(),
                shared.fatal.clone(),
            )
            .map(|l| {
                l.with_telemetry(shared.telemetry.clone())
                    .with_abandon(shared.abandon.clone())
                    .with_known_bad(shared.quarantined.entries())
                    .with_known_videos(shared.known_videos.clone())
            })
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow!("GStreamer decoder: {e}"))?;

    // Every worker builds the same dataflows in the same order: the collective, the catalog
    // collection, the catalog versions broadcast, the clip pipeline.
    let mut collective: Collective<Msg> = Collective::new(worker);
    let mut catalog = catalog_counts(worker);
    let mut versions_in: InputHandle<u64, CapacityContainerBuilder<Vec<VersionRecord>>> =
        InputHandle::new();
    let versions_known = ProbeHandle::new();
    {
        let versions = shared.versions.clone();
        let adopt = first_in_process && shared.process != 0;
        worker.dataflow::<u64, _, _>(|scope| {
            versions_in
                .to_stream(scope)
                .broadcast()
                .inspect(move |record: &VersionRecord| {
                    // Process 0 made the version itself; the others replay worker 0's record.
                    if adopt {
                        let prev = versions.latest();
                        versions.push(CatalogVersion::replay(Some(&prev), record));
                    }
                })
                .probe_with(&versions_known);
        });
    }

    // Setup: worker 0's view of the run (version 0 of the catalog, steps, resume point)
    // becomes everyone's; each worker checks that it resumes from the same place.
    let first = shared.versions.latest();
    let own = SetupMsg {
        videos: if index == 0 {
            first.videos.clone()
        } else {
            Vec::new()
        },
        catalog_version: first.version,
        listed_unix_us: first.listed_unix_us,
        first_step: shared.first_step,
        first_clip: shared.first_clip,
        total: shared.total,
        ipe: shared.ipe,
        catalog_key: first.key,
        resumed_from: shared.resumed.as_ref().map(|_| shared.first_step),
        seed: cfg.raw.meta.seed,
        batch_size: cfg.raw.data.batch_size,
    };
    let stop = || shared.stopped();
    let setups = collective.all_to_all(worker, Msg::Setup(Box::new(own.clone())), stop)?;
    let setup = match &setups[0] {
        Msg::Setup(s) => (**s).clone(),
        other => return Err(unexpected("setup", other)),
    };
    if (own.seed, own.batch_size) != (setup.seed, setup.batch_size) {
        bail!(
            "process {} runs meta.seed {} and data.batch_size {}, process 0 meta.seed {} and \
             data.batch_size {}: every process must run the same config",
            shared.process,
            own.seed,
            own.batch_size,
            setup.seed,
            setup.batch_size
        );
    }
    if (own.first_step, own.first_clip, own.resumed_from)
        != (setup.first_step, setup.first_clip, setup.resumed_from)
    {
        bail!(
            "worker {index} (process {}) starts at step {} (resumed: {:?}), worker 0 at step {} \
             (resumed: {:?}): every process must read the same outputs.dir and checkpoint",
            shared.process,
            own.first_step,
            own.resumed_from,
            setup.first_step,
            setup.resumed_from
        );
    }
    if shared.process != 0 {
        if first_in_process {
            let listing = Listing {
                videos: setup.videos.clone(),
                rejected: Vec::new(),
                listed_unix_us: setup.listed_unix_us,
            };
            let v0 = CatalogVersion::build(
                setup.catalog_version,
                setup.first_step,
                &listing,
                &QuarantineSet::default(),
                shared.catalog.names.len(),
            );
            if v0.key != setup.catalog_key {
                bail!("the first catalog version from worker 0 does not rebuild to its key");
            }
            // A resumed run's first version is process 0's alone to make (it replays the
            // stopped run's records); a fresh run's is the listing, which can differ.
            if v0.key != own.catalog_key && own.resumed_from.is_none() {
                tracing::info!(
                    videos = v0.videos.len(),
                    "using process 0's listing as the first catalog version (this process listed different contents)"
                );
            }
            shared.versions.reset(v0);
        }
        if setup.total != own.total || setup.ipe != own.ipe {
            tracing::info!(
                steps = setup.total,
                ipe = setup.ipe,
                "using process 0's run length (this process's listing gave another)"
            );
        }
    }
    let total = setup.total;
    let mut model = match &shared.resumed {
        Some(bytes) => Pretrainer::from_safetensors(bytes, &shared.device)?,
        None => fresh_model(&cfg, setup.ipe, &shared.device)?,
    };
    model.set_pool_features(cfg.raw.outputs.features);
    model.set_compute_dtype(shared.dtype)?;
    model.set_activation_checkpointing(cfg.raw.model.activation_checkpointing)?;
    model.set_target_stream(cfg.raw.model.target_stream)?;
    // Every replica starts bit-identical (same seed, or the same checkpoint). A lone worker has
    // nothing to compare (and the digest reads the whole model to the host).
    if peers > 1 {
        check_digests(worker, &mut collective, &model, shared.first_step, shared)?;
    }
    if index == 0 {
        let (e, p) = model.num_trainable_params();
        tracing::info!(
            encoder_params = e,
            predictor_params = p,
            replicas = peers,
            "model ready"
        );
    }

    // Worker 0 writes every output.
    let outputs = Rc::new(RefCell::new(Outputs {
        handle: shared.handle.clone(),
        metrics: None,
        quarantine: None,
        clips: None,
        features: None,
        seen_bad: shared.quarantined.clone(),
        quarantined: 0,
        rows_since_flush: 0,
        last_loss: None,
        steps: 0,
        checkpoints: Vec::new(),
        checkpointed_at: None,
    }));
    if index == 0 {
        let mut o = outputs.borrow_mut();
        o.metrics = Some(
            shared
                .handle
                .block_on(MetricsWriter::create(&shared.out, &shared.metrics_name))?,
        );
        let mut q = shared.handle.block_on(QuarantineWriter::create(
            &shared.out,
            &shared.quarantine_name,
        ))?;
        if cfg.raw.outputs.clips {
            o.clips = Some(
                shared
                    .handle
                    .block_on(ClipsWriter::create(&shared.out, &shared.clips_name))?,
            );
        }
        if cfg.raw.outputs.features {
            o.features = Some(
                shared
                    .handle
                    .block_on(FeaturesWriter::create(&shared.out, &shared.features_name))?,
            );
        }
        for r in &shared.catalog.first.rejected {
            if o.seen_bad.insert(&r.uri, None) {
                shared.telemetry.quarantined(&r.uri, &r.reason);
                q.push(to_quarantine_row(r));
                o.quarantined += 1;
            }
        }
        o.quarantine = Some(q);
    }
    // The catalog as a differential collection (time = catalog version; version 0: the listing
    // at start): each worker enters its share of version 0, then worker 0 alone enters the
    // changes of later versions and learns the per-dataset counts, which drive the mixing.
    let first_version = shared.versions.latest();
    for (i, v) in first_version.videos.iter().enumerate() {
        if i % peers == index {
            catalog.input.insert((v.dataset, v.uri.clone()));
        }
    }
    catalog.input.advance_to(1);
    catalog.input.flush();
    while catalog.probe.less_than(&1) {
        if shared.stopped() {
            bail!("stopped while building the catalog");
        }
        worker.step_or_park(Some(PARK));
    }
    let mut catalog = if index == 0 {
        check_counts(&first_version, &catalog.counts.borrow())?;
        for (dataset, count) in catalog.counts.borrow().iter() {
            let name = shared
                .catalog
                .names
                .get(*dataset)
                .map(String::as_str)
                .unwrap_or("?");
            tracing::info!(dataset = %name, videos = count, "catalog");
        }
        if shared.record_first {
            write_version_record(shared, &first_version, None)?;
        }
        Some(catalog)
    } else {
        // Closing the other workers' inputs leaves worker 0 alone to advance versions.
        drop(catalog);
        None
    };
    let listings = if index == 0 {
        shared.listings.lock().ok().and_then(|mut l| l.take())
    } else {
        None
    };
    let mut versions_in = if index == 0 {
        Some(versions_in)
    } else {
        drop(versions_in);
        None
    };

    let first_step = shared.first_step;
    let mut input = InputHandle::new();
    input.advance_to(first_step);
    let loaded = ProbeHandle::new();
    let held: Rc<RefCell<BTreeMap<u64, Vec<Clip>>>> = Rc::default();
    let q_outputs = outputs.clone();
    let q_shared = shared.clone();
    {
        let held = held.clone();
        worker.dataflow::<u64, _, _>(|scope| {
            let requests = input.to_stream(scope);
            let loaded_clips = load_clips_parallel(requests, loaders);
            let (clips, bad) = loaded_clips.ok_err(|l: Loaded| match l {
                Loaded::Clip(c) => Ok(c),
                Loaded::Bad(q) => Err(q),
            });
            collect_local(clips, held).probe_with(&loaded);
            sink_records(bad, "Quarantine", 0, move |_step, q: Quarantined| {
                let mut o = q_outputs.borrow_mut();
                if o.seen_bad.insert(&q.uri, q.object_tag.as_deref()) {
                    tracing::warn!(uri = %q.uri, reason = %q.reason, detail = %q.detail, object_tag = ?q.object_tag, "video quarantined");
                    q_shared.telemetry.quarantined(&q.uri, &q.reason);
                    o.quarantined += 1;
                    if let Some(w) = o.quarantine.as_mut() {
                        w.push(to_quarantine_row(&q));
                    }
                }
            });
        });
    }
    let mut trainer = Trainer {
        model,
        stager: vjepa_model::ClipStager::new(&shared.device),
        prefetched: None,
        collective,
        clips: held,
        loaded,
        trained: first_step,
        total,
    };

    // Feed this worker's share of every batch, at most `batches_in_flight` ahead of training.
    for step in first_step..total {
        if shared.stopped() || step >= trainer.total {
            break;
        }
        // A new listing becomes the catalog version for steps from `step + batches_in_flight`:
        // no worker can have requested those yet (each stays within `batches_in_flight` of the
        // trained steps, which are the same on every worker), and no worker requests a step
        // before every version up to it has reached its process (the broadcast's frontier).
        if let (Some(rx), Some(cat)) = (listings.as_ref(), catalog.as_mut())
            && let Some(listing) = {
                let waiting: Vec<Listing> = rx.try_iter().collect();
                shared
                    .telemetry
                    .queue_add(Stage::List, -(waiting.len() as i64));
                waiting.into_iter().last()
            }
        {
            let from_step = step + batches_in_flight;
            match apply_listing(worker, cat, &listing, from_step, shared, &outputs) {
                Ok(Some(record)) => {
                    if let Some(vin) = versions_in.as_mut() {
                        vin.advance_to(from_step);
                        vin.send(record);
                    }
                }
                Ok(None) => {}
                Err(e) => bail!("catalog refresh at step {step}: {e:#}"),
            }
        }
        if let Some(vin) = versions_in.as_mut() {
            vin.advance_to(step + batches_in_flight);
            vin.flush();
        }
        // Steps up to `step - batches_in_flight` must be trained before `step` is requested
        // (none past a stop, which shortens `trainer.total`).
        while trainer.trained < trainer.total && trainer.trained + batches_in_flight <= step {
            trainer.train_next(worker, shared, &outputs)?;
        }
        if step >= trainer.total {
            break;
        }
        while versions_known.less_equal(&step) {
            if shared.stopped() {
                break;
            }
            worker.step_or_park(Some(PARK));
        }
        for slot in (0..batch_size).filter(|s| s % peers == index) {
            shared.telemetry.queue_add(Stage::Fetch, 1);
            input.send(ClipRequest {
                step,
                slot,
                global_index: shared.first_clip
                    + (step - first_step) * batch_size as u64
                    + slot as u64,
            });
        }
        input.advance_to(step + 1);
        worker.step();
    }
    drop(input);
    drop(versions_in);
    drop(catalog);
    drop(listings);
    while trainer.trained < trainer.total && !shared.stopped() {
        trainer.train_next(worker, shared, &outputs)?;
    }
    if let Some(why) = shared.fatal.get() {
        bail!("{why}");
    }
    // Ended early: this process's signal, or another process's (it came with the step's
    // exchange) — a stop all the same, so that the process is restarted, not taken as done.
    let stopped_by = (trainer.total < total)
        .then(|| crate::shutdown::requested().unwrap_or(crate::shutdown::SIGTERM));

    if index != 0 {
        return Ok(first_in_process.then(|| TrainSummary {
            output: shared.out.url().to_string(),
            steps: trainer.trained - first_step,
            first_step,
            last_loss: None,
            quarantined: 0,
            checkpoints: Vec::new(),
            stopped_by,
        }));
    }
    let mut o = outputs.borrow_mut();
    let metrics = o.metrics.take();
    let clips = o.clips.take();
    if let Some(m) = metrics {
        shared.handle.block_on(m.close())?;
    }
    if let Some(c) = clips {
        shared.handle.block_on(c.close())?;
    }
    // The quarantine table stays open until timely has drained the dataflow: loads already
    // requested for later steps (a stop, a run's last batches in flight) may still report bad
    // videos. It closes when the outputs drop (see `impl Drop for Outputs`).
    Ok(Some(TrainSummary {
        output: shared.out.url().to_string(),
        steps: o.steps,
        first_step,
        last_loss: o.last_loss,
        quarantined: o.quarantined,
        checkpoints: o.checkpoints.clone(),
        stopped_by,
    }))
}

/// Every worker sends its parameter digest to every worker; all fail, naming the workers
/// whose replica differs from worker 0's, unless all agree. Returns the common digest.
fn check_digests(
    worker: &mut timely::worker::Worker,
    collective: &mut Collective<Msg>,
    model: &Pretrainer,
    after_step: u64,
    shared: &Shared,
) -> anyhow::Result<u64> {
    let mine = model.params_digest()?;
    let all = collective.all_to_all(worker, Msg::Digest(mine), || shared.stopped())?;
    let digests = all
        .iter()
        .map(|m| match m {
            Msg::Digest(d) => Ok(*d),
            other => Err(unexpected("digest", other)),
        })
        .collect::<anyhow::Result<Vec<u64>>>()?;
    let differ: Vec<usize> = (0..digests.len())
        .filter(|&w| digests[w] != digests[0])
        .collect();
    if !differ.is_empty() {
        bail!(
            "after step {after_step} the parameters of worker(s) {differ:?} differ from worker 0's \
             (digests {digests:016x?}): the replicas diverged"
        );
    }
    Ok(mine)
}

impl Trainer {
    /// Trains step number `self.trained` on every worker at once: waits for this worker's
    /// clips, agrees with the others on the step's slots, draws the global batch's masks, runs
    /// forward and backward on its own clips, averages the gradients over all workers
    /// (reduce-scatter by shard owner, then all-gather), applies them and checks digests.
    fn train_next(
        &mut self,
        worker: &mut timely::worker::Worker,
        shared: &Shared,
        outputs: &Rc<RefCell<Outputs>>,
    ) -> anyhow::Result<()> {
        let step = self.trained;
        let index = worker.index();
        let peers = worker.peers();
        let stop = || shared.stopped();
        crate::shutdown::training_started();
        let waiting = Instant::now();
        // A stop asked while the clips are still coming (a slow or unreachable store can keep
        // them for minutes) does not wait for them: the run ends with the steps trained.
        let mut starved = false;
        while self.loaded.less_equal(&step) {
            if shared.stopped() {
                bail!("stopped while waiting for the clips of step {step}");
            }
            // This process was asked to stop, or another worker (another process's) was: it
            // gave up waiting for the step, or has its clips and waits for this worker's in
            // the round. Either way no worker trains the step, and nobody waits on the store.
            if crate::shutdown::requested().is_some()
                || self.collective.next_round_has(|m| {
                    matches!(
                        m,
                        Msg::Slots { starved: true, .. } | Msg::Slots { stop: true, .. }
                    )
                })
            {
                starved = true;
                break;
            }
            worker.step_or_park(Some(PARK));
        }
        let data_wait = waiting.elapsed();
        let started = Instant::now();
        let mut clips = if starved {
            Vec::new()
        } else {
            self.clips.borrow_mut().remove(&step).unwrap_or_default()
        };
        clips.sort_by_key(|c| c.slot);
        shared
            .telemetry
            .queue_add(Stage::Transform, -(clips.len() as i64));

        // 1. Which slots exist (a slot whose videos all failed has no clip), and the records.
        let slots: Vec<usize> = clips.iter().map(|c| c.slot).collect();
        let metas: Vec<ClipMeta> = clips.iter().map(clip_meta).collect();
        let stop_requested = crate::shutdown::requested().is_some();
        let outgoing = (0..peers)
            .map(|to| Msg::Slots {
                slots: slots.clone(),
                clips: if to == 0 { metas.clone() } else { Vec::new() },
                stop: stop_requested,
                starved,
            })
            .collect();
        let got = self.collective.scatter(worker, outgoing, stop)?;
        let mut global: Vec<usize> = Vec::new();
        let mut records: Vec<ClipMeta> = Vec::new();
        let mut stop_here = false;
        let mut any_starved = false;
        for m in got {
            match m {
                Msg::Slots {
                    slots,
                    clips,
                    stop,
                    starved,
                } => {
                    global.extend(slots);
                    records.extend(clips);
                    stop_here |= stop;
                    any_starved |= starved;
                }
                other => return Err(unexpected("slots", &other)),
            }
        }
        // A worker stopped waiting for its clips: this step is not trained anywhere, and the
        // run ends with the one before, checkpointed (unless it just was).
        if any_starved {
            self.total = step;
            if index == 0 {
                tracing::warn!(
                    step,
                    waited_s = data_wait.as_secs_f64(),
                    "asked to stop while waiting for the clips of step {}: ending with step {step}",
                    step + 1
                );
            }
            if step > shared.first_step {
                // The replicas agree before one of them is saved.
                check_digests(worker, &mut self.collective, &self.model, step, shared)?;
                if index == 0 {
                    finish_stopped(&self.model, step, shared, outputs)?;
                }
            }
            return Ok(());
        }
        // Every worker saw every worker's flag: all make the same step the last one, which
        // then checkpoints and completes the tables as a run's last step does.
        if stop_here && step + 1 < self.total {
            if index == 0 {
                tracing::warn!(
                    step = step + 1,
                    "asked to stop: finishing with step {} and its checkpoint (the same command resumes)",
                    step + 1
                );
            }
            self.total = step + 1;
        }
        global.sort_unstable();
        records.sort_by_key(|r| r.slot);
        if global.is_empty() {
            bail!("step {step}: no clips could be loaded");
        }

        // 2. The masks of the whole global batch, exactly as one worker would draw them; this
        // worker takes the rows of its slots.
        let masks = shared
            .masking
            .draw(shared.cfg.raw.meta.seed, step, global.len())
            .map_err(|e| anyhow!("step {step}: cannot draw masks: {e}"))?;
        shared.telemetry.items(Stage::Mask, 1);
        let rows: Vec<usize> = slots
            .iter()
            .filter_map(|s| global.binary_search(s).ok())
            .collect();
        let context_tokens: Vec<usize> = masks
            .iter()
            .map(|m| m.context.first().map_or(0, Vec::len))
            .collect();
        let target_tokens: Vec<usize> = masks
            .iter()
            .map(|m| m.target.first().map_or(0, Vec::len))
            .collect();

        // 3. This worker's gradient (of its clips' mean loss).
        let shape = (
            shared.cfg.raw.data.num_frames,
            shared.cfg.raw.data.crop_size,
        );
        let mut nonfinite = None;
        let computed = if clips.is_empty() {
            Ok(self.model.empty_gradients(masks.len()))
        } else {
            // This step's clips: staged during the last step, or now.
            let ready = match self.prefetched.take() {
                Some((s, pre_slots, t)) if s == step && pre_slots == slots => {
                    tracing::trace!(step, "clips staged during the previous step");
                    Some(t)
                }
                _ => None,
            };
            let staged = Staging {
                stager: &self.stager,
                dtype: shared.dtype,
                ready,
            };
            // The next step's clips, if all loaded, are staged while this step computes: on a
            // GPU the upload then overlaps the step; on the CPU it is the same work done
            // earlier, which keeps this path under the CPU tests (a resumed run, which starts
            // without it, must train exactly as the run it continues).
            let next = step + 1;
            let prefetch = next < self.total && !self.loaded.less_equal(&next);
            let (held, stager, dtype) = (&self.clips, &self.stager, shared.dtype);
            let mut prefetched = None;
            let stage_next = || {
                let held = held.borrow();
                let Some(next_clips) = held.get(&next).filter(|_| prefetch) else {
                    return;
                };
                let mut order: Vec<&Clip> = next_clips.iter().collect();
                order.sort_by_key(|c| c.slot);
                let data: Vec<&[f32]> = order.iter().map(|c| c.data.as_slice()).collect();
                match stager.stage(&data, (3, shape.0, shape.1, shape.1), dtype) {
                    Ok(t) => prefetched = Some((next, order.iter().map(|c| c.slot).collect(), t)),
                    Err(e) => tracing::debug!(step = next, "not staged ahead: {e}"),
                }
            };
            let result = to_train_batch(&clips, &masks, &rows, shape, staged).and_then(|b| {
                self.model
                    .compute_gradients_overlapping(&b, stage_next)
                    .map_err(|e| {
                        if let vjepa_model::ModelError::NonFiniteLoss { loss, .. } = &e {
                            nonfinite = Some(*loss);
                            // Recorded where it is found: the run stops at once, and the worker
                            // that would gather the reports may be stopped before it sees them.
                            shared.telemetry.non_finite_loss(*loss);
                        }
                        anyhow!("training step {} failed: {e}", step + 1)
                    })
            });
            self.prefetched = prefetched;
            result
        };
        drop(clips);
        let (mut grads, failed) = match computed {
            Ok(g) => (g, None),
            Err(e) => (
                self.model.empty_gradients(masks.len()),
                Some(format!("{e:#}")),
            ),
        };
        // A single worker keeps its gradient where it is (on a GPU: no copy to the host and
        // back); the exchange below then carries only the step's scalars.
        let exchange = peers > 1;
        let flat = if exchange {
            self.model.flatten_gradients(&grads)?
        } else {
            FlatGradients {
                values: Vec::new(),
                present: Vec::new(),
            }
        };
        let mut embeddings: Vec<(usize, Vec<f32>)> = if shared.cfg.raw.outputs.features {
            slots
                .iter()
                .copied()
                .zip(std::mem::take(&mut grads.target_embeddings))
                .collect()
        } else {
            Vec::new()
        };

        // 4. Reduce-scatter: worker k sums shard k of every worker's gradient, in worker order.
        let len = flat.values.len();
        let outgoing = (0..peers)
            .map(|k| {
                Msg::Reduce(Box::new(ReduceMsg {
                    samples: grads.samples,
                    loss: grads.loss,
                    target_std: grads.target_std,
                    target_rank: grads.target_rank,
                    loss_per_mask: grads.loss_per_mask.clone(),
                    present: flat.present.clone(),
                    shard: flat.values[shard_range(len, peers, k)].to_vec(),
                    failed: failed.clone(),
                    nonfinite,
                    // Only worker 0 writes them: moved into its message, not copied.
                    embeddings: if k == 0 {
                        std::mem::take(&mut embeddings)
                    } else {
                        Vec::new()
                    },
                }))
            })
            .collect();
        drop(flat);
        let got = self.collective.scatter(worker, outgoing, stop)?;
        let mut parts = got
            .into_iter()
            .map(|m| match m {
                Msg::Reduce(r) => Ok(*r),
                other => Err(unexpected("reduce", &other)),
            })
            .collect::<anyhow::Result<Vec<ReduceMsg>>>()?;
        // Another process's non-finite loss reaches the served telemetry here (counted once).
        if index == 0
            && let Some(loss) = parts.iter().find_map(|p| p.nonfinite)
        {
            shared.telemetry.non_finite_loss(loss);
        }
        if let Some((w, why)) = parts
            .iter()
            .enumerate()
            .find_map(|(w, p)| p.failed.as_ref().map(|f| (w, f)))
        {
            bail!("worker {w}: {why}");
        }
        let samples: usize = parts.iter().map(|p| p.samples).sum();
        let mut embeddings: Vec<(usize, Vec<f32>)> = parts
            .iter_mut()
            .flat_map(|p| std::mem::take(&mut p.embeddings))
            .collect();
        embeddings.sort_by_key(|(slot, _)| *slot);
        let weights: Vec<(usize, &[f32])> =
            parts.iter().map(|p| (p.samples, &p.shard[..])).collect();
        let reduced = weighted_mean(&weights);
        let n_masks = grads.loss_per_mask.len();
        let loss = weighted_scalar(parts.iter().map(|p| (p.samples, p.loss)), samples);
        // A spread across clips needs two of them: a worker with one clip says nothing about
        // it (its 0 is no collapse), and with no such worker the figure is unknown (NaN), so
        // the collapse alert stays quiet rather than fire on one clip per GPU.
        let spread: Vec<(usize, f64)> = parts
            .iter()
            .filter(|p| p.samples >= 2)
            .map(|p| (p.samples, p.target_std))
            .collect();
        let spread_clips: usize = spread.iter().map(|(n, _)| n).sum();
        let target_std = if spread_clips == 0 {
            f64::NAN
        } else {
            weighted_scalar(spread.into_iter(), spread_clips)
        };
        let target_rank =
            weighted_scalar(parts.iter().map(|p| (p.samples, p.target_rank)), samples);
        let loss_per_mask: Vec<f64> = (0..n_masks)
            .map(|i| {
                weighted_scalar(
                    parts
                        .iter()
                        .map(|p| (p.samples, p.loss_per_mask.get(i).copied().unwrap_or(0.0))),
                    samples,
                )
            })
            .collect();
        let present: Vec<bool> = (0..parts[0].present.len())
            .map(|i| {
                parts
                    .iter()
                    .any(|p| p.present.get(i).copied().unwrap_or(false))
            })
            .collect();
        drop(parts);

        // 5. All-gather: every worker gets every reduced shard, so all apply the same bits.
        let got = self
            .collective
            .all_to_all(worker, Msg::Shard(reduced), stop)?;
        let mut values = Vec::with_capacity(len);
        for m in got {
            match m {
                Msg::Shard(x) => values.extend(x),
                other => return Err(unexpected("shard", &other)),
            }
        }
        if exchange {
            self.model
                .set_flat_gradients(&mut grads, &FlatGradients { values, present })?;
        }
        grads.loss = loss;
        grads.target_std = target_std;
        grads.target_rank = target_rank;
        grads.loss_per_mask = loss_per_mask;
        grads.samples = samples;
        grads.context_tokens = context_tokens;
        grads.target_tokens = target_tokens;
        let stats = self
            .model
            .apply_gradients(grads)
            .map_err(|e| anyhow!("training step {} failed: {e}", step + 1))?;
        self.trained = step + 1;
        let done = stats.step;

        // 6. Every replica must hold the same parameters.
        let every = shared.check_params_every;
        let digest = if (every > 0 && done.is_multiple_of(every)) || done == self.total {
            check_digests(worker, &mut self.collective, &self.model, done, shared)?
        } else {
            0
        };
        if index.is_multiple_of(shared.threads) {
            // Steps below the one trained are done everywhere: older versions are not needed.
            shared.versions.forget_before(step + 1);
        }
        let step_time = started.elapsed();
        if index == 0 {
            finish_step(
                &self.model,
                &stats,
                &records,
                &embeddings,
                global.len(),
                (data_wait, step_time),
                digest,
                shared,
                outputs,
                self.total,
            )?;
        }
        Ok(())
    }
}

/// Σ n_w · x_w / N in f64, in worker order (the global-batch mean of per-worker means).
fn weighted_scalar(parts: impl Iterator<Item = (usize, f64)>, total: usize) -> f64 {
    if total == 0 {
        return 0.0;
    }
    let sum: f64 = parts
        .filter(|(n, _)| *n > 0)
        .map(|(n, x)| n as f64 * x)
        .sum();
    sum / total as f64
}

fn clip_meta(c: &Clip) -> ClipMeta {
    let p = &c.params;
    ClipMeta {
        slot: c.slot,
        uri: c.uri.clone(),
        frames: c.frame_indices.clone(),
        crop: [
            p.crop.top as i64,
            p.crop.left as i64,
            p.crop.height as i64,
            p.crop.width as i64,
        ],
        flip: p.flip,
        bytes_read: c.bytes_read,
        decode_s: c.decode_s,
        nvdec: c.nvdec,
    }
}

/// Worker 0 after a step: the checkpoint when due, the clip records of the whole global
/// batch, and the metrics row.
#[allow(clippy::too_many_arguments)]
fn finish_step(
    model: &Pretrainer,
    stats: &vjepa_model::StepStats,
    records: &[ClipMeta],
    embeddings: &[(usize, Vec<f32>)],
    clips: usize,
    (data_wait, step_time): (Duration, Duration),
    params_digest: u64,
    shared: &Shared,
    outputs: &Rc<RefCell<Outputs>>,
    total: u64,
) -> anyhow::Result<()> {
    let cfg = &shared.cfg.raw;
    let every = cfg.outputs.checkpoint_every.unwrap_or(shared.ipe);
    let done = stats.step;
    let step = done - 1;
    let checkpointed = (every > 0 && done.is_multiple_of(every)) || done == total;
    if let Some(w) = outputs.borrow_mut().clips.as_mut() {
        for c in records {
            w.push(ClipRow {
                step,
                slot: c.slot as u64,
                uri: c.uri.clone(),
                frames: c.frames.iter().map(|&f| f as i64).collect(),
                crop: c.crop,
                flip: c.flip,
            });
        }
    }
    if let Some(w) = outputs.borrow_mut().features.as_mut() {
        for (slot, embedding) in embeddings {
            let Some(c) = records.iter().find(|c| c.slot == *slot) else {
                continue;
            };
            w.push(FeatureRow {
                uri: c.uri.clone(),
                label: String::new(),
                segment: 0,
                view: 0,
                step,
                frames: c.frames.iter().map(|&f| f as i64).collect(),
                embedding: embedding.clone(),
                tokens: Vec::new(),
            });
        }
    }
    let ipe = shared.ipe;
    let wall = step_time + data_wait;
    let row = MetricsRow {
        step: done,
        epoch: (done - 1) / ipe + 1,
        time_unix_us: crate::now_unix_us(),
        loss: stats.loss,
        loss_per_mask: stats.loss_per_mask.clone(),
        lr: stats.lr,
        weight_decay: stats.weight_decay,
        ema_momentum: stats.ema_momentum,
        encoder_grad_norm: stats.encoder_grad_norm,
        predictor_grad_norm: stats.predictor_grad_norm,
        context_tokens: stats.context_tokens.iter().map(|&k| k as i64).collect(),
        target_tokens: stats.target_tokens.iter().map(|&k| k as i64).collect(),
        clips_per_sec: clips as f64 / wall.as_secs_f64().max(1e-9),
        step_time_s: step_time.as_secs_f64(),
        data_wait_s: data_wait.as_secs_f64(),
        bytes_read: records.iter().map(|c| c.bytes_read).sum(),
        decode_s: records.iter().map(|c| c.decode_s).sum(),
        nvdec_clips: records.iter().filter(|c| c.nvdec).count() as u64,
        target_std: stats.target_std,
        target_rank: stats.target_rank,
        params_digest,
    };
    shared.telemetry.items(Stage::Train, 1);
    shared.telemetry.record_step(&StepSample {
        step: done,
        loss: stats.loss,
        loss_per_mask: stats.loss_per_mask.clone(),
        lr: stats.lr,
        weight_decay: stats.weight_decay,
        ema_momentum: stats.ema_momentum,
        encoder_grad_norm: stats.encoder_grad_norm,
        predictor_grad_norm: stats.predictor_grad_norm,
        target_std: stats.target_std,
        target_rank: stats.target_rank,
        clips,
        tokens: clips as u64 * shared.tokens_per_clip,
        step_s: step_time.as_secs_f64(),
        data_wait_s: data_wait.as_secs_f64(),
    });
    if done.is_multiple_of(cfg.outputs.log_every) || done == total || done == 1 {
        tracing::info!(
            step = done,
            epoch = row.epoch,
            loss = format_args!("{:.5}", row.loss),
            lr = format_args!("{:.3e}", row.lr),
            wd = format_args!("{:.4}", row.weight_decay),
            rank = format_args!("{:.2}", row.target_rank),
            ctx = ?row.context_tokens,
            tgt = ?row.target_tokens,
            step_s = format_args!("{:.3}", row.step_time_s),
            wait_s = format_args!("{:.3}", row.data_wait_s),
            clips_per_s = format_args!("{:.2}", row.clips_per_sec),
            "train"
        );
    }
    write_metrics(row, shared, outputs);
    if checkpointed {
        // The tables first: whenever a checkpoint exists, every row up to its step is in a
        // completed file (a kill between the two only repeats steps, never loses rows).
        if done < total {
            roll_tables(done, shared, outputs)?;
        } else {
            close_final_tables(shared, outputs)?;
        }
        write_checkpoint(model, done, shared, outputs)?;
    }
    Ok(())
}

/// Worker 0 when a stop ends the run between steps (`done` steps trained, the next one's
/// clips still coming): the tables completed, and the checkpoint at `done` unless there is
/// one already.
fn finish_stopped(
    model: &Pretrainer,
    done: u64,
    shared: &Shared,
    outputs: &Rc<RefCell<Outputs>>,
) -> anyhow::Result<()> {
    close_final_tables(shared, outputs)?;
    if outputs.borrow().checkpointed_at != Some(done) {
        write_checkpoint(model, done, shared, outputs)?;
    }
    Ok(())
}

/// The checkpoint after `done` steps, with the run state a resume needs; older ones beyond
/// `outputs.keep_checkpoints` are deleted after it is in place.
fn write_checkpoint(
    model: &Pretrainer,
    done: u64,
    shared: &Shared,
    outputs: &Rc<RefCell<Outputs>>,
) -> anyhow::Result<()> {
    let cfg = &shared.cfg.raw;
    let next_clip = shared.first_clip + (done - shared.first_step) * cfg.data.batch_size as u64;
    let run_state = [
        (META_NEXT_CLIP.to_string(), next_clip.to_string()),
        (META_BATCH_SIZE.to_string(), cfg.data.batch_size.to_string()),
        // The version the next step (number `done`, 0-based) draws from.
        (
            META_CATALOG.to_string(),
            catalog_key(&shared.versions.at_step(done)),
        ),
        (
            META_CATALOG_VERSION.to_string(),
            shared.versions.at_step(done).version.to_string(),
        ),
        (META_IPE.to_string(), shared.ipe.to_string()),
    ];
    let bytes = model
        .to_safetensors_with(&run_state)
        .map_err(|e| anyhow!("serialising checkpoint at step {done}: {e}"))?;
    let rel = shared
        .handle
        .block_on(checkpoints::write(&shared.out, done, Bytes::from(bytes)))
        .map_err(|e| anyhow!("writing checkpoint at step {done}: {e}"))?;
    tracing::info!(checkpoint = %shared.out.uri_of(&rel), "checkpoint written");
    let keep = cfg
        .outputs
        .keep_checkpoints
        .unwrap_or(if cfg.outputs.checkpoint_every.is_none() {
            2
        } else {
            0
        });
    if keep > 0 {
        let deleted = shared
            .handle
            .block_on(checkpoints::keep_newest(&shared.out, keep))
            .map_err(|e| anyhow!("deleting old checkpoints (outputs.keep_checkpoints): {e}"))?;
        if !deleted.is_empty() {
            tracing::info!(keep, deleted = ?deleted, "older checkpoints deleted");
        }
        let mut o = outputs.borrow_mut();
        o.checkpoints.retain(|c| !deleted.contains(c));
    }
    let mut o = outputs.borrow_mut();
    o.checkpoints.push(rel);
    o.checkpointed_at = Some(done);
    Ok(())
}

/// Before the last checkpoint: completes the metrics and clips tables (the quarantine table stays
/// open for records still arriving; it closes with the run).
fn close_final_tables(shared: &Shared, outputs: &Rc<RefCell<Outputs>>) -> anyhow::Result<()> {
    let (metrics, clips, features) = {
        let mut o = outputs.borrow_mut();
        (o.metrics.take(), o.clips.take(), o.features.take())
    };
    if let Some(w) = metrics {
        shared
            .handle
            .block_on(w.close())
            .map_err(|e| anyhow!("writing metrics: {e}"))?;
    }
    if let Some(w) = clips {
        shared
            .handle
            .block_on(w.close())
            .map_err(|e| anyhow!("writing clip records: {e}"))?;
    }
    if let Some(w) = features {
        shared
            .handle
            .block_on(w.close())
            .map_err(|e| anyhow!("writing features: {e}"))?;
    }
    Ok(())
}

/// After the checkpoint at `step`: completes the metrics, quarantine and clips tables (their
/// rows up to `step` are readable from now on, whatever happens to the process) and goes on in
/// `*-from-{step}.parquet`, the names a run resumed from that checkpoint writes. A run killed
/// later loses only rows of steps that its resumed run trains, and writes, again.
fn roll_tables(step: u64, shared: &Shared, outputs: &Rc<RefCell<Outputs>>) -> anyhow::Result<()> {
    let mut o = outputs.borrow_mut();
    o.rows_since_flush = 0;
    let h = &shared.handle;
    if let Some(w) = o.metrics.as_mut() {
        h.block_on(w.roll(&format!("metrics-from-{step:08}.parquet")))
            .map_err(|e| anyhow!("writing metrics: {e}"))?;
    }
    if let Some(w) = o.quarantine.as_mut() {
        h.block_on(w.roll(&format!("quarantine-from-{step:08}.parquet")))
            .map_err(|e| anyhow!("writing quarantine records: {e}"))?;
    }
    if let Some(w) = o.clips.as_mut() {
        h.block_on(w.roll(&format!("clips-from-{step:08}.parquet")))
            .map_err(|e| anyhow!("writing clip records: {e}"))?;
    }
    if let Some(w) = o.features.as_mut() {
        h.block_on(w.roll(&format!("features-from-{step:08}.parquet")))
            .map_err(|e| anyhow!("writing features: {e}"))?;
    }
    Ok(())
}

/// Before a run that starts at `first_step` (not `--fresh`): deletes the tables and catalog
/// records of later steps ([`remove_run_tables`]), unless a checkpoint of a later step exists
/// (one that did not load now may load at the next restart, and needs them). Failures are
/// warnings: stale files cost a tidy table, not the run.
fn remove_later_tables(handle: &tokio::runtime::Handle, out: &Store, first_step: u64) {
    let later_checkpoint = match handle.block_on(checkpoints::all_newest_first(out)) {
        Ok(all) => all.into_iter().map(|(s, _)| s).find(|&s| s > first_step),
        Err(e) => {
            tracing::warn!(error = %e, "could not list the checkpoints; the outputs of later steps are kept");
            return;
        }
    };
    if let Some(step) = later_checkpoint {
        tracing::warn!(
            checkpoint = step,
            "a later checkpoint is in place (it did not load): the outputs of steps after {first_step} are kept"
        );
        return;
    }
    match handle.block_on(remove_run_tables(out, Some(first_step))) {
        Ok(0) => {}
        Ok(removed) => tracing::info!(
            removed,
            "deleted the tables and catalog records of steps after {first_step}, left by a run that stopped"
        ),
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "could not delete the outputs of later steps")
        }
    }
}

/// Deletes what a run leaves besides its checkpoints and first tables: the tables of resumed
/// runs and rolls (`metrics-from-*.parquet`, `quarantine-from-*`, `clips-from-*`) and the
/// catalog records, so that a fresh run's outputs are its own (the first tables it overwrites);
/// with `after`, only those of steps after it (a run resumed there writes its own).
async fn remove_run_tables(out: &Store, after: Option<u64>) -> anyhow::Result<usize> {
    let mut removed = 0;
    let later = |step: u64| after.is_none_or(|a| step > a);
    for o in out.list().await? {
        let name = o.path.as_str();
        let table = ["metrics", "quarantine", "clips", "features"]
            .iter()
            .any(|t| {
                match after {
                    // Every `-from-` file, whatever follows.
                    None => {
                        name.starts_with(&format!("{t}-from-"))
                            && name.ends_with(".parquet")
                            && !name.contains('/')
                    }
                    Some(_) => vjepa_storage::tables::table_file_step(t, name)
                        .is_some_and(|step| step > 0 && later(step)),
                }
            });
        let record = match after {
            None => name.starts_with("catalog/step-") && name.ends_with(".json"),
            Some(_) => VersionRecord::step_of(name).is_some_and(later),
        };
        if table || record {
            out.delete(name).await?;
            removed += 1;
        }
    }
    Ok(removed)
}

fn write_metrics(row: MetricsRow, shared: &Shared, outputs: &Rc<RefCell<Outputs>>) {
    let mut o = outputs.borrow_mut();
    o.last_loss = Some(row.loss);
    o.steps += 1;
    o.rows_since_flush += 1;
    let flush = o.rows_since_flush >= shared.cfg.raw.outputs.metrics_flush_every;
    if flush {
        o.rows_since_flush = 0;
    }
    shared.telemetry.items(Stage::Sink, 1);
    shared
        .telemetry
        .queue_set(Stage::Sink, o.rows_since_flush as i64);
    let Some(writer) = o.metrics.as_mut() else {
        return;
    };
    writer.push(row);
    if flush && let Err(e) = shared.handle.block_on(writer.flush()) {
        shared.fatal.set(format!("writing metrics: {e}"));
    }
    if flush
        && let Some(c) = o.clips.as_mut()
        && let Err(e) = shared.handle.block_on(c.flush())
    {
        shared.fatal.set(format!("writing clip records: {e}"));
    }
    if flush
        && let Some(f) = o.features.as_mut()
        && let Err(e) = shared.handle.block_on(f.flush())
    {
        shared.fatal.set(format!("writing features: {e}"));
    }
    // Quarantine records go out with the metrics, not only at the end of the run.
    if flush
        && let Some(q) = o.quarantine.as_mut()
        && q.pending() > 0
        && let Err(e) = shared.handle.block_on(q.flush())
    {
        shared.fatal.set(format!("writing quarantine records: {e}"));
    }
}

/// What the status page shows of the run's config (no credentials: datasets as labels).
fn config_summary(
    cfg: &JobConfig,
    datasets: &[String],
    total: u64,
    first_step: u64,
    output: &str,
) -> serde_json::Value {
    let r = &cfg.raw;
    let enc = cfg.encoder_config();
    serde_json::json!({
        "model": format!(
            "{} (D={}, depth {}, heads {})",
            r.model.model_name, enc.embed_dim, enc.depth, enc.num_heads
        ),
        "datasets": datasets
            .iter()
            .map(|d| crate::telemetry::dataset_label(d))
            .collect::<Vec<_>>(),
        "batch_size": r.data.batch_size,
        "clip": format!(
            "{} frames every {} at {}px",
            r.data.num_frames, r.data.sampling_rate, r.data.crop_size
        ),
        "objective": r.model.objective.as_str(),
        "masks": match r.model.objective {
            Objective::Vjepa => r.mask.len(),
            Objective::Pixel => 1,
        },
        "steps": total,
        "first_step": first_step,
        "lr": r.optimization.lr,
        "weight_decay": [r.optimization.weight_decay, r.optimization.final_weight_decay],
        "ema": r.optimization.ema,
        "workers": r.workers.count,
        "seed": r.meta.seed,
        "output": crate::telemetry::dataset_label(output),
    })
}

/// The collection's per-dataset counts must be the version's (a mismatch is a bug).
fn check_counts(version: &CatalogVersion, counts: &BTreeMap<usize, i64>) -> anyhow::Result<()> {
    let from_collection: Vec<usize> = (0..version.counts.len())
        .map(|d| counts.get(&d).copied().unwrap_or(0).max(0) as usize)
        .collect();
    if from_collection != version.counts {
        bail!(
            "catalog version {}: the collection counts {from_collection:?} videos per dataset, the listing {:?}",
            version.version,
            version.counts
        );
    }
    Ok(())
}

/// Writes `catalog/step-NNNNNNNN.json`, the record resume needs to rebuild the version.
fn write_version_record(
    shared: &Shared,
    version: &CatalogVersion,
    prev: Option<&CatalogVersion>,
) -> anyhow::Result<VersionRecord> {
    let record = version.record(prev, &shared.catalog.names);
    let json = serde_json::to_vec(&record).context("encoding a catalog version record")?;
    let name = record.object_name();
    shared
        .handle
        .block_on(shared.out.put(&name, Bytes::from(json)))
        .with_context(|| format!("writing {}", shared.out.uri_of(&name)))?;
    Ok(record)
}

/// Worker 0: turns a new listing into the catalog version for steps from `from_step` (unless
/// nothing changed): quarantined videos are left out, the changes go through the catalog
/// collection, whose counts become the version's, and the version is recorded and published.
/// Returns its record, for the other processes.
fn apply_listing(
    worker: &mut timely::worker::Worker,
    cat: &mut CatalogCounts,
    listing: &Listing,
    from_step: u64,
    shared: &Shared,
    outputs: &Rc<RefCell<Outputs>>,
) -> anyhow::Result<Option<VersionRecord>> {
    let prev = shared.versions.latest();
    let excluded = {
        let mut o = outputs.borrow_mut();
        for r in &listing.rejected {
            if o.seen_bad.insert(&r.uri, None) {
                shared.telemetry.quarantined(&r.uri, &r.reason);
                o.quarantined += 1;
                let row = to_quarantine_row(r);
                if let Some(q) = o.quarantine.as_mut() {
                    q.push(row);
                }
            }
        }
        o.seen_bad.note_listing(&listing.videos);
        o.seen_bad.clone()
    };
    let mut next = CatalogVersion::build(
        prev.version + 1,
        from_step,
        listing,
        &excluded,
        shared.catalog.names.len(),
    );
    let (added, removed) = next.diff(&prev);
    if added.is_empty() && removed.is_empty() {
        tracing::debug!(version = prev.version, "catalog refreshed: unchanged");
        return Ok(None);
    }
    if let Err(e) = VersionDraws::new(
        shared.cfg.raw.meta.seed,
        next.key,
        next.counts.clone(),
        &shared.settings.mixing,
    ) {
        tracing::warn!(error = %e, "catalog refresh left nothing to draw from; keeping the current catalog");
        return Ok(None);
    }
    let (n_added, n_removed) = (added.len(), removed.len());
    // Names in both: the same video replaced under its name (another object version).
    let removed_names: HashSet<(usize, &str)> = removed
        .iter()
        .map(|v| (v.dataset, v.rel.as_str()))
        .collect();
    let replaced = added
        .iter()
        .filter(|v| removed_names.contains(&(v.dataset, v.rel.as_str())))
        .count();
    let before: HashSet<&str> = prev.videos.iter().map(|v| v.uri.as_str()).collect();
    for v in &added {
        if excluded.has_name(v) && !before.contains(v.uri.as_str()) {
            tracing::info!(uri = %v.uri, object_tag = ?v.tag, "a quarantined video was replaced under its name: the new version is back in the catalog");
        }
    }
    for v in added {
        cat.input.insert((v.dataset, v.uri.clone()));
    }
    for v in removed {
        cat.input.remove((v.dataset, v.uri.clone()));
    }
    cat.input.advance_to(next.version + 1);
    cat.input.flush();
    while cat.probe.less_than(&(next.version + 1)) {
        if shared.fatal.get().is_some() {
            bail!("stopped while updating the catalog");
        }
        worker.step_or_park(Some(PARK));
    }
    let counts = cat.counts.borrow().clone();
    check_counts(&next, &counts)?;
    next.counts = (0..next.counts.len())
        .map(|d| counts.get(&d).copied().unwrap_or(0).max(0) as usize)
        .collect();
    let record = write_version_record(shared, &next, Some(&prev))?;
    tracing::info!(
        version = next.version,
        from_step,
        videos = next.videos.len(),
        added = n_added,
        removed = n_removed,
        replaced,
        counts = ?next.counts,
        "catalog version"
    );
    shared
        .telemetry
        .set_catalog(&shared.catalog.names, &next.counts);
    shared.versions.push(next);
    Ok(Some(record))
}

fn to_quarantine_row(q: &Quarantined) -> vjepa_storage::tables::QuarantineRow {
    vjepa_storage::tables::QuarantineRow {
        uri: q.uri.clone(),
        reason: q.reason.clone(),
        detail: q.detail.clone(),
        time_unix_us: q.time_unix_us,
        object_version: q.object_tag.clone(),
    }
}

/// How a step's clips reach the model's device: staged during the last step, or now.
struct Staging<'a> {
    stager: &'a vjepa_model::ClipStager,
    /// The model's compute dtype (what the clips are staged in).
    dtype: vjepa_model::DType,
    /// This step's clips, already staged in slot order.
    ready: Option<vjepa_model::Tensor>,
}

/// Packs clips (`[3, frames, crop, crop]` each, sorted by slot) and rows `rows` of the global
/// batch's masks (row `rows[i]` for `clips[i]`) into the model's tensors: the clips staged onto
/// the model's device in its compute dtype.
fn to_train_batch(
    clips: &[Clip],
    masks: &[BatchMask],
    rows: &[usize],
    (t, s): (usize, usize),
    staging: Staging<'_>,
) -> anyhow::Result<TrainBatch> {
    if rows.len() != clips.len() {
        bail!("{} clips but {} mask rows", clips.len(), rows.len());
    }
    let clips_t = match staging.ready {
        Some(ready) => ready,
        None => {
            let data: Vec<&[f32]> = clips.iter().map(|c| c.data.as_slice()).collect();
            staging
                .stager
                .stage(&data, (3, t, s, s), staging.dtype)
                .map_err(|e| anyhow!("packing the batch: {e}"))?
        }
    };
    let pick = |all: &[Vec<u32>]| -> anyhow::Result<Vec<Vec<u32>>> {
        rows.iter()
            .map(|&r| {
                all.get(r)
                    .cloned()
                    .ok_or_else(|| anyhow!("mask row {r} of {}", all.len()))
            })
            .collect()
    };
    let mut picked = Vec::with_capacity(masks.len());
    for m in masks {
        picked.push(MaskIndices {
            context: index_tensor(&pick(&m.context)?)?,
            target: index_tensor(&pick(&m.target)?)?,
        });
    }
    Ok(TrainBatch {
        clips: clips_t,
        masks: picked,
    })
}

fn index_tensor(rows: &[Vec<u32>]) -> anyhow::Result<Tensor> {
    let k = rows.first().map(|r| r.len()).unwrap_or(0);
    let flat: Vec<u32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
    Ok(Tensor::from_vec(flat, (rows.len(), k), &Device::Cpu)?)
}

/// The runtime a one-shot command (`inspect`, `convert`) reads and writes object stores on: one
/// worker thread, so that blocking on its handle drives its I/O (a current-thread runtime's
/// handle does not: an S3 read through it never finished).
pub(crate) fn io_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("starting the I/O runtime")
}

/// Reads the object named by a full location (local path, `file://` or `s3://` URL). `handle`
/// must belong to a multi-thread runtime ([`io_runtime`]): one of a current-thread runtime is
/// refused, since blocking on it would never drive its I/O.
pub(crate) fn read_location(
    handle: &tokio::runtime::Handle,
    location: &str,
    s3: &vjepa_storage::S3Settings,
) -> anyhow::Result<Bytes> {
    if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread {
        anyhow::bail!("reading {location}: needs a multi-thread runtime (see io_runtime)");
    }
    let (store, rel) = split_location(location, s3)?;
    handle
        .block_on(store.get(&rel))
        .with_context(|| format!("reading {}", vjepa_storage::redact_url(location)))
}

/// Splits a file URL/path or object URL into its directory store and the object's name.
pub fn split_location(
    location: &str,
    s3: &vjepa_storage::S3Settings,
) -> anyhow::Result<(Store, String)> {
    split_location_with(location, s3, false)
}

/// [`split_location`], creating a missing local directory when `create` (for outputs).
pub(crate) fn split_location_with(
    location: &str,
    s3: &vjepa_storage::S3Settings,
    create: bool,
) -> anyhow::Result<(Store, String)> {
    let trimmed = location.trim_end_matches('/');
    let (dir, name) = match trimmed.rfind('/') {
        Some(i) => (&trimmed[..=i], &trimmed[i + 1..]),
        None => ("./", trimmed),
    };
    let store = Store::open(dir, s3, create)
        .with_context(|| format!("opening {}", vjepa_storage::redact_url(dir)))?;
    Ok((store, name.to_string()))
}

/// The model exactly as a fresh run of `cfg` starts it (spec init, `meta.seed`), as checkpoint
/// bytes: the random-init baseline of a probe, or a shared starting point for experiments.
/// `ipe` is the config's (`optimization.ipe`, else 1); it only shapes the schedules.
pub fn initial_checkpoint(cfg: &JobConfig) -> anyhow::Result<Vec<u8>> {
    let ipe = cfg.raw.optimization.ipe.unwrap_or(1).max(1);
    Ok(fresh_model(cfg, ipe, &Device::Cpu)?.to_safetensors_with(&[])?)
}

/// The model of `cfg`'s objective at step 0 (spec init from `meta.seed`), with schedules for
/// `ipe` iterations per epoch.
fn fresh_model(cfg: &JobConfig, ipe: u64, device: &Device) -> anyhow::Result<Pretrainer> {
    let (enc, optim, seed) = (
        cfg.encoder_config(),
        cfg.optim_config(ipe),
        cfg.raw.meta.seed,
    );
    Ok(match cfg.raw.model.objective {
        Objective::Vjepa => Pretrainer::VJepa(Box::new(VJepa::new(
            enc,
            cfg.predictor_config(),
            optim,
            seed,
            device,
        )?)),
        Objective::Pixel => Pretrainer::Pixel(Box::new(PixelMae::new(
            enc,
            cfg.pixel_config(),
            optim,
            seed,
            device,
        )?)),
    })
}

/// Loads a checkpoint the way a resumed run would and describes it.
pub fn inspect_checkpoint(location: &str) -> anyhow::Result<String> {
    inspect_checkpoint_with(location, &vjepa_storage::S3Settings::default(), None)
}

/// [`inspect_checkpoint`] with a job config: its `storage.s3` reaches the location, and its
/// model shape reads an official `.pth.tar` (which carries no head counts).
///
/// A training checkpoint (ours or official) is described as a resumed run would load it;
/// any other `.safetensors` file (a fine-tuned `encoder.safetensors`, a `probe.safetensors`)
/// by its format, tensors and values.
pub fn inspect_checkpoint_with(
    location: &str,
    s3: &vjepa_storage::S3Settings,
    cfg: Option<&JobConfig>,
) -> anyhow::Result<String> {
    let runtime = io_runtime()?;
    let bytes = read_location(runtime.handle(), location, s3)?;
    if crate::convert::Format::of(location) == Some(crate::convert::Format::Pth) {
        let configs = cfg
            .map(crate::convert::model_configs)
            .transpose()
            .map_err(|e| anyhow!("{e}"))?;
        let (model, info) = vjepa_model::VJepa::from_pth(&bytes, configs.as_ref(), &Device::Cpu)
            .with_context(|| {
                format!(
                    "loading {location} (an official checkpoint: --config gives the model \
                     shape it does not carry)"
                )
            })?;
        let epoch = info
            .epoch
            .map(|e| format!(", epoch {e}"))
            .unwrap_or_default();
        return Ok(describe_pretrainer(
            &format!("official checkpoint {location}{epoch}"),
            &Pretrainer::VJepa(Box::new(model)),
            bytes.len(),
        ));
    }
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| anyhow!("{location}: not a .safetensors or official .pth.tar file: {e}"))?;
    let format = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get("format"))
        .cloned();
    match Pretrainer::from_safetensors(&bytes, &Device::Cpu) {
        Ok(model) => Ok(describe_pretrainer(
            &format!("checkpoint {location}"),
            &model,
            bytes.len(),
        )),
        // Not a training checkpoint: what the file holds, by tensor-name prefix.
        Err(_) => {
            let tensors = header.tensors();
            let mut groups: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
            for (name, info) in &tensors {
                let prefix = name.split('.').next().unwrap_or(name);
                let g = groups.entry(prefix).or_default();
                g.0 += 1;
                g.1 += info.shape.iter().product::<usize>();
            }
            let total: usize = groups.values().map(|g| g.1).sum();
            let groups: Vec<String> = groups
                .iter()
                .map(|(p, (n, v))| format!("{p}.* {n} tensors {v} values"))
                .collect();
            Ok(format!(
                "{location}: not a training checkpoint (format {}), {} bytes; {} tensors, {total} values: {}",
                format.as_deref().unwrap_or("not recorded"),
                bytes.len(),
                tensors.len(),
                groups.join(", ")
            ))
        }
    }
}

/// One line on a training checkpoint: objective, step, encoder and predictor (or decoder).
fn describe_pretrainer(what: &str, model: &Pretrainer, bytes: usize) -> String {
    let (e, p) = model.num_trainable_params();
    let enc = model.encoder_config();
    let (head, head_cfg) = match model {
        Pretrainer::VJepa(m) => ("predictor", m.predictor_config().clone()),
        Pretrainer::Pixel(m) => ("pixel decoder", m.pixel_config().decoder()),
    };
    format!(
        "{what}: objective {}, step {}, {bytes} bytes; encoder D={} depth {} heads {} ({e} params), {head} D={} depth {} ({p} params)",
        model.objective(),
        model.steps_done(),
        enc.embed_dim,
        enc.depth,
        enc.num_heads,
        head_cfg.embed_dim,
        head_cfg.depth,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Blocking on a current-thread runtime's handle never drives its I/O, so reads through one
    /// hung on S3: they are refused; the command runtime reads.
    #[test]
    fn read_location_needs_a_multi_thread_runtime() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("x.bin");
        std::fs::write(&file, b"bytes").unwrap();
        let loc = file.to_str().unwrap();
        let s3 = vjepa_storage::S3Settings::default();
        let current = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let err = read_location(current.handle(), loc, &s3).unwrap_err();
        assert!(err.to_string().contains("multi-thread"), "{err:#}");
        let rt = io_runtime().unwrap();
        assert_eq!(&read_location(rt.handle(), loc, &s3).unwrap()[..], b"bytes");
    }
}
