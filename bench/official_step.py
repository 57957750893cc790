"""The official code's networks and optimiser as a `train-step` peer: the V-JEPA step on the
inputs `train-step` wrote (same configs, clip, per-step mask indices, warm-up and timed steps),
run with the official `facebookresearch/jepa` modules imported from a checkout given as
`--official` (or $OFFICIAL_JEPA): its VisionTransformer, VisionTransformerPredictor, multi-mask
wrappers, `init_opt` (parameter groups, AdamW, GradScaler when mixed precision) and schedulers.
Nothing of that repository is copied here: it is imported from the checkout at run time.

The step around those modules is written from the spec (VJEPA-SPEC §6-§7), in the shape the
official loop runs it: schedulers, bf16 autocast over the forward and loss, target pass without
grad and LayerNorm without affine, the context encoder and predictor through the multi-mask
wrappers (one call for all masks), L1 loss averaged over masks, backward through the GradScaler
when mixed precision, clipping from `clip_start_iteration`, AdamW, EMA with foreach ops. No
per-step logging (the issue's first bar is the eager step without it).

The networks start from the weights of our PyTorch reference (`tools/reference/vjepa_ref.py`,
`build(seed)`: the spec init train-step's own model uses), loaded by name into the official
modules, so the losses are comparable with the other rows. Prints one JSON line like
`bench/train_step_torch.py`."""

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time
from functools import partial

import torch
import torch.nn.functional as F
from safetensors import safe_open

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tools" / "reference"))
sys.path.insert(0, str(HERE))
import vjepa_ref as ref  # noqa: E402
from train_step_torch import mean_flops  # noqa: E402


def official_modules(root: pathlib.Path):
    """The official packages, imported from the checkout at `root`."""
    if not (root / "src" / "models" / "vision_transformer.py").exists():
        sys.exit(f"official_step.py: {root} is not a facebookresearch/jepa checkout")
    sys.path.insert(0, str(root))
    import src.models.predictor as vit_pred
    import src.models.vision_transformer as video_vit
    from app.vjepa.utils import init_opt
    from src.masks.utils import apply_masks
    from src.models.utils.multimask import MultiMaskWrapper, PredictorMultiMaskWrapper
    return video_vit, vit_pred, init_opt, apply_masks, MultiMaskWrapper, PredictorMultiMaskWrapper


