//! Introspection: build a model from given weights and read what a training step computes —
//! intermediate outputs, gradients, parameters, optimiser moments, the EMA target.
//!
//! This is what golden tests against our PyTorch reference (`tools/reference/`) and weight
//! import tools need; training itself never calls it. Tensor names are the checkpoint names of
//! [`VJepa::to_safetensors`]: `encoder.<key>`, `predictor.<key>`, `target_encoder.<key>` with the
//! official keys of spec §8.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};

use crate::params::ParamSpec;
use crate::predictor::Predictor;
use crate::vit::Encoder;
use crate::{
    EncoderConfig, ModelError, OptimConfig, Parts, PredictorConfig, TrainBatch, VJepa, checkpoint,
    loss, pos_embed,
};

/// The intermediate tensors of one forward pass (spec §6), for comparison with a reference.
#[derive(Clone, Debug)]
pub struct ForwardDetail {
    /// Target-encoder output on the full clips `[B, N, D]` (after its final LayerNorm, before the
    /// loss's non-affine LayerNorm).
    pub target_features: Tensor,
    /// Per mask config: encoder output on the context tokens `[B, Kc, D]`.
    pub context: Vec<Tensor>,
    /// Per mask config: normalised target features at the target tokens `[B, Kt, D]`.
    pub targets: Vec<Tensor>,
    /// Per mask config: predictor output `[B, Kt, D]`.
    pub predictions: Vec<Tensor>,
    /// Per mask config: the L1 loss.
    pub losses: Vec<f64>,
    /// Mean of `losses` (the training loss).
    pub loss: f64,
}

fn scalar(t: &Tensor) -> Result<f64, ModelError> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

impl VJepa {
    /// A fresh (step 0) model with the given weights: `encoder.<key>` and `predictor.<key>` for
    /// every trainable parameter, optionally `target_encoder.<key>` (all or none; by default the
    /// target is a copy of the encoder, as at the start of training). The fixed sin-cos tables are
    /// built from the config; other entries of `tensors` are ignored, so a whole checkpoint or
    /// golden file can be passed. Tensors are converted to f32 on `device`. Seed is 0.
    pub fn from_tensors(
        encoder: EncoderConfig,
        predictor: PredictorConfig,
        optim: OptimConfig,
        tensors: &HashMap<String, Tensor>,
        device: &Device,
    ) -> Result<Self, ModelError> {
        Self::validate_configs(&encoder, &predictor, &optim)?;
        let take =
            |prefix: &str, specs: &[ParamSpec]| -> Result<Vec<(String, Tensor)>, ModelError> {
                specs
                    .iter()
                    .map(|s| {
                        let name = format!("{prefix}.{}", s.name);
                        let t = tensors
                            .get(&name)
                            .ok_or_else(|| ModelError::MissingTensor(name.clone()))?;
                        if t.dims() != s.shape.as_slice() {
                            return Err(ModelError::TensorShape {
                                name,
                                expected: s.shape.clone(),
                                actual: t.dims().to_vec(),
                            });
                        }
                        // A copy, so the model never shares storage with the caller's tensors.
                        let t = t.to_dtype(DType::F32)?.to_device(device)?.copy()?;
                        Ok((s.name.clone(), t))
                    })
                    .collect()
            };
        let enc_specs = Encoder::param_specs(&encoder);
        let enc = take("encoder", &enc_specs)?;
        let pred = take("predictor", &Predictor::param_specs(&encoder, &predictor))?;
        let has_target = tensors.keys().any(|k| k.starts_with("target_encoder."));
        let target = if has_target {
            take("target_encoder", &enc_specs)?
        } else {
            enc.iter()
                .map(|(n, t)| Ok((n.clone(), t.copy()?)))
                .collect::<Result<Vec<_>, ModelError>>()?
        };
        let (grid, layout) = (encoder.grid(), encoder.table_layout());
        let encoder_pos = pos_embed::sincos_table_tensor(encoder.embed_dim, grid, layout, device)?;
        let predictor_pos =
            pos_embed::sincos_table_tensor(predictor.embed_dim, grid, layout, device)?;
        let parts = Parts {
            encoder: enc,
            predictor: pred,
            target,
            target_pos: encoder_pos.copy()?,
            encoder_pos,
            predictor_pos,
            opt_state: None,
        };
        Self::assemble(encoder, predictor, optim, 0, device, parts, 0)
    }

    /// The fixed sin-cos tables (encoder `[1, N, D]`, predictor `[1, N, Dp]`).
    pub fn pos_tables(&self) -> (Tensor, Tensor) {
        (
            self.encoder.pos_embed().clone(),
            self.predictor.pos_embed().clone(),
        )
    }

