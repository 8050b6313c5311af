"""The rate head: each level-1 dim's KL in bits, predicted from what the decoder knows (z2 and β).

The `sp-orc-predicted` coder (codec/layout.py) cuts level 1 into blocks of about equal information
and gives each dim bin bits by that information. The encoder knows every dim's KL, the decoder does
not; instead of sending the layout as side information (~5 bits a block), both sides compute it
from this head's prediction. A wrong prediction costs rate or fidelity, never correctness.

    d = h_s(z2, β)                      the level-2 decoder's output, the level-1 prior's input
    KL_d ≈ softplus(net([d, log2 β]))   3×3 conv → 3×3 conv → 1×1 conv, leaky ReLUs between

Both sides must get the same layout, bit for bit, on any device. The head therefore runs the model's
level-2 decoder and itself in float64 (`predict_bits`), with the β conditioning computed in float64
too, from the coded z2 (the same floats on every device): devices and thread counts then differ only
by float64 rounding, ~1e-13 bits, and codec/layout.py flags the few values near a rounding edge.
Training runs the same networks in float32 (scripts/train_rate_head.py).
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LOG_BETA_SCALE = 4.0  # log2 β enters the head divided by this


def knot_weights(model, beta: float | None, batch: int, dtype: torch.dtype, device) -> Tensor | None:
    """models/conditioning.py's (B, K) knot weights of β, computed in `dtype` (None: a fixed-β model)."""
    cond = model.conditioning
    if cond is None:
        return None
    lo, hi = cond.log_range
    pos = min(max((math.log(beta) - lo) / (hi - lo) * (cond.knots - 1), 0.0), cond.knots - 1.0)
    grid = torch.arange(cond.knots, dtype=dtype, device=device)
    return (1 - (pos - grid).abs()).clamp(min=0).expand(batch, cond.knots)


def decoder_features(model, z2: Tensor, beta: float | None, dtype: torch.dtype = torch.float64) -> Tensor:
    """The PLN's level-2 decoder output d = h_s(z2) (with its β conditioning), in `dtype`:
    the same layers as model.prior(1, ...), the weights cast to `dtype`."""
    h = z2.to(dtype)
    w = knot_weights(model, beta, h.shape[0], dtype, h.device)
    for i, layer in enumerate(model.h_s):
        if layer.igdn is not None:
            raise ValueError("the rate head needs a level-2 decoder without GDN")
        if layer.leaky_slope is not None:
            h = F.leaky_relu(h, layer.leaky_slope)
        conv = layer.conv
        weight, bias = conv.weight.to(dtype), conv.bias.to(dtype)
        if isinstance(conv, nn.ConvTranspose2d):
            h = F.conv_transpose2d(h, weight, bias, conv.stride, conv.padding, conv.output_padding)
        else:
            h = F.conv2d(h, weight, bias, conv.stride, conv.padding)
        if w is not None:
            film = model.conditioning.film[f"h_s{i}"]
            gain = (w @ film.log_gain.to(dtype)).exp()
            h = h * gain[:, :, None, None] + (w @ film.bias.to(dtype))[:, :, None, None]
    return h


class RateHead(nn.Module):
    """Predicted level-1 KL bits per dim from the level-2 decoder's features and log2 β."""

    def __init__(self, features: int, latents: int, channels: int = 64, leaky_slope: float = 0.1):
        super().__init__()
        self.features, self.latents, self.channels, self.leaky_slope = features, latents, channels, leaky_slope
        self.conv1 = nn.Conv2d(features + 1, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.out = nn.Conv2d(channels, latents, 1)
        self.meta: dict = {}  # its training record, kept in the model file

    def config(self) -> dict:
        return {
            "features": self.features,
            "latents": self.latents,
            "channels": self.channels,
            "leaky_slope": self.leaky_slope,
        }

    def forward(self, d: Tensor, beta: float | None) -> Tensor:
        """(B, latents, h, w) predicted KL bits (≥ 0) from d (B, features, h, w), in d's dtype."""
        log_beta = 0.0 if beta is None else math.log2(beta) / LOG_BETA_SCALE
        x = torch.cat([F.leaky_relu(d, self.leaky_slope), d.new_full((d.shape[0], 1, *d.shape[2:]), log_beta)], 1)
        x = F.leaky_relu(self._conv(self.conv1, x), self.leaky_slope)
        x = F.leaky_relu(self._conv(self.conv2, x), self.leaky_slope)
        return F.softplus(self._conv(self.out, x))

    @staticmethod
    def _conv(conv: nn.Conv2d, x: Tensor) -> Tensor:
        return F.conv2d(x, conv.weight.to(x.dtype), conv.bias.to(x.dtype), padding=conv.padding)


@torch.no_grad()
def predict_bits(model, z2: Tensor, beta: float | None) -> Tensor:
    """float64 (B, latents, h, w): the model's rate head on the coded z2, as both sides compute it."""
    if model.rate_head is None:
        raise ValueError("this model has no rate head (scripts/train_rate_head.py adds one)")
    return model.rate_head(decoder_features(model, z2, beta, torch.float64), beta)
