"""The PyTorch peer of `train-step`: the same training step (our PyTorch reference model,
`tools/reference/vjepa_ref.py`, written from the spec with the torch ops the official code uses:
nn.Linear, nn.LayerNorm, F.scaled_dot_product_attention, exact GELU, torch.optim.AdamW) on the
inputs `train-step` wrote: same configs, clip, per-step mask indices, warm-up and timed steps.
Prints one JSON line like `train-step`."""

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--inputs", required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    with safe_open(args.inputs, framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    enc = ref.EncoderConfig(**json.loads(meta["encoder"]))
    pred = ref.PredictorConfig(**json.loads(meta["predictor"]))
    optim = ref.OptimConfig(**json.loads(meta["optim"]))
    warmup, steps = int(meta["warmup"]), int(meta["steps"])
    model = ref.build(enc, pred, optim, seed=args.seed)
    clip = tensors["clip"]

    times, losses = [], []
    for step in range(warmup + steps):
        masks = [
            (tensors[f"step{step}.mask{i}.context"], tensors[f"step{step}.mask{i}.target"])
            for i in range(pred.num_mask_tokens)
        ]
        t0 = time.perf_counter()
        out = model.train_step(clip, masks)
        dt = time.perf_counter() - t0
        losses.append(out["loss"])
        if step >= warmup:
            times.append(dt)
    print(json.dumps({
        "impl": f"torch {torch.__version__}",
        "threads": torch.get_num_threads(),
        "step_s": times,
        "median_s": statistics.median(times),
        "losses": losses,
    }))


if __name__ == "__main__":
    main()
