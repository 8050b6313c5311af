"""The sp-orc-predicted coder: level-1 blocks laid out by the model's rate head (codec/layout.py,
models/rate_head.py), with no side information."""

import json
import math

import numpy as np
import pytest
import torch

from PIL import Image

from conftest import offline_cli, photo
from codec import layout, pfr
from codec.api import compress_image, decompress, default_coder
from codec.bitstream import RecFormatError, unpack_rec
from codec.header_params import params_from_header
from codec.metrics import psnr
from codec.entropy import RecDecodeError
from codec.params import CoderParams, LevelParams
from codec.plan import kl_nats
from codec.store import ModelRef, ModelStore
from models import ModelConfig, build_model, load_model, save_model
from models.rate_head import RateHead, decoder_features, predict_bits

TINY = dict(arch="pln", channels=16, latents=8, level2_channels=8, level2_latents=4, log_scale_min=-4.0)
RANGE = dict(beta_knots=4, beta_min=0.5, beta_max=8.0)
LEVEL1 = LevelParams("sp-orc-predicted", 8, 12, 64, 0.0, 24.0, adaptive=False, zero_run=0)
SMALL = CoderParams(level1=LEVEL1, level2=LevelParams("importance", 8, 1, 15, 1.0, 12.0))


def rate_head(seed: int = 0) -> RateHead:
    """A small head with random weights: predictions of a few bits that vary from dim to dim."""
    torch.manual_seed(seed)
    head = RateHead(TINY["level2_channels"], TINY["latents"], 8)
    with torch.no_grad():
        head.out.bias.fill_(1.0)
    return head


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("layout")
    torch.manual_seed(0)
    model = build_model(ModelConfig(**TINY, **RANGE))
    plain = save_model(model, d, "plain")
    model.rate_head = rate_head()
    with_head = save_model(model, d, "rh")
    return d, with_head, plain


def code(path, image, params=SMALL, **kw):
    model, _ = load_model(path)
    return compress_image(model, image, model_ref=ModelRef.of_file(path), params=params, quality=4, **kw)


def synthetic_level(n: int, seed: int = 0):
    """q, p of n dims like a level 1: 40 % collapsed (q = p), the rest sharper by 1-20x and shifted."""
    gen = torch.Generator().manual_seed(seed)
    ratio = torch.exp(torch.empty(n).uniform_(math.log(0.05), 0.0, generator=gen))
    ratio = torch.where(torch.rand(n, generator=gen) < 0.4, torch.ones(n), ratio)
    m = torch.randn(n, generator=gen) * 0.8 * ratio.sqrt() * (ratio < 1)
    p_loc, p_scale = torch.randn(n, generator=gen), torch.rand(n, generator=gen) + 0.5
    q = (p_loc + m * p_scale).view(1, n), (ratio * p_scale).view(1, n)
    kl_bits = kl_nats(m.double(), ratio.double() ** 2) / math.log(2)
    return q, (p_loc.view(1, n), p_scale.view(1, n)), kl_bits.view(1, n)


# ---- the layout ------------------------------------------------------------------------------------


def test_a_prediction_at_a_rounding_midpoint_is_flagged_and_rounded_down_on_both_sides():
    midpoint = torch.tensor([(37 + 0.5) / layout.GRID], dtype=torch.float64)
    below, above = (torch.nextafter(midpoint, torch.tensor([d], dtype=torch.float64)) for d in (-np.inf, np.inf))
    assert torch.round(below * layout.GRID) != torch.round(above * layout.GRID)  # plain rounding would split
    units, flags = layout.quantise(above)
    assert flags.item() and units.item() == 37
    assert layout.quantise(below, flags)[0].item() == 37
    units, flags = layout.quantise(torch.tensor([2.0, -1.0, 1e9], dtype=torch.float64))
    assert units.tolist() == [2 * layout.GRID, 0, layout.MAX_PREDICTED_BITS * layout.GRID] and not flags.any()


