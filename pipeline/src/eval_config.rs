//! Official evaluation configs (`configs/evals/*.yaml` of the official code, `eval_name:
//! video_classification_frozen`) read by `vjepa probe --eval-config` (and `finetune`): the
//! datasets, the clip sampling, the probe's optimisation, the checkpoint and the model shape,
//! read the way the official evaluation reads them (its defaults where a key is absent,
//! `pretrain.frame_step` rather than the unused `data.frame_step`, the per-GPU batch times the
//! GPUs). What this port does not implement is refused naming the key, before any work.

use std::path::Path;

use serde_yaml::Value;
use vjepa_model::EncoderConfig;

use crate::config::ConfigError;

/// The settings of an official frozen video evaluation.
#[derive(Clone, Debug, PartialEq)]
pub struct EvalConfig {
    /// `data.dataset_train`: a `path label` index.
    pub train: String,
    /// `data.dataset_val`.
    pub val: String,
    /// `pretrain.folder` joined with `pretrain.checkpoint`.
    pub checkpoint: Option<String>,
    /// The backbone's shape (`pretrain.model_name`, `patch_size`, `tubelet_size`,
    /// `frames_per_clip`, `uniform_power`; built at `optimization.resolution`).
    pub encoder: EncoderConfig,
    /// `data.num_segments`.
    pub segments: usize,
    /// `data.num_views_per_segment`.
    pub views: usize,
    /// `pretrain.frame_step` (default 4; the official code ignores `data.frame_step`).
    pub frame_step: usize,
    /// `optimization.num_epochs`.
    pub epochs: usize,
    /// The global batch: `optimization.batch_size` (per GPU) × `nodes` × `tasks_per_node`.
    pub batch_size: usize,
    /// `optimization.lr` (the peak; cosine to `final_lr` = 0).
    pub lr: f64,
    /// `optimization.weight_decay`.
    pub weight_decay: f64,
    /// `data.num_classes`.
    pub num_classes: Option<usize>,
    /// What was read differently from the file's letter, for the log.
    pub notes: Vec<String>,
}

