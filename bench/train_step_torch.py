"""The PyTorch peer of `train-step`: the same training step (our PyTorch reference model,
`tools/reference/vjepa_ref.py`, written from the spec with the torch ops the official code uses:
nn.Linear, nn.LayerNorm, F.scaled_dot_product_attention, exact GELU, torch.optim.AdamW) on the
inputs `train-step` wrote: same configs, clip, per-step mask indices, warm-up and timed steps.
`--device cuda --bf16` runs it as the official trainer runs on a GPU (bf16 autocast of the
forward); `--compile` also wraps the target encoder in torch.compile. Prints one JSON line like
`train-step`, plus the step's model FLOPs (`model_flops`) and the peak memory on a GPU."""

import argparse
import json
import pathlib
import statistics
import sys
import time

import torch
from safetensors import safe_open

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tools" / "reference"))
import vjepa_ref as ref  # noqa: E402


def model_flops(enc, pred, batch, contexts, targets):
    """Matmul FLOPs (2 per multiply-add) of one step on `batch` clips: the target encoder's
    forward over every token, and forward + backward (3x forward) of the context encoder and
    the predictor for each mask (`contexts[i]`, `targets[i]` tokens per clip). Elementwise ops,
    norms and the optimiser are left out, as in the usual MFU accounting."""
    d, hidden, depth = enc.embed_dim, enc.mlp_hidden, enc.depth
    n = (enc.num_frames // enc.tubelet_size) * (enc.crop_size // enc.patch_size) ** 2
    patch_dim = 3 * enc.tubelet_size * enc.patch_size ** 2

    def blocks(tokens, width, mlp, layers):
        per_layer = 2 * tokens * (4 * width * width + 2 * width * mlp) + 4 * tokens * tokens * width
        return layers * per_layer

    def encoder(tokens):
        return 2 * n * patch_dim * d + blocks(tokens, d, hidden, depth)

    dp = pred.embed_dim
    total = encoder(n)  # target pass, no backward
    for kc, kt in zip(contexts, targets):
        predictor = 2 * kc * d * dp + blocks(kc + kt, dp, 4 * dp, pred.depth) + 2 * kt * dp * d
        total += 3 * (encoder(kc) + predictor)
    return batch * total


def mean_flops(enc, pred, batch, masks):
    """Mean `model_flops` over steps; `masks[step]` lists (context, target) index tensors."""
    return statistics.mean(
        model_flops(enc, pred, batch, [int(c.shape[1]) for c, _ in m], [int(t.shape[1]) for _, t in m])
        for m in masks
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--inputs", required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast of the forward")
    ap.add_argument("--compile", action="store_true", help="torch.compile the target encoder")
    ap.add_argument("--flops-only", action="store_true",
                    help="print the mean model FLOPs per step of the inputs' masks and stop")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    with safe_open(args.inputs, framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    enc = ref.EncoderConfig(**json.loads(meta["encoder"]))
    pred = ref.PredictorConfig(**json.loads(meta["predictor"]))
    optim = ref.OptimConfig(**json.loads(meta["optim"]))
    warmup, steps = int(meta["warmup"]), int(meta["steps"])
    batch = int(tensors["clip"].shape[0])
    masks = [
        [
            (tensors[f"step{s}.mask{i}.context"].to(device),
             tensors[f"step{s}.mask{i}.target"].to(device))
            for i in range(pred.num_mask_tokens)
        ]
        for s in range(warmup + steps)
    ]
    if args.flops_only:
        print(mean_flops(enc, pred, batch, masks))
        return
    model = ref.build(enc, pred, optim, seed=args.seed).to_device(device)
    if args.bf16:
        model.autocast = torch.bfloat16
    if args.compile:
        model.target = torch.compile(model.target)
    clip = tensors["clip"].to(device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    times, losses = [], []
    for step in range(warmup + steps):
        t0 = time.perf_counter()
        out = model.train_step(clip, masks[step])  # reads the loss back: ends synchronised
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        losses.append(out["loss"])
        if step >= warmup:
            times.append(dt)
    # The mask sizes change every step: the mean FLOPs of the timed steps.
    flops = mean_flops(enc, pred, batch, masks[warmup:])
    print(json.dumps({
        "impl": f"torch {torch.__version__}" + (" +compile" if args.compile else ""),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "dtype": "bf16" if args.bf16 else "f32",
        "batch_size": batch,
        "step_s": times,
        "median_s": statistics.median(times),
        "losses": losses,
        "flops_per_step": flops,
        "peak_reserved_bytes": torch.cuda.max_memory_reserved() if cuda else None,
    }))


if __name__ == "__main__":
    main()
