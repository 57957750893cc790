//! Model and optimisation configurations (spec §3, §4, §7).

use serde::{Deserialize, Serialize};

use crate::ModelError;
use crate::pos_embed::TableLayout;

/// Encoder (ViT) shape. Presets per spec §3; the same shape describes the target encoder.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EncoderConfig {
    /// Token width D.
    pub embed_dim: usize,
    /// Number of transformer blocks.
    pub depth: usize,
    /// Attention heads (head_dim = D / heads).
    pub num_heads: usize,
    /// Hidden width of the block MLP (4·D except vit_giant).
    pub mlp_hidden: usize,
    /// Spatial patch side p.
    pub patch_size: usize,
    /// Temporal tubelet length t.
    pub tubelet_size: usize,
    /// Frames per clip T.
    pub num_frames: usize,
    /// Square crop side S.
    pub crop_size: usize,
    /// Sin-cos table with equal widths per axis (true in every official config).
    pub uniform_power: bool,
}

impl EncoderConfig {
    /// vit_tiny, vit_small, vit_base, vit_large, vit_huge, vit_giant (spec §3 table); None for
    /// unknown names. Input geometry is given separately because the presets only fix the ViT shape.
    pub fn preset(
        name: &str,
        num_frames: usize,
        crop_size: usize,
        patch_size: usize,
        tubelet_size: usize,
        uniform_power: bool,
    ) -> Option<Self> {
        let (embed_dim, depth, num_heads, mlp_hidden) = match name {
            "vit_tiny" => (192, 12, 3, 768),
            "vit_small" => (384, 12, 6, 1536),
            "vit_base" => (768, 12, 12, 3072),
            "vit_large" => (1024, 24, 16, 4096),
            "vit_huge" => (1280, 32, 16, 5120),
            "vit_giant" => (1408, 40, 16, 6144),
            _ => return None,
        };
        Some(Self {
            embed_dim,
            depth,
            num_heads,
            mlp_hidden,
            patch_size,
            tubelet_size,
            num_frames,
            crop_size,
            uniform_power,
        })
    }

    /// Image mode (`num_frames = 1`, the I-JEPA-style case): Conv2d patches `[D, 3, p, p]` and
    /// the 2-D sin-cos table; `tubelet_size` is then unused (as in the reference).
    pub fn is_image(&self) -> bool {
        self.num_frames == 1
    }

    /// Frames one patch spans: the tubelet for video, 1 for images.
    pub fn patch_depth(&self) -> usize {
        if self.is_image() {
            1
        } else {
            self.tubelet_size
        }
    }

    /// Layout of the fixed position tables (encoder and predictor).
    pub fn table_layout(&self) -> TableLayout {
        if self.is_image() {
            TableLayout::Image
        } else {
            TableLayout::Video {
                uniform_power: self.uniform_power,
            }
        }
    }

    /// Token grid (T/t, S/p, S/p), (1, S/p, S/p) for images; zeros if the geometry is degenerate
    /// (see [`Self::validate`]).
    pub fn grid(&self) -> (usize, usize, usize) {
        let gt = self.num_frames.checked_div(self.patch_depth()).unwrap_or(0);
        let gs = self.crop_size.checked_div(self.patch_size).unwrap_or(0);
        (gt, gs, gs)
    }

    /// Token count N of a full clip.
    pub fn num_tokens(&self) -> usize {
        let (gt, gh, gw) = self.grid();
        gt * gh * gw
    }

    /// Values per patch (3·t·p·p, 3·p·p for images): the input width of the patch-embedding
    /// matmul.
    pub fn patch_dim(&self) -> usize {
        3 * self.patch_depth() * self.patch_size * self.patch_size
    }

    /// Shape of `patch_embed.proj.weight`: Conv3d `[D, 3, t, p, p]`, Conv2d `[D, 3, p, p]` for
    /// images (the reference's module and key in both cases).
    pub fn patch_weight_shape(&self) -> Vec<usize> {
        let (d, p) = (self.embed_dim, self.patch_size);
        if self.is_image() {
            vec![d, 3, p, p]
        } else {
            vec![d, 3, self.tubelet_size, p, p]
        }
    }

