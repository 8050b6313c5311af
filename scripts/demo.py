"""`make demo`: compress and decompress a real photograph with the shipped default model.

The photo is scikit-image's public-domain `astronaut.png` (installed with the `demo` extra), so
nothing is downloaded. Writes out/demo/astronaut.rec and out/demo/astronaut.rec.png and prints
bpp (from the file size) and PSNR.

    python -m scripts.demo [--image PATH] [--coder fast|thesis|sp-orc-predicted] [--out out/demo]
"""

import argparse
import sys
from pathlib import Path

from codec import cli
from codec.image import load_image
from codec.metrics import psnr

REPO = Path(__file__).resolve().parents[1]


def sample_photo() -> Path:
    try:
        import skimage
    except ImportError:
        raise SystemExit(
            "demo: error: scikit-image is not installed (pip install -e '.[demo]'), or pass --image PATH"
        ) from None
    return Path(skimage.__file__).parent / "data" / "astronaut.png"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", type=Path, help="photo to compress (default: scikit-image's astronaut)")
    parser.add_argument("--coder", default="fast", choices=("fast", "thesis", "sp-orc-predicted"))
    parser.add_argument("--out", type=Path, default=REPO / "out" / "demo")
    args = parser.parse_args(argv)
    image = args.image or sample_photo()
    args.out.mkdir(parents=True, exist_ok=True)
    rec = args.out / f"{image.stem}.rec"
    png = args.out / f"{image.stem}.rec.png"
    print(f"demo: compressing {image} with the default model (weights/DEFAULT), coder '{args.coder}'")
    if cli.main(["encode", str(image), "-o", str(rec), "--coder", args.coder, "--force"]) != 0:
        return 1
    if cli.main(["decode", str(rec), "-o", str(png), "--force"]) != 0:
        return 1
    original, _ = load_image(image)
    decoded, _ = load_image(png)
    bpp = 8 * rec.stat().st_size / (original.shape[0] * original.shape[1])
    print(
        f"demo: {rec.name}: {rec.stat().st_size} bytes, {bpp:.3f} bpp; decoded {png.name}: "
        f"PSNR {psnr(original, decoded):.2f} dB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
