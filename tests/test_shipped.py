"""The models shipped in weights/: named by their hash, within the size limit, the default exists,
and each one compresses and decompresses a small image bit for bit (a variable-rate one at the
default quality)."""

import re

import numpy as np
import pytest

from codec.api import compress_image, decompress
from codec.store import REPO_WEIGHTS, ModelRef, ModelStore
from codec.rate import DEFAULT_QUALITY, quality_beta
from models import file_sha256, load_model

SHIPPED = sorted(REPO_WEIGHTS.glob("*.pt"))


def test_the_default_names_a_shipped_model():
    name = (REPO_WEIGHTS / "DEFAULT").read_text().strip()
    assert (REPO_WEIGHTS / name) in SHIPPED


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_a_shipped_model_is_named_by_its_hash_and_at_most_20_mb(path):
    arch_tag_hash = re.fullmatch(r"(vae|pln)-[A-Za-z0-9._+-]+-([0-9a-f]{8})", path.stem)
    assert arch_tag_hash and file_sha256(path).startswith(arch_tag_hash.group(2))
    assert path.stat().st_size <= 20 * 2**20
    _, info = load_model(path)
    assert info["arch"] == arch_tag_hash.group(1) and info["meta"]["training"]["steps"] > 0


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_a_shipped_model_round_trips_a_small_image(path):
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:40, 0:56]
    image = np.clip(np.stack([4 * x, 5 * y, 2 * (x + y)], -1) + rng.integers(-20, 20, (40, 56, 3)), 0, 255)
    model, _ = load_model(path)
    beta = quality_beta(DEFAULT_QUALITY, model.beta_range) if model.variable_rate else None
    data, x_hat, _ = compress_image(
        model, image.astype(np.uint8), model_ref=ModelRef.of_file(path), params="fast", beta=beta
    )
    decoded, _ = decompress(data, ModelStore(dirs=[REPO_WEIGHTS]))
    assert np.array_equal(decoded, x_hat)
