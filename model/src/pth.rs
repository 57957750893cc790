//! Official V-JEPA checkpoints (`jepa-latest.pth.tar`, spec §8) in and out, so that weights move
//! between the PyTorch code and ours: evaluation or continued pretraining of an official model
//! here, and our models in the official tools.
//!
//! The file is `torch.save` of a dict: `encoder`, `predictor`, `target_encoder` (state dicts whose
//! keys carry the `module.backbone.` prefix of the DDP and multi-mask wrappers), `opt` (AdamW
//! `state_dict`), `scaler`, `epoch`, `loss`, `batch_size`, `world_size`, `lr`. Shapes don't
//! determine the model (head counts don't show), so importing takes the configs from the caller
//! and checks every tensor against them. Files we write carry one extra top-level key,
//! `vjepa_stream` (configs, seed and exact step count), which the official loaders ignore and which
//! makes our own files self-describing.
//!
//! AdamW state: the official optimiser has four groups (spec §7) listed in `named_parameters`
//! order — group 0: encoder tensors that are not biases and not 1-D (the fixed `pos_embed` first;
//! it has no gradient and so no state), group 1: the same for the predictor
//! (`predictor_pos_embed` first, then `predictor_embed.weight`, `mask_tokens.*`, …), groups 2 and
//! 3: the biases and 1-D tensors. `opt.state` is keyed by the position in that concatenation; we
//! rebuild the order from the configs and check it against the group sizes the file declares.

mod archive;

use std::collections::{BTreeMap, HashMap};

use candle_core::{Device, Tensor};
use tracing::{info, warn};

use crate::config::{EncoderConfig, OptimConfig, PredictorConfig};
use crate::params::{ParamMap, ParamSpec};
use crate::predictor::Predictor;
use crate::vit::Encoder;
use crate::{ModelError, Parts, VJepa, schedule, to_json};
use archive::{StoredTensor, TorchArchive, TorchWriter, Value};

/// Top-level key of our provenance record in files we write.
const META_KEY: &str = "vjepa_stream";
/// Value of `vjepa_stream.format`.
const PTH_FORMAT: &str = "vjepa-stream.vjepa-v1.pth";
/// Prefix the official wrappers (DDP `module.`, multi-mask `backbone.`) put on every key.
const KEY_PREFIX: &str = "module.backbone.";

/// Everything about a model an official checkpoint does not record (spec §8): the shapes'
/// head counts, the optimisation settings (for continued pretraining) and the init seed
/// (provenance only).
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfigs {
    /// Encoder (and target encoder) shape.
    pub encoder: EncoderConfig,
    /// Predictor shape.
    pub predictor: PredictorConfig,
    /// Optimiser and schedules.
    pub optim: OptimConfig,
    /// Seed recorded in our checkpoint.
    pub seed: u64,
}

/// What an imported `.pth.tar` held besides the weights, for logs and the caller's decisions.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PthInfo {
    /// Finished epochs (`epoch`).
    pub epoch: Option<u64>,
    /// Epoch-average loss (`loss`).
    pub loss: Option<f64>,
    /// Per-GPU batch size (`batch_size`).
    pub batch_size: Option<u64>,
    /// Number of processes (`world_size`).
    pub world_size: Option<u64>,
    /// Peak LR (`lr`).
    pub lr: Option<f64>,
    /// Whether AdamW moments and step counts were imported (false: fresh optimiser state).
    pub optimizer_state: bool,
    /// Whether the file was written by us (has the `vjepa_stream` record).
    pub written_by_us: bool,
}

/// Values the official file holds that our checkpoint does not (all optional).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PthExport {
    /// Iterations per epoch, to write `epoch` = steps_done / ipe (what the official resume
    /// multiplies back). None: derived from the optimiser config as
    /// `clip_start_iteration - warmup_steps`, exact when warmup is a whole number of epochs.
    pub iterations_per_epoch: Option<u64>,
    /// Per-GPU batch size, written as `batch_size` (None otherwise).
    pub batch_size: Option<u64>,
    /// Number of processes, written as `world_size` (None otherwise).
    pub world_size: Option<u64>,
}

