"""Golden files: bytes written by an earlier build must keep decoding to the same latents and pixels.

tests/expected/coder_v2.npz holds, per (preset, level), synthetic float32 q and p, the level bytes the
encoder wrote and the sample they decode to (`thesis-importance` level 2: the bytes the `thesis` preset
wrote before its level 2 moved to the greedy walk). tests/expected/golden.rec was written with the `thesis`
preset by the tiny PLN in tests/expected/pln-golden-*.pt; golden.png is what it decoded to. golden-vbr.rec
(format version 2, with a β) was written at β = 2.5 by the tiny variable-rate PLN pln-golden-vbr-*.pt.
tests/expected/layout_v1.npz holds the same for the `sp-orc-predicted` level coder (codec/layout.py), with
the predicted bits it was laid out from.

A failing *decode* test means old files would no longer decode: a bug, or a change that needs a new
format or RNG version. A failing *encode* test with passing decode tests means the encoder now writes
different (still decodable) bytes; if intended, regenerate: `python tests/test_golden.py --regenerate`.
The greedy encoder scores candidates with float32 matrix products, whose rounding differs between CPU
kernels (AVX2, AVX-512, AMX): a near-tie can then go the other way and the bytes differ, though they
decode exactly everywhere. tests/expected/encoder_variants.json lists such bytes (by SHA-256, with the
CPU they were written on), which the encode test accepts if they decode to the encoder's own sample.
"""

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from codec import CoderParams, decode_level, encode_level, layout
from codec.api import compress_image, decompress
from codec.store import ModelRef, ModelStore
from codec.image import load_rgb, save_png
from models import ModelConfig, build_model, save_model

EXPECTED = Path(__file__).resolve().parent / "expected"
CODER_FILE = EXPECTED / "coder_v2.npz"
LAYOUT_FILE = EXPECTED / "layout_v1.npz"
VARIANTS_FILE = EXPECTED / "encoder_variants.json"
CASES = [("thesis", 1), ("thesis", 2), ("thesis-importance", 2), ("fast", 1), ("fast", 2)]
SHAPES = {1: (1, 8, 8, 12), 2: (1, 4, 4, 6)}
SEED = 7
GOLDEN_BETA = 2.5


def synthetic(level: int) -> dict[str, np.ndarray]:
    """q and p with KLs from 0 to ~33 bits a dim (regeneration only: the arrays are stored)."""
    i = np.arange(np.prod(SHAPES[level]), dtype=np.float64).reshape(SHAPES[level])
    p_loc = 0.3 * np.sin(i)
    p_scale = 0.5 + 0.4 * np.cos(i) ** 2
    q_loc = p_loc + p_scale * 1.5 * np.sin(0.7 * i)
    q_scale = p_scale * (0.002 + 0.9 * np.abs(np.cos(1.3 * i)) ** 3)
    q_scale[i % 41 == 0] *= 1e-7  # a few 23-33-bit dims: outliers
    q_loc[i % 7 == 3] = p_loc[i % 7 == 3]  # and some dims with q = p (KL 0 where q_scale = p_scale)
    return {
        k: v.astype(np.float32) for k, v in dict(q_loc=q_loc, q_scale=q_scale, p_loc=p_loc, p_scale=p_scale).items()
    }


def image() -> np.ndarray:
    yy, xx = np.mgrid[0:24, 0:40]
    img = np.stack([128 + 100 * np.sin(xx / 5.0), 128 + 90 * np.cos(yy / 4.0), (xx * yy) % 256], -1)
    return img.clip(0, 255).astype(np.uint8)


def tensors(arrays: dict, prefix: str) -> list[torch.Tensor]:
    return [torch.from_numpy(arrays[f"{prefix}{k}"]) for k in ("q_loc", "q_scale", "p_loc", "p_scale")]


@pytest.fixture(scope="module")
def golden() -> dict:
    return dict(np.load(CODER_FILE))


