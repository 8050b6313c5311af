"""compress.py: encode/decode/info end to end, and every bad input: one stderr line, exit code, no partial files."""

import json
import re
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import compress
from scripts.rd_common import psnr
from codec import store as model_store
from codec.api import compress_image
from codec.store import ModelStore
from codec.bitstream import FORMAT_VERSION, unpack_rec
from codec.params import PRESETS, CoderParams, LevelParams
from models import ModelConfig, build_model, save_model


def tiny_model_file(folder, arch="pln", seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(arch=arch, channels=16, latents=8, level2_channels=8, level2_latents=4, log_scale_min=-4.0)
    return save_model(build_model(cfg), folder, f"tiny{seed}")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    d = tmp_path_factory.mktemp("weights")
    path = tiny_model_file(d)
    (d / "DEFAULT").write_text(path.name + "\n")
    return d


# Few candidates per step, so the CLI tests stay fast; test_real_fast_preset_roundtrip uses the real one.
SMALL = CoderParams(
    level1=LevelParams("greedy", 8, 4, 4095, 1.0, 24.0), level2=LevelParams("importance", 8, 1, 15, 1.0, 12.0)
)


@pytest.fixture(autouse=True)
def isolated(weights, monkeypatch, request):
    """Models come from the test folder only (a repo weights/ folder must not leak in); small presets."""
    monkeypatch.setenv("REC_MODEL_DIR", str(weights))
    monkeypatch.setattr(model_store, "REPO_WEIGHTS", weights / "no-such-folder")
    if "real_presets" not in request.fixturenames:
        real = CoderParams.preset.__func__
        monkeypatch.setattr(
            CoderParams, "preset", classmethod(lambda cls, name: SMALL if name in PRESETS else real(cls, name))
        )


def rgb(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def write_png(path, x):
    Image.fromarray(x).save(path)
    return path


def run(capsys, *argv):
    code = compress.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def encode(capsys, *argv):
    return run(capsys, "encode", "--coder", "fast", *argv)


def error_lines(err):
    return [line for line in err.splitlines() if line.startswith(("error:", "compress.py:"))]


# ---- happy paths ----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(1, 1), (37, 53), (17, 300)])
def test_encode_decode_roundtrip_matches_the_encoders_prediction(tmp_path, capsys, weights, size):
    x = rgb(*size)
    src = write_png(tmp_path / "photo.png", x)
    code, out, err = encode(capsys, src, "--seed", 9, "--json")
    assert code == 0, err
    rec = json.loads(out)
    rec_path = tmp_path / "photo.rec"
    assert rec["output"] == str(rec_path) and rec_path.is_file()
    assert rec["bpp"] == 8 * rec_path.stat().st_size / (size[0] * size[1])
    assert {"kl_bpp", "psnr", "seconds", "height", "width"} <= rec.keys()

    code, out, err = run(capsys, "decode", rec_path)
    assert code == 0, err
    y = np.asarray(Image.open(tmp_path / "photo.rec.png"))
    store = ModelStore(dirs=[weights])
    model, ref = store.load(next(weights.glob("*.pt")))
    data, x_hat, _ = compress_image(model, x, model_ref=ref, seed=9, params="fast")
    assert data == rec_path.read_bytes()
    np.testing.assert_array_equal(y, x_hat)


@pytest.fixture
def real_presets():
    """Requesting this fixture keeps the real coder presets."""


def test_real_fast_preset_roundtrip(tmp_path, capsys, real_presets):
    src = write_png(tmp_path / "a.png", rgb(17, 30))
    code, out, err = encode(capsys, src, "--json")
    assert code == 0, err
    assert run(capsys, "decode", tmp_path / "a.rec")[0] == 0
    y = np.asarray(Image.open(tmp_path / "a.rec.png"))
    assert round(json.loads(out)["psnr"], 6) == round(psnr(rgb(17, 30), y), 6)


def test_human_output_has_bpp_kl_psnr_coder_and_seconds(tmp_path, capsys):
    src = write_png(tmp_path / "a.png", rgb(20, 20))
    code, out, _ = encode(capsys, src)
    assert code == 0
    assert out.startswith(f"{src} -> {tmp_path / 'a.rec'}: 20x20, ") and " bpp (KL " in out and "PSNR" in out
    assert re.search(r" dB, coder fast, [0-9.]+ s$", out.strip())


def test_folder_and_several_inputs_to_an_output_folder(tmp_path, capsys):
    (tmp_path / "in" / "sub").mkdir(parents=True)
    write_png(tmp_path / "in" / "a.png", rgb(9, 9, 1))
    write_png(tmp_path / "in" / "sub" / "b.png", rgb(5, 8, 2))
    extra = write_png(tmp_path / "c.png", rgb(4, 4, 3))
    code, out, err = encode(capsys, tmp_path / "in", extra, "-o", tmp_path / "out", "--json")
    assert code == 0, err
    assert sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*.rec")) == [
        "a.rec",
        "c.rec",
        "sub/b.rec",
    ]
    assert len(out.splitlines()) == 3
    code, out, err = run(capsys, "decode", tmp_path / "out", "-o", tmp_path / "dec")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "dec").rglob("*.png")) == ["a.rec.png", "b.rec.png", "c.rec.png"]