impl EvalConfig {
    /// Reads and checks an official evaluation config.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text)
    }

    /// Parses and checks YAML text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let root: Value = serde_yaml::from_str(text).map_err(|e| ConfigError::Parse {
            key: "<top level>".into(),
            message: e.to_string(),
        })?;
        let doc = Doc { root: &root };
        let mut notes = Vec::new();
        // The official code reads keys with defaults and ignores the rest: a misspelt key
        // silently takes the default there. Say which keys nothing reads.
        let unknown = unknown_keys(&root);
        if !unknown.is_empty() {
            notes.push(format!(
                "keys the official evaluation does not read (misspelt?), ignored: {}",
                unknown.join(", ")
            ));
        }
        if doc.bool("resume_checkpoint")? == Some(true) {
            notes.push(
                "resume_checkpoint: a stopped run continues from resume.safetensors in --out \
                 whenever its settings match, with or without this key"
                    .into(),
            );
        }

        match doc.str("eval_name")? {
            Some("video_classification_frozen") => {}
            Some(other) => {
                return Err(invalid(
                    "eval_name",
                    format!(
                        "`{other}` is not supported: only the frozen video evaluation \
                         (video_classification_frozen) is"
                    ),
                ));
            }
            None => {
                return Err(invalid(
                    "eval_name",
                    "missing: this is not an official evaluation config (for a pretraining \
                     config use --config)",
                ));
            }
        }

        // -- data
        let dataset_type = doc.str("data.dataset_type")?.unwrap_or("VideoDataset");
        if dataset_type != "VideoDataset" {
            return Err(invalid(
                "data.dataset_type",
                format!("`{dataset_type}` is not supported: only VideoDataset (index files)"),
            ));
        }
        let train = doc.dataset("data.dataset_train")?;
        let val = doc.dataset("data.dataset_val")?;
        let num_classes = doc.count("data.num_classes")?;
        let segments = doc.count_or("data.num_segments", 1)?;
        let views = doc.count_or("data.num_views_per_segment", 1)?;
        let frames = doc.count_or("data.frames_per_clip", 16)?;
        let frame_step = doc.count_or("pretrain.frame_step", 4)?;
        if let Some(step) = doc.count("data.frame_step")?
            && step != frame_step
        {
            notes.push(format!(
                "data.frame_step {step} is not read by the official evaluation: the frame step \
                 is pretrain.frame_step ({frame_step})"
            ));
        }
        if !matches!(doc.get("pretrain.clip_duration"), None | Some(Value::Null)) {
            return Err(invalid(
                "pretrain.clip_duration",
                "duration-based clip sampling is not supported: leave it null (frame_step \
                 sampling)",
            ));
        }

        // -- optimisation
        let resolution = doc.count_or("optimization.resolution", 224)?;
        let per_gpu = doc
            .count("optimization.batch_size")?
            .ok_or_else(|| invalid("optimization.batch_size", "missing"))?;
        let nodes = doc.count_or("nodes", 1)?;
        let tasks = doc.count_or("tasks_per_node", 1)?;
        let batch_size = per_gpu * nodes * tasks;
        if nodes * tasks > 1 {
            notes.push(format!(
                "batch: {per_gpu} per GPU × {nodes} nodes × {tasks} tasks per node = \
                 {batch_size} videos per step"
            ));
        }
        let epochs = doc
            .count("optimization.num_epochs")?
            .ok_or_else(|| invalid("optimization.num_epochs", "missing"))?;
        let lr = doc
            .number("optimization.lr")?
            .ok_or_else(|| invalid("optimization.lr", "missing"))?;
        if !(lr.is_finite() && lr > 0.0) {
            return Err(invalid("optimization.lr", "must be a positive number"));
        }
        let weight_decay = doc
            .number("optimization.weight_decay")?
            .ok_or_else(|| invalid("optimization.weight_decay", "missing"))?;
        if !(weight_decay.is_finite() && weight_decay >= 0.0) {
            return Err(invalid(
                "optimization.weight_decay",
                "must be a non-negative number",
            ));
        }
        // The probe's schedule is the released one: cosine from lr to 0, no warmup.
        let start_lr = doc.number("optimization.start_lr")?.unwrap_or(lr);
        if start_lr != lr {
            return Err(invalid(
                "optimization.start_lr",
                format!("{start_lr}: only start_lr = lr ({lr}) is supported (no warmup ramp)"),
            ));
        }
        if let Some(f) = doc.number("optimization.final_lr")?
            && f != 0.0
        {
            return Err(invalid(
                "optimization.final_lr",
                format!("{f}: only a cosine to 0 is supported"),
            ));
        }
        if let Some(w) = doc.number("optimization.warmup")?
            && w != 0.0
        {
            return Err(invalid(
                "optimization.warmup",
                format!("{w}: warmup is not supported (the released configs use 0)"),
            ));
        }
        let across = doc
            .bool("optimization.attend_across_segments")?
            .unwrap_or(false);
        if !across && segments > 1 {
            return Err(invalid(
                "optimization.attend_across_segments",
                "false with several segments is not supported: the probe attends across all \
                 segments' tokens at once (true, as every released config)",
            ));
        }
        if doc.bool("optimization.use_bfloat16")? == Some(true) {
            notes.push(
                "optimization.use_bfloat16: the probe trains in f32 (the official code's flag \
                 gives fp16 autocast)"
                    .into(),
            );
        }

        // -- pretrain: the checkpoint and the model's shape
        let key = doc
            .str("pretrain.checkpoint_key")?
            .unwrap_or("target_encoder");
        if key != "target_encoder" {
            return Err(invalid(
                "pretrain.checkpoint_key",
                format!("`{key}`: only target_encoder is read"),
            ));
        }
        if doc.bool("pretrain.use_silu")? == Some(true) {
            return Err(invalid(
                "pretrain.use_silu",
                "SiLU MLPs are not supported (V-JEPA's released models use GELU)",
            ));
        }
        let model_name = doc
            .str("pretrain.model_name")?
            .ok_or_else(|| invalid("pretrain.model_name", "missing"))?;
        let patch = doc
            .count("pretrain.patch_size")?
            .ok_or_else(|| invalid("pretrain.patch_size", "missing"))?;
        let tubelet = doc.count_or("pretrain.tubelet_size", 2)?;
        // The official default is 1 (an image model) when the key is absent.
        let pretrain_frames = doc.count_or("pretrain.frames_per_clip", 1)?;
        if pretrain_frames != frames {
            return Err(invalid(
                "data.frames_per_clip",
                format!(
                    "{frames} differs from pretrain.frames_per_clip {pretrain_frames}{}: the \
                     backbone reads clips of its own length",
                    if doc.get("pretrain.frames_per_clip").is_none() {
                        " (the official default when the key is absent)"
                    } else {
                        ""
                    }
                ),
            ));
        }
        let uniform_power = doc.bool("pretrain.uniform_power")?.unwrap_or(false);
        if resolution % patch != 0 {
            return Err(invalid(
                "optimization.resolution",
                format!("{resolution} is not a multiple of pretrain.patch_size {patch}"),
            ));
        }
        let encoder = EncoderConfig::preset(
            model_name,
            frames,
            resolution,
            patch,
            tubelet,
            uniform_power,
        )
        .ok_or_else(|| {
            invalid(
                "pretrain.model_name",
                format!(
                    "`{model_name}`: expected vit_tiny, vit_small, vit_base, vit_large, \
                     vit_huge or vit_giant"
                ),
            )
        })?;
        encoder
            .validate()
            .map_err(|e| invalid("pretrain", e.to_string()))?;
        // `os.path.join(folder, checkpoint)`: an absolute (or URL) checkpoint stands alone.
        let checkpoint = match (doc.str("pretrain.folder")?, doc.str("pretrain.checkpoint")?) {
            (Some(folder), Some(file)) if !file.starts_with('/') && !file.contains("://") => {
                Some(format!("{}/{file}", folder.trim_end_matches('/')))
            }
            (_, Some(file)) => Some(file.to_string()),
            _ => None,
        };

        Ok(EvalConfig {
            train,
            val,
            checkpoint,
            encoder,
            segments,
            views,
            frame_step,
            epochs,
            batch_size,
            lr,
            weight_decay,
            num_classes,
            notes,
        })
    }
}

