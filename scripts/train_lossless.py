"""Train the lossless head of a model file and write the model file with the head added.

    python -m scripts.train_lossless --model EXPORT.pt --init-head weights/pln-vbr-b466eb67.pt \\
        --data ../shared/data/photos:../shared/data/photos-extra --minutes 20 --out-dir weights

1. Pairs: `--pairs` random crops of `--crop` pixels a side from the training images, each with its
   lossy decode by the frozen model (x̂ of a posterior sample, as the coder sends one, rounded to
   8 bits) at a β drawn from the quality levels `--qualities` (a variable-rate model).
2. Training: Adam on the head's bits per subpixel (its continuous logistic NLL, models/lossless.py)
   over random `--patch`-pixel patches of the pairs, cosine-decayed learning rate, `--minutes` long.
3. Export: the model file's networks unchanged, plus the head, its coder tables and its training record,
   as `<arch>-<tag>-<sha8>.pt` in `--out-dir` (a new SHA-256, so a new model id for .rec files).

The pairs are cached in `--cache` (default: beside the checkpoint) and the head checkpointed to `--ckpt`,
so a stopped run continues where it was with `--resume`. When the networks are retrained, `--init-head`
starts from the head of the model file they replace: it has learned the same task on a similar x̂.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from codec.lossless import build_tables
from codec.rate import quality_beta
from models import load_model, save_model
from models.lossless import LosslessHead
from training.data import list_images, sampled_crops
from training.run import hardware


def make_pairs(model, files: list[Path], pairs: int, crop: int, qualities: list[int], seed: int) -> dict:
    """{"x", "x_hat": (N, 3, crop, crop) uint8, "beta": (N,) float}: random crops and their lossy decodes."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    xs, x_hats, betas = [], [], []
    for i, patch in sampled_crops(files, pairs, crop, rng):
        x = torch.from_numpy(patch).permute(2, 0, 1)[None].contiguous()
        beta = quality_beta(rng.choice(qualities), model.beta_range) if model.variable_rate else None
        with torch.inference_mode():
            x_hat = model(x.float() / 255, sample=True, beta=beta)["x_hat"]
        xs.append(x[0])
        x_hats.append((x_hat[0].clamp(0, 1) * 255).round().to(torch.uint8))
        betas.append(beta if beta is not None else 0.0)
        if (i + 1) % 50 == 0:
            print(f"pairs: {i + 1}/{pairs}", file=sys.stderr, flush=True)
    return {"x": torch.stack(xs), "x_hat": torch.stack(x_hats), "beta": torch.tensor(betas)}


def batch(pairs: dict, size: int, patch: int, gen: torch.Generator) -> tuple:
    n, _, h, w = pairs["x"].shape
    idx = torch.randint(n, (size,), generator=gen)
    tops = torch.randint(h - patch + 1, (size,), generator=gen)
    lefts = torch.randint(w - patch + 1, (size,), generator=gen)
    boxes = list(zip(idx, tops, lefts))
    x = torch.stack([pairs["x"][i, :, t : t + patch, c : c + patch] for i, t, c in boxes])
    x_hat = torch.stack([pairs["x_hat"][i, :, t : t + patch, c : c + patch] for i, t, c in boxes])
    beta = pairs["beta"][idx]
    return x, x_hat, (beta if (beta > 0).all() else None)


def init_head(path: str, channels: int) -> LosslessHead:
    """The lossless head of the model file at `path`, to start from."""
    source, _ = load_model(path)
    head = source.lossless_head
    if head is None:
        raise SystemExit(f"train_lossless: {path} has no lossless head to start from")
    if head.channels != channels:
        raise SystemExit(f"train_lossless: {path}'s head has {head.channels} channels, not --channels {channels}")
    return head


