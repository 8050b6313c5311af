"""Training data: random crops from a folder of photos, drawn statelessly from (seed, rank, step).

Each batch is a pure function of its step number, so a resumed run sees exactly the batches an
uninterrupted run would have, with no sampler state to save; each DDP rank draws its own stream.
"""

import os
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from codec.image import ImageError, find_images, load_image


class DataError(ValueError):
    """A data folder that cannot be trained on (missing, empty, unreadable or too-small images)."""


def list_images(folders: str | Path) -> list[Path]:
    """The images under a folder, or under each of several separated by os.pathsep (`photos:photos-extra`)."""
    files = []
    for folder in str(folders).split(os.pathsep):
        folder = Path(folder)
        if not folder.is_dir():
            raise DataError(f"data folder not found: {folder}")
        found = find_images(folder)
        if not found:
            raise DataError(f"no images (.png/.jpg/...) in data folder: {folder}")
        files += found
    return files


def read_training_image(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 through the codec's loader (any mode converted to 8-bit RGB)."""
    try:
        return load_image(path)[0]
    except ImageError as e:
        raise DataError(f"cannot read image {path}: {e}") from None


def sampled_crops(files: list[Path], count: int, crop: int, rng: random.Random):
    """Up to `count` random crop × crop patches, one from each of `files` in turn (images smaller than
    that are skipped): yields (i, (crop, crop, 3) uint8 crop of files[i % len(files)]); `rng` draws the
    positions."""
    for i in range(count):
        image = read_training_image(files[i % len(files)])
        h, w, _ = image.shape
        if min(h, w) < crop:
            continue
        top, left = rng.randrange(h - crop + 1), rng.randrange(w - crop + 1)
        yield i, image[top : top + crop, left : left + crop]


class RandomCrops:
    """Random crop×crop patches (optionally h-flipped) from every image of a folder at least that big."""

    def __init__(
        self, folder: str | Path, crop: int, flips: bool = False, seed: int = 0, rank: int = 0, cache: bool = True
    ):
        self.crop, self.flips, self.seed, self.rank, self.cache = crop, flips, seed, rank, cache
        self.files, self.sizes = [], []
        for path in list_images(folder):
            try:
                with Image.open(path) as im:
                    w, h = im.size
            except (UnidentifiedImageError, OSError) as e:
                raise DataError(f"cannot read image {path}: {e}") from None
            if min(h, w) >= crop:
                self.files.append(path)
                self.sizes.append((h, w))
        if not self.files:
            raise DataError(f"no image in {folder} is at least {crop}×{crop} pixels")
        self._cache: dict[int, np.ndarray] = {}

    def image(self, index: int) -> np.ndarray:
        if index in self._cache:
            return self._cache[index]
        img = read_training_image(self.files[index])
        if self.cache:
            self._cache[index] = img
        return img

    def batch(self, step: int, batch_size: int) -> torch.Tensor:
        """(B, 3, crop, crop) float32 in [0, 1] for this step."""
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + self.rank) * 1_000_000_007 + step)
        picks = torch.randint(len(self.files), (batch_size,), generator=gen).tolist()
        out = torch.empty(batch_size, 3, self.crop, self.crop)
        for i, index in enumerate(picks):
            h, w = self.sizes[index]
            top = int(torch.randint(h - self.crop + 1, (1,), generator=gen))
            left = int(torch.randint(w - self.crop + 1, (1,), generator=gen))
            patch = torch.from_numpy(self.image(index)[top : top + self.crop, left : left + self.crop].copy())
            patch = patch.permute(2, 0, 1).float().div_(255.0)
            if self.flips and bool(torch.randint(2, (1,), generator=gen)):
                patch = patch.flip(-1)
            out[i] = patch
        return out


def full_images(folder: str | Path, limit: int) -> list[torch.Tensor]:
    """Up to `limit` whole images as (1, 3, H, W) float tensors, for validation."""
    return [
        torch.from_numpy(read_training_image(p).copy()).permute(2, 0, 1)[None].float() / 255.0
        for p in list_images(folder)[:limit]
    ]
