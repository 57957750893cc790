"""V-JEPA (v1) pretraining in plain PyTorch, written from our spec (VJEPA-SPEC.md §2–§8).

This is our own reference implementation, not the official code: it exists to produce golden
tensors for the Rust port (``make_goldens.py``), to write test fixtures, and to be the PyTorch peer
in CPU speed comparisons. It therefore computes with the same torch ops the official training
computes with (Conv3d patches, ``nn.Linear``, ``nn.LayerNorm(eps=1e-6)``,
``F.scaled_dot_product_attention``, exact ``nn.GELU``, ``torch.gather`` for masks,
``torch.optim.AdamW`` with four parameter groups, ``clip_grad_norm_``), in full precision unless
:attr:`VJepaRef.autocast` is set (bf16 autocast of the forward, as the official trainer runs on a
GPU; for the GPU speed peer).

Parameter names equal the official state-dict keys without ``module.backbone.`` (spec §8), and
the config field names equal the Rust ``EncoderConfig`` / ``PredictorConfig`` / ``OptimConfig``
serde names, so a config dumped with :func:`config_json` deserialises on the Rust side.

Entry points: :func:`build` (model + optimiser from configs and a seed) and
:meth:`VJepaRef.train_step` (one full iteration); :meth:`VJepaRef.forward_loss` gives the
intermediate tensors of the forward pass.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

LN_EPS = 1e-6  # every model LayerNorm (spec §3)
TARGET_LN_EPS = 1e-5  # the loss's non-affine LayerNorm on target features (spec §6)


# ----------------------------------------------------------------------------------------------
# Configs (field names = Rust serde names)
# ----------------------------------------------------------------------------------------------


@dataclass
class EncoderConfig:
    """ViT shape and input geometry (Rust `EncoderConfig`)."""

    embed_dim: int
    depth: int
    num_heads: int
    mlp_hidden: int
    patch_size: int
    tubelet_size: int
    num_frames: int
    crop_size: int
    uniform_power: bool = True

    def grid(self) -> tuple[int, int, int]:
        g = self.crop_size // self.patch_size
        return (self.num_frames // self.tubelet_size, g, g)

    def num_tokens(self) -> int:
        gt, gh, gw = self.grid()
        return gt * gh * gw


@dataclass
class PredictorConfig:
    """Predictor shape (Rust `PredictorConfig`); MLP hidden width is 4·embed_dim."""

    embed_dim: int
    depth: int
    num_heads: int
    num_mask_tokens: int = 2


@dataclass
class OptimConfig:
    """Optimisation hyper-parameters (Rust `OptimConfig`, spec §7)."""

    start_lr: float
    lr: float
    final_lr: float
    warmup_steps: int
    total_steps: int
    weight_decay: float
    final_weight_decay: float
    ema: tuple[float, float]
    clip_grad: Optional[float]
    clip_start_iteration: int
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    loss_exp: float = 1.0
    # Weight of the variance regulariser on the predictions (spec §6.4; 0: off, the default).
    reg_coeff: float = 0.0

    @staticmethod
    def official(ipe: int = 300, epochs: int = 300, warmup_epochs: int = 40,
                 ipe_scale: float = 1.25) -> "OptimConfig":
        """The official pretraining values (spec §0/§7)."""
        return OptimConfig(
            start_lr=2e-4, lr=6.25e-4, final_lr=1e-6,
            warmup_steps=warmup_epochs * ipe,
            total_steps=int(ipe_scale * epochs * ipe),
            weight_decay=0.04, final_weight_decay=0.4, ema=(0.998, 1.0),
            clip_grad=10.0, clip_start_iteration=(warmup_epochs + 1) * ipe,
        )


def config_json(cfg) -> str:
    """JSON of a config dataclass, readable by the Rust serde structs."""
    return json.dumps(dataclasses.asdict(cfg))


# ----------------------------------------------------------------------------------------------
# Fixed 3-D sin-cos tables (spec §2)
# ----------------------------------------------------------------------------------------------


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """Rows [sin(pos·ω_0..), cos(pos·ω_0..)] with ω_k = 10000^(-k/(dim/2)); float64."""
    half = dim // 2
    omega = 1.0 / 10000.0 ** (np.arange(half, dtype=np.float64) / half)
    angles = pos.astype(np.float64)[:, None] * omega[None, :]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def axis_dims(embed_dim: int, uniform_power: bool) -> tuple[int, int, int]:
    """Per-axis widths (d_t, d_h, d_w)."""
    if uniform_power:
        d = 2 * math.ceil(embed_dim / 6)
        return d, d, d
    return embed_dim // 2, embed_dim // 4, embed_dim // 4


def sincos_3d(embed_dim: int, grid: tuple[int, int, int], uniform_power: bool) -> np.ndarray:
    """[N, D] float64 table; token n = ti·Gh·Gw + hi·Gw + wi; axes [t, h, w], cut to D columns."""
    gt, gh, gw = grid
    dt, dh, dw = axis_dims(embed_dim, uniform_power)
    ti, hi, wi = np.meshgrid(np.arange(gt), np.arange(gh), np.arange(gw), indexing="ij")
    table = np.concatenate(
        [_sincos_1d(dt, ti.reshape(-1)), _sincos_1d(dh, hi.reshape(-1)),
         _sincos_1d(dw, wi.reshape(-1))],
        axis=1,
    )
    return table[:, :embed_dim]


def _fixed_table(embed_dim: int, grid, uniform_power: bool) -> nn.Parameter:
    """The table as a frozen float32 parameter `[1, N, D]` (stored in state dicts, no grad)."""
    t = torch.from_numpy(sincos_3d(embed_dim, grid, uniform_power)).float().unsqueeze(0)
    return nn.Parameter(t, requires_grad=False)


# ----------------------------------------------------------------------------------------------
# Modules (spec §3)
# ----------------------------------------------------------------------------------------------


def apply_masks(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x `[B, N, D]`, idx int64 `[B, K]` → `[B, K, D]` (gather along the token axis)."""
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.size(-1)))


