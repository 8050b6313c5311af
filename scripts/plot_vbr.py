"""Figures of a variable-rate model's evaluation: the per-level share of the rate, and crops beside JPEG.

    python -m scripts.plot_vbr --recs /tmp/vbr-recs --data ../shared/data/kodak --image kodim21.png \\
        --points pln-vbr-…-q1 pln-vbr-…-q4 pln-vbr-…-q8 --out results/kodak

Reads the .rec files `eval_rd.py --rec-dir DIR` kept (DIR/<point>/<image>.rec, one folder per RD point)
and writes into --out:

  rate_by_level.png / .json   per point, the mean bits per pixel of each latent level's section and of the
                              container header over all images (the thesis's Fig. 4.2, in actual bytes)
  crops_<image>.png           --image decoded from three --points beside JPEG 4:2:0 (Pillow) at the
                              nearest file size, and the original: a --crop square at --at (x y), with
                              each whole image's bpp and PSNR
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from codec import api
from codec.store import ModelStore
from codec.bitstream import read_rec
from scripts.rd_common import load_rgb, psnr, write_results


def rate_by_level(recs: Path) -> dict:
    """{point: {"beta", "n_images", "header_bpp", "level<L>_bpp"...}} from every DIR/<point>/*.rec."""
    out = {}
    for folder in sorted(p for p in recs.iterdir() if p.is_dir()):
        rows = []
        for path in sorted(folder.rglob("*.rec")):
            header, sections = read_rec(path)
            pixels = header.height * header.width
            size = path.stat().st_size
            levels = {f"level{len(sections) - i}_bpp": 8 * len(s) / pixels for i, s in enumerate(sections)}
            rows.append(
                {
                    "beta": header.beta,
                    "bpp": 8 * size / pixels,
                    "header_bpp": 8 * (size - sum(map(len, sections))) / pixels,
                    **levels,
                }
            )
        if rows:
            out[folder.name] = {
                "n_images": len(rows),
                "beta": rows[0]["beta"],
                **{k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k != "beta"},
            }
    return dict(sorted(out.items(), key=lambda kv: kv[1]["bpp"]))


def plot_rate_by_level(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(table)
    parts = sorted((k for k in table[names[0]] if k.startswith("level")), reverse=True) + ["header_bpp"]
    fig, (ax, share) = plt.subplots(1, 2, figsize=(11, 4))
    labels = [f"β={table[n]['beta']:.3g}" if table[n]["beta"] else n for n in names]
    bottom = np.zeros(len(names))
    for part in parts:
        values = np.array([table[n][part] for n in names])
        ax.bar(labels, values, bottom=bottom, label=part.replace("_bpp", ""))
        share.plot(
            labels, 100 * values / np.array([table[n]["bpp"] for n in names]), "o-", label=part.replace("_bpp", "")
        )
        bottom += values
    ax.set_ylabel("bits per pixel (mean over images)")
    share.set_ylabel("share of the file [%]")
    for a in (ax, share):
        a.tick_params(axis="x", rotation=45)
        a.legend()
        a.grid(alpha=0.3)
    fig.suptitle("Rate by latent level (actual .rec bytes)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def jpeg_at_size(img: np.ndarray, target_bytes: int) -> tuple[np.ndarray, int, int]:
    """(decoded JPEG, its bytes, quality): Pillow's default 4:2:0 JPEG whose size is nearest the target."""
    best = None
    for quality in range(1, 96):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=quality)
        size = buf.tell()
        if best is None or abs(size - target_bytes) < abs(best[1] - target_bytes):
            best = (np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")), size, quality)
    return best


def plot_crops(
    img: np.ndarray, decoded: list[tuple[str, np.ndarray, int]], at: tuple[int, int], crop: int, path: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pixels = img.shape[0] * img.shape[1]
    x0, y0 = at
    cut = (slice(y0, y0 + crop), slice(x0, x0 + crop))
    fig, axes = plt.subplots(len(decoded), 3, figsize=(9, 3.1 * len(decoded)))
    for row, (label, ours, size) in zip(np.atleast_2d(axes), decoded):
        jpeg, jpeg_size, quality = jpeg_at_size(img, size)
        panels = [
            ("original", img),
            (f"{label}\n{8 * size / pixels:.3f} bpp, {psnr(img, ours):.2f} dB", ours),
            (f"JPEG q{quality}\n{8 * jpeg_size / pixels:.3f} bpp, {psnr(img, jpeg):.2f} dB", jpeg),
        ]
        for ax, (title, picture) in zip(row, panels):
            ax.imshow(picture[cut], interpolation="nearest")
            ax.set_title(title, fontsize=9)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recs", required=True, help="the --rec-dir of an eval_rd.py run")
    p.add_argument("--out", required=True, help="folder for the figures and the JSON")
    p.add_argument("--data", help="the evaluated images (for the crop figure)")
    p.add_argument("--image", help="the image to crop, relative to --data")
    p.add_argument("--points", nargs="+", default=[], help="RD points (folders of --recs) for the crop figure")
    p.add_argument("--at", type=int, nargs=2, default=(256, 128), metavar=("X", "Y"), help="crop's top left")
    p.add_argument("--crop", type=int, default=192, help="crop side in pixels")
    args = p.parse_args(argv)
    recs, out = Path(args.recs), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = rate_by_level(recs)
    if not table:
        print(f"plot_vbr.py: error: no .rec files under {recs}", file=sys.stderr)
        return 2
    write_results(out / "rate_by_level.json", {"source": "plot_vbr", "recs": str(recs), "points": table})
    plot_rate_by_level(table, out / "rate_by_level.png")
    if args.image:
        img = load_rgb(Path(args.data) / args.image)
        store = ModelStore()
        decoded = []
        for point in args.points:
            rec = recs / point / Path(args.image).with_suffix(".rec")
            x_hat, header = api.decompress(rec.read_bytes(), store)
            decoded.append((f"ours, β={header.beta:.3g}", x_hat, rec.stat().st_size))
        plot_crops(img, decoded, tuple(args.at), args.crop, out / f"crops_{Path(args.image).stem}.png")
    print(json.dumps(table, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
