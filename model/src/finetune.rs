//! End-to-end fine-tuning (`vjepa finetune`, issue 8): the attentive probe of spec §9 trained
//! together with the encoder it reads, so that the backbone adapts to the labelled task instead
//! of being judged frozen.
//!
//! The encoder is a trainable copy of the one given (the source stays untouched). Probe and
//! encoder share the probe's optimisation ([`ProbeOptim`]: AdamW, cosine lr and weight decay,
//! one grad-norm clip over all parameters); the encoder's lr is the head's times
//! `backbone_lr_scale`, a common fine-tuning practice (a lower lr keeps the pretrained features
//! from being overwritten early), not part of the spec.

use candle_core::{DType, Var};

use crate::ModelError;
use crate::Tensor;
use crate::optim::AdamW;
use crate::params::ParamMap;
use crate::probe::{self, AttentiveProbe, ProbeOptim, ProbeStep, cross_entropy};
use crate::vit::Encoder;

/// An encoder and an attentive probe trained together on (clips, labels).
pub struct FineTuner {
    encoder: Encoder,
    probe: AttentiveProbe,
    encoder_opt: AdamW,
    head_opt: AdamW,
    optim: ProbeOptim,
    backbone_lr_scale: f64,
    steps_done: u64,
    /// Whether a trained backbone's blocks run as fused ops ([`Self::set_fused_blocks`]).
    fused_blocks: bool,
}

impl FineTuner {
    /// The backbone's blocks run as fused ops with a written-out backward pass (on, the
    /// default) or op by op on candle's graph (off): see [`crate::VJepa::set_fused_blocks`].
    pub fn set_fused_blocks(&mut self, on: bool) {
        self.fused_blocks = on;
    }

    /// Fine-tunes a copy of `encoder` with `probe` on top; the encoder's lr is the scheduled lr
    /// times `backbone_lr_scale` (≥ 0; 0 keeps the backbone frozen and out of the gradient,
    /// which makes this the frozen probe).
    pub fn new(
        encoder: &Encoder,
        probe: AttentiveProbe,
        optim: ProbeOptim,
        backbone_lr_scale: f64,
    ) -> Result<Self, ModelError> {
        if !(backbone_lr_scale.is_finite() && backbone_lr_scale >= 0.0) {
            return Err(ModelError::Config(format!(
                "backbone lr scale must be finite and ≥ 0, got {backbone_lr_scale}"
            )));
        }
        if probe.config().embed_dim != encoder.config().embed_dim {
            return Err(ModelError::Config(format!(
                "probe of width {} on an encoder of width {}",
                probe.config().embed_dim,
                encoder.config().embed_dim
            )));
        }
        // Trainable copies (detach, then a Var copies the storage).
        let mut map = ParamMap::new();
        for (name, t) in encoder.params() {
            let var = Var::from_tensor(&t.detach().to_dtype(DType::F32)?)?;
            map.insert(name.clone(), var.as_tensor().clone());
        }
        let pos = encoder.pos_embed().to_dtype(DType::F32)?;
        let encoder = Encoder::load(encoder.config(), &map, pos)?;
        // The encoder computes with the Vars' tensors: the optimiser updates them in place.
        let encoder_opt = probe::optimiser(encoder.params().iter().cloned(), &optim)?;
        let head_opt = probe::optimiser(probe.tensors().into_iter(), &optim)?;
        Ok(Self {
            encoder,
            probe,
            encoder_opt,
            head_opt,
            optim,
            backbone_lr_scale,
            steps_done: 0,
            fused_blocks: true,
        })
    }

    /// Tokens of `videos` videos: `clips` `[V·S, 3, T, H, W]` holds each video's `segments`
    /// clips one after the other; their tokens are concatenated into one probe input per video
    /// (`attend_across_segments`, spec §9) → `[V, S·N, D]`.
    fn tokens(&self, clips: &Tensor, segments: usize) -> Result<Tensor, ModelError> {
        self.tokens_with(clips, segments, None)
    }

