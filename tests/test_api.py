"""codec.api and codec.image: the top-down flow, exact round trips, model lookup, image loading."""

import json
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from codec import api, header_params, store as model_store
from codec.api import compress_image, decompress
from codec.store import ModelNotFoundError, ModelRef, ModelStore, find_model
from codec.bitstream import RecFormatError, RecHeader, pack_rec, unpack_rec
from codec.image import ImageError, load_image, save_png, to_tensor
from codec.params import PRESETS, REGISTERED_FORMATS, CoderParams, LevelParams, registered_id
from models import ModelConfig, build_model, file_sha256, save_model

# Few candidates per step: fast, and still the real coder end to end.
SMALL = CoderParams(
    level1=LevelParams("greedy", 8, 4, 4095, 1.0, 24.0), level2=LevelParams("importance", 8, 1, 15, 1.0, 12.0)
)
SIZES = [(1, 1), (37, 53), (17, 300)]
EXPECTED = Path(__file__).resolve().parent / "expected"


def tiny(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(
        ModelConfig(arch=arch, channels=16, latents=8, level2_channels=8, level2_latents=4, log_scale_min=-4.0)
    )


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("weights")
    save_model(tiny("pln"), d, "tiny")
    save_model(tiny("vae"), d, "tiny")
    return d


@pytest.fixture(scope="module")
def store(models_dir):
    return ModelStore(dirs=[models_dir])


def image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def load(store, models_dir, arch):
    return store.load(next(models_dir.glob(f"{arch}-*.pt")))


# ---- round trips ----------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["pln", "vae"])
@pytest.mark.parametrize("size", SIZES)
def test_decoded_pixels_equal_the_encoders_prediction(store, models_dir, arch, size):
    model, ref = load(store, models_dir, arch)
    x = image(*size)
    data, x_hat, stats = compress_image(model, x, model_ref=ref, seed=5, params=SMALL)
    y, header = decompress(data, store)
    assert y.dtype == np.uint8 and y.shape == x.shape
    np.testing.assert_array_equal(y, x_hat)
    assert (header.height, header.width, header.seed) == (*size, 5)
    assert header.model_name == ref.name and header.model_hash == ref.sha256
    assert stats["bytes"] == len(data) and stats["bpp"] == 8 * len(data) / (size[0] * size[1])
    assert len(stats["levels"]) == model.num_levels and stats["kl_bpp"] >= 0


def test_preset_coder_roundtrip_and_header(store, models_dir):
    model, ref = load(store, models_dir, "pln")
    data, x_hat, stats = compress_image(model, image(37, 53), model_ref=ref, params="fast")
    header, sections = unpack_rec(data)
    chosen = CoderParams.preset("fast")
    for level_stats in stats["levels"]:  # the shard decay the encoder chose for each level
        chosen = chosen.with_level(level_stats["level"], shard_decay=level_stats["shard_decay"])
    fields = chosen.levels_format_bytes(2)
    assert header.coder == "fast" and len(sections) == 2
    assert header.coder_params == b"R" + bytes([registered_id(fields)])  # every choice has an id
    assert header_params.params_from_header(header, 2).levels_format_bytes(2) == fields
    np.testing.assert_array_equal(decompress(data, store)[0], x_hat)


def test_shipped_presets_are_registered_parameter_sets_that_never_change():
    # A file names a shipped preset's decoder fields by a one-byte id; id k must mean entry k forever.
    frozen = json.loads((EXPECTED / "registered_formats.json").read_text())
    assert {str(k): v.hex() for k, v in REGISTERED_FORMATS.items()} == frozen  # appended to both, never edited
    for name in PRESETS:
        for levels in (1, 2):
            fields = CoderParams.preset(name).levels_format_bytes(levels)
            sent = header_params.params_to_bytes(CoderParams.preset(name), levels)
            assert sent == b"R" + bytes([registered_id(fields)])
            assert REGISTERED_FORMATS[registered_id(fields)] == fields


def test_unknown_registered_parameter_set_is_a_format_error(store, models_dir):
    model, ref = load(store, models_dir, "pln")
    data = compress_image(model, image(8, 8), model_ref=ref, params="thesis")[0]
    for bad, shown in ((b"R\xfe", "fe"), (b"R", "(none)"), (b"R\x01\x01", "0101")):
        with pytest.raises(
            RecFormatError,
            match=rf"^coder_params: unknown registered parameter set "
            rf"{re.escape(shown)} \(written by a newer build\?\)$",
        ):
            decompress(_rewrap(data, coder_params=bad), store)
    two_levels = unpack_rec(_rewrap(data, coder_params=b"R\x01"))[0]  # thesis, 2 levels
    with pytest.raises(
        RecFormatError,
        match=r"^coder_params: invalid coder parameters \(48 bytes of level "
        r"parameters for 1 levels\)$",
    ):
        header_params.params_from_header(two_levels, 1)


def test_pln_codes_level1_against_the_coded_z2(store, models_dir, monkeypatch):
    """The level-1 prior (encoder and decoder) is computed from the SAME coded z2, not from q(z2)."""
    model, ref = load(store, models_dir, "pln")
    seen = {"enc": [], "dec": []}
    real_prior, phase = model.prior, ["enc"]

    def spy(level, z_above, shape, beta=None):
        if level == 1:
            seen[phase[0]].append(z_above.clone())
        return real_prior(level, z_above, shape, beta)

    monkeypatch.setattr(model, "prior", spy)
    x = image(37, 53)
    data, _, _ = compress_image(model, x, model_ref=ref, seed=1, params=SMALL)
    phase[0] = "dec"
    decompress(data, store)
    (z_enc,), (z_dec,) = seen["enc"], seen["dec"]
    assert torch.equal(z_enc, z_dec)
    q_loc2 = model.bottom_up(model.pad(to_tensor(x)))["loc2"]
    assert not torch.equal(z_enc, q_loc2)


def test_same_seed_same_bytes_other_seed_other_bytes(store, models_dir):
    model, ref = load(store, models_dir, "pln")
    x = image(37, 53)
    a = compress_image(model, x, model_ref=ref, seed=3, params=SMALL)[0]
    assert compress_image(model, x, model_ref=ref, seed=3, params=SMALL)[0] == a
    assert compress_image(model, x, model_ref=ref, seed=4, params=SMALL)[0] != a


def test_accepts_float_and_uint8_tensors(store, models_dir):
    model, ref = load(store, models_dir, "vae")
    x = image(20, 21)
    from_array = compress_image(model, x, model_ref=ref, params=SMALL)[0]
    t = torch.from_numpy(x).permute(2, 0, 1)
    assert compress_image(model, t, model_ref=ref, params=SMALL)[0] == from_array
    assert compress_image(model, t[None].float() / 255, model_ref=ref, params=SMALL)[0] == from_array


def test_refuses_images_above_the_pixel_limit(store, models_dir):
    model, ref = load(store, models_dir, "vae")
    with pytest.raises(api.ImageTooLargeError, match="20x10 = 200 pixels, above the limit of 199"):
        compress_image(model, image(10, 20), model_ref=ref, params=SMALL, max_pixels=199)


def test_custom_params_travel_in_the_header_as_compactly_as_a_preset(store, models_dir):
    model, ref = load(store, models_dir, "vae")
    data, x_hat, _ = compress_image(model, image(8, 8), model_ref=ref, params=SMALL)
    header, _ = unpack_rec(data)
    assert header.coder == "custom" and header.coder_params == b"P" + SMALL.levels_format_bytes(1)
    assert header_params.params_from_header(header, 1).levels_format_bytes(1) == SMALL.levels_format_bytes(1)
    assert np.array_equal(decompress(data, store)[0], x_hat)
    legacy = _rewrap(data, coder_params=b"J" + zlib.compress(SMALL.to_bytes(), 9))  # earlier builds
    assert header_params.params_from_header(unpack_rec(legacy)[0], 1) == SMALL
    assert np.array_equal(decompress(legacy, store)[0], x_hat)


def _rewrap(data: bytes, **changes) -> bytes:
    header, sections = unpack_rec(data)
    fields = {k: getattr(header, k) for k in header.__dataclass_fields__}
    return pack_rec(RecHeader(**{**fields, **changes}), sections)


def test_files_decode_from_the_params_in_their_header_when_a_preset_changed_or_is_unknown(store, models_dir):
    model, ref = load(store, models_dir, "pln")
    data, x_hat, _ = compress_image(model, image(8, 8), model_ref=ref, params="fast")
    for coder in ("thesis", "turbo"):  # a retuned preset; a preset of a newer build
        assert np.array_equal(decompress(_rewrap(data, coder=coder), store)[0], x_hat)
    header, _ = unpack_rec(data)
    fields = header_params.params_from_header(header, 2).levels_format_bytes(2)
    fast_id = registered_id(CoderParams.preset("fast").levels_format_bytes(2))
    as_shipped = unpack_rec(_rewrap(data, coder_params=b"R" + bytes([fast_id])))[0]
    assert header_params.params_from_header(as_shipped, 2) == CoderParams.preset("fast")  # full preset when it matches
    explicit = b"P" + fields  # as a retuned preset is sent
    assert np.array_equal(decompress(_rewrap(data, coder_params=explicit), store)[0], x_hat)
    bad = explicit[:2] + b"\x09" + explicit[3:]  # level 2's sampler id
    with pytest.raises(
        RecFormatError,
        match=r"^coder_params: invalid coder parameters \(malformed parameters "
        r"for level 2\)",
    ):
        decompress(_rewrap(data, coder_params=bad), store)
    with pytest.raises(RecFormatError, match="^coder_params: invalid coder parameters"):
        decompress(_rewrap(data, coder_params=explicit[:-1]), store)


def test_corrupt_section_with_valid_file_crc_names_the_section(store, models_dir):
    model, ref = load(store, models_dir, "pln")
    data = compress_image(model, image(37, 53), model_ref=ref, params=SMALL)[0]
    header, sections = unpack_rec(data)
    bad = bytearray(sections[1])
    bad[len(bad) // 2] ^= 0x10
    with pytest.raises(RecFormatError, match=r"^section 2 \(level 1\): "):
        decompress(pack_rec(header, [sections[0], bytes(bad)]), store)


def test_level_count_must_match_the_model(store, models_dir):
    model, ref = load(store, models_dir, "pln")
    data = compress_image(model, image(8, 8), model_ref=ref, params=SMALL)[0]
    vae = load(store, models_dir, "vae")[0]
    with pytest.raises(RecFormatError, match="^n_sections: 2 sections, but the model has 1 levels"):
        decompress(data, lambda header: vae)


# ---- model lookup ---------------------------------------------------------------------------------


def test_decoder_refuses_an_unknown_model_and_names_it(store, models_dir, tmp_path):
    model, ref = load(store, models_dir, "pln")
    data = compress_image(model, image(8, 8), model_ref=ref, params=SMALL)[0]
    with pytest.raises(ModelNotFoundError, match=f"needs model {ref.name} \\(SHA-256 {ref.sha256.hex()}"):
        decompress(data, ModelStore(dirs=[tmp_path]))


def test_decoder_refuses_a_model_path_with_another_hash(store, models_dir):
    model, ref = load(store, models_dir, "pln")
    data = compress_image(model, image(8, 8), model_ref=ref, params=SMALL)[0]
    other = next(models_dir.glob("vae-*.pt"))
    with pytest.raises(ModelNotFoundError, match=f"needs model {ref.name}.*but {other} has SHA-256"):
        decompress(data, ModelStore(model_path=other))


def test_decoder_finds_a_renamed_model_by_hash(store, models_dir, tmp_path):
    model, ref = load(store, models_dir, "vae")
    data, x_hat, _ = compress_image(model, image(8, 8), model_ref=ref, params=SMALL)
    (tmp_path / "renamed.pt").write_bytes(ref.path.read_bytes())
    np.testing.assert_array_equal(decompress(data, ModelStore(dirs=[tmp_path]))[0], x_hat)


def test_find_model_by_path_name_stem_hash_and_default(models_dir, tmp_path):
    pln = next(models_dir.glob("pln-*.pt"))
    sha = file_sha256(pln)
    assert find_model(str(pln), []) == pln
    assert find_model(pln.name, [models_dir]) == pln
    assert find_model(pln.stem, [models_dir]) == pln
    assert find_model("pln-tiny", [models_dir]) == pln
    assert find_model(sha[:6], [models_dir]) == pln
    assert find_model(sha[:16], [models_dir]) == pln
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "pln-tiny-deadbeef.pt").write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="'pln-tiny' is ambiguous: pln-tiny-"):
        find_model("pln-tiny", [models_dir, tmp_path / "other"])
    with pytest.raises(ModelNotFoundError, match="model 'nope' not found"):
        find_model("nope", [models_dir])
    with pytest.raises(ModelNotFoundError, match="no model given and no DEFAULT file"):
        find_model(None, [tmp_path])
    (tmp_path / "DEFAULT").write_text(pln.name + "\n")
    with pytest.raises(ModelNotFoundError, match="names 'pln-tiny-.*which is not in"):
        find_model(None, [tmp_path])
    (tmp_path / pln.name).write_bytes(pln.read_bytes())
    assert find_model(None, [tmp_path]) == tmp_path / pln.name


