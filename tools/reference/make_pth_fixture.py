"""Writes the official-layout `.pth.tar` fixtures for the Rust checkpoint import tests, with
PyTorch, and checks our export the other way round.

What it writes (model/tests/goldens/):
- ``pth_fixture.pth.tar``: ``torch.save`` of the dict the official training saves (spec §8):
  ``encoder`` / ``predictor`` / ``target_encoder`` state dicts taken through two wrapper modules
  (so keys carry ``module.backbone.`` and the dicts carry torch's ``_metadata``, as under DDP +
  the multi-mask wrapper), ``opt`` (``torch.optim.AdamW.state_dict()`` with the four official
  groups), ``scaler`` None, ``epoch``, ``loss``, ``batch_size``, ``world_size``, ``lr``. The model
  (vjepa_ref.py, the small shape of ``pth_fixture.yaml``) has spread-out weights and has taken
  three training steps, so encoder, target and AdamW state all differ.
- ``pth_fixture_expected.safetensors``: what the PyTorch model does with it, computed in float64
  from the saved float32 weights: target-encoder features of a fixed clip, and one more training
  step on a fixed batch (loss, stats and every weight after it). Metadata: the three configs as
  JSON in the Rust serde layout.
- ``pth_fixture_missing.pth.tar`` (no ``target_encoder`` ``blocks.1.mlp.fc2.weight``) and
  ``pth_fixture_badshape.pth.tar`` (``predictor_proj.weight`` transposed); both without ``opt``.

With ``--vjepa BIN`` (the built ``vjepa`` binary) it then checks the round trip through our
code: ``vjepa convert`` fixture → our safetensors → our ``.pth.tar``; that file must load with
``torch.load(..., weights_only=True)`` (and ``mmap=True``) into the same nested dicts, keys, key
order and values as the original, into the reference model (strict) and AdamW, and continue
training exactly like the original.

Usage (deterministic): python tools/reference/make_pth_fixture.py [--vjepa target/release/vjepa]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import subprocess
import sys
import tempfile

import torch
import torch.nn as nn
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vjepa_ref as ref  # noqa: E402

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
GOLDENS = os.path.join(REPO, "model", "tests", "goldens")
CONFIG_YAML = os.path.join(GOLDENS, "pth_fixture.yaml")

SEED = 7
BATCH = 2
STEPS = 3  # training steps before saving
IPE = 3  # iterations per epoch of pth_fixture.yaml ⇒ `epoch` 1
# The shape of pth_fixture.yaml: vit_tiny with width 24 (per-axis sin-cos width 8, exact),
# 4 heads of 6; predictor width 16 with the encoder's 4 heads.
ENC = ref.EncoderConfig(embed_dim=24, depth=2, num_heads=4, mlp_hidden=96, patch_size=8,
                        tubelet_size=2, num_frames=4, crop_size=16, uniform_power=True)
PRED = ref.PredictorConfig(embed_dim=16, depth=2, num_heads=4, num_mask_tokens=2)
# What pth_fixture.yaml's optimization section gives (ipe 3, warmup 1, epochs 4, ipe_scale 1.25):
# W = 3, T = 15, clipping from iteration 6. EMA from 0.9 so the target moves visibly. AdamW eps
# 1e-5 instead of 1e-8: elements whose gradient is ~0 (every key bias: softmax ignores a shift
# shared by all keys) have m̂/(√v̂ + eps) ≈ noise/noise with eps 1e-8, which would turn float32
# rounding into O(lr) differences in the continued step; 1e-5 keeps those bounded.
OPTIM = ref.OptimConfig(start_lr=1e-3, lr=4e-3, final_lr=1e-5, warmup_steps=3, total_steps=15,
                        weight_decay=0.04, final_weight_decay=0.4, ema=(0.9, 1.0),
                        clip_grad=10.0, clip_start_iteration=6, eps=1e-5)
# (context K, target K) per mask config on the 2×2×2 grid; disjoint within a sample.
MASK_SIZES = [(4, 3), (2, 5)]


class _Backbone(nn.Module):
    """Stands in for the official multi-mask wrapper: registers the model as `backbone`."""

    def __init__(self, m: nn.Module):
        super().__init__()
        self.backbone = m


class _Module(nn.Module):
    """Stands in for DistributedDataParallel: registers the wrapped model as `module`."""

    def __init__(self, m: nn.Module):
        super().__init__()
        self.module = _Backbone(m)


def official_state_dict(m: nn.Module):
    """`m.state_dict()` as the official code saves it: keys `module.backbone.<key>`."""
    return _Module(m).state_dict()


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


def spread_weights(model: ref.VJepaRef, gen: torch.Generator) -> None:
    """Weights that make every tensor matter to the features: Linear / Conv weights
    N(0, 1/fan_in) (O(1) activations, so a transposed square matrix changes the output),
    biases and LayerNorm affines away from 0 / 1, mask tokens away from 0."""
    with torch.no_grad():
        for mod in (model.encoder, model.predictor):
            for n, p in mod.named_parameters():
                if not p.requires_grad:
                    continue
                if n.endswith("weight") and p.ndim >= 2:
                    fan_in = p[0].numel()
                    p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
                elif n.endswith("weight"):
                    p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
                elif n.startswith("mask_tokens"):
                    p.copy_(0.5 * torch.randn(p.shape, generator=gen))
                else:
                    p.copy_(0.1 * torch.randn(p.shape, generator=gen))
        model.target.load_state_dict(model.encoder.state_dict())


def double_copy(model: ref.VJepaRef) -> ref.VJepaRef:
    """The trained model and its AdamW state in float64 (load_state_dict casts the moments)."""
    enc = copy.deepcopy(model.encoder).double()
    pred = copy.deepcopy(model.predictor).double()
    tgt = copy.deepcopy(model.target).double()
    m = ref.VJepaRef(ENC, PRED, OPTIM, enc, pred, tgt)
    m.opt.load_state_dict(model.opt.state_dict())
    m.steps_done = model.steps_done
    return m


def weights_after(model: ref.VJepaRef) -> dict[str, torch.Tensor]:
    out = {f"after.{k}": v.float().contiguous() for k, v in model.named_parameters().items()}
    out.update({f"after.{k}": v.float().contiguous()
                for k, v in model.target_parameters().items()})
    return out


def build_trained():
    gen = torch.Generator().manual_seed(SEED)
    model = ref.build(ENC, PRED, OPTIM, seed=SEED)
    spread_weights(model, gen)
    losses = []
    for _ in range(STEPS):
        clips, masks = make_batch(gen)
        losses.append(model.train_step(clips, masks)["loss"])
    clip = torch.randn(1, 3, ENC.num_frames, ENC.crop_size, ENC.crop_size, generator=gen)
    next_batch = make_batch(gen)
    return model, losses, clip, next_batch


def checkpoint_dict(model: ref.VJepaRef, losses) -> dict:
    return {
        "encoder": official_state_dict(model.encoder),
        "predictor": official_state_dict(model.predictor),
        "opt": model.opt.state_dict(),
        "scaler": None,
        "target_encoder": official_state_dict(model.target),
        "epoch": STEPS // IPE,
        "loss": sum(losses) / len(losses),
        "batch_size": BATCH,
        "world_size": 1,
        "lr": OPTIM.lr,
    }


def write_fixtures() -> None:
    model, losses, clip, (clips, masks) = build_trained()
    ckpt = checkpoint_dict(model, losses)
    torch.save(ckpt, os.path.join(GOLDENS, "pth_fixture.pth.tar"))

    m64 = double_copy(model)
    with torch.no_grad():
        features = m64.target(clip.double())
        features32 = model.target(clip)
    rel = ((features32.double() - features).norm() / features.norm()).item()
    stats = m64.train_step(clips.double(), [(c, t) for c, t in masks])
    tensors = {
        "clip": clip.contiguous(),
        "features": features.float().contiguous(),
        "batch.clips": clips.contiguous(),
    }
    for i, (c, t) in enumerate(masks):
        tensors[f"batch.mask{i}.context"] = c.contiguous()
        tensors[f"batch.mask{i}.target"] = t.contiguous()
    tensors.update(weights_after(m64))
    meta = {
        "encoder_config": ref.config_json(ENC),
        "predictor_config": ref.config_json(PRED),
        "optim_config": ref.config_json(OPTIM),
        "steps_done": str(STEPS),
        "after_stats": json.dumps(stats),
    }
    save_file(tensors, os.path.join(GOLDENS, "pth_fixture_expected.safetensors"), metadata=meta)

    bad = {k: v for k, v in ckpt.items() if k != "opt"}
    bad["target_encoder"] = copy.copy(ckpt["target_encoder"])
    del bad["target_encoder"]["module.backbone.blocks.1.mlp.fc2.weight"]
    torch.save(bad, os.path.join(GOLDENS, "pth_fixture_missing.pth.tar"))
    bad = {k: v for k, v in ckpt.items() if k != "opt"}
    bad["predictor"] = copy.copy(ckpt["predictor"])
    key = "module.backbone.predictor_proj.weight"
    bad["predictor"][key] = bad["predictor"][key].t().contiguous()
    torch.save(bad, os.path.join(GOLDENS, "pth_fixture_badshape.pth.tar"))

    for name in sorted(os.listdir(GOLDENS)):
        if name.startswith("pth_fixture"):
            print(f"wrote {name}: {os.path.getsize(os.path.join(GOLDENS, name))} bytes")
    print(f"torch float32 vs float64 target features: relative error {rel:.2e}")
    print(f"continued step {stats['step']}: loss {stats['loss']:.6f}")


def same(a, b, path="") -> list[str]:
    """Differences between two loaded checkpoint objects (exact; dict key order included)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return [f"{path}: {type(a).__name__} vs {type(b).__name__}"]
        if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
            return [f"{path}: tensor {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"
                    + ("" if a.shape != b.shape else f", max diff {(a - b).abs().max()}")]
        return []
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        if list(a.keys()) != list(b.keys()):
            out.append(f"{path}: keys {list(a.keys())[:6]}… vs {list(b.keys())[:6]}…")
        for k in a.keys() & b.keys():
            out += same(a[k], b[k], f"{path}.{k}")
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{path}: length {len(a)} vs {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in same(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {a!r} vs {b!r}"]


def continue_from(ckpt: dict, batch) -> dict:
    """A reference model restored from an official-layout dict, then one training step."""
    model = ref.build(ENC, PRED, OPTIM, seed=0)
    strip = len("module.backbone.")
    for mod, key in ((model.encoder, "encoder"), (model.predictor, "predictor"),
                     (model.target, "target_encoder")):
        mod.load_state_dict({k[strip:]: v for k, v in ckpt[key].items()}, strict=True)
    model.opt.load_state_dict(ckpt["opt"])
    model.steps_done = STEPS
    clips, masks = batch
    stats = model.train_step(clips, masks)
    return {"stats": stats, **weights_after(model)}


def check_round_trip(vjepa: str) -> None:
    original_path = os.path.join(GOLDENS, "pth_fixture.pth.tar")
    original = torch.load(original_path, weights_only=True)
    with tempfile.TemporaryDirectory() as tmp:
        ours = os.path.join(tmp, "ours.safetensors")
        back = os.path.join(tmp, "back.pth.tar")
        for cmd in ([vjepa, "convert", original_path, ours, "--config", CONFIG_YAML],
                    [vjepa, "convert", ours, back, "--config", CONFIG_YAML]):
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                sys.exit(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr}")
            print(r.stdout.strip())
        from safetensors import safe_open
        with safe_open(ours, "pt") as f:
            meta = f.metadata()
        for key, cfg in (("encoder_config", ENC), ("predictor_config", PRED),
                         ("optim_config", OPTIM)):
            want = json.loads(ref.config_json(cfg))
            got = json.loads(meta[key])
            got = {k: (list(v) if isinstance(v, list) else v) for k, v in got.items()}
            want = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in want.items()}
            if got != want:
                sys.exit(f"{key} from pth_fixture.yaml differs from the script's: {got} vs {want}")
        ours_loaded = torch.load(back, weights_only=True)
        torch.load(back, weights_only=True, mmap=True)
        extra = ours_loaded.pop("vjepa_stream")
        diffs = []
        for key in ("encoder", "predictor", "target_encoder"):
            diffs += same(dict(original[key]), ours_loaded[key], key)
        diffs += same(original["opt"]["state"], ours_loaded["opt"]["state"], "opt.state")
        for i, (g0, g1) in enumerate(zip(original["opt"]["param_groups"],
                                          ours_loaded["opt"]["param_groups"])):
            for k in g0.keys() & g1.keys():
                diffs += same(g0[k], g1[k], f"opt.param_groups[{i}].{k}")
            missing = set(g0) - set(g1) - {"decoupled_weight_decay"}
            if missing:
                diffs.append(f"opt.param_groups[{i}]: keys {sorted(missing)} missing")
        for key in ("epoch", "batch_size", "lr"):
            diffs += same(original[key], ours_loaded[key], key)
        if diffs:
            sys.exit("round trip differs:\n  " + "\n  ".join(diffs))
        print(f"torch.load(weights_only=True) of our export: same dicts, keys, order and values "
              f"as the PyTorch file; extra key vjepa_stream = {sorted(extra)}")

        _, _, _, batch = build_trained()
        a = continue_from(original, batch)
        b = continue_from(ours_loaded, batch)
        diffs = same({k: v for k, v in a.items() if k != "stats"},
                     {k: v for k, v in b.items() if k != "stats"}, "after")
        if diffs or a["stats"] != b["stats"]:
            sys.exit("continued training differs:\n  " + "\n  ".join(diffs))
        print(f"continued training from our export = from the PyTorch file "
              f"(step {a['stats']['step']}, loss {a['stats']['loss']:.6f}), bit for bit")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vjepa", help="built `vjepa` binary: also check the round trip")
    args = ap.parse_args()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    write_fixtures()
    if args.vjepa:
        check_round_trip(args.vjepa)


if __name__ == "__main__":
    main()