    /// [`Self::tokens`]; with `side`, the encoder's blocks are fused ops
    /// ([`crate::fused_block`]) whose weights' gradients go there.
    fn tokens_with(
        &self,
        clips: &Tensor,
        segments: usize,
        side: Option<&std::sync::Arc<crate::side_grads::SideGrads>>,
    ) -> Result<Tensor, ModelError> {
        let clips = clips.to_device(self.encoder.device())?;
        let x = self
            .encoder
            .forward_tokens_with(&self.encoder.embed(&clips)?, side)?;
        let (bs, n, d) = x.dims3()?;
        if segments == 0 || !bs.is_multiple_of(segments) {
            return Err(ModelError::Input(format!(
                "{bs} clips are not whole videos of {segments} segments"
            )));
        }
        Ok(x.reshape((bs / segments, segments * n, d))?)
    }

    /// One step on cross-entropy through probe and encoder (schedules at the 1-based step; one
    /// grad-norm clip over both). A non-finite loss is an error and leaves both unchanged.
    pub fn step(
        &mut self,
        clips: &Tensor,
        segments: usize,
        labels: &[u32],
    ) -> Result<ProbeStep, ModelError> {
        let frozen = self.backbone_lr_scale == 0.0;
        // A trained backbone runs its blocks fused, their gradients filed beside the graph's.
        let side = (!frozen && self.fused_blocks).then(|| {
            std::sync::Arc::new(crate::side_grads::SideGrads::fused(
                self.encoder_opt.params().iter().map(|p| &p.var),
            ))
        });
        let tokens = self.tokens_with(clips, segments, side.as_ref())?;
        // A frozen backbone is left out of the graph and of the clip norm: then this is the
        // probe's step exactly.
        let tokens = if frozen { tokens.detach() } else { tokens };
        let logits = self.probe.forward(&tokens)?;
        let correct = probe::correct_of(&logits, labels)?;
        let loss = cross_entropy(&logits, labels)?;
        let step = self.steps_done + 1;
        let mut s = if frozen {
            probe::optimise(
                &loss,
                step,
                &self.optim,
                &mut [(&mut self.head_opt, 1.0)],
                None,
            )?
        } else {
            probe::optimise(
                &loss,
                step,
                &self.optim,
                &mut [
                    (&mut self.head_opt, 1.0),
                    (&mut self.encoder_opt, self.backbone_lr_scale),
                ],
                side.as_deref(),
            )?
        };
        self.steps_done = s.step;
        s.correct = correct;
        Ok(s)
    }

    /// What training continues from after a stop (encoder and probe with their AdamW moments
    /// and step counts), as safetensors bytes with the caller's `meta` beside.
    pub fn save_state(
        &self,
        meta: std::collections::HashMap<String, String>,
    ) -> Result<Vec<u8>, ModelError> {
        crate::train_state::write(
            &[("encoder", &self.encoder_opt), ("head", &self.head_opt)],
            self.steps_done,
            meta,
        )
    }

    /// Continues from [`Self::save_state`]'s bytes (the same shapes); returns their metadata.
    /// Nothing changes when they do not fit.
    pub fn restore_state(
        &mut self,
        bytes: &[u8],
    ) -> Result<std::collections::HashMap<String, String>, ModelError> {
        let (steps, meta) = crate::train_state::read(
            bytes,
            &mut [
                ("encoder", &mut self.encoder_opt),
                ("head", &mut self.head_opt),
            ],
        )?;
        self.steps_done = steps;
        Ok(meta)
    }

    /// Class probabilities `[V, classes]` of videos laid out as for [`Self::step`] (no graph).
    pub fn probabilities(&self, clips: &Tensor, segments: usize) -> Result<Tensor, ModelError> {
        Ok(self
            .probe
            .probabilities(&self.tokens(clips, segments)?.detach())?
            .detach())
    }

    /// Mean cross-entropy of a batch (no update), e.g. to follow the loss.
    pub fn loss(&self, clips: &Tensor, segments: usize, labels: &[u32]) -> Result<f64, ModelError> {
        let logits = self
            .probe
            .forward(&self.tokens(clips, segments)?.detach())?;
        Ok(cross_entropy(&logits, labels)?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?)
    }

    /// The encoder being fine-tuned.
    pub fn encoder(&self) -> &Encoder {
        &self.encoder
    }

