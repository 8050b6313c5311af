"""Rate conditioning: one network for every β, through per-channel gains and offsets indexed by log β.

A variable-rate model (ModelConfig.beta_knots > 0) is trained with a different β for every image and
told that β at every layer. Each conditioned layer output h (B, C, h, w) becomes

    h · exp(a(β)) + b(β)          a, b: (B, C), piecewise linear in log β between K knots

spaced evenly in log β over [beta_min, beta_max] (FiLM with a lookup table, as Choi et al.'s conditional
autoencoder and Cui et al.'s gain units). The tables start at zero, so a freshly conditioned model is
exactly the fixed-β model it was initialised from, at every β; training then bends each layer per rate.
The encoder's latent heads are conditioned too, which is where most of the rate control happens: a
per-channel shift of a posterior's log-scale or a gain on its mean moves that channel's KL directly.

Interpolating a table, instead of an MLP of log β, keeps every β's coefficients a convex mix of two
learned rows: nothing extrapolates outside the trained range, and the encoder refuses β outside it.
"""

import math

import torch
from torch import Tensor, nn


class FiLM(nn.Module):
    """h · exp(a(β)) + b(β) per channel; `weights` from Conditioning.weights."""

    def __init__(self, channels: int, knots: int):
        super().__init__()
        self.log_gain = nn.Parameter(torch.zeros(knots, channels))
        self.bias = nn.Parameter(torch.zeros(knots, channels))

    def forward(self, h: Tensor, weights: Tensor) -> Tensor:
        gain = (weights @ self.log_gain.float()).exp()[:, :, None, None]
        bias = (weights @ self.bias.float())[:, :, None, None]
        return h * gain.to(h.dtype) + bias.to(h.dtype)


class Conditioning(nn.Module):
    """The FiLM layers of a model, by site name, plus a per-β offset of the likelihood's log γ.
    (The range is checked by ModelConfig.)"""

    def __init__(self, beta_min: float, beta_max: float, knots: int, sites: dict[str, int]):
        super().__init__()
        self.log_range, self.knots = (math.log(beta_min), math.log(beta_max)), knots
        self.film = nn.ModuleDict({name: FiLM(channels, knots) for name, channels in sites.items()})
        self.log_gamma = nn.Parameter(torch.zeros(knots))

    def weights(self, beta: Tensor) -> Tensor:
        """(B, K) float32 hat-function weights of β (B,) over the knots (two non-zero entries summing to 1)."""
        lo, hi = self.log_range
        pos = ((beta.float().log() - lo) / (hi - lo) * (self.knots - 1)).clamp(0, self.knots - 1)
        grid = torch.arange(self.knots, device=beta.device, dtype=torch.float32)
        return (1 - (pos[:, None] - grid).abs()).clamp(min=0)

    def modulate(self, site: str, h: Tensor, weights: Tensor) -> Tensor:
        return self.film[site](h, weights)

    def log_gamma_offset(self, weights: Tensor) -> Tensor:
        """(B,) offset of log γ for each image's β."""
        return weights @ self.log_gamma.float()