impl VJepa {
    /// Builds a model from an official-layout `.pth.tar` (or one from [`Self::to_pth`]).
    ///
    /// `configs` is required for official files (heads are not derivable from shapes); for our
    /// own files the recorded configs are used when it is None. Every tensor of `encoder`,
    /// `predictor` and `target_encoder` is checked against the configs: the error names the first
    /// missing or mis-shaped tensor (`target_encoder.blocks.1.mlp.fc2.weight`, expected vs
    /// found shape) or lists tensors the configured model has no place for. AdamW moments and
    /// per-parameter steps come from `opt` when present (otherwise a fresh optimiser, with a
    /// warning); `steps_done` is the recorded count for our files, else the largest AdamW step.
    pub fn from_pth(
        bytes: &[u8],
        configs: Option<&ModelConfigs>,
        device: &Device,
    ) -> Result<(Self, PthInfo), ModelError> {
        let (mut ar, root) = TorchArchive::open(bytes)?;
        if root.as_dict().is_none() {
            return Err(ModelError::Checkpoint(format!(
                "top level is a {}, expected the official dict",
                root.kind()
            )));
        }
        let meta = OurMeta::read(&root)?;
        let cfg = match (configs, &meta) {
            (Some(c), _) => c.clone(),
            (None, Some(m)) => m.configs.clone(),
            (None, None) => return Err(needs_configs()),
        };
        Self::validate_configs(&cfg.encoder, &cfg.predictor, &cfg.optim)?;
        let (enc_cfg, pred_cfg) = (&cfg.encoder, &cfg.predictor);

        let enc_expected = encoder_expected(enc_cfg);
        let pred_expected = predictor_expected(enc_cfg, pred_cfg);
        // Check all three state dicts before reading any tensor data.
        let mut sections = Vec::new();
        for (name, expected) in [
            ("encoder", &enc_expected),
            ("predictor", &pred_expected),
            ("target_encoder", &enc_expected),
        ] {
            let section = Section::from_root(&root, name)?.ok_or_else(|| {
                ModelError::Checkpoint(format!(
                    "no `{name}` state dict (top-level keys: {}); an evaluation-only file can be \
                     read with `encoder_from_pth`",
                    top_level_keys(&root)
                ))
            })?;
            section.check(expected)?;
            sections.push((section, expected));
        }
        let mut loaded = Vec::new();
        for (section, expected) in &sections {
            loaded.push(section.load_with_table(expected, &mut ar, device)?);
        }
        let [
            (encoder, encoder_pos),
            (predictor, predictor_pos),
            (target, target_pos),
        ]: [_; 3] = loaded
            .try_into()
            .map_err(|_| ModelError::Checkpoint("state dicts went missing".into()))?;

        let opt_state = match root.get("opt") {
            Some(opt) if !matches!(opt, Value::None) => {
                let groups = official_groups(enc_cfg, pred_cfg);
                let mut by_name = import_opt(opt, &groups, &mut ar, device)?;
                let mut state = Vec::new();
                for (prefix, specs) in [
                    ("encoder", Encoder::param_specs(enc_cfg)),
                    ("predictor", Predictor::param_specs(enc_cfg, pred_cfg)),
                ] {
                    for s in specs {
                        let name = format!("{prefix}.{}", s.name);
                        let entry = match by_name.remove(&name) {
                            Some(e) => e,
                            None => {
                                let z = Tensor::zeros(
                                    s.shape.as_slice(),
                                    candle_core::DType::F32,
                                    device,
                                )?;
                                (z.clone(), z, 0)
                            }
                        };
                        state.push(entry);
                    }
                }
                Some(state)
            }
            _ => {
                warn!("checkpoint has no optimiser state: AdamW starts from zero moments");
                None
            }
        };
        let max_step = opt_state
            .as_ref()
            .and_then(|s| s.iter().map(|(_, _, step)| *step).max())
            .unwrap_or(0);
        let steps_done = meta.as_ref().map_or(max_step, |m| m.steps_done);
        let info = PthInfo {
            epoch: root.get("epoch").and_then(Value::as_u64),
            loss: root.get("loss").and_then(Value::as_f64),
            batch_size: root.get("batch_size").and_then(Value::as_u64),
            world_size: root.get("world_size").and_then(Value::as_u64),
            lr: root.get("lr").and_then(Value::as_f64),
            optimizer_state: opt_state.is_some(),
            written_by_us: meta.is_some(),
        };
        let parts = Parts {
            encoder,
            predictor,
            target,
            encoder_pos,
            predictor_pos,
            target_pos,
            opt_state,
        };
        let model = Self::assemble(
            cfg.encoder,
            cfg.predictor,
            cfg.optim,
            cfg.seed,
            device,
            parts,
            steps_done,
        )?;
        info!(
            steps_done,
            epoch = ?info.epoch,
            optimizer_state = info.optimizer_state,
            "loaded .pth.tar checkpoint"
        );
        Ok((model, info))
    }

