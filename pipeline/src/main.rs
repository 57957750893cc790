//! `vjepa`: V-JEPA video pretraining as a streaming dataflow job.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use vjepa_model::ComputeDevice;
use vjepa_pipeline::config::JobConfig;
use vjepa_pipeline::convert::{self, ConvertError};
use vjepa_pipeline::job::{self, TrainOverrides};

#[derive(Parser)]
#[command(
    name = "vjepa",
    version,
    about = "V-JEPA video pretraining as a streaming dataflow job"
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Arguments shared by `probe` and `finetune`.
#[derive(clap::Args)]
struct ProbeArgs {
    /// An official evaluation config (`configs/evals/*.yaml` of the official code): the
    /// datasets, sampling, optimisation, checkpoint and model shape, as the official
    /// evaluation reads them; any flag given here overrides it.
    #[arg(long)]
    eval_config: Option<PathBuf>,
    /// Checkpoint: ours (`.safetensors`, or a fine-tuned `encoder.safetensors`) or an
    /// official-layout `.pth.tar` (path or URL). Required unless --eval-config names one.
    #[arg(long)]
    checkpoint: Option<String>,
    /// Labelled train index (`path label` lines). Required unless --eval-config names one.
    #[arg(long)]
    train: Option<String>,
    /// Labelled validation index. Required unless --eval-config names one.
    #[arg(long)]
    val: Option<String>,
    /// Where the indexes' entries resolve: a directory or bucket prefix holding the videos
    /// (default: `data.index_root` of `--config`, else each index's own folder).
    #[arg(long)]
    index_root: Option<String>,
    /// Local directory for the outputs.
    #[arg(long)]
    out: PathBuf,
    /// Job config: the model shape for an official `.pth.tar` (unless --eval-config gives
    /// it), and the S3 settings.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Temporal segments per video (their tokens are concatenated into one probe pass)
    /// [default: 1].
    #[arg(long, value_parser = at_least_one)]
    segments: Option<usize>,
    /// Spatial views per validation segment (probabilities averaged) [default: 1].
    #[arg(long, value_parser = at_least_one)]
    views: Option<usize>,
    /// Frame stride within a clip [default: 4].
    #[arg(long, value_parser = at_least_one)]
    frame_step: Option<usize>,
    /// Input side, a multiple of the patch size [default: `optimization.resolution` of
    /// --eval-config, else the checkpoint's]; the backbone is built for it (a fresh sin-cos
    /// table, as the official evaluation).
    #[arg(long, value_parser = at_least_one)]
    size: Option<usize>,
    /// Epochs [default: 20, the spec's].
    #[arg(long, value_parser = at_least_one)]
    epochs: Option<usize>,
    /// Videos per step [default: 16].
    #[arg(long, value_parser = at_least_one)]
    batch_size: Option<usize>,
    /// Peak learning rate, cosine to 0 [default: 1e-3, the spec's].
    #[arg(long, value_parser = positive_number, allow_negative_numbers = true)]
    lr: Option<f64>,
    /// Weight decay, cosine to 1e-6 [default: 0.01, the spec's for video].
    #[arg(long, value_parser = non_negative_number, allow_negative_numbers = true)]
    weight_decay: Option<f64>,
    /// Classes of integer labels 0 … N−1 (the official CSVs): the probe gets N outputs, label
    /// k at output k, as `data.num_classes` of an evaluation config [default: one output per
    /// label of the train index].
    #[arg(long, value_parser = at_least_one)]
    num_classes: Option<usize>,
    /// Evaluate on the validation split after every N epochs too, into `epochs.parquet` and
    /// the log (0: only after the last) [default: 1 with --eval-config, as the official
    /// evaluation does, else 0].
    #[arg(long)]
    val_every: Option<usize>,
    /// Share of each class's train videos used (low-shot evaluation).
    #[arg(long, default_value_t = 1.0, value_parser = share, allow_negative_numbers = true)]
    label_fraction: f64,
    /// Seeds the probe, the label subset and the shuffling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Decoder threads (default: the machine's cores).
    #[arg(long, value_parser = at_least_one)]
    decode_threads: Option<usize>,
    /// Compute device of the encoder and the head: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: ComputeDevice,
    /// Video decoders: software, or nvdec (GStreamer's NVDEC decoders where they take the
    /// stream; needs an NVIDIA driver and GPU), as `workers.video_decoder`.
    #[arg(long, default_value = "software")]
    video_decoder: vjepa_ingest::VideoDecoderKind,
}

