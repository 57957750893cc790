//! Video ViT encoder (spec §2–§3): tubelet patch embedding (2-D patches for images), fixed
//! sin-cos positions (resized for other clip sizes),
//! pre-norm blocks, final LayerNorm. Parameter names equal the official state-dict keys
//! (without `module.backbone.`), e.g. `blocks.0.attn.qkv.weight`.

use candle_core::{Device, Tensor};

use crate::ModelError;
use crate::config::EncoderConfig;
use crate::kernels;
use crate::layers::{LayerNorm, Linear};
use crate::params::{Init, ParamMap, ParamSpec};
use crate::pos_embed;
use crate::tokens::TokenIndex;

/// LayerNorm eps of every model LayerNorm (spec §3).
pub const LN_EPS: f64 = 1e-6;

/// `format` metadata of an encoder-only checkpoint ([`Encoder::to_safetensors`]).
pub const ENCODER_FORMAT: &str = "vjepa-stream.encoder-v1";

/// Multi-head self-attention: fused qkv Linear (rows [q | k | v], heads contiguous), softmax
/// attention with scale 1/sqrt(head_dim) (one fused kernel reading the qkv output in place),
/// output Linear. No mask, no dropout.
#[derive(Clone, Debug)]
pub struct Attention {
    qkv: Linear,
    proj: Linear,
    num_heads: usize,
}

impl Attention {
    /// Specs of `{prefix}.qkv.*` and `{prefix}.proj.*`.
    pub fn specs(prefix: &str, dim: usize, out: &mut Vec<ParamSpec>) {
        Linear::specs(&format!("{prefix}.qkv"), dim, 3 * dim, out);
        Linear::specs(&format!("{prefix}.proj"), dim, dim, out);
    }

    /// Builds from `params`.
    pub fn load(
        params: &ParamMap,
        prefix: &str,
        dim: usize,
        num_heads: usize,
    ) -> Result<Self, ModelError> {
        if num_heads == 0 || !dim.is_multiple_of(num_heads) {
            return Err(ModelError::Config(format!(
                "{prefix}: dim {dim} not divisible by {num_heads} heads"
            )));
        }
        Ok(Self {
            qkv: Linear::load(params, &format!("{prefix}.qkv"), dim, 3 * dim)?,
            proj: Linear::load(params, &format!("{prefix}.proj"), dim, dim)?,
            num_heads,
        })
    }

    fn detached(&self) -> Self {
        Self {
            qkv: self.qkv.detached(),
            proj: self.proj.detached(),
            num_heads: self.num_heads,
        }
    }

    /// x `[B, K, D]` → `[B, K, D]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor, ModelError> {
        let qkv = self.qkv.forward(x)?;
        self.proj
            .forward(&kernels::attention(&qkv, self.num_heads)?)
    }
}

/// Two-layer MLP with exact GELU (fc1's bias fused into the activation).
#[derive(Clone, Debug)]
pub struct Mlp {
    fc1: Linear,
    fc2: Linear,
}

impl Mlp {
    /// Specs of `{prefix}.fc1.*` / `{prefix}.fc2.*`.
    pub fn specs(prefix: &str, dim: usize, hidden: usize, out: &mut Vec<ParamSpec>) {
        Linear::specs(&format!("{prefix}.fc1"), dim, hidden, out);
        Linear::specs(&format!("{prefix}.fc2"), hidden, dim, out);
    }

    /// Builds from `params`.
    pub fn load(
        params: &ParamMap,
        prefix: &str,
        dim: usize,
        hidden: usize,
    ) -> Result<Self, ModelError> {
        Ok(Self {
            fc1: Linear::load(params, &format!("{prefix}.fc1"), dim, hidden)?,
            fc2: Linear::load(params, &format!("{prefix}.fc2"), hidden, dim)?,
        })
    }

    fn detached(&self) -> Self {
        Self {
            fc1: self.fc1.detached(),
            fc2: self.fc2.detached(),
        }
    }

