"""Benchmark classical codecs: JPEG, WebP, AVIF (Pillow) and BPG (bpgenc/bpgdec).

Writes one RD curve in CompressAI's results-JSON schema (see scripts/rd_common.py):

    python -m scripts.bench_codecs --data ../shared/data/kodak --codec jpeg \\
        -o results/kodak/jpeg.json
    python -m scripts.bench_codecs --data DIR --codec bpg \\
        --bpgenc /opt/bpg/bpgenc --bpgdec /opt/bpg/bpgdec -o bpg.json

Codecs (settings as in ../shared/anchors/classical-kodak.json):
  jpeg     Pillow/libjpeg-turbo defaults (4:2:0, baseline), quality 5..95 step 5
  jpeg444  the same with subsampling=0 (4:4:4)
  webp     Pillow/libwebp defaults (lossy, method=4, 4:2:0), quality 5..95 step 5
  avif     Pillow/libavif+aom, 4:4:4, speed 6, max_threads=1, quality 2,10,...,94
  bpg      bpgenc -q QP -f 444 -e x265 -c ycbcr -b 8, QP 47..12 step 5 (CompressAI)

Pillow codecs run in memory, timed with time.perf_counter: encode = RGB image -> bytes,
decode = bytes -> RGB array. BPG runs bpgenc on a PNG of the image and bpgdec to a PPM
in a temp folder (both include process start-up, as CompressAI's bench does). bpp is
encoded bytes·8/(H·W). One process, one torch thread for MS-SSIM; wrap it in `nice`.
The results document goes to stdout and, with -o, to a file.
Exit codes: 0 ok, 2 bad input (missing folder, no images, codec not available),
1 bpgenc/bpgdec failed.
"""

from __future__ import annotations

import argparse
import io
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, features
from tqdm import tqdm

from scripts.rd_common import (
    IMAGE_EXTS,
    dumps,
    find_images,
    image_metrics,
    load_rgb,
    make_results,
    mean,
    write_results,
)

BPG_ANCHOR = "../shared/anchors/kodak/bpg_444_x265_ycbcr.json"
DEFAULT_QUALITIES = {
    "jpeg": list(range(5, 100, 5)),
    "jpeg444": list(range(5, 100, 5)),
    "webp": list(range(5, 100, 5)),
    "avif": [2, 10, 20, 30, 40, 50, 60, 70, 80, 88, 94],
    "bpg": [
        47,
        42,
        37,
        32,
        27,
        22,
        17,
        12,
    ],  # QP: lower = better; listed in increasing rate
}


class UsageError(Exception):
    """Bad input that the user can fix: reported as one stderr line, exit code 2."""


# ----------------------------------------------------------------------------- codecs


class PillowCodec:
    """In-memory encode/decode through one Pillow plugin."""

    def __init__(self, codec: str):
        self.codec = codec
        self.format, self.options, self.feature, self.label, self.settings = {
            "jpeg": (
                "JPEG",
                {},
                "jpg",
                "JPEG 4:2:0 (Pillow)",
                "Pillow defaults: 4:2:0, baseline, optimize=False",
            ),
            "jpeg444": (
                "JPEG",
                {"subsampling": 0},
                "jpg",
                "JPEG 4:4:4 (Pillow)",
                "subsampling=0 (4:4:4), baseline, optimize=False",
            ),
            "webp": (
                "WEBP",
                {},
                "webp",
                "WebP (Pillow)",
                "Pillow defaults: lossy, method=4 (4:2:0)",
            ),
            "avif": (
                "AVIF",
                {"subsampling": "4:4:4", "speed": 6, "max_threads": 1},
                "avif",
                "AVIF 4:4:4 (Pillow)",
                "subsampling=4:4:4, speed=6, max_threads=1",
            ),
        }[codec]
        if not features.check(self.feature):
            raise UsageError(
                f"Pillow {Image.__version__} was built without {self.format} support "
                f"(PIL.features.check({self.feature!r}) is False)"
            )

    @property
    def version(self) -> str:
        lib = {"jpg": "libjpeg_turbo", "webp": "webp", "avif": "avif"}[self.feature]
        return f"Pillow {Image.__version__}, {lib} {features.version(lib)}"

    def run(self, img: np.ndarray, quality: int) -> tuple[np.ndarray, int, float, float]:
        """Returns (reconstruction, encoded bytes, encode seconds, decode seconds)."""
        im = Image.fromarray(img)
        buf = io.BytesIO()
        t0 = time.perf_counter()
        im.save(buf, format=self.format, quality=quality, **self.options)
        t1 = time.perf_counter()
        data = buf.getvalue()
        t2 = time.perf_counter()
        with Image.open(io.BytesIO(data)) as dec:
            rec = np.asarray(dec.convert("RGB"), dtype=np.uint8)
        t3 = time.perf_counter()
        return rec, len(data), t1 - t0, t3 - t2


