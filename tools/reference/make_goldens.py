"""Writes the golden tensors the Rust test `model/tests/golden.rs` compares against.

A small V-JEPA (vjepa_ref.py) with fixed random weights, one fixed clip and fixed mask indices
for two mask configs of different sizes; three training steps on that batch. The weights, clip
and indices are drawn in float32 (what the Rust model gets); everything computed from them is
computed in float64 and stored as float32, so the goldens are accurate to float32 rounding and
the Rust errors measure the port, not PyTorch's own float32 rounding.

Usage (any python with torch >= 2.1, numpy, safetensors; deterministic):
    python tools/reference/make_goldens.py [--out model/tests/goldens/vjepa_small.safetensors]
    python tools/reference/make_goldens.py --check-f32   # also report torch-f32 vs the goldens
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vjepa_ref as ref  # noqa: E402

SEED = 1234
BATCH = 2
STEPS = 3

ENC = ref.EncoderConfig(embed_dim=32, depth=2, num_heads=4, mlp_hidden=128, patch_size=8,
                        tubelet_size=2, num_frames=4, crop_size=32, uniform_power=True)
# Dp = 20: per-axis width 2·ceil(20/6) = 8, 24 columns cut to 20, like D = 32 (36 → 32).
PRED = ref.PredictorConfig(embed_dim=20, depth=2, num_heads=2, num_mask_tokens=2)
# Steps 1..3 lie in the warmup (W = 5); WD (raised tenfold from the official 0.04 → 0.4, so that
# decay is a visible part of each update) and EMA move visibly over T = 10; clipping applies
# from the 0-based iteration 1 on, with a max-norm between the predictor's and the encoder's
# gradient norms, so the predictor is clipped and the encoder is not (checked below).
# AdamW eps 1e-5 instead of 1e-8: the step m̂/(√v̂ + eps) has slope up to 1/eps in the gradient
# near 0, so with 1e-8 the float32 gradient noise (~1e-9 absolute here) of elements whose
# gradient is ~0 — every key bias (exact gradient 0: softmax ignores a shift shared by all keys)
# and a few elements by chance — turns into O(lr) differences; 1e-5 bounds them to ~1e-4·lr.
OPTIM = ref.OptimConfig(start_lr=1e-3, lr=4e-3, final_lr=1e-5, warmup_steps=5, total_steps=10,
                        weight_decay=0.1, final_weight_decay=1.0, ema=(0.9, 1.0),
                        clip_grad=0.7, clip_start_iteration=1, eps=1e-5)
# (context K, target K) per mask config: different sizes; disjoint within a sample.
MASK_SIZES = [(12, 14), (6, 22)]


def make_batch(gen: torch.Generator):
    n = ENC.num_tokens()
    clips = torch.randn(BATCH, 3, ENC.num_frames, ENC.crop_size, ENC.crop_size, generator=gen)
    masks = []
    for kc, kt in MASK_SIZES:
        ctx, tgt = [], []
        for _ in range(BATCH):
            perm = torch.randperm(n, generator=gen)
            ctx.append(perm[:kc].sort().values)
            tgt.append(perm[kc:kc + kt].sort().values)
        masks.append((torch.stack(ctx), torch.stack(tgt)))
    return clips, masks


def perturb(model: ref.VJepaRef, gen: torch.Generator) -> None:
    """Fixed weights that make the test sensitive to what the spec's init would hide:
    - Linear / Conv3d weights ~N(0, 1/fan_in) instead of N(0, 0.02²), so activations are O(1):
      attention logits spread the softmax and GELU inputs reach its curved part (with std 0.02
      attention is near-uniform and a tanh-GELU would pass unnoticed);
    - biases and LayerNorm affines away from 0 / 1, so every parameter shapes the forward pass;
    - mask tokens of size ~0.5, so their weight decay is a visible part of their update;
    - a target encoder that is not a copy of the encoder (encoder weights + N(0, 0.01²)), so the
      EMA moves every target weight by a visible amount;
    - the target's final LayerNorm scaled by 0.004: target features then have a variance (~2e-5)
      comparable to the loss's non-affine LayerNorm eps 1e-5, so that eps is tested."""
    with torch.no_grad():
        for mod in (model.encoder, model.predictor):
            for n, p in mod.named_parameters():
                if not p.requires_grad:
                    continue
                if n.endswith("weight") and p.ndim >= 2:
                    fan_in = p[0].numel()
                    p.copy_(torch.randn(p.shape, generator=gen) / fan_in ** 0.5)
                elif n.startswith("mask_tokens"):
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
                elif n.endswith("bias"):
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
                elif "norm" in n and n.endswith("weight"):
                    p.copy_(1.0 + torch.randn(p.shape, generator=gen) * 0.1)
        model.target.load_state_dict(model.encoder.state_dict())
        for n, p in model.target.named_parameters():
            if n != "pos_embed":
                p.add_(torch.randn(p.shape, generator=gen) * 0.01)
        model.target.norm.weight.mul_(0.004)
        model.target.norm.bias.mul_(0.004)


