"""codec/tiling.py: tiled coding round trips, the halos against the networks' reach, and tiled headers."""

import struct
import zlib

import numpy as np
import pytest
import torch

from codec import api, tiling
from codec.bitstream import RecFormatError, RecHeader, pack_rec, unpack_rec
from codec.params import CoderParams, LevelParams
from codec.store import ModelRef
from models import ModelConfig, build_model

SMALL = CoderParams(
    level1=LevelParams("greedy", 8, 4, 4095, 1.0, 24.0), level2=LevelParams("importance", 8, 1, 15, 1.0, 12.0)
)
REF = ModelRef("tiny", b"\x01" * 8)


def tiny(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, channels=16, latents=8, level2_channels=8, level2_latents=4, log_scale_min=-4.0)
    return build_model(cfg).eval()


def smooth_image(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.stack([np.sin(9 * xx), np.cos(7 * yy), xx * yy], -1) * 0.4 + 0.5
    return (img * 255).astype(np.uint8)


def tiles_of(grid: tiling.TileGrid) -> list[int]:
    return list(range(len(grid)))


# ---- the halos cover what each network reads across a tile edge -----------------------------------


@pytest.mark.parametrize("arch", ["pln", "vae"])
def test_synthesis_of_tiles_equals_the_whole_image_synthesis(arch):
    model = tiny(arch)
    height, width = 200, 330
    grid = tiling.TileGrid.for_image(model, height, width, 64)
    z1 = torch.randn(1, 8, grid.height // 16, grid.width // 16)
    with torch.inference_mode():
        whole = tiling.synthesize(model, tiling.TileGrid(grid.height, grid.width), z1, None, 0, height, width)
        tiled = tiling.synthesize(model, grid, z1, None, model.synthesis_context, height, width)
        no_halo = tiling.synthesize(model, grid, z1, None, 0, height, width)
    diff = np.abs(tiled.astype(int) - whole.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3  # float rounding only
    assert np.abs(no_halo.astype(int) - whole.astype(int)).max() > 1  # the test sees a missing halo


def test_level1_prior_of_tiles_equals_the_whole_image_prior():
    model = tiny("pln")
    grid = tiling.TileGrid(320, 224, 64)
    z2 = torch.randn(1, 4, 10, 7)
    whole = (0, 320, 0, 224)

    def tiles_match(halo: int) -> list[bool]:
        full = model.prior(1, z2, None)[0]
        out = []
        for index in tiles_of(grid):
            ctx, box = grid.context(index, halo), grid.box(index)
            part = tiling.crop(model.prior(1, tiling.crop(z2, whole, ctx), None)[0], ctx, box)
            out.append(torch.allclose(part, tiling.crop(full, whole, box), atol=1e-5))
        return out

    with torch.inference_mode():
        assert all(tiles_match(model.prior_context))
        assert not all(tiles_match(0))  # the test sees a missing halo


def test_analysis_of_a_tile_context_equals_the_whole_image_features():
    model = tiny("pln")
    x = torch.rand(1, 3, 320, 288)
    grid = tiling.TileGrid(320, 288, 96)
    whole = (0, 320, 0, 288)
    with torch.inference_mode():
        full = model.bottom_up(x)
        for index in tiles_of(grid):
            ctx, box = grid.context(index, model.analysis_context), grid.box(index)
            part = model.bottom_up(tiling.padded_pixels(model, x, grid, ctx))
            for key in full:
                assert torch.allclose(tiling.crop(part[key], ctx, box), tiling.crop(full[key], whole, box), atol=1e-4)


# ---- round trips ---------------------------------------------------------------------------------


@pytest.mark.parametrize("arch, size, tile", [("pln", (700, 1000), 256), ("vae", (200, 150), 64)])
def test_tiled_file_decodes_to_the_encoders_pixels(arch, size, tile):
    model = tiny(arch)
    x = smooth_image(*size)  # no side divides the tile
    data, x_hat, stats = api.compress_image(model, x, model_ref=REF, params=SMALL, tile=tile, seed=7)
    header, sections = unpack_rec(data)
    assert header.format_version == 3 and header.tile == tile and header.n_tiles == 3 * 4 == stats["tiles"]
    assert len(sections) == 12 * model.num_levels
    assert (header.prior_context, header.synthesis_context) == (model.prior_context, model.synthesis_context)
    decoded, _ = api.decompress(data, lambda h: model)
    assert decoded.shape == (*size, 3) and np.array_equal(decoded, x_hat)
    assert stats["bytes"] == len(data) and stats["kl_bits"] > 0


def test_tiled_and_whole_coding_reach_the_same_quality():
    model = tiny("pln")
    x = smooth_image(320, 384)
    whole_data, whole, whole_stats = api.compress_image(model, x, model_ref=REF, params=SMALL, tile=0)
    tiled_data, tiled, tiled_stats = api.compress_image(model, x, model_ref=REF, params=SMALL, tile=128)
    assert unpack_rec(tiled_data)[0].n_tiles == 9
    mse = [np.mean((y.astype(float) - x) ** 2) for y in (whole, tiled)]
    assert abs(10 * np.log10(mse[0] / mse[1])) < 0.3
    assert abs(tiled_stats["kl_bits"] / whole_stats["kl_bits"] - 1) < 0.05  # the same posterior
    # what tiling adds to the file: about 20 bytes of section framing per extra tile and level
    assert len(tiled_data) - len(whole_data) < 0.1 * len(whole_data) + 24 * 8 * 2


def test_small_images_keep_the_untiled_layout_and_bytes():
    model = tiny("pln")
    x = smooth_image(96, 130)
    default, _, stats = api.compress_image(model, x, model_ref=REF, params=SMALL)
    whole, _, _ = api.compress_image(model, x, model_ref=REF, params=SMALL, tile=0)
    assert default == whole and unpack_rec(default)[0].format_version == 1 and stats["tiles"] == 1


def test_tile_that_is_not_a_multiple_of_the_models_factor_is_refused():
    with pytest.raises(ValueError, match=r"^the tile size must be a multiple of 32 and at least 64 for this model"):
        api.compress_image(tiny("pln"), smooth_image(200, 200), model_ref=REF, params=SMALL, tile=100)


def test_tile_seeds_are_distinct_and_tile_zero_keeps_the_file_seed():
    from codec.rng import tile_seed

    assert tile_seed(5, 0) == 5
    assert len({tile_seed(2**64 - 1, t) for t in range(1000)}) == 1000


# ---- headers -------------------------------------------------------------------------------------


def tiled_header(**changes) -> RecHeader:
    fields = dict(
        model_name="tiny",
        model_hash=b"\x01" * 8,
        height=300,
        width=500,
        seed=1,
        tile=256,
        prior_context=128,
        synthesis_context=32,
    )
    return RecHeader(**{**fields, **changes})


def test_tiled_header_round_trips_through_the_container():
    header = tiled_header(beta_code=33000)
    sections = [bytes([i]) * 3 for i in range(2 * header.n_tiles)]
    back, got = unpack_rec(pack_rec(header, sections))
    assert back == header and got == sections and back.n_tiles == 2 * 2 and back.format_version == 3


def _forge(header_bytes_fn) -> bytes:
    data = bytearray(pack_rec(tiled_header(), [b"x"] * 4))
    header_bytes_fn(data)
    body = bytes(data[:-4])
    return body + struct.pack(">I", zlib.crc32(body))


def _tiling_offset(data: bytes) -> int:
    pos = 30
    for _ in range(2):
        pos += 1 + data[pos]
    return pos + 2 + struct.unpack(">H", data[pos : pos + 2])[0]  # after coder_params: beta_code


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("tile", 16, r"^tile: 16 is outside \[64, 65535\]$"),
        ("tile", 512, r"^tile: a 500x300 image is not two or more tiles of 512$"),
        ("n_sections", 5, r"^n_sections: 5 is not 1 to 8 levels for 4 tiles$"),
        ("prior_context", 5000, r"^prior_context: 5000 is outside \[0, 1024\]$"),
    ],
)
def test_forged_tiling_fields_raise_the_specific_error(field, value, message):
    offsets = {"tile": 2, "prior_context": 4, "n_sections": 8}

    def forge(data):
        pos = _tiling_offset(data) + offsets[field]
        data[pos : pos + 2] = struct.pack(">H", value)

    with pytest.raises(RecFormatError, match=message):
        unpack_rec(_forge(forge))


def test_forged_huge_tiled_header_fails_before_the_model_is_loaded():
    calls = []
    data = pack_rec(tiled_header(height=10_000, width=10_000, tile=1024), [b"x"] * 200)
    with pytest.raises(RecFormatError, match=r"^height: 10000x10000 is above the limit of 50000000 pixels$"):
        api.decompress(data, calls.append, max_pixels=50_000_000)
    assert calls == []


def test_tile_that_does_not_fit_the_model_is_a_format_error():
    model = tiny("pln")
    data, _, _ = api.compress_image(model, smooth_image(300, 500), model_ref=REF, params=SMALL, tile=256)
    header, sections = unpack_rec(data)
    forged = pack_rec(RecHeader(**{**header.__dict__, "synthesis_context": 48}), sections)
    with pytest.raises(RecFormatError, match=r"^synthesis_context: 48 is not a multiple of the model's 32 pixels$"):
        api.decompress(forged, lambda h: model)
