"""Variable-rate models: β conditioning, β in the header, quality / β / bpp on the command line, training."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import offline_cli
import train
from codec import store as model_store
from codec.api import compress_image, decompress
from codec.store import ModelStore
from codec.bitstream import RecFormatError, RecHeader, beta_from_code, beta_to_code, pack_rec, unpack_rec
from codec.params import PRESETS, CoderParams, LevelParams
from codec import rate
from codec.rate import QUALITY_LEVELS, quality_beta
from models import ModelConfig, build_model, load_model, save_model
from training import start
from training.objective import batch_betas
from training.config import resolve_config

TINY = dict(arch="pln", channels=16, latents=8, level2_channels=8, level2_latents=4, log_scale_min=-4.0)
RANGE = dict(beta_knots=4, beta_min=0.5, beta_max=8.0)
SMALL = CoderParams(
    level1=LevelParams("greedy", 8, 4, 4095, 1.0, 24.0), level2=LevelParams("importance", 8, 1, 15, 1.0, 12.0)
)


def rate_controlled_model(seed: int = 0):
    """A tiny variable-rate PLN whose β tables are set by hand so that rate falls as β grows: posterior
    scales of both levels widen and the level-1 means shrink towards the prior's with log β (what
    training teaches the real model)."""
    torch.manual_seed(seed)
    model = build_model(ModelConfig(**TINY, **RANGE))
    ramp = torch.linspace(-1.0, 1.0, RANGE["beta_knots"])[:, None]
    with torch.no_grad():
        film = model.conditioning.film
        film["scale1"].bias.copy_(2.0 * ramp.expand_as(film["scale1"].bias))
        film["loc1"].log_gain.copy_(-1.0 * ramp.expand_as(film["loc1"].log_gain))
        film["scale2"].bias.copy_(3.0 * ramp.expand_as(film["scale2"].bias))
    return model.eval()


def photo(h, w, seed=0):
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.stack([np.sin(9 * xx + seed), np.cos(7 * yy), np.sin(13 * xx * yy)], -1) * 0.4 + 0.5
    img += 0.1 * np.random.default_rng(seed).standard_normal(img.shape)
    return (img.clip(0, 1) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def vbr_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("vbr")
    vbr = save_model(rate_controlled_model(), d, "vbr")
    torch.manual_seed(1)
    fixed = save_model(build_model(ModelConfig(**TINY)), d, "fixed")
    (d / "DEFAULT").write_text(vbr.name)
    return d, vbr, fixed


# ---- the model ------------------------------------------------------------------------------------


def test_conditioned_model_starts_as_the_fixed_beta_model_it_is_initialised_from():
    torch.manual_seed(0)
    fixed = build_model(ModelConfig(**TINY)).eval()
    vbr = build_model(ModelConfig(**TINY, **RANGE)).eval()
    start.load_weights(vbr, fixed.state_dict())
    x = torch.rand(1, 3, 40, 72)
    want = fixed(x, sample=False)
    for beta in (0.5, 1.3, 8.0):
        got = vbr(x, sample=False, beta=beta)
        assert torch.equal(got["x_hat"], want["x_hat"])
        assert all(torch.equal(got["kl"][level], want["kl"][level]) for level in (1, 2))


def test_knot_weights_interpolate_in_log_beta_and_clamp_at_the_ends():
    conditioning = rate_controlled_model().conditioning  # 4 knots over [0.5, 8]
    w = conditioning.weights(torch.tensor([0.5, 8.0, 100.0, 0.5 * 16 ** (1 / 6)]))
    assert torch.equal(w[0], torch.tensor([1.0, 0, 0, 0])) and torch.equal(w[1], torch.tensor([0, 0, 0, 1.0]))
    assert torch.equal(w[2], w[1])  # beyond the range: the end knot, no extrapolation
    torch.testing.assert_close(w[3], torch.tensor([0.5, 0.5, 0, 0]))
    assert torch.allclose(w.sum(1), torch.ones(4))


def test_each_image_of_a_batch_is_coded_at_its_own_beta():
    model = rate_controlled_model()
    x = torch.from_numpy(photo(64, 64)).permute(2, 0, 1)[None].float().div(255).expand(3, -1, -1, -1)
    out = model(x, sample=False, beta=torch.tensor([0.5, 2.0, 8.0]))
    kl = sum(k.flatten(1).sum(1) for k in out["kl"].values())
    assert kl[0] > kl[1] > kl[2]
    alone = model(x[:1], sample=False, beta=2.0)
    torch.testing.assert_close(sum(k.sum() for k in alone["kl"].values()), kl[1])


def test_a_variable_rate_model_needs_a_beta():
    with pytest.raises(ValueError, match="variable-rate: give the β"):
        rate_controlled_model()(torch.rand(1, 3, 32, 32))


def test_variable_rate_model_file_round_trips_with_its_tables(tmp_path):
    model = rate_controlled_model()
    loaded, info = load_model(save_model(model, tmp_path, "t"))
    assert loaded.variable_rate and loaded.beta_range == (0.5, 8.0) and info["config"]["beta_knots"] == 4
    torch.testing.assert_close(loaded.conditioning.film["scale1"].bias, model.conditioning.film["scale1"].bias)


# ---- the header -----------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [1e-3, 0.25, 1.0, 3.3, 32.0, 1e4])
def test_beta_code_round_trips_to_within_a_256th_of_an_octave(beta):
    code = beta_to_code(beta)
    assert abs(math.log2(beta_from_code(code) / beta)) <= 0.5 / 256
    assert beta_to_code(beta_from_code(code)) == code


def test_beta_travels_in_a_version_2_header_and_fixed_beta_files_stay_version_1():
    base = RecHeader("m", bytes(8), 37, 53, 7, "fast", b"R\x01")
    with_beta = RecHeader("m", bytes(8), 37, 53, 7, "fast", b"R\x01", beta_code=beta_to_code(2.0))
    v1, v2 = pack_rec(base, [b"ab", b"c"]), pack_rec(with_beta, [b"ab", b"c"])
    assert (v1[4], v2[4], len(v2) - len(v1)) == (1, 2, 2)
    assert unpack_rec(v2) == (with_beta, [b"ab", b"c"]) and unpack_rec(v2)[0].beta == 2.0
    assert unpack_rec(v1)[0].beta_code is None


def test_bad_betas_are_refused_with_one_clear_message():
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="β must be a positive number"):
            beta_to_code(bad)


# ---- coding ---------------------------------------------------------------------------------------


def test_file_coded_at_a_beta_decodes_to_the_encoders_pixels_bit_for_bit(vbr_dir):
    folder, vbr, _ = vbr_dir
    store = ModelStore(dirs=[folder])
    model, ref = store.load(vbr)
    x = photo(37, 53)
    data, x_hat, stats = compress_image(model, x, model_ref=ref, seed=3, params=SMALL, beta=1.7)
    decoded, header = decompress(data, store)
    assert np.array_equal(decoded, x_hat)
    assert header.beta == stats["beta"] and abs(math.log2(header.beta / 1.7)) <= 0.5 / 256
    other = compress_image(model, x, model_ref=ref, seed=3, params=SMALL, beta=6.0)[0]
    assert other != data and len(other) < len(data)


def test_beta_outside_the_range_or_given_to_a_fixed_model_is_refused(vbr_dir):
    folder, vbr, fixed = vbr_dir
    store = ModelStore(dirs=[folder])
    model, ref = store.load(vbr)
    fixed_model, fixed_ref = store.load(fixed)
    x = photo(20, 20)
    with pytest.raises(ValueError, match=r"^β = 9 is outside this model's range 0.5 to 8$"):
        compress_image(model, x, model_ref=ref, params=SMALL, beta=9.0)
    with pytest.raises(ValueError, match="give beta or quality, not both"):
        compress_image(model, x, model_ref=ref, params=SMALL, beta=1.0, quality=3)
    with pytest.raises(ValueError, match="quality must be 1 to 8, got 0"):
        compress_image(model, x, model_ref=ref, params=SMALL, quality=0)
    with pytest.raises(ValueError, match="quality levels need a variable-rate model"):
        compress_image(fixed_model, x, model_ref=fixed_ref, params=SMALL, quality=2)
    with pytest.raises(ValueError, match="trained at a single β"):
        compress_image(fixed_model, x, model_ref=fixed_ref, params=SMALL, beta=1.0)


def test_without_a_beta_the_api_codes_at_the_default_quality(vbr_dir):
    folder, vbr, _ = vbr_dir
    model, ref = ModelStore(dirs=[folder]).load(vbr)
    x = photo(20, 20)
    data, _, stats = compress_image(model, x, model_ref=ref, params=SMALL)
    assert stats["beta"] == pytest.approx(quality_beta(4, (0.5, 8.0)), rel=2e-3)
    assert data == compress_image(model, x, model_ref=ref, params=SMALL, quality=4)[0]


def test_a_file_and_a_model_that_disagree_on_beta_are_a_format_error(vbr_dir):
    folder, vbr, fixed = vbr_dir
    store = ModelStore(dirs=[folder])
    fixed_model, fixed_ref = store.load(fixed)
    data = compress_image(fixed_model, photo(20, 20), model_ref=fixed_ref, params=SMALL)[0]
    header, sections = unpack_rec(data)
    vbr_ref = store.ref(vbr)
    as_vbr = pack_rec(
        RecHeader(
            vbr_ref.name,
            vbr_ref.sha256,
            *[getattr(header, f) for f in ("height", "width", "seed", "coder", "coder_params")],
        ),
        sections,
    )
    with pytest.raises(RecFormatError, match="^beta_code: the model is variable-rate, but the file carries no β$"):
        decompress(as_vbr, store)
    with_beta = pack_rec(RecHeader(**{**header.__dict__, "beta_code": beta_to_code(1.0)}), sections)
    with pytest.raises(RecFormatError, match="^beta_code: the file carries a β, but its model was trained"):
        decompress(with_beta, store)


# ---- command line ---------------------------------------------------------------------------------


@pytest.fixture
def cli(vbr_dir, monkeypatch, tmp_path, capsys):
    folder, vbr, fixed = vbr_dir
    run = offline_cli(monkeypatch, capsys, folder, SMALL)
    src = tmp_path / "a.png"
    Image.fromarray(photo(160, 224)).save(src)
    return run, src, tmp_path, fixed


def test_quality_levels_give_monotone_file_sizes(cli):
    run, src, tmp, _ = cli
    sizes = []
    for q in range(1, QUALITY_LEVELS + 1):
        code, out, _ = run("encode", src, "-o", tmp / f"q{q}.rec", "--quality", q, "--json")
        rec = json.loads(out)
        assert code == 0 and rec["quality"] == q
        assert rec["beta"] == pytest.approx(quality_beta(q, (0.5, 8.0)), rel=2e-3)
        sizes.append(rec["bytes"])
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]
    assert run("decode", tmp / "q8.rec")[0] == 0


def test_bpp_target_lands_within_3_percent(cli):
    run, src, tmp, _ = cli
    low = json.loads(run("encode", src, "-o", tmp / "lo.rec", "--beta", 8, "--json")[1])["bpp"]
    high = json.loads(run("encode", src, "-o", tmp / "hi.rec", "--beta", 0.5, "--json")[1])["bpp"]
    for target in (low + 0.3 * (high - low), low + 0.7 * (high - low)):
        code, out, err = run("encode", src, "-o", tmp / "t.rec", "--bpp", f"{target:.4f}", "--json", "--force")
        rec = json.loads(out)
        assert code == 0 and err == ""
        assert abs(rec["bpp"] / target - 1) <= 0.03 and rec["target_bpp"] == pytest.approx(target, abs=1e-4)


def test_coder_overhead_follows_the_coders_table_in_log_kl_and_is_flat_beyond_it():
    table = rate.CODER_OVERHEAD["thesis"]
    assert [rate.coder_overhead("thesis", r) for r, _ in table] == pytest.approx([c for _, c in table])
    (r0, c0), (r1, c1) = table[:2]
    assert rate.coder_overhead("thesis", math.sqrt(r0 * r1)) == pytest.approx((c0 + c1) / 2)
    assert rate.coder_overhead("thesis", r0 / 10) == c0 and rate.coder_overhead("thesis", 100.0) == table[-1][1]
    assert rate.coder_overhead("irec", 0.3) == rate.coder_overhead(None, 0.3) == rate.OTHER_CODER_OVERHEAD


def test_bpp_search_takes_its_first_guess_from_the_coders_overhead():
    model, x = rate_controlled_model(), torch.from_numpy(photo(128, 192)).permute(2, 0, 1)[None]
    search = rate.BetaSearch(model, x, tile=0)
    pixels, header = 128 * 192, rate.HEADER_BITS

    def compress(beta):  # a coder that writes exactly the "sp-orc-predicted" table's bits
        kl = rate.kl_bits(model, x, beta, tile=0)
        bits = rate.coder_overhead("sp-orc-predicted", kl / pixels) * kl
        stats = {"bpp": (bits + header) / pixels, "beta": beta, "levels": [{"bits": bits}]}
        return bytes(round((bits + header) / 8)), None, stats

    kl = search.kl_at(beta_to_code(1.0))  # ~0.1 KL bits a pixel
    target = (rate.coder_overhead("sp-orc-predicted", kl / pixels) * kl + header) / pixels
    for coder, files in (("sp-orc-predicted", 1), ("thesis", 2)):  # the tables differ by > 3 % there
        _, _, stats = rate.compress_to_bpp(compress, model, x, target, tile=0, coder=coder)
        assert stats["attempts"] == files and abs(stats["bpp"] / target - 1) <= rate.BPP_TOLERANCE


def test_unreachable_bpp_target_is_coded_as_close_as_possible_with_a_note(cli):
    run, src, tmp, _ = cli
    code, out, err = run("encode", src, "--bpp", 500, "--json")
    assert code == 0 and json.loads(out)["beta"] == pytest.approx(0.5, rel=2e-3)
    assert "from the target 500 (the closest of" in err and "this model's range is β = 0.5 to 8" in err


def test_the_default_quality_codes_a_variable_rate_model_and_info_shows_the_beta(cli):
    run, src, tmp, _ = cli
    code, out, _ = run("encode", src, "-o", tmp / "d.rec")
    assert code == 0 and "quality 4" in out
    info = json.loads(run("info", tmp / "d.rec", "--json")[1])
    assert info["format_version"] == 2 and info["beta"] == pytest.approx(quality_beta(4, (0.5, 8.0)), rel=2e-3)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--quality", "0"], "argument --quality: 0 is outside 1 to 8"),
        (["--quality", "9"], "argument --quality: 9 is outside 1 to 8"),
        (["--beta", "-1"], "argument --beta: -1 is not a positive number"),
        (["--bpp", "0"], "argument --bpp: 0 is not a positive number"),
        (["--bpp", "nan"], "argument --bpp: nan is not a positive number"),
        (["--beta", "20"], "--beta 20: β = 20 is outside this model's range 0.5 to 8"),
        (["--quality", "2", "--beta", "1"], "argument --beta: not allowed with argument --quality"),
    ],
)
def test_bad_rate_settings_give_one_line_and_exit_2(cli, argv, message):
    run, src, tmp, _ = cli
    code, out, err = run("encode", src, *argv)
    assert (code, out, err.strip()) == (2, "", f"compress.py: error: {message}")
    assert not (tmp / "a.rec").exists()


def test_rate_settings_for_a_fixed_beta_model_are_a_usage_error(cli):
    run, src, tmp, fixed = cli
    code, _, err = run("encode", src, "--model", fixed, "--quality", 3)
    assert code == 2 and err.strip() == (
        f"compress.py: error: --quality 3: model {fixed.stem} was trained at a "
        "single β; choose a variable-rate model (compress.py models lists "
        "each model's rate range)"
    )


def test_models_lists_the_beta_range(cli):
    run, *_ = cli
    code, out, _ = run("models")
    line = next(line for line in out.splitlines() if line.startswith("pln-vbr"))
    assert code == 0 and "variable rate: β=0.5…8 (quality 1 = β 8 … 8 = β 0.5)" in line


# ---- training -------------------------------------------------------------------------------------


def test_training_draws_each_images_beta_log_uniformly_and_repeatably():
    cfg, model_cfg, _ = resolve_config(["--beta_knots=4", "--beta_min=0.5", "--beta_max=8"])
    draws = torch.cat([batch_betas(model_cfg, cfg, step, 0, 8) for step in range(500)])
    assert draws.min() >= 0.5 and draws.max() <= 8.0
    assert abs(float(draws.log().mean()) - math.log(2.0)) < 0.05  # log-uniform: mean log β = log √(0.5·8)
    assert torch.equal(batch_betas(model_cfg, cfg, 7, 0, 8), batch_betas(model_cfg, cfg, 7, 0, 8))
    assert not torch.equal(batch_betas(model_cfg, cfg, 7, 0, 8), batch_betas(model_cfg, cfg, 8, 0, 8))


def test_a_variable_rate_run_warm_starts_from_a_fixed_beta_file_and_validates_at_three_betas(photo_dir, tmp_path):
    torch.manual_seed(0)
    fixed = save_model(build_model(ModelConfig(**{**TINY, "log_scale_min": -9.0})), tmp_path, "fixed")
    tiny = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.toml")
    code = train.main(
        [
            tiny,
            "--threads=1",
            "--amp=none",
            f"--data_dir={photo_dir}",
            f"--val_dir={photo_dir}",
            f"--out_dir={tmp_path / 'run'}",
            f"--export_dir={tmp_path / 'w'}",
            f"--init_from={fixed}",
            "--beta_knots=3",
            "--beta_min=0.25",
            "--beta_max=4",
            "--steps=10",
            "--conditioning_lr=1e-2",
        ]
    )
    assert code == 0
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert {"val_kl_bpp@0.25", "val_kl_bpp@1", "val_kl_bpp@4", "val_psnr@1"} <= set(log[-1])
    (exported,) = (tmp_path / "w").glob("pln-run-*.pt")
    model, info = load_model(exported)
    assert model.beta_range == (0.25, 4.0) and info["meta"]["training"]["validation"]["step"] == 10
    assert any(p.abs().sum() > 0 for p in model.conditioning.parameters())  # the tables trained


# ---- evaluation -----------------------------------------------------------------------------------


def test_eval_rd_gives_one_point_per_quality_of_a_variable_rate_model(vbr_dir, tmp_path, capsys, monkeypatch):
    from scripts import eval_rd

    folder, vbr, _ = vbr_dir
    monkeypatch.setattr(model_store, "REPO_WEIGHTS", folder / "no-such-folder")
    real = CoderParams.preset.__func__
    monkeypatch.setattr(
        CoderParams, "preset", classmethod(lambda cls, name: SMALL if name in PRESETS else real(cls, name))
    )
    (tmp_path / "data").mkdir()
    Image.fromarray(photo(64, 96)).save(tmp_path / "data" / "a.png")
    code = eval_rd.main(
        [
            f"--data={tmp_path / 'data'}",
            "--model",
            str(vbr),
            "--quality",
            "1",
            "8",
            "--rec-dir",
            str(tmp_path / "recs"),
            "--no-progress",
        ]
    )
    doc = json.loads(capsys.readouterr().out)
    assert code == 0
    assert [m["name"] for m in doc["meta"]["models"]] == [f"{vbr.stem}-q1", f"{vbr.stem}-q8"]  # by rate
    assert [m["beta"] for m in doc["meta"]["models"]] == pytest.approx([8.0, 0.5], rel=2e-3)
    bpp = doc["results"]["bpp"]
    assert bpp[0] < bpp[1] and (tmp_path / "recs" / f"{vbr.stem}-q8" / "a.rec").is_file()
    assert eval_rd.main([f"--data={tmp_path / 'data'}", "--model", str(vbr), "--beta", "20"]) == 2
    assert "β = 20 is outside this model's range 0.5 to 8" in capsys.readouterr().err

    from scripts import plot_vbr

    monkeypatch.setenv("REC_MODEL_DIR", str(folder))
    assert (
        plot_vbr.main(
            [
                "--recs",
                str(tmp_path / "recs"),
                "--out",
                str(tmp_path / "fig"),
                "--data",
                str(tmp_path / "data"),
                "--image",
                "a.png",
                "--points",
                f"{vbr.stem}-q8",
                "--at",
                "0",
                "0",
                "--crop",
                "32",
            ]
        )
        == 0
    )
    table = json.loads((tmp_path / "fig" / "rate_by_level.json").read_text())["points"]
    for point, bpp in zip((f"{vbr.stem}-q1", f"{vbr.stem}-q8"), bpp):
        row = table[point]
        assert row["bpp"] == pytest.approx(bpp)  # one image: its file's bpp
        assert row["level1_bpp"] + row["level2_bpp"] + row["header_bpp"] == pytest.approx(bpp)
    assert (tmp_path / "fig" / "rate_by_level.png").stat().st_size > 0
    assert (tmp_path / "fig" / "crops_a.png").stat().st_size > 0