def test_blocks_close_where_the_predicted_bits_pass_a_multiple_of_the_target_or_at_max_dims():
    lp = LevelParams("sp-orc-predicted", 10, 4, 3, 0.0, 24.0, adaptive=False, zero_run=0)
    bits = torch.tensor([1, 1, 1, 2, 3, 9, 1, 1, 1, 1, 1], dtype=torch.int64)
    lay = layout.block_layout(bits * layout.GRID, lp)
    # predicted bits before each dim: 0 1 2 3 5 8 17 18 19 20 21 -> bands of 4 bits 0 0 0 0 1 2 4 4 4 5 5,
    # and the first band's 4 dims split after 3
    assert lay.sizes.tolist() == [3, 1, 1, 1, 3, 2]
    assert lay.block_bin_bits.tolist() == [3, 2, 3, 9, 3, 2]  # round(P_b) - (index_bits - 10) = P_b


def test_bin_bits_follow_the_candidates_beyond_2_to_the_residual_bits():
    lp = LevelParams("sp-orc-predicted", 12, 24, 255, 0.0, 24.0, adaptive=False, zero_run=0)
    lay = layout.block_layout(torch.full((8,), 3 * layout.GRID), lp)  # one block of 24 bits
    assert lay.sizes.tolist() == [8] and lay.block_bin_bits.tolist() == [24 - (12 - layout.RESIDUAL_BITS)]
    assert lay.bin_bits.tolist() == [3, 3, 3, 3, 3, 3, 2, 2]


@pytest.mark.usefixtures("one_thread")
def test_coded_samples_are_near_exact_and_cost_near_the_kl_when_the_prediction_is_right():
    (q_loc, q_scale), (p_loc, p_scale), kl_bits = synthetic_level(4000)
    params = CoderParams(level1=LevelParams("sp-orc-predicted", 10, 24, 255, 0.0, 24.0, adaptive=False, zero_run=0))
    u, coded_bits = [], 0
    for seed in range(2):
        x, data, stats = layout.encode_level(q_loc, q_scale, p_loc, p_scale, kl_bits, seed=seed, level=1, params=params)
        assert torch.equal(layout.decode_level(p_loc, p_scale, data, kl_bits, seed=seed, level=1, params=params), x)
        u.append(((x - q_loc) / q_scale).flatten())
        coded_bits += 8 * len(data)
    u = torch.cat(u)
    assert stats["n_flags"] == 0 and stats["n_zero_dims"] > 1000  # the collapsed dims: prior samples
    assert 0.95 < float((u**2).mean()) < 1.15  # an exact sample: 1; 2^10 candidates for ~10 bits
    assert coded_bits / 2 < 1.25 * float(kl_bits.sum())


def test_an_outlier_dim_is_sent_as_a_value_and_left_out_of_the_blocks():
    (q_loc, q_scale), (p_loc, p_scale), kl_bits = synthetic_level(300, seed=1)
    q_loc, q_scale = q_loc.clone(), q_scale.clone()
    q_loc[0, 7], q_scale[0, 7] = p_loc[0, 7] + 20 * p_scale[0, 7], 1e-4 * p_scale[0, 7]  # ~300 bits of KL
    x, data, stats = layout.encode_level(q_loc, q_scale, p_loc, p_scale, kl_bits, seed=3, level=1, params=SMALL)
    assert stats["n_outliers"] == 1 and abs(float(x[0, 7] - q_loc[0, 7])) < 1e-3 * float(p_scale[0, 7])
    assert torch.equal(layout.decode_level(p_loc, p_scale, data, kl_bits, seed=3, level=1, params=SMALL), x)