def test_model_dirs_read_rec_model_dir_first(monkeypatch, tmp_path):
    monkeypatch.setenv("REC_MODEL_DIR", str(tmp_path))
    assert model_store.model_dirs() == [tmp_path, model_store.REPO_WEIGHTS]


def test_model_ref_is_the_file_stem_and_sha_prefix(models_dir):
    pln = next(models_dir.glob("pln-*.pt"))
    ref = ModelRef.of_file(pln)
    assert ref.name == pln.stem and ref.sha256.hex() == file_sha256(pln)[:16]
    assert pln.stem.endswith(ref.sha256.hex()[:8])


# ---- images ---------------------------------------------------------------------------------------


def _png16_rgb(path, h=3, w=4):
    """A 16-bit RGB PNG (PIL cannot write one)."""
    raw = b"".join(b"\x00" + (np.arange(w * 3, dtype=">u2") * 4000).tobytes() for _ in range(h))

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))

    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    "mode,note",
    [
        ("L", "grayscale converted to RGB"),
        ("RGBA", "alpha channel discarded"),
        ("P", "palette converted to RGB"),
        ("I;16", "16-bit grayscale scaled to 8-bit RGB"),
        ("LA", "grayscale converted to RGB, alpha channel discarded"),
        ("RGB", None),
    ],
)
def test_load_image_converts_to_rgb8_and_says_so(tmp_path, mode, note):
    rgb = image(5, 7)
    if mode == "I;16":
        im = Image.fromarray((rgb[..., 0].astype(np.uint16) * 257))
    else:
        im = Image.fromarray(rgb).convert(mode)
    im.save(tmp_path / "a.png")
    x, notes = load_image(tmp_path / "a.png")
    assert x.dtype == np.uint8 and x.shape == (5, 7, 3)
    assert notes == ([note] if note else [])
    if mode == "I;16":
        np.testing.assert_array_equal(x[..., 1], rgb[..., 0])