def build(root, enc, pred, optim, seed, device, mixed_precision):
    video_vit, vit_pred, init_opt, apply_masks, MultiMaskWrapper, PredictorMultiMaskWrapper = \
        official_modules(root)
    norm = partial(torch.nn.LayerNorm, eps=1e-6)  # what the official named sizes pass
    encoder = video_vit.VisionTransformer(
        img_size=enc.crop_size, patch_size=enc.patch_size, num_frames=enc.num_frames,
        tubelet_size=enc.tubelet_size, embed_dim=enc.embed_dim, depth=enc.depth,
        num_heads=enc.num_heads, mlp_ratio=enc.mlp_hidden / enc.embed_dim, qkv_bias=True,
        norm_layer=norm, uniform_power=enc.uniform_power, use_sdpa=True)
    predictor = vit_pred.VisionTransformerPredictor(
        img_size=enc.crop_size, patch_size=enc.patch_size, num_frames=enc.num_frames,
        tubelet_size=enc.tubelet_size, embed_dim=enc.embed_dim,
        predictor_embed_dim=pred.embed_dim, depth=pred.depth, num_heads=pred.num_heads,
        mlp_ratio=4, qkv_bias=True, norm_layer=norm, uniform_power=enc.uniform_power,
        use_mask_tokens=True, num_mask_tokens=pred.num_mask_tokens,
        zero_init_mask_tokens=True, use_sdpa=True)
    # Same starting weights as the other rows: our reference's spec init, by parameter name.
    ours = ref.build(enc, pred, optim, seed=seed)
    for official, mine in ((encoder, ours.encoder), (predictor, ours.predictor)):
        theirs = official.state_dict()
        mine = mine.state_dict()
        if set(theirs) != set(mine):
            sys.exit("official_step.py: parameter names differ: "
                     f"{sorted(set(theirs) ^ set(mine))[:8]}")
        for k, v in mine.items():
            if theirs[k].shape != v.shape:
                sys.exit(f"official_step.py: {k} is {tuple(theirs[k].shape)} there, "
                         f"{tuple(v.shape)} here")
        official.load_state_dict(mine)
    encoder = MultiMaskWrapper(encoder).to(device)
    predictor = PredictorMultiMaskWrapper(predictor).to(device)
    target = MultiMaskWrapper(video_vit.VisionTransformer(
        img_size=enc.crop_size, patch_size=enc.patch_size, num_frames=enc.num_frames,
        tubelet_size=enc.tubelet_size, embed_dim=enc.embed_dim, depth=enc.depth,
        num_heads=enc.num_heads, mlp_ratio=enc.mlp_hidden / enc.embed_dim, qkv_bias=True,
        norm_layer=norm, uniform_power=enc.uniform_power, use_sdpa=True)).to(device)
    target.load_state_dict(encoder.state_dict())
    for p in target.parameters():
        p.requires_grad = False
    # One "epoch" per step, so the official schedules step exactly as ours do. Its GradScaler
    # (made when mixed precision) comes from the deprecated torch.cuda.amp name: the same
    # scaler is made here through torch.amp.
    opt, _, lr_sched, wd_sched = init_opt(
        encoder=encoder, predictor=predictor, iterations_per_epoch=1,
        start_lr=optim.start_lr, ref_lr=optim.lr, warmup=optim.warmup_steps,
        num_epochs=optim.total_steps, wd=optim.weight_decay, final_wd=optim.final_weight_decay,
        final_lr=optim.final_lr, mixed_precision=False, ipe_scale=1.0,
        betas=tuple(optim.betas), eps=optim.eps)
    scaler = torch.amp.GradScaler(device.type) if mixed_precision else None
    return encoder, predictor, target, opt, scaler, lr_sched, wd_sched, apply_masks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--inputs", required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast, as the official configs")
    ap.add_argument("--official", default=os.environ.get("OFFICIAL_JEPA"),
                    help="facebookresearch/jepa checkout (default $OFFICIAL_JEPA)")
    args = ap.parse_args()
    if not args.official:
        sys.exit("official_step.py: give --official or set OFFICIAL_JEPA to a checkout of "
                 "facebookresearch/jepa")
    root = pathlib.Path(args.official).resolve()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"

    with safe_open(args.inputs, framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    enc = ref.EncoderConfig(**json.loads(meta["encoder"]))
    pred = ref.PredictorConfig(**json.loads(meta["predictor"]))
    optim = ref.OptimConfig(**json.loads(meta["optim"]))
    warmup, steps = int(meta["warmup"]), int(meta["steps"])
    batch = int(tensors["clip"].shape[0])
    masks = [
        [(tensors[f"step{s}.mask{i}.context"].to(device),
          tensors[f"step{s}.mask{i}.target"].to(device))
         for i in range(pred.num_mask_tokens)]
        for s in range(warmup + steps)
    ]
    # Mixed precision exactly when the official code turns it on: a bf16 (or fp16) dtype.
    mixed = args.bf16
    encoder, predictor, target, opt, scaler, lr_sched, wd_sched, apply_masks = build(
        root, enc, pred, optim, args.seed, device, mixed)
    clip = tensors["clip"].to(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def step(iter0, m):
        masks_enc = [c for c, _ in m]
        masks_pred = [t for _, t in m]
        lr_sched.step()
        wd_sched.step()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mixed):
            with torch.no_grad():
                h = target(clip)
                h = F.layer_norm(h, (h.size(-1),))  # spec §6.2: no affine, eps 1e-5
                h = apply_masks(h, masks_pred, concat=False)
            z = encoder(clip, masks_enc)
            z = predictor(z, h, masks_enc, masks_pred)
            e = optim.loss_exp
            losses = [torch.mean(torch.abs(zi - hi) ** e) / e for zi, hi in zip(z, h)]
            loss = sum(losses) / len(losses)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
        else:
            loss.backward()
        if optim.clip_grad is not None and iter0 >= optim.clip_start_iteration:
            torch.nn.utils.clip_grad_norm_(encoder.parameters(), optim.clip_grad)
            torch.nn.utils.clip_grad_norm_(predictor.parameters(), optim.clip_grad)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad()
        momentum = ref.ema_at(optim, iter0)
        with torch.no_grad():
            k = list(target.parameters())
            q = list(encoder.parameters())
            torch._foreach_mul_(k, momentum)
            torch._foreach_add_(k, q, alpha=1.0 - momentum)
        return float(loss.detach())  # reads the loss back: the step ends synchronised

    times, losses = [], []
    for s in range(warmup + steps):
        t0 = time.perf_counter()
        losses.append(step(s, masks[s]))
        if cuda:
            torch.cuda.synchronize()
        if s >= warmup:
            times.append(time.perf_counter() - t0)
    # The commit the row names: the stamp a carried copy has (bench/gpu-pack.sh), else the
    # checkout's own (not a repository around a copy, whose HEAD is another project's).
    stamp = root / "COMMIT"
    commit = stamp.read_text().strip()[:7] if stamp.exists() else ""
    if not commit and (root / ".git").exists():
        try:
            commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                                    capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            commit = ""
    commit = commit or f"at {root.name} (no git)"
    print(json.dumps({
        "impl": f"official jepa {commit} (torch {torch.__version__})",
        "threads": torch.get_num_threads(),
        "device": str(device),
        "dtype": "bf16" if args.bf16 else "f32",
        "batch_size": batch,
        "step_s": times,
        "median_s": statistics.median(times),
        "losses": losses,
        "flops_per_step": mean_flops(enc, pred, batch, masks[warmup:]),
        "peak_reserved_bytes": torch.cuda.max_memory_reserved() if cuda else None,
    }))


if __name__ == "__main__":
    main()