@pytest.mark.parametrize("preset,level", CASES)
def test_golden_level_bytes_decode_to_the_same_sample(golden, preset, level):
    prefix = f"{preset}-{level}-"
    _, _, p_loc, p_scale = tensors(golden, prefix)
    sample = decode_level(
        p_loc, p_scale, golden[prefix + "bytes"].tobytes(), seed=SEED, level=level, params=CoderParams.preset(preset)
    )
    assert np.array_equal(sample.numpy().view(np.uint32), golden[prefix + "sample"].view(np.uint32)), (
        "files written by an earlier build decode differently: bump the format or RNG version"
    )


@pytest.mark.parametrize("preset,level", CASES)
def test_encoder_still_writes_the_golden_bytes(golden, preset, level):
    prefix = f"{preset}-{level}-"
    params = CoderParams.preset(preset)
    q_loc, q_scale, p_loc, p_scale = tensors(golden, prefix)
    z, data = encode_level(q_loc, q_scale, p_loc, p_scale, seed=SEED, level=level, params=params)
    if data != golden[prefix + "bytes"].tobytes():  # or the bytes of a CPU that rounds its GEMMs differently
        variants = json.loads(VARIANTS_FILE.read_text(encoding="utf-8"))["cases"].get(f"{preset}-{level}", {})
        assert hashlib.sha256(data).hexdigest() in variants, (
            "the encoder writes different bytes; if intended: python tests/test_golden.py --regenerate "
            "(if only this CPU's matrix products round differently, record them in encoder_variants.json)"
        )
        back = decode_level(p_loc, p_scale, data, seed=SEED, level=level, params=params)
        assert torch.equal(back.view(torch.int32), z.view(torch.int32))


def test_golden_sp_orc_predicted_level_decodes_to_the_same_sample_and_is_still_written():
    arrays = dict(np.load(LAYOUT_FILE))
    q_loc, q_scale, p_loc, p_scale = tensors(arrays, "")
    predicted, params = torch.from_numpy(arrays["predicted"]), CoderParams.preset(layout.SAMPLER)
    data = arrays["bytes"].tobytes()
    sample = layout.decode_level(p_loc, p_scale, data, predicted, seed=SEED, level=1, params=params)
    assert np.array_equal(sample.numpy().view(np.uint32), arrays["sample"].view(np.uint32)), (
        "files written by an earlier build decode differently: bump the format or RNG version"
    )
    _, written, _ = layout.encode_level(q_loc, q_scale, p_loc, p_scale, predicted, seed=SEED, level=1, params=params)
    assert written == data, "the encoder writes different bytes; if intended: python tests/test_golden.py --regenerate"


def test_golden_rec_file_decodes_to_the_same_pixels():
    decoded, header = decompress((EXPECTED / "golden.rec").read_bytes(), ModelStore(dirs=[EXPECTED]))
    expected = load_rgb(EXPECTED / "golden.png")
    assert header.coder == "thesis" and decoded.shape == expected.shape
    # The coder's latents are exact; the synthesis network may round differently on another CPU/BLAS.
    diff = np.abs(decoded.astype(int) - expected.astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.01


def test_golden_variable_rate_rec_file_decodes_to_the_same_pixels():
    decoded, header = decompress((EXPECTED / "golden-vbr.rec").read_bytes(), ModelStore(dirs=[EXPECTED]))
    expected = load_rgb(EXPECTED / "golden-vbr.png")
    assert header.format_version == 2 and header.beta == pytest.approx(GOLDEN_BETA, rel=2e-3)
    diff = np.abs(decoded.astype(int) - expected.astype(int))
    assert decoded.shape == expected.shape and diff.max() <= 1 and diff.mean() < 0.01


def regenerate() -> None:
    arrays = {}
    for preset, level in CASES:
        prefix = f"{preset}-{level}-"
        syn = synthetic(level)
        arrays.update({prefix + k: v for k, v in syn.items()})
        sample, data = encode_level(*tensors(arrays, prefix), seed=SEED, level=level, params=CoderParams.preset(preset))
        arrays[prefix + "bytes"] = np.frombuffer(data, dtype=np.uint8)
        arrays[prefix + "sample"] = sample.numpy()
    np.savez_compressed(CODER_FILE, **arrays)
    variants = json.loads(VARIANTS_FILE.read_text(encoding="utf-8"))
    VARIANTS_FILE.write_text(json.dumps({**variants, "cases": {}}, indent=2) + "\n", encoding="utf-8")  # of old bytes
    for old in EXPECTED.glob("pln-golden-*.pt"):
        old.unlink()
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(arch="pln", channels=16, latents=8, level2_channels=8, level2_latents=4, log_scale_min=-4.0)
    )
    path = save_model(model, EXPECTED, "golden", torch.float16)
    model = ModelStore(dirs=[EXPECTED]).load(path)[0]
    data, x_hat, _ = compress_image(model, image(), model_ref=ModelRef.of_file(path), seed=SEED, params="thesis")
    (EXPECTED / "golden.rec").write_bytes(data)
    save_png(x_hat, EXPECTED / "golden.png")
    print(f"wrote {CODER_FILE}, {path.name}, golden.rec ({len(data)} bytes), golden.png")
    regenerate_variable_rate()
    regenerate_layout()


