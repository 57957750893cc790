"""The official V-JEPA training step, timed on the inputs `train-step` wrote (same clip, same
per-step mask indices, same model and optimiser settings), for `bench/gpu-step.sh`.

The official code (facebookresearch/jepa) is not part of this repository: pass a checkout of it
with --jepa-dir. This script builds the model and optimiser with its own functions
(`app.vjepa.utils.init_video_model`, `init_opt`) and runs the step its `app/vjepa/train.py`
runs, leaving out only data loading: schedulers; under autocast the target pass with the
feature LayerNorm and the masked targets (`src.masks.utils.apply_masks`), the context pass and
predictor, the L1 loss and the variance term it always computes; the GradScaler backward, the
gradient clipping after warm-up, the optimiser step, and the EMA update of the target encoder.
With --logging it also does the per-step statistics train.py gathers (`grad_logger`,
`adamw_logger`, the loss read back). Single process, no DistributedDataParallel wrapper.

Prints one JSON line: median step time, losses, peak memory, and the step's model FLOPs
(counted from the shapes: see `model_flops`).
"""

import argparse
import copy
import json
import logging
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from safetensors import safe_open


def model_flops(enc, pred, batch, contexts, targets):
    """Matmul FLOPs (2 per multiply-add) of one step on `batch` clips: the target encoder's
    forward over every token, and forward + backward (3× forward) of the context encoder and
    the predictor for each mask (`contexts[i]`, `targets[i]` tokens per clip). Elementwise ops,
    norms and the optimiser are left out, as in the usual MFU accounting."""
    d, hidden, depth = enc["embed_dim"], enc["mlp_hidden"], enc["depth"]
    t = enc["num_frames"] // enc["tubelet_size"]
    s = enc["crop_size"] // enc["patch_size"]
    n = t * s * s
    patch_dim = 3 * enc["tubelet_size"] * enc["patch_size"] ** 2

    def blocks(tokens, width, mlp, layers):
        per_layer = 2 * tokens * (4 * width * width + 2 * width * mlp) + 4 * tokens * tokens * width
        return layers * per_layer

    def encoder(tokens):
        return 2 * n * patch_dim * d + blocks(tokens, d, hidden, depth)

    dp = pred["embed_dim"]
    total = encoder(n)  # target pass, no backward
    for kc, kt in zip(contexts, targets):
        predictor = 2 * kc * d * dp + blocks(kc + kt, dp, 4 * dp, pred["depth"]) + 2 * kt * dp * d
        total += 3 * (encoder(kc) + predictor)
    return batch * total


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--inputs", required=True, help="safetensors written by train-step")
    ap.add_argument("--jepa-dir", required=True, help="a checkout of facebookresearch/jepa")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (meta.dtype bfloat16)")
    ap.add_argument("--logging", action="store_true", help="train.py's per-step statistics")
    ap.add_argument("--compile", action="store_true", help="torch.compile the target encoder")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    sys.path.insert(0, args.jepa_dir)
    logging.basicConfig(level=logging.WARNING)  # the official code logs the model at INFO
    from app.vjepa.utils import init_opt, init_video_model
    from src.masks.utils import apply_masks
    from src.utils.logging import adamw_logger, grad_logger

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    with safe_open(args.inputs, framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    o = json.loads(meta["official"])
    enc, pred = json.loads(meta["encoder"]), json.loads(meta["predictor"])
    if o["own_shape"]:
        sys.exit("gpu_step_official.py: the config overrides the preset's shape (model.embed_dim/"
                 "depth/num_heads); the official code builds presets only")
    warmup, steps = int(meta["warmup"]), int(meta["steps"])

    encoder, predictor = init_video_model(
        device=device,
        patch_size=o["patch_size"],
        num_frames=o["num_frames"],
        tubelet_size=o["tubelet_size"],
        model_name=o["model_name"],
        crop_size=o["crop_size"],
        pred_depth=o["pred_depth"],
        pred_embed_dim=o["pred_embed_dim"],
        uniform_power=o["uniform_power"],
        use_mask_tokens=o["use_mask_tokens"],
        num_mask_tokens=o["num_mask_tokens"],
        zero_init_mask_tokens=o["zero_init_mask_tokens"],
        use_sdpa=True,
    )
    target_encoder = copy.deepcopy(encoder)
    for p in target_encoder.parameters():
        p.requires_grad = False
    ipe = o["ipe"]
    optimizer, scaler, scheduler, wd_scheduler = init_opt(
        encoder=encoder,
        predictor=predictor,
        wd=o["weight_decay"],
        final_wd=o["final_weight_decay"],
        start_lr=o["start_lr"],
        ref_lr=o["lr"],
        final_lr=o["final_lr"],
        iterations_per_epoch=ipe,
        warmup=o["warmup"],
        num_epochs=o["epochs"],
        ipe_scale=o["ipe_scale"],
        mixed_precision=args.bf16,
        betas=tuple(o["betas"]),
        eps=o["eps"],
    )
    target = torch.compile(target_encoder) if args.compile else target_encoder
    ema0, ema1 = o["ema"]
    ema_span = ipe * o["epochs"] * o["ipe_scale"]
    loss_exp, reg_coeff, clip_grad = o["loss_exp"], o["reg_coeff"], o["clip_grad"]

    clips = tensors["clip"].to(device)
    n_masks = o["num_mask_tokens"]
    masks = [
        [
            (
                tensors[f"step{s}.mask{i}.context"].to(device),
                tensors[f"step{s}.mask{i}.target"].to(device),
            )
            for i in range(n_masks)
        ]
        for s in range(warmup + steps)
    ]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step(s):
        masks_enc = [m[0] for m in masks[s]]
        masks_pred = [m[1] for m in masks[s]]
        scheduler.step()
        wd_scheduler.step()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            with torch.no_grad():
                h = target(clips)
                h = F.layer_norm(h, (h.size(-1),))
                h = apply_masks(h, masks_pred, concat=False)
            z = encoder(clips, masks_enc)
            z = predictor(z, h, masks_enc, masks_pred)
            loss = sum(torch.mean(torch.abs(zi - hi) ** loss_exp) / loss_exp for zi, hi in zip(z, h))
            loss = loss / len(masks_pred)
            pstd = sum(torch.sqrt(zi.var(dim=1) + 0.0001) for zi in z) / len(z)
            reg = torch.mean(F.relu(1.0 - pstd))
        loss = loss + reg_coeff * reg
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if s // ipe > o["warmup"] and clip_grad is not None:
            torch.nn.utils.clip_grad_norm_(encoder.parameters(), clip_grad)
            torch.nn.utils.clip_grad_norm_(predictor.parameters(), clip_grad)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        if args.logging:
            grad_logger(encoder.named_parameters())
            grad_logger(predictor.named_parameters())
        optimizer.zero_grad()
        if args.logging:
            adamw_logger(optimizer)
        m = ema0 + s * (ema1 - ema0) / ema_span
        with torch.no_grad():
            for q, k in zip(encoder.parameters(), target_encoder.parameters()):
                k.data.mul_(m).add_((1.0 - m) * q.detach().data)
        return loss

    times, losses = [], []
    for s in range(warmup + steps):
        sync()
        t0 = time.perf_counter()
        loss = step(s)
        if args.logging:
            loss = float(loss)
        sync()
        dt = time.perf_counter() - t0
        losses.append(float(loss.detach()) if torch.is_tensor(loss) else loss)
        if s >= warmup:
            times.append(dt)

    batch = clips.shape[0]
    # The mask sizes change every step: the mean FLOPs of the timed steps.
    flops = statistics.mean(
        model_flops(
            enc,
            pred,
            batch,
            [int(m[0].shape[1]) for m in masks[s]],
            [int(m[1].shape[1]) for m in masks[s]],
        )
        for s in range(warmup, warmup + steps)
    )
    print(json.dumps({
        "impl": "official" + (" +logging" if args.logging else "") + (" +compile" if args.compile else ""),
        "torch": torch.__version__,
        "device": str(device),
        "dtype": "bf16" if args.bf16 else "f32",
        "batch_size": batch,
        "step_s": times,
        "median_s": statistics.median(times),
        "losses": losses,
        "flops_per_step": flops,
        "peak_allocated_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
        "peak_reserved_bytes": torch.cuda.max_memory_reserved() if device.type == "cuda" else None,
    }))


if __name__ == "__main__":
    main()
