//! `vjepa train`: the dataflow, wired in the order the data moves (catalog → sample → load →
//! batch → mask → train → sinks), plus the run's outputs.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashSet};
use std::rc::Rc;
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use bytes::Bytes;
use timely::dataflow::operators::core::OkErr;
use timely::dataflow::operators::{Inspect, Probe};
use timely::dataflow::{InputHandle, ProbeHandle};

use vjepa_model::{Device, MaskIndices, Tensor, TrainBatch, VJepa};
use vjepa_operators::batching::assemble_batches;
use vjepa_operators::catalog::{CatalogCounts, catalog_counts};
use vjepa_operators::load::load_clips_parallel;
use vjepa_operators::mask_batches::mask_batches;
use vjepa_operators::masking::{Grid, MaskGenerator};
use vjepa_operators::records::{ClipRequest, Loaded, MaskedBatch, Quarantined};
use vjepa_operators::sampler::VersionDraws;
use vjepa_operators::sampling::ClipSampling;
use vjepa_operators::sinks::{sink_local, sink_records};
use vjepa_operators::train::train;
use vjepa_storage::tables::{ClipRow, ClipsWriter, MetricsRow, MetricsWriter, QuarantineWriter};
use vjepa_storage::{Store, checkpoints};

use crate::catalog::{Catalog, CatalogVersion, Listing, Versions};
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
}

