"""Where a coder loses fidelity: each latent level coded or replaced by an exact posterior sample.

    python -m scripts.loss_by_level --data kodak/ --limit 4 --quality 1 4 8 -o results/coders/loss_by_level.json

For every image and quality the encoder's walk runs, untiled, in these modes (z2 = level 2, z1 = level 1):
  coded         both levels coded, as `rec-codec encode` codes an image of up to 1024² pixels
  exact         both levels an exact posterior sample, charged their KL (the coder-free ideal)
  z2-exact      z2 an exact sample (charged its KL), z1 coded
  z1-exact      z2 coded, z1 an exact sample (charged its KL)
  oracle-layout (sp-orc-predicted only) both coded, but level 1's blocks laid out from its true per-dim
                KL instead of the rate head's prediction: what a perfect head would give (encoder-side
                only; a decoder would need that KL)
A coded level is charged the bits of its section; the header is left out. Per mode the JSON holds each
image's bits per pixel and PSNR, and the means over images, with the loss against the exact samples'
curve at equal rate (pchip in log-rate over the mean exact points; NaN outside their range). The exact
samples are seeded (--seed), the coder uses the file seed 0 as `rec-codec encode` does.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import numpy as np
import torch
from scipy.interpolate import PchipInterpolator

from codec import api, tiling
from codec.image import image_pixels
from codec.level import encode_level
from codec.params import PRESETS, CoderParams
from codec.rate import QUALITY_LEVELS
from codec.rng import tile_seed
from codec.store import ModelStore, find_model
from models import gaussian_kl
from scripts.rd_common import clean_points, dumps, find_images, load_rgb, psnr, write_results

MODES = ("coded", "exact", "z2-exact", "z1-exact", "oracle-layout")
LN2 = math.log(2.0)


@torch.inference_mode()
def run_mode(model, image: np.ndarray, beta, params: CoderParams, mode: str, gen: torch.Generator) -> dict:
    """Bits per pixel (coded sections or KL) and PSNR of one mode's decode of `image`, untiled."""
    x = image_pixels(image)
    height, width = image.shape[:2]
    grid = tiling.TileGrid.for_image(model, height, width, 0)
    exact = {"exact": (1, 2), "z2-exact": (2,), "z1-exact": (1,)}.get(mode, ())
    predict_rate = params.level1.sampler == "sp-orc-predicted"
    bits = {}

    def draw(level: int, index: int, q: tuple, p: tuple, predicted_bits=None) -> torch.Tensor:
        if level in exact:
            bits[level] = float(gaussian_kl(*q, *p).double().sum()) / LN2
            return q[0] + q[1] * torch.randn(q[0].shape, generator=gen, dtype=q[0].dtype)
        if mode == "oracle-layout" and level == 1:
            predicted_bits = gaussian_kl(*q, *p).double() / LN2
        z, data, _ = encode_level(
            *q,
            *p,
            seed=tile_seed(0, index),
            level=level,
            params=params,
            return_stats=True,
            choose=True,
            predicted_bits=predicted_bits,
        )
        bits[level] = 8.0 * len(data)
        return z

    z1 = tiling.encode_walk(model, x, grid, draw, beta, predict_rate)
    x_hat = tiling.synthesize(model, grid, z1, beta, model.synthesis_context, height, width)
    return {
        "bpp": sum(bits.values()) / (height * width),
        "bpp_by_level": {f"z{k}": v / (height * width) for k, v in sorted(bits.items())},
        "psnr": psnr(image, x_hat),
    }


def loss_at_equal_rate(exact: list[tuple[float, float]], point: tuple[float, float]) -> float:
    """PSNR of `point` minus the exact samples' curve (pchip in log-rate) at its rate; NaN outside."""
    log_rates, dists = clean_points(np.log([r for r, _ in exact]), [d for _, d in exact])
    x = math.log(point[0])
    if not log_rates[0] <= x <= log_rates[-1]:
        return math.nan
    if len(log_rates) == 1:
        return point[1] - float(dists[0])
    return point[1] - float(PchipInterpolator(log_rates, dists)(x))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="folder of images")
    p.add_argument("--model", help="a variable-rate PLN model file, name or hash (default: weights/DEFAULT)")
    p.add_argument("--coder", choices=PRESETS, help="coder preset (default: the model's, as `rec-codec encode`)")
    p.add_argument("--quality", type=int, nargs="+", default=[1, 4, 8], help="quality levels (default: 1 4 8)")
    p.add_argument("--modes", nargs="+", choices=MODES, help="modes to run (default: all that apply)")
    p.add_argument("--limit", type=int, help="only the first N images (sorted by path)")
    p.add_argument("--seed", type=int, default=0, help="seed of the exact samples")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("-o", "--output", required=True)
    args = p.parse_args(argv)
    if any(not 1 <= q <= QUALITY_LEVELS for q in args.quality):
        p.error(f"--quality: 1 to {QUALITY_LEVELS}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    path = find_model(args.model)
    model, ref = ModelStore().load(path)
    if model.num_levels != 2 or not model.variable_rate:
        print(f"loss_by_level: error: {ref.name} is not a variable-rate PLN", file=sys.stderr)
        return 2
    coder = args.coder or api.default_coder(model)
    params = CoderParams.preset(coder)
    modes = args.modes or [m for m in MODES if m != "oracle-layout" or coder == "sp-orc-predicted"]
    if "oracle-layout" in modes and coder != "sp-orc-predicted":
        print("loss_by_level: error: oracle-layout needs the sp-orc-predicted coder", file=sys.stderr)
        return 2
    files = find_images(args.data)[: args.limit]
    if not files:
        print(f"loss_by_level: error: no images under {args.data}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    per_image = {}
    for file in files:
        image = load_rgb(file)
        per_image[file.name] = {}
        for q in args.quality:
            beta, _ = api.coding_beta(model, quality=q)
            # one stream per mode: `exact` and `z2-exact` draw the same z2
            rows = {m: run_mode(model, image, beta, params, m, torch.Generator().manual_seed(args.seed)) for m in modes}
            per_image[file.name][f"q{q}"] = rows
            line = ", ".join(f"{m} {r['bpp']:.4f} bpp {r['psnr']:.2f} dB" for m, r in rows.items())
            print(f"{file.name} q{q}: {line}", file=sys.stderr)
    means = {}
    for q in args.quality:
        means[f"q{q}"] = {
            m: {k: float(np.mean([per_image[f][f"q{q}"][m][k] for f in per_image])) for k in ("bpp", "psnr")}
            for m in modes
        }
    if "exact" in modes:
        curve = [(means[f"q{q}"]["exact"]["bpp"], means[f"q{q}"]["exact"]["psnr"]) for q in args.quality]
        for row in means.values():
            for r in row.values():
                r["loss_at_equal_rate_db"] = loss_at_equal_rate(curve, (r["bpp"], r["psnr"]))
    doc = {
        "name": f"{ref.name} loss by level ({coder})",
        "description": "bits per pixel of the coded sections (header left out) or the KL of exact levels, "
        "and PSNR, per image and mode; means over images with the loss against the exact samples' curve",
        "meta": {
            "model": ref.name,
            "coder": coder,
            "qualities": args.quality,
            "modes": modes,
            "images": list(per_image),
            "seed": args.seed,
            "threads": args.threads,
            "wall_s": time.perf_counter() - t0,
        },
        "means": means,
        "per_image": per_image,
    }
    write_results(args.output, doc)
    print(dumps(means))
    return 0


if __name__ == "__main__":
    sys.exit(main())