    /// x `[.., D]` → `[.., D]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor, ModelError> {
        let h = self.fc1.matmul(x)?;
        let h = match self.fc1.bias() {
            Some(b) => kernels::bias_gelu(&h, b)?,
            None => {
                let zero = Tensor::zeros(h.dim(candle_core::D::Minus1)?, h.dtype(), h.device())?;
                kernels::bias_gelu(&h, &zero)?
            }
        };
        self.fc2.forward(&h)
    }
}

/// A block's tensors in forward order: LayerNorms as (γ, β, eps), Linears as (W, b).
pub(crate) struct BlockTensors {
    pub norm1: (Tensor, Tensor, f64),
    pub qkv: (Tensor, Tensor),
    pub num_heads: usize,
    pub proj: (Tensor, Tensor),
    pub norm2: (Tensor, Tensor, f64),
    pub fc1: (Tensor, Tensor),
    pub fc2: (Tensor, Tensor),
}

/// Pre-norm transformer block: x += Attn(LN1 x); x += MLP(LN2 x).
#[derive(Clone, Debug)]
pub struct Block {
    norm1: LayerNorm,
    attn: Attention,
    norm2: LayerNorm,
    mlp: Mlp,
}

impl Block {
    /// Specs in the official registration order: norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2.
    pub fn specs(prefix: &str, dim: usize, hidden: usize, out: &mut Vec<ParamSpec>) {
        LayerNorm::specs(&format!("{prefix}.norm1"), dim, out);
        Attention::specs(&format!("{prefix}.attn"), dim, out);
        LayerNorm::specs(&format!("{prefix}.norm2"), dim, out);
        Mlp::specs(&format!("{prefix}.mlp"), dim, hidden, out);
    }

    /// Builds from `params`.
    pub fn load(
        params: &ParamMap,
        prefix: &str,
        dim: usize,
        hidden: usize,
        num_heads: usize,
    ) -> Result<Self, ModelError> {
        Ok(Self {
            norm1: LayerNorm::load(params, &format!("{prefix}.norm1"), dim, LN_EPS)?,
            attn: Attention::load(params, &format!("{prefix}.attn"), dim, num_heads)?,
            norm2: LayerNorm::load(params, &format!("{prefix}.norm2"), dim, LN_EPS)?,
            mlp: Mlp::load(params, &format!("{prefix}.mlp"), dim, hidden)?,
        })
    }

    /// Whether any parameter is on a graph (a Var, or computed from one): gradients are wanted.
    pub fn params_track(&self) -> bool {
        [
            self.attn.qkv.weight(),
            self.attn.proj.weight(),
            self.mlp.fc1.weight(),
            self.mlp.fc2.weight(),
        ]
        .iter()
        .any(|t| t.track_op())
    }

    /// The same block on detached parameters (same storage; nothing recorded for backward).
    pub fn detached(&self) -> Self {
        Self {
            norm1: self.norm1.detached(),
            attn: self.attn.detached(),
            norm2: self.norm2.detached(),
            mlp: self.mlp.detached(),
        }
    }

    /// Every tensor of the block, for the fused block op ([`crate::fused_block`]); `None` when a
    /// Linear has no bias (the op expects the official layout, which has them all).
    pub(crate) fn tensors(&self) -> Option<BlockTensors> {
        Some(BlockTensors {
            norm1: (
                self.norm1.weight().clone(),
                self.norm1.bias().clone(),
                self.norm1.eps(),
            ),
            qkv: (
                self.attn.qkv.weight().clone(),
                self.attn.qkv.bias()?.clone(),
            ),
            num_heads: self.attn.num_heads,
            proj: (
                self.attn.proj.weight().clone(),
                self.attn.proj.bias()?.clone(),
            ),
            norm2: (
                self.norm2.weight().clone(),
                self.norm2.bias().clone(),
                self.norm2.eps(),
            ),
            fc1: (self.mlp.fc1.weight().clone(), self.mlp.fc1.bias()?.clone()),
            fc2: (self.mlp.fc2.weight().clone(), self.mlp.fc2.bias()?.clone()),
        })
    }

