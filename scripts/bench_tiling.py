"""Tiled coding benchmarks: seams and cost of tiles on a multi-megapixel photo, and memory and time on
a 50 Mpx image, written as JSON.

    python -m scripts.bench_tiling seams --photo ../shared/data/photos/001.png --scale 2 -o results/tiling/seams.json
    python -m scripts.bench_tiling large --photos ../shared/data/photos-extra -o results/tiling/large.json

`seams` codes one photo (resized by --scale, Lanczos) whole and in tiles with the same model, coder and
quality, and compares bpp and PSNR, and the error next to tile borders (within --band pixels) with the
error elsewhere, for both files: a seam would show as a larger border error in the tiled file only.
Each file chooses its shard decays as the encoder does: on the whole image, or on the centre tile; with
--fixed-decay both code with the preset's own decays, so that only the tiling differs.

`large` builds a --mpx megapixel mosaic of photos and a Kodak-sized (768×512) crop of it, and runs
`rec-codec encode` and `decode` on each as a separate process under /usr/bin/time -v: peak RSS (the
tiles bound it), wall seconds, and the seconds the command reports for the image itself (reading,
coding, writing: without starting Python and loading the model, several seconds that would swamp a
small image's time), --repeats times each (medians reported); the time-per-megapixel ratio of the
large image to the small one uses the latter.
"""

import argparse
import json
import math
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from codec import api, tiling
from codec.image import find_images, load_rgb
from codec.metrics import psnr
from codec.params import CoderParams
from codec.store import ModelStore, find_model


def border_mask(height: int, width: int, tile: int, band: int) -> np.ndarray:
    """True within `band` pixels of a tile border (the borders between tiles, not the image's edges)."""
    mask = np.zeros((height, width), dtype=bool)
    for edge in range(tile, height, tile):
        mask[max(0, edge - band) : edge + band] = True
    for edge in range(tile, width, tile):
        mask[:, max(0, edge - band) : edge + band] = True
    return mask


def error_stats(x: np.ndarray, x_hat: np.ndarray, mask: np.ndarray) -> dict:
    err = np.abs(x.astype(np.int16) - x_hat.astype(np.int16)).max(axis=2)
    return {
        "border_mean_abs_error": float(err[mask].mean()),
        "interior_mean_abs_error": float(err[~mask].mean()),
        "border_max_abs_error": int(err[mask].max()),
        "interior_max_abs_error": int(err[~mask].max()),
    }


def cmd_seams(args) -> dict:
    store = ModelStore()
    model, ref = store.load(find_model(args.model))
    photo = Image.open(args.photo).convert("RGB")
    photo = photo.resize((round(photo.width * args.scale), round(photo.height * args.scale)), Image.LANCZOS)
    x = np.asarray(photo)
    height, width = x.shape[:2]
    mask = border_mask(height, width, args.tile, args.band)
    out = {
        "photo": str(args.photo),
        "scale": args.scale,
        "height": height,
        "width": width,
        "model": ref.name,
        "coder": args.coder,
        "quality": args.quality,
        "tile": args.tile,
        "band": args.band,
    }
    params = CoderParams.preset(args.coder)
    if args.fixed_decay:
        params = params.with_level(1, decay_choices=()).with_level(2, decay_choices=())
        out["fixed_decay"] = True
    for name, tile in (("whole", 0), ("tiled", args.tile)):
        t0 = time.perf_counter()
        data, x_hat, stats = api.compress_image(model, x, model_ref=ref, params=params, quality=args.quality, tile=tile)
        seconds = time.perf_counter() - t0
        decoded, _ = api.decompress(data, store)
        assert np.array_equal(decoded, x_hat), "decoder mismatch"
        out[name] = {
            "tiles": stats["tiles"],
            "bytes": len(data),
            "bpp": stats["bpp"],
            "kl_bpp": stats["kl_bpp"],
            "psnr": psnr(x, x_hat),
            "encode_seconds": seconds,
            **error_stats(x, x_hat, mask),
        }
        print(name, json.dumps(out[name]), file=sys.stderr, flush=True)
    out["delta_psnr_db"] = out["tiled"]["psnr"] - out["whole"]["psnr"]
    out["delta_bpp_relative"] = out["tiled"]["bpp"] / out["whole"]["bpp"] - 1
    return out


