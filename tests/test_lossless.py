"""Lossless files: the latents, then the 8-bit image under the model's lossless head (codec/lossless.py)."""

import json
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import offline_cli, photo
from codec import lossless
from codec.api import compress_image, decompress
from codec.bitstream import RecFormatError, RecHeader, pack_rec, unpack_rec
from codec.params import CoderParams, LevelParams
from codec.store import ModelRef, ModelStore
from models import ModelConfig, build_model, load_model, save_model
from models.lossless import LosslessHead

TINY = dict(arch="pln", channels=16, latents=8, level2_channels=8, level2_latents=4, log_scale_min=-4.0)
RANGE = dict(beta_knots=4, beta_min=0.5, beta_max=8.0)
SMALL = CoderParams(
    level1=LevelParams("greedy", 8, 4, 4095, 1.0, 24.0), level2=LevelParams("importance", 8, 1, 15, 1.0, 12.0)
)


def head_with_weights(seed: int = 0) -> LosslessHead:
    """A small head whose output layers are random (a fresh head predicts μ = x̂ everywhere), so that
    the means and scales vary from subpixel to subpixel as a trained head's do."""
    torch.manual_seed(seed)
    head = LosslessHead(8)
    with torch.no_grad():
        for net in head.stages:
            net[-1].weight.normal_(0, 0.05)
            net[-1].bias.normal_(0, 0.05)
    head.cdfs = lossless.build_tables()
    return head


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("lossless")
    torch.manual_seed(0)
    model = build_model(ModelConfig(**TINY, **RANGE))
    plain = save_model(model, d, "plain")
    model.lossless_head = head_with_weights()
    with_head = save_model(model, d, "ll")
    (d / "DEFAULT").write_text(with_head.name)
    return d, with_head, plain


def code(path, image, **kw):
    model, _ = load_model(path)
    return compress_image(model, image, model_ref=ModelRef.of_file(path), params=SMALL, **kw)


# ---- the pixel layer ------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(1, 1), (37, 53), (150, 131)])
def test_lossless_file_decodes_to_the_input_pixels_bit_for_bit(models, size):
    d, with_head, _ = models
    image = photo(*size, seed=size[0])
    data, returned, stats = code(with_head, image, lossless=True, quality=3)
    decoded, header = decompress(data, ModelStore(dirs=[d]))
    assert header.lossless and header.format_version == 4
    assert np.array_equal(decoded, image) and np.array_equal(returned, image)
    assert stats["pixel_bytes"] == len(unpack_rec(data)[1][-1])


def test_a_tiled_lossless_file_decodes_to_the_input_pixels(models):
    d, with_head, _ = models
    image = photo(150, 200, seed=3)
    data, _, stats = code(with_head, image, lossless=True, tile=64)
    header, sections = unpack_rec(data)
    assert stats["tiles"] == 12 and header.tile == 64 and len(sections) == 2 * 12 + 1
    assert np.array_equal(decompress(data, ModelStore(dirs=[d]))[0], image)


def test_pixel_layer_costs_the_heads_bits_plus_a_little(models):
    """The coder's grid and flags cost little over the head's continuous likelihood."""
    head = head_with_weights()
    image = photo(96, 128, seed=5)
    x_hat = np.clip(image.astype(int) + np.random.default_rng(1).integers(-6, 7, image.shape), 0, 255)
    x_hat = x_hat.astype(np.uint8)
    coded = 8 * (len(lossless.encode_pixels(head, image, x_hat, 2.0)) - 4)
    as_tensor = [torch.from_numpy(a).permute(2, 0, 1)[None] for a in (image, x_hat)]
    ideal = head.nll_bits(*as_tensor, 2.0).item()
    assert ideal < coded < 1.03 * ideal + 8 * 8 * 6  # at most 3 % and a chunk header's worth per stage


def test_decoding_is_robust_to_a_last_ulp_change_of_the_heads_outputs(models, monkeypatch):
    """What another thread count or kernel changes: the flags keep encoder and decoder on the same tables."""
    head = head_with_weights(1)
    image = photo(64, 80, seed=7)
    x_hat = np.clip(image.astype(int) + np.random.default_rng(2).integers(-9, 10, image.shape), 0, 255)
    x_hat = x_hat.astype(np.uint8)
    data = lossless.encode_pixels(head, image, x_hat, 1.0)
    real = LosslessHead.stage_params
    for direction in (np.inf, -np.inf):

        def nudged(self, *args, _d=direction):
            params = real(self, *args)
            return torch.nextafter(params, torch.full_like(params, _d))

        monkeypatch.setattr(LosslessHead, "stage_params", nudged)
        assert np.array_equal(lossless.decode_pixels(head, data, x_hat, 1.0), image)