    /// x `[B, K, D]` → `[B, K, D]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor, ModelError> {
        let x = (x + self.attn.forward(&self.norm1.forward(x)?)?)?;
        let y = self.mlp.forward(&self.norm2.forward(&x)?)?;
        Ok((x + y)?)
    }
}

/// Patch embedding: the reference's Conv3d with kernel = stride = (t, p, p) (Conv2d with
/// kernel = stride = p for images), written as reshape + Linear since candle has no conv3d. The
/// weight keeps the conv shape (`[D, 3, t, p, p]` or `[D, 3, p, p]`) for checkpoints.
#[derive(Clone, Debug)]
pub struct PatchEmbed {
    weight: Tensor,
    bias: Tensor,
    cfg: EncoderConfig,
}

impl PatchEmbed {
    /// Specs of `{prefix}.proj.weight` (conv shape) and `.bias` `[D]`.
    pub fn specs(prefix: &str, cfg: &EncoderConfig, out: &mut Vec<ParamSpec>) {
        out.push(ParamSpec::new(
            format!("{prefix}.proj.weight"),
            &cfg.patch_weight_shape(),
            Init::TruncNormal,
        ));
        out.push(ParamSpec::new(
            format!("{prefix}.proj.bias"),
            &[cfg.embed_dim],
            Init::Zeros,
        ));
    }

    /// Builds from `params`.
    pub fn load(params: &ParamMap, prefix: &str, cfg: &EncoderConfig) -> Result<Self, ModelError> {
        let weight = params.get(&format!("{prefix}.proj.weight"), &cfg.patch_weight_shape())?;
        let bias = params.get(&format!("{prefix}.proj.bias"), &[cfg.embed_dim])?;
        Ok(Self {
            weight,
            bias,
            cfg: cfg.clone(),
        })
    }

    /// The conv weight (`[D, 3, t, p, p]`, or `[D, 3, p, p]` for images).
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The conv bias `[D]`.
    pub fn bias(&self) -> &Tensor {
        &self.bias
    }

    /// clips (see [`clip_geometry`]) → tokens `[B, N, D]` on the clips' own token grid, token
    /// order (time, row, column). Like a strided conv, pixels past the last whole patch are
    /// ignored.
    pub fn forward(&self, clips: &Tensor) -> Result<Tensor, ModelError> {
        let geo = clip_geometry(&self.cfg, clips)?;
        self.forward_checked(clips, geo)
    }

    fn forward_checked(&self, clips: &Tensor, geo: ClipGeometry) -> Result<Tensor, ModelError> {
        self.forward_patches(&Patches::cut(&self.cfg, clips, geo)?)
    }

    /// Tokens `[B, N, D]` of clips already cut into tubelets.
    pub fn forward_patches(&self, p: &Patches) -> Result<Tensor, ModelError> {
        let d = self.cfg.embed_dim;
        let (b, n) = (p.geo.batch, p.geo.num_tokens());
        let k = self.cfg.patch_dim();
        if p.rows.dims() != [b * n, k] {
            return Err(ModelError::Input(format!(
                "patches {:?} for {b}×{n} tokens of {k} values",
                p.rows.dims()
            )));
        }
        // The Linear op, bias fused: on a GPU one cuBLASLt GEMM with the bias in its epilogue,
        // on the thread's own handles (the target pass may run on a thread of its own).
        let w = self.weight.reshape((d, k))?;
        let y = kernels::linear(&p.rows, &w, Some(&self.bias))?;
        Ok(y.reshape((b, n, d))?)
    }
}

/// Clips cut into tubelets, `[B·N, 3·t·p·p]` rows, with their geometry: made once per step for
/// both encoders that read the same clips (the target's full pass and the context passes), so
/// the clips are rearranged once, not twice.
#[derive(Clone, Debug)]
pub struct Patches {
    rows: Tensor,
    geo: ClipGeometry,
}