def test_corrupted_or_truncated_sections_raise_a_decode_error():
    (q_loc, q_scale), (p_loc, p_scale), kl_bits = synthetic_level(500, seed=2)
    _, data, _ = layout.encode_level(q_loc, q_scale, p_loc, p_scale, kl_bits, seed=0, level=1, params=SMALL)
    for bad in (data[:-1], data[:9], data[:20] + bytes([data[20] ^ 0x10]) + data[21:]):
        with pytest.raises(RecDecodeError):
            layout.decode_level(p_loc, p_scale, bad, kl_bits, seed=0, level=1, params=SMALL)
    with pytest.raises(RecDecodeError, match="different CoderParams"):
        other = SMALL.with_level(1, steps=13)
        layout.decode_level(p_loc, p_scale, data, kl_bits, seed=0, level=1, params=other)


# ---- the rate head -----------------------------------------------------------------------------------


def test_the_heads_float64_features_are_the_models_level1_prior_input(models):
    _, with_head, _ = models
    model, _ = load_model(with_head)
    z2 = torch.randn(1, TINY["level2_latents"], 3, 4)
    seen = {}
    hook = model.prior_loc_head.register_forward_pre_hook(lambda module, args: seen.update(d=args[0]))
    model.prior(1, z2, None, 2.0)
    hook.remove()
    d64 = decoder_features(model, z2, 2.0)
    assert d64.dtype == torch.float64 and torch.allclose(d64.float(), seen["d"], atol=1e-5)
    bits = predict_bits(model, z2, 2.0)
    assert bits.shape == (1, TINY["latents"], 6, 8) and bits.dtype == torch.float64 and (bits >= 0).all()


def test_a_model_file_keeps_its_rate_head(models):
    _, with_head, plain = models
    model, info = load_model(with_head)
    assert load_model(plain)[0].rate_head is None and info["rate"]["config"]["channels"] == 8
    head = rate_head()
    assert all(torch.equal(v, model.rate_head.state_dict()[k]) for k, v in head.state_dict().items())


# ---- files -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(64, 80), (45, 70)])
def test_sp_orc_predicted_files_decode_to_the_encoders_pixels(models, size):
    d, with_head, _ = models
    data, x_hat, stats = code(with_head, photo(*size))
    assert stats["levels"][1]["sampler"] == "sp-orc-predicted" and stats["levels"][1]["n_groups"] > 0
    assert np.array_equal(decompress(data, ModelStore(dirs=[d]))[0], x_hat)


def test_a_tiled_sp_orc_predicted_file_decodes_to_the_encoders_pixels(models):
    d, with_head, _ = models
    data, x_hat, stats = code(with_head, photo(70, 100, seed=3), tile=64)
    assert stats["tiles"] == 4
    assert np.array_equal(decompress(data, ModelStore(dirs=[d]))[0], x_hat)


def test_decoding_is_robust_to_a_last_ulp_change_of_the_predictions(models, monkeypatch):
    """What another device, thread count or kernel changes: the flags keep both sides on one layout."""
    from codec import tiling

    d, with_head, _ = models
    data, x_hat, _ = code(with_head, photo(64, 96, seed=5))
    for direction in (np.inf, -np.inf):

        def nudged(*args, _d=direction):
            bits = predict_bits(*args)
            return torch.nextafter(bits, torch.full_like(bits, _d))

        monkeypatch.setattr(tiling, "predict_bits", nudged)
        assert np.array_equal(decompress(data, ModelStore(dirs=[d]))[0], x_hat)


def test_the_coder_needs_a_pln_model_with_a_rate_head(models):
    d, with_head, plain = models
    with pytest.raises(ValueError, match="needs a PLN model with a rate head"):
        code(plain, photo(32, 32))
    data, _, _ = code(with_head, photo(32, 32))
    stripped, _ = load_model(plain)
    with pytest.raises(RecFormatError, match="rate head"):
        decompress(data, lambda h: stripped)