    /// The trainable parameters as (full name, Var), encoder first. This is the one place that
    /// reads the optimiser's parameter records.
    fn named_vars(&self) -> Vec<(String, Var)> {
        self.opt
            .params()
            .iter()
            .map(|p| (p.name.clone(), p.var.clone()))
            .collect()
    }

    /// One forward pass of [`Self::train_step`] without backward or update, keeping the
    /// intermediate tensors (detached).
    pub fn forward_detail(&self, batch: &TrainBatch) -> Result<ForwardDetail, ModelError> {
        let (clips, b) = self.prepare_clips(&batch.clips)?;
        let masks = self.mask_indices(batch, b)?;
        let target_features = self.target.forward(&clips, None)?.detach();
        let h = loss::normalize_targets(&target_features)?;
        let tokens = self.encoder.embed(&clips)?;
        let (mut context, mut targets, mut predictions) = (Vec::new(), Vec::new(), Vec::new());
        for (i, (ctx, tgt)) in masks.iter().enumerate() {
            let z = self.encoder.forward_tokens(&ctx.gather(&tokens)?)?;
            predictions.push(self.predictor.forward(&z, ctx, tgt, i)?.detach());
            context.push(z.detach());
            targets.push(tgt.gather(&h)?);
        }
        let (total, per) = loss::jepa_loss(&predictions, &targets, &self.optim_cfg)?;
        Ok(ForwardDetail {
            target_features,
            context,
            targets,
            predictions,
            losses: per.iter().map(scalar).collect::<Result<_, _>>()?,
            loss: scalar(&total)?,
        })
    }

    /// The loss and the (pre-clip) gradient of every trainable parameter for `batch`, computed by
    /// the same forward/backward as [`Self::train_step`]; the model is not changed. Parameters
    /// without a gradient are absent.
    pub fn gradients(
        &self,
        batch: &TrainBatch,
    ) -> Result<(f64, Vec<(String, Tensor)>), ModelError> {
        let (clips, b) = self.prepare_clips(&batch.clips)?;
        let masks = self.mask_indices(batch, b)?;
        let (total, _) = self.forward_loss(&clips, &masks)?;
        let grads = total.backward()?;
        let named = self
            .named_vars()
            .into_iter()
            .filter_map(|(name, var)| grads.get(var.as_tensor()).map(|g| (name, g.clone())))
            .collect();
        Ok((scalar(&total)?, named))
    }

    /// Current trainable parameters by full name (`encoder.*`, then `predictor.*`), detached.
    pub fn named_parameters(&self) -> Vec<(String, Tensor)> {
        self.named_vars()
            .into_iter()
            .map(|(name, var)| (name, var.as_detached_tensor()))
            .collect()
    }

    /// Current EMA target weights as `target_encoder.<key>`.
    pub fn target_parameters(&self) -> Vec<(String, Tensor)> {
        self.target_params
            .iter()
            .map(|(name, t)| (format!("target_encoder.{name}"), t.clone()))
            .collect()
    }