impl Patches {
    /// `clips` (see [`clip_geometry`]) cut for encoders of configuration `cfg`.
    pub fn new(cfg: &EncoderConfig, clips: &Tensor) -> Result<Self, ModelError> {
        let geo = clip_geometry(cfg, clips)?;
        Self::cut(cfg, clips, geo)
    }

    fn cut(cfg: &EncoderConfig, clips: &Tensor, geo: ClipGeometry) -> Result<Self, ModelError> {
        let (b, n) = (geo.batch, geo.num_tokens());
        let rows = patchify_checked(cfg, clips, geo)?
            .reshape((b * n, cfg.patch_dim()))?
            .contiguous()?;
        Ok(Self { rows, geo })
    }
}

/// The clips cut into tubelets, `[B, N, 3·t·p·p]`: token order (time, row, column) and, within
/// a tubelet, (channel, frame, row, column) — the order the patch embedding's conv weight
/// flattens to. What the pixel objective predicts ([`crate::pixel`]).
pub fn patchify(cfg: &EncoderConfig, clips: &Tensor) -> Result<Tensor, ModelError> {
    let geo = clip_geometry(cfg, clips)?;
    patchify_checked(cfg, clips, geo)
}

fn patchify_checked(
    cfg: &EncoderConfig,
    clips: &Tensor,
    geo: ClipGeometry,
) -> Result<Tensor, ModelError> {
    let (kt, p) = (cfg.patch_depth(), cfg.patch_size);
    let b = geo.batch;
    let (gt, gh, gw) = geo.grid;
    let mut x = if clips.rank() == 4 {
        clips.unsqueeze(2)?
    } else {
        clips.clone()
    };
    for (axis, keep) in [(2, gt * kt), (3, gh * p), (4, gw * p)] {
        if x.dim(axis)? != keep {
            x = x.narrow(axis, 0, keep)?;
        }
    }
    Ok(x.reshape(vec![b, 3, gt, kt, gh, p, gw, p])?
        .permute(vec![0, 2, 4, 6, 1, 3, 5, 7])?
        .contiguous()?
        .reshape((b, geo.num_tokens(), cfg.patch_dim()))?)
}

/// Batch size and token grid of a batch of clips.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClipGeometry {
    /// Clips in the batch (B > 0).
    pub batch: usize,
    /// Token grid (T/t, H/p, W/p), each ≥ 1; (1, H/p, W/p) for images.
    pub grid: (usize, usize, usize),
}

impl ClipGeometry {
    /// Tokens per clip on this grid.
    pub fn num_tokens(&self) -> usize {
        self.grid.0 * self.grid.1 * self.grid.2
    }
}

/// Checks a batch the encoder can embed and returns its geometry: `[B, 3, T, H, W]` for video,
/// `[B, 3, H, W]` or `[B, 3, 1, H, W]` in image mode. Sizes may differ from the configured ones
/// (the position table is then resized, spec §2); like the reference's strided conv, the grid
/// is floor(T/t) × floor(H/p) × floor(W/p) and must not be empty.
pub fn clip_geometry(cfg: &EncoderConfig, clips: &Tensor) -> Result<ClipGeometry, ModelError> {
    let dims = clips.dims();
    let (b, c, t, h, w) = match *dims {
        [b, c, t, h, w] => (b, c, t, h, w),
        [b, c, h, w] if cfg.is_image() => (b, c, 1, h, w),
        _ => {
            let want = if cfg.is_image() {
                "[B, 3, H, W] or [B, 3, 1, H, W]"
            } else {
                "[B, 3, T, H, W]"
            };
            return Err(ModelError::Input(format!(
                "clips must be {want}, got {dims:?}"
            )));
        }
    };
    if c != 3 {
        return Err(ModelError::Input(format!(
            "clips have {c} channels, expected 3"
        )));
    }
    if b == 0 {
        return Err(ModelError::Input("empty batch".into()));
    }
    if cfg.is_image() && t != 1 {
        return Err(ModelError::Input(format!(
            "an image model (num_frames = 1) got clips of {t} frames"
        )));
    }
    let grid = (
        t / cfg.patch_depth(),
        h / cfg.patch_size,
        w / cfg.patch_size,
    );
    if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
        return Err(ModelError::Input(format!(
            "clip size {t}x{h}x{w} is smaller than one {}x{}x{} patch",
            cfg.patch_depth(),
            cfg.patch_size,
            cfg.patch_size
        )));
    }
    Ok(ClipGeometry { batch: b, grid })
}