def run(model: ref.VJepaRef, clips, masks):
    """Three steps; returns (first-step record, per-step stats)."""
    first, stats = {}, []
    for s in range(STEPS):
        stats.append(model.train_step(clips, masks, record=first if s == 0 else None))
    return first, stats


_DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.int64: "I64"}


def write_safetensors(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]):
    """safetensors with a byte-stable layout (sorted names and metadata keys), so regenerating
    the goldens gives an identical file (safetensors' own writer orders metadata at random)."""
    header: dict = {"__metadata__": dict(sorted(metadata.items()))}
    blobs, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        data = t.numpy().astype(t.numpy().dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little"))
        f.write(h)
        for b in blobs:
            f.write(b)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| / max|b| over one tensor (the measure the Rust test uses)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    here = os.path.dirname(os.path.abspath(__file__))
    default_out = os.path.join(here, "..", "..", "model", "tests", "goldens",
                               "vjepa_small.safetensors")
    ap.add_argument("--out", default=os.path.normpath(default_out))
    ap.add_argument("--check-f32", action="store_true",
                    help="also run the same steps in float32 torch and print its errors")
    args = ap.parse_args()
    torch.use_deterministic_algorithms(True)

    optim = OPTIM
    gen = torch.Generator().manual_seed(SEED)
    model32 = ref.build(ENC, PRED, optim, seed=SEED)
    perturb(model32, gen)
    clips, masks = make_batch(gen)
    init = {**model32.named_parameters(), **model32.target_parameters()}
    init = {k: v.clone() for k, v in init.items()}

    model = model32.to(torch.float64)
    first, stats = run(model, clips.double(), masks)

    # The intended clipping pattern: none at step 1, then predictor clipped, encoder not.
    assert not stats[0]["clipped"] and stats[1]["clipped"] and stats[2]["clipped"]
    for s in stats[1:]:
        assert s["predictor_grad_norm"] > optim.clip_grad > s["encoder_grad_norm"], s

    f32 = lambda t: t.detach().to(torch.float32).contiguous()  # noqa: E731
    out: dict[str, torch.Tensor] = {}
    out.update({k: f32(v) for k, v in init.items()})
    out["encoder.pos_embed"] = f32(model32.encoder.pos_embed)
    out["predictor.predictor_pos_embed"] = f32(model32.predictor.predictor_pos_embed)
    out["input.clips"] = clips.contiguous()
    for i, (ctx, tgt) in enumerate(masks):
        out[f"input.mask{i}.context"] = ctx.contiguous()
        out[f"input.mask{i}.target"] = tgt.contiguous()
    out["fwd.target_features"] = f32(first["target_features"])
    for i in range(len(masks)):
        out[f"fwd.context.{i}"] = f32(first["context"][i])
        out[f"fwd.targets.{i}"] = f32(first["targets"][i])
        out[f"fwd.preds.{i}"] = f32(first["preds"][i])
        out[f"fwd.loss.{i}"] = f32(first["losses"][i].reshape(1))
    out["fwd.loss"] = f32(first["loss"].reshape(1))
    for k, g in first["grads"].items():
        out[f"grad.{k}"] = f32(g)
    for k, v in model.named_parameters().items():
        out[f"step{STEPS}.{k}"] = f32(v)
    for k, (m, v) in model.moments().items():
        out[f"step{STEPS}.opt.exp_avg.{k}"] = f32(m)
        out[f"step{STEPS}.opt.exp_avg_sq.{k}"] = f32(v)
    for k, v in model.target_parameters().items():
        out[f"step{STEPS}.{k}"] = f32(v)
    # One row per step: loss, lr, wd, ema momentum, encoder / predictor pre-clip grad norm, clipped.
    out["steps.stats"] = torch.tensor(
        [[s["loss"], s["lr"], s["weight_decay"], s["ema_momentum"], s["encoder_grad_norm"],
          s["predictor_grad_norm"], float(s["clipped"])] for s in stats], dtype=torch.float64)

    meta = {
        "format": "vjepa-stream.goldens.v1",
        "generator": "tools/reference/make_goldens.py",
        "encoder_config": ref.config_json(ENC),
        "predictor_config": ref.config_json(PRED),
        "optim_config": ref.config_json(optim),
        "steps": str(STEPS),
        "seed": str(SEED),
        "compute_dtype": "float64",
        "torch": torch.__version__,
        "stats_columns": json.dumps(["loss", "lr", "weight_decay", "ema_momentum",
                                     "encoder_grad_norm", "predictor_grad_norm", "clipped"]),
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    write_safetensors(args.out, out, meta)
    back = load_file(args.out)  # the official reader agrees with our writer
    assert back.keys() == out.keys() and all(torch.equal(back[k], out[k]) for k in out)
    size = os.path.getsize(args.out)
    print(f"wrote {args.out}: {len(out)} tensors, {size / 1e6:.2f} MB")
    for s in stats:
        print("step {step}: loss {loss:.6f} lr {lr:.6g} wd {weight_decay:.6g} m {ema_momentum:.4g}"
              " |g_enc| {encoder_grad_norm:.4f} |g_pred| {predictor_grad_norm:.4f}"
              " clipped {clipped}".format(**s))

    if args.check_f32:
        check_f32(model32, clips, masks, out)


def check_f32(model32: ref.VJepaRef, clips, masks, golden: dict) -> None:
    """Torch float32 against the float64 goldens, with the measure the Rust test uses: what a
    float32 implementation of the same maths can reach."""
    first, _ = run(model32, clips, masks)
    worst: dict[str, tuple[float, str]] = {}

    def note(cat, name, a):
        e = rel_err(a, golden[name])
        if e > worst.get(cat, (-1.0, ""))[0]:
            worst[cat] = (e, name)

    note("outputs", "fwd.target_features", first["target_features"])
    for i in range(len(masks)):
        note("outputs", f"fwd.context.{i}", first["context"][i])
        note("outputs", f"fwd.preds.{i}", first["preds"][i])
        note("outputs", f"fwd.loss.{i}", first["losses"][i].reshape(1))
    for k, g in first["grads"].items():
        note("gradients", f"grad.{k}", g)
    for k, v in model32.named_parameters().items():
        name = f"step{STEPS}.{k}"
        d_ref = golden[name].double() - golden[k].double()
        e = rel_err(v.double() - golden[k].double(), d_ref)
        if e > worst.get("params (delta)", (-1.0, ""))[0]:
            worst["params (delta)"] = (e, name)
    for k, v in model32.target_parameters().items():
        name = f"step{STEPS}.{k}"
        init = golden[k].double()
        e = rel_err(v.double() - init, golden[name].double() - init)
        if e > worst.get("EMA target (delta)", (-1.0, ""))[0]:
            worst["EMA target (delta)"] = (e, name)
    for k, (m, v) in model32.moments().items():
        note("moments", f"step{STEPS}.opt.exp_avg.{k}", m)
        note("moments", f"step{STEPS}.opt.exp_avg_sq.{k}", v)
    for cat, (e, name) in worst.items():
        print(f"torch f32 vs goldens: {cat:15s} worst {e:.3e} ({name})")


if __name__ == "__main__":
    main()
