"""The lossless head: a discretised logistic per subpixel of the 8-bit image, given the lossy decode.

A lossless file is a lossy one plus the image coded under this head (codec/lossless.py). The lossy
decode x̂ (uint8, what the .rec decodes to) is known to both sides; the image x is coded in six
stages, so that each subpixel is predicted from x̂ and from the residuals r = x − x̂ already coded:

    stage 0..2: the red, green, blue subpixels of the "anchor" pixels ((row + col) even)
    stage 3..5: the red, green, blue subpixels of the other pixels

Stage s sees x̂, the residuals of stages < s (0 elsewhere), which pixels are anchors and log2 β, and
gives (μ, log s) of a logistic for its own subpixels: later stages use the neighbours' and the
other channels' residuals, which carry most of what x̂ leaves out. Each stage is a 4-layer 3×3 CNN
(receptive radius 3 px), so the image can be run in strips with a 4-px halo (`STRIP_HALO`).

    P(x) = σ((x + ½ − μ) / s) − σ((x − ½ − μ) / s)     (for training; the coder uses a grid of μ and s)

The head also carries the coder's CDF tables (`cdfs`, built by codec/lossless.py from the grid), so
every platform codes with the same integers.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

STAGES = 6  # 2 pixel phases x 3 channels
STRIP_HALO = 4  # > the receptive radius of a stage network (4 layers, 3 of them 3x3)
RESIDUAL_SCALE = 32.0  # residuals and x̂ enter the networks divided by this


def stage_mask(stage: int, height: int, width: int, device=None) -> Tensor:
    """(H, W) bool: the pixels of stage `stage` (anchors for stages 0-2, the others for 3-5)."""
    rows = torch.arange(height, device=device)[:, None]
    cols = torch.arange(width, device=device)[None, :]
    anchor = (rows + cols) % 2 == 0
    return anchor if stage < 3 else ~anchor


def known_before(stage: int, height: int, width: int, device=None) -> Tensor:
    """(3, H, W) bool: the subpixels coded before stage `stage`."""
    known = torch.zeros(3, height, width, dtype=torch.bool, device=device)
    for s in range(stage):
        known[s % 3] |= stage_mask(s, height, width, device)
    return known


class LosslessHead(nn.Module):
    def __init__(self, channels: int = 24, log_scale_bias: float = 1.5):
        super().__init__()
        self.channels = channels
        # inputs: x̂ (3), the known residuals (3), the anchor map (1), log2 β (1)
        self.stages = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(8, channels, 3, padding=1),
                nn.LeakyReLU(0.1),
                nn.Conv2d(channels, channels, 3, padding=1),
                nn.LeakyReLU(0.1),
                nn.Conv2d(channels, channels, 3, padding=1),
                nn.LeakyReLU(0.1),
                nn.Conv2d(channels, 2, 1),
            )
            for _ in range(STAGES)
        )
        for net in self.stages:  # start as "μ = x̂, s = e^bias": training moves away from a sane coder
            nn.init.zeros_(net[-1].weight)
            nn.init.zeros_(net[-1].bias)
        self.log_scale_bias = log_scale_bias
        self.meta: dict = {}  # its training record, kept in the model file
        self.register_buffer("cdfs", torch.zeros(0, dtype=torch.int32), persistent=True)

    def config(self) -> dict:
        return {"channels": self.channels, "log_scale_bias": self.log_scale_bias}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self.cdfs = torch.empty_like(state_dict["cdfs"])  # the tables' shape comes from the file
        return super().load_state_dict(state_dict, strict, assign)

    def stage_params(self, stage: int, x_hat: Tensor, residual: Tensor, beta: float | Tensor | None) -> Tensor:
        """(B, 2, H, W) float32 (μ in 8-bit units, log s) of stage `stage` at every pixel.

        x_hat: (B, 3, H, W) the lossy decode, 0..255 (any dtype); residual: (B, 3, H, W) x − x̂,
        already zero outside known_before(stage); beta: the β x̂ was decoded at (None: fixed-β model)."""
        batch, _, height, width = x_hat.shape
        x_hat = x_hat.float()
        anchor = stage_mask(0, height, width, x_hat.device).float().expand(batch, 1, height, width)
        log_beta = torch.zeros(batch, 1, 1, 1, device=x_hat.device)
        if beta is not None:
            log_beta = torch.as_tensor(beta, dtype=torch.float32, device=x_hat.device).log2().reshape(-1, 1, 1, 1)
        inputs = torch.cat(
            [
                (x_hat - 127.5) / RESIDUAL_SCALE,
                residual.float() / RESIDUAL_SCALE,
                anchor,
                log_beta.expand(batch, 1, height, width) / 4,
            ],
            dim=1,
        )
        out = self.stages[stage](inputs).float()
        c = stage % 3
        loc = x_hat[:, c : c + 1] + RESIDUAL_SCALE * out[:, :1]
        return torch.cat([loc, out[:, 1:] + self.log_scale_bias], dim=1)

    def nll_bits(self, x: Tensor, x_hat: Tensor, beta: float | Tensor | None = None) -> Tensor:
        """(B,) bits of the 8-bit images x (B, 3, H, W, 0..255) under the head's continuous logistics
        (the training loss; the coder's grid costs a little more), all six stages."""
        batch, _, height, width = x.shape
        x, x_hat = x.float(), x_hat.float()
        residual = x - x_hat
        total = torch.zeros(batch, device=x.device)
        for stage in range(STAGES):
            known = known_before(stage, height, width, x.device)
            params = self.stage_params(stage, x_hat, residual * known, beta)
            c = stage % 3
            bits = logistic_bits(x[:, c], params[:, 0], params[:, 1])
            total = total + (bits * stage_mask(stage, height, width, x.device)).flatten(1).sum(1)
        return total


def logistic_bits(x: Tensor, loc: Tensor, log_scale: Tensor) -> Tensor:
    """−log2 of the mass a logistic(loc, e^log_scale) puts on [x − ½, x + ½], elementwise (stable)."""
    inv = torch.exp(-log_scale)
    upper = (x + 0.5 - loc) * inv
    lower = (x - 0.5 - loc) * inv
    # σ(a) − σ(b) = σ(a)·σ(−b)·(1 − e^(b − a)) for a > b: no cancellation in either tail
    log_mass = F.logsigmoid(upper) + F.logsigmoid(-lower) + torch.log(-torch.expm1(lower - upper))
    return -log_mass / math.log(2.0)