    /// Checks that the shape can be built, so that later code can index without panicking.
    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |m: String| Err(ModelError::Config(format!("encoder: {m}")));
        if self.embed_dim == 0
            || self.num_heads == 0
            || self.mlp_hidden == 0
            || self.patch_size == 0
            || self.tubelet_size == 0
            || self.num_frames == 0
            || self.crop_size == 0
        {
            return bad(format!("all sizes must be positive: {self:?}"));
        }
        if !self.is_image() && !self.num_frames.is_multiple_of(self.tubelet_size) {
            return bad(format!(
                "num_frames {} is not a multiple of tubelet_size {}",
                self.num_frames, self.tubelet_size
            ));
        }
        if !self.crop_size.is_multiple_of(self.patch_size) {
            return bad(format!(
                "crop_size {} is not a multiple of patch_size {}",
                self.crop_size, self.patch_size
            ));
        }
        if !self.embed_dim.is_multiple_of(self.num_heads) {
            return bad(format!(
                "embed_dim {} is not a multiple of num_heads {}",
                self.embed_dim, self.num_heads
            ));
        }
        self.table_layout().validate(self.embed_dim)?;
        Ok(())
    }
}

/// Predictor (narrow ViT) shape, spec §4. Its MLP hidden width is 4·embed_dim.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PredictorConfig {
    /// Predictor width Dp (384 officially).
    pub embed_dim: usize,
    /// Number of predictor blocks (12 officially).
    pub depth: usize,
    /// Attention heads (officially the encoder's head count).
    pub num_heads: usize,
    /// One learned mask token per mask config (2 officially).
    pub num_mask_tokens: usize,
}

impl PredictorConfig {
    /// MLP hidden width (mlp_ratio 4).
    pub fn mlp_hidden(&self) -> usize {
        4 * self.embed_dim
    }

    /// Checks that the shape can be built together with `encoder`'s geometry.
    pub fn validate(&self, encoder: &EncoderConfig) -> Result<(), ModelError> {
        let bad = |m: String| Err(ModelError::Config(format!("predictor: {m}")));
        if self.embed_dim == 0 || self.num_heads == 0 || self.num_mask_tokens == 0 {
            return bad(format!("sizes must be positive: {self:?}"));
        }
        if !self.embed_dim.is_multiple_of(self.num_heads) {
            return bad(format!(
                "embed_dim {} is not a multiple of num_heads {}",
                self.embed_dim, self.num_heads
            ));
        }
        encoder.table_layout().validate(self.embed_dim)?;
        Ok(())
    }
}

/// Optimisation hyper-parameters (spec §7). Steps are counted per the spec's 1-based rules.
///
/// `total_steps` = schedule length T = int(ipe_scale·epochs·ipe); `warmup_steps` = warmup·ipe;
/// `clip_start_iteration` = (warmup+1)·ipe, the 0-based iteration from which clipping applies.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OptimConfig {
    /// LR at step 0 of the linear warmup.
    pub start_lr: f64,
    /// Peak LR reached at the end of warmup.
    pub lr: f64,
    /// Floor of the cosine decay.
    pub final_lr: f64,
    /// Warmup length W in steps.
    pub warmup_steps: u64,
    /// Schedule length T in steps (LR, WD and EMA all span it).
    pub total_steps: u64,
    /// Weight decay at step 0 (decayed groups only).
    pub weight_decay: f64,
    /// Weight decay at step T.
    pub final_weight_decay: f64,
    /// EMA momentum (start, end) over T.
    pub ema: (f64, f64),
    /// Max total grad norm, applied separately to encoder and predictor; None disables clipping.
    pub clip_grad: Option<f64>,
    /// First 0-based iteration at which clipping applies.
    pub clip_start_iteration: u64,
    /// AdamW (beta1, beta2).
    pub betas: (f64, f64),
    /// AdamW epsilon.
    pub eps: f64,
    /// Loss exponent (1 ⇒ L1).
    pub loss_exp: f64,
    /// Weight of the variance regulariser on the predictions (spec §6.4; 0 in every official
    /// config). Above 0 it counters dimensional collapse in small runs.
    #[serde(default)]
    pub reg_coeff: f64,
}