    /// The checkpoint in the official layout (spec §8), loadable with
    /// `torch.load(path, weights_only=True)` and by the official resume and evaluation code:
    /// state dicts with `module.backbone.` keys in registration order, AdamW `state_dict` with the
    /// four official groups (current scheduled lr and weight decay; state only for parameters
    /// that have taken a step; `step` as a 0-dim f32 tensor like torch, exact below 2^24 steps),
    /// a fresh GradScaler state, `epoch`, `lr` (peak), and our
    /// `vjepa_stream` record. `loss` is None (we don't keep an epoch average).
    pub fn to_pth(&self, export: &PthExport) -> Result<Vec<u8>, ModelError> {
        let mut w = TorchWriter::new();
        let params = self.opt.params();
        let (enc_params, pred_params) = params.split_at(self.num_encoder_params);
        let key = |name: &str| Value::Str(format!("{KEY_PREFIX}{name}"));
        // Optimiser names are `encoder.<key>` / `predictor.<key>`; state-dict keys are `<key>`.
        let strip = |full: &str, section: &str| {
            full.strip_prefix(section)
                .and_then(|k| k.strip_prefix('.'))
                .unwrap_or(full)
                .to_string()
        };

        let mut encoder = vec![(key("pos_embed"), w.tensor(self.encoder.pos_embed())?)];
        for p in enc_params {
            encoder.push((
                key(&strip(&p.name, "encoder")),
                w.tensor(p.var.as_tensor())?,
            ));
        }
        let mut predictor = vec![(
            key("predictor_pos_embed"),
            w.tensor(self.predictor.pos_embed())?,
        )];
        for p in pred_params {
            predictor.push((
                key(&strip(&p.name, "predictor")),
                w.tensor(p.var.as_tensor())?,
            ));
        }
        let mut target = vec![(key("pos_embed"), w.tensor(self.target.pos_embed())?)];
        for (name, t) in &self.target_params {
            target.push((key(name), w.tensor(t)?));
        }

        // Optimiser: indices in official group order; fixed tables hold an index but no state.
        let by_name: HashMap<&str, &crate::optim::OptParam> =
            params.iter().map(|p| (p.name.as_str(), p)).collect();
        let groups = official_groups(&self.enc_cfg, &self.pred_cfg);
        let c = &self.optim_cfg;
        let step1 = self.steps_done.max(1);
        let (lr, wd) = (schedule::lr(c, step1), schedule::weight_decay(c, step1));
        let mut state = Vec::new();
        let mut param_groups = Vec::new();
        let mut index = 0i64;
        for (g, members) in groups.iter().enumerate() {
            let mut ids = Vec::new();
            for (name, _, trainable) in members {
                if *trainable {
                    let p = by_name.get(name.as_str()).ok_or_else(|| {
                        ModelError::Checkpoint(format!("optimiser has no parameter `{name}`"))
                    })?;
                    if p.step > 0 {
                        state.push((
                            Value::Int(index),
                            Value::Dict(vec![
                                (s("step"), w.scalar(p.step as f32)?),
                                (s("exp_avg"), w.tensor(&p.exp_avg()?)?),
                                (s("exp_avg_sq"), w.tensor(&p.exp_avg_sq()?)?),
                            ]),
                        ));
                    }
                }
                ids.push(Value::Int(index));
                index += 1;
            }
            let decayed = g < 2;
            let mut group = vec![
                (s("lr"), Value::Float(lr)),
                (
                    s("betas"),
                    Value::Tuple(vec![Value::Float(c.betas.0), Value::Float(c.betas.1)]),
                ),
                (s("eps"), Value::Float(c.eps)),
                (
                    s("weight_decay"),
                    Value::Float(if decayed { wd } else { 0.0 }),
                ),
                (s("amsgrad"), Value::Bool(false)),
                (s("maximize"), Value::Bool(false)),
                (s("foreach"), Value::None),
                (s("capturable"), Value::Bool(false)),
                (s("differentiable"), Value::Bool(false)),
                (s("fused"), Value::None),
            ];
            if !decayed {
                group.push((s("WD_exclude"), Value::Bool(true)));
            }
            group.push((s("params"), Value::List(ids)));
            param_groups.push(Value::Dict(group));
        }
        let opt = Value::Dict(vec![
            (s("state"), Value::Dict(state)),
            (s("param_groups"), Value::List(param_groups)),
        ]);
        // torch.cuda.amp.GradScaler's initial state (spec §7): the official resume loads it.
        let scaler = Value::Dict(vec![
            (s("scale"), Value::Float(65536.0)),
            (s("growth_factor"), Value::Float(2.0)),
            (s("backoff_factor"), Value::Float(0.5)),
            (s("growth_interval"), Value::Int(2000)),
            (s("_growth_tracker"), Value::Int(0)),
        ]);

        let ipe = export.iterations_per_epoch.or_else(|| derived_ipe(c));
        let epoch = match ipe {
            Some(ipe) if ipe > 0 => {
                if !self.steps_done.is_multiple_of(ipe) {
                    warn!(
                        steps_done = self.steps_done,
                        ipe, "steps_done is not a whole number of epochs: `epoch` rounds down"
                    );
                }
                self.steps_done / ipe
            }
            _ => {
                warn!("iterations per epoch unknown: writing epoch 0");
                0
            }
        };
        let opt_int = |v: Option<u64>| v.map_or(Value::None, |v| Value::Int(v as i64));
        let meta = Value::Dict(vec![
            (s("format"), s(PTH_FORMAT)),
            (s("encoder_config"), Value::Str(to_json(&self.enc_cfg)?)),
            (s("predictor_config"), Value::Str(to_json(&self.pred_cfg)?)),
            (s("optim_config"), Value::Str(to_json(&self.optim_cfg)?)),
            (s("seed"), Value::Str(self.seed.to_string())),
            (s("steps_done"), Value::Str(self.steps_done.to_string())),
        ]);
        let root = Value::Dict(vec![
            (s("encoder"), Value::Dict(encoder)),
            (s("predictor"), Value::Dict(predictor)),
            (s("opt"), opt),
            (s("scaler"), scaler),
            (s("target_encoder"), Value::Dict(target)),
            (s("epoch"), Value::Int(epoch as i64)),
            (s("loss"), Value::None),
            (s("batch_size"), opt_int(export.batch_size)),
            (s("world_size"), opt_int(export.world_size)),
            (s("lr"), Value::Float(c.lr)),
            (s(META_KEY), meta),
        ]);
        w.finish(&root)
    }
}

/// An encoder from a `.pth.tar` for evaluation or feature extraction: the `target_encoder`
/// state dict (as the official evaluation does), else `encoder`, else a top level that is itself
/// a state dict. `cfg` may be None for files we wrote. Returns the encoder and the section used.
pub fn encoder_from_pth(
    bytes: &[u8],
    cfg: Option<&EncoderConfig>,
    device: &Device,
) -> Result<(Encoder, &'static str), ModelError> {
    let (mut ar, root) = TorchArchive::open(bytes)?;
    let cfg = match (cfg, OurMeta::read(&root)?) {
        (Some(c), _) => c.clone(),
        (None, Some(m)) => m.configs.encoder,
        (None, None) => return Err(needs_configs()),
    };
    cfg.validate()?;
    let mut found = None;
    for name in ["target_encoder", "encoder"] {
        if let Some(sec) = Section::from_root(&root, name)? {
            found = Some(sec);
            break;
        }
    }
    let section = match found {
        Some(s) => s,
        None => Section::from_value(&root, "state_dict")?,
    };
    let mut expected = encoder_expected(&cfg);
    // Built for another input size (a 384 evaluation of a 224 model): the official evaluation
    // keeps the freshly built sin-cos table where the checkpoint's has another shape.
    let fresh_table = match section.tensors.get("pos_embed") {
        Some(t)
            if t.shape != expected[0].1
                && t.shape.len() == 3
                && t.shape[0] == 1
                && t.shape[2] == cfg.embed_dim =>
        {
            tracing::info!(
                file = ?t.shape,
                built = ?expected[0].1,
                "pos_embed of another input size in the checkpoint: the freshly built sin-cos \
                 table is used"
            );
            expected[0].1 = t.shape.clone();
            true
        }
        _ => false,
    };
    section.check(&expected)?;
    let (tensors, pos) = section.load_with_table(&expected, &mut ar, device)?;
    let pos = if fresh_table {
        crate::pos_embed::sincos_table_tensor(
            cfg.embed_dim,
            cfg.grid(),
            cfg.table_layout(),
            device,
        )?
    } else {
        pos
    };
    let mut map = ParamMap::new();
    for (name, t) in tensors {
        map.insert(name, t);
    }
    Ok((Encoder::load(&cfg, &map, pos)?, section.name))
}

