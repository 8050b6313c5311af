"""Cut a folder of photos into fixed training patches, as the thesis code prepared CLIC.

For every image, coef·⌊H/crop⌋·⌊W/crop⌋ random crop×crop patches (or --per-image N) are written as PNG, or
as JPEG with --format jpg (thesis code: coef 10, crop 360, then random 256² crops at train time). Train on
the result with `train.py --data_dir=OUT`.

    python -m scripts.extract_patches --src clic/train --out patches/ [--crop 360] [--coef 10] [--seed 0]
    python -m scripts.extract_patches --src photos:photos-extra --out .gpu/crops --crop 256 --per-image 2 \
        --format jpg          # a small training set to carry to a GPU machine (scripts/device_train.sh)
"""

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from training.data import DataError, list_images, read_training_image


def patches_of(
    img: np.ndarray, crop: int, coef: int, rng: np.random.Generator, per_image: int | None = None
) -> list[np.ndarray]:
    h, w = img.shape[:2]
    count = coef * (h // crop) * (w // crop) if per_image is None else per_image * (min(h, w) >= crop)
    tops = rng.integers(0, h - crop + 1, count)
    lefts = rng.integers(0, w - crop + 1, count)
    return [img[top : top + crop, left : left + crop] for top, left in zip(tops, lefts)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", required=True, help="folder of photos (searched recursively)")
    parser.add_argument("--out", required=True, help="output folder for the patches")
    parser.add_argument("--crop", type=int, default=360)
    parser.add_argument("--coef", type=int, default=10, help="patches per crop-sized tile of each image")
    parser.add_argument("--per-image", type=int, help="this many patches from every image big enough instead")
    parser.add_argument("--format", choices=("png", "jpg"), default="png")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality (4:4:4)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        files = list_images(args.src)
    except DataError as e:
        print(f"extract_patches: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    written = skipped = 0
    for path in tqdm(files, desc="images", file=sys.stderr):
        try:
            img = read_training_image(path)
        except DataError as e:
            print(f"extract_patches: skipping {path}: {e}", file=sys.stderr)
            skipped += 1
            continue
        for i, patch in enumerate(patches_of(img, args.crop, args.coef, rng, args.per_image)):
            options = {"quality": args.quality, "subsampling": 0} if args.format == "jpg" else {}
            Image.fromarray(patch).save(out / f"{path.parent.name}_{path.stem}_{i:04d}.{args.format}", **options)
            written += 1
    print(f"{written} patches of {args.crop}×{args.crop} from {len(files) - skipped} images in {out}", file=sys.stderr)
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())