def test_info_prints_the_header_as_json(tmp_path, capsys, weights):
    src = write_png(tmp_path / "a.png", rgb(37, 53))
    encode(capsys, src, "--seed", 3)
    code, out, _ = run(capsys, "info", tmp_path / "a.rec")
    assert code == 0
    d = json.loads(out)
    assert (d["height"], d["width"], d["seed"], d["coder"], d["format_version"]) == (37, 53, 3, "fast", 1)
    assert d["model_name"] == next(weights.glob("*.pt")).stem
    assert [s["level"] for s in d["sections"]] == [2, 1] and d["bytes"] == (tmp_path / "a.rec").stat().st_size


def test_tiled_encode_decodes_to_the_encoders_pixels_and_info_lists_the_tiles(tmp_path, capsys):
    x = rgb(100, 150)
    src = write_png(tmp_path / "a.png", x)
    code, out, err = encode(capsys, src, "--tile", 64, "--json")
    assert code == 0, err
    code, out, _ = run(capsys, "info", tmp_path / "a.rec")
    d = json.loads(out)
    assert (d["format_version"], d["tile"], d["tiles"]) == (3, 64, 2 * 3)
    assert [(s["level"], s["tile"]) for s in d["sections"]] == [(lv, t) for lv in (2, 1) for t in range(6)]
    assert run(capsys, "decode", tmp_path / "a.rec")[0] == 0
    assert np.asarray(Image.open(tmp_path / "a.rec.png")).shape == x.shape


@pytest.mark.parametrize(
    "mode,note",
    [
        ("L", "grayscale converted to RGB"),
        ("RGBA", "alpha channel discarded"),
        ("P", "palette converted to RGB"),
        ("I;16", "16-bit grayscale scaled"),
    ],
)
def test_encode_converts_odd_modes_and_says_so(tmp_path, capsys, mode, note):
    x = rgb(6, 7)
    im = Image.fromarray(x[..., 0].astype(np.uint16) * 257) if mode == "I;16" else Image.fromarray(x).convert(mode)
    im.save(tmp_path / "a.png")
    code, _, err = encode(capsys, tmp_path / "a.png")
    assert code == 0
    assert f"note: {tmp_path / 'a.png'}: {note}" in err


# ---- bad inputs -----------------------------------------------------------------------------------


def test_models_lists_every_model_file_and_marks_the_default(capsys, weights, tmp_path, monkeypatch):
    torch.manual_seed(1)
    cfg = ModelConfig(arch="pln", channels=16, latents=8, level2_channels=8, level2_latents=4)
    record = {"steps": 7, "minutes": 0.5, "segments": [{"hardware": "a test rig"}], "final_terms": {}}
    second = save_model(build_model(cfg), weights, "trained", meta={"training": record, "train_config": {"beta": 0.25}})
    try:
        code, out, err = run(capsys, "models")
        assert code == 0 and err == ""
        lines = out.splitlines()
        assert len(lines) == 2 and sum("(default)" in line for line in lines) == 1
        assert all(": pln N=16, " in line for line in lines)
        assert sum("no training record" in line for line in lines) == 1
        assert any(", β=0.25; 7 steps, 0.5 min on a test rig" in line for line in lines)
        code, out, _ = run(capsys, "models", "--json")
        docs = {d["name"]: d for d in map(json.loads, out.splitlines())}
        assert docs[second.stem]["default"] is False and docs[second.stem]["parameters"] > 0
        (weights / "broken.pt").write_bytes(b"not a model")
        code, out, err = run(capsys, "models")
        assert code == 1 and len(out.splitlines()) == 2 and "broken.pt: not a readable model file" in err
    finally:
        second.unlink()
        (weights / "broken.pt").unlink(missing_ok=True)
    monkeypatch.setenv("REC_MODEL_DIR", str(tmp_path))
    code, _, err = run(capsys, "models")
    assert code == 2 and "no model files in" in err