impl ProbeArgs {
    /// The library's options: each setting from its flag, else the evaluation config, else
    /// the default (the job config read for the model shape and S3 settings).
    fn options(self) -> Result<vjepa_pipeline::probe::ProbeOptions, ExitCode> {
        let cfg = match self.config.as_deref().map(JobConfig::load).transpose() {
            Ok(c) => c,
            Err(e) => return Err(config_error(&e)),
        };
        let eval = match self
            .eval_config
            .as_deref()
            .map(vjepa_pipeline::eval_config::EvalConfig::load)
            .transpose()
        {
            Ok(e) => e,
            Err(e) => return Err(config_error(&e)),
        };
        if let Some(e) = &eval {
            for note in &e.notes {
                tracing::info!("eval config: {note}");
            }
        }
        let required = |flag: Option<String>, from: Option<String>, name: &str| {
            flag.or(from).ok_or_else(|| {
                eprintln!("error: --{name} is required (or an --eval-config that names it)");
                ExitCode::from(2)
            })
        };
        let checkpoint = required(
            self.checkpoint,
            eval.as_ref().and_then(|e| e.checkpoint.clone()),
            "checkpoint",
        )?;
        let train = required(self.train, eval.as_ref().map(|e| e.train.clone()), "train")?;
        let val = required(self.val, eval.as_ref().map(|e| e.val.clone()), "val")?;
        let pick =
            |flag: Option<usize>,
             from: fn(&vjepa_pipeline::eval_config::EvalConfig) -> usize,
             default: usize| { flag.or(eval.as_ref().map(from)).unwrap_or(default) };
        let segments = pick(self.segments, |e| e.segments, 1);
        let views = pick(self.views, |e| e.views, 1);
        let frame_step = pick(self.frame_step, |e| e.frame_step, 4);
        let epochs = pick(self.epochs, |e| e.epochs, 20);
        let batch_size = pick(self.batch_size, |e| e.batch_size, 16);
        let lr = self.lr.or(eval.as_ref().map(|e| e.lr)).unwrap_or(1e-3);
        let weight_decay = self
            .weight_decay
            .or(eval.as_ref().map(|e| e.weight_decay))
            .unwrap_or(0.01);
        // The model's shape: a --config (the pretraining config) overrides the evaluation
        // config's pretrain section, as flags do.
        let encoder = match (&cfg, &eval) {
            (Some(c), _) => Some(c.encoder_config()),
            (None, Some(e)) => Some(e.encoder.clone()),
            (None, None) => None,
        };
        if eval.is_some() && checkpoint.ends_with(".safetensors") {
            tracing::info!(
                "the checkpoint records its own model shape: the evaluation config's pretrain \
                 section is not used for it (optimization.resolution is the input size)"
            );
        } else if let (Some(e), Some(enc)) = (&eval, &encoder) {
            let from = if cfg.is_some() {
                "--config"
            } else {
                "the evaluation config's pretrain section"
            };
            tracing::info!(
                embed_dim = enc.embed_dim,
                depth = enc.depth,
                heads = enc.num_heads,
                patch = enc.patch_size,
                frames = enc.num_frames,
                input = e.encoder.crop_size,
                "model shape from {from}"
            );
        }
        let size = self
            .size
            .or_else(|| eval.as_ref().map(|e| e.encoder.crop_size));
        // The official CSVs hold absolute paths, read as given: with an evaluation config and
        // local indexes, entries resolve from the filesystem root unless told otherwise.
        let index_root = self
            .index_root
            .or_else(|| cfg.as_ref().and_then(|c| c.raw.data.index_root.clone()))
            .or_else(|| {
                let local = |p: &str| !p.contains("://");
                (eval.is_some() && local(&train) && local(&val)).then(|| "/".to_string())
            });
        let num_classes = self
            .num_classes
            .or(eval.as_ref().and_then(|e| e.num_classes));
        let val_every = self.val_every.unwrap_or(if eval.is_some() { 1 } else { 0 });
        tracing::info!(
            checkpoint = %vjepa_storage::redact_url(&checkpoint),
            train = %vjepa_storage::redact_url(&train),
            val = %vjepa_storage::redact_url(&val),
            segments,
            views,
            frame_step,
            size = %size.map_or("the checkpoint's".to_string(), |n| n.to_string()),
            epochs,
            batch_size,
            lr,
            weight_decay,
            num_classes = %num_classes.map_or("one per train label".to_string(), |n| n.to_string()),
            val_every,
            "evaluation settings"
        );
        let extract = vjepa_pipeline::extract::ExtractOptions {
            index_root,
            checkpoint,
            encoder,
            datasets: Vec::new(),
            out: String::new(),
            segments,
            views: 1,
            frame_step,
            size,
            tokens: true,
            batch_size: 8,
            decode_threads: self
                .decode_threads
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get())),
            seed: self.seed,
            deadline: std::time::Duration::from_secs(60),
            s3: cfg.as_ref().map(|c| c.s3_settings()).unwrap_or_default(),
            progress: true,
            device: self.device,
            video_decoder: self.video_decoder,
            augment: None,
        };
        Ok(vjepa_pipeline::probe::ProbeOptions {
            extract,
            train,
            val,
            val_views: views,
            epochs,
            batch_size,
            lr,
            weight_decay,
            label_fraction: self.label_fraction,
            seed: self.seed,
            out_dir: self.out,
            cache: vjepa_pipeline::probe::Cache::Memory,
            augment: vjepa_pipeline::probe::Augment::None,
            val_every,
            num_classes,
        })
    }
}

/// What a stopped probe or fine-tuning run is told.
const CONTINUE_HINT: &str = "the same command continues after the last epoch saved \
     (resume.safetensors in --out)";

/// Prints an evaluation's top-1 line (`probe` and `finetune`).
fn report_eval(result: anyhow::Result<vjepa_pipeline::probe::ProbeSummary>) -> ExitCode {
    match result {
        Ok(s) => {
            println!(
                "top-1 {:.2} % ({} / {} validation videos; {} train videos, {} classes, final train loss {:.4}, train top-1 {:.2} %)",
                s.top1,
                s.correct,
                s.evaluated,
                s.train_videos,
                s.classes.len(),
                s.final_loss,
                s.train_top1
            );
            ExitCode::SUCCESS
        }
        Err(e) => run_error(&e),
    }
}

/// An evaluation command's error: exit 2 when its input was refused before any work (as a
/// bad config), 1 when the run failed.
fn run_error(e: &anyhow::Error) -> ExitCode {
    eprintln!("error: {e:#}");
    ExitCode::from(if vjepa_pipeline::Refused::in_chain(e) {
        2
    } else {
        1
    })
}