fn needs_configs() -> ModelError {
    ModelError::Config(
        "an official .pth.tar does not record the model shape (head counts can't be derived \
         from tensor shapes): pass the job config"
            .into(),
    )
}

fn s(v: &str) -> Value {
    Value::Str(v.to_string())
}

fn top_level_keys(root: &Value) -> String {
    root.as_dict()
        .unwrap_or_default()
        .iter()
        .map(|(k, _)| match k {
            Value::Str(s) => s.clone(),
            other => other.kind(),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Iterations per epoch from the optimiser config's definitions (`warmup_steps` = warmup·ipe,
/// `clip_start_iteration` = (⌊warmup⌋+1)·ipe), when they pin it down.
fn derived_ipe(c: &OptimConfig) -> Option<u64> {
    let d = c.clip_start_iteration.checked_sub(c.warmup_steps)?;
    (d > 0 && c.warmup_steps.is_multiple_of(d)).then_some(d)
}

/// Our `vjepa_stream` record.
struct OurMeta {
    configs: ModelConfigs,
    steps_done: u64,
}

impl OurMeta {
    fn read(root: &Value) -> Result<Option<Self>, ModelError> {
        let Some(meta) = root.get(META_KEY) else {
            return Ok(None);
        };
        let text = |key: &str| -> Result<&str, ModelError> {
            match meta.get(key) {
                Some(Value::Str(s)) => Ok(s),
                _ => Err(ModelError::Checkpoint(format!(
                    "`{META_KEY}.{key}` is missing or not a string"
                ))),
            }
        };
        let json = |key: &str| -> Result<serde_json::Value, ModelError> {
            serde_json::from_str(text(key)?)
                .map_err(|e| ModelError::Checkpoint(format!("`{META_KEY}.{key}`: {e}")))
        };
        let parse = |key: &str| -> Result<u64, ModelError> {
            text(key)?
                .parse()
                .map_err(|e| ModelError::Checkpoint(format!("`{META_KEY}.{key}`: {e}")))
        };
        let format = text("format")?;
        if format != PTH_FORMAT {
            return Err(ModelError::Checkpoint(format!(
                "`{META_KEY}.format` is `{format}`, expected `{PTH_FORMAT}`"
            )));
        }
        let encoder = typed(&json("encoder_config")?, "encoder_config")?;
        let predictor = typed(&json("predictor_config")?, "predictor_config")?;
        let optim = typed(&json("optim_config")?, "optim_config")?;
        Ok(Some(Self {
            configs: ModelConfigs {
                encoder,
                predictor,
                optim,
                seed: parse("seed")?,
            },
            steps_done: parse("steps_done")?,
        }))
    }
}

/// A JSON value of our record as a config struct.
fn typed<T: serde::de::DeserializeOwned>(
    v: &serde_json::Value,
    key: &str,
) -> Result<T, ModelError> {
    serde_json::from_value(v.clone())
        .map_err(|e| ModelError::Checkpoint(format!("`{META_KEY}.{key}`: {e}")))
}

/// (name, shape) of an encoder state dict: the fixed `pos_embed` first, then the parameters.
fn encoder_expected(enc: &EncoderConfig) -> Vec<(String, Vec<usize>)> {
    let pos = (
        "pos_embed".to_string(),
        vec![1, enc.num_tokens(), enc.embed_dim],
    );
    std::iter::once(pos)
        .chain(
            Encoder::param_specs(enc)
                .into_iter()
                .map(|s| (s.name, s.shape)),
        )
        .collect()
}

/// (name, shape) of a predictor state dict: `predictor_pos_embed` first, then the parameters.
fn predictor_expected(enc: &EncoderConfig, pred: &PredictorConfig) -> Vec<(String, Vec<usize>)> {
    let pos = (
        "predictor_pos_embed".to_string(),
        vec![1, enc.num_tokens(), pred.embed_dim],
    );
    std::iter::once(pos)
        .chain(
            Predictor::param_specs(enc, pred)
                .into_iter()
                .map(|s| (s.name, s.shape)),
        )
        .collect()
}

/// One official optimiser group member: our full name, shape, and whether it is trainable.
type GroupMember = (String, Vec<usize>, bool);

/// The four official AdamW groups in `named_parameters` order (spec §7): decayed encoder and
/// predictor tensors (fixed tables included: they are 3-D and not biases), then the rest.
fn official_groups(enc: &EncoderConfig, pred: &PredictorConfig) -> [Vec<GroupMember>; 4] {
    let mut groups: [Vec<GroupMember>; 4] = Default::default();
    let members = |prefix: &str, expected: Vec<(String, Vec<usize>)>, fixed: &str| {
        expected
            .into_iter()
            .map(|(n, shape)| {
                let trainable = n != fixed;
                let decayed =
                    ParamSpec::new(n.clone(), &shape, crate::params::Init::Zeros).decayed();
                ((format!("{prefix}.{n}"), shape, trainable), decayed)
            })
            .collect::<Vec<_>>()
    };
    for (module, list) in [
        (0, members("encoder", encoder_expected(enc), "pos_embed")),
        (
            1,
            members(
                "predictor",
                predictor_expected(enc, pred),
                "predictor_pos_embed",
            ),
        ),
    ] {
        for (member, decayed) in list {
            groups[if decayed { module } else { module + 2 }].push(member);
        }
    }
    groups
}

/// Moments and steps by our full parameter name, from an AdamW `state_dict`.
fn import_opt(
    opt: &Value,
    groups: &[Vec<GroupMember>; 4],
    ar: &mut TorchArchive<'_>,
    device: &Device,
) -> Result<HashMap<String, (Tensor, Tensor, u64)>, ModelError> {
    let bad = |m: String| ModelError::Checkpoint(format!("opt: {m}"));
    let Some(Value::List(file_groups)) = opt.get("param_groups") else {
        return Err(bad("no `param_groups` list".into()));
    };
    let state: HashMap<i64, &Value> = match opt.get("state") {
        Some(Value::Dict(kv)) => kv
            .iter()
            .map(|(k, v)| match k {
                Value::Int(i) => Ok((*i, v)),
                other => Err(bad(format!(
                    "state key is a {}, expected int",
                    other.kind()
                ))),
            })
            .collect::<Result<_, _>>()?,
        _ => return Err(bad("no `state` dict".into())),
    };
    let ids_of = |g: &Value| -> Option<Vec<i64>> {
        match g.get("params")? {
            Value::List(ids) => ids
                .iter()
                .map(|v| match v {
                    Value::Int(i) => Some(*i),
                    _ => None,
                })
                .collect(),
            _ => None,
        }
    };
    let file_ids = file_groups
        .iter()
        .map(|g| ids_of(g).ok_or_else(|| bad("a param group has no int `params` list".into())))
        .collect::<Result<Vec<_>, _>>()?;
    if file_ids.len() != 4 || file_ids.iter().zip(groups).any(|(f, g)| f.len() != g.len()) {
        return Err(bad(format!(
            "param groups of sizes {:?}, the configured model has {:?} (official order: encoder \
             decayed, predictor decayed, encoder no-decay, predictor no-decay)",
            file_ids.iter().map(Vec::len).collect::<Vec<_>>(),
            groups.iter().map(Vec::len).collect::<Vec<_>>()
        )));
    }
    let mut out = HashMap::new();
    for (ids, members) in file_ids.iter().zip(groups) {
        for (&id, (name, shape, trainable)) in ids.iter().zip(members) {
            let Some(entry) = state.get(&id) else {
                continue;
            };
            if !trainable {
                warn!(%name, "optimiser state for a fixed table ignored");
                continue;
            }
            let m = load_state_tensor(entry, "exp_avg", id, name, shape, ar, device)?;
            let v = load_state_tensor(entry, "exp_avg_sq", id, name, shape, ar, device)?;
            let step = state_step(entry, id, name, ar)?;
            out.insert(name.clone(), (m, v, step));
        }
    }
    Ok(out)
}

/// `exp_avg` / `exp_avg_sq` of one state entry, checked against the parameter's shape.
fn load_state_tensor(
    entry: &Value,
    key: &str,
    id: i64,
    name: &str,
    shape: &[usize],
    ar: &mut TorchArchive<'_>,
    device: &Device,
) -> Result<Tensor, ModelError> {
    let what = format!("opt.state[{id}].{key} ({name})");
    match entry.get(key) {
        Some(Value::Tensor(t)) if t.shape == shape => ar.load(&what, t, device),
        Some(Value::Tensor(t)) => Err(ModelError::TensorShape {
            name: what,
            expected: shape.to_vec(),
            actual: t.shape.clone(),
        }),
        Some(other) => Err(ModelError::Checkpoint(format!(
            "{what} is a {}, expected a tensor",
            other.kind()
        ))),
        None => Err(ModelError::MissingTensor(what)),
    }
}

/// AdamW's per-parameter `step`: a 0-dim tensor (torch ≥ 1.12) or a number (older files).
fn state_step(
    entry: &Value,
    id: i64,
    name: &str,
    ar: &mut TorchArchive<'_>,
) -> Result<u64, ModelError> {
    let what = format!("opt.state[{id}].step ({name})");
    let value = match entry.get("step") {
        Some(Value::Tensor(t)) if t.shape.iter().product::<usize>() == 1 => {
            let v = ar
                .load(&what, t, &Device::Cpu)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            Value::Float(f64::from(v[0]))
        }
        Some(other) => other.clone(),
        None => return Err(ModelError::MissingTensor(what)),
    };
    value.as_u64().ok_or_else(|| {
        ModelError::Checkpoint(format!(
            "{what} is {value:?}, expected a non-negative whole number"
        ))
    })
}

/// A state dict of the file with the wrappers' prefixes stripped from its keys.
struct Section<'v> {
    name: &'static str,
    tensors: BTreeMap<String, &'v StoredTensor>,
}

impl<'v> Section<'v> {
    /// The state dict under top-level key `name`, if there is one.
    fn from_root(root: &'v Value, name: &'static str) -> Result<Option<Self>, ModelError> {
        match root.get(name) {
            None | Some(Value::None) => Ok(None),
            Some(v) => Self::from_value(v, name).map(Some),
        }
    }

    /// `value` read as a state dict; entries that are not tensors (torch's `_metadata`) are
    /// skipped. Keys lose a leading `module.` and then `backbone.`, as the official loader does.
    fn from_value(value: &'v Value, name: &'static str) -> Result<Self, ModelError> {
        let entries = value.as_dict().ok_or_else(|| {
            ModelError::Checkpoint(format!("`{name}` is a {}, expected a dict", value.kind()))
        })?;
        let mut tensors = BTreeMap::new();
        for (k, v) in entries {
            let (Value::Str(key), Value::Tensor(t)) = (k, v) else {
                continue;
            };
            let short = key.strip_prefix("module.").unwrap_or(key);
            let short = short.strip_prefix("backbone.").unwrap_or(short);
            if tensors.insert(short.to_string(), t).is_some() {
                return Err(ModelError::Checkpoint(format!(
                    "`{name}` holds `{short}` twice (with and without a wrapper prefix)"
                )));
            }
        }
        Ok(Self { name, tensors })
    }

    /// Every expected tensor is present with its shape, and nothing else is there.
    fn check(&self, expected: &[(String, Vec<usize>)]) -> Result<(), ModelError> {
        for (key, shape) in expected {
            let t = self
                .tensors
                .get(key)
                .ok_or_else(|| ModelError::MissingTensor(format!("{}.{key}", self.name)))?;
            if &t.shape != shape {
                return Err(ModelError::TensorShape {
                    name: format!("{}.{key}", self.name),
                    expected: shape.clone(),
                    actual: t.shape.clone(),
                });
            }
        }
        let known: std::collections::HashSet<&str> =
            expected.iter().map(|(k, _)| k.as_str()).collect();
        let extra: Vec<&str> = self
            .tensors
            .keys()
            .map(String::as_str)
            .filter(|k| !known.contains(k))
            .collect();
        if !extra.is_empty() {
            const SHOWN: usize = 8;
            let mut list = extra
                .iter()
                .take(SHOWN)
                .map(|k| format!("`{}.{k}`", self.name))
                .collect::<Vec<_>>()
                .join(", ");
            if extra.len() > SHOWN {
                list.push_str(&format!(" and {} more", extra.len() - SHOWN));
            }
            return Err(ModelError::Checkpoint(format!(
                "{} unexpected tensor(s) for the configured model (wrong depth or config?): {list}",
                extra.len()
            )));
        }
        Ok(())
    }

    /// The expected tensors' values (call [`Self::check`] first): the parameters in `expected`
    /// order, and apart from them the fixed table that `*_expected` lists first.
    fn load_with_table(
        &self,
        expected: &[(String, Vec<usize>)],
        ar: &mut TorchArchive<'_>,
        device: &Device,
    ) -> Result<(Vec<(String, Tensor)>, Tensor), ModelError> {
        let mut tensors = expected
            .iter()
            .map(|(key, _)| {
                let full = format!("{}.{key}", self.name);
                let t = self
                    .tensors
                    .get(key)
                    .ok_or_else(|| ModelError::MissingTensor(full.clone()))?;
                Ok((key.clone(), ar.load(&full, t, device)?))
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        if tensors.is_empty() {
            return Err(ModelError::Checkpoint(format!(
                "`{}`: nothing to load",
                self.name
            )));
        }
        let table = tensors.remove(0).1;
        Ok((tensors, table))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::tests::values;
    use crate::{MaskIndices, TrainBatch};

    /// A small model on a (2, 2, 2) token grid; heads and widths differ between encoder and
    /// predictor so that transposed or swapped tensors can't pass a shape check.
    fn tiny_model(seed: u64) -> VJepa {
        let encoder = EncoderConfig {
            embed_dim: 32,
            depth: 2,
            num_heads: 4,
            mlp_hidden: 64,
            patch_size: 8,
            tubelet_size: 2,
            num_frames: 4,
            crop_size: 16,
            uniform_power: true,
        };
        let predictor = PredictorConfig {
            embed_dim: 16,
            depth: 2,
            num_heads: 4,
            num_mask_tokens: 2,
        };
        let mut optim = OptimConfig::official(5, 8, 1, 1.25);
        optim.lr = 1e-3;
        VJepa::new(encoder, predictor, optim, seed, &Device::Cpu).unwrap()
    }

    fn tiny_batch() -> TrainBatch {
        let dev = Device::Cpu;
        let data: Vec<f32> = values(2 * 3 * 4 * 16 * 16, 7)
            .iter()
            .map(|&v| v as f32 * 2.0)
            .collect();
        let clips = Tensor::from_vec(data, (2, 3, 4, 16, 16), &dev).unwrap();
        let idx = |rows: [&[u32]; 2]| {
            let k = rows[0].len();
            Tensor::from_vec([rows[0], rows[1]].concat(), (2, k), &dev).unwrap()
        };
        let masks = vec![
            MaskIndices {
                context: idx([&[0, 1, 2, 4, 5, 6], &[1, 2, 3, 5, 6, 7]]),
                target: idx([&[3, 7], &[0, 4]]),
            },
            MaskIndices {
                context: idx([&[3, 7], &[0, 4]]),
                target: idx([&[0, 1, 2, 4, 5, 6], &[1, 2, 3, 5, 6, 7]]),
            },
        ];
        TrainBatch { clips, masks }
    }

    /// Every tensor and metadata entry of our safetensors checkpoint, for exact comparison.
    fn contents(m: &VJepa) -> (BTreeMap<String, Vec<u8>>, BTreeMap<String, String>) {
        let bytes = m.to_safetensors().unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let tensors = st
            .tensors()
            .into_iter()
            .map(|(n, v)| (n, v.data().to_vec()))
            .collect();
        let meta = meta.metadata().clone().unwrap().into_iter().collect();
        (tensors, meta)
    }

    fn trained(steps: usize) -> VJepa {
        let mut m = tiny_model(3);
        for _ in 0..steps {
            m.train_step(&tiny_batch()).unwrap();
        }
        m
    }

    fn configs(m: &VJepa) -> ModelConfigs {
        ModelConfigs {
            encoder: m.encoder_config().clone(),
            predictor: m.predictor_config().clone(),
            optim: m.optim_config().clone(),
            seed: m.seed(),
        }
    }

    /// The archive with every tensor materialised into a new writer, after `edit`.
    fn rewrite(bytes: &[u8], edit: impl FnOnce(&mut Value, &mut TorchWriter)) -> Vec<u8> {
        fn copy(v: &Value, ar: &mut TorchArchive<'_>, w: &mut TorchWriter) -> Value {
            match v {
                Value::Tensor(t) => w
                    .tensor(&ar.load("copy", t, &Device::Cpu).unwrap())
                    .unwrap(),
                Value::Dict(kv) => Value::Dict(
                    kv.iter()
                        .map(|(k, v)| (k.clone(), copy(v, ar, w)))
                        .collect(),
                ),
                Value::List(xs) => Value::List(xs.iter().map(|x| copy(x, ar, w)).collect()),
                Value::Tuple(xs) => Value::Tuple(xs.iter().map(|x| copy(x, ar, w)).collect()),
                other => other.clone(),
            }
        }
        let (mut ar, root) = TorchArchive::open(bytes).unwrap();
        let mut w = TorchWriter::new();
        let mut root = copy(&root, &mut ar, &mut w);
        edit(&mut root, &mut w);
        w.finish(&root).unwrap()
    }

    /// The value under `key` of dict `v`.
    fn get_mut<'a>(v: &'a mut Value, key: &Value) -> &'a mut Value {
        let Value::Dict(kv) = v else { panic!() };
        &mut kv.iter_mut().find(|(k, _)| k == key).unwrap().1
    }

    fn section_mut<'a>(root: &'a mut Value, name: &str) -> &'a mut Vec<(Value, Value)> {
        let Value::Dict(top) = root else { panic!() };
        let (_, v) = top
            .iter_mut()
            .find(|(k, _)| *k == Value::Str(name.into()))
            .unwrap();
        let Value::Dict(kv) = v else { panic!() };
        kv
    }

    #[test]
    fn round_trip_is_bit_identical_and_training_continues_identically() {
        let mut m = trained(2);
        let bytes = m.to_pth(&PthExport::default()).unwrap();
        for cfg in [None, Some(configs(&m))] {
            let (mut r, info) = VJepa::from_pth(&bytes, cfg.as_ref(), &Device::Cpu).unwrap();
            assert!(info.optimizer_state && info.written_by_us);
            assert_eq!(r.steps_done(), 2);
            assert_eq!(contents(&r), contents(&m));
            if cfg.is_some() {
                let a = m.train_step(&tiny_batch()).unwrap();
                let b = r.train_step(&tiny_batch()).unwrap();
                assert_eq!(a, b);
                assert_eq!(contents(&r), contents(&m));
            }
        }
        // A fresh model (no optimiser state yet) too.
        let fresh = tiny_model(5);
        let bytes = fresh.to_pth(&PthExport::default()).unwrap();
        let (r, _) = VJepa::from_pth(&bytes, None, &Device::Cpu).unwrap();
        assert_eq!(contents(&r), contents(&fresh));
    }

    #[test]
    fn export_follows_the_official_layout() {
        let m = trained(1);
        let export = PthExport {
            iterations_per_epoch: None,
            batch_size: Some(24),
            world_size: Some(128),
        };
        let bytes = m.to_pth(&export).unwrap();
        let (_, root) = TorchArchive::open(&bytes).unwrap();
        let keys = |name: &str| -> Vec<String> {
            root.get(name)
                .unwrap()
                .as_dict()
                .unwrap()
                .iter()
                .map(|(k, _)| match k {
                    Value::Str(s) => s.clone(),
                    _ => panic!(),
                })
                .collect()
        };
        // (Reading does not keep dict order; torch.load's order is checked by the fixture script.)
        let cfg = m.encoder_config();
        let mut want: Vec<String> = encoder_expected(cfg)
            .into_iter()
            .map(|(n, _)| format!("{KEY_PREFIX}{n}"))
            .collect();
        want.sort();
        let mut enc = keys("encoder");
        enc.sort();
        assert_eq!(enc, want);
        let mut tgt = keys("target_encoder");
        tgt.sort();
        assert_eq!(tgt, want);
        let mut pred = keys("predictor");
        pred.sort();
        let mut want: Vec<String> = predictor_expected(cfg, m.predictor_config())
            .into_iter()
            .map(|(n, _)| format!("{KEY_PREFIX}{n}"))
            .collect();
        want.sort();
        assert_eq!(pred, want);
        // official(ipe 5, warmup 1 epoch): ipe derived as 10 - 5; 1 step ⇒ epoch 0.
        assert_eq!(root.get("epoch"), Some(&Value::Int(0)));
        assert_eq!(root.get("batch_size"), Some(&Value::Int(24)));
        assert_eq!(root.get("lr"), Some(&Value::Float(m.optim_config().lr)));

        let opt = root.get("opt").unwrap();
        let Some(Value::List(groups)) = opt.get("param_groups") else {
            panic!()
        };
        let sizes: Vec<usize> = groups
            .iter()
            .map(|g| match g.get("params") {
                Some(Value::List(ids)) => ids.len(),
                _ => panic!(),
            })
            .collect();
        let official = official_groups(cfg, m.predictor_config());
        assert_eq!(sizes, official.iter().map(Vec::len).collect::<Vec<_>>());
        // Group 0 starts with the fixed table (index 0, no state), then the patch weight.
        assert_eq!(official[0][0].0, "encoder.pos_embed");
        assert_eq!(official[0][1].0, "encoder.patch_embed.proj.weight");
        assert_eq!(official[1][0].0, "predictor.predictor_pos_embed");
        assert_eq!(official[1][2].0, "predictor.mask_tokens.0");
        assert_eq!(official[2][0].0, "encoder.patch_embed.proj.bias");
        let state = opt.get("state").unwrap().as_dict().unwrap();
        let ids: Vec<i64> = state
            .iter()
            .map(|(k, _)| match k {
                Value::Int(i) => *i,
                _ => panic!(),
            })
            .collect();
        assert_eq!(ids.iter().min(), Some(&1), "index 0 is the fixed pos_embed");
        let total: usize = sizes.iter().sum();
        assert_eq!(state.len(), total - 2, "every parameter but the two tables");
        assert_eq!(groups[2].get("WD_exclude"), Some(&Value::Bool(true)));
        assert_eq!(groups[0].get("WD_exclude"), None);
    }

    #[test]
    fn errors_name_the_tensor() {
        let m = trained(1);
        let cfg = configs(&m);
        let bytes = m.to_pth(&PthExport::default()).unwrap();
        let load = |b: &[u8]| {
            VJepa::from_pth(b, Some(&cfg), &Device::Cpu)
                .err()
                .unwrap()
                .to_string()
        };

        let missing = rewrite(&bytes, |root, _| {
            section_mut(root, "target_encoder").retain(|(k, _)| {
                *k != Value::Str("module.backbone.blocks.1.mlp.fc2.weight".into())
            });
        });
        let e = load(&missing);
        assert!(
            e.contains("missing tensor `target_encoder.blocks.1.mlp.fc2.weight`"),
            "{e}"
        );

        let misshaped = rewrite(&bytes, |root, w| {
            let t = w
                .tensor(&Tensor::zeros((32, 3), candle_core::DType::F32, &Device::Cpu).unwrap())
                .unwrap();
            for (k, v) in section_mut(root, "predictor") {
                if *k == Value::Str("module.backbone.predictor_proj.weight".into()) {
                    *v = t.clone();
                }
            }
        });
        let e = load(&misshaped);
        assert!(
            e.contains("`predictor.predictor_proj.weight` has shape [32, 3], expected [32, 16]"),
            "{e}"
        );

        let extra = rewrite(&bytes, |root, w| {
            let t = w.scalar(1.0).unwrap();
            section_mut(root, "encoder").push((Value::Str("module.backbone.blocks.9.x".into()), t));
        });
        let e = load(&extra);
        assert!(
            e.contains("unexpected") && e.contains("`encoder.blocks.9.x`"),
            "{e}"
        );

        // A config with another depth: the extra blocks are reported, not silently dropped.
        let mut shallow = cfg.clone();
        shallow.encoder.depth = 1;
        let e = VJepa::from_pth(&bytes, Some(&shallow), &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("12 unexpected") && e.contains("`encoder.blocks.1.attn.qkv.weight`"),
            "{e}"
        );

        // Moments with the wrong shape name the state entry and the parameter.
        let bad_moment = rewrite(&bytes, |root, w| {
            let t = w.scalar(0.0).unwrap();
            let opt = get_mut(root, &s("opt"));
            let entry = get_mut(get_mut(opt, &s("state")), &Value::Int(1));
            *get_mut(entry, &s("exp_avg")) = t;
        });
        let e = load(&bad_moment);
        assert!(
            e.contains("opt.state[1].exp_avg (encoder.patch_embed.proj.weight)"),
            "{e}"
        );

        // Optimiser groups that don't match the official grouping of this model are refused.
        let regrouped = rewrite(&bytes, |root, _| {
            let Value::List(groups) = get_mut(get_mut(root, &s("opt")), &s("param_groups")) else {
                panic!()
            };
            let Value::List(ids) = get_mut(&mut groups[0], &s("params")) else {
                panic!()
            };
            let moved = ids.pop().unwrap();
            let Value::List(ids) = get_mut(&mut groups[2], &s("params")) else {
                panic!()
            };
            ids.insert(0, moved);
        });
        let e = load(&regrouped);
        assert!(e.contains("opt: param groups of sizes"), "{e}");

        // Without our record, an official file needs the configs.
        let official = rewrite(&bytes, |root, _| {
            let Value::Dict(top) = root else { panic!() };
            top.retain(|(k, _)| *k != Value::Str(META_KEY.into()));
        });
        let e = VJepa::from_pth(&official, None, &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("pass the job config"), "{e}");
        // …and with them, steps_done comes from the AdamW step counts.
        let (r, info) = VJepa::from_pth(&official, Some(&cfg), &Device::Cpu).unwrap();
        assert!(!info.written_by_us);
        assert_eq!(r.steps_done(), 1);
        assert_eq!(contents(&r).0, contents(&m).0);
    }

    #[test]
    fn encoder_only_files() {
        let m = trained(2);
        let bytes = m.to_pth(&PthExport::default()).unwrap();
        let clips = tiny_batch().clips;
        let want = m.target_features(&clips).unwrap();
        let (enc, section) = encoder_from_pth(&bytes, None, &Device::Cpu).unwrap();
        assert_eq!(section, "target_encoder");
        let got = enc.forward(&clips, None).unwrap();
        assert_eq!(
            got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            want.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        // Only an `encoder` dict: it is used; the full model can't be built from it.
        let enc_only = rewrite(&bytes, |root, _| {
            let Value::Dict(top) = root else { panic!() };
            top.retain(|(k, _)| *k == Value::Str("encoder".into()));
        });
        let cfg = m.encoder_config().clone();
        let (_, section) = encoder_from_pth(&enc_only, Some(&cfg), &Device::Cpu).unwrap();
        assert_eq!(section, "encoder");
        let e = VJepa::from_pth(&enc_only, Some(&configs(&m)), &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("no `predictor` state dict"), "{e}");
    }
}