class PatchEmbed3D(nn.Module):
    """Tubelet embedding: Conv3d, kernel = stride = (t, p, p), then tokens in (t, h, w) order."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        k = (cfg.tubelet_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(3, cfg.embed_dim, kernel_size=k, stride=k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Fused qkv (rows [q|k|v], heads contiguous) → SDPA (no mask) → output projection."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        assert dim % num_heads == 0, f"dim {dim} not divisible by {num_heads} heads"
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        h = self.num_heads
        qkv = self.qkv(x).reshape(b, n, 3, h, c // h).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0)
        return self.proj(y.transpose(1, 2).reshape(b, n, c))


class MLP(nn.Module):
    """Linear → exact GELU → Linear."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm block: x += Attn(LN1 x); x += MLP(LN2 x)."""

    def __init__(self, dim: int, num_heads: int, hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = MLP(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """Video ViT encoder (also the EMA target encoder). Registration order = official key order."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.pos_embed = _fixed_table(cfg.embed_dim, cfg.grid(), cfg.uniform_power)
        self.patch_embed = PatchEmbed3D(cfg)
        self.blocks = nn.ModuleList(
            [Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_hidden) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=LN_EPS)

    def forward(self, clips: torch.Tensor, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        """clips `[B, 3, T, S, S]` → `[B, N, D]`, or `[B, K, D]` for the `keep` indices `[B, K]`."""
        x = self.patch_embed(clips) + self.pos_embed
        if keep is not None:
            x = apply_masks(x, keep)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


class Predictor(nn.Module):
    """Narrow ViT predicting target features from context tokens and mask tokens (spec §4)."""

    def __init__(self, enc: EncoderConfig, cfg: PredictorConfig):
        super().__init__()
        dp = cfg.embed_dim
        self.predictor_embed = nn.Linear(enc.embed_dim, dp)
        self.mask_tokens = nn.ParameterList(
            [nn.Parameter(torch.zeros(1, 1, dp)) for _ in range(cfg.num_mask_tokens)])
        self.predictor_pos_embed = _fixed_table(dp, enc.grid(), enc.uniform_power)
        self.predictor_blocks = nn.ModuleList(
            [Block(dp, cfg.num_heads, 4 * dp) for _ in range(cfg.depth)])
        self.predictor_norm = nn.LayerNorm(dp, eps=LN_EPS)
        self.predictor_proj = nn.Linear(dp, enc.embed_dim)
        self.num_patches = enc.num_tokens()

    def forward(self, z: torch.Tensor, ctx_idx: torch.Tensor, tgt_idx: torch.Tensor,
                mask_index: int) -> torch.Tensor:
        """z `[B, Kc, D]` (encoder output at ctx_idx) → predictions `[B, Kt, D]` at tgt_idx."""
        b = z.size(0)
        x = self.predictor_embed(z)
        n_ctx = x.size(1)
        pos = self.predictor_pos_embed.repeat(b, 1, 1)
        x = x + apply_masks(pos, ctx_idx)
        tgt = self.mask_tokens[mask_index].repeat(b, self.num_patches, 1)
        tgt = apply_masks(tgt, tgt_idx) + apply_masks(pos, tgt_idx)
        x = torch.cat([x, tgt], dim=1)
        for blk in self.predictor_blocks:
            x = blk(x)
        x = self.predictor_norm(x)
        return self.predictor_proj(x[:, n_ctx:])


# ----------------------------------------------------------------------------------------------
# Init (spec §3 "effective result")
# ----------------------------------------------------------------------------------------------


def _trunc_normal(w: torch.Tensor, gen: torch.Generator) -> None:
    try:
        nn.init.trunc_normal_(w, std=0.02, a=-2.0, b=2.0, generator=gen)
    except TypeError:  # torch < 2.3: no generator argument; a plain normal is the same here
        with torch.no_grad():
            w.copy_(torch.randn(w.shape, generator=gen, dtype=w.dtype) * 0.02)


def init_weights(module: nn.Module, gen: torch.Generator) -> None:
    """Linear / Conv3d weights N(0, 0.02²) (truncated at ±2), biases 0, LayerNorm (1, 0); mask
    tokens stay 0. Modules are visited in registration order, so the result depends on `gen` only."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv3d)):
            _trunc_normal(m.weight, gen)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------------------------
# Schedules (spec §7), pure functions of the step
# ----------------------------------------------------------------------------------------------


def lr_at(c: OptimConfig, step1: int) -> float:
    """LR of the 1-based step: linear warmup, then cosine to final_lr."""
    if step1 < c.warmup_steps:
        return c.start_lr + (step1 / max(1, c.warmup_steps)) * (c.lr - c.start_lr)
    q = (step1 - c.warmup_steps) / max(1, c.total_steps - c.warmup_steps)
    return max(c.final_lr, c.final_lr + (c.lr - c.final_lr) * 0.5 * (1.0 + math.cos(math.pi * q)))


def wd_at(c: OptimConfig, step1: int) -> float:
    """Weight decay of the decayed groups for the 1-based step (cosine, clamped at the end value)."""
    q = step1 / c.total_steps
    v = c.final_weight_decay + (c.weight_decay - c.final_weight_decay) * 0.5 * (
        1.0 + math.cos(math.pi * q))
    return max(c.final_weight_decay, v) if c.final_weight_decay <= c.weight_decay \
        else min(c.final_weight_decay, v)


def ema_at(c: OptimConfig, iter0: int) -> float:
    """EMA momentum of the 0-based iteration (linear over total_steps)."""
    k = min(iter0, c.total_steps)
    return c.ema[0] + k * (c.ema[1] - c.ema[0]) / c.total_steps


# ----------------------------------------------------------------------------------------------
# Model + optimiser + one training iteration (spec §6–§7)
# ----------------------------------------------------------------------------------------------


def param_groups(encoder: nn.Module, predictor: nn.Module) -> list[dict]:
    """The four official groups: decayed encoder / predictor params (name lacks "bias" and
    ndim ≠ 1, incl. mask tokens and the frozen tables), then their biases and 1-D params (WD 0)."""

    def decayed(n, p):
        return "bias" not in n and p.ndim != 1

    enc, pred = list(encoder.named_parameters()), list(predictor.named_parameters())
    return [
        {"params": [p for n, p in enc if decayed(n, p)]},
        {"params": [p for n, p in pred if decayed(n, p)]},
        {"params": [p for n, p in enc if not decayed(n, p)], "WD_exclude": True,
         "weight_decay": 0.0},
        {"params": [p for n, p in pred if not decayed(n, p)], "WD_exclude": True,
         "weight_decay": 0.0},
    ]


def total_grad_norm(params) -> torch.Tensor:
    """The total 2-norm that `clip_grad_norm_` computes (grads that are None are skipped)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


class VJepaRef:
    """Encoder, predictor, EMA target encoder and AdamW, trained one iteration at a time."""

    def __init__(self, enc_cfg: EncoderConfig, pred_cfg: PredictorConfig, optim_cfg: OptimConfig,
                 encoder: VisionTransformer, predictor: Predictor,
                 target: Optional[VisionTransformer] = None):
        self.enc_cfg, self.pred_cfg, self.optim_cfg = enc_cfg, pred_cfg, optim_cfg
        self.encoder, self.predictor = encoder, predictor
        self.target = copy.deepcopy(encoder) if target is None else target
        for p in self.target.parameters():
            p.requires_grad = False
        c = optim_cfg
        self.opt = torch.optim.AdamW(param_groups(encoder, predictor), lr=c.start_lr,
                                     betas=tuple(c.betas), eps=c.eps, weight_decay=c.weight_decay)
        self.steps_done = 0
        # dtype of a torch.autocast around the forward (None: full precision).
        self.autocast: Optional[torch.dtype] = None

    def to_device(self, device: torch.device) -> "VJepaRef":
        """Moves the three networks (parameters keep their identity, so the optimiser follows)."""
        for mod in (self.encoder, self.predictor, self.target):
            mod.to(device)
        return self

    # -- forward ---------------------------------------------------------------------------------

    def forward_loss(self, clips: torch.Tensor, masks: list[tuple[torch.Tensor, torch.Tensor]]):
        """One forward pass. masks[i] = (context idx, target idx), int64 `[B, K]` each.

        Returns a dict: `target_features` (target encoder output, `[B, N, D]`), per mask i
        `context[i]` (encoder output on its context tokens), `targets[i]` (normalised features
        at the target tokens), `preds[i]`, `losses[i]`, and the total `loss`."""
        with torch.no_grad():
            h_raw = self.target(clips)
            h = F.layer_norm(h_raw, (h_raw.size(-1),), eps=TARGET_LN_EPS)
            targets = [apply_masks(h, tgt) for _, tgt in masks]
        context, preds = [], []
        for i, (ctx, tgt) in enumerate(masks):
            z = self.encoder(clips, ctx)
            context.append(z)
            preds.append(self.predictor(z, ctx, tgt, i))
        e = self.optim_cfg.loss_exp
        losses = [torch.mean(torch.abs(p - t) ** e) / e for p, t in zip(preds, targets)]
        loss = sum(losses) / len(losses)
        if self.optim_cfg.reg_coeff > 0:
            # spec §6.4: per-sample std over tokens (unbiased, +1e-4 inside the sqrt), averaged
            # over the mask configs; the term is mean(relu(1 - std)).
            std = sum(torch.sqrt(p.var(dim=1) + 1e-4) for p in preds) / len(preds)
            loss = loss + self.optim_cfg.reg_coeff * torch.mean(F.relu(1.0 - std))
        return {"target_features": h_raw, "context": context, "targets": targets,
                "preds": preds, "losses": losses, "loss": loss}

    # -- one iteration -------------------------------------------------------------------------

    def train_step(self, clips: torch.Tensor, masks, record: Optional[dict] = None) -> dict:
        """Schedules at the 1-based step → forward → backward → per-module grad norms and clipping
        (from `clip_start_iteration` on) → AdamW → EMA with the 0-based iteration's momentum.

        If `record` is a dict it receives the forward outputs and the pre-clip gradients
        (`grads`: name → tensor, names prefixed `encoder.` / `predictor.`)."""
        c = self.optim_cfg
        iter0 = self.steps_done
        step1 = iter0 + 1
        lr, wd, m = lr_at(c, step1), wd_at(c, step1), ema_at(c, iter0)
        for g in self.opt.param_groups:
            g["lr"] = lr
            if not g.get("WD_exclude", False):
                g["weight_decay"] = wd

        with torch.autocast(clips.device.type, dtype=self.autocast or torch.bfloat16,
                            enabled=self.autocast is not None):
            out = self.forward_loss(clips, masks)
        self.opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        if record is not None:
            record.update(out)
            record["grads"] = {
                f"{prefix}.{n}": p.grad.detach().clone()
                for prefix, mod in (("encoder", self.encoder), ("predictor", self.predictor))
                for n, p in mod.named_parameters() if p.grad is not None
            }
        clipped = c.clip_grad is not None and iter0 >= c.clip_start_iteration
        if clipped:
            enc_norm = torch.nn.utils.clip_grad_norm_(self.encoder.parameters(), c.clip_grad)
            pred_norm = torch.nn.utils.clip_grad_norm_(self.predictor.parameters(), c.clip_grad)
        else:
            enc_norm = total_grad_norm(self.encoder.parameters())
            pred_norm = total_grad_norm(self.predictor.parameters())
        self.opt.step()
        with torch.no_grad():
            for q, k in zip(self.encoder.parameters(), self.target.parameters()):
                k.mul_(m).add_((1.0 - m) * q.detach())
        self.steps_done = step1
        return {
            "step": step1, "loss": float(out["loss"].detach()),
            "loss_per_mask": [float(v.detach()) for v in out["losses"]],
            "lr": lr, "weight_decay": wd, "ema_momentum": m,
            "encoder_grad_norm": float(enc_norm), "predictor_grad_norm": float(pred_norm),
            "clipped": clipped,
        }

    # -- state -----------------------------------------------------------------------------------

    def named_parameters(self) -> dict[str, torch.Tensor]:
        """Trainable parameters, `encoder.<key>` then `predictor.<key>` (frozen tables excluded)."""
        out = {}
        for prefix, mod in (("encoder", self.encoder), ("predictor", self.predictor)):
            for n, p in mod.named_parameters():
                if p.requires_grad:
                    out[f"{prefix}.{n}"] = p.detach()
        return out

    def target_parameters(self) -> dict[str, torch.Tensor]:
        """Target encoder weights as `target_encoder.<key>` (frozen table excluded)."""
        return {f"target_encoder.{n}": p.detach() for n, p in self.target.named_parameters()
                if n != "pos_embed"}

    def moments(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """AdamW (exp_avg, exp_avg_sq) per trainable parameter name (only those with state)."""
        names = {id(p): n for n, p in
                 [(f"encoder.{n}", p) for n, p in self.encoder.named_parameters()]
                 + [(f"predictor.{n}", p) for n, p in self.predictor.named_parameters()]}
        return {names[id(p)]: (s["exp_avg"], s["exp_avg_sq"]) for p, s in self.opt.state.items()}

    def to(self, dtype: torch.dtype) -> "VJepaRef":
        """A copy of the fresh model (no optimiser state) in another dtype (e.g. float64 for an
        accurate reference from the same float32 weights)."""
        assert self.steps_done == 0, "convert before training"
        enc = copy.deepcopy(self.encoder).to(dtype)
        pred = copy.deepcopy(self.predictor).to(dtype)
        tgt = copy.deepcopy(self.target).to(dtype)
        return VJepaRef(self.enc_cfg, self.pred_cfg, self.optim_cfg, enc, pred, tgt)


def build(enc_cfg: EncoderConfig, pred_cfg: PredictorConfig, optim_cfg: OptimConfig,
          seed: int = 0, dtype: torch.dtype = torch.float32) -> VJepaRef:
    """Fresh model with the spec's effective init, deterministic in `seed`; target = copy of the
    encoder (spec §3)."""
    assert pred_cfg.embed_dim % pred_cfg.num_heads == 0
    gen = torch.Generator().manual_seed(seed)
    encoder = VisionTransformer(enc_cfg)
    predictor = Predictor(enc_cfg, pred_cfg)
    init_weights(encoder, gen)
    init_weights(predictor, gen)
    encoder.to(dtype)
    predictor.to(dtype)
    return VJepaRef(enc_cfg, pred_cfg, optim_cfg, encoder, predictor)