def test_cli_codes_with_a_rate_head_and_refuses_a_model_without_one(models, monkeypatch, capsys, tmp_path):
    d, with_head, plain = models
    run = offline_cli(monkeypatch, capsys, d, SMALL)
    Image.fromarray(photo(45, 61)).save(tmp_path / "c.png")
    code, _, err = run("encode", tmp_path / "c.png", "--coder", "sp-orc-predicted", "--model", plain)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "has no rate head" in err
    assert not (tmp_path / "c.rec").exists()
    assert run("encode", tmp_path / "c.png", "--coder", "sp-orc-predicted", "--model", with_head)[0] == 0
    assert run("decode", tmp_path / "c.rec", "-o", tmp_path / "c.rec.png")[0] == 0
    code, out, _ = run("models")
    lines = {line.split(":")[0].split(" ")[0]: line for line in out.splitlines()}
    assert "rate head" in lines[with_head.stem] and "rate head" not in lines[plain.stem]


def test_the_default_coder_is_sp_orc_predicted_with_a_rate_head_and_thesis_without(
    models, monkeypatch, capsys, tmp_path
):
    d, with_head, plain = models
    for path, coder in ((with_head, "sp-orc-predicted"), (plain, "thesis")):
        model, _ = load_model(path)
        assert default_coder(model) == coder
        data, x_hat, stats = compress_image(model, photo(32, 32), model_ref=ModelRef.of_file(path), quality=4)
        assert stats["coder"] == coder and unpack_rec(data)[0].coder == coder
        assert stats["levels"][1]["sampler"] == CoderParams.preset(coder).level1.sampler
        assert np.array_equal(decompress(data, ModelStore(dirs=[d]))[0], x_hat)
    run = offline_cli(monkeypatch, capsys, d, SMALL)
    Image.fromarray(photo(45, 61)).save(tmp_path / "c.png")
    code, out, _ = run("encode", tmp_path / "c.png", "--model", with_head, "--json")
    assert code == 0 and json.loads(out)["coder"] == "sp-orc-predicted"
    assert unpack_rec((tmp_path / "c.rec").read_bytes())[0].coder == "sp-orc-predicted"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_written_file_decodes_on_the_cpu(models):
    d, with_head, _ = models
    data, x_hat, _ = code(with_head, photo(48, 64), device="cuda")
    assert np.array_equal(decompress(data, ModelStore(device="cuda", dirs=[d]), device="cuda")[0], x_hat)
    y_cpu = decompress(data, ModelStore(dirs=[d]))[0]  # the networks round differently; the layout must not
    assert np.abs(y_cpu.astype(int) - x_hat.astype(int)).max() <= 1


def test_the_preset_codes_blocks_of_2_to_the_10_candidates_and_24_predicted_bits():
    lp = CoderParams.preset("sp-orc-predicted").level1
    assert (lp.sampler, lp.index_bits, lp.steps, lp.adaptive) == ("sp-orc-predicted", 10, 24, False)
    assert (lp.low_rate_index_bits, lp.low_rate_bits_per_dim) == (12, 1.0)
    assert lp.max_group_size < pfr.MAX_DIMS_PER_BLOCK


@pytest.mark.parametrize("tile", [0, 64])
def test_a_file_below_the_low_rate_threshold_is_coded_with_the_low_rate_index_bits(models, tile):
    d, with_head, _ = models
    image = photo(70, 100, seed=6)
    for threshold, index_bits in ((1000.0, 10), (0.0, 8)):  # the head predicts ~1.3 bits a dim
        params = SMALL.with_level(1, low_rate_index_bits=10, low_rate_bits_per_dim=threshold)
        data, x_hat, stats = code(with_head, image, params=params, tile=tile)
        header, _ = unpack_rec(data)
        assert params_from_header(header, 2).level1.index_bits == index_bits
        assert stats["levels"][1]["chosen"] == ({"index_bits": 10} if threshold else {})
        assert np.array_equal(decompress(data, ModelStore(dirs=[d]))[0], x_hat)


def test_a_negative_or_nan_low_rate_threshold_is_refused():
    for threshold in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="low_rate_bits_per_dim must be a finite number >= 0"):
            SMALL.with_level(1, low_rate_index_bits=10, low_rate_bits_per_dim=threshold)