def test_missing_input(tmp_path, capsys):
    code, _, err = encode(capsys, tmp_path / "nope.png")
    assert code == 1
    assert error_lines(err) == [f"error: {tmp_path / 'nope.png'}: no such file"]
    assert list(tmp_path.iterdir()) == []


def test_not_an_image(tmp_path, capsys):
    (tmp_path / "a.png").write_text("hello")
    code, _, err = encode(capsys, tmp_path / "a.png")
    assert (code, error_lines(err)) == (1, [f"error: {tmp_path / 'a.png'}: not an image (or an unsupported format)"])
    assert not (tmp_path / "a.rec").exists()


def test_one_bad_input_does_not_stop_the_others(tmp_path, capsys):
    (tmp_path / "bad.png").write_text("hello")
    good = write_png(tmp_path / "good.png", rgb(4, 4))
    code, out, err = encode(capsys, tmp_path / "bad.png", good)
    assert code == 1 and len(error_lines(err)) == 1 and (tmp_path / "good.rec").is_file()


def test_existing_output_is_refused_without_force(tmp_path, capsys):
    src = write_png(tmp_path / "a.png", rgb(4, 4))
    (tmp_path / "a.rec").write_bytes(b"keep me")
    code, _, err = encode(capsys, src)
    assert (code, error_lines(err)) == (1, [f"error: {src}: {tmp_path / 'a.rec'} exists (use --force to overwrite)"])
    assert (tmp_path / "a.rec").read_bytes() == b"keep me"
    code, _, _ = encode(capsys, src, "--force")
    assert code == 0 and (tmp_path / "a.rec").read_bytes() != b"keep me"


def test_an_input_is_never_overwritten(tmp_path, capsys):
    src = write_png(tmp_path / "a.png", rgb(4, 4))
    before = src.read_bytes()
    code, _, err = encode(capsys, src, "-o", src, "--force")
    assert (code, error_lines(err)) == (1, [f"error: {src}: output {src} would overwrite an input"])
    assert src.read_bytes() == before


def test_two_inputs_with_the_same_output_are_refused(tmp_path, capsys):
    write_png(tmp_path / "a.png", rgb(4, 4))
    write_png(tmp_path / "a.bmp", rgb(4, 4))
    code, _, err = encode(capsys, tmp_path / "a.bmp", tmp_path / "a.png")
    assert code == 1 and error_lines(err) == [
        f"error: {tmp_path / 'a.png'}: output {tmp_path / 'a.rec'} is also the output of {tmp_path / 'a.bmp'}"
    ]


def test_huge_image_is_refused_with_the_limit(tmp_path, capsys):
    src = write_png(tmp_path / "a.png", rgb(20, 30))
    code, _, err = encode(capsys, src, "--max-pixels", 500)
    assert (code, error_lines(err)) == (1, [f"error: {src}: image is 30x20 = 600 pixels, above the limit of 500"])


def test_tile_the_model_cannot_use_is_a_usage_error(tmp_path, capsys):
    src = write_png(tmp_path / "a.png", rgb(20, 30))
    code, _, err = encode(capsys, src, "--tile", 100)
    assert code == 2 and err.strip() == (
        "compress.py: error: --tile 100: the tile size must be a multiple of 32 and at least 64 for this model, got 100"
    )
    assert not (tmp_path / "a.rec").exists()


@pytest.fixture
def rec_file(tmp_path, capsys):
    src = write_png(tmp_path / "a.png", rgb(37, 53))
    assert encode(capsys, src)[0] == 0
    return tmp_path / "a.rec"


def _decode_fails(capsys, path, message, *extra):
    code, _, err = run(capsys, "decode", path, *extra)
    assert (code, error_lines(err)) == (1, [f"error: {path}: {message}"])
    assert not path.with_name(path.name + ".png").exists()
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []  # no temp files


def test_truncated_rec(capsys, rec_file):
    data = rec_file.read_bytes()
    last = len(unpack_rec(data)[1][-1])
    cut = last // 2  # inside the last section, past its length prefix
    rec_file.write_bytes(data[:-cut])
    _decode_fails(
        capsys,
        rec_file,
        f"not a valid .rec file: section 2 (level 1): truncated: needs {last} bytes, "
        f"{last - cut} left (CRC mismatch: corrupted or truncated file)",
    )