/// Runs the training job to completion.
pub fn run(mut cfg: JobConfig, overrides: TrainOverrides) -> anyhow::Result<TrainSummary> {
    if let Some(w) = overrides.workers {
        cfg.raw.workers.count = w.max(1);
    }
    if !overrides.datasets.is_empty() {
        cfg.raw.data.datasets = overrides.datasets.clone();
    }
    if let Some(out) = &overrides.out {
        cfg.raw.outputs.dir = Some(out.clone());
    }
    if let Some(m) = overrides.max_steps {
        cfg.raw.optimization.max_steps = Some(m);
    }
    if let Some(s) = overrides.seed {
        cfg.raw.meta.seed = s;
    }
    if let Some(l) = &overrides.listen {
        cfg.raw.telemetry.listen = Some(l.clone());
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
    let out = Store::open(&out_location, &s3, true)
        .with_context(|| format!("opening output location {out_location}"))?;
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
    let out = out.clone();
    let handle = runtime.handle().clone();
    let s3 = cfg.s3_settings();
    let catalog = handle
        .block_on(Catalog::open(&cfg.raw.data.datasets, &s3))
        .context("opening datasets")?;
    // Version 0: the listing at start (quarantined videos leave at the first refresh).
    let first_version =
        CatalogVersion::build(0, 0, &catalog.first, &HashSet::new(), catalog.names.len());
    if first_version.videos.is_empty() {
        bail!(
            "no videos found in data.datasets ({}): nothing to train on",
            cfg.raw.data.datasets.join(", ")
        );
    }
    let mixing = cfg.mixing();
    VersionDraws::new(
        cfg.raw.meta.seed,
        first_version.key,
        first_version.counts.clone(),
        &mixing,
    )
    .context("data.datasets_weights")?;
    let ipe = cfg.iterations_per_epoch(first_version.videos.len());
    let total = cfg.total_steps(ipe);
    let enc = cfg.encoder_config();
    let pred = cfg.predictor_config();
    let optim = cfg.optim_config(ipe);

    // Where the run starts: by default it continues from the newest complete checkpoint in its
    // own output location (so the same command resumes after a crash or `kill -9`); `--fresh`
    // discards them; `meta.read_checkpoint` seeds a run that has none of its own yet.
    if overrides.fresh && (overrides.resume || cfg.raw.meta.load_checkpoint) {
        bail!("--fresh contradicts --resume / meta.load_checkpoint: true");
    }
    let batch_size = cfg.raw.data.batch_size;
    let fingerprint = catalog_key(&first_version);
    let mut resumed_own = false;
    let start: Option<Resumed> = if overrides.fresh {
        let removed = handle.block_on(checkpoints::remove_all(&out))?;
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
        if resumed_own && r.model.seed() != cfg.raw.meta.seed {
            bail!(
                "{} was trained with meta.seed {}, this run has seed {}: the data would not \
                 continue where it stopped (use the same seed, another outputs.dir, or --fresh)",
                r.uri,
                r.model.seed(),
                cfg.raw.meta.seed
            );
        }
        if let Some(saved) = &r.catalog
            && saved != &fingerprint
        {
            tracing::warn!(
                checkpoint = %r.uri,
                saved = %saved,
                now = %fingerprint,
                "the catalog changed since this checkpoint: the clips from here on differ from \
                 those the interrupted run would have used"
            );
        }
        tracing::info!(
            checkpoint = %r.uri,
            step = r.model.steps_done(),
            next_clip = r.next_clip,
            "resuming"
        );
    }
    let first_step = start.as_ref().map_or(0, |r| r.model.steps_done());
    // The sampler cursor: the global number of the next clip (a pure function of the step for
    // an unchanged batch size, stored so that a changed one continues the same clip sequence).
    let first_clip = start
        .as_ref()
        .map_or(0, |r| r.next_clip.unwrap_or(first_step * batch_size as u64));
    let resumed = start.map(|r| r.model);
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
            });
        }
        bail!("the checkpoint is at step {first_step}, the run has {total} steps: nothing to do");
    }

    let (metrics_name, quarantine_name, clips_name) = if first_step == 0 {
        (
            "metrics.parquet".to_string(),
            "quarantine.parquet".to_string(),
            "clips.parquet".to_string(),
        )
    } else {
        (
            format!("metrics-from-{first_step:08}.parquet"),
            format!("quarantine-from-{first_step:08}.parquet"),
            format!("clips-from-{first_step:08}.parquet"),
        )
    };
    let first_version = CatalogVersion {
        from_step: first_step,
        ..first_version
    };
    tracing::info!(
        videos = first_version.videos.len(),
        datasets = catalog.names.len(),
        steps = total,
        ipe,
        first_step,
        workers = cfg.raw.workers.count,
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
    let generators = cfg
        .mask_configs()
        .into_iter()
        .map(|m| MaskGenerator::new(m, grid))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow!("mask config: {e}"))?;
    let settings = LoaderSettings {
        seed: cfg.raw.meta.seed,
        sampling: ClipSampling {
            frames_per_clip: cfg.raw.data.num_frames,
            frame_step: cfg.raw.data.sampling_rate,
        },
        clip_duration: cfg.raw.data.clip_duration,
        augment: cfg.augment(),
        filter_short_videos: cfg.raw.data.filter_short_videos,
        filter_long_bytes: cfg.raw.data.filter_long_videos as u64,
        max_attempts: cfg.raw.workers.max_attempts_per_clip,
        deadline: Duration::from_secs_f64(cfg.raw.workers.decode_deadline_secs),
        // Several decoders at once: one thread each; a lone decoder may use every core.
        decoder_threads: if cfg.decode_threads() > 1 { 1 } else { 0 },
        mixing,
    };
    let workers = cfg.raw.workers.count;
    let clips_per_worker = batch_size.div_ceil(workers).max(1);
    let batches_in_flight = (cfg.max_clips_in_flight() / clips_per_worker).max(1) as u64;

    vjepa_ingest::init().map_err(|e| anyhow!("GStreamer: {e}"))?;

    // Re-read the datasets every `catalog.refresh_secs` in the background; worker 0 turns each
    // listing into a catalog version at a step boundary.
    let (listings_tx, listings_rx) = mpsc::channel::<Listing>();
    let period = Duration::from_secs_f64(cfg.raw.catalog.refresh_secs);
    let refresher = handle.spawn({
        let catalog = catalog.clone();
        let s3 = s3.clone();
        let telemetry = telemetry.clone();
        async move {
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
        catalog: catalog.clone(),
        out: out.clone(),
        handle: handle.clone(),
        fatal: fatal.clone(),
        generators,
        settings,
        resumed: std::sync::Mutex::new(resumed),
        ipe,
        enc,
        pred,
        optim,
        metrics_name,
        quarantine_name,
        first_step,
        first_clip,
        telemetry: telemetry.clone(),
        tokens_per_clip,
    });

    let guards = timely::execute(timely::Config::process(workers), move |worker| {
        run_worker(worker, &shared, first_step, total, batches_in_flight)
    })
    .map_err(|e| anyhow!("starting dataflow workers: {e}"));
    let guards = match guards {
        Ok(g) => g,
        Err(e) => {
            refresher.abort();
            return Err(e);
        }
    };
    let results = guards.join();
    refresher.abort();
    let mut summary = None;
    for result in results {
        match result {
            Ok(Ok(Some(s))) => summary = Some(s),
            Ok(Ok(None)) => {}
            Ok(Err(e)) => return Err(e),
            Err(e) => bail!("a dataflow worker panicked: {e}"),
        }
    }
    if let Some(why) = fatal.get() {
        bail!("{why}");
    }
    summary.ok_or_else(|| anyhow!("worker 0 returned no summary"))
}