class BPGCodec:
    """bpgenc/bpgdec subprocesses (libbpg): 4:4:4, x265, ycbcr, 8 bit, as CompressAI."""

    label, settings = (
        "BPG 4:4:4 x265 ycbcr",
        "bpgenc -q QP -f 444 -e x265 -c ycbcr -b 8",
    )

    def __init__(self, bpgenc: str | None, bpgdec: str | None):
        self.enc = shutil.which(bpgenc or "bpgenc")
        self.dec = shutil.which(bpgdec or "bpgdec")
        if not (self.enc and self.dec):
            missing = " and ".join(n for n, p in (("bpgenc", self.enc), ("bpgdec", self.dec)) if not p)
            raise UsageError(
                f"{missing} not found (not on PATH and not given by --bpgenc/--bpgdec; "
                f"libbpg is not packaged in Debian/PyPI). Use the published BPG curve "
                f"{BPG_ANCHOR} instead"
            )
        self.tmp = Path(tempfile.mkdtemp(prefix="bench_bpg_"))

    @property
    def version(self) -> str:
        out = subprocess.run([self.enc, "-h"], check=False, capture_output=True, text=True)
        first = (out.stdout or out.stderr).strip().splitlines()
        return first[0] if first else "bpgenc (unknown version)"

    def run(self, img: np.ndarray, quality: int) -> tuple[np.ndarray, int, float, float]:
        src, bits, out = self.tmp / "in.png", self.tmp / "out.bpg", self.tmp / "out.ppm"
        Image.fromarray(img).save(src)
        cmd = [
            self.enc,
            "-o",
            bits,
            "-q",
            quality,
            "-f",
            "444",
            "-e",
            "x265",
            "-c",
            "ycbcr",
            "-b",
            "8",
            src,
        ]
        t0 = time.perf_counter()
        subprocess.run([str(c) for c in cmd], check=True, capture_output=True)
        t1 = time.perf_counter()
        subprocess.run([self.dec, "-o", str(out), str(bits)], check=True, capture_output=True)
        t2 = time.perf_counter()
        rec = load_rgb(out)
        return rec, bits.stat().st_size, t1 - t0, t2 - t1

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def make_codec(args: argparse.Namespace):
    if args.codec == "bpg":
        return BPGCodec(args.bpgenc, args.bpgdec)
    return PillowCodec(args.codec)


# ---------------------------------------------------------------------- benchmark