    /// The probe being trained.
    pub fn probe(&self) -> &AttentiveProbe {
        &self.probe
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Device;
    use crate::config::EncoderConfig;
    use crate::params::InitRng;
    use crate::probe::ProbeConfig;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn tiny_encoder() -> Encoder {
        let cfg = EncoderConfig {
            embed_dim: 32,
            depth: 2,
            num_heads: 2,
            mlp_hidden: 64,
            patch_size: 16,
            tubelet_size: 2,
            num_frames: 2,
            crop_size: 32,
            uniform_power: true,
        };
        let mut rng = InitRng::new(3).unwrap();
        let mut map = ParamMap::new();
        for s in Encoder::param_specs(&cfg) {
            let t = Tensor::from_vec(rng.values(&s), s.shape.as_slice(), &Device::Cpu).unwrap();
            map.insert(s.name, t);
        }
        let pos = crate::pos_embed::sincos_table_tensor(
            cfg.embed_dim,
            cfg.grid(),
            cfg.table_layout(),
            &Device::Cpu,
        )
        .unwrap();
        Encoder::load(&cfg, &map, pos).unwrap()
    }

    /// Clips whose class is which colour channel is lifted, over noise.
    fn batch(rng: &mut ChaCha8Rng, videos: usize, segments: usize) -> (Tensor, Vec<u32>) {
        let per_channel = 2 * 32 * 32;
        let mut data = Vec::new();
        let mut labels = Vec::new();
        for _ in 0..videos {
            let label = rng.random_range(0..3u32);
            for _ in 0..segments {
                for c in 0..3 {
                    let lift = if c == label { 1.0 } else { 0.0 };
                    data.extend((0..per_channel).map(|_| lift + rng.random_range(-1.0f32..1.0)));
                }
            }
            labels.push(label);
        }
        let x = Tensor::from_vec(data, (videos * segments, 3, 2, 32, 32), &Device::Cpu).unwrap();
        (x, labels)
    }

    /// A head for [`tiny_encoder`]: 3 classes.
    fn probe_config() -> ProbeConfig {
        ProbeConfig {
            embed_dim: 32,
            num_heads: 2,
            num_classes: 3,
            mlp_ratio: 4.0,
        }
    }

    fn params_of(e: &Encoder) -> Vec<Vec<f32>> {
        e.params()
            .iter()
            .map(|(_, t)| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            .collect()
    }

    /// Stopped after some steps and continued from the saved state in a tuner built afresh,
    /// fine-tuning ends where an uninterrupted run does, to the bit (encoder and head values,
    /// moments, step counts, schedules); a state of another shape is refused and changes
    /// nothing.
    #[test]
    fn continues_from_a_saved_state() {
        let source = tiny_encoder();
        let probe_cfg = probe_config();
        let mut optim = ProbeOptim::video(6);
        optim.lr = 3e-3;
        let fresh = || {
            let probe = AttentiveProbe::new(probe_cfg.clone(), 5, &Device::Cpu).unwrap();
            FineTuner::new(&source, probe, optim.clone(), 0.5).unwrap()
        };
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let batches: Vec<_> = (0..6).map(|_| batch(&mut rng, 4, 2)).collect();
        let mut whole = fresh();
        for (x, y) in &batches {
            whole.step(x, 2, y).unwrap();
        }
        let mut first = fresh();
        for (x, y) in &batches[..3] {
            first.step(x, 2, y).unwrap();
        }
        let meta = std::collections::HashMap::from([("epoch".to_string(), "1".to_string())]);
        let bytes = first.save_state(meta).unwrap();
        drop(first);
        let mut resumed = fresh();
        let back = resumed.restore_state(&bytes).unwrap();
        assert_eq!(back.get("epoch").map(String::as_str), Some("1"));
        let mut last = None;
        for (x, y) in &batches[3..] {
            last = Some(resumed.step(x, 2, y).unwrap());
        }
        assert_eq!(last.unwrap().step, 6);
        assert_eq!(params_of(resumed.encoder()), params_of(whole.encoder()));
        let head = |t: &FineTuner| {
            t.probe()
                .tensors()
                .into_iter()
                .map(|(_, t)| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(head(&resumed), head(&whole));

        // Another head shape: refused, the tuner untouched.
        let other = ProbeConfig {
            num_classes: 4,
            ..probe_cfg.clone()
        };
        let probe = AttentiveProbe::new(other, 5, &Device::Cpu).unwrap();
        let mut wrong = FineTuner::new(&source, probe, optim.clone(), 0.5).unwrap();
        let before = params_of(wrong.encoder());
        assert!(wrong.restore_state(&bytes).is_err());
        assert_eq!(params_of(wrong.encoder()), before);
        assert!(wrong.restore_state(b"not a state").is_err());
    }

    /// Fine-tuning moves the encoder's weights (not the source's) and lowers the loss on a
    /// fixed task; a zero backbone scale keeps the encoder as it was.
    #[test]
    fn trains_the_encoder_and_lowers_the_loss() {
        let source = tiny_encoder();
        let before = params_of(&source);
        let probe_cfg = probe_config();
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let (eval_x, eval_y) = batch(&mut rng, 32, 2);
        let steps = 40;
        let mut optim = ProbeOptim::video(steps);
        optim.lr = 3e-3;
        let probe = AttentiveProbe::new(probe_cfg.clone(), 5, &Device::Cpu).unwrap();
        let mut ft = FineTuner::new(&source, probe, optim.clone(), 1.0).unwrap();
        let initial = ft.loss(&eval_x, 2, &eval_y).unwrap();
        for _ in 0..steps {
            let (x, y) = batch(&mut rng, 8, 2);
            let s = ft.step(&x, 2, &y).unwrap();
            assert!(s.loss.is_finite() && s.grad_norm > 0.0);
        }
        let trained = ft.loss(&eval_x, 2, &eval_y).unwrap();
        assert!(trained < 0.5 * initial, "loss {initial} → {trained}");
        let after = params_of(ft.encoder());
        let moved = before
            .iter()
            .zip(&after)
            .filter(|(a, b)| a.iter().zip(b.iter()).any(|(x, y)| x != y))
            .count();
        assert_eq!(moved, before.len(), "every encoder tensor gets a gradient");
        assert_eq!(
            params_of(&source),
            before,
            "the source encoder is untouched"
        );
        // Probabilities: one row per video, each summing to 1.
        let p = ft
            .probabilities(&eval_x, 2)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(p.len(), 32);
        assert!(p.iter().all(|r| (r.iter().sum::<f32>() - 1.0).abs() < 1e-5));
        // The fine-tuned encoder round-trips through its own checkpoint.
        let back = Encoder::from_safetensors(&ft.encoder().to_safetensors().unwrap(), &Device::Cpu)
            .unwrap();
        assert_eq!(params_of(&back), after);

        // Fused blocks (the default) against the blocks on candle's graph: the same steps.
        let probe_a = AttentiveProbe::new(probe_cfg.clone(), 5, &Device::Cpu).unwrap();
        let probe_b = AttentiveProbe::new(probe_cfg.clone(), 5, &Device::Cpu).unwrap();
        let mut fused = FineTuner::new(&source, probe_a, optim.clone(), 1.0).unwrap();
        let mut graph = FineTuner::new(&source, probe_b, optim.clone(), 1.0).unwrap();
        graph.set_fused_blocks(false);
        for _ in 0..2 {
            let (x, y) = batch(&mut rng, 4, 2);
            let before = crate::fused_block::applied();
            let a = fused.step(&x, 2, &y).unwrap();
            assert!(crate::fused_block::applied() > before, "fused op not taken");
            let b = graph.step(&x, 2, &y).unwrap();
            assert_eq!(a.loss.to_bits(), b.loss.to_bits());
            assert_eq!(a.grad_norm.to_bits(), b.grad_norm.to_bits());
        }
        assert_eq!(params_of(fused.encoder()), params_of(graph.encoder()));

        // Scale 0: only the head learns.
        let probe = AttentiveProbe::new(probe_cfg, 5, &Device::Cpu).unwrap();
        let mut frozen = FineTuner::new(&source, probe, optim, 0.0).unwrap();
        let (x, y) = batch(&mut rng, 8, 2);
        frozen.step(&x, 2, &y).unwrap();
        assert_eq!(params_of(frozen.encoder()), before);
        assert!(FineTuner::new(&source, frozen.probe, ProbeOptim::video(1), -1.0).is_err());
    }
}
