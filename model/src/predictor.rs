//! V-JEPA predictor (spec §4): a narrow ViT that sees the context tokens plus one learned mask
//! token per target position and predicts the target encoder's features there.
//!
//! The same module, with a head of another width, is the pixel objective's decoder
//! ([`crate::pixel`]): it predicts the pixels of the masked tubelets instead.

use candle_core::Tensor;

use crate::ModelError;
use crate::config::{EncoderConfig, PredictorConfig};
use crate::kernels;
use crate::layers::{LayerNorm, Linear};
use crate::params::{Init, ParamMap, ParamSpec};
use crate::tokens::TokenIndex;
use crate::vit::{Block, LN_EPS};

/// The predictor with its fixed `[1, N, Dp]` sin-cos table.
#[derive(Clone, Debug)]
pub struct Predictor {
    cfg: PredictorConfig,
    encoder_dim: usize,
    embed: Linear,
    mask_tokens: Vec<Tensor>,
    pos_embed: Tensor,
    blocks: Vec<Block>,
    norm: LayerNorm,
    proj: Linear,
}

impl Predictor {
    /// Trainable parameters in registration order (the fixed `predictor_pos_embed` excluded).
    pub fn param_specs(enc: &EncoderConfig, cfg: &PredictorConfig) -> Vec<ParamSpec> {
        Self::param_specs_with_head(enc, cfg, enc.embed_dim)
    }

    /// [`Self::param_specs`] with a head (`predictor_proj`) of `out_dim` outputs instead of the
    /// encoder width.
    pub fn param_specs_with_head(
        enc: &EncoderConfig,
        cfg: &PredictorConfig,
        out_dim: usize,
    ) -> Vec<ParamSpec> {
        let (d, dp) = (enc.embed_dim, cfg.embed_dim);
        let mut out = Vec::new();
        Linear::specs("predictor_embed", d, dp, &mut out);
        for i in 0..cfg.num_mask_tokens {
            out.push(ParamSpec::new(
                format!("mask_tokens.{i}"),
                &[1, 1, dp],
                Init::Zeros,
            ));
        }
        for j in 0..cfg.depth {
            Block::specs(
                &format!("predictor_blocks.{j}"),
                dp,
                cfg.mlp_hidden(),
                &mut out,
            );
        }
        LayerNorm::specs("predictor_norm", dp, &mut out);
        Linear::specs("predictor_proj", dp, out_dim, &mut out);
        out
    }

    /// Builds from `params` and the fixed `[1, N, Dp]` table.
    pub fn load(
        enc: &EncoderConfig,
        cfg: &PredictorConfig,
        params: &ParamMap,
        pos_embed: Tensor,
    ) -> Result<Self, ModelError> {
        Self::load_with_head(enc, cfg, params, pos_embed, enc.embed_dim)
    }

    /// [`Self::load`] for the specs of [`Self::param_specs_with_head`].
    pub fn load_with_head(
        enc: &EncoderConfig,
        cfg: &PredictorConfig,
        params: &ParamMap,
        pos_embed: Tensor,
        out_dim: usize,
    ) -> Result<Self, ModelError> {
        cfg.validate(enc)?;
        let (d, dp) = (enc.embed_dim, cfg.embed_dim);
        let want = [1, enc.num_tokens(), dp];
        if pos_embed.dims() != want {
            return Err(ModelError::TensorShape {
                name: "predictor_pos_embed".into(),
                expected: want.to_vec(),
                actual: pos_embed.dims().to_vec(),
            });
        }
        let mask_tokens = (0..cfg.num_mask_tokens)
            .map(|i| params.get(&format!("mask_tokens.{i}"), &[1, 1, dp]))
            .collect::<Result<Vec<_>, _>>()?;
        let blocks = (0..cfg.depth)
            .map(|j| {
                Block::load(
                    params,
                    &format!("predictor_blocks.{j}"),
                    dp,
                    cfg.mlp_hidden(),
                    cfg.num_heads,
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            cfg: cfg.clone(),
            encoder_dim: d,
            embed: Linear::load(params, "predictor_embed", d, dp)?,
            mask_tokens,
            pos_embed,
            blocks,
            norm: LayerNorm::load(params, "predictor_norm", dp, LN_EPS)?,
            proj: Linear::load(params, "predictor_proj", dp, out_dim)?,
        })
    }

    /// The fixed `[1, N, Dp]` table (3-D, or 2-D in image mode). It is never resized (spec §2):
    /// context and target indices always refer to the configured token grid.
    pub fn pos_embed(&self) -> &Tensor {
        &self.pos_embed
    }

    /// Predicts `[B, Kt, D]` (`[B, Kt, out_dim]` with another head) for mask config `mask`
    /// from the context encoding `z` `[B, Kc, D]`.
    ///
    /// Tokens are [context (embedded + pos), mask token + pos at each target]; all attend to all;
    /// only the target outputs are normalised and projected back to the encoder width (LayerNorm is
    /// per token, so normalising just those equals the official norm-then-select).
    pub fn forward(
        &self,
        z: &Tensor,
        context: &TokenIndex,
        target: &TokenIndex,
        mask: usize,
    ) -> Result<Tensor, ModelError> {
        self.forward_with(z, context, target, mask, None)
    }

    /// [`Self::forward`]; with `checkpoint`, the blocks keep only their inputs for the backward
    /// pass ([`crate::checkpointing`]).
    pub fn forward_with(
        &self,
        z: &Tensor,
        context: &TokenIndex,
        target: &TokenIndex,
        mask: usize,
        checkpoint: Option<&std::sync::Arc<crate::side_grads::SideGrads>>,
    ) -> Result<Tensor, ModelError> {
        let token = self.mask_tokens.get(mask).ok_or_else(|| {
            ModelError::Input(format!(
                "mask config {mask} but the predictor has {} mask tokens",
                self.cfg.num_mask_tokens
            ))
        })?;
        let (b, kc, d) = z.dims3()?;
        if d != self.encoder_dim
            || kc != context.len()
            || b != context.batch()
            || b != target.batch()
        {
            return Err(ModelError::Input(format!(
                "predictor input {:?} does not match context indices [{}, {}] / width {}",
                z.dims(),
                context.batch(),
                context.len(),
                self.encoder_dim
            )));
        }
        let ctx = self
            .embed
            .forward(z)?
            .add(&context.gather_table(&self.pos_embed)?)?;
        // The mask token as a bias: its gradient is then our column sum over the B·K target
        // rows, not candle's sum over broadcast dims (slow on a GPU).
        let tgt = kernels::bias_add(
            &target.gather_table(&self.pos_embed)?,
            &token.reshape(self.cfg.embed_dim)?,
        )?;
        let mut x = Tensor::cat(&[&ctx, &tgt], 1)?;
        for blk in &self.blocks {
            x = match checkpoint {
                Some(side) => crate::side_grads::block_forward(blk, &x, side)?,
                None => blk.forward(&x)?,
            };
        }
        let x = x.narrow(1, kc, target.len())?;
        self.proj.forward(&self.norm.forward(&x)?)
    }
}
