"""How well `rec-codec encode --bpp X` lands: every image at every target, files coded for real.

    python -m scripts.bench_bpp --data ../shared/data/kodak --target 0.15 0.3 0.6 --coder fast \\
        -o results/kodak/bpp_targets.json

Per (image, target): the bpp of the file written (header included), its relative error, the β chosen,
how many files were coded (1 = the KL-only search landed, more = recalibrated on the coded file) and the
seconds taken. The summary counts, per target, the images within the tolerance (3 %).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from codec import api, store as model_store
from codec.params import PRESETS
from codec.image import image_pixels
from codec.rate import BPP_TOLERANCE, compress_to_bpp
from scripts.rd_common import find_images, load_rgb, write_results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--target", type=float, nargs="+", default=[0.15, 0.3, 0.6], metavar="BPP")
    p.add_argument("--model", help="a variable-rate model (default: weights/DEFAULT)")
    p.add_argument("--coder", choices=PRESETS, help="coder preset (default: the model's, as `rec-codec encode`)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--limit", type=int)
    p.add_argument("-o", "--output", required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    store = model_store.ModelStore()
    model, ref = store.load(model_store.find_model(args.model))
    if not model.variable_rate:
        print(f"bench_bpp.py: error: {ref.name} is not a variable-rate model", file=sys.stderr)
        return 2
    coder = args.coder or api.default_coder(model)
    rows = []
    images = find_images(Path(args.data))[: args.limit]
    for path in tqdm(images, file=sys.stderr, unit="img"):
        img = load_rgb(path)
        x = image_pixels(img)
        for target in args.target:
            t0 = time.perf_counter()
            data, _, stats = compress_to_bpp(
                lambda b: api.compress_image(model, img, model_ref=ref, params=coder, beta=b),
                model,
                x,
                target,
                coder=coder,
            )
            rows.append(
                {
                    "image": path.name,
                    "target_bpp": target,
                    "bpp": stats["bpp"],
                    "error": stats["bpp"] / target - 1,
                    "beta": stats["beta"],
                    "files_coded": stats["attempts"],
                    "seconds": time.perf_counter() - t0,
                }
            )
    summary = {}
    for target in args.target:
        mine = [r for r in rows if r["target_bpp"] == target]
        summary[str(target)] = {
            "images": len(mine),
            "within_tolerance": sum(abs(r["error"]) <= BPP_TOLERANCE for r in mine),
            "max_abs_error": max(abs(r["error"]) for r in mine),
            "mean_files_coded": sum(r["files_coded"] for r in mine) / len(mine),
            "median_seconds": sorted(r["seconds"] for r in mine)[len(mine) // 2],
        }
    doc = {
        "source": "bench_bpp",
        "model": ref.name,
        "coder": coder,
        "tolerance": BPP_TOLERANCE,
        "dataset": Path(args.data).name,
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "summary": summary,
        "rows": rows,
    }
    write_results(args.output, doc)
    for target, s in summary.items():
        print(
            f"target {target} bpp: {s['within_tolerance']}/{s['images']} within {100 * BPP_TOLERANCE:g} %, "
            f"max |error| {100 * s['max_abs_error']:.1f} %, {s['mean_files_coded']:.2f} files coded per image, "
            f"median {s['median_seconds']:.1f} s",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