/// The keys the official frozen video evaluation reads (`eval.py`), by section.
const KNOWN: &[(&str, &[&str])] = &[
    (
        "",
        &[
            "nodes",
            "tasks_per_node",
            "tag",
            "eval_name",
            "resume_checkpoint",
            "data",
            "optimization",
            "pretrain",
        ],
    ),
    (
        "data",
        &[
            "dataset_train",
            "dataset_val",
            "dataset_type",
            "num_classes",
            "frames_per_clip",
            "num_segments",
            "num_views_per_segment",
            "frame_step",
        ],
    ),
    (
        "optimization",
        &[
            "attend_across_segments",
            "num_epochs",
            "resolution",
            "batch_size",
            "weight_decay",
            "lr",
            "start_lr",
            "final_lr",
            "warmup",
            "use_bfloat16",
        ],
    ),
    (
        "pretrain",
        &[
            "model_name",
            "checkpoint_key",
            "clip_duration",
            "frames_per_clip",
            "frame_step",
            "tubelet_size",
            "uniform_power",
            "use_silu",
            "tight_silu",
            "use_sdpa",
            "patch_size",
            "folder",
            "checkpoint",
            "write_tag",
        ],
    ),
];

/// Dotted names of the keys in `root` that [`KNOWN`] does not list.
fn unknown_keys(root: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for (section, keys) in KNOWN {
        let map = if section.is_empty() {
            root.as_mapping()
        } else {
            root.get(*section).and_then(Value::as_mapping)
        };
        for k in map.into_iter().flat_map(|m| m.keys()) {
            let name = k.as_str().unwrap_or("?");
            if !keys.contains(&name) {
                out.push(if section.is_empty() {
                    name.to_string()
                } else {
                    format!("{section}.{name}")
                });
            }
        }
    }
    out
}

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        message: message.into(),
    }
}