def test_load_image_reduces_16bit_rgb(tmp_path):
    _png16_rgb(tmp_path / "a.png")
    x, notes = load_image(tmp_path / "a.png")
    assert x.shape == (3, 4, 3) and notes == ["16-bit per channel reduced to 8-bit"]


@pytest.mark.parametrize(
    "content,message",
    [
        (None, "no such file"),
        (b"hello", "not an image"),
        (b"\x89PNG\r\n\x1a\n" + bytes(30), "cannot decode image|not an image"),
    ],
)
def test_load_image_errors(tmp_path, content, message):
    if content is not None:
        (tmp_path / "a.png").write_bytes(content)
    with pytest.raises(ImageError, match=message):
        load_image(tmp_path / "a.png")


def test_load_image_refuses_huge_images_before_decoding(tmp_path):
    Image.new("RGB", (300, 200)).save(tmp_path / "a.png")
    with pytest.raises(ImageError, match="300x200 = 60000 pixels, above the limit of 59999"):
        load_image(tmp_path / "a.png", max_pixels=59999)


def test_save_png_roundtrips_pixels(tmp_path):
    x = image(9, 11)
    save_png(x, tmp_path / "a.png")
    y, notes = load_image(tmp_path / "a.png")
    np.testing.assert_array_equal(y, x)
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]


# ---- CUDA (skipped without a GPU) -------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("arch", ["pln", "vae"])
def test_cuda_decoder_reproduces_the_cuda_encoders_pixels_and_cpu_differs_by_rounding_only(models_dir, arch):
    gpu_store = ModelStore(device="cuda", dirs=[models_dir])
    model, ref = gpu_store.load(next(models_dir.glob(f"{arch}-*.pt")))
    x = image(37, 53)
    data, x_hat, _ = compress_image(model, x, model_ref=ref, seed=5, params=SMALL, device="cuda")
    y, _ = decompress(data, gpu_store, device="cuda")
    np.testing.assert_array_equal(y, x_hat)
    y_cpu, _ = decompress(data, ModelStore(dirs=[models_dir]))
    assert np.abs(y_cpu.astype(int) - y.astype(int)).max() <= 1
