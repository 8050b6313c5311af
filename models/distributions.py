"""Diagonal-Gaussian algebra and pixel likelihoods, always evaluated in float32 or wider.

Everything the coder consumes (KL per dimension, posterior and prior parameters) comes from here, so
training under bf16 autocast never changes these numbers' precision.
"""

import math

import torch
from torch import Tensor, nn

LN2 = math.log(2.0)


def gaussian_kl(q_loc: Tensor, q_scale: Tensor, p_loc: Tensor, p_scale: Tensor) -> Tensor:
    """KL[N(q_loc, q_scale²) || N(p_loc, p_scale²)] per dimension, in nats."""
    q_loc, q_scale, p_loc, p_scale = (t.float() for t in (q_loc, q_scale, p_loc, p_scale))
    ratio = (q_scale / p_scale) ** 2
    return 0.5 * (ratio + ((q_loc - p_loc) / p_scale) ** 2 - 1.0 - torch.log(ratio))


def combine_gaussians(
    enc_loc: Tensor, enc_scale: Tensor, prior_loc: Tensor, prior_scale: Tensor, rule: str = "product"
) -> tuple[Tensor, Tensor]:
    """Precision-weighted merge of bottom-up (encoder) and top-down (prior) statistics of the PLN.

    rule="product" is the Gaussian product rule, μ = (μx·Px + μp·Pp) / (Px + Pp).
    rule="thesis" reproduces the thesis code, which weights each mean by the *other* source's
    precision: μ = (μx·Pp + μp·Px) / (Px + Pp). Both give the same variance 1 / (Px + Pp).
    """
    enc_prec = 1.0 / (enc_scale.float() ** 2 + 1e-12)
    prior_prec = 1.0 / (prior_scale.float() ** 2 + 1e-12)
    var = 1.0 / (enc_prec + prior_prec)
    if rule == "product":
        loc = (enc_loc.float() * enc_prec + prior_loc.float() * prior_prec) * var
    elif rule == "thesis":
        loc = (enc_loc.float() * prior_prec + prior_loc.float() * enc_prec) * var
    else:
        raise ValueError(f"unknown combination rule {rule!r} (expected 'product' or 'thesis')")
    return loc, var.sqrt()


def sample_gaussian(loc: Tensor, scale: Tensor) -> Tensor:
    """Reparameterised sample loc + scale·ε."""
    return loc + scale * torch.randn_like(loc)


class PixelLikelihood(nn.Module):
    """Per-pixel Laplace(x | x̂, γ) or Gaussian(x | x̂, γ²) with the full normaliser, x in [0, 1].

    γ is a fixed scalar, or a learned one (parameterised as log γ) optionally clamped from below at
    γ∞ (thesis §3.3.1). The negative log-likelihood keeps the N·log γ term: it is what drives γ down.
    """

    def __init__(self, kind: str = "laplace", gamma: float = 1.0, learn_gamma: bool = False, gamma_min: float = 0.0):
        super().__init__()
        if kind not in ("laplace", "gaussian"):
            raise ValueError(f"unknown likelihood {kind!r} (expected 'laplace' or 'gaussian')")
        self.kind = kind
        self.gamma_min = gamma_min
        log_gamma = torch.tensor(math.log(gamma))
        if learn_gamma:
            self.log_gamma = nn.Parameter(log_gamma)
        else:
            self.register_buffer("log_gamma", log_gamma)

    @property
    def gamma(self) -> Tensor:
        return self.log_gamma.exp().clamp(min=self.gamma_min)

    def nll(self, x: Tensor, x_hat: Tensor, log_gamma_offset: Tensor | None = None) -> Tensor:
        """Negative log-likelihood per element, in nats; `log_gamma_offset` (B,) shifts each image's log γ
        (a variable-rate model's γ depends on the β it codes at)."""
        gamma = self.gamma
        if log_gamma_offset is not None:
            gamma = (self.log_gamma + log_gamma_offset.float()).exp().clamp(min=self.gamma_min)[:, None, None, None]
        err = x.float() - x_hat.float()
        if self.kind == "laplace":
            return torch.log(2.0 * gamma) + err.abs() / gamma
        return 0.5 * torch.log(2.0 * math.pi * gamma**2) + err**2 / (2.0 * gamma**2)
