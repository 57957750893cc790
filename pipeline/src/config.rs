//! The job's configuration: the official V-JEPA pretrain YAML (spec §0) plus our own sections.
//!
//! One typed tree, parsed once with unknown keys refused and the path of every bad key reported;
//! official keys that this implementation does not act on are accepted and listed as ignored, so
//! the official files parse unchanged. Everything downstream takes the validated [`JobConfig`].

use std::path::Path;

use serde::Deserialize;
use serde_yaml::Value;
use vjepa_model::ComputeDevice;

/// A configuration problem, always naming the key it is about.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// YAML syntax, unknown key or wrong type.
    #[error("config key `{key}`: {message}")]
    Parse { key: String, message: String },
    /// The value has the right type but is not acceptable.
    #[error("config key `{key}`: {message}")]
    Invalid { key: String, message: String },
}

impl ConfigError {
    fn invalid(key: &str, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.to_string(),
            message: message.into(),
        }
    }

    /// The dotted path of the offending key.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Read { .. } => None,
            ConfigError::Parse { key, .. } | ConfigError::Invalid { key, .. } => Some(key),
        }
    }
}

/// Top level of the YAML file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Official launcher key (`vjepa`); any other app is refused.
    #[serde(default)]
    pub app: Option<String>,
    /// Official SLURM sizing; we size the job with `workers` and the cluster options instead.
    #[serde(default)]
    pub nodes: Option<Value>,
    #[serde(default)]
    pub tasks_per_node: Option<Value>,
    pub data: DataSection,
    #[serde(default)]
    pub data_aug: DataAugSection,
    #[serde(default)]
    pub logging: LoggingSection,
    #[serde(default)]
    pub loss: LossSection,
    /// The multiblock masks of V-JEPA (required for it; `objective: pixel` uses tube masking).
    #[serde(default)]
    pub mask: Vec<MaskSection>,
    #[serde(default)]
    pub meta: MetaSection,
    pub model: ModelSection,
    pub optimization: OptimizationSection,
    /// Ours: object-store connection settings (never credentials).
    #[serde(default)]
    pub storage: StorageSection,
    /// Ours: where outputs go and how often.
    #[serde(default)]
    pub outputs: OutputsSection,
    /// Ours: dataflow workers and flow control.
    #[serde(default)]
    pub workers: WorkersSection,
    /// Ours: how often the datasets are re-read while the run goes.
    #[serde(default)]
    pub catalog: CatalogSection,
    /// Ours: the Prometheus endpoint and status page served by the job.
    #[serde(default)]
    pub telemetry: TelemetrySection,
    /// Ours: the same job as several processes (data-parallel training across all workers).
    #[serde(default)]
    pub cluster: ClusterSection,
}

/// Cluster mode: `processes` copies of the binary, each with `workers.count` worker threads,
/// connected by timely over TCP (the hostfile's addresses).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    /// Processes in the job (`--processes`); 1 = a single process, no networking.
    #[serde(default = "one")]
    pub processes: usize,
    /// This process's number, `0..processes` (`--process`); process 0 lists the catalog and
    /// writes every output.
    #[serde(default)]
    pub process: usize,
    /// File with one `host:port` per line, line `i` for process `i` (`--hostfile`); required
    /// when `processes > 1`.
    #[serde(default)]
    pub hostfile: Option<String>,
    /// Compare a digest of every worker's parameters after every this many steps (and after
    /// the last); 0 = only after the last step. Unset: 1 where there are replicas to compare
    /// (more than one worker in all), else 0 — the digest reads every parameter, AdamW moment
    /// and target weight to the host, seconds per step at ViT-L on a GPU, and a single worker
    /// has nothing to compare it with.
    #[serde(default)]
    pub check_params_every: Option<u64>,
    /// Seconds a process waits for every other process of the job to connect before it gives
    /// up with an error naming them (timely would wait for ever).
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_secs: f64,
}

fn default_connect_timeout() -> f64 {
    600.0
}

impl ClusterSection {
    /// `check_params_every` as the job applies it for `workers` workers in all.
    pub fn check_params_every(&self, workers: usize) -> u64 {
        self.check_params_every
            .unwrap_or(if workers > 1 { 1 } else { 0 })
    }
}

impl Default for ClusterSection {
    fn default() -> Self {
        ClusterSection {
            processes: 1,
            process: 0,
            hostfile: None,
            check_params_every: None,
            connect_timeout_secs: default_connect_timeout(),
        }
    }
}

/// `telemetry:` — where the job serves `/metrics`, `/api/status` and the status page `/`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetrySection {
    /// `host:port` to listen on (port 0: any free port); `null` serves nothing. Loopback by
    /// default: the page shows the config, so exposing it is a deliberate choice.
    #[serde(default = "default_listen")]
    pub listen: Option<String>,
    /// When the run fails (e.g. a non-finite loss), keep serving this many seconds before the
    /// process exits, so that Prometheus scrapes the final values and the alerts can fire.
    #[serde(default = "default_linger")]
    pub linger_secs: f64,
}

impl Default for TelemetrySection {
    fn default() -> Self {
        TelemetrySection {
            listen: default_listen(),
            linger_secs: default_linger(),
        }
    }
}

fn default_listen() -> Option<String> {
    Some("127.0.0.1:9464".to_string())
}