/// Dotted-key reads with the key named in every error.
struct Doc<'a> {
    root: &'a Value,
}

impl<'a> Doc<'a> {
    fn get(&self, key: &str) -> Option<&'a Value> {
        key.split('.')
            .try_fold(self.root, |v, part| v.get(part))
            .filter(|v| !v.is_null())
    }

    fn str(&self, key: &str) -> Result<Option<&'a str>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| invalid(key, "must be a string")),
        }
    }

    fn bool(&self, key: &str) -> Result<Option<bool>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| invalid(key, "must be true or false")),
        }
    }

    fn number(&self, key: &str) -> Result<Option<f64>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| invalid(key, "must be a number")),
        }
    }

    /// A positive whole number, or `default` (the official one) when the key is absent.
    fn count_or(&self, key: &str, default: usize) -> Result<usize, ConfigError> {
        Ok(self.count(key)?.unwrap_or(default))
    }

    /// A positive whole number.
    fn count(&self, key: &str) -> Result<Option<usize>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) if n > 0 => Ok(Some(n as usize)),
                _ => Err(invalid(key, "must be a positive whole number")),
            },
        }
    }

    /// A dataset: a path, or a list of exactly one (the official code wraps it in a list).
    fn dataset(&self, key: &str) -> Result<String, ConfigError> {
        let one = match self.get(key) {
            None => return Err(invalid(key, "missing")),
            Some(Value::Sequence(items)) if items.len() == 1 => &items[0],
            Some(Value::Sequence(_)) => {
                return Err(invalid(key, "exactly one index file is supported"));
            }
            Some(v) => v,
        };
        match one.as_str() {
            Some(s) if !s.trim().is_empty() => Ok(s.to_string()),
            _ => Err(invalid(key, "must be the path of a `path label` index")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The released ViT-L/16 K400 evaluation config, as the official repository has it.
    const K400: &str = "\
nodes: 8
tasks_per_node: 8
tag: k400-16x8x3
eval_name: video_classification_frozen
resume_checkpoint: false
data:
  dataset_train: /data/k400_train.csv
  dataset_val: /data/k400_val.csv
  dataset_type: VideoDataset
  num_classes: 400
  frames_per_clip: 16
  num_segments: 8
  num_views_per_segment: 3
  frame_step: 4
optimization:
  attend_across_segments: true
  num_epochs: 20
  resolution: 224
  batch_size: 4
  weight_decay: 0.01
  lr: 0.001
  start_lr: 0.001
  final_lr: 0.0
  warmup: 0.
  use_bfloat16: true
pretrain:
  model_name: vit_large
  checkpoint_key: target_encoder
  clip_duration: null
  frames_per_clip: 16
  tubelet_size: 2
  uniform_power: true
  use_silu: false
  tight_silu: false
  use_sdpa: true
  patch_size: 16
  folder: /models/
  checkpoint: jepa-latest.pth.tar  # name of pretrained model file inside folder
  write_tag: jepa
";

    #[test]
    fn the_released_k400_config_reads_as_the_official_evaluation_does() {
        let c = EvalConfig::parse(K400).unwrap();
        assert_eq!(
            (c.train.as_str(), c.val.as_str()),
            ("/data/k400_train.csv", "/data/k400_val.csv")
        );
        assert_eq!(c.checkpoint.as_deref(), Some("/models/jepa-latest.pth.tar"));
        assert_eq!((c.segments, c.views, c.frame_step, c.epochs), (8, 3, 4, 20));
        assert_eq!(c.batch_size, 256, "4 per GPU × 64 GPUs");
        assert_eq!(
            (c.lr, c.weight_decay, c.num_classes),
            (1e-3, 0.01, Some(400))
        );
        let want = EncoderConfig::preset("vit_large", 16, 224, 16, 2, true).unwrap();
        assert_eq!(c.encoder, want);
        assert_eq!(c.notes.len(), 2, "{:?}", c.notes); // the global batch, bf16
        let typo = EvalConfig::parse(&K400.replace("num_segments: 8", "num_segmets: 8")).unwrap();
        assert_eq!(
            typo.segments, 1,
            "the official default, as eval.py reads it"
        );
        assert!(
            typo.notes.iter().any(|n| n.contains("data.num_segmets")),
            "{:?}",
            typo.notes
        );
    }

    #[test]
    fn what_is_not_implemented_is_refused_by_key() {
        let refused = |from: &str, to: &str| {
            let text = K400.replace(from, to);
            assert_ne!(text, K400, "{from}");
            EvalConfig::parse(&text)
                .unwrap_err()
                .key()
                .unwrap()
                .to_string()
        };
        assert_eq!(
            refused(
                "eval_name: video_classification_frozen",
                "eval_name: image_classification_frozen"
            ),
            "eval_name"
        );
        assert_eq!(
            refused("  warmup: 0.", "  warmup: 1.5"),
            "optimization.warmup"
        );
        assert_eq!(
            refused("  start_lr: 0.001", "  start_lr: 0.0002"),
            "optimization.start_lr"
        );
        assert_eq!(
            refused(
                "attend_across_segments: true",
                "attend_across_segments: false"
            ),
            "optimization.attend_across_segments"
        );
        assert_eq!(
            refused("clip_duration: null", "clip_duration: 2.0"),
            "pretrain.clip_duration"
        );
        assert_eq!(
            refused("model_name: vit_large", "model_name: vit_colossal"),
            "pretrain.model_name"
        );
        assert_eq!(
            refused("checkpoint_key: target_encoder", "checkpoint_key: encoder"),
            "pretrain.checkpoint_key"
        );
        assert_eq!(
            refused("  num_segments: 8", "  num_segments: eight"),
            "data.num_segments"
        );
        assert_eq!(
            refused("  batch_size: 4", "  batch_size: 0"),
            "optimization.batch_size"
        );
        assert_eq!(
            refused(
                "  frames_per_clip: 16\n  tubelet",
                "  frames_per_clip: 8\n  tubelet"
            ),
            "data.frames_per_clip"
        );
        assert_eq!(
            refused("  dataset_type: VideoDataset", "  dataset_type: ImageNet"),
            "data.dataset_type"
        );
        assert_eq!(
            refused("  weight_decay: 0.01\n", ""),
            "optimization.weight_decay"
        );
        assert_eq!(
            refused("  resolution: 224", "  resolution: 230"),
            "optimization.resolution"
        );
        // A pretraining config is not an evaluation config.
        let err = EvalConfig::parse("data:\n  batch_size: 3\n").unwrap_err();
        assert_eq!(err.key(), Some("eval_name"));
    }

    #[test]
    fn official_defaults_apply_where_keys_are_absent() {
        // data.frame_step is not read (pretrain.frame_step, default 4, is), and a list of one
        // dataset is accepted; without nodes/tasks the batch is the per-GPU one.
        let text = K400
            .replace("nodes: 8\ntasks_per_node: 8\n", "")
            .replace("  frame_step: 4\n", "  frame_step: 2\n")
            .replace(
                "  dataset_train: /data/k400_train.csv",
                "  dataset_train: [/data/k400_train.csv]",
            )
            .replace("  uniform_power: true\n", "");
        let c = EvalConfig::parse(&text).unwrap();
        assert_eq!((c.frame_step, c.batch_size), (4, 4));
        assert_eq!(c.train, "/data/k400_train.csv");
        assert!(!c.encoder.uniform_power, "the official default is false");
        assert!(
            c.notes.iter().any(|n| n.contains("data.frame_step 2")),
            "{:?}",
            c.notes
        );
        // An absolute checkpoint path is not joined to the folder (os.path.join).
        let abs = K400.replace("checkpoint: jepa-latest", "checkpoint: /x/jepa-latest");
        let abs = EvalConfig::parse(&abs).unwrap();
        assert_eq!(abs.checkpoint.as_deref(), Some("/x/jepa-latest.pth.tar"));
    }
}
