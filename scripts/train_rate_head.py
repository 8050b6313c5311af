"""Train the rate head of a PLN model file and write the model file with the head added.

    python -m scripts.train_rate_head --model weights/pln-vbr-b466eb67.pt \\
        --data ../shared/data/photos:../shared/data/photos-extra --minutes 10 --out-dir weights

1. Examples: `--crops` random crops of `--crop` pixels a side from the training images, each at a β
   drawn log-uniformly from the model's range (a variable-rate model): the exact posterior sample z2
   the level-2 coder would send, and the KL (bits) of every level-1 dim given that z2.
2. Training: Adam on the squared error of the predicted KL bits (models/rate_head.py; the frozen
   level-2 decoder's features in float32), cosine-decayed learning rate, `--minutes` long; the last
   `--held-out` crops are kept out and give the head's R² at the end.
3. Export: the model file's networks unchanged, plus the head and its training record, as
   `<arch>-<tag>-<sha8>.pt` in `--out-dir` (a new SHA-256, so a new model id for .rec files).
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

from models import load_model, save_model
from models.distributions import gaussian_kl
from models.rate_head import RateHead, decoder_features
from training.data import list_images, sampled_crops
from training.run import hardware


def make_examples(model, files: list[Path], crops: int, crop: int, seed: int) -> dict:
    """{"z2": (N, G, c/32, c/32), "kl_bits": (N, F, c/16, c/16) float32, "beta": (N,)}."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    z2s, kls, betas = [], [], []
    for i, patch in sampled_crops(files, crops, crop, rng):
        x = torch.from_numpy(patch).permute(2, 0, 1)[None].float() / 255
        beta = None
        if model.variable_rate:
            lo, hi = model.beta_range
            beta = math.exp(rng.uniform(math.log(lo), math.log(hi)))
        with torch.inference_mode():
            feats = model.bottom_up(x, beta)
            q2 = model.posterior(2, feats, None, None)
            z2 = q2[0] + q2[1] * torch.randn_like(q2[0])
            p1 = model.prior(1, z2, None, beta)
            q1 = model.posterior(1, feats, *p1)
            kl = gaussian_kl(*q1, *p1) / math.log(2)
        z2s.append(z2[0])
        kls.append(kl[0])
        betas.append(beta if beta is not None else 0.0)
        if (i + 1) % 50 == 0:
            print(f"examples: {i + 1}/{crops}", file=sys.stderr, flush=True)
    return {"z2": torch.stack(z2s), "kl_bits": torch.stack(kls), "beta": torch.tensor(betas, dtype=torch.float64)}


def predict(model, head, z2: torch.Tensor, beta: float | None) -> torch.Tensor:
    with torch.no_grad():
        d = decoder_features(model, z2, beta, torch.float32)
    return head(d, beta)


def r_squared(model, head, examples: dict, idx: range) -> float:
    """1 - SSE / SST of the predicted per-dim KL bits over the examples `idx`."""
    sse, values = 0.0, []
    with torch.no_grad():
        for i in idx:
            beta = float(examples["beta"][i]) or None
            target = examples["kl_bits"][i : i + 1]
            sse += float(((predict(model, head, examples["z2"][i : i + 1], beta) - target) ** 2).sum())
            values.append(target.flatten().double())
    values = torch.cat(values)
    return 1.0 - sse / float(((values - values.mean()) ** 2).sum())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="the PLN model file to add a head to")
    p.add_argument("--data", default="../shared/data/photos:../shared/data/photos-extra")
    p.add_argument("--crops", type=int, default=526, help="training examples (2 per training photo)")
    p.add_argument("--held-out", type=int, default=48, help="of them, kept out of training for the R²")
    p.add_argument("--crop", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default="runs/rate_head/examples.pt", help="the examples' cache")
    p.add_argument("--out-dir", default="weights")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, info = load_model(args.model)
    if model.num_levels != 2:
        raise SystemExit("train_rate_head: the rate head is for two-level (PLN) models")
    cache = Path(args.cache)
    if cache.is_file():
        examples = torch.load(cache)
    else:
        t0 = time.perf_counter()
        examples = make_examples(model, list_images(args.data), args.crops, args.crop, args.seed)
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(examples, cache)
        print(f"{len(examples['z2'])} examples in {time.perf_counter() - t0:.0f} s -> {cache}", file=sys.stderr)
    n = len(examples["z2"])
    n_train = n - args.held_out
    if n_train < 1:
        raise SystemExit(f"train_rate_head: {n} examples leave none to train on after --held-out {args.held_out}")

    torch.manual_seed(args.seed)
    head = RateHead(model.cfg.level2_channels, model.cfg.latents, args.channels)
    opt = torch.optim.Adam(head.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    budget, step, t0, recent = args.minutes * 60, 0, time.perf_counter(), []
    while (elapsed := time.perf_counter() - t0) < budget:
        for group in opt.param_groups:  # cosine over the time budget, to 5 % of the start
            group["lr"] = args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * elapsed / budget)))
        loss = 0.0
        for i in torch.randint(n_train, (args.batch,), generator=gen).tolist():  # one β per example
            beta = float(examples["beta"][i]) or None
            err = predict(model, head, examples["z2"][i : i + 1], beta) - examples["kl_bits"][i : i + 1]
            loss = loss + (err**2).mean() / args.batch
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        recent.append(loss.item())
        if step % 100 == 0:
            print(f"step {step}: mean squared error {np.mean(recent):.4f} bits²", file=sys.stderr, flush=True)
            recent = []
    minutes = (time.perf_counter() - t0) / 60
    r2 = r_squared(model, head, examples, range(n_train, n)) if args.held_out else None
    print(f"{step} steps in {minutes:.1f} min; held-out R² {r2}", file=sys.stderr)

    head.meta = {
        "steps": step,
        "minutes": round(minutes, 1),
        "hardware": hardware(torch.device("cpu"), 1, bf16=False),
        "examples": n_train,
        "crop": args.crop,
        "batch": args.batch,
        "data": args.data,
        "held_out_r2": None if r2 is None else round(r2, 4),
    }
    model.rate_head = head
    path = save_model(model, args.out_dir, info["tag"], info["weights_dtype"], meta=info["meta"])
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