/// Checks clips as [`clip_geometry`] does and that their token grid is the configured one — what
/// training needs, since mask indices and the predictor's table (never resized, spec §2) are
/// laid out on that grid. Returns B.
pub fn check_clips(cfg: &EncoderConfig, clips: &Tensor) -> Result<usize, ModelError> {
    let geo = clip_geometry(cfg, clips)?;
    if geo.grid != cfg.grid() {
        return Err(ModelError::Input(format!(
            "clips {:?} give a {:?} token grid, but training needs the configured {:?} ({} frames, \
             crop {}): mask indices and the predictor's position table are fixed to it",
            clips.dims(),
            geo.grid,
            cfg.grid(),
            cfg.num_frames,
            cfg.crop_size
        )));
    }
    Ok(geo.batch)
}

/// A position table resized to a token grid (t, h, w).
type ResizedPos = ((usize, usize, usize), Tensor);

/// The ViT encoder (also used, with its own weights, as the EMA target encoder).
#[derive(Clone, Debug)]
pub struct Encoder {
    cfg: EncoderConfig,
    patch_embed: PatchEmbed,
    pos_embed: Tensor,
    /// The position table resized to the last other token grid clips came in (the resize
    /// runs on the host: once per grid, not once per forward pass).
    resized_pos: std::sync::Arc<std::sync::Mutex<Option<ResizedPos>>>,
    blocks: Vec<Block>,
    norm: LayerNorm,
    /// The tensors the modules were built from, in [`Self::param_specs`] order (shared storage).
    params: Vec<(String, Tensor)>,
}

impl Encoder {
    /// Trainable parameters in registration order (the fixed `pos_embed` is not among them).
    pub fn param_specs(cfg: &EncoderConfig) -> Vec<ParamSpec> {
        let mut out = Vec::new();
        PatchEmbed::specs("patch_embed", cfg, &mut out);
        for i in 0..cfg.depth {
            Block::specs(
                &format!("blocks.{i}"),
                cfg.embed_dim,
                cfg.mlp_hidden,
                &mut out,
            );
        }
        LayerNorm::specs("norm", cfg.embed_dim, &mut out);
        out
    }