/// Checkpoint metadata: global number of the next clip to train on (the sampler cursor).
const META_NEXT_CLIP: &str = "run.next_clip";
/// Checkpoint metadata: the batch size the run used.
const META_BATCH_SIZE: &str = "run.batch_size";
/// Checkpoint metadata: the contents key ([`catalog_key`]) of the catalog version in effect for
/// the next step.
const META_CATALOG: &str = "run.catalog_key";
/// Checkpoint metadata: that version's number within the run (for people: a restarted run
/// numbers its versions from 0 again).
const META_CATALOG_VERSION: &str = "run.catalog_version";

/// A checkpoint to continue from, with the job's state recorded beside the model.
struct Resumed {
    uri: String,
    model: VJepa,
    /// [`META_NEXT_CLIP`], absent in checkpoints of older builds.
    next_clip: Option<u64>,
    /// [`META_CATALOG`], absent in checkpoints of older builds.
    catalog: Option<String>,
}

impl Resumed {
    fn parse(uri: String, bytes: &[u8]) -> anyhow::Result<Self> {
        let model = VJepa::from_safetensors(bytes, &Device::Cpu)?;
        let meta = vjepa_model::checkpoint_metadata(bytes)?;
        let next_clip = meta
            .get(META_NEXT_CLIP)
            .map(|v| {
                v.parse::<u64>()
                    .map_err(|e| anyhow!("metadata {META_NEXT_CLIP} `{v}`: {e}"))
            })
            .transpose()?;
        Ok(Self {
            uri,
            model,
            next_clip,
            catalog: meta.get(META_CATALOG).cloned(),
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

/// Longest a worker sleeps waiting for clips or peers before checking for a fatal error.
const PARK: Duration = Duration::from_millis(20);

/// Everything a worker needs, shared read-only across worker threads.
struct Shared {
    cfg: Arc<JobConfig>,
    catalog: Arc<Catalog>,
    /// The catalog versions of this run (worker 0 adds them).
    versions: Arc<Versions>,
    /// Listings from the background refresher, taken by worker 0.
    listings: Mutex<Option<mpsc::Receiver<Listing>>>,
    /// Name of the clips table (when `outputs.clips`).
    clips_name: String,
    out: Store,
    handle: tokio::runtime::Handle,
    fatal: Fatal,
    generators: Vec<MaskGenerator>,
    settings: LoaderSettings,
    /// Iterations per epoch (for the metrics' epoch column).
    ipe: u64,
    /// The resumed model, taken by worker 0.
    resumed: std::sync::Mutex<Option<VJepa>>,
    enc: vjepa_model::EncoderConfig,
    pred: vjepa_model::PredictorConfig,
    optim: vjepa_model::OptimConfig,
    metrics_name: String,
    quarantine_name: String,
    /// The step the run started after (0, or the resumed checkpoint's).
    first_step: u64,
    /// Global number of the clip of slot 0 of `first_step + 1` (the resumed sampler cursor).
    first_clip: u64,
    /// Metrics and the status page's history.
    telemetry: Arc<Telemetry>,
    /// Patches the encoder embeds per clip (for tokens/s).
    tokens_per_clip: u64,
}

/// Worker 0's outputs: the model and the Parquet writers, shared with its operators.
struct Outputs {
    metrics: Option<MetricsWriter>,
    quarantine: Option<QuarantineWriter>,
    clips: Option<ClipsWriter>,
    seen_bad: HashSet<String>,
    quarantined: usize,
    rows_since_flush: u64,
    last_loss: Option<f64>,
    steps: u64,
    checkpoints: Vec<String>,
}

fn run_worker(
    worker: &mut timely::worker::Worker,
    shared: &Arc<Shared>,
    first_step: u64,
    total: u64,
    batches_in_flight: u64,
) -> anyhow::Result<Option<TrainSummary>> {
    let index = worker.index();
    let peers = worker.peers();
    let cfg = shared.cfg.clone();
    let batch_size = cfg.raw.data.batch_size;
    let loaders = (0..cfg.decode_threads())
        .map(|_| {
            StoreLoader::new(
                shared.catalog.clone(),
                shared.versions.clone(),
                shared.handle.clone(),
                shared.settings.clone(),
                shared.fatal.clone(),
            )
            .map(|l| l.with_telemetry(shared.telemetry.clone()))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow!("GStreamer decoder: {e}"))?;

    // Worker 0 trains and writes; the others load clips.
    let outputs = Rc::new(RefCell::new(Outputs {
        metrics: None,
        quarantine: None,
        clips: None,
        seen_bad: HashSet::new(),
        quarantined: 0,
        rows_since_flush: 0,
        last_loss: None,
        steps: 0,
        checkpoints: Vec::new(),
    }));
    let mut model: Option<VJepa> = None;
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
        for r in &shared.catalog.first.rejected {
            if o.seen_bad.insert(r.uri.clone()) {
                shared.telemetry.quarantined(&r.uri, &r.reason);
                q.push(to_quarantine_row(r));
                o.quarantined += 1;
            }
        }
        o.quarantine = Some(q);
        drop(o);
        let resumed = shared.resumed.lock().ok().and_then(|mut m| m.take());
        model = Some(match resumed {
            Some(m) => m,
            None => VJepa::new(
                shared.enc.clone(),
                shared.pred.clone(),
                shared.optim.clone(),
                cfg.raw.meta.seed,
                &Device::Cpu,
            )?,
        });
        if let Some(m) = &model {
            let (e, p) = m.num_trainable_params();
            tracing::info!(encoder_params = e, predictor_params = p, "model ready");
        }
    }

    // The catalog as a differential collection (time = catalog version; version 0: the listing
    // at start): each worker enters its share of version 0, then worker 0 alone enters the
    // changes of later versions and learns the per-dataset counts, which drive the mixing.
    let mut catalog = catalog_counts(worker);
    let first_version = shared.versions.latest();
    for (i, v) in first_version.videos.iter().enumerate() {
        if i % peers == index {
            catalog.input.insert((v.dataset, v.uri.clone()));
        }
    }
    catalog.input.advance_to(1);
    catalog.input.flush();
    while catalog.probe.less_than(&1) {
        worker.step();
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
        write_version_record(shared, &first_version, None)?;
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

    let mut input = InputHandle::new();
    let probe = ProbeHandle::new();
    input.advance_to(first_step);
    let step_outputs = outputs.clone();
    let sink_outputs = outputs.clone();
    let q_outputs = outputs.clone();
    let train_shared = shared.clone();
    let sink_shared = shared.clone();
    let q_shared = shared.clone();
    let (batch_tel, mask_tel) = (shared.telemetry.clone(), shared.telemetry.clone());
    let mut step_model = model;
    worker.dataflow::<u64, _, _>(|scope| {
        let requests = input.to_stream(scope);
        let loaded = load_clips_parallel(requests, loaders);
        let (clips, bad) = loaded.ok_err(|l: Loaded| match l {
            Loaded::Clip(c) => Ok(c),
            Loaded::Bad(q) => Err(q),
        });
        // Stage queues: a batch takes its clips out of the transform queue and waits for its
        // masks; a masked batch waits for the trainer.
        let batches = assemble_batches(clips, 0).inspect(move |b| {
            batch_tel.queue_add(Stage::Transform, -(b.clips.len() as i64));
            batch_tel.queue_add(Stage::Mask, 1);
        });
        let masked = mask_batches(batches, shared.generators.clone(), cfg.raw.meta.seed).inspect(
            move |_| {
                mask_tel.queue_add(Stage::Mask, -1);
                mask_tel.items(Stage::Mask, 1);
                mask_tel.queue_add(Stage::Train, 1);
            },
        );
        let steps = train(masked, move |batch, data_wait| {
            let model = step_model.as_mut()?;
            train_step(model, batch, data_wait, &train_shared, &step_outputs, total)
        })
        .probe_with(&probe);
        sink_local(steps, "Metrics", move |_step, row: MetricsRow| {
            write_metrics(row, &sink_shared, &sink_outputs);
        });
        sink_records(bad, "Quarantine", 0, move |_step, q: Quarantined| {
            let mut o = q_outputs.borrow_mut();
            if o.seen_bad.insert(q.uri.clone()) {
                q_shared.telemetry.quarantined(&q.uri, &q.reason);
                o.quarantined += 1;
                if let Some(w) = o.quarantine.as_mut() {
                    w.push(to_quarantine_row(&q));
                }
            }
        });
    });

    // Feed this worker's share of every batch, at most `batches_in_flight` ahead of training.
    for step in first_step..total {
        if shared.fatal.get().is_some() {
            break;
        }
        // A new listing becomes the catalog version for steps from `step + batches_in_flight`:
        // no worker can have requested those yet (each stays within `batches_in_flight` of the
        // trained steps, and `step` is not requested), so every worker draws a step's clips from
        // the same version, whenever its loader looks it up.
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
            if let Err(e) = apply_listing(worker, cat, &listing, from_step, shared, &outputs) {
                shared
                    .fatal
                    .set(format!("catalog refresh at step {step}: {e:#}"));
                break;
            }
            // Steps below the probe's frontier are trained: older versions are not needed.
            if let Some(trained) = probe.with_frontier(|f| f.iter().next().copied()) {
                shared.versions.forget_before(trained);
            }
        }
        // Steps up to `step - batches_in_flight` must be trained before `step` is requested.
        // Only steps this run trains count: a resumed run's probe stays at 0 until its input
        // has been scheduled, i.e. until it has sent something, so waiting for a floor at or
        // below `first_step` before then would never end.
        let floor = (step + 1).saturating_sub(batches_in_flight);
        while floor > first_step && probe.less_than(&floor) && shared.fatal.get().is_none() {
            // Loader threads wake the worker when a clip is in; no busy waiting.
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
    drop(catalog);
    drop(listings);
    while !probe.done() {
        worker.step_or_park(Some(PARK));
    }

    if index != 0 {
        return Ok(None);
    }
    let mut o = outputs.borrow_mut();
    let metrics = o.metrics.take();
    let quarantine = o.quarantine.take();
    let clips = o.clips.take();
    if let Some(m) = metrics {
        shared.handle.block_on(m.close())?;
    }
    if let Some(c) = clips {
        shared.handle.block_on(c.close())?;
    }
    if let Some(q) = quarantine {
        shared.handle.block_on(q.close())?;
    }
    Ok(Some(TrainSummary {
        output: shared.out.url().to_string(),
        steps: o.steps,
        first_step,
        last_loss: o.last_loss,
        quarantined: o.quarantined,
        checkpoints: o.checkpoints.clone(),
    }))
}

/// One optimiser step on worker 0, with its checkpoint when due; returns the metrics row.
fn train_step(
    model: &mut VJepa,
    batch: MaskedBatch,
    data_wait: Duration,
    shared: &Shared,
    outputs: &Rc<RefCell<Outputs>>,
    total: u64,
) -> Option<MetricsRow> {
    shared.telemetry.queue_add(Stage::Train, -1);
    if shared.fatal.get().is_some() {
        return None;
    }
    let started = Instant::now();
    let step = batch.batch.step;
    let clips = batch.batch.clips.len();
    if clips == 0 {
        shared
            .fatal
            .set(format!("step {step}: no clips could be loaded"));
        return None;
    }
    let shape = (
        shared.cfg.raw.data.num_frames,
        shared.cfg.raw.data.crop_size,
    );
    let result = to_train_batch(&batch, shape).and_then(|b| {
        model.train_step(&b).map_err(|e| {
            if let vjepa_model::ModelError::NonFiniteLoss { loss, .. } = &e {
                shared.telemetry.non_finite_loss(*loss);
            }
            anyhow!(e)
        })
    });
    let stats = match result {
        Ok(s) => s,
        Err(e) => {
            shared
                .fatal
                .set(format!("training step {step} failed: {e:#}"));
            return None;
        }
    };
    if !stats.loss.is_finite() {
        shared.fatal.set(format!(
            "loss is {} at step {}: stopping",
            stats.loss, stats.step
        ));
    }
    let step_time = started.elapsed();
    let cfg = &shared.cfg.raw;
    let every = cfg.outputs.checkpoint_every;
    let done = stats.step;
    if (every > 0 && done % every == 0) || done == total {
        let next_clip = shared.first_clip + (done - shared.first_step) * cfg.data.batch_size as u64;
        let run_state = [
            (META_NEXT_CLIP.to_string(), next_clip.to_string()),
            (META_BATCH_SIZE.to_string(), cfg.data.batch_size.to_string()),
            (
                META_CATALOG.to_string(),
                catalog_key(&shared.versions.at_step(done + 1)),
            ),
            (
                META_CATALOG_VERSION.to_string(),
                shared.versions.at_step(done + 1).version.to_string(),
            ),
        ];
        match model.to_safetensors_with(&run_state) {
            Ok(bytes) => match shared.handle.block_on(checkpoints::write(
                &shared.out,
                done,
                Bytes::from(bytes),
            )) {
                Ok(rel) => {
                    tracing::info!(checkpoint = %shared.out.uri_of(&rel), "checkpoint written");
                    outputs.borrow_mut().checkpoints.push(rel);
                }
                Err(e) => shared
                    .fatal
                    .set(format!("writing checkpoint at step {done}: {e}")),
            },
            Err(e) => shared
                .fatal
                .set(format!("serialising checkpoint at step {done}: {e}")),
        }
    }
    if let Some(w) = outputs.borrow_mut().clips.as_mut() {
        for c in &batch.batch.clips {
            let p = &c.params;
            w.push(ClipRow {
                step,
                slot: c.slot as u64,
                uri: c.uri.clone(),
                frames: c.frame_indices.iter().map(|&f| f as i64).collect(),
                crop: [
                    p.crop.top as i64,
                    p.crop.left as i64,
                    p.crop.height as i64,
                    p.crop.width as i64,
                ],
                flip: p.flip,
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
        bytes_read: batch.batch.clips.iter().map(|c| c.bytes_read).sum(),
        decode_s: batch.batch.clips.iter().map(|c| c.decode_s).sum(),
        target_std: stats.target_std,
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
        clips,
        tokens: clips as u64 * shared.tokens_per_clip,
        step_s: step_time.as_secs_f64(),
        data_wait_s: data_wait.as_secs_f64(),
    });
    if done % cfg.outputs.log_every == 0 || done == total || done == 1 {
        tracing::info!(
            step = done,
            epoch = row.epoch,
            loss = format_args!("{:.5}", row.loss),
            lr = format_args!("{:.3e}", row.lr),
            wd = format_args!("{:.4}", row.weight_decay),
            ctx = ?row.context_tokens,
            tgt = ?row.target_tokens,
            step_s = format_args!("{:.3}", row.step_time_s),
            wait_s = format_args!("{:.3}", row.data_wait_s),
            clips_per_s = format_args!("{:.2}", row.clips_per_sec),
            "train"
        );
    }
    Some(row)
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
        "masks": r.mask.len(),
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
) -> anyhow::Result<()> {
    let record = version.record(prev, &shared.catalog.names);
    let json = serde_json::to_vec(&record).context("encoding a catalog version record")?;
    let name = record.object_name();
    shared
        .handle
        .block_on(shared.out.put(&name, Bytes::from(json)))
        .with_context(|| format!("writing {}", shared.out.uri_of(&name)))?;
    Ok(())
}

/// Worker 0: turns a new listing into the catalog version for steps from `from_step` (unless
/// nothing changed): quarantined videos are left out, the changes go through the catalog
/// collection, whose counts become the version's, and the version is recorded and published.
fn apply_listing(
    worker: &mut timely::worker::Worker,
    cat: &mut CatalogCounts,
    listing: &Listing,
    from_step: u64,
    shared: &Shared,
    outputs: &Rc<RefCell<Outputs>>,
) -> anyhow::Result<()> {
    let prev = shared.versions.latest();
    let excluded = {
        let mut o = outputs.borrow_mut();
        for r in &listing.rejected {
            if o.seen_bad.insert(r.uri.clone()) {
                shared.telemetry.quarantined(&r.uri, &r.reason);
                o.quarantined += 1;
                let row = to_quarantine_row(r);
                if let Some(q) = o.quarantine.as_mut() {
                    q.push(row);
                }
            }
        }
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
        return Ok(());
    }
    if let Err(e) = VersionDraws::new(
        shared.cfg.raw.meta.seed,
        next.key,
        next.counts.clone(),
        &shared.settings.mixing,
    ) {
        tracing::warn!(error = %e, "catalog refresh left nothing to draw from; keeping the current catalog");
        return Ok(());
    }
    let (n_added, n_removed) = (added.len(), removed.len());
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
    write_version_record(shared, &next, Some(&prev))?;
    tracing::info!(
        version = next.version,
        from_step,
        videos = next.videos.len(),
        added = n_added,
        removed = n_removed,
        counts = ?next.counts,
        "catalog version"
    );
    shared
        .telemetry
        .set_catalog(&shared.catalog.names, &next.counts);
    shared.versions.push(next);
    Ok(())
}

fn to_quarantine_row(q: &Quarantined) -> vjepa_storage::tables::QuarantineRow {
    vjepa_storage::tables::QuarantineRow {
        uri: q.uri.clone(),
        reason: q.reason.clone(),
        detail: q.detail.clone(),
        time_unix_us: q.time_unix_us,
    }
}

/// Packs clips (`[3, frames, crop, crop]` each) and masks into the model's tensors.
fn to_train_batch(batch: &MaskedBatch, (t, s): (usize, usize)) -> anyhow::Result<TrainBatch> {
    let clips = &batch.batch.clips;
    let per_clip = 3 * t * s * s;
    let mut data = Vec::with_capacity(per_clip * clips.len());
    for c in clips {
        if c.data.len() != per_clip {
            bail!(
                "clip {} has {} values, expected {per_clip}",
                c.uri,
                c.data.len()
            );
        }
        data.extend_from_slice(&c.data);
    }
    let clips_t = Tensor::from_vec(data, (clips.len(), 3, t, s, s), &Device::Cpu)?;
    let mut masks = Vec::with_capacity(batch.masks.len());
    for m in &batch.masks {
        masks.push(MaskIndices {
            context: index_tensor(&m.context)?,
            target: index_tensor(&m.target)?,
        });
    }
    Ok(TrainBatch {
        clips: clips_t,
        masks,
    })
}

fn index_tensor(rows: &[Vec<u32>]) -> anyhow::Result<Tensor> {
    let k = rows.first().map(|r| r.len()).unwrap_or(0);
    let flat: Vec<u32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
    Ok(Tensor::from_vec(flat, (rows.len(), k), &Device::Cpu)?)
}

/// Reads the object named by a full location (local path, `file://` or `s3://` URL).
pub(crate) fn read_location(
    handle: &tokio::runtime::Handle,
    location: &str,
    s3: &vjepa_storage::S3Settings,
) -> anyhow::Result<Bytes> {
    let (store, rel) = split_location(location, s3)?;
    handle
        .block_on(store.get(&rel))
        .with_context(|| format!("reading {location}"))
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
    let store = Store::open(dir, s3, create).with_context(|| format!("opening {dir}"))?;
    Ok((store, name.to_string()))
}

/// Loads a checkpoint the way a resumed run would and describes it.
pub fn inspect_checkpoint(location: &str) -> anyhow::Result<String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let bytes = read_location(
        runtime.handle(),
        location,
        &vjepa_storage::S3Settings::default(),
    )?;
    let model = VJepa::from_safetensors(&bytes, &Device::Cpu)
        .with_context(|| format!("loading {location}"))?;
    let (e, p) = model.num_trainable_params();
    let enc = model.encoder_config();
    let pred = model.predictor_config();
    Ok(format!(
        "checkpoint {location}: step {}, {} bytes; encoder D={} depth {} heads {} ({e} params), predictor D={} depth {} ({p} params)",
        model.steps_done(),
        bytes.len(),
        enc.embed_dim,
        enc.depth,
        enc.num_heads,
        pred.embed_dim,
        pred.depth,
    ))
}