impl OptimConfig {
    /// The official pretraining values (spec §0/§7) for a run of `epochs` × `ipe` iterations with
    /// `warmup_epochs` of warmup and schedules stretched by `ipe_scale`.
    pub fn official(ipe: u64, epochs: u64, warmup_epochs: u64, ipe_scale: f64) -> Self {
        Self {
            start_lr: 2e-4,
            lr: 6.25e-4,
            final_lr: 1e-6,
            warmup_steps: warmup_epochs * ipe,
            total_steps: (ipe_scale * epochs as f64 * ipe as f64) as u64,
            weight_decay: 0.04,
            final_weight_decay: 0.4,
            ema: (0.998, 1.0),
            clip_grad: Some(10.0),
            clip_start_iteration: (warmup_epochs + 1) * ipe,
            betas: (0.9, 0.999),
            eps: 1e-8,
            loss_exp: 1.0,
            reg_coeff: 0.0,
        }
    }

    /// Rejects values that would make the schedules or AdamW meaningless (NaN, zero length…).
    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |m: &str| Err(ModelError::Config(format!("optim: {m}: {self:?}")));
        let finite = [
            self.start_lr,
            self.lr,
            self.final_lr,
            self.weight_decay,
            self.final_weight_decay,
            self.ema.0,
            self.ema.1,
            self.betas.0,
            self.betas.1,
            self.eps,
            self.loss_exp,
            self.reg_coeff,
        ];
        if finite.iter().any(|v| !v.is_finite()) {
            return bad("non-finite value");
        }
        if self.total_steps == 0 {
            return bad("total_steps must be > 0");
        }
        if !(0.0..1.0).contains(&self.betas.0) || !(0.0..1.0).contains(&self.betas.1) {
            return bad("betas must lie in [0, 1)");
        }
        if self.eps <= 0.0 || self.loss_exp <= 0.0 {
            return bad("eps and loss_exp must be > 0");
        }
        if self.reg_coeff < 0.0 {
            return bad("reg_coeff must be >= 0");
        }
        if let Some(c) = self.clip_grad
            && !(c.is_finite() && c > 0.0)
        {
            return bad("clip_grad must be finite and > 0");
        }
        Ok(())
    }
}

/// The pretraining objective a model trains with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Objective {
    /// V-JEPA: predict the EMA target encoder's features of masked blocks (the default).
    #[default]
    Vjepa,
    /// VideoMAE-style baseline: reconstruct the pixels of masked tubes ([`crate::pixel`]).
    Pixel,
}

impl Objective {
    /// The name used in configs and checkpoint metadata.
    pub fn as_str(self) -> &'static str {
        match self {
            Objective::Vjepa => "vjepa",
            Objective::Pixel => "pixel",
        }
    }
}

impl std::fmt::Display for Objective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Shape of the pixel objective's decoder and its target (VideoMAE-style; see [`crate::pixel`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PixelConfig {
    /// Decoder width (VideoMAE: 384 for ViT-B; light by design).
    pub decoder_dim: usize,
    /// Decoder blocks (VideoMAE: 4).
    pub decoder_depth: usize,
    /// Decoder attention heads.
    pub decoder_heads: usize,
    /// Normalise each target tubelet by its own mean and variance (eps 1e-6) before the loss.
    pub norm_pix: bool,
}

impl PixelConfig {
    /// The decoder as a predictor shape: one mask token, MLP ratio 4.
    pub fn decoder(&self) -> PredictorConfig {
        PredictorConfig {
            embed_dim: self.decoder_dim,
            depth: self.decoder_depth,
            num_heads: self.decoder_heads,
            num_mask_tokens: 1,
        }
    }

    /// Checks that the decoder can be built for `encoder`'s geometry.
    pub fn validate(&self, encoder: &EncoderConfig) -> Result<(), ModelError> {
        self.decoder()
            .validate(encoder)
            .map_err(|e| ModelError::Config(format!("pixel decoder: {e}")))
    }
}