def test_bit_flipped_rec(capsys, rec_file):
    data = bytearray(rec_file.read_bytes())
    data[-10] ^= 0x04
    rec_file.write_bytes(bytes(data))
    _decode_fails(capsys, rec_file, "not a valid .rec file: crc: checksum mismatch: the file is corrupted")


def test_rec_of_another_format_version(capsys, rec_file):
    data = bytearray(rec_file.read_bytes())
    data[4] = FORMAT_VERSION + 1
    data[-4:] = struct.pack(">I", zlib.crc32(bytes(data[:-4])))
    rec_file.write_bytes(bytes(data))
    _decode_fails(
        capsys,
        rec_file,
        f"not a valid .rec file: format_version: .rec format version "
        f"{FORMAT_VERSION + 1} is not supported (this build reads versions 1, 2, 3, 4)",
    )


def test_not_a_rec_file(capsys, tmp_path):
    Image.fromarray(rgb(2, 2)).save(tmp_path / "x.rec", format="PNG")
    _decode_fails(capsys, tmp_path / "x.rec", "not a valid .rec file: magic: not a .rec file")


def test_missing_model_is_named(capsys, rec_file, weights, tmp_path, monkeypatch):
    monkeypatch.setenv("REC_MODEL_DIR", str(tmp_path / "empty"))
    name = next(weights.glob("*.pt")).stem
    code, _, err = run(capsys, "decode", rec_file)
    assert code == 1 and len(error_lines(err)) == 1
    assert error_lines(err)[0].startswith(f"error: {rec_file}: this file needs model {name} (SHA-256 ")
    assert "not found in" in err and "pass --model PATH" in err


def test_model_with_another_hash_is_refused(capsys, rec_file, weights, tmp_path):
    other = tiny_model_file(tmp_path / "m", seed=1)
    name = next(weights.glob("*.pt")).stem
    code, _, err = run(capsys, "decode", rec_file, "--model", other)
    assert code == 1
    assert error_lines(err)[0].startswith(f"error: {rec_file}: this file needs model {name} (SHA-256 ")
    assert f"but {other} has SHA-256" in err


def test_decode_with_explicit_model_path(capsys, rec_file, weights):
    code, _, err = run(capsys, "decode", rec_file, "--model", next(weights.glob("*.pt")))
    assert code == 0, err


def test_no_default_model(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("REC_MODEL_DIR", str(tmp_path))
    src = write_png(tmp_path / "a.png", rgb(4, 4))
    code, _, err = encode(capsys, src)
    assert code == 1 and error_lines(err)[0].startswith("error: no model given and no DEFAULT file in ")


def test_encode_with_model_name_and_path(capsys, tmp_path, weights):
    src = write_png(tmp_path / "a.png", rgb(4, 4))
    path = next(weights.glob("*.pt"))
    assert encode(capsys, src, "--model", path.stem, "-o", tmp_path / "1.rec")[0] == 0
    assert encode(capsys, src, "--model", path, "-o", tmp_path / "2.rec")[0] == 0
    code, _, err = encode(capsys, src, "--model", "nope", "-o", tmp_path / "3.rec")
    assert code == 1 and error_lines(err)[0].startswith("error: model 'nope' not found")


@pytest.mark.parametrize(
    "argv,message",
    [
        ([], "the following arguments are required: command"),
        (["encode"], "the following arguments are required: IN"),
        (["encode", "a.png", "--seed", "-1"], "argument --seed: -1 is outside [0, 2^64)"),
        (["encode", "a.png", "--coder", "nope"], "argument --coder: invalid choice: 'nope'"),
        (["frobnicate"], "argument command: invalid choice: 'frobnicate'"),
        (["decode", "a.rec", "--threads", "0"], "argument --threads: 0 is not positive"),
        (["encode", "a.png", "--tile", "-1"], "argument --tile: -1 is negative"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(capsys, argv, message):
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert err.strip().splitlines() == [err.strip()] and err.startswith(f"compress.py: error: {message}")


def test_info_on_a_broken_file(capsys, tmp_path):
    (tmp_path / "a.rec").write_bytes(b"\x89REC")
    code, out, err = run(capsys, "info", tmp_path / "a.rec", tmp_path / "missing.rec")
    assert code == 1 and out == ""
    assert error_lines(err) == [
        f"error: {tmp_path / 'a.rec'}: not a valid .rec file: file: truncated: 4 bytes, a .rec file has at least 46",
        f"error: {tmp_path / 'missing.rec'}: no such file or directory: {tmp_path / 'missing.rec'}",
    ]