#[derive(Subcommand)]
enum Command {
    /// Pretrain from the videos of the config's datasets; writes metrics, quarantine and checkpoints.
    Train {
        /// YAML config (official pretrain keys plus ours).
        #[arg(long)]
        config: PathBuf,
        /// Dataflow worker threads (overrides workers.count).
        #[arg(long)]
        workers: Option<usize>,
        /// Dataset (index file or prefix URL) instead of data.datasets; repeatable.
        #[arg(long = "dataset")]
        datasets: Vec<String>,
        /// Output location instead of outputs.dir.
        #[arg(long)]
        out: Option<String>,
        /// Stop after this many steps (overrides optimization.max_steps).
        #[arg(long)]
        max_steps: Option<u64>,
        /// Seed instead of meta.seed.
        #[arg(long)]
        seed: Option<u64>,
        /// Continue from the latest checkpoint in the output location (the default whenever
        /// it holds one; with this flag a run without any logs that it starts fresh).
        #[arg(long)]
        resume: bool,
        /// Start from step 0 even if the output location holds checkpoints (they are deleted).
        #[arg(long, conflicts_with = "resume")]
        fresh: bool,
        /// Serve /metrics and the status page on this host:port instead of telemetry.listen
        /// (port 0: any free port; the address is logged and written to <out>/telemetry.addr).
        #[arg(long)]
        listen: Option<String>,
        /// Processes in a cluster-mode job (overrides cluster.processes).
        #[arg(long)]
        processes: Option<usize>,
        /// This process's number, 0-based (overrides cluster.process).
        #[arg(long)]
        process: Option<usize>,
        /// One host:port per line, line i for process i (overrides cluster.hostfile).
        #[arg(long)]
        hostfile: Option<String>,
        /// Compute device: cpu, cuda or cuda:N (overrides workers.device; CUDA needs a build
        /// with the `cuda` feature).
        #[arg(long)]
        device: Option<String>,
    },
    /// Parse and validate a config without doing any work; lists official keys that are ignored.
    /// Exit 2 naming the key when it is refused.
    CheckConfig {
        #[arg(long)]
        config: PathBuf,
        /// Also check, with this environment, that every location can be used (S3 settings and
        /// credentials present, local datasets exist, the output directory can be created);
        /// makes no request. For deployments: run it where and as the job will run.
        #[arg(long)]
        locations: bool,
        /// --locations, then one read request to each object-store location (a one-page
        /// listing of a prefix, a HEAD of a file; nothing written), each bounded by
        /// --reach-timeout: a missing bucket or object, or credentials the store refuses, exit
        /// 2; a store that does not answer exits 1 (worth retrying).
        #[arg(long)]
        reach: bool,
        /// Seconds each --reach request may take.
        #[arg(long, default_value_t = 30.0, value_parser = timeout_seconds)]
        reach_timeout: f64,
        /// Processes in a cluster-mode job (overrides cluster.processes).
        #[arg(long)]
        processes: Option<usize>,
        /// This process's number, 0-based (overrides cluster.process).
        #[arg(long)]
        process: Option<usize>,
        /// One host:port per line, line i for process i (overrides cluster.hostfile).
        #[arg(long)]
        hostfile: Option<String>,
        /// Compute device (overrides workers.device); with --locations it is opened.
        #[arg(long)]
        device: Option<String>,
    },
    /// Load a checkpoint (path or object-store URL) and print what it holds: a training
    /// checkpoint (ours or an official `.pth.tar`) as a resumed run loads it, any other
    /// `.safetensors` (a fine-tuned encoder, a probe head) by its tensors.
    Inspect {
        checkpoint: String,
        /// A job config whose `storage.s3` (endpoint, region, plain HTTP) reaches the URL,
        /// and whose model shape reads an official `.pth.tar`; without it the environment
        /// gives the S3 settings (`AWS_ENDPOINT_URL`, `AWS_REGION`).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Print a run's metrics table (every file of it, a resumed run merged by step) as JSON
    /// Lines or CSV: for scripts and spreadsheets without a Parquet reader.
    Metrics {
        /// The run's output location (directory path or object-store URL).
        run: String,
        /// Output format.
        #[arg(long, value_enum, default_value = "jsonl")]
        format: vjepa_pipeline::metrics_export::MetricsFormat,
        /// A job config whose `storage.s3` (endpoint, region, plain HTTP) reaches the URL;
        /// without it the environment does (`AWS_ENDPOINT_URL`, `AWS_REGION`).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Write the model a fresh run of CONFIG starts from (spec init, `meta.seed`) as a step-0
    /// checkpoint: the random-init baseline for `vjepa probe`/`extract`.
    Init {
        /// Job config (model shape, seed).
        #[arg(long)]
        config: PathBuf,
        /// Output checkpoint file (`.safetensors`; `vjepa convert` makes an official
        /// `.pth.tar` of it).
        #[arg(long, value_parser = safetensors_path)]
        out: PathBuf,
    },
    /// Convert a checkpoint between the official `.pth.tar` layout and our `.safetensors`
    /// (direction from the extensions); exit 2 naming the tensor when the input is bad.
    Convert {
        /// Input checkpoint (path or object-store URL).
        input: String,
        /// Output checkpoint (path or object-store URL).
        output: String,
        /// Job config giving the model shape; required to read an official `.pth.tar`.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Run a checkpoint's frozen target encoder (an `objective: pixel` run's encoder) over
    /// every clip of a dataset (spec §9 segments and views) and write one row per clip (uri,
    /// label, segment, view, frames, mean-pooled embedding, tokens on request) to a Parquet
    /// table; bad videos are quarantined beside it.
    Extract {
        /// Checkpoint: ours (`.safetensors`) or an official-layout `.pth.tar` (path or URL).
        #[arg(long)]
        checkpoint: String,
        /// Dataset: an index file (`path label` lines) or a prefix ending in `/`; repeatable.
        #[arg(long = "index", required = true)]
        index: Vec<String>,
        /// Where the indexes' entries resolve: a directory or bucket prefix holding the
        /// videos (default: `data.index_root` of `--config`, else each index's own folder).
        #[arg(long)]
        index_root: Option<String>,
        /// Output table (path or object-store URL), e.g. features.parquet.
        #[arg(long)]
        out: String,
        /// Job config: the model shape for an official `.pth.tar` (which carries none) and the
        /// S3 settings.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Temporal segments per video (spec §9: 8 for K400, 2 for SSv2).
        #[arg(long, default_value_t = 1, value_parser = at_least_one)]
        segments: usize,
        /// Spatial views per segment (spec §9: 3).
        #[arg(long, default_value_t = 1, value_parser = at_least_one)]
        views: usize,
        /// Frame stride within a clip.
        #[arg(long, default_value_t = 4, value_parser = at_least_one)]
        frame_step: usize,
        /// Input side, a multiple of the patch size (default: the encoder's); another size
        /// than the checkpoint's builds the backbone for it (a fresh sin-cos table for the
        /// new grid, as the official evaluation).
        #[arg(long, value_parser = at_least_one)]
        size: Option<usize>,
        /// Also write every token's output (N × D floats per clip).
        #[arg(long)]
        tokens: bool,
        /// Clips per encoder forward.
        #[arg(long, default_value_t = 8, value_parser = at_least_one)]
        batch_size: usize,
        /// Decoder threads (default: the machine's cores).
        #[arg(long, value_parser = at_least_one)]
        decode_threads: Option<usize>,
        /// Seeds the random window inside long segments.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Compute device of the encoder: cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: ComputeDevice,
        /// Video decoders: software, or nvdec (GStreamer's NVDEC decoders where they take the
        /// stream; needs an NVIDIA driver and GPU), as `workers.video_decoder`.
        #[arg(long, default_value = "software")]
        video_decoder: vjepa_ingest::VideoDecoderKind,
    },
    /// Frozen evaluation (spec §9): train an attentive probe on the target encoder's tokens (an
    /// `objective: pixel` run's encoder's) of a labelled train index, evaluate top-1 on a
    /// validation index (probabilities averaged over views); writes probe.safetensors,
    /// predictions.parquet and epochs.parquet (per-epoch train and validation top-1) into
    /// --out; a stopped run continues when run again (resume.safetensors).
    Probe {
        #[command(flatten)]
        probe: ProbeArgs,
        /// Where the tokens live between epochs: `memory` (extracted once, held, and written
        /// to train-/val-features.parquet), `none` (the backbone reads the videos again every
        /// epoch: memory and disk stay flat for any dataset size), `auto` (memory when both
        /// splits' tokens fit in 4 GiB).
        #[arg(long, default_value = "auto")]
        token_cache: vjepa_pipeline::probe::Cache,
        /// Train clips: `official` (the official evaluation's training transform, drawn anew
        /// every epoch: RandAugment rand-m7-n4-mstd0.5-inc1, random resized crop, random
        /// erasing; the train videos are read again every epoch) or `none` (the same
        /// evaluation view every epoch; tokens can be held in memory).
        #[arg(long, default_value = "official")]
        augment: vjepa_pipeline::probe::Augment,
    },
    /// End-to-end fine-tuning: the probe's head trained together with the encoder (lower lr
    /// for the encoder); same inputs and evaluation as `probe`; writes probe.safetensors,
    /// encoder.safetensors, predictions.parquet and epochs.parquet into --out; a stopped run
    /// continues when run again.
    Finetune {
        #[command(flatten)]
        probe: ProbeArgs,
        /// The encoder's learning rate as a multiple of the head's (common fine-tuning
        /// practice, not the spec; 0 keeps the encoder frozen).
        #[arg(long, default_value_t = 0.1)]
        backbone_lr_scale: f64,
        /// Where the decoded clips live between epochs: `memory` (decoded once and held),
        /// `none` (decoded again every epoch: memory stays flat for any dataset size), `auto`
        /// (memory when both splits' clips fit in 4 GiB).
        #[arg(long, default_value = "auto")]
        clip_cache: vjepa_pipeline::probe::Cache,
        /// Train clips: `none` (the same evaluation view every epoch) or `official` (the
        /// frozen evaluation's training transform, drawn anew every epoch; clips are then
        /// decoded again every epoch).
        #[arg(long, default_value = "none")]
        augment: vjepa_pipeline::probe::Augment,
    },
    /// Write a small corpus of real encoded videos (H.264/MP4, VP9/WebM) into DIR: sizes,
    /// lengths, rates and codecs vary unless fixed by the options (benchmark corpora).
    MakeSamples {
        dir: PathBuf,
        /// Number of videos.
        #[arg(long, default_value_t = 12)]
        count: usize,
        /// Every video at this size, WxH (even), e.g. 1280x720.
        #[arg(long, value_parser = parse_size)]
        size: Option<(u32, u32)>,
        /// Frames per video.
        #[arg(long)]
        frames: Option<u32>,
        /// Frame rate.
        #[arg(long)]
        fps: Option<u32>,
        /// Codec and container: h264, h264fs (MP4 with faststart), vp9, h265, h264mkv,
        /// h265mkv, av1mkv, av1mp4.
        #[arg(long)]
        codec: Option<vjepa_ingest::SampleCodec>,
        /// Target bitrate, kbit/s.
        #[arg(long)]
        bitrate: Option<u32>,
        /// Frames between keyframes (default: one per second).
        #[arg(long)]
        keyframe_interval: Option<u32>,
        /// A `videotestsrc` pattern to cycle through, with optional `key=value` properties
        /// (e.g. "smpte horizontal-speed=4", "snow"); repeatable. Default: six moving patterns.
        #[arg(long = "pattern")]
        patterns: Vec<String>,
    },
    /// Run every fused op forward and backward on CPU and GPU (max relative errors, PASS/FAIL)
    /// and time the GPU ops at ViT-L step shapes. Exits 1 if any check fails.
    #[cfg(feature = "cuda")]
    GpuCheck {
        /// CUDA device ordinal.
        #[arg(long, default_value_t = 0)]
        device: usize,
        /// Timed runs per op (median reported; at least 20).
        #[arg(long, default_value_t = 30)]
        runs: usize,
        /// Skip the correctness checks.
        #[arg(long)]
        no_check: bool,
        /// Skip the timings.
        #[arg(long)]
        no_timing: bool,
        /// Also write the rows as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

/// glibc tuning for a job that runs for days (measured with `bench/soak.sh`, README figures):
/// - every thread that allocates gets its own malloc arena (up to 8 per core); the job's threads
///   (dataflow workers, decoders, GStreamer, I/O) allocate differently sized frames and tensors
///   step after step and the per-arena free lists fragment: +19 % RSS over 30 min. Two arenas.
/// - the mmap threshold adapts upwards to the largest block freed, so the per-step gradient
///   and tensor buffers (MBs) move from mmap into the heap, which then grows with holes:
///   +20 % over 30 min in data-parallel training. A fixed 4 MiB threshold keeps those buffers
///   in mmap, returned to the system when freed (5-min soak: +0.1 %, flat).
///
/// An explicit `MALLOC_ARENA_MAX` / `MALLOC_MMAP_THRESHOLD_` in the environment wins.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune_malloc() {
    // SAFETY: mallopt only tunes the allocator; it runs first in main, before any thread.
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
    if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
        }
    }
}

fn main() -> ExitCode {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    tune_malloc();
    let cli = Cli::parse();
    // `metrics` is for pipes: its informational logs (the store it opened) would only be noise.
    let default_level = match cli.command {
        Command::Metrics { .. } => "warn",
        _ => "info",
    };
    init_logging(cli.log_format, default_level);
    // With JSON logs (the deployments' choice) a run's failure is also a JSON event, for the
    // log pipeline, besides the plain `error:` line.
    let json_logs = matches!(cli.log_format, LogFormat::Json);
    quiet_lost_peer_panics();
    match cli.command {
        Command::CheckConfig {
            config,
            locations,
            reach,
            reach_timeout,
            processes,
            process,
            hostfile,
            device,
        } => match JobConfig::load(&config).and_then(|mut cfg| {
            cfg.apply_device_flag(device)?;
            cfg.apply_cluster_flags(processes, process, hostfile)?;
            cfg.cluster_addresses()?;
            Ok(cfg)
        }) {
            Ok(cfg) => {
                for (key, why) in &cfg.ignored {
                    println!("ignored: {key} ({why})");
                }
                let enc = cfg.encoder_config();
                println!(
                    "ok: {} — {} (D={}, depth {}, heads {}), {} frames at {}px, batch {}, {} mask configs, outputs to {}",
                    config.display(),
                    cfg.raw.model.model_name,
                    enc.embed_dim,
                    enc.depth,
                    enc.num_heads,
                    cfg.raw.data.num_frames,
                    cfg.raw.data.crop_size,
                    cfg.raw.data.batch_size,
                    cfg.raw.mask.len(),
                    cfg.output_dir().unwrap_or("?"),
                );
                if !locations && !reach {
                    return ExitCode::SUCCESS;
                }
                let checked = vjepa_pipeline::preflight::check_device(&cfg)
                    .and_then(|device| {
                        println!("device: {} ({})", device.location, device.found);
                        vjepa_pipeline::preflight::check_video_decoder(&cfg)
                    })
                    .and_then(|decoder| {
                        println!("video decoder: {} ({})", decoder.location, decoder.found);
                        vjepa_pipeline::preflight::check_attention(&cfg)
                    })
                    .and_then(|attention| {
                        println!("attention: {} ({})", attention.location, attention.found);
                        if reach {
                            vjepa_pipeline::preflight::reach_locations(
                                &cfg,
                                std::time::Duration::from_secs_f64(reach_timeout),
                            )
                        } else {
                            vjepa_pipeline::preflight::check_locations(&cfg)
                        }
                    });
                match checked {
                    Ok(checks) => {
                        for c in checks {
                            println!("location: {} = {} ({})", c.key, c.location, c.found);
                        }
                        ExitCode::SUCCESS
                    }
                    Err(e) if e.retryable => {
                        eprintln!("error: {e} (exit 1: worth trying again)");
                        ExitCode::from(1)
                    }
                    Err(e) => {
                        eprintln!("config error: {e}");
                        ExitCode::from(2)
                    }
                }
            }
            Err(e) => config_error(&e),
        },
        Command::Train {
            config,
            workers,
            datasets,
            out,
            max_steps,
            seed,
            resume,
            fresh,
            listen,
            processes,
            process,
            hostfile,
            device,
        } => {
            let overrides = TrainOverrides {
                workers,
                datasets,
                out,
                max_steps,
                seed,
                resume,
                fresh,
                listen,
            };
            let cfg = match JobConfig::load(&config).and_then(|mut cfg| {
                cfg.apply_device_flag(device)?;
                cfg.apply_cluster_flags(processes, process, hostfile)?;
                cfg.cluster_addresses()?;
                overrides.apply(&mut cfg)?;
                Ok(cfg)
            }) {
                Ok(cfg) => cfg,
                Err(e) => return config_error(&e),
            };
            for (key, why) in &cfg.ignored {
                tracing::info!(key = %key, "ignored config key: {why}");
            }
            // What `check-config --locations` checks, without a request: missing credentials
            // or a mistyped local path is a refused config (exit 2), as in the pre-start check.
            if let Err(e) = vjepa_pipeline::preflight::check_locations(&cfg) {
                let location = vjepa_storage::redact_url(&e.location);
                return config_error(&vjepa_pipeline::config::ConfigError::Invalid {
                    key: e.key,
                    message: format!("{} ({location})", e.reason),
                });
            }
            vjepa_pipeline::shutdown::install();
            match job::run(cfg, overrides) {
                Ok(s) if s.steps == 0 && s.stopped_by.is_none() => {
                    println!(
                        "nothing to train: the run in {} is complete at step {} (--fresh starts it again)",
                        s.output, s.first_step
                    );
                    ExitCode::SUCCESS
                }
                Ok(s) if s.steps == 0 => {
                    let by = match vjepa_pipeline::shutdown::requested() {
                        Some(signal) => vjepa_pipeline::shutdown::name(signal).to_string(),
                        None => "another process of the job (it was asked to stop)".into(),
                    };
                    let again = match s.first_step {
                        0 => "the same command starts the run".to_string(),
                        n => format!("the same command resumes from the checkpoint at step {n}"),
                    };
                    eprintln!(
                        "stopped by {by} while waiting for the clips of step {}: nothing new to \
                         save; {again}",
                        s.first_step + 1,
                    );
                    ExitCode::from(vjepa_pipeline::shutdown::exit_status(
                        s.stopped_by.unwrap_or(vjepa_pipeline::shutdown::SIGTERM),
                    ))
                }
                Ok(s) => {
                    let mut outputs =
                        vec!["metrics*.parquet".to_string(), "quarantine*.parquet".into()];
                    outputs.extend(s.checkpoints.iter().cloned());
                    println!(
                        "trained steps {}..{} (last loss {}), {} quarantined; outputs in {}: {}",
                        s.first_step + 1,
                        s.first_step + s.steps,
                        s.last_loss
                            .map(|l| format!("{l:.5}"))
                            .unwrap_or_else(|| "-".into()),
                        s.quarantined,
                        s.output,
                        outputs.join(", ")
                    );
                    match s.stopped_by {
                        Some(signal) => {
                            let by = match vjepa_pipeline::shutdown::requested() {
                                Some(_) => vjepa_pipeline::shutdown::name(signal).to_string(),
                                None => "another process of the job (it was asked to stop)".into(),
                            };
                            eprintln!(
                                "stopped by {by} after step {} with its checkpoint: the same command resumes the run",
                                s.first_step + s.steps
                            );
                            ExitCode::from(vjepa_pipeline::shutdown::exit_status(signal))
                        }
                        None => ExitCode::SUCCESS,
                    }
                }
                Err(e) => {
                    let message = format!("{e:#}");
                    if json_logs {
                        tracing::error!(error = %message, "the run failed");
                    }
                    eprintln!("error: {message}");
                    // Before training, a store that refuses the setup (no such bucket,
                    // credentials not accepted) fails the same way on every restart: exit 2,
                    // as a refused config, so that a supervisor stops.
                    let refused = (!vjepa_pipeline::shutdown::training_has_started())
                        .then(|| {
                            e.chain().find_map(|c| {
                                c.downcast_ref::<vjepa_storage::StorageError>()
                                    .and_then(vjepa_storage::StorageError::setup_refused)
                            })
                        })
                        .flatten();
                    // A diverged run would diverge again from the same checkpoint: exit 3 lets
                    // a supervisor tell it from a crash worth restarting.
                    if message.contains("non-finite loss") {
                        ExitCode::from(3)
                    } else if let Some(why) = refused {
                        eprintln!(
                            "{why}: fix the config or the credentials (exit 2: retrying cannot help)"
                        );
                        ExitCode::from(2)
                    } else {
                        ExitCode::from(1)
                    }
                }
            }
        }
        Command::Extract {
            checkpoint,
            index,
            index_root,
            out,
            config,
            segments,
            views,
            frame_step,
            size,
            tokens,
            batch_size,
            decode_threads,
            seed,
            device,
            video_decoder,
        } => {
            let cfg = match config.as_deref().map(JobConfig::load).transpose() {
                Ok(c) => c,
                Err(e) => return config_error(&e),
            };
            let opts = vjepa_pipeline::extract::ExtractOptions {
                index_root: index_root
                    .or_else(|| cfg.as_ref().and_then(|c| c.raw.data.index_root.clone())),
                checkpoint,
                encoder: cfg.as_ref().map(|c| c.encoder_config()),
                datasets: index,
                out,
                segments,
                views,
                frame_step,
                size,
                tokens,
                batch_size,
                decode_threads: decode_threads
                    .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get())),
                seed,
                deadline: std::time::Duration::from_secs(60),
                s3: cfg.as_ref().map(|c| c.s3_settings()).unwrap_or_default(),
                progress: true,
                device,
                video_decoder,
                augment: None,
            };
            match vjepa_pipeline::extract::run(opts) {
                Ok(s) if s.rows == 0 => {
                    eprintln!(
                        "error: no video of {} could be read: all quarantined or refused (reasons in {})",
                        s.videos, s.quarantine_output
                    );
                    ExitCode::from(1)
                }
                Ok(s) => {
                    println!(
                        "extracted {} rows (one per segment and view) from {} videos into {} ({} quarantined: {})",
                        s.rows, s.videos, s.output, s.quarantined, s.quarantine_output
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => run_error(&e),
            }
        }
        Command::Probe {
            probe,
            token_cache,
            augment,
        } => match refused_cache(token_cache, augment, "--token-cache")
            .map_or_else(|| probe.options(), Err)
        {
            Ok(opts) => report_eval({
                vjepa_pipeline::shutdown::install_exit_at_once("probe", CONTINUE_HINT);
                vjepa_pipeline::probe::run(vjepa_pipeline::probe::ProbeOptions {
                    cache: token_cache,
                    augment,
                    ..opts
                })
            }),
            Err(code) => code,
        },
        Command::Finetune {
            probe,
            backbone_lr_scale,
            clip_cache,
            augment,
        } => match refused_cache(clip_cache, augment, "--clip-cache")
            .map_or_else(|| probe.options(), Err)
        {
            Ok(probe) => report_eval({
                vjepa_pipeline::shutdown::install_exit_at_once("finetune", CONTINUE_HINT);
                vjepa_pipeline::finetune::run(vjepa_pipeline::finetune::FinetuneOptions {
                    probe: vjepa_pipeline::probe::ProbeOptions {
                        cache: clip_cache,
                        augment,
                        ..probe
                    },
                    backbone_lr_scale,
                })
            }),
            Err(code) => code,
        },
        Command::Init { config, out } => {
            let cfg = match JobConfig::load(&config) {
                Ok(c) => c,
                Err(e) => return config_error(&e),
            };
            match job::initial_checkpoint(&cfg).and_then(|bytes| {
                std::fs::write(&out, &bytes)
                    .map_err(|e| anyhow::anyhow!("writing {}: {e}", out.display()))?;
                Ok(bytes.len())
            }) {
                Ok(n) => {
                    println!("wrote {} ({n} bytes): step 0", out.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Metrics {
            run,
            format,
            config,
        } => {
            let s3 = match s3_settings_of(config.as_deref()) {
                Ok(s) => s,
                Err(code) => return code,
            };
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            match vjepa_pipeline::metrics_export::write_metrics_with(&run, &s3, format, &mut out) {
                Ok(_) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Inspect { checkpoint, config } => {
            let cfg = match config.as_deref().map(JobConfig::load).transpose() {
                Ok(c) => c,
                Err(e) => return config_error(&e),
            };
            let s3 = cfg.as_ref().map(|c| c.s3_settings()).unwrap_or_default();
            match job::inspect_checkpoint_with(&checkpoint, &s3, cfg.as_ref()) {
                Ok(text) => {
                    println!("{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
        #[cfg(feature = "cuda")]
        Command::GpuCheck {
            device,
            runs,
            no_check,
            no_timing,
            json,
        } => gpu_check(device, runs, !no_check, !no_timing, json.as_deref()),
        Command::Convert {
            input,
            output,
            config,
        } => {
            let cfg = match config.as_deref().map(JobConfig::load).transpose() {
                Ok(cfg) => cfg,
                Err(e) => return config_error(&e),
            };
            match convert::convert(&input, &output, cfg.as_ref()) {
                Ok(s) => {
                    println!(
                        "wrote {output} ({} bytes): step {}{}{}",
                        s.bytes_written,
                        s.steps_done,
                        s.epoch.map(|e| format!(", epoch {e}")).unwrap_or_default(),
                        if s.optimizer_state {
                            ""
                        } else {
                            ", no optimiser state in the input (fresh AdamW state)"
                        }
                    );
                    ExitCode::SUCCESS
                }
                Err(e @ (ConvertError::Usage(_) | ConvertError::BadCheckpoint { .. })) => {
                    eprintln!("error: {e}");
                    ExitCode::from(2)
                }
                Err(ConvertError::Io(e)) => {
                    eprintln!("error: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
        Command::MakeSamples {
            dir,
            count,
            size,
            frames,
            fps,
            codec,
            bitrate,
            keyframe_interval,
            patterns,
        } => {
            let overrides = vjepa_ingest::SampleOverrides {
                size,
                frames,
                fps,
                codec,
                bitrate_kbps: bitrate,
                keyframe_interval,
                patterns,
            };
            match vjepa_ingest::init()
                .and_then(|_| vjepa_ingest::make_samples_with(&dir, count, &overrides))
            {
                Ok(paths) => {
                    println!("wrote {} videos to {}", paths.len(), dir.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(1)
                }
            }
        }
    }
}

/// `vjepa gpu-check`: prints each row to stdout as it completes (a run cut short still shows
/// its rows there; once, as scripts merging stderr count them), then the tables; exit 1 on any
/// FAIL (2 when the device or a kernel launch fails, after writing `--json` with what was
/// gathered and the error).
#[cfg(feature = "cuda")]
fn gpu_check(
    device: usize,
    runs: usize,
    check: bool,
    timing: bool,
    json: Option<&std::path::Path>,
) -> ExitCode {
    use vjepa_model::kernels::gpu_check as gc;
    let mut checks = Vec::new();
    let mut timings = gc::Timings::default();
    // An error that ends the run: said, and written into the JSON with what was gathered; an
    // untimed run gets a timing failure too, so that a reader counting those does not take it
    // for a clean one.
    let fail = |what: String, checks: &[gc::CheckRow], timings: &mut gc::Timings| {
        eprintln!("error: {what}");
        if timing {
            timings.failures.push(gc::TimingFailure {
                op: "gpu-check timings".into(),
                dtype: String::new(),
                error: format!("not finished: {what}"),
            });
        }
        // The run already fails (exit 2); a JSON that cannot be written is only said.
        write_gpu_check_json(json, checks, timings, Some(&what));
        ExitCode::from(2)
    };
    let dev = match vjepa_model::Device::new_cuda(device) {
        Ok(d) => d,
        Err(e) => {
            return fail(
                format!("no CUDA device {device}: {e}"),
                &checks,
                &mut timings,
            );
        }
    };
    if check {
        let mut gathered = Vec::new();
        let r = gc::run_checks(&dev, |r| {
            let line = format!(
                "check {:<28} {:<24} {:<5} {:.3e} {}",
                r.op,
                r.case,
                r.dtype,
                r.max_rel_err,
                if r.pass { "PASS" } else { "FAIL" }
            );
            println!("{line}");
            gathered.push(r.clone());
        });
        match r {
            Ok(rows) => checks = rows,
            Err(e) => return fail(format!("gpu-check: {e}"), &gathered, &mut timings),
        }
        println!("{}", gc::format_checks(&checks));
    }
    if timing {
        let r = gc::run_timings(&dev, runs, &mut timings, |r| {
            let line = match r {
                Ok(r) => format!(
                    "time {:<30} {:<24} {:<5} {:.3} ms",
                    r.op, r.shape, r.dtype, r.median_ms
                ),
                Err(f) => format!("time {:<30} {:<5} NOT TIMED: {}", f.op, f.dtype, f.error),
            };
            println!("{line}");
        });
        if let Err(e) = r {
            return fail(format!("gpu-check timings: {e}"), &checks, &mut timings);
        }
        println!("{}", gc::format_timings(&timings.rows));
        // Shown, not fatal: a timing is a figure, not a check (the exit status is the checks').
        for f in &timings.failures {
            println!("NOT TIMED {} ({}): {}", f.op, f.dtype, f.error);
        }
    }
    if !write_gpu_check_json(json, &checks, &timings, None) {
        return ExitCode::from(2);
    }
    let failed = checks.iter().filter(|r| !r.pass).count();
    if failed > 0 {
        println!("gpu-check: {failed} of {} checks FAILED", checks.len());
        return ExitCode::from(1);
    }
    if check {
        println!("gpu-check: all {} checks passed", checks.len());
    }
    ExitCode::SUCCESS
}

/// Writes gpu-check's `--json` (if asked for): the check rows, the timings and their failures,
/// and `error` when the run ended on one. False (said on stderr) when it could not be written.
#[cfg(feature = "cuda")]
fn write_gpu_check_json(
    json: Option<&std::path::Path>,
    checks: &[vjepa_model::kernels::gpu_check::CheckRow],
    timings: &vjepa_model::kernels::gpu_check::Timings,
    error: Option<&str>,
) -> bool {
    let Some(path) = json else {
        return true;
    };
    let mut doc = serde_json::json!({
        "checks": checks,
        "timings": timings.rows,
        "timing_failures": timings.failures,
    });
    if let Some(e) = error {
        doc["error"] = serde_json::Value::from(e);
    }
    match std::fs::write(path, doc.to_string()) {
        Ok(()) => true,
        Err(e) => {
            eprintln!("error: writing {}: {e}", path.display());
            false
        }
    }
}

/// The S3 settings a command reaches object-store URLs with: the `storage.s3` of `config` when
/// given (a bad config is refused, naming the key), else the environment's.
fn s3_settings_of(config: Option<&std::path::Path>) -> Result<vjepa_storage::S3Settings, ExitCode> {
    match config {
        None => Ok(Default::default()),
        Some(path) => JobConfig::load(path)
            .map(|c| c.s3_settings())
            .map_err(|e| config_error(&e)),
    }
}

/// `clap` value parser: a path ending in `.safetensors` (what `init` writes; other names
/// would promise another format).
fn safetensors_path(s: &str) -> Result<PathBuf, String> {
    if s.ends_with(".safetensors") {
        Ok(PathBuf::from(s))
    } else {
        Err(
            "must end in .safetensors (init writes our format; `vjepa convert` turns it into an \
             official .pth.tar)"
                .into(),
        )
    }
}

/// `clap` value parser: an integer ≥ 1 (counts, sizes, strides).
fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        Ok(_) => Err("must be at least 1".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// `clap` value parser: seconds above 0, at most a day.
fn timeout_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x > 0.0 && x <= 86_400.0 => Ok(x),
        Ok(_) => Err("must be above 0 and at most 86400 (a day)".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// `clap` value parser: a finite number > 0 (learning rates).
fn positive_number(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x.is_finite() && x > 0.0 => Ok(x),
        Ok(_) => Err("must be a finite number above 0".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// `clap` value parser: a finite number ≥ 0 (weight decay).
fn non_negative_number(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x.is_finite() && x >= 0.0 => Ok(x),
        Ok(_) => Err("must be a finite number, 0 or above".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// `clap` value parser: a share in (0, 1] (label fraction).
fn share(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x > 0.0 && x <= 1.0 => Ok(x),
        Ok(_) => Err("must be in (0, 1]".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// Exit 2 before any work when the cache cannot hold the train clips `augment` makes.
fn refused_cache(
    cache: vjepa_pipeline::probe::Cache,
    augment: vjepa_pipeline::probe::Augment,
    flag: &str,
) -> Option<ExitCode> {
    let why = vjepa_pipeline::probe::held_augmented_clips(cache, augment, flag)?;
    eprintln!("error: {why}");
    Some(ExitCode::from(2))
}

fn config_error(e: &vjepa_pipeline::config::ConfigError) -> ExitCode {
    eprintln!("config error: {e}");
    ExitCode::from(2)
}

/// A cluster peer that goes away makes timely's network threads panic ("timely communication
/// error: … socket closed"), and every thread that touches them after: one log line each, not
/// a backtrace each (the job then reports the lost peer as its error). Other panics are bugs
/// and keep the default report.
fn quiet_lost_peer_panics() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        // Timely's own messages only: "Send thread panic" and "Recv thread panic" are its
        // guards' (std's "a scoped thread panicked" is a bug of ours and keeps its report).
        let lost_peer = [
            "timely communication error",
            "MergeQueue poisoned",
            "Send thread panic",
            "Recv thread panic",
        ]
        .iter()
        .any(|m| message.starts_with(m));
        if lost_peer {
            let thread = std::thread::current().name().unwrap_or("?").to_string();
            tracing::error!(
                thread,
                "connection to another process of the job lost: {message}"
            );
        } else {
            default(info);
        }
    }));
}

/// Logs to stderr at `default_level` unless `RUST_LOG` says otherwise.
fn init_logging(format: LogFormat, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// `WxH` with both sides even and positive (what the encoders take).
fn parse_size(text: &str) -> Result<(u32, u32), String> {
    let bad = || {
        format!(
            "expected WxH with even sides of at least 16 (the encoders' smallest frame), e.g. 1280x720, got {text:?}"
        )
    };
    let (w, h) = text.split_once(['x', 'X']).ok_or_else(bad)?;
    let (w, h): (u32, u32) = (w.parse().map_err(|_| bad())?, h.parse().map_err(|_| bad())?);
    if w < 16 || h < 16 || !w.is_multiple_of(2) || !h.is_multiple_of(2) {
        return Err(bad());
    }
    Ok((w, h))
}