fn default_linger() -> f64 {
    30.0
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogSection {
    /// Re-read every dataset (indexes, listed prefixes) every this many seconds: added videos
    /// enter, deleted and quarantined ones leave, at a step boundary all workers agree on.
    #[serde(default = "default_refresh")]
    pub refresh_secs: f64,
}

impl Default for CatalogSection {
    fn default() -> Self {
        CatalogSection {
            refresh_secs: default_refresh(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    #[serde(default)]
    pub dataset_type: Option<String>,
    #[serde(default)]
    pub mask_type: Option<String>,
    /// CSV indexes (`path label`) or object-store prefixes.
    pub datasets: Vec<String>,
    #[serde(default)]
    pub datasets_weights: Option<Vec<f64>>,
    #[serde(default)]
    pub decode_one_clip: Option<Value>,
    pub batch_size: usize,
    #[serde(default = "one")]
    pub num_clips: usize,
    #[serde(default = "sixteen")]
    pub num_frames: usize,
    #[serde(default = "two")]
    pub tubelet_size: usize,
    #[serde(default = "four")]
    pub sampling_rate: usize,
    #[serde(default)]
    pub clip_duration: Option<f64>,
    #[serde(default = "default_crop")]
    pub crop_size: usize,
    #[serde(default = "sixteen")]
    pub patch_size: usize,
    #[serde(default)]
    pub pin_mem: Option<Value>,
    #[serde(default)]
    pub num_workers: Option<Value>,
    #[serde(default)]
    pub filter_short_videos: bool,
    /// Files larger than this many bytes are skipped (official default 1e9).
    #[serde(default = "default_filter_long")]
    pub filter_long_videos: f64,
    #[serde(default)]
    pub log_resource_utilization: Option<Value>,
    /// Ours: the store every index's entries resolve in (a directory or bucket prefix holding
    /// the videos); unset: each index's own folder.
    #[serde(default)]
    pub index_root: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataAugSection {
    #[serde(default)]
    pub auto_augment: bool,
    #[serde(default)]
    pub motion_shift: bool,
    #[serde(default = "default_aspect")]
    pub random_resize_aspect_ratio: [f64; 2],
    #[serde(default = "default_scale")]
    pub random_resize_scale: [f64; 2],
    #[serde(default)]
    pub reprob: f64,
}

impl Default for DataAugSection {
    fn default() -> Self {
        DataAugSection {
            auto_augment: false,
            motion_shift: false,
            random_resize_aspect_ratio: default_aspect(),
            random_resize_scale: default_scale(),
            reprob: 0.0,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoggingSection {
    /// Official output folder; used as `outputs.dir` when that is not set.
    #[serde(default)]
    pub folder: Option<String>,
    #[serde(default)]
    pub write_tag: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LossSection {
    #[serde(default = "one_f")]
    pub loss_exp: f64,
    #[serde(default)]
    pub reg_coeff: f64,
}

impl Default for LossSection {
    fn default() -> Self {
        LossSection {
            loss_exp: 1.0,
            reg_coeff: 0.0,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaskSection {
    pub aspect_ratio: [f64; 2],
    pub num_blocks: usize,
    pub spatial_scale: [f64; 2],
    pub temporal_scale: [f64; 2],
    #[serde(default = "one_f")]
    pub max_temporal_keep: f64,
    #[serde(default)]
    pub max_keep: Option<usize>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetaSection {
    /// Resume from the latest checkpoint in the output directory. The job does so anyway
    /// whenever there is one (the same command continues after a crash); `true` only makes
    /// the absence of one a logged event.
    #[serde(default)]
    pub load_checkpoint: bool,
    /// A specific checkpoint to start from (URL or path).
    #[serde(default)]
    pub read_checkpoint: Option<String>,
    #[serde(default = "default_seed")]
    pub seed: u64,
    #[serde(default)]
    pub eval_freq: Option<Value>,
    #[serde(default)]
    pub use_sdpa: Option<Value>,
    #[serde(default)]
    pub dtype: Option<String>,
    #[serde(default)]
    pub save_every_freq: Option<Value>,
    #[serde(default)]
    pub skip_batches: Option<Value>,
}

impl Default for MetaSection {
    fn default() -> Self {
        MetaSection {
            load_checkpoint: false,
            read_checkpoint: None,
            seed: default_seed(),
            eval_freq: None,
            use_sdpa: None,
            dtype: None,
            save_every_freq: None,
            skip_batches: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    pub model_name: String,
    pub pred_depth: usize,
    pub pred_embed_dim: usize,
    #[serde(default = "yes")]
    pub uniform_power: bool,
    #[serde(default = "yes")]
    pub use_mask_tokens: bool,
    #[serde(default = "yes")]
    pub zero_init_mask_tokens: bool,
    /// Ours: override the preset's width (small models for CPU runs and tests).
    #[serde(default)]
    pub embed_dim: Option<usize>,
    /// Ours: override the preset's depth.
    #[serde(default)]
    pub depth: Option<usize>,
    /// Ours: override the preset's head count (the predictor uses the same count).
    #[serde(default)]
    pub num_heads: Option<usize>,
    /// Ours: the pretraining objective, `vjepa` (default) or `pixel` (the VideoMAE-style
    /// baseline: tube masking, pixel-reconstruction decoder, L2 loss).
    #[serde(default)]
    pub objective: vjepa_model::Objective,
    /// Ours: settings of `objective: pixel` (ignored otherwise).
    #[serde(default)]
    pub pixel: PixelSection,
    /// Ours: recompute the encoder's and predictor's block activations in the backward pass
    /// instead of keeping them (less memory, about one more forward per step; same gradients).
    #[serde(default)]
    pub activation_checkpointing: bool,
    /// Ours: run the target encoder's pass on a thread of its own, on a GPU a second stream
    /// beside the context passes (same numbers; not yet measured on a GPU, so off by default).
    #[serde(default)]
    pub target_stream: bool,
}

/// `model.pixel:` — the pixel objective (VideoMAE defaults, decoder width scaled down for
/// small encoders by setting `decoder_dim`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PixelSection {
    /// Fraction of the spatial positions masked in every clip, repeated over time (tubes).
    #[serde(default = "default_pixel_ratio")]
    pub mask_ratio: f64,
    /// Decoder blocks.
    #[serde(default = "four")]
    pub decoder_depth: usize,
    /// Decoder width.
    #[serde(default = "default_decoder_dim")]
    pub decoder_dim: usize,
    /// Decoder heads (default: the encoder's head count, as for the predictor).
    #[serde(default)]
    pub decoder_heads: Option<usize>,
    /// Normalise each target tubelet by its own mean and variance.
    #[serde(default = "yes")]
    pub norm_pix: bool,
}

impl Default for PixelSection {
    fn default() -> Self {
        PixelSection {
            mask_ratio: default_pixel_ratio(),
            decoder_depth: 4,
            decoder_dim: default_decoder_dim(),
            decoder_heads: None,
            norm_pix: true,
        }
    }
}

fn default_pixel_ratio() -> f64 {
    0.9
}

fn default_decoder_dim() -> usize {
    384
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimizationSection {
    /// Iterations per "epoch"; schedules are defined in these units.
    #[serde(default)]
    pub ipe: Option<u64>,
    #[serde(default = "one_f")]
    pub ipe_scale: f64,
    #[serde(default)]
    pub clip_grad: Option<f64>,
    pub weight_decay: f64,
    pub final_weight_decay: f64,
    pub epochs: u64,
    pub warmup: f64,
    pub start_lr: f64,
    pub lr: f64,
    pub final_lr: f64,
    pub ema: [f64; 2],
    #[serde(default = "default_betas")]
    pub betas: [f64; 2],
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// Ours: stop after this many steps even if the schedule is longer.
    #[serde(default)]
    pub max_steps: Option<u64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageSection {
    #[serde(default)]
    pub s3: S3Section,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Section {
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default)]
    pub region: Option<String>,
    #[serde(default)]
    pub allow_http: bool,
    /// Retries of a failed S3 request (object_store's default 10).
    #[serde(default)]
    pub max_retries: Option<usize>,
    /// Longest time retrying one S3 request, seconds (object_store's default 180).
    #[serde(default)]
    pub retry_timeout_secs: Option<f64>,
    /// Longest time one S3 HTTP request may take, seconds (object_store's default 30).
    #[serde(default)]
    pub request_timeout_secs: Option<f64>,
    /// The EC2 instance metadata service (`http://host[:port]`), for credentials from an
    /// instance profile when the environment has none (default: the AWS variables, else
    /// `http://169.254.169.254`).
    #[serde(default)]
    pub metadata_endpoint: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputsSection {
    /// Local path or object-store URL; defaults to `logging.folder`.
    #[serde(default)]
    pub dir: Option<String>,
    /// Write a checkpoint every this many steps (0: only at the end; unset: once an epoch, as
    /// the official loop saves its `latest` checkpoint, so a long run never has more than an
    /// epoch to redo after a crash).
    #[serde(default)]
    pub checkpoint_every: Option<u64>,
    /// Checkpoints kept in `checkpoints/` (older ones are deleted after each new one is in
    /// place); 0 keeps all. Unset: 2 with the once-an-epoch default (the official loop
    /// overwrites one `latest`), all with an explicit `checkpoint_every`.
    #[serde(default)]
    pub keep_checkpoints: Option<usize>,
    /// Flush a Parquet row group of metrics every this many steps.
    #[serde(default = "default_flush")]
    pub metrics_flush_every: u64,
    /// Log a progress line every this many steps.
    #[serde(default = "ten")]
    pub log_every: u64,
    /// Also write `clips.parquet`: one row per clip trained on (step, slot, video, frames, crop).
    #[serde(default)]
    pub clips: bool,
    /// Also write `features.parquet`: the target encoder's mean-pooled feature of every clip
    /// trained on (step, video, frames, embedding), a by-product of the target pass.
    #[serde(default)]
    pub features: bool,
}

impl Default for OutputsSection {
    fn default() -> Self {
        OutputsSection {
            dir: None,
            checkpoint_every: None,
            keep_checkpoints: None,
            metrics_flush_every: default_flush(),
            log_every: 10,
            clips: false,
            features: false,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkersSection {
    /// timely worker threads in this process (`--workers` overrides).
    #[serde(default = "one")]
    pub count: usize,
    /// At most this many clips requested but not yet trained on, per worker.
    #[serde(default)]
    pub max_clips_in_flight: Option<usize>,
    /// Clips decoding at once per worker, each on its own thread with its own decoder
    /// (default: the machine's cores divided by `count`).
    #[serde(default)]
    pub decode_threads: Option<usize>,
    /// A clip that takes longer than this to fetch and decode is quarantined.
    #[serde(default = "default_deadline")]
    pub decode_deadline_secs: f64,
    /// Give up on a clip slot after this many bad videos in a row (the corpus is mostly bad).
    #[serde(default = "default_attempts")]
    pub max_attempts_per_clip: usize,
    /// Where each worker's model computes: `cpu`, `cuda` or `cuda:N` (`--device` overrides);
    /// CUDA needs a binary built with the `cuda` feature.
    #[serde(default = "default_device")]
    pub device: String,
    /// Video decoders: `software` (libav, libvpx, …; the same frames on every machine) or
    /// `nvdec` (GStreamer's nvcodec elements where NVDEC takes the stream, software otherwise).
    #[serde(default = "default_video_decoder")]
    pub video_decoder: String,
    /// Attention on a GPU: `auto` (cuDNN's fused attention where the binary has the `cudnn`
    /// feature and libcudnn loads, our kernels otherwise), `cudnn` (refused before any work
    /// where it cannot run) or `own` (our flash-style kernels). The CPU ignores it.
    #[serde(default = "default_attention")]
    pub attention: String,
}

impl Default for WorkersSection {
    fn default() -> Self {
        WorkersSection {
            count: 1,
            max_clips_in_flight: None,
            decode_threads: None,
            decode_deadline_secs: default_deadline(),
            max_attempts_per_clip: default_attempts(),
            device: default_device(),
            video_decoder: default_video_decoder(),
            attention: default_attention(),
        }
    }
}

fn default_attention() -> String {
    "auto".into()
}

fn default_video_decoder() -> String {
    "software".into()
}

fn default_device() -> String {
    "cpu".into()
}

fn one() -> usize {
    1
}
fn two() -> usize {
    2
}
fn four() -> usize {
    4
}
fn sixteen() -> usize {
    16
}
fn ten() -> u64 {
    10
}
fn one_f() -> f64 {
    1.0
}
fn yes() -> bool {
    true
}
fn default_crop() -> usize {
    224
}
fn default_filter_long() -> f64 {
    1e9
}
fn default_aspect() -> [f64; 2] {
    [0.75, 1.35]
}
fn default_scale() -> [f64; 2] {
    [0.3, 1.0]
}
fn default_seed() -> u64 {
    234
}
fn default_betas() -> [f64; 2] {
    [0.9, 0.999]
}
fn default_eps() -> f64 {
    1e-8
}
fn default_flush() -> u64 {
    50
}
fn default_deadline() -> f64 {
    60.0
}
fn default_attempts() -> usize {
    100
}
fn default_refresh() -> f64 {
    60.0
}

/// A validated configuration plus what was read but not acted on.
#[derive(Debug, Clone)]
pub struct JobConfig {
    pub raw: RawConfig,
    /// Dotted paths of official keys present in the file that this implementation ignores, with why.
    pub ignored: Vec<(String, &'static str)>,
}

impl JobConfig {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<JobConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text)
    }

    /// Parses and validates YAML text.
    pub fn parse(text: &str) -> Result<JobConfig, ConfigError> {
        // An official evaluation config (`eval_name: video_classification_frozen`, …) is not a
        // pretraining config: say what it is and where its settings go, rather than refuse
        // its first unknown key.
        if let Ok(serde_yaml::Value::Mapping(top)) = serde_yaml::from_str::<serde_yaml::Value>(text)
            && let Some(name) = top
                .get(serde_yaml::Value::from("eval_name"))
                .and_then(serde_yaml::Value::as_str)
        {
            let message = if name == "video_classification_frozen" {
                format!(
                    "this is an official evaluation config (`{name}`), not a pretraining one: \
                     give it to `vjepa probe --eval-config` (or `vjepa finetune \
                     --eval-config`), which reads its datasets, sampling, optimisation, \
                     checkpoint and model shape"
                )
            } else {
                format!(
                    "this is an official evaluation config (`{name}`), not a pretraining one; \
                     only the frozen video evaluation (video_classification_frozen) is \
                     supported, by `vjepa probe --eval-config`"
                )
            };
            return Err(ConfigError::Invalid {
                key: "eval_name".into(),
                message,
            });
        }
        let de = serde_yaml::Deserializer::from_str(text);
        let raw: RawConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            let message = inner.to_string();
            // serde reports an unknown field at its parent; name the field itself.
            let key = match unknown_field_name(&message) {
                Some(field) if key == "." || key.is_empty() => field,
                Some(field) if !key.ends_with(&field) => format!("{key}.{field}"),
                _ => key,
            };
            let key = if key == "." || key.is_empty() {
                "<top level>".into()
            } else {
                key
            };
            // serde_yaml names the key too: once is enough.
            let message = message
                .strip_prefix(&format!("{key}: "))
                .map_or(message.clone(), str::to_string);
            ConfigError::Parse { key, message }
        })?;
        let ignored = ignored_keys(&raw);
        let cfg = JobConfig { raw, ignored };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Refuses values of the right type that cannot be run, naming the key.
    fn validate(&self) -> Result<(), ConfigError> {
        let r = &self.raw;
        if let Some(ep) = &r.storage.s3.endpoint
            && let Some(why) = vjepa_storage::endpoint_problem(ep)
        {
            return Err(ConfigError::invalid(
                "storage.s3.endpoint",
                format!("{}: {why}", vjepa_storage::redact_url(ep)),
            ));
        }
        if let Some(ep) = &r.storage.s3.metadata_endpoint
            && let Some(why) = vjepa_storage::metadata_endpoint_problem(ep)
        {
            return Err(ConfigError::invalid(
                "storage.s3.metadata_endpoint",
                format!("{}: {why}", vjepa_storage::redact_url(ep)),
            ));
        }
        for (key, secs) in [
            (
                "storage.s3.retry_timeout_secs",
                r.storage.s3.retry_timeout_secs,
            ),
            (
                "storage.s3.request_timeout_secs",
                r.storage.s3.request_timeout_secs,
            ),
        ] {
            if let Some(v) = secs
                && !(v.is_finite() && v > 0.0 && v <= 86_400.0)
            {
                return Err(ConfigError::invalid(
                    key,
                    format!("must be a number of seconds in (0, 86400], got {v}"),
                ));
            }
        }
        if let Some(app) = &r.app
            && app != "vjepa"
        {
            return Err(ConfigError::invalid(
                "app",
                format!("only `vjepa` pretraining is supported, got `{app}`"),
            ));
        }
        let d = &r.data;
        if let Some(t) = &d.dataset_type
            && !t.eq_ignore_ascii_case("videodataset")
        {
            return Err(ConfigError::invalid(
                "data.dataset_type",
                format!("only VideoDataset is supported, got `{t}`"),
            ));
        }
        if let Some(t) = &d.mask_type
            && t != "multiblock3d"
        {
            return Err(ConfigError::invalid(
                "data.mask_type",
                format!("only multiblock3d is supported, got `{t}`"),
            ));
        }
        if d.datasets.is_empty() {
            return Err(ConfigError::invalid(
                "data.datasets",
                "at least one dataset is needed",
            ));
        }
        if let Some(w) = &d.datasets_weights {
            if w.len() != d.datasets.len() {
                return Err(ConfigError::invalid(
                    "data.datasets_weights",
                    format!("{} weights for {} datasets", w.len(), d.datasets.len()),
                ));
            }
            if w.iter().any(|x| !x.is_finite() || *x < 0.0) || w.iter().sum::<f64>() <= 0.0 {
                return Err(ConfigError::invalid(
                    "data.datasets_weights",
                    "weights must be finite, non-negative and not all zero",
                ));
            }
        }
        let refresh = r.catalog.refresh_secs;
        if !(refresh.is_finite() && refresh > 0.0) {
            return Err(ConfigError::invalid(
                "catalog.refresh_secs",
                "must be a positive number of seconds",
            ));
        }
        let linger = r.telemetry.linger_secs;
        if !(linger.is_finite() && linger >= 0.0) {
            return Err(ConfigError::invalid(
                "telemetry.linger_secs",
                "must be a non-negative number of seconds",
            ));
        }
        if let Some(addr) = &r.telemetry.listen
            && addr.parse::<std::net::SocketAddr>().is_err()
        {
            return Err(ConfigError::invalid(
                "telemetry.listen",
                format!(
                    "`{addr}` is not host:port with a numeric IP (e.g. 127.0.0.1:9464, 0.0.0.0:9464)"
                ),
            ));
        }
        positive("data.batch_size", d.batch_size)?;
        if d.num_clips != 1 {
            return Err(ConfigError::invalid(
                "data.num_clips",
                "pretraining uses one clip per video (num_clips: 1)",
            ));
        }
        positive("data.num_frames", d.num_frames)?;
        positive("data.tubelet_size", d.tubelet_size)?;
        positive("data.sampling_rate", d.sampling_rate)?;
        positive("data.patch_size", d.patch_size)?;
        positive("data.crop_size", d.crop_size)?;
        // num_frames 1 is the image path (Conv2d patches, 2-D tables): the tubelet is unused.
        if d.num_frames > 1 && !d.num_frames.is_multiple_of(d.tubelet_size) {
            return Err(ConfigError::invalid(
                "data.num_frames",
                format!(
                    "{} frames is not a multiple of tubelet_size {}",
                    d.num_frames, d.tubelet_size
                ),
            ));
        }
        if !d.crop_size.is_multiple_of(d.patch_size) {
            return Err(ConfigError::invalid(
                "data.crop_size",
                format!(
                    "crop {} is not a multiple of patch_size {}",
                    d.crop_size, d.patch_size
                ),
            ));
        }
        if let Some(c) = d.clip_duration
            && !(c.is_finite() && c > 0.0)
        {
            return Err(ConfigError::invalid(
                "data.clip_duration",
                "must be a positive number of seconds or null",
            ));
        }
        // Locations parse (no I/O): a URL with credentials in it is refused here, before it
        // could be logged.
        let location = |key: String, value: &str| {
            vjepa_storage::check_location(value)
                .map_err(|e| ConfigError::invalid(&key, e.to_string()))
        };
        for (i, ds) in d.datasets.iter().enumerate() {
            location(format!("data.datasets[{i}]"), ds)?;
        }
        if let Some(dir) = r.outputs.dir.as_deref().filter(|x| !x.trim().is_empty()) {
            location("outputs.dir".into(), dir)?;
        }
        if let Some(ckpt) = r.meta.read_checkpoint.as_deref() {
            location("meta.read_checkpoint".into(), ckpt)?;
        }
        if let Some(root) = &d.index_root {
            if root.trim().is_empty() {
                return Err(ConfigError::invalid(
                    "data.index_root",
                    "is empty: set a directory or bucket prefix, or leave it out",
                ));
            }
            vjepa_storage::check_location(root)
                .map_err(|e| ConfigError::invalid("data.index_root", e.to_string()))?;
        }
        if d.filter_long_videos.is_nan() || d.filter_long_videos <= 0.0 {
            return Err(ConfigError::invalid(
                "data.filter_long_videos",
                "must be a positive byte count",
            ));
        }

        let a = &r.data_aug;
        if !(a.reprob.is_finite() && (0.0..=1.0).contains(&a.reprob)) {
            return Err(ConfigError::invalid(
                "data_aug.reprob",
                "must be a probability in [0, 1] (0: no random erasing)",
            ));
        }
        range(
            "data_aug.random_resize_aspect_ratio",
            a.random_resize_aspect_ratio,
            f64::MIN_POSITIVE,
            f64::MAX,
        )?;
        range(
            "data_aug.random_resize_scale",
            a.random_resize_scale,
            f64::MIN_POSITIVE,
            1.0,
        )?;

        if r.loss.loss_exp != 1.0 {
            return Err(ConfigError::invalid(
                "loss.loss_exp",
                "only loss_exp: 1.0 (L1) is implemented",
            ));
        }
        if !(r.loss.reg_coeff.is_finite() && r.loss.reg_coeff >= 0.0) {
            return Err(ConfigError::invalid(
                "loss.reg_coeff",
                format!("must be a finite number ≥ 0, got {}", r.loss.reg_coeff),
            ));
        }
        if r.loss.reg_coeff != 0.0 && r.model.objective == vjepa_model::Objective::Pixel {
            return Err(ConfigError::invalid(
                "loss.reg_coeff",
                "the variance regulariser is V-JEPA's (on its predictions); use 0.0 with objective: pixel",
            ));
        }

        if r.model.activation_checkpointing && r.model.objective == vjepa_model::Objective::Pixel {
            return Err(ConfigError::invalid(
                "model.activation_checkpointing",
                "is V-JEPA's (encoder and predictor blocks); the pixel objective has none",
            ));
        }
        if r.model.target_stream && r.model.objective == vjepa_model::Objective::Pixel {
            return Err(ConfigError::invalid(
                "model.target_stream",
                "is V-JEPA's (its target encoder); the pixel objective has none",
            ));
        }
        if r.mask.is_empty() && r.model.objective == vjepa_model::Objective::Vjepa {
            return Err(ConfigError::invalid("mask", "at least one mask config"));
        }
        for (i, m) in r.mask.iter().enumerate() {
            let k = |f: &str| format!("mask[{i}].{f}");
            positive(&k("num_blocks"), m.num_blocks)?;
            range(
                &k("aspect_ratio"),
                m.aspect_ratio,
                f64::MIN_POSITIVE,
                f64::MAX,
            )?;
            range(&k("spatial_scale"), m.spatial_scale, 0.0, 1.0)?;
            range(&k("temporal_scale"), m.temporal_scale, 0.0, 1.0)?;
            if !(m.max_temporal_keep > 0.0 && m.max_temporal_keep <= 1.0) {
                return Err(ConfigError::invalid(
                    &k("max_temporal_keep"),
                    "must be in (0, 1]",
                ));
            }
            if m.max_keep == Some(0) {
                return Err(ConfigError::invalid(&k("max_keep"), "must be positive"));
            }
        }

        if let Some(dt) = &r.meta.dtype
            && !matches!(
                dt.as_str(),
                "float32" | "bfloat16" | "float16" | "fp32" | "bf16" | "fp16"
            )
        {
            return Err(ConfigError::invalid(
                "meta.dtype",
                format!("unknown dtype `{dt}` (float32, bfloat16 or float16)"),
            ));
        }

        let m = &r.model;
        if vjepa_model::EncoderConfig::preset(
            &m.model_name,
            d.num_frames,
            d.crop_size,
            d.patch_size,
            d.tubelet_size,
            m.uniform_power,
        )
        .is_none()
        {
            return Err(ConfigError::invalid(
                "model.model_name",
                format!(
                    "unknown model `{}` (vit_tiny, vit_small, vit_base, vit_large, vit_huge, vit_giant)",
                    m.model_name
                ),
            ));
        }
        positive("model.pred_depth", m.pred_depth)?;
        positive("model.pred_embed_dim", m.pred_embed_dim)?;
        if !m.use_mask_tokens {
            return Err(ConfigError::invalid(
                "model.use_mask_tokens",
                "only the mask-token predictor is implemented",
            ));
        }
        if !m.zero_init_mask_tokens {
            return Err(ConfigError::invalid(
                "model.zero_init_mask_tokens",
                "only zero-initialised mask tokens are implemented",
            ));
        }
        for (key, v) in [
            ("model.embed_dim", m.embed_dim),
            ("model.depth", m.depth),
            ("model.num_heads", m.num_heads),
        ] {
            if v == Some(0) {
                return Err(ConfigError::invalid(key, "must be positive"));
            }
        }
        let enc = self.encoder_config();
        if !enc.embed_dim.is_multiple_of(enc.num_heads) {
            return Err(ConfigError::invalid(
                "model.num_heads",
                format!(
                    "width {} is not divisible by {} heads",
                    enc.embed_dim, enc.num_heads
                ),
            ));
        }
        if !m.pred_embed_dim.is_multiple_of(enc.num_heads) {
            return Err(ConfigError::invalid(
                "model.pred_embed_dim",
                format!(
                    "predictor width {} is not divisible by {} heads",
                    m.pred_embed_dim, enc.num_heads
                ),
            ));
        }
        if !enc.embed_dim.is_multiple_of(2) || !m.pred_embed_dim.is_multiple_of(2) {
            return Err(ConfigError::invalid(
                "model.embed_dim",
                "widths must be even for the sin-cos position tables",
            ));
        }
        if enc.is_image()
            && (!enc.embed_dim.is_multiple_of(4) || !m.pred_embed_dim.is_multiple_of(4))
        {
            return Err(ConfigError::invalid(
                "model.embed_dim",
                "the image path (num_frames: 1) needs widths divisible by 4 for its 2-D tables",
            ));
        }
        if m.objective == vjepa_model::Objective::Pixel {
            self.validate_pixel()?;
            if r.outputs.features {
                return Err(ConfigError::invalid(
                    "outputs.features",
                    "needs objective vjepa: the features are the target encoder's, and the pixel \
                     objective has none (use `vjepa extract` on its checkpoints)",
                ));
            }
        }

        let o = &r.optimization;
        if o.ipe == Some(0) {
            return Err(ConfigError::invalid("optimization.ipe", "must be positive"));
        }
        if o.epochs == 0 {
            return Err(ConfigError::invalid(
                "optimization.epochs",
                "must be positive",
            ));
        }
        for (key, v) in [
            ("optimization.ipe_scale", o.ipe_scale),
            ("optimization.lr", o.lr),
            ("optimization.eps", o.eps),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(ConfigError::invalid(key, "must be a positive number"));
            }
        }
        for (key, v) in [
            ("optimization.warmup", o.warmup),
            ("optimization.start_lr", o.start_lr),
            ("optimization.final_lr", o.final_lr),
            ("optimization.weight_decay", o.weight_decay),
            ("optimization.final_weight_decay", o.final_weight_decay),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(ConfigError::invalid(key, "must be a non-negative number"));
            }
        }
        if let Some(c) = o.clip_grad
            && !(c.is_finite() && c > 0.0)
        {
            return Err(ConfigError::invalid(
                "optimization.clip_grad",
                "must be positive or null",
            ));
        }
        range("optimization.ema", o.ema, 0.0, 1.0)?;
        for (i, b) in o.betas.iter().enumerate() {
            if !(0.0..1.0).contains(b) {
                return Err(ConfigError::invalid(
                    &format!("optimization.betas[{i}]"),
                    "must be in [0, 1)",
                ));
            }
        }
        if o.max_steps == Some(0) {
            return Err(ConfigError::invalid(
                "optimization.max_steps",
                "must be positive",
            ));
        }

        match (r.outputs.dir.as_deref(), r.logging.folder.as_deref()) {
            (None, None) => {
                return Err(ConfigError::invalid(
                    "outputs.dir",
                    "set outputs.dir (or logging.folder) to a local path or object-store URL",
                ));
            }
            (Some(d), _) if d.trim().is_empty() => {
                return Err(ConfigError::invalid(
                    "outputs.dir",
                    "is empty: set a local path or object-store URL",
                ));
            }
            (None, Some(f)) if f.trim().is_empty() => {
                return Err(ConfigError::invalid(
                    "logging.folder",
                    "is empty (and outputs.dir is not set): set a local path or object-store URL",
                ));
            }
            _ => {}
        }
        positive(
            "outputs.metrics_flush_every",
            r.outputs.metrics_flush_every as usize,
        )?;
        positive("outputs.log_every", r.outputs.log_every as usize)?;
        positive("workers.count", r.workers.count)?;
        if r.workers.max_clips_in_flight == Some(0) {
            return Err(ConfigError::invalid(
                "workers.max_clips_in_flight",
                "must be positive",
            ));
        }
        if r.workers.decode_threads == Some(0) {
            return Err(ConfigError::invalid(
                "workers.decode_threads",
                "must be positive",
            ));
        }
        if !(r.workers.decode_deadline_secs.is_finite() && r.workers.decode_deadline_secs > 0.0) {
            return Err(ConfigError::invalid(
                "workers.decode_deadline_secs",
                "must be a positive number of seconds",
            ));
        }
        positive(
            "workers.max_attempts_per_clip",
            r.workers.max_attempts_per_clip,
        )?;
        self.device()?;
        self.video_decoder()?;
        self.attention()?;
        self.validate_cluster()
    }

    /// The compute device of `workers.device` (refused, naming the key, when it is not `cpu`,
    /// `cuda` or `cuda:N`, or is CUDA in a build without the `cuda` feature).
    pub fn device(&self) -> Result<ComputeDevice, ConfigError> {
        let device = ComputeDevice::parse(&self.raw.workers.device)
            .map_err(|e| ConfigError::invalid("workers.device (--device)", e.to_string()))?;
        // Worker threads of one process share its GPU: replicas of the model on one device
        // gain nothing, and candle's matmuls would share one cuBLAS handle across threads.
        if device.is_cuda() && self.raw.workers.count > 1 {
            return Err(ConfigError::invalid(
                "workers.count",
                format!(
                    "{} worker threads would share {device}: a GPU takes one worker (set \
                     workers.count: 1; its decode threads are workers.decode_threads)",
                    self.raw.workers.count
                ),
            ));
        }
        Ok(device)
    }

    /// The video decoders of `workers.video_decoder` (a wrong name is refused naming the key;
    /// whether NVDEC exists on this machine is checked by the job before any work, as
    /// [`vjepa_ingest::check_video_decoder`]).
    pub fn video_decoder(&self) -> Result<vjepa_ingest::VideoDecoderKind, ConfigError> {
        self.raw
            .workers
            .video_decoder
            .parse()
            .map_err(|e: String| ConfigError::invalid("workers.video_decoder", e))
    }

    /// The GPU attention implementation of `workers.attention` (a wrong name is refused naming
    /// the key; whether cuDNN can run here is checked before any work by
    /// [`vjepa_model::kernels::check_attention_backend`]).
    pub fn attention(&self) -> Result<vjepa_model::kernels::AttentionBackend, ConfigError> {
        let name = &self.raw.workers.attention;
        vjepa_model::kernels::AttentionBackend::parse(name).ok_or_else(|| {
            ConfigError::invalid(
                "workers.attention",
                format!(
                    "{name:?} is not one of {}",
                    vjepa_model::kernels::AttentionBackend::NAMES.join(", ")
                ),
            )
        })
    }

    /// Head dims of every attention the model runs (encoder, predictor), for
    /// [`vjepa_model::kernels::check_attention_backend`].
    pub fn attention_head_dims(&self) -> Vec<usize> {
        let (e, p) = (self.encoder_config(), self.predictor_config());
        vec![
            e.embed_dim / e.num_heads.max(1),
            p.embed_dim / p.num_heads.max(1),
        ]
    }

    /// The dtype training computes in: bf16 (mixed precision, f32 master weights) when
    /// `meta.dtype` is bfloat16 and the device is a GPU; f32 otherwise — on the CPU, whose
    /// kernels are f32, and for the pixel objective, which has no mixed-precision path.
    pub fn compute_dtype(&self, device: ComputeDevice) -> vjepa_model::DType {
        if self.bf16_requested()
            && device.is_cuda()
            && self.raw.model.objective == vjepa_model::Objective::Vjepa
        {
            vjepa_model::DType::BF16
        } else {
            vjepa_model::DType::F32
        }
    }

    /// Whether `meta.dtype` asks for bfloat16 (as the official presets do).
    pub fn bf16_requested(&self) -> bool {
        matches!(self.raw.meta.dtype.as_deref(), Some("bfloat16" | "bf16"))
    }

    /// Command-line values that replace config keys (`train`'s flags), checked as the
    /// config's own values are: an error names the key and the flag that set it.
    pub fn apply_flags(
        &mut self,
        flags: &[(&str, &str)],
        set: impl FnOnce(&mut RawConfig),
    ) -> Result<(), ConfigError> {
        set(&mut self.raw);
        self.validate().map_err(|e| match e {
            ConfigError::Invalid { key, message } | ConfigError::Parse { key, message } => {
                let flag = flags
                    .iter()
                    .find(|(k, _)| {
                        key == *k
                            || key.starts_with(&format!("{k}["))
                            || key.starts_with(&format!("{k}."))
                    })
                    .map(|(_, f)| *f);
                let message = match flag {
                    Some(f) => format!("{message} (set by {f})"),
                    None => message,
                };
                ConfigError::Invalid { key, message }
            }
            other => other,
        })
    }

    /// `--device`: replaces `workers.device`, checked as the config's value is.
    pub fn apply_device_flag(&mut self, device: Option<String>) -> Result<(), ConfigError> {
        if let Some(d) = device {
            self.raw.workers.device = d;
        }
        self.device().map(|_| ())
    }

    /// `cluster.*`: a process number within the job and, for several processes, a hostfile.
    fn validate_cluster(&self) -> Result<(), ConfigError> {
        let c = &self.raw.cluster;
        positive("cluster.processes (--processes)", c.processes)?;
        if !(c.connect_timeout_secs.is_finite() && c.connect_timeout_secs > 0.0) {
            return Err(ConfigError::invalid(
                "cluster.connect_timeout_secs",
                "must be a positive number of seconds",
            ));
        }
        if c.process >= c.processes {
            return Err(ConfigError::invalid(
                "cluster.process (--process)",
                format!(
                    "process {} does not exist in a job of {} process(es) (0..{})",
                    c.process, c.processes, c.processes
                ),
            ));
        }
        if c.processes > 1 && c.hostfile.is_none() {
            return Err(ConfigError::invalid(
                "cluster.hostfile (--hostfile)",
                format!(
                    "{} processes need a hostfile: one host:port per line, line i for process i",
                    c.processes
                ),
            ));
        }
        Ok(())
    }

    /// Applies the `vjepa train` / `check-config` cluster flags and validates the result.
    pub fn apply_cluster_flags(
        &mut self,
        processes: Option<usize>,
        process: Option<usize>,
        hostfile: Option<String>,
    ) -> Result<(), ConfigError> {
        let c = &mut self.raw.cluster;
        if let Some(n) = processes {
            c.processes = n;
        }
        if let Some(i) = process {
            c.process = i;
        }
        if hostfile.is_some() {
            c.hostfile = hostfile;
        }
        self.validate_cluster()
    }

    /// The processes' addresses from `cluster.hostfile` (empty for a single process without
    /// one): exactly `cluster.processes` non-empty lines of `host:port`.
    pub fn cluster_addresses(&self) -> Result<Vec<String>, ConfigError> {
        let c = &self.raw.cluster;
        let Some(path) = &c.hostfile else {
            return Ok(Vec::new());
        };
        let key = "cluster.hostfile (--hostfile)";
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::invalid(key, format!("cannot read {path}: {e}")))?;
        let lines: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        if lines.len() != c.processes {
            return Err(ConfigError::invalid(
                key,
                format!(
                    "{path} has {} address line(s), the job has {} process(es): one host:port per process",
                    lines.len(),
                    c.processes
                ),
            ));
        }
        for (i, line) in lines.iter().enumerate() {
            let ok = line
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !ok {
                return Err(ConfigError::invalid(
                    key,
                    format!("{path} line {} `{line}` is not host:port", i + 1),
                ));
            }
        }
        Ok(lines.into_iter().map(str::to_string).collect())
    }

    /// `model.pixel` against the encoder's grid (called for `objective: pixel` only).
    fn validate_pixel(&self) -> Result<(), ConfigError> {
        let p = &self.raw.model.pixel;
        let (t, h, w) = self.encoder_config().grid();
        vjepa_operators::masking::TubeMaskGenerator::new(
            p.mask_ratio,
            vjepa_operators::masking::Grid { t, h, w },
        )
        .map_err(|e| ConfigError::invalid("model.pixel.mask_ratio", e.to_string()))?;
        positive("model.pixel.decoder_dim", p.decoder_dim)?;
        if p.decoder_heads == Some(0) {
            return Err(ConfigError::invalid(
                "model.pixel.decoder_heads",
                "must be positive",
            ));
        }
        let pix = self.pixel_config();
        if !pix.decoder_dim.is_multiple_of(pix.decoder_heads) {
            return Err(ConfigError::invalid(
                if p.decoder_heads.is_some() {
                    "model.pixel.decoder_heads"
                } else {
                    "model.pixel.decoder_dim"
                },
                format!(
                    "decoder width {} is not divisible by {} heads",
                    pix.decoder_dim, pix.decoder_heads
                ),
            ));
        }
        pix.validate(&self.encoder_config())
            .map_err(|e| ConfigError::invalid("model.pixel.decoder_dim", e.to_string()))
    }

    /// The pixel objective's decoder shape (`model.pixel`).
    pub fn pixel_config(&self) -> vjepa_model::PixelConfig {
        let p = &self.raw.model.pixel;
        vjepa_model::PixelConfig {
            decoder_dim: p.decoder_dim,
            decoder_depth: p.decoder_depth,
            decoder_heads: p
                .decoder_heads
                .unwrap_or_else(|| self.encoder_config().num_heads),
            norm_pix: p.norm_pix,
        }
    }

    /// The encoder shape: the named preset with our optional overrides.
    pub fn encoder_config(&self) -> vjepa_model::EncoderConfig {
        let d = &self.raw.data;
        let m = &self.raw.model;
        let mut enc = vjepa_model::EncoderConfig::preset(
            &m.model_name,
            d.num_frames,
            d.crop_size,
            d.patch_size,
            d.tubelet_size,
            m.uniform_power,
        )
        .unwrap_or_else(|| {
            // validate() refuses unknown names before this is reachable; fall back to tiny.
            vjepa_model::EncoderConfig::preset(
                "vit_tiny",
                d.num_frames,
                d.crop_size,
                d.patch_size,
                d.tubelet_size,
                m.uniform_power,
            )
            .expect("vit_tiny is a preset")
        });
        if let Some(w) = m.embed_dim {
            let ratio = enc.mlp_hidden as f64 / enc.embed_dim as f64;
            enc.embed_dim = w;
            enc.mlp_hidden = (w as f64 * ratio).round() as usize;
        }
        if let Some(depth) = m.depth {
            enc.depth = depth;
        }
        if let Some(h) = m.num_heads {
            enc.num_heads = h;
        }
        enc
    }

    /// The predictor shape (spec §4: heads = encoder heads, two mask tokens per mask config).
    pub fn predictor_config(&self) -> vjepa_model::PredictorConfig {
        vjepa_model::PredictorConfig {
            embed_dim: self.raw.model.pred_embed_dim,
            depth: self.raw.model.pred_depth,
            num_heads: self.encoder_config().num_heads,
            num_mask_tokens: self.raw.mask.len(),
        }
    }

    /// Iterations per epoch, falling back to the corpus size when the config has none.
    pub fn iterations_per_epoch(&self, num_videos: usize) -> u64 {
        self.raw.optimization.ipe.unwrap_or_else(|| {
            (num_videos as u64)
                .div_ceil(self.raw.data.batch_size as u64)
                .max(1)
        })
    }

    /// Optimiser and schedule settings in steps (spec §7).
    pub fn optim_config(&self, ipe: u64) -> vjepa_model::OptimConfig {
        let o = &self.raw.optimization;
        let warmup_steps = (o.warmup * ipe as f64) as u64;
        vjepa_model::OptimConfig {
            start_lr: o.start_lr,
            lr: o.lr,
            final_lr: o.final_lr,
            warmup_steps,
            total_steps: (o.ipe_scale * o.epochs as f64 * ipe as f64) as u64,
            weight_decay: o.weight_decay,
            final_weight_decay: o.final_weight_decay,
            ema: (o.ema[0], o.ema[1]),
            clip_grad: o.clip_grad,
            clip_start_iteration: (o.warmup.floor() as u64 + 1) * ipe,
            betas: (o.betas[0], o.betas[1]),
            eps: o.eps,
            loss_exp: self.raw.loss.loss_exp,
            reg_coeff: self.raw.loss.reg_coeff,
        }
    }

    /// Steps this run takes: `epochs × ipe`, capped by `optimization.max_steps`.
    pub fn total_steps(&self, ipe: u64) -> u64 {
        let full = self.raw.optimization.epochs * ipe;
        match self.raw.optimization.max_steps {
            Some(m) => m.min(full),
            None => full,
        }
    }

    /// Where outputs go: `outputs.dir`, else the official `logging.folder`.
    pub fn output_dir(&self) -> Option<&str> {
        self.raw
            .outputs
            .dir
            .as_deref()
            .or(self.raw.logging.folder.as_deref())
    }

    /// Clips requested but not yet trained on, per worker.
    /// Decoding threads per worker: `workers.decode_threads`, else the cores per worker.
    pub fn decode_threads(&self) -> usize {
        self.raw.workers.decode_threads.unwrap_or_else(|| {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            (cores / self.raw.workers.count.max(1)).max(1)
        })
    }

    pub fn max_clips_in_flight(&self) -> usize {
        self.raw
            .workers
            .max_clips_in_flight
            .unwrap_or(2 * self.raw.data.batch_size)
    }

    /// Augmentation settings for the clip transform.
    pub fn augment(&self) -> vjepa_operators::transform::AugmentConfig {
        let a = &self.raw.data_aug;
        vjepa_operators::transform::AugmentConfig {
            scale: (a.random_resize_scale[0], a.random_resize_scale[1]),
            aspect_ratio: (
                a.random_resize_aspect_ratio[0],
                a.random_resize_aspect_ratio[1],
            ),
            crop_size: self.raw.data.crop_size,
        }
    }

    /// The `data_aug` options that work on the decoded frames (`auto_augment`,
    /// `motion_shift`, `reprob`), as the official pretraining `VideoTransform` applies them;
    /// `None` when all are off (the released configs), and clips take the direct crop path.
    pub fn train_augment(&self) -> Option<vjepa_operators::train_augment::TrainAugment> {
        let a = &self.raw.data_aug;
        (a.auto_augment || a.motion_shift || a.reprob > 0.0).then(|| {
            vjepa_operators::train_augment::TrainAugment::pretrain(
                self.augment(),
                a.auto_augment,
                a.motion_shift,
                a.reprob,
            )
        })
    }

    /// Mask generator settings, one per `mask` entry.
    pub fn mask_configs(&self) -> Vec<vjepa_operators::masking::MaskConfig> {
        self.raw
            .mask
            .iter()
            .map(|m| vjepa_operators::masking::MaskConfig {
                num_blocks: m.num_blocks,
                spatial_scale: (m.spatial_scale[0], m.spatial_scale[1]),
                temporal_scale: (m.temporal_scale[0], m.temporal_scale[1]),
                aspect_ratio: (m.aspect_ratio[0], m.aspect_ratio[1]),
                max_temporal_keep: m.max_temporal_keep,
                max_keep: m.max_keep,
            })
            .collect()
    }

    /// How clips are spread over datasets: `data.datasets_weights`, else uniform over videos.
    pub fn mixing(&self) -> vjepa_operators::sampler::Mixing {
        match &self.raw.data.datasets_weights {
            Some(w) => vjepa_operators::sampler::Mixing::Weighted(w.clone()),
            None => vjepa_operators::sampler::Mixing::Uniform,
        }
    }

    /// S3 connection settings (not secrets).
    pub fn s3_settings(&self) -> vjepa_storage::S3Settings {
        let s = &self.raw.storage.s3;
        vjepa_storage::S3Settings {
            endpoint: s.endpoint.clone(),
            region: s.region.clone(),
            allow_http: s.allow_http,
            max_retries: s.max_retries,
            retry_timeout_secs: s.retry_timeout_secs,
            request_timeout_secs: s.request_timeout_secs,
            metadata_endpoint: s.metadata_endpoint.clone(),
        }
    }
}

fn unknown_field_name(message: &str) -> Option<String> {
    // serde_yaml may put the parent's path before its message ("data: duplicate field ...").
    let rest = ["unknown field `", "duplicate field `"]
        .iter()
        .find_map(|p| message.find(p).map(|at| &message[at + p.len()..]))?;
    let end = rest.find('`')?;
    Some(rest[..end].to_string())
}

fn positive(key: &str, v: usize) -> Result<(), ConfigError> {
    if v == 0 {
        Err(ConfigError::invalid(key, "must be positive"))
    } else {
        Ok(())
    }
}

fn range(key: &str, r: [f64; 2], lo: f64, hi: f64) -> Result<(), ConfigError> {
    if !(r[0].is_finite() && r[1].is_finite() && r[0] <= r[1] && r[0] >= lo && r[1] <= hi) {
        // The open-ended bounds in words, not as 300-digit floats.
        let within = match (lo == f64::MIN_POSITIVE, hi == f64::MAX) {
            (true, true) => "of positive numbers".to_string(),
            (true, false) => format!("within (0, {hi}]"),
            (false, true) => format!("of numbers from {lo}"),
            (false, false) => format!("within [{lo}, {hi}]"),
        };
        return Err(ConfigError::invalid(
            key,
            format!(
                "[{}, {}] is not an ordered range {within} (min first)",
                r[0], r[1]
            ),
        ));
    }
    Ok(())
}

/// Official keys that are present but not acted on, with the reason.
fn ignored_keys(r: &RawConfig) -> Vec<(String, &'static str)> {
    let mut out = Vec::new();
    let mut note = |present: bool, key: &str, why: &'static str| {
        if present {
            out.push((key.to_string(), why));
        }
    };
    note(
        r.nodes.is_some(),
        "nodes",
        "SLURM sizing; use --workers and cluster options",
    );
    note(
        r.tasks_per_node.is_some(),
        "tasks_per_node",
        "SLURM sizing; use --workers and cluster options",
    );
    note(
        r.data.decode_one_clip.is_some(),
        "data.decode_one_clip",
        "unused by the official trainer too",
    );
    note(
        r.data.pin_mem.is_some(),
        "data.pin_mem",
        "CUDA loader setting; no effect on this backend",
    );
    note(
        r.data.num_workers.is_some(),
        "data.num_workers",
        "decode parallelism is workers.decode_threads",
    );
    note(
        r.data.log_resource_utilization.is_some(),
        "data.log_resource_utilization",
        "resource use is logged by the job itself",
    );
    note(
        r.logging.write_tag.is_some(),
        "logging.write_tag",
        "outputs have fixed names (metrics.parquet, checkpoints/step-N.safetensors)",
    );
    note(
        r.meta.eval_freq.is_some(),
        "meta.eval_freq",
        "unused by the official trainer too",
    );
    note(
        r.meta.use_sdpa.is_some(),
        "meta.use_sdpa",
        "attention kernel is chosen by the backend",
    );
    note(
        r.meta
            .dtype
            .as_deref()
            .is_some_and(|d| matches!(d, "float16" | "fp16")),
        "meta.dtype",
        "float16 compute is not implemented (bfloat16 on CUDA, or float32); computing in float32",
    );
    note(
        r.meta.save_every_freq.is_some(),
        "meta.save_every_freq",
        "use outputs.checkpoint_every",
    );
    note(
        r.meta.skip_batches.is_some(),
        "meta.skip_batches",
        "not implemented",
    );
    let pixel = r.model.objective == vjepa_model::Objective::Pixel;
    note(
        pixel && !r.mask.is_empty(),
        "mask",
        "objective pixel uses tube masking (model.pixel.mask_ratio)",
    );
    note(
        pixel,
        "model.pred_depth",
        "objective pixel has a decoder instead (model.pixel)",
    );
    note(
        pixel,
        "model.pred_embed_dim",
        "objective pixel has a decoder instead (model.pixel)",
    );
    note(
        pixel,
        "optimization.ema",
        "objective pixel has no target encoder",
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) const OFFICIAL_VITL16: &str = include_str!("../../configs/vitl16.yaml");

    #[test]
    fn official_preset_parses_and_reports_ignored_keys() {
        let cfg = JobConfig::parse(OFFICIAL_VITL16).expect("official vitl16 parses");
        let keys: Vec<&str> = cfg.ignored.iter().map(|(k, _)| k.as_str()).collect();
        assert!(keys.contains(&"nodes"), "{keys:?}");
        assert!(keys.contains(&"data.pin_mem"), "{keys:?}");
        let enc = cfg.encoder_config();
        assert_eq!(enc.embed_dim, 1024);
        assert_eq!(enc.depth, 24);
        let o = cfg.optim_config(300);
        assert_eq!(o.warmup_steps, 12_000);
        assert_eq!(o.total_steps, 112_500);
        assert_eq!(o.clip_start_iteration, 12_300);
        assert_eq!(cfg.total_steps(300), 90_000);
    }

    /// `workers.device`: cpu by default; a wrong name, or CUDA in a build without the `cuda`
    /// feature, is refused naming the key, from the config and from `--device` alike.
    #[test]
    fn attention_name_is_checked() {
        use vjepa_model::kernels::AttentionBackend;
        let cfg = JobConfig::parse(OFFICIAL_VITL16).unwrap();
        assert_eq!(cfg.attention().unwrap(), AttentionBackend::Auto);
        let with = |a: &str| format!("{OFFICIAL_VITL16}\nworkers:\n  attention: {a}\n");
        for b in [AttentionBackend::Cudnn, AttentionBackend::Own] {
            let cfg = JobConfig::parse(&with(b.as_str())).unwrap();
            assert_eq!(cfg.attention().unwrap(), b);
        }
        let err = JobConfig::parse(&with("flash3")).unwrap_err();
        assert_eq!(err.key(), Some("workers.attention"), "{err}");
        assert!(err.to_string().contains("auto, cudnn, own"), "{err}");
    }

    #[test]
    fn video_decoder_name_is_checked() {
        let cfg = JobConfig::parse(OFFICIAL_VITL16).unwrap();
        assert_eq!(
            cfg.video_decoder().unwrap(),
            vjepa_ingest::VideoDecoderKind::Software
        );
        let with = |d: &str| format!("{OFFICIAL_VITL16}\nworkers:\n  video_decoder: {d}\n");
        let nv = JobConfig::parse(&with("nvdec")).unwrap();
        assert_eq!(
            nv.video_decoder().unwrap(),
            vjepa_ingest::VideoDecoderKind::Nvdec
        );
        let err = JobConfig::parse(&with("vaapi")).unwrap_err();
        assert_eq!(err.key(), Some("workers.video_decoder"), "{err}");
        assert!(err.to_string().contains("software, nvdec"), "{err}");
    }

    #[test]
    fn device_is_checked_before_any_work() {
        let cfg = JobConfig::parse(OFFICIAL_VITL16).unwrap();
        assert_eq!(cfg.device().unwrap(), ComputeDevice::Cpu);
        let with = |d: &str| format!("{OFFICIAL_VITL16}\nworkers:\n  device: \"{d}\"\n");
        let err = JobConfig::parse(&with("gpu0")).unwrap_err();
        assert_eq!(err.key(), Some("workers.device (--device)"), "{err}");
        assert!(err.to_string().contains("cpu, cuda or cuda:N"), "{err}");
        let cuda = JobConfig::parse(&with("cuda:1"));
        assert_eq!(cuda.is_ok(), vjepa_model::device::CUDA_BUILT);
        match cuda {
            Ok(c) => assert_eq!(c.device().unwrap(), ComputeDevice::Cuda(1)),
            Err(e) => {
                assert_eq!(e.key(), Some("workers.device (--device)"), "{e}");
                assert!(e.to_string().contains("`cuda` feature"), "{e}");
            }
        }
        // A GPU takes one worker thread (checked where the device parses: a `cuda` build).
        let two = JobConfig::parse(&format!(
            "{OFFICIAL_VITL16}\nworkers:\n  device: cuda\n  count: 2\n"
        ));
        if vjepa_model::device::CUDA_BUILT {
            let e = two.unwrap_err();
            assert_eq!(e.key(), Some("workers.count"), "{e}");
            assert!(e.to_string().contains("a GPU takes one worker"), "{e}");
        } else {
            assert!(two.is_err());
        }
        let mut cfg = JobConfig::parse(OFFICIAL_VITL16).unwrap();
        let err = cfg.apply_device_flag(Some("tpu".into())).unwrap_err();
        assert_eq!(err.key(), Some("workers.device (--device)"), "{err}");
        cfg.apply_device_flag(Some("cpu".into())).unwrap();
        cfg.apply_device_flag(None).unwrap();
        assert_eq!(cfg.device().unwrap(), ComputeDevice::Cpu);
    }

    /// `meta.dtype: bfloat16` (the official presets') trains in bf16 on a GPU only; the CPU
    /// and the pixel objective compute in f32; float16 is reported as ignored.
    #[test]
    fn compute_dtype_follows_meta_dtype_on_the_gpu() {
        use vjepa_model::DType;
        let cfg = JobConfig::parse(OFFICIAL_VITL16).unwrap();
        assert_eq!(cfg.raw.meta.dtype.as_deref(), Some("bfloat16"));
        assert!(!cfg.ignored.iter().any(|(k, _)| k == "meta.dtype"));
        assert_eq!(cfg.compute_dtype(ComputeDevice::Cpu), DType::F32);
        assert_eq!(cfg.compute_dtype(ComputeDevice::Cuda(0)), DType::BF16);
        let f32 = JobConfig::parse(&OFFICIAL_VITL16.replace("dtype: bfloat16", "dtype: float32"))
            .unwrap();
        assert_eq!(f32.compute_dtype(ComputeDevice::Cuda(0)), DType::F32);
        let f16 = JobConfig::parse(&OFFICIAL_VITL16.replace("dtype: bfloat16", "dtype: float16"))
            .unwrap();
        assert!(f16.ignored.iter().any(|(k, _)| k == "meta.dtype"));
        assert_eq!(f16.compute_dtype(ComputeDevice::Cuda(0)), DType::F32);
    }

    #[test]
    fn misspelt_key_is_named() {
        let text = OFFICIAL_VITL16.replace("batch_size:", "bach_size:");
        let err = JobConfig::parse(&text).unwrap_err();
        assert_eq!(err.key(), Some("data.bach_size"), "{err}");
    }

    #[test]
    fn misspelt_top_level_key_is_named() {
        let text = OFFICIAL_VITL16.replace("optimization:", "optimisation:");
        let err = JobConfig::parse(&text).unwrap_err();
        assert_eq!(err.key(), Some("optimisation"), "{err}");
    }

    #[test]
    fn string_for_number_is_named() {
        let text = OFFICIAL_VITL16.replace("lr: 0.000625", "lr: fast");
        let err = JobConfig::parse(&text).unwrap_err();
        assert_eq!(err.key(), Some("optimization.lr"), "{err}");
    }

    #[test]
    fn nested_mask_type_error_is_named() {
        let text = OFFICIAL_VITL16.replace("num_blocks: 8", "num_blocks: eight");
        let err = JobConfig::parse(&text).unwrap_err();
        assert_eq!(err.key(), Some("mask[0].num_blocks"), "{err}");
    }

    #[test]
    fn semantic_errors_name_the_key() {
        let text = OFFICIAL_VITL16.replace("model_name: vit_large", "model_name: vit_enormous");
        let err = JobConfig::parse(&text).unwrap_err();
        assert_eq!(err.key(), Some("model.model_name"), "{err}");
        let text = OFFICIAL_VITL16.replace("crop_size: 224", "crop_size: 230");
        let err = JobConfig::parse(&text).unwrap_err();
        assert_eq!(err.key(), Some("data.crop_size"), "{err}");
    }

    /// `data_aug`'s frame augmentations: off in the released configs (clips take the direct
    /// crop path); each turns on the whole-frame path with the official options; a `reprob`
    /// that is not a probability is refused naming the key.
    #[test]
    fn data_aug_frame_augmentations() {
        let cfg = JobConfig::parse(OFFICIAL_VITL16).unwrap();
        assert!(cfg.train_augment().is_none());
        let on = OFFICIAL_VITL16
            .replace("auto_augment: false", "auto_augment: true")
            .replace("motion_shift: false", "motion_shift: true")
            .replace("reprob: 0.0", "reprob: 0.25");
        let a = JobConfig::parse(&on).unwrap().train_augment().unwrap();
        assert!(a.rand_augment.is_some() && a.motion_shift && a.flip);
        assert_eq!(a.erasing.map(|e| e.probability), Some(0.25));
        assert_eq!(a.crop, cfg.augment());
        let erase_only = OFFICIAL_VITL16.replace("reprob: 0.0", "reprob: 1.0");
        let a = JobConfig::parse(&erase_only)
            .unwrap()
            .train_augment()
            .unwrap();
        assert!(a.rand_augment.is_none() && !a.motion_shift && a.erasing.is_some());
        for bad in ["1.5", "-0.1", ".nan"] {
            let text = OFFICIAL_VITL16.replace("reprob: 0.0", &format!("reprob: {bad}"));
            let err = JobConfig::parse(&text).unwrap_err();
            assert_eq!(err.key(), Some("data_aug.reprob"), "{bad}: {err}");
        }
    }

    #[test]
    fn variance_regulariser_coefficient() {
        let text = OFFICIAL_VITL16.replace("reg_coeff: 0.0", "reg_coeff: 0.5");
        let cfg = JobConfig::parse(&text).expect("reg_coeff 0.5 parses");
        assert_eq!(cfg.optim_config(300).reg_coeff, 0.5);
        let text = OFFICIAL_VITL16.replace("reg_coeff: 0.0", "reg_coeff: -1.0");
        let err = JobConfig::parse(&text).unwrap_err();
        assert_eq!(err.key(), Some("loss.reg_coeff"), "{err}");
        let text = OFFICIAL_VITL16
            .replace("reg_coeff: 0.0", "reg_coeff: 0.5")
            .replace("model:\n", "model:\n  objective: pixel\n");
        let err = JobConfig::parse(&text).unwrap_err();
        assert_eq!(err.key(), Some("loss.reg_coeff"), "{err}");
    }

    #[test]
    fn image_path_num_frames_one() {
        // tubelet_size stays 2 as in the official configs; images ignore it
        let text = OFFICIAL_VITL16.replace("num_frames: 16", "num_frames: 1");
        let cfg = JobConfig::parse(&text).expect("num_frames 1 parses");
        let enc = cfg.encoder_config();
        assert!(enc.is_image());
        assert_eq!(enc.grid(), (1, 14, 14));
        enc.validate().unwrap();
        let text = OFFICIAL_VITL16.replace("num_frames: 16", "num_frames: 3");
        let err = JobConfig::parse(&text).unwrap_err();
        assert_eq!(err.key(), Some("data.num_frames"), "{err}");
    }

    #[test]
    fn telemetry_listen_and_linger() {
        let cfg = JobConfig::parse(OFFICIAL_VITL16).unwrap();
        assert_eq!(cfg.raw.telemetry.listen.as_deref(), Some("127.0.0.1:9464"));
        assert_eq!(cfg.raw.telemetry.linger_secs, 30.0);
        let text = format!("{OFFICIAL_VITL16}\ntelemetry:\n  listen: null\n");
        assert_eq!(JobConfig::parse(&text).unwrap().raw.telemetry.listen, None);
        let text = format!("{OFFICIAL_VITL16}\ntelemetry:\n  listen: 0.0.0.0:0\n");
        assert_eq!(
            JobConfig::parse(&text)
                .unwrap()
                .raw
                .telemetry
                .listen
                .as_deref(),
            Some("0.0.0.0:0")
        );
        for (key, bad) in [
            ("telemetry.listen", "  listen: localhost"),
            ("telemetry.listen", "  listen: 127.0.0.1"),
            ("telemetry.linger_secs", "  linger_secs: -1"),
        ] {
            let text = format!("{OFFICIAL_VITL16}\ntelemetry:\n{bad}\n");
            let err = JobConfig::parse(&text).unwrap_err();
            assert_eq!(err.key(), Some(key), "{err}");
        }
    }

    #[test]
    fn connect_timeout_must_be_positive() {
        let cfg = JobConfig::parse(OFFICIAL_VITL16).unwrap();
        assert_eq!(cfg.raw.cluster.connect_timeout_secs, 600.0);
        for bad in ["0", "-1", ".nan"] {
            let text = format!("{OFFICIAL_VITL16}\ncluster:\n  connect_timeout_secs: {bad}\n");
            let err = JobConfig::parse(&text).unwrap_err();
            assert_eq!(
                err.key(),
                Some("cluster.connect_timeout_secs"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn empty_output_locations_are_refused() {
        let text = format!("{OFFICIAL_VITL16}\noutputs:\n  dir: \"\"\n");
        let err = JobConfig::parse(&text).unwrap_err();
        assert_eq!(err.key(), Some("outputs.dir"), "{err}");
        let text = OFFICIAL_VITL16.replace("  folder: ", "  folder: \"\"\n  unused: ");
        let text: String = text
            .lines()
            .filter(|l| !l.starts_with("  unused: "))
            .map(|l| format!("{l}\n"))
            .collect();
        let err = JobConfig::parse(&text).unwrap_err();
        assert_eq!(err.key(), Some("logging.folder"), "{err}");
    }

    #[test]
    fn credentials_in_locations_are_refused_unechoed() {
        let text = OFFICIAL_VITL16.replace(
            "/your_path_to_ssv2_csv_file_index.csv",
            "s3://AKIDX:hunter2@bucket/ssv2.csv",
        );
        let err = JobConfig::parse(&text).unwrap_err();
        assert_eq!(err.key(), Some("data.datasets[1]"), "{err}");
        assert!(!err.to_string().contains("hunter2"), "{err}");
        let text = format!("{OFFICIAL_VITL16}\noutputs:\n  dir: s3://b/runs/?sig=hunter2\n");
        let err = JobConfig::parse(&text).unwrap_err();
        assert_eq!(err.key(), Some("outputs.dir"), "{err}");
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }

    #[test]
    fn flags_are_checked_as_the_keys_they_set() {
        let mut cfg = JobConfig::parse(OFFICIAL_VITL16).unwrap();
        let err = cfg
            .apply_flags(&[("optimization.max_steps", "--max-steps")], |r| {
                r.optimization.max_steps = Some(0)
            })
            .unwrap_err();
        assert_eq!(err.key(), Some("optimization.max_steps"), "{err}");
        assert!(err.to_string().contains("(set by --max-steps)"), "{err}");
        let weighed = OFFICIAL_VITL16.replace(
            "  datasets:\n",
            "  datasets_weights: [0.335, 0.1, 0.565]\n  datasets:\n",
        );
        let mut cfg = JobConfig::parse(&weighed).unwrap();
        let flags = [
            ("data.datasets", "--dataset"),
            ("data.datasets_weights", "--dataset"),
        ];
        // Three weights: two datasets from the command line do not fit.
        let err = cfg
            .apply_flags(&flags, |r| r.data.datasets = vec!["a/".into(), "b/".into()])
            .unwrap_err();
        assert_eq!(err.key(), Some("data.datasets_weights"), "{err}");
        assert!(err.to_string().contains("(set by --dataset)"), "{err}");
        let mut cfg = JobConfig::parse(OFFICIAL_VITL16).unwrap();
        cfg.apply_flags(&[("meta.seed", "--seed")], |r| r.meta.seed = 7)
            .unwrap();
        assert_eq!(cfg.raw.meta.seed, 7);
    }

    #[test]
    fn metadata_endpoint_is_a_plain_http_host() {
        for bad in [
            "https://169.254.169.254",
            "http://k:s@169.254.169.254",
            "http://h/x?y",
        ] {
            let text =
                format!("{OFFICIAL_VITL16}\nstorage:\n  s3:\n    metadata_endpoint: {bad}\n");
            let err = JobConfig::parse(&text).unwrap_err();
            assert_eq!(err.key(), Some("storage.s3.metadata_endpoint"), "{err}");
            assert!(!err.to_string().contains("k:s"), "{err}");
        }
        let text = format!(
            "{OFFICIAL_VITL16}\nstorage:\n  s3:\n    metadata_endpoint: http://127.0.0.1:1338\n"
        );
        let cfg = JobConfig::parse(&text).unwrap();
        assert_eq!(
            cfg.s3_settings().metadata_endpoint.as_deref(),
            Some("http://127.0.0.1:1338")
        );
    }

    #[test]
    fn catalog_refresh_and_weights() {
        let cfg = JobConfig::parse(OFFICIAL_VITL16).unwrap();
        assert_eq!(cfg.raw.catalog.refresh_secs, 60.0);
        assert_eq!(cfg.mixing(), vjepa_operators::sampler::Mixing::Uniform);
        for bad in ["0", "-1", ".nan"] {
            let text = format!("{OFFICIAL_VITL16}\ncatalog:\n  refresh_secs: {bad}\n");
            let err = JobConfig::parse(&text).unwrap_err();
            assert_eq!(err.key(), Some("catalog.refresh_secs"), "{err}");
        }
        let text = format!("{OFFICIAL_VITL16}\ncatalog:\n  refresh_secs: 0.5\n");
        assert_eq!(
            JobConfig::parse(&text).unwrap().raw.catalog.refresh_secs,
            0.5
        );
        let weighted = OFFICIAL_VITL16.replace(
            "  datasets:\n",
            "  datasets_weights: [0.335, 0.1, 0.565]\n  datasets:\n",
        );
        let cfg = JobConfig::parse(&weighted).unwrap();
        assert_eq!(
            cfg.mixing(),
            vjepa_operators::sampler::Mixing::Weighted(vec![0.335, 0.1, 0.565])
        );
        assert!(
            cfg.ignored
                .iter()
                .all(|(k, _)| k != "data.datasets_weights")
        );
    }

    #[test]
    fn objective_pixel_and_its_settings() {
        let cfg = JobConfig::parse(OFFICIAL_VITL16).unwrap();
        assert_eq!(cfg.raw.model.objective, vjepa_model::Objective::Vjepa);
        assert!(!cfg.ignored.iter().any(|(k, _)| k == "model.pred_depth"));

        let pixel = OFFICIAL_VITL16.replace(
            "  model_name: vit_large\n",
            "  model_name: vit_large\n  objective: pixel\n",
        );
        let cfg = JobConfig::parse(&pixel).expect("objective pixel parses");
        assert_eq!(cfg.raw.model.objective, vjepa_model::Objective::Pixel);
        let ckpt = |text: &str| {
            text.replace(
                "  model_name: vit_large\n",
                "  model_name: vit_large\n  activation_checkpointing: true\n",
            )
        };
        assert!(
            JobConfig::parse(&ckpt(OFFICIAL_VITL16))
                .unwrap()
                .raw
                .model
                .activation_checkpointing
        );
        let err = JobConfig::parse(&ckpt(&pixel)).unwrap_err();
        assert_eq!(err.key(), Some("model.activation_checkpointing"), "{err}");
        let lane = |text: &str| {
            text.replace(
                "  model_name: vit_large\n",
                "  model_name: vit_large\n  target_stream: true\n",
            )
        };
        assert!(!cfg.raw.model.target_stream);
        assert!(
            JobConfig::parse(&lane(OFFICIAL_VITL16))
                .unwrap()
                .raw
                .model
                .target_stream
        );
        let err = JobConfig::parse(&lane(&pixel)).unwrap_err();
        assert_eq!(err.key(), Some("model.target_stream"), "{err}");
        assert_eq!(cfg.raw.model.pixel.mask_ratio, 0.9);
        let p = cfg.pixel_config();
        assert_eq!(
            (p.decoder_dim, p.decoder_depth, p.decoder_heads),
            (384, 4, 16)
        );
        assert!(p.norm_pix);
        assert!(cfg.ignored.iter().any(|(k, _)| k == "mask"));

        let custom = pixel.replace(
            "  objective: pixel\n",
            "  objective: pixel\n  pixel:\n    mask_ratio: 0.75\n    decoder_dim: 64\n    decoder_depth: 1\n    decoder_heads: 2\n    norm_pix: false\n",
        );
        let cfg = JobConfig::parse(&custom).expect("model.pixel parses");
        let p = cfg.pixel_config();
        assert_eq!(
            (p.decoder_dim, p.decoder_depth, p.decoder_heads),
            (64, 1, 2)
        );
        assert!(!p.norm_pix);
        assert_eq!(cfg.raw.model.pixel.mask_ratio, 0.75);

        for (from, to, key) in [
            ("objective: pixel", "objective: pixels", "model.objective"),
            (
                "mask_ratio: 0.75",
                "mask_ratio: 1.0",
                "model.pixel.mask_ratio",
            ),
            (
                "decoder_heads: 2",
                "decoder_heads: 5",
                "model.pixel.decoder_heads",
            ),
            (
                "decoder_dim: 64",
                "decoder_dim: 0",
                "model.pixel.decoder_dim",
            ),
            (
                "norm_pix: false",
                "norm_pixel: false",
                "model.pixel.norm_pixel",
            ),
        ] {
            let text = custom.replace(from, to);
            let err = JobConfig::parse(&text).unwrap_err();
            assert_eq!(err.key(), Some(key), "{from} -> {to}: {err}");
        }
        // Training features are the target encoder's: refused without one.
        assert!(!custom.contains("\noutputs:"));
        let err = JobConfig::parse(&format!("{custom}\noutputs:\n  features: true\n")).unwrap_err();
        assert_eq!(err.key(), Some("outputs.features"), "{err}");
        // The masks are optional for pixel, required for V-JEPA.
        let start = pixel.find("mask:\n").unwrap();
        let end = pixel.find("meta:\n").unwrap();
        let no_masks = format!("{}{}", &pixel[..start], &pixel[end..]);
        JobConfig::parse(&no_masks).expect("pixel without masks");
        let err = JobConfig::parse(&no_masks.replace("  objective: pixel\n", "")).unwrap_err();
        assert_eq!(err.key(), Some("mask"), "{err}");
    }
}