def regenerate_layout() -> None:
    """layout_v1.npz: level 1 of synthetic q, p coded by sp-orc-predicted from a noisy prediction of the KL."""
    syn = synthetic(1)
    q_loc, q_scale, p_loc, p_scale = (torch.from_numpy(syn[k]) for k in ("q_loc", "q_scale", "p_loc", "p_scale"))
    ratio = (q_scale / p_scale).double()
    kl = (ratio**2 + ((q_loc - p_loc) / p_scale).double() ** 2 - 1 - torch.log(ratio**2)) / (2 * np.log(2))
    i = torch.arange(kl.numel(), dtype=torch.float64).view(kl.shape)
    predicted = kl * (1 + 0.3 * torch.sin(i))
    params = CoderParams.preset(layout.SAMPLER)
    sample, data, _ = layout.encode_level(q_loc, q_scale, p_loc, p_scale, predicted, seed=SEED, level=1, params=params)
    arrays = dict(syn, predicted=predicted.numpy(), bytes=np.frombuffer(data, dtype=np.uint8), sample=sample.numpy())
    np.savez_compressed(LAYOUT_FILE, **arrays)
    print(f"wrote {LAYOUT_FILE} ({len(data)} bytes of level 1)")


def regenerate_variable_rate() -> None:
    """golden-vbr.rec (format version 2): a tiny variable-rate PLN with random β tables, coded at β=GOLDEN_BETA."""
    for old in EXPECTED.glob("pln-golden-vbr-*.pt"):
        old.unlink()
    torch.manual_seed(1)
    model = build_model(
        ModelConfig(
            arch="pln",
            channels=16,
            latents=8,
            level2_channels=8,
            level2_latents=4,
            log_scale_min=-4.0,
            beta_knots=3,
            beta_min=0.5,
            beta_max=8.0,
        )
    )
    with torch.no_grad():
        for table in model.conditioning.parameters():
            table.copy_(0.3 * torch.randn_like(table))
    path = save_model(model, EXPECTED, "golden-vbr", torch.float16)
    model = ModelStore(dirs=[EXPECTED]).load(path)[0]
    data, x_hat, _ = compress_image(
        model, image(), model_ref=ModelRef.of_file(path), seed=SEED, params="thesis", beta=GOLDEN_BETA
    )
    (EXPECTED / "golden-vbr.rec").write_bytes(data)
    save_png(x_hat, EXPECTED / "golden-vbr.png")
    print(f"wrote {path.name}, golden-vbr.rec ({len(data)} bytes), golden-vbr.png")


if __name__ == "__main__":
    if sys.argv[1:] != ["--regenerate"]:
        sys.exit("usage: python tests/test_golden.py --regenerate")
    regenerate()
