import math

import pytest
import torch
from torch.distributions import Laplace, Normal, kl_divergence

from models import ModelConfig, build_model, combine_gaussians, gaussian_kl, load_model, save_model
from models.distributions import PixelLikelihood

TINY = dict(channels=16, latents=8, level2_channels=8, level2_latents=4)


def test_gaussian_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    q_loc, p_loc = torch.randn(100, generator=g), torch.randn(100, generator=g)
    q_scale, p_scale = torch.rand(100, generator=g) + 0.05, torch.rand(100, generator=g) + 0.05
    expected = kl_divergence(Normal(q_loc, q_scale), Normal(p_loc, p_scale))
    torch.testing.assert_close(gaussian_kl(q_loc, q_scale, p_loc, p_scale), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind,dist", [("laplace", Laplace), ("gaussian", Normal)])
def test_pixel_nll_is_the_full_negative_log_density(kind, dist):
    x, x_hat = torch.rand(3, 8, 8), torch.rand(3, 8, 8)
    lik = PixelLikelihood(kind, gamma=0.07)
    torch.testing.assert_close(lik.nll(x, x_hat), -dist(x_hat, torch.tensor(0.07)).log_prob(x))


def test_learned_gamma_is_clamped_from_below_at_gamma_min():
    lik = PixelLikelihood("laplace", gamma=0.001, learn_gamma=True, gamma_min=0.01)
    assert lik.gamma.item() == pytest.approx(0.01)
    assert any(p is lik.log_gamma for p in lik.parameters())


def test_product_rule_equals_the_normalised_product_of_two_gaussians():
    a_loc, a_scale, b_loc, b_scale = torch.tensor([0.3]), torch.tensor([0.5]), torch.tensor([-1.0]), torch.tensor([2.0])
    loc, scale = combine_gaussians(a_loc, a_scale, b_loc, b_scale, "product")
    # N(a)·N(b) ∝ N(loc, scale²): check the log-density difference is constant in x.
    xs = torch.linspace(-3, 3, 7)
    diff = Normal(a_loc, a_scale).log_prob(xs) + Normal(b_loc, b_scale).log_prob(xs) - Normal(loc, scale).log_prob(xs)
    assert torch.allclose(diff, diff[0].expand_as(diff), atol=1e-5)


def test_thesis_rule_swaps_the_precision_weights():
    loc, scale = combine_gaussians(
        torch.tensor([1.0]), torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([0.5]), "thesis"
    )
    # encoder precision 1, prior precision 4: the thesis weights the encoder mean by 4 / 5.
    assert loc.item() == pytest.approx(0.8)
    assert scale.item() == pytest.approx(math.sqrt(1 / 5))


@pytest.mark.parametrize(
    "arch,residual,expected", [("pln", False, 8_061_363), ("pln", True, 13_247_283), ("vae", False, 5_782_147)]
)
def test_thesis_parameter_counts(arch, residual, expected):
    model = build_model(ModelConfig(arch=arch, residual=residual))
    assert sum(p.numel() for p in model.parameters()) == expected


@pytest.mark.parametrize("arch", ["pln", "vae"])
@pytest.mark.parametrize("size", [(37, 53), (1, 1), (17, 300), (64, 96)])
def test_any_image_size_is_padded_and_cropped_back(arch, size):
    model = build_model(ModelConfig(arch=arch, **TINY))
    out = model(torch.rand(2, 3, *size))
    assert out["x_hat"].shape == (2, 3, *size)
    for level, kl in out["kl"].items():
        assert kl.shape == (2, *model.latent_shape(level, *size))
        assert torch.isfinite(kl).all() and (kl >= 0).all()
    f = model.downsampling_factor
    ph, pw = model.pad_size(*size)
    assert ph % f == 0 and pw % f == 0 and min(ph, pw) >= model.min_input_size


def test_level1_posterior_and_prior_are_recomputed_from_the_given_z2():
    model = build_model(ModelConfig(arch="pln", **TINY)).eval()
    x = torch.rand(1, 3, 64, 64)
    feats = model.bottom_up(model.pad(x))
    shape1 = (1, *model.latent_shape(1, 64, 64))
    z2a, z2b = feats["loc2"], feats["loc2"] + 1.0
    p_a, p_b = model.prior(1, z2a, shape1), model.prior(1, z2b, shape1)
    q_a, q_b = model.posterior(1, feats, *p_a), model.posterior(1, feats, *p_b)
    assert not torch.equal(p_a[0], p_b[0]) and not torch.equal(q_a[0], q_b[0])


def test_export_then_load_gives_identical_outputs(tmp_path):
    model = build_model(ModelConfig(arch="pln", learn_gamma=True, **TINY)).eval()
    path = save_model(model, tmp_path, "tiny")
    assert path.name.startswith("pln-tiny-") and len(path.stem.split("-")[-1]) == 8
    loaded, info = load_model(path)
    assert info["config"] == model.cfg.to_dict()
    x = torch.rand(1, 3, 40, 40)
    torch.manual_seed(0)
    a = model(x, sample=False)["x_hat"]
    b = loaded(x, sample=False)["x_hat"]
    assert torch.equal(a, b)
    assert torch.load(path, weights_only=True)["format"] == "rec-model/1"


def test_half_precision_export_loads_back_as_float32(tmp_path):
    model = build_model(ModelConfig(arch="vae", **TINY)).eval()
    loaded, _ = load_model(save_model(model, tmp_path, "half", dtype=torch.float16))
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    x = torch.rand(1, 3, 32, 32)
    torch.testing.assert_close(loaded(x, sample=False)["x_hat"], model(x, sample=False)["x_hat"], atol=2e-3, rtol=0)


def test_unknown_model_config_keys_are_rejected():
    with pytest.raises(ValueError, match="unknown model config keys"):
        ModelConfig.from_dict({"arch": "pln", "chanels": 3})
