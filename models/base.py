"""What the VAE and the PLN share: padding, the level-by-level latent interface, forward, the β-ELBO.

The coder never sees the networks. It walks the levels top-down through four hooks:

    feats = model.bottom_up(x)                          # x padded to model.pad_size(H, W)
    for level in (L, ..., 1):
        p_loc, p_scale = model.prior(level, z_above, model.latent_shape(level, H, W))
        q_loc, q_scale = model.posterior(level, feats, p_loc, p_scale)
        z_above = <a sample of q, coded or exact>
    x_hat = model.synthesize(z_above)                   # then crop to (H, W)

Because `prior` and `posterior` take the level above's sample as an argument, the encoder recomputes
the level-1 prior *and* posterior from the coded z2, as the decoder will see it.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig
from .distributions import LN2, PixelLikelihood, gaussian_kl, sample_gaussian


def bounded_scale(raw: Tensor, cfg: ModelConfig) -> Tensor:
    """exp of a clamped log-scale head, in float32: caps every dimension's KL and avoids overflow."""
    return raw.float().clamp(cfg.log_scale_min, cfg.log_scale_max).exp()


class LatentVariableModel(nn.Module):
    num_levels: int = 1
    downsampling_factor: int = 16

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.likelihood = PixelLikelihood(cfg.likelihood, cfg.gamma, cfg.learn_gamma, cfg.gamma_min)

    # ---- geometry -------------------------------------------------------------------------------
    @property
    def min_input_size(self) -> int:
        # The deepest 5×5 convs need at least 3×3 inputs to mirror-pad, which two factors guarantee.
        return 2 * self.downsampling_factor

    def pad_size(self, height: int, width: int) -> tuple[int, int]:
        """Size the network runs at: a multiple of the downsampling factor, at least min_input_size."""
        f = self.downsampling_factor
        return (max(self.min_input_size, math.ceil(height / f) * f),
                max(self.min_input_size, math.ceil(width / f) * f))

    def pad(self, x: Tensor) -> Tensor:
        """Pad bottom/right by edge replication to pad_size (works for any size, even 1×1)."""
        ph, pw = self.pad_size(*x.shape[-2:])
        return F.pad(x, (0, pw - x.shape[-1], 0, ph - x.shape[-2]), mode="replicate")

    def latent_shape(self, level: int, height: int, width: int) -> tuple[int, int, int]:
        """(channels, h, w) of level `level` for an image of (unpadded) size height × width."""
        raise NotImplementedError

    # ---- the level interface (see module docstring) ----------------------------------------------
    def bottom_up(self, x: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError

    def prior(self, level: int, z_above: Tensor | None, shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        """p(z_level | z_above); the top level's prior is N(0, I) of `shape` = (B, C, h, w)."""
        raise NotImplementedError

    def posterior(self, level: int, feats: dict[str, Tensor], p_loc: Tensor, p_scale: Tensor
                  ) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def synthesize(self, z1: Tensor) -> Tensor:
        """Decode level-1 latents into a padded image in (0, 1), float32."""
        return torch.sigmoid(self.g_s(z1).float())

    def standard_prior(self, shape: tuple[int, ...], like: Tensor | None) -> tuple[Tensor, Tensor]:
        device = like.device if like is not None else next(self.parameters()).device
        zeros = torch.zeros(shape, device=device)
        return zeros, torch.ones_like(zeros)

    # ---- training / evaluation pass -------------------------------------------------------------
    def forward(self, x: Tensor, sample: bool = True) -> dict:
        """Full pass with reparameterised posterior samples (or posterior means with sample=False).

        Returns {"x_hat": (B,3,H,W) float32, "kl": {level: (B,C,h,w) KL in nats}}.
        """
        height, width = x.shape[-2:]
        feats = self.bottom_up(self.pad(x))
        z_above, kl = None, {}
        for level in range(self.num_levels, 0, -1):
            shape = (x.shape[0], *self.latent_shape(level, height, width))
            p_loc, p_scale = self.prior(level, z_above, shape)
            q_loc, q_scale = self.posterior(level, feats, p_loc, p_scale)
            kl[level] = gaussian_kl(q_loc, q_scale, p_loc, p_scale)
            z_above = sample_gaussian(q_loc, q_scale) if sample else q_loc
        x_hat = self.synthesize(z_above)[..., :height, :width]
        return {"x_hat": x_hat, "kl": kl}


def elbo_loss(model: LatentVariableModel, x: Tensor, out: dict, beta: float, kl_weight: float) -> dict:
    """β-ELBO per batch: [Σ pixel NLL + β·w(t)·Σ KL (all levels)] / B, in nats; plus logging terms."""
    batch, num_pixels = x.shape[0], x.shape[-2] * x.shape[-1]
    nll = model.likelihood.nll(x, out["x_hat"]).sum() / batch
    kl_per_level = {level: k.sum() / batch for level, k in out["kl"].items()}
    kl = sum(kl_per_level.values())
    mse = F.mse_loss(out["x_hat"].float(), x.float())
    return {
        "loss": nll + beta * kl_weight * kl,
        "nll": nll,
        "kl": kl,
        "kl_bpp": kl / (LN2 * num_pixels),
        **{f"kl{level}_bpp": k / (LN2 * num_pixels) for level, k in kl_per_level.items()},
        "psnr": -10.0 * torch.log10(mse.clamp(min=1e-10)),
        "gamma": model.likelihood.gamma.detach(),
    }