def bench(codec, images: dict[str, np.ndarray], qualities: list[int], progress: bool = True) -> tuple[dict, dict]:
    """Code every image at every quality; returns (results, per_image).

    results[k][i]: mean over images at qualities[i]; per_image[name][k][i]: one image.
    """
    keys = ("bpp", "psnr-rgb", "ms-ssim-rgb", "encoding_time", "decoding_time")
    per_image = {name: {k: [] for k in keys} for name in images}
    bar = tqdm(
        total=len(images) * len(qualities),
        desc=f"bench {getattr(codec, 'codec', 'bpg')}",
        unit="img",
        disable=not progress,
        file=sys.stderr,
    )
    for name, img in images.items():
        h, w = img.shape[:2]
        for q in qualities:
            rec, nbytes, t_enc, t_dec = codec.run(img, q)
            row = {
                "bpp": nbytes * 8.0 / (h * w),
                **image_metrics(img, rec),
                "encoding_time": t_enc,
                "decoding_time": t_dec,
            }
            for k in keys:
                per_image[name][k].append(row[k])
            bar.update(1)
    bar.close()
    results = {k: [mean([per_image[n][k][i] for n in images]) for i in range(len(qualities))] for k in keys}
    return results, per_image


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="folder of images (searched recursively)")
    p.add_argument("--codec", required=True, choices=sorted(DEFAULT_QUALITIES))
    p.add_argument(
        "--qualities",
        type=int,
        nargs="+",
        metavar="Q",
        help="quality (Pillow) or QP (bpg) values; default: the codec's standard sweep",
    )
    p.add_argument("--bpgenc", help="path to bpgenc (default: from PATH)")
    p.add_argument("--bpgdec", help="path to bpgdec (default: from PATH)")
    p.add_argument("--per-image", action="store_true", help="also store per-image values")
    p.add_argument("--name", help="curve name (default: the codec's label)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar on stderr")
    p.add_argument("-o", "--output", help="write the results JSON here (also printed to stdout)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    codec = None
    try:
        data = Path(args.data)
        if not data.is_dir():
            raise UsageError(f"data folder not found: {data}")
        paths = find_images(data)
        if not paths:
            raise UsageError(f"no images found under {data} (looked for {' '.join(IMAGE_EXTS)})")
        qualities = args.qualities or DEFAULT_QUALITIES[args.codec]
        top = 51 if args.codec == "bpg" else 100
        if not all(0 <= q <= top for q in qualities):
            raise UsageError(f"--qualities for {args.codec} must lie in 0..{top}")
        images = {}
        for p in paths:
            try:
                images[str(p.relative_to(data))] = load_rgb(p)
            except OSError as e:
                raise UsageError(f"cannot read image {p}: {e}") from None
        if min(min(im.shape[:2]) for im in images.values()) <= 160:
            print("[bench] warning: images <= 160 px: MS-SSIM is NaN", file=sys.stderr)
        codec = make_codec(args)
        import torch

        torch.set_num_threads(1)  # shared machine; MS-SSIM on one core
        print(
            f"[bench] {args.codec}: {len(paths)} images in {data}, q = {qualities}",
            file=sys.stderr,
        )
        t0 = time.perf_counter()
        results, per_image = bench(codec, images, qualities, progress=not args.no_progress)
        meta = {
            "source": "bench_codecs",
            "codec": args.codec,
            "settings": codec.settings,
            "param": "qp" if args.codec == "bpg" else "quality",
            "values": qualities,
            "version": codec.version,
            "dataset": data.name,
            "n_images": len(images),
            "device": "cpu",
            "bpp": "encoded bytes * 8 / (H * W), mean over images",
            "timing": "mean seconds per image, sequential, single process",
            "wall_s": time.perf_counter() - t0,
            "python": platform.python_version(),
        }
        doc = make_results(
            args.name or codec.label,
            f"{codec.label}. {codec.version}",
            results,
            meta=meta,
            per_image=per_image if args.per_image else None,
        )
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as e:  # bpgenc/bpgdec failed
        msg = (e.stderr or b"").decode(errors="replace").strip().splitlines()
        print(f"error: {e.cmd[0]} exited with {e.returncode}: {msg[-1:]}", file=sys.stderr)
        return 1
    finally:
        if isinstance(codec, BPGCodec):
            codec.close()
    if args.output:
        write_results(args.output, doc)
        print(f"[bench] wrote {args.output}", file=sys.stderr)
    print(dumps(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
