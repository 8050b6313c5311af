"""What the VAE and the PLN share: padding, the level-by-level latent interface, forward, the β-ELBO.

The coder never sees the networks. It walks the levels top-down through four hooks:

    feats = model.bottom_up(x, beta)                    # x padded to model.pad_size(H, W)
    for level in (L, ..., 1):
        p_loc, p_scale = model.prior(level, z_above, model.latent_shape(level, H, W), beta)
        q_loc, q_scale = model.posterior(level, feats, p_loc, p_scale)
        z_above = <a sample of q, coded or exact>
    x_hat = model.synthesize(z_above, beta)             # then crop to (H, W)

Because `prior` and `posterior` take the level above's sample as an argument, the encoder recomputes
the level-1 prior *and* posterior from the coded z2, as the decoder will see it.

`beta` is the rate setting of a variable-rate model (`model.variable_rate`; a float or a (B,) tensor,
one β per image); a model trained at one β ignores it.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .conditioning import Conditioning
from .config import ModelConfig
from .distributions import LN2, PixelLikelihood, gaussian_kl, sample_gaussian


def bounded_scale(raw: Tensor, cfg: ModelConfig) -> Tensor:
    """exp of a clamped log-scale head, in float32: caps every dimension's KL and avoids overflow."""
    return raw.float().clamp(cfg.log_scale_min, cfg.log_scale_max).exp()