def save(path: Path, head, opt, step: int, minutes: float, log: list) -> None:
    state = {"head": head.state_dict(), "opt": opt.state_dict(), "step": step, "minutes": minutes, "log": log}
    torch.save(state, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="the model file to add a head to")
    p.add_argument("--data", default="../shared/data/photos:../shared/data/photos-extra")
    p.add_argument("--pairs", type=int, default=526, help="crops decoded by the model (2 per training photo)")
    p.add_argument("--crop", type=int, default=256)
    p.add_argument("--qualities", type=int, nargs="+", default=[5, 6, 7, 8])
    p.add_argument("--patch", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--channels", type=int, default=24)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ckpt", default="runs/lossless/head.pt")
    p.add_argument("--cache", help="the pairs' cache (default: pairs.pt beside --ckpt)")
    p.add_argument("--resume", action="store_true")
    p.add_argument(
        "--init-head",
        metavar="MODEL",
        help="start from the lossless head of this model file (e.g. the one the retrained networks replace)",
    )
    p.add_argument("--out-dir", default="weights")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, info = load_model(args.model)
    ckpt = Path(args.ckpt)
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache) if args.cache else ckpt.parent / "pairs.pt"
    if cache.is_file():
        pairs = torch.load(cache)
    else:
        t0 = time.perf_counter()
        pairs = make_pairs(model, list_images(args.data), args.pairs, args.crop, args.qualities, args.seed)
        torch.save(pairs, cache)
        print(f"{len(pairs['x'])} pairs in {time.perf_counter() - t0:.0f} s -> {cache}", file=sys.stderr)

    head = init_head(args.init_head, args.channels) if args.init_head else LosslessHead(args.channels)
    init_meta = dict(head.meta) if args.init_head else None
    opt = torch.optim.Adam(head.parameters(), lr=args.lr)
    step, minutes_before, log = 0, 0.0, []
    if args.resume and ckpt.is_file():
        state = torch.load(ckpt)
        head.load_state_dict(state["head"])
        opt.load_state_dict(state["opt"])
        step, minutes_before, log = state["step"], state["minutes"], state["log"]
    gen = torch.Generator().manual_seed(args.seed + step)
    budget = args.minutes * 60
    t0, last_save, recent = time.perf_counter(), time.perf_counter(), []
    while (elapsed := minutes_before * 60 + time.perf_counter() - t0) < budget:
        for group in opt.param_groups:  # cosine over the time budget, to 5 % of the start
            group["lr"] = args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * elapsed / budget)))
        x, x_hat, beta = batch(pairs, args.batch, args.patch, gen)
        bits = head.nll_bits(x, x_hat, beta).sum() / x.numel()
        opt.zero_grad(set_to_none=True)
        bits.backward()
        opt.step()
        step += 1
        recent.append(bits.item())
        if step % 50 == 0:
            log.append({"step": step, "minutes": round(elapsed / 60, 2), "bits_per_subpixel": float(np.mean(recent))})
            print(f"step {step}: {log[-1]['bits_per_subpixel']:.4f} bits/subpixel", file=sys.stderr, flush=True)
            recent = []
        if time.perf_counter() - last_save > 120:
            save(ckpt, head, opt, step, minutes_before + (time.perf_counter() - t0) / 60, log)
            last_save = time.perf_counter()
    minutes = minutes_before + (time.perf_counter() - t0) / 60
    save(ckpt, head, opt, step, minutes, log)

    head.cdfs = build_tables()
    head.meta = {
        "steps": step,
        "minutes": round(minutes, 1),
        "hardware": hardware(torch.device("cpu"), 1, bf16=False),
        "pairs": len(pairs["x"]),
        "crop": args.crop,
        "patch": args.patch,
        "batch": args.batch,
        "qualities": args.qualities,
        "data": args.data,
        "final_bits_per_subpixel": log[-1]["bits_per_subpixel"] if log else None,
    }
    if init_meta is not None:  # how the head it started from was trained (on other networks)
        head.meta["init_from"] = {"model": Path(args.init_head).name, **init_meta}
    model.lossless_head = head
    path = save_model(model, args.out_dir, info["tag"], info["weights_dtype"], meta=info["meta"])
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