    /// Builds from `params` (keys as in [`Self::param_specs`]) and a fixed `[1, N, D]` pos table.
    pub fn load(
        cfg: &EncoderConfig,
        params: &ParamMap,
        pos_embed: Tensor,
    ) -> Result<Self, ModelError> {
        cfg.validate()?;
        let want = [1, cfg.num_tokens(), cfg.embed_dim];
        if pos_embed.dims() != want {
            return Err(ModelError::TensorShape {
                name: "pos_embed".into(),
                expected: want.to_vec(),
                actual: pos_embed.dims().to_vec(),
            });
        }
        let blocks = (0..cfg.depth)
            .map(|i| {
                Block::load(
                    params,
                    &format!("blocks.{i}"),
                    cfg.embed_dim,
                    cfg.mlp_hidden,
                    cfg.num_heads,
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        let named = Self::param_specs(cfg)
            .into_iter()
            .map(|s| {
                let t = params.get(&s.name, &s.shape)?;
                Ok((s.name, t))
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        Ok(Self {
            cfg: cfg.clone(),
            patch_embed: PatchEmbed::load(params, "patch_embed", cfg)?,
            pos_embed,
            resized_pos: Default::default(),
            blocks,
            norm: LayerNorm::load(params, "norm", cfg.embed_dim, LN_EPS)?,
            params: named,
        })
    }

    /// The trainable parameters by name, in [`Self::param_specs`] order (the tensors the
    /// encoder computes with, not copies): for saving, or to rebuild it on trainable copies
    /// (fine-tuning).
    pub fn params(&self) -> &[(String, Tensor)] {
        &self.params
    }

    /// The encoder alone as safetensors bytes (e.g. a fine-tuned backbone): the parameters under
    /// their official names plus `pos_embed`; metadata `format` = [`ENCODER_FORMAT`] and
    /// `encoder_config` (JSON). Read back with [`Self::from_safetensors`].
    pub fn to_safetensors(&self) -> Result<Vec<u8>, ModelError> {
        use crate::checkpoint::F32View;
        let mut tensors = vec![("pos_embed".to_string(), F32View::new(&self.pos_embed)?)];
        for (name, t) in &self.params {
            tensors.push((name.clone(), F32View::new(t)?));
        }
        let meta = std::collections::HashMap::from([
            ("format".to_string(), ENCODER_FORMAT.to_string()),
            ("encoder_config".to_string(), crate::to_json(&self.cfg)?),
        ]);
        crate::checkpoint::serialize(tensors, meta)
    }

    /// Rebuilds an encoder from [`Self::to_safetensors`] output, checking every name and shape.
    pub fn from_safetensors(bytes: &[u8], device: &Device) -> Result<Self, ModelError> {
        let r = crate::checkpoint::Reader::parse(bytes)?;
        let format = r.meta("format")?;
        if format != ENCODER_FORMAT {
            return Err(ModelError::Checkpoint(format!(
                "format `{format}`, expected `{ENCODER_FORMAT}`"
            )));
        }
        let cfg: EncoderConfig = r.meta_json("encoder_config")?;
        cfg.validate()?;
        let mut map = ParamMap::new();
        for s in Self::param_specs(&cfg) {
            let t = r.tensor(&s.name, &s.shape, device)?;
            map.insert(s.name, t);
        }
        let pos = r.tensor("pos_embed", &[1, cfg.num_tokens(), cfg.embed_dim], device)?;
        Self::load(&cfg, &map, pos)
    }

    /// The configuration it was built with.
    pub fn config(&self) -> &EncoderConfig {
        &self.cfg
    }

    /// The same weights built for clips of side `crop_size`, with the sin-cos table built
    /// afresh for that grid: how the official evaluation builds its backbone at the evaluation
    /// resolution (spec §9: a checkpoint's table of another shape is not used). Fed such clips
    /// as it is, this encoder would interpolate its table instead (spec §2), which gives other
    /// positions than a fresh table. Itself when the size is its own.
    pub fn for_input_size(&self, crop_size: usize) -> Result<Self, ModelError> {
        if crop_size == self.cfg.crop_size {
            return Ok(self.clone());
        }
        let cfg = EncoderConfig {
            crop_size,
            ..self.cfg.clone()
        };
        cfg.validate()?;
        let mut map = ParamMap::new();
        for (name, t) in &self.params {
            map.insert(name.clone(), t.clone());
        }
        let pos = pos_embed::sincos_table_tensor(
            cfg.embed_dim,
            cfg.grid(),
            cfg.table_layout(),
            self.device(),
        )?
        .to_dtype(self.pos_embed.dtype())?;
        Self::load(&cfg, &map, pos)
    }

    /// The device its weights live on (inputs are moved there by [`Self::forward`]).
    pub fn device(&self) -> &Device {
        self.pos_embed.device()
    }

    /// The fixed `[1, N, D]` sin-cos table (for the configured grid).
    pub fn pos_embed(&self) -> &Tensor {
        &self.pos_embed
    }

    /// The patch embedding.
    pub fn patch_embed(&self) -> &PatchEmbed {
        &self.patch_embed
    }

    /// Patch embedding + positions: `[B, N, D]` (shared by several masked passes). Clips whose
    /// token grid differs from the configured one get the position table resized as the
    /// reference does (trilinear for video, bicubic for images; spec §2).
    pub fn embed(&self, clips: &Tensor) -> Result<Tensor, ModelError> {
        self.embed_patches(&Patches::new(&self.cfg, clips)?)
    }

    /// [`Self::embed`] of clips already cut into tubelets (by an encoder of the same
    /// configuration).
    pub fn embed_patches(&self, p: &Patches) -> Result<Tensor, ModelError> {
        let tokens = self.patch_embed.forward_patches(p)?;
        let pos = if p.geo.grid == self.cfg.grid() {
            self.pos_embed.clone()
        } else {
            let mut cached = self
                .resized_pos
                .lock()
                .map_err(|_| ModelError::Input("pos embed cache: lock poisoned".into()))?;
            match cached.as_ref() {
                Some((grid, t)) if *grid == p.geo.grid => t.clone(),
                _ => {
                    let t = pos_embed::resize_table(
                        &self.pos_embed,
                        self.cfg.grid(),
                        p.geo.grid,
                        self.cfg.table_layout(),
                    )?;
                    *cached = Some((p.geo.grid, t.clone()));
                    t
                }
            }
        };
        Ok(tokens.broadcast_add(&pos)?)
    }

    /// Blocks + final norm on already embedded (and possibly gathered) tokens `[B, K, D]`.
    pub fn forward_tokens(&self, x: &Tensor) -> Result<Tensor, ModelError> {
        self.forward_tokens_with(x, None)
    }

    /// [`Self::forward_tokens`]; with `checkpoint`, the blocks keep only their inputs for the
    /// backward pass ([`crate::checkpointing`]).
    pub fn forward_tokens_with(
        &self,
        x: &Tensor,
        checkpoint: Option<&std::sync::Arc<crate::side_grads::SideGrads>>,
    ) -> Result<Tensor, ModelError> {
        let mut x = x.clone();
        for blk in &self.blocks {
            x = match checkpoint {
                Some(side) => crate::side_grads::block_forward(blk, &x, side)?,
                None => blk.forward(&x)?,
            };
        }
        self.norm.forward(&x)
    }

    /// Full forward; with `keep`, only those tokens enter the blocks (context pass). `keep` must
    /// index the clips' own token grid.
    pub fn forward(&self, clips: &Tensor, keep: Option<&TokenIndex>) -> Result<Tensor, ModelError> {
        let clips = clips.to_device(self.device())?;
        let x = self.embed(&clips)?;
        let x = match keep {
            Some(idx) => idx.gather(&x)?,
            None => x,
        };
        self.forward_tokens(&x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::tests::{check_grad, values};
    use candle_core::{Device, Var};

    /// A tiny f64 block with random weights (std 0.3) as Vars, for finite differences.
    fn tiny_block(dim: usize, hidden: usize, heads: usize) -> (Block, Vec<(String, Var)>) {
        let mut specs = Vec::new();
        Block::specs("b", dim, hidden, &mut specs);
        let mut map = ParamMap::new();
        let mut vars = Vec::new();
        for (i, s) in specs.iter().enumerate() {
            let vals: Vec<f64> = values(s.numel(), 100 + i as u64)
                .iter()
                .map(|v| v * 0.6)
                .collect();
            let vals = if s.init == Init::Ones {
                vals.iter().map(|v| 1.0 + v).collect()
            } else {
                vals
            };
            let var = Var::from_vec(vals, s.shape.as_slice(), &Device::Cpu).unwrap();
            map.insert(s.name.clone(), var.as_tensor().clone());
            vars.push((s.name.clone(), var));
        }
        (Block::load(&map, "b", dim, hidden, heads).unwrap(), vars)
    }

    #[test]
    fn block_finite_difference() {
        let dev = Device::Cpu;
        let (blk, vars) = tiny_block(4, 8, 2);
        let x = Var::from_vec(values(2 * 3 * 4, 9), (2, 3, 4), &dev).unwrap();
        let r = Tensor::from_vec(values(2 * 3 * 4, 10), (2, 3, 4), &dev).unwrap();
        let f = || -> f64 {
            blk.forward(x.as_tensor())
                .unwrap()
                .mul(&r)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar()
                .unwrap()
        };
        let loss = blk
            .forward(x.as_tensor())
            .unwrap()
            .mul(&r)
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        check_grad(&x, grads.get(x.as_tensor()).unwrap(), &f, 1e-5);
        for (name, v) in &vars {
            let g = grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("no grad for {name}"));
            // 1e-5: candle's gelu_erf backward uses 0.398942 for 1/sqrt(2π).
            check_grad(v, g, &f, 1e-5);
        }
    }

    #[test]
    fn patch_embed_matches_direct_conv() {
        let dev = Device::Cpu;
        let cfg = EncoderConfig {
            embed_dim: 2,
            depth: 0,
            num_heads: 1,
            mlp_hidden: 4,
            patch_size: 2,
            tubelet_size: 2,
            num_frames: 4,
            crop_size: 4,
            uniform_power: true,
        };
        let mut specs = Vec::new();
        PatchEmbed::specs("pe", &cfg, &mut specs);
        let w: Vec<f32> = values(specs[0].numel(), 3)
            .iter()
            .map(|&v| v as f32)
            .collect();
        let bias = vec![0.5f32, -0.5];
        let mut map = ParamMap::new();
        map.insert(
            "pe.proj.weight",
            Tensor::from_vec(w.clone(), (2, 3, 2, 2, 2), &dev).unwrap(),
        );
        map.insert(
            "pe.proj.bias",
            Tensor::from_vec(bias.clone(), 2, &dev).unwrap(),
        );
        let pe = PatchEmbed::load(&map, "pe", &cfg).unwrap();
        let x: Vec<f32> = values(3 * 4 * 4 * 4, 4).iter().map(|&v| v as f32).collect();
        let clips = Tensor::from_vec(x.clone(), (1, 3, 4, 4, 4), &dev).unwrap();
        let y = pe.forward(&clips).unwrap().to_vec3::<f32>().unwrap();
        assert_eq!(y[0].len(), 8);
        // direct conv for every output token
        for (n, row) in y[0].iter().enumerate() {
            let (ti, hi, wi) = (n / 4, (n / 2) % 2, n % 2);
            for (o, &got) in row.iter().enumerate() {
                let mut acc = bias[o] as f64;
                for c in 0..3 {
                    for kt in 0..2 {
                        for kh in 0..2 {
                            for kw in 0..2 {
                                let xi =
                                    ((c * 4 + ti * 2 + kt) * 4 + hi * 2 + kh) * 4 + wi * 2 + kw;
                                let wi_ = (((o * 3 + c) * 2 + kt) * 2 + kh) * 2 + kw;
                                acc += x[xi] as f64 * w[wi_] as f64;
                            }
                        }
                    }
                }
                assert!(
                    (got as f64 - acc).abs() < 1e-5,
                    "token {n} out {o}: {got} vs {acc}"
                );
            }
        }
        // another clip length is another grid (the encoder resizes its table for it)
        let longer = Tensor::zeros((1, 3, 6, 4, 4), candle_core::DType::F32, &dev).unwrap();
        assert_eq!(pe.forward(&longer).unwrap().dims(), &[1, 12, 2]);
        let wrong = Tensor::zeros((1, 4, 4, 4, 4), candle_core::DType::F32, &dev).unwrap();
        assert!(matches!(pe.forward(&wrong), Err(ModelError::Input(_))));
    }
}