class LatentVariableModel(nn.Module):
    num_levels: int = 1
    downsampling_factor: int = 16
    # Halos (padded pixels, multiples of downsampling_factor) that cover each network's receptive
    # radius, so a network run on a tile grown by its halo gives the whole image's output inside the
    # tile (codec/tiling.py): the encoder's analysis, the top-down prior from the level above, and the
    # synthesis. tests/test_tiling.py checks them against the networks.
    analysis_context: int = 32
    prior_context: int = 0
    synthesis_context: int = 32

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.likelihood = PixelLikelihood(cfg.likelihood, cfg.gamma, cfg.learn_gamma, cfg.gamma_min)
        self.conditioning: Conditioning | None = None
        self.lossless_head: nn.Module | None = None  # models/lossless.py; a model file may carry one
        self.rate_head: nn.Module | None = None  # models/rate_head.py (PLN); a model file may carry one

    def condition_on_beta(self, sites: dict[str, int]) -> None:
        """Subclasses call this last in __init__ with {site: channels} when cfg.beta_knots > 0."""
        cfg = self.cfg
        if cfg.beta_knots:
            self.conditioning = Conditioning(cfg.beta_min, cfg.beta_max, cfg.beta_knots, sites)

    # ---- rate conditioning (models/conditioning.py) -----------------------------------------------
    @property
    def variable_rate(self) -> bool:
        return self.conditioning is not None

    @property
    def beta_range(self) -> tuple[float, float] | None:
        return (self.cfg.beta_min, self.cfg.beta_max) if self.variable_rate else None

    def beta_weights(self, beta: float | Tensor | None, like: Tensor) -> Tensor | None:
        """Knot weights (B, K) for a batch shaped like `like`; None for a model trained at one β."""
        if self.conditioning is None:
            return None
        if beta is None:
            raise ValueError("this model is variable-rate: give the β to code at")
        beta = torch.as_tensor(beta, dtype=torch.float32, device=like.device).reshape(-1)
        return self.conditioning.weights(beta.expand(like.shape[0]))

    def film(self, site: str, h: Tensor, weights: Tensor | None) -> Tensor:
        return h if weights is None else self.conditioning.modulate(site, h, weights)

    # ---- geometry -------------------------------------------------------------------------------
    @property
    def min_input_size(self) -> int:
        # The deepest 5×5 convs need at least 3×3 inputs to mirror-pad, which two factors guarantee.
        return 2 * self.downsampling_factor

    def pad_size(self, height: int, width: int) -> tuple[int, int]:
        """Size the network runs at: a multiple of the downsampling factor, at least min_input_size."""
        f = self.downsampling_factor
        return (max(self.min_input_size, math.ceil(height / f) * f), max(self.min_input_size, math.ceil(width / f) * f))

    def pad(self, x: Tensor) -> Tensor:
        """Pad bottom/right by edge replication to pad_size (works for any size, even 1×1)."""
        ph, pw = self.pad_size(*x.shape[-2:])
        return F.pad(x, (0, pw - x.shape[-1], 0, ph - x.shape[-2]), mode="replicate")

    def latent_shape(self, level: int, height: int, width: int) -> tuple[int, int, int]:
        """(channels, h, w) of level `level` for an image of (unpadded) size height × width."""
        raise NotImplementedError

    def latent_stride(self, level: int) -> int:
        """Pixels per latent of level `level`: each level halves the resolution of the one below."""
        return self.downsampling_factor >> (self.num_levels - level)

    # ---- the level interface (see module docstring) ----------------------------------------------
    def bottom_up(self, x: Tensor, beta: float | Tensor | None = None) -> dict[str, Tensor]:
        raise NotImplementedError

    def prior(
        self, level: int, z_above: Tensor | None, shape: tuple[int, ...], beta: float | Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """p(z_level | z_above); the top level's prior is N(0, I) of `shape` = (B, C, h, w)."""
        raise NotImplementedError

    def posterior(self, level: int, feats: dict[str, Tensor], p_loc: Tensor, p_scale: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def synthesize(self, z1: Tensor, beta: float | Tensor | None = None) -> Tensor:
        """Decode level-1 latents into a padded image in (0, 1), float32."""
        weights = self.beta_weights(beta, z1)
        h = z1
        for i, layer in enumerate(self.g_s):
            h = layer(h)
            if i < len(self.g_s) - 1:
                h = self.film(f"g_s{i}", h, weights)
        return torch.sigmoid(h.float())

    def standard_prior(self, shape: tuple[int, ...], like: Tensor | None) -> tuple[Tensor, Tensor]:
        device = like.device if like is not None else next(self.parameters()).device
        zeros = torch.zeros(shape, device=device)
        return zeros, torch.ones_like(zeros)

    # ---- training / evaluation pass -------------------------------------------------------------
    def forward(self, x: Tensor, sample: bool = True, beta: float | Tensor | None = None) -> dict:
        """Full pass with reparameterised posterior samples (or posterior means with sample=False).

        Returns {"x_hat": (B,3,H,W) float32, "kl": {level: (B,C,h,w) KL in nats}}, and for a
        variable-rate model "log_gamma_offset": (B,) the likelihood's log γ shift at each image's β.
        """
        height, width = x.shape[-2:]
        z1, kl = self.infer(x, sample, beta)
        out = {"x_hat": self.synthesize(z1, beta)[..., :height, :width], "kl": kl}
        if self.conditioning is not None:
            out["log_gamma_offset"] = self.conditioning.log_gamma_offset(self.beta_weights(beta, x))
        return out

    def infer(
        self, x: Tensor, sample: bool = True, beta: float | Tensor | None = None
    ) -> tuple[Tensor, dict[int, Tensor]]:
        """The encoder's top-down walk without synthesis: (z1, {level: KL per dimension in nats}), each
        level's z a reparameterised posterior sample (or its mean with sample=False)."""
        feats = self.bottom_up(self.pad(x), beta)
        kl = {}

        def draw(level: int, p_loc: Tensor, p_scale: Tensor) -> Tensor:
            q_loc, q_scale = self.posterior(level, feats, p_loc, p_scale)
            kl[level] = gaussian_kl(q_loc, q_scale, p_loc, p_scale)
            return sample_gaussian(q_loc, q_scale) if sample else q_loc

        return self.top_down(*x.shape[-2:], draw, beta, batch=x.shape[0]), kl

    def top_down(self, height: int, width: int, draw, beta: float | Tensor | None = None, batch: int = 1) -> Tensor:
        """Walk the levels from the top: each level's prior p(z_l | z_above) from the z drawn above
        it, then z_l = draw(level, p_loc, p_scale). Returns z1. Every top-down pass (training,
        the encoder, the decoder, the coder-free evaluation) is this walk with its own `draw`."""
        z = None
        for level in range(self.num_levels, 0, -1):
            p_loc, p_scale = self.prior(level, z, (batch, *self.latent_shape(level, height, width)), beta)
            z = draw(level, p_loc, p_scale)
        return z


def elbo_loss(model: LatentVariableModel, x: Tensor, out: dict, beta: float | Tensor, kl_weight: float) -> dict:
    """β-ELBO per batch: [Σ pixel NLL + β·w(t)·Σ KL (all levels)] / B, in nats; plus logging terms.

    `beta` may be a (B,) tensor, one β per image (a variable-rate model's training batch)."""
    batch, num_pixels = x.shape[0], x.shape[-2] * x.shape[-1]
    nll_per_image = model.likelihood.nll(x, out["x_hat"], out.get("log_gamma_offset")).flatten(1).sum(1)
    kl_per_level = {level: k.flatten(1).sum(1) for level, k in out["kl"].items()}
    kl_per_image = sum(kl_per_level.values())
    nll, kl = nll_per_image.sum() / batch, kl_per_image.sum() / batch
    kl_per_level = {level: k.sum() / batch for level, k in kl_per_level.items()}
    mse = F.mse_loss(out["x_hat"].float(), x.float())
    beta = torch.as_tensor(beta, dtype=torch.float32, device=x.device)
    return {
        "loss": (nll_per_image + beta * kl_weight * kl_per_image).sum() / batch,
        "nll": nll,
        "kl": kl,
        "kl_bpp": kl / (LN2 * num_pixels),
        **{f"kl{level}_bpp": k / (LN2 * num_pixels) for level, k in kl_per_level.items()},
        "psnr": -10.0 * torch.log10(mse.clamp(min=1e-10)),
        "gamma": model.likelihood.gamma.detach(),
    }