    /// AdamW moments (exp_avg, exp_avg_sq) by full parameter name, read back from the checkpoint
    /// encoding so that this does not depend on how the optimiser stores them.
    pub fn moments(&self) -> Result<Vec<(String, Tensor, Tensor)>, ModelError> {
        let bytes = self.to_safetensors()?;
        let r = checkpoint::Reader::parse(&bytes)?;
        self.named_vars()
            .into_iter()
            .map(|(name, var)| {
                let shape = var.dims().to_vec();
                let m = r.tensor(&format!("opt.exp_avg.{name}"), &shape, &self.device)?;
                let v = r.tensor(&format!("opt.exp_avg_sq.{name}"), &shape, &self.device)?;
                Ok((name, m, v))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MaskIndices;
    use crate::layers::tests::values;

    fn configs() -> (EncoderConfig, PredictorConfig, OptimConfig) {
        let enc = EncoderConfig {
            embed_dim: 16,
            depth: 1,
            num_heads: 2,
            mlp_hidden: 32,
            patch_size: 8,
            tubelet_size: 2,
            num_frames: 4,
            crop_size: 16,
            uniform_power: true,
        };
        let pred = PredictorConfig {
            embed_dim: 8,
            depth: 1,
            num_heads: 2,
            num_mask_tokens: 2,
        };
        (enc, pred, OptimConfig::official(10, 10, 1, 1.25))
    }

    /// B = 2 on the (2, 2, 2) grid.
    fn batch() -> TrainBatch {
        let dev = Device::Cpu;
        let clips: Vec<f32> = values(2 * 3 * 4 * 16 * 16, 5)
            .iter()
            .map(|&v| v as f32)
            .collect();
        let idx = |v: &[u32], k: usize| Tensor::from_vec(v.to_vec(), (2, k), &dev).unwrap();
        TrainBatch {
            clips: Tensor::from_vec(clips, (2, 3, 4, 16, 16), &dev).unwrap(),
            masks: vec![
                MaskIndices {
                    context: idx(&[0, 1, 2, 5, 6, 7], 3),
                    target: idx(&[3, 4, 0, 1], 2),
                },
                MaskIndices {
                    context: idx(&[7, 0], 1),
                    target: idx(&[0, 1, 2, 1, 2, 3], 3),
                },
            ],
        }
    }

    fn all_tensors(m: &VJepa) -> HashMap<String, Tensor> {
        m.named_parameters()
            .into_iter()
            .chain(m.target_parameters())
            .collect()
    }

    fn flat(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    #[test]
    fn from_tensors_rebuilds_the_same_model() {
        let (enc, pred, optim) = configs();
        let dev = Device::Cpu;
        let a = VJepa::new(enc.clone(), pred.clone(), optim.clone(), 3, &dev).unwrap();
        let b = VJepa::from_tensors(enc, pred, optim, &all_tensors(&a), &dev).unwrap();
        let (da, db) = (
            a.forward_detail(&batch()).unwrap(),
            b.forward_detail(&batch()).unwrap(),
        );
        assert_eq!(da.loss, db.loss);
        assert_eq!(flat(&da.predictions[1]), flat(&db.predictions[1]));
        assert_eq!(flat(&da.target_features), flat(&db.target_features));
        let ((la, ga), (lb, gb)) = (
            a.gradients(&batch()).unwrap(),
            b.gradients(&batch()).unwrap(),
        );
        assert_eq!(la, lb);
        assert_eq!(la, da.loss, "forward_detail and the training forward agree");
        assert_eq!(ga.len(), a.named_parameters().len());
        for ((na, ta), (nb, tb)) in ga.iter().zip(&gb) {
            assert_eq!(na, nb);
            assert_eq!(flat(ta), flat(tb), "{na}");
        }
    }

    #[test]
    fn from_tensors_names_missing_and_misshapen_tensors() {
        let (enc, pred, optim) = configs();
        let dev = Device::Cpu;
        let a = VJepa::new(enc.clone(), pred.clone(), optim.clone(), 3, &dev).unwrap();
        let mut map = all_tensors(&a);
        map.remove("predictor.mask_tokens.1");
        let e = VJepa::from_tensors(enc.clone(), pred.clone(), optim.clone(), &map, &dev);
        assert!(matches!(e, Err(ModelError::MissingTensor(n)) if n == "predictor.mask_tokens.1"));
        let mut map = all_tensors(&a);
        map.insert(
            "encoder.norm.bias".into(),
            Tensor::zeros(3, DType::F32, &dev).unwrap(),
        );
        let e = VJepa::from_tensors(enc.clone(), pred.clone(), optim.clone(), &map, &dev);
        assert!(
            matches!(e, Err(ModelError::TensorShape { name, .. }) if name == "encoder.norm.bias")
        );
        // A partial target is refused rather than silently replaced by the encoder.
        let mut map = all_tensors(&a);
        map.remove("target_encoder.norm.weight");
        let e = VJepa::from_tensors(enc, pred, optim, &map, &dev);
        assert!(
            matches!(e, Err(ModelError::MissingTensor(n)) if n == "target_encoder.norm.weight")
        );
    }

    #[test]
    fn gradients_leave_the_model_alone_and_moments_follow_steps() {
        let (enc, pred, optim) = configs();
        let mut m = VJepa::new(enc, pred, optim, 4, &Device::Cpu).unwrap();
        let before = m.named_parameters();
        let (_, grads) = m.gradients(&batch()).unwrap();
        for ((n, p), (_, q)) in before.iter().zip(m.named_parameters()) {
            assert_eq!(flat(p), flat(&q), "{n} changed");
        }
        assert!(m.moments().unwrap().iter().all(|(_, e, v)| {
            flat(e).iter().all(|&x| x == 0.0) && flat(v).iter().all(|&x| x == 0.0)
        }));
        m.train_step(&batch()).unwrap();
        let moments = m.moments().unwrap();
        assert_eq!(moments.len(), grads.len());
        // After one step exp_avg = (1 - β1)·g, exp_avg_sq = (1 - β2)·g² (no clipping yet).
        for ((name, e, v), (gn, g)) in moments.iter().zip(&grads) {
            assert_eq!(name, gn);
            for ((e, v), g) in flat(e).iter().zip(flat(v)).zip(flat(g)) {
                assert!((e - 0.1 * g).abs() <= 1e-6 * g.abs().max(1e-12), "{name}");
                assert!(
                    (v - 0.001 * g * g).abs() <= 1e-5 * (g * g).max(1e-24),
                    "{name}"
                );
            }
        }
    }
}