def test_a_parameter_at_a_rounding_midpoint_is_flagged_and_rounded_down_on_both_sides():
    midpoint = torch.tensor([(100 + 0.5) / lossless.MEAN_STEPS], dtype=torch.float32)
    below, above = (torch.nextafter(midpoint, torch.tensor([d])) for d in (-np.inf, np.inf))
    log_scale = torch.zeros(1)
    assert torch.round(below * 4) != torch.round(above * 4)  # plain rounding would desynchronise
    mean, _, flags = lossless.grid_indices(above, log_scale)
    assert flags.item() == 1 and mean.item() == 100
    assert lossless.grid_indices(below, log_scale, flags)[0].item() == 100


def test_coder_tables_are_stored_with_the_head_in_the_model_file(models):
    _, with_head, plain = models
    model, _ = load_model(with_head)
    assert torch.equal(model.lossless_head.cdfs, lossless.build_tables())
    assert load_model(plain)[0].lossless_head is None


# ---- errors ---------------------------------------------------------------------------------------


def forged(data: bytes, pixel_layer: bytes) -> bytes:
    header, sections = unpack_rec(data)
    return pack_rec(header, sections[:-1] + [pixel_layer])


def test_corrupted_or_truncated_pixel_layers_raise_a_format_error_naming_it(models):
    d, with_head, _ = models
    image = photo(40, 48)
    data, _, _ = code(with_head, image, lossless=True)
    layer = unpack_rec(data)[1][-1]
    store = ModelStore(dirs=[d])
    with pytest.raises(RecFormatError, match=r"^section 3 \(pixel layer\): truncated"):
        decompress(forged(data, layer[:-3]), store)
    with pytest.raises(RecFormatError, match=r"^section 3 \(pixel layer\): truncated: 2 bytes"):
        decompress(forged(data, layer[:2]), store)
    wrong_crc = (zlib.crc32(image.tobytes()) ^ 1).to_bytes(4, "big") + layer[4:]
    with pytest.raises(RecFormatError, match=r"^section 3 \(pixel layer\): the decoded image fails the pixel"):
        decompress(forged(data, wrong_crc), store)
    for i in range(8, len(layer), max(1, len(layer) // 40)):  # any damaged byte: an error, never wrong pixels
        damaged = layer[:i] + bytes([layer[i] ^ 0x5A]) + layer[i + 1 :]
        with pytest.raises(RecFormatError, match=r"^section 3 \(pixel layer\): "):
            decompress(forged(data, damaged), store)


def test_a_lossless_file_needs_a_model_with_a_head(models):
    d, with_head, plain = models
    image = photo(40, 48)
    with pytest.raises(ValueError, match="has no lossless head"):
        code(plain, image, lossless=True)
    with pytest.raises(ValueError, match="^lossless coding needs 8-bit pixels"):
        code(with_head, torch.rand(1, 3, 40, 48), lossless=True)
    data, _, _ = code(with_head, image, lossless=True)
    header, sections = unpack_rec(data)
    ref = ModelRef.of_file(plain)
    other = pack_rec(RecHeader(**{**header.__dict__, "model_name": ref.name, "model_hash": ref.sha256}), sections)
    with pytest.raises(RecFormatError, match="^pixel layer: the file is lossless, but model .* has no lossless head"):
        decompress(other, ModelStore(dirs=[d]))


def test_lossy_files_keep_their_format_versions(models):
    _, with_head, _ = models
    header = unpack_rec(code(with_head, photo(40, 48))[0])[0]
    assert not header.lossless and header.format_version == 2


# ---- command line ---------------------------------------------------------------------------------


@pytest.fixture
def cli(models, monkeypatch, tmp_path, capsys):
    folder, _, plain = models
    return offline_cli(monkeypatch, capsys, folder, SMALL), tmp_path, plain


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
def test_cli_lossless_round_trip_returns_the_pixels_of_the_input(cli, mode):
    run, tmp, _ = cli
    src = tmp / f"in-{mode}.png"
    Image.fromarray(photo(45, 61)).convert(mode).save(src)
    code, out, err = run("encode", src, "--lossless", "-o", tmp / "a.rec")
    assert code == 0 and "lossless:" in out and "bits per subpixel" in out
    assert ("note:" in err) == (mode != "RGB")  # converted to RGB, with a note, as lossy files are
    assert run("decode", tmp / "a.rec", "-o", tmp / "a.png")[0] == 0
    expected = np.asarray(Image.open(src).convert("RGB"))
    assert np.array_equal(np.asarray(Image.open(tmp / "a.png")), expected)


def test_cli_lossless_reports_the_default_quality_and_info_shows_the_pixel_layer(cli):
    run, tmp, _ = cli
    Image.fromarray(photo(45, 61)).save(tmp / "b.png")
    code, out, _ = run("encode", tmp / "b.png", "--lossless", "--json")
    assert code == 0

    rec = json.loads(out)
    assert rec["lossless"] and rec["quality"] == lossless.DEFAULT_QUALITY and "psnr" not in rec
    code, out, _ = run("info", tmp / "b.rec", "--json")
    info = json.loads(out)
    assert info["lossless"] and info["format_version"] == 4
    assert info["sections"][-1] == {"level": 0, "pixel_layer": True, "bytes": rec["pixel_bytes"]}


def test_models_says_which_files_carry_a_lossless_head(cli, models):
    run, _, _ = cli
    _, with_head, plain = models
    code, out, _ = run("models")
    lines = {line.split(":")[0].split(" ")[0]: line for line in out.splitlines()}
    assert code == 0 and "lossless head" in lines[with_head.stem] and "lossless head" not in lines[plain.stem]
    code, out, _ = run("models", "--json")
    assert {json.loads(line)["name"]: json.loads(line)["lossless"] for line in out.splitlines()} == {
        with_head.stem: True,
        plain.stem: False,
    }


def test_cli_lossless_refuses_a_bpp_target_and_a_model_without_a_head(cli):
    run, tmp, plain = cli
    Image.fromarray(photo(45, 61)).save(tmp / "c.png")
    code, _, err = run("encode", tmp / "c.png", "--lossless", "--bpp", "1")
    assert code == 2 and err.strip().endswith(
        "--bpp cannot be combined with --lossless (a lossless file's size is the image's)"
    )
    code, _, err = run("encode", tmp / "c.png", "--lossless", "--model", plain)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "has no lossless head" in err
    assert not (tmp / "c.rec").exists()


# ---- training a head ------------------------------------------------------------------------------


def test_train_lossless_adds_a_head_that_lowers_the_bits_and_keeps_the_networks(models, photo_dir, tmp_path):
    from scripts import train_lossless

    _, _, plain = models
    argv = [f"--model={plain}", f"--data={photo_dir}", "--pairs=8", "--crop=64", "--patch=32", "--batch=4"]
    argv += ["--minutes=0.1", "--channels=8", "--threads=1", f"--ckpt={tmp_path / 'head.pt'}", f"--out-dir={tmp_path}"]
    assert train_lossless.main(argv) == 0
    (written,) = [p for p in tmp_path.glob("pln-plain-*.pt") if p.name != plain.name]
    trained, info = load_model(written)
    before = load_model(plain)[0].state_dict()
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in before.items())  # the networks unchanged
    assert info["lossless"]["meta"]["steps"] > 0 and torch.equal(trained.lossless_head.cdfs, lossless.build_tables())
    fresh = LosslessHead(8)  # where training starts: μ = x̂ and one scale everywhere
    pairs = torch.load(tmp_path / "pairs.pt")
    x, x_hat, beta = pairs["x"], pairs["x_hat"], pairs["beta"]
    with torch.no_grad():
        assert trained.lossless_head.nll_bits(x, x_hat, beta).sum() < fresh.nll_bits(x, x_hat, beta).sum()
    image = photo(30, 40)
    data, _, _ = code(written, image, lossless=True)
    assert np.array_equal(decompress(data, ModelStore(dirs=[tmp_path]))[0], image)


def test_train_lossless_init_head_starts_from_another_files_head_and_records_it(models, photo_dir, tmp_path):
    from scripts import train_lossless

    _, with_head, plain = models
    argv = [f"--model={plain}", f"--data={photo_dir}", "--pairs=4", "--crop=64", "--patch=32", "--batch=4"]
    argv += ["--channels=8", "--threads=1", f"--ckpt={tmp_path / 'head.pt'}", f"--out-dir={tmp_path}"]
    assert train_lossless.main([*argv, "--minutes=0", f"--init-head={with_head}"]) == 0  # no step: the head as given
    (written,) = [p for p in tmp_path.glob("pln-plain-*.pt") if p.name != plain.name]
    trained, info = load_model(written)
    given = load_model(with_head)[0].lossless_head.state_dict()
    assert all(torch.equal(v, trained.lossless_head.state_dict()[k]) for k, v in given.items())
    assert info["lossless"]["meta"]["init_from"]["model"] == with_head.name
    assert info["weights_dtype"] == torch.float32
    with pytest.raises(SystemExit, match=f"{plain.name} has no lossless head to start from"):
        train_lossless.main([*argv, "--minutes=0", f"--init-head={plain}"])
