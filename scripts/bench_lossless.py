"""Lossless bits per subpixel: `rec-codec encode --lossless` against PNG and WebP lossless, and the ideal.

    python -m scripts.bench_lossless --data ../shared/data/kodak -o results/lossless/kodak.json

Per image and quality level: the .rec file's bits per subpixel (header included; every file is decoded
and must give the input's pixels), the ideal (the negative ELBO in bits of what the file codes: the
latents' KL plus the head's continuous negative log-likelihood of the image given the coded latents'
decode), their ratio, the seconds to encode and decode; PNG (Pillow, compress_level 9, optimize) and
WebP lossless (Pillow, method 6, exact) of the same pixels. JPEG XL has no Pillow plugin here.
"""

from __future__ import annotations

import argparse
import io
import platform
import sys
import time

import numpy as np
import torch
from PIL import Image

from codec import api, store as model_store
from codec.bitstream import RecHeader, pack_rec, unpack_rec
from codec.params import PRESETS
from codec.rate import QUALITY_LEVELS
from scripts.rd_common import find_images, load_rgb, write_results


def classical_bits(image: np.ndarray) -> dict[str, int]:
    """Bits of the image as PNG and as WebP lossless."""
    out = {}
    for name, kwargs in (
        ("png", dict(format="PNG", compress_level=9, optimize=True)),
        ("webp_lossless", dict(format="WEBP", lossless=True, quality=100, method=6, exact=True)),
    ):
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, **kwargs)
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")), image)
        out[name] = 8 * len(buf.getvalue())
    return out


def ideal_bits(model, image: np.ndarray, data: bytes, stats: dict, store) -> float:
    """KL of the coded latents plus the head's continuous NLL of the image given their lossy decode."""
    header, sections = unpack_rec(data)
    lossy = pack_rec(RecHeader(**{**header.__dict__, "lossless": False}), sections[:-1])
    x_hat, _ = api.decompress(lossy, store)
    x, xh = (torch.from_numpy(a).permute(2, 0, 1)[None] for a in (image, x_hat))
    with torch.inference_mode():
        nll = model.lossless_head.nll_bits(x, xh, stats["beta"]).item()
    return stats["kl_bits"] + nll


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--model", help="a model file with a lossless head (default: weights/DEFAULT)")
    p.add_argument(
        "--coder", choices=PRESETS, help="coder of the latents (default: the model's, as `rec-codec encode`)"
    )
    p.add_argument("--quality", type=int, nargs="+", help="quality levels (default: the lossless default)")
    p.add_argument("--limit", type=int)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("-o", "--output", required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    path = model_store.find_model(args.model)
    store = model_store.ModelStore(model_path=path)  # decodes with this file, wherever it is
    model, ref = store.load(path)
    if model.lossless_head is None:
        p.error(f"model {ref.name} has no lossless head")
    args.coder = args.coder or api.default_coder(model)
    from codec.lossless import DEFAULT_QUALITY

    qualities = args.quality or [DEFAULT_QUALITY]
    if any(not 1 <= q <= QUALITY_LEVELS for q in qualities):
        p.error(f"--quality: 1 to {QUALITY_LEVELS}")
    files = find_images(args.data)[: args.limit]
    rows, t_all = [], time.perf_counter()
    for path in files:
        image = load_rgb(path)
        subpixels = image.size
        row = {"image": path.name, "height": image.shape[0], "width": image.shape[1]}
        row.update({k: v / subpixels for k, v in classical_bits(image).items()})
        for q in qualities:
            t0 = time.perf_counter()
            data, _, stats = api.compress_image(
                model, image, model_ref=ref, params=args.coder, quality=q, lossless=True
            )
            t1 = time.perf_counter()
            decoded, _ = api.decompress(data, store)
            t2 = time.perf_counter()
            if not np.array_equal(decoded, image):
                raise SystemExit(f"{path.name}: the decoded image differs from the input")
            ideal = ideal_bits(model, image, data, stats, store)
            row[f"q{q}"] = {
                "bits_per_subpixel": 8 * len(data) / subpixels,
                "latent_bits_per_subpixel": 8 * (len(data) - stats["pixel_bytes"]) / subpixels,
                "ideal_bits_per_subpixel": ideal / subpixels,
                "ratio_to_ideal": 8 * len(data) / ideal,
                "encode_s": t1 - t0,
                "decode_s": t2 - t1,
            }
        rows.append(row)
        print(path.name, {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, file=sys.stderr)

    def avg(key, q=None):
        return float(np.mean([(r[f"q{q}"] if q else r)[key] for r in rows]))

    summary = {
        "png": avg("png"),
        "webp_lossless": avg("webp_lossless"),
        **{
            f"q{q}": {
                k: avg(k, q)
                for k in (
                    "bits_per_subpixel",
                    "latent_bits_per_subpixel",
                    "ideal_bits_per_subpixel",
                    "ratio_to_ideal",
                    "encode_s",
                    "decode_s",
                )
            }
            for q in qualities
        },
    }
    doc = {
        "name": f"{ref.name} lossless",
        "description": "bits per subpixel (8 * bytes / (3 H W)), means over images; every .rec decoded and "
        "checked against the input; ideal = KL of the coded latents + the head's continuous NLL",
        "meta": {
            "model": ref.name,
            "coder": args.coder,
            "qualities": qualities,
            "images": len(rows),
            "data": str(args.data),
            "threads": args.threads,
            "wall_s": time.perf_counter() - t_all,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(),
        },
        "summary": summary,
        "per_image": rows,
    }
    write_results(args.output, doc)
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