def test_the_presets_low_rate_choice_is_a_registered_parameter_set(tmp_path):
    torch.manual_seed(1)
    model = build_model(ModelConfig(**TINY, **RANGE))
    model.rate_head = rate_head()
    with torch.no_grad():
        model.rate_head.out.bias.fill_(-3.0)  # ~0.05-0.5 bits a dim: below the preset's 1 bit
    path = save_model(model, tmp_path, "low")
    data, x_hat, stats = code(path, photo(48, 64), params="sp-orc-predicted")
    header, _ = unpack_rec(data)
    assert stats["levels"][1]["chosen"] == {"index_bits": 12}
    assert header.coder_params[:1] == b"R" and header.coder_params[1] in (44, 45, 46)
    assert np.array_equal(decompress(data, ModelStore(dirs=[tmp_path]))[0], x_hat)


def test_train_rate_head_adds_a_head_that_predicts_the_kl_and_keeps_the_networks(models, photo_dir, tmp_path):
    from scripts import train_rate_head

    _, _, plain = models
    argv = [f"--model={plain}", f"--data={photo_dir}", "--crops=6", "--held-out=2", "--crop=64", "--batch=2"]
    argv += ["--minutes=0.05", "--channels=8", "--threads=1", f"--cache={tmp_path / 'ex.pt'}", f"--out-dir={tmp_path}"]
    assert train_rate_head.main(argv) == 0
    (written,) = tmp_path.glob("pln-plain-*.pt")
    trained, info = load_model(written)
    before = load_model(plain)[0].state_dict()
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in before.items())  # the networks unchanged
    meta = info["rate"]["meta"]
    assert meta["steps"] > 0 and meta["examples"] == 4 and isinstance(meta["held_out_r2"], float)
    examples = torch.load(tmp_path / "ex.pt")
    fresh = RateHead(TINY["level2_channels"], TINY["latents"], 8)

    def squared_error(head):
        errors = [
            (train_rate_head.predict(trained, head, examples["z2"][i : i + 1], float(b)) - examples["kl_bits"][i]) ** 2
            for i, b in enumerate(examples["beta"][:4])
        ]
        return float(sum(e.sum() for e in errors))

    with torch.no_grad():
        assert squared_error(trained.rate_head) < squared_error(fresh)


def test_loss_by_level_codes_each_level_alone_and_its_coded_mode_is_the_encoders(models, tmp_path):
    from scripts import loss_by_level

    d, with_head, _ = models
    (tmp_path / "img").mkdir()
    image = photo(40, 56, seed=3)
    Image.fromarray(image).save(tmp_path / "img" / "a.png")
    out = tmp_path / "loss.json"
    argv = ["--data", tmp_path / "img", "--model", with_head, "--quality", "2", "6", "-o", out]
    assert loss_by_level.main([str(a) for a in argv]) == 0
    doc = json.loads(out.read_text())
    rows = doc["per_image"]["a.png"]["q2"]
    assert list(rows) == list(loss_by_level.MODES) and doc["meta"]["coder"] == "sp-orc-predicted"
    model, _ = load_model(with_head)
    data, x_hat, _ = compress_image(model, image, model_ref=ModelRef.of_file(with_head), quality=2)
    z2_bytes, z1_bytes = (len(b) for b in unpack_rec(data)[1])
    assert rows["coded"]["bpp_by_level"] == pytest.approx({"z1": 8 * z1_bytes / 2240, "z2": 8 * z2_bytes / 2240})
    assert rows["coded"]["psnr"] == psnr(image, x_hat)
    assert rows["exact"]["bpp_by_level"]["z2"] == rows["z2-exact"]["bpp_by_level"]["z2"]  # the same z2 sample
    assert rows["coded"]["bpp_by_level"]["z2"] == rows["z1-exact"]["bpp_by_level"]["z2"]  # the same coded z2
    assert rows["oracle-layout"]["bpp_by_level"]["z1"] != rows["coded"]["bpp_by_level"]["z1"]
    for q in ("q2", "q6"):
        assert doc["means"][q]["exact"]["loss_at_equal_rate_db"] == pytest.approx(0.0, abs=1e-9)