def mosaic(photos: Path, mpx: float, cell: tuple[int, int] = (800, 1280)) -> np.ndarray:
    """Photos cropped to `cell` (h, w) and laid out row by row to about `mpx` megapixels, 3:2."""
    files = [p for p in find_images(photos) if Image.open(p).size[0] >= cell[1] and Image.open(p).size[1] >= cell[0]]
    cols = max(1, round(math.sqrt(mpx * 1e6 * 1.5 / (cell[0] * cell[1]))))
    rows = max(1, math.ceil(mpx * 1e6 / (cols * cell[0] * cell[1])))
    out = np.empty((rows * cell[0], cols * cell[1], 3), dtype=np.uint8)
    for i in range(rows * cols):
        r, c = divmod(i, cols)
        out[r * cell[0] : (r + 1) * cell[0], c * cell[1] : (c + 1) * cell[1]] = load_rgb(files[i % len(files)])[
            : cell[0], : cell[1]
        ]
    return out


def timed(cmd: list[str]) -> dict:
    """Run a `rec-codec ... --json` command under /usr/bin/time -v: the seconds it reports for its image,
    its wall seconds and its peak RSS."""
    res = subprocess.run(["/usr/bin/time", "-v", *cmd, "--json"], capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed: {res.stderr[-2000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", res.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", res.stderr).group(1)
    return {
        "seconds": json.loads(res.stdout.strip().splitlines()[-1])["seconds"],
        "wall_seconds": sum(float(p) * 60**i for i, p in enumerate(reversed(wall.split(":")))),
        "peak_rss_gb": rss_kb / 1e6,
    }


def cmd_large(args) -> dict:
    big = mosaic(Path(args.photos), args.mpx)
    small = big[:512, :768]
    out = {"coder": args.coder, "quality": args.quality, "tile": args.tile, "threads": args.threads, "images": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, img in (("small", small), ("large", big)):
            png = Path(tmp) / f"{name}.png"
            Image.fromarray(img).save(png, compress_level=1)
            rec = png.with_suffix(".rec")
            common = ["--threads", str(args.threads), "--force"]
            cli = [sys.executable, "-m", "codec.cli"]
            runs = []
            for _ in range(args.repeats):
                enc = timed(
                    [*cli, "encode", str(png), "-o", str(rec), "--coder", args.coder, "--quality", str(args.quality)]
                    + ["--tile", str(args.tile), *common]
                )
                dec = timed([*cli, "decode", str(rec), "-o", str(Path(tmp) / f"{name}.out.png"), *common])
                runs.append({"encode": enc, "decode": dec, "bytes": rec.stat().st_size})
                print(name, json.dumps(runs[-1]), file=sys.stderr, flush=True)
            mpx = img.shape[0] * img.shape[1] / 1e6
            out["images"][name] = {
                "height": img.shape[0],
                "width": img.shape[1],
                "mpx": mpx,
                "bpp": 8 * runs[-1]["bytes"] / (mpx * 1e6),
                "runs": runs,
                **{
                    f"{step}_{key}": statistics.median(r[step][key] for r in runs)
                    for step in ("encode", "decode")
                    for key in ("seconds", "wall_seconds", "peak_rss_gb")
                },
            }
    s, b = out["images"]["small"], out["images"]["large"]
    out["seconds_per_mpx"] = {
        f"{name}_{step}": img[f"{step}_seconds"] / img["mpx"]
        for name, img in (("small", s), ("large", b))
        for step in ("encode", "decode")
    }
    out["time_per_mpx_ratio"] = {
        step: out["seconds_per_mpx"][f"large_{step}"] / out["seconds_per_mpx"][f"small_{step}"]
        for step in ("encode", "decode")
    }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    seams = sub.add_parser("seams")
    seams.add_argument("--photo", required=True)
    seams.add_argument("--scale", type=float, default=2.0)
    seams.add_argument("--band", type=int, default=2)
    seams.add_argument("--fixed-decay", action="store_true", help="no per-file shard decay choice")
    large = sub.add_parser("large")
    large.add_argument("--photos", required=True)
    large.add_argument("--mpx", type=float, default=50.0)
    large.add_argument("--threads", type=int, default=1)
    large.add_argument("--repeats", type=int, default=1)
    for s in (seams, large):
        s.add_argument("--model", default=None)
        s.add_argument("--coder", default="fast")
        s.add_argument("--quality", type=int, default=4)
        s.add_argument("--tile", type=int, default=tiling.DEFAULT_TILE)
        s.add_argument("-o", "--output", required=True)
    args = p.parse_args(argv)
    result = cmd_seams(args) if args.command == "seams" else cmd_large(args)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
