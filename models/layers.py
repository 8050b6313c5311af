"""Convolution blocks of the thesis networks: mirror-padded strided convs with GDN, and their transposes."""

import warnings

import torch.nn.functional as F
from torch import Tensor, nn

with warnings.catch_warnings():  # compressai 1.2.8 calls torch.jit.script at import (deprecated in torch 2.14)
    warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", FutureWarning)
    from compressai.layers import GDN


class ConvDS(nn.Module):
    """Encoder block: mirror pad, k×k conv with stride, optional GDN, optional leaky ReLU.

    Mirrors the thesis code's "SAME_MIRRORED" ConvDS: reflect padding of (k-1)/2, so the output size is
    ceil(n / stride). Inputs smaller than the padding (only possible for tiny images) fall back to
    edge replication, since reflection needs at least pad+1 pixels.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel: int = 5,
        stride: int = 2,
        gdn: bool = False,
        leaky_slope: float | None = None,
    ):
        super().__init__()
        self.pad = (kernel - 1) // 2
        self.conv = nn.Conv2d(in_ch, out_ch, kernel, stride)
        self.gdn = GDN(out_ch) if gdn else None
        self.leaky_slope = leaky_slope

    def forward(self, x: Tensor) -> Tensor:
        p = self.pad
        mode = "reflect" if min(x.shape[-2:]) > p else "replicate"
        x = self.conv(F.pad(x, (p, p, p, p), mode=mode))
        if self.gdn is not None:
            x = self.gdn(x)
        if self.leaky_slope is not None:
            x = F.leaky_relu(x, self.leaky_slope)
        return x


class DeconvUS(nn.Module):
    """Decoder block, the transpose of a ConvDS: optional IGDN, optional leaky ReLU, then a k×k
    transposed conv that multiplies the size by `stride` exactly (stride 1 is a plain same conv)."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel: int = 5,
        stride: int = 2,
        igdn: bool = False,
        leaky_slope: float | None = None,
    ):
        super().__init__()
        self.igdn = GDN(in_ch, inverse=True) if igdn else None
        self.leaky_slope = leaky_slope
        pad = (kernel - 1) // 2
        if stride == 1:
            self.conv = nn.Conv2d(in_ch, out_ch, kernel, 1, pad)
        else:
            self.conv = nn.ConvTranspose2d(in_ch, out_ch, kernel, stride, pad, output_padding=stride - 1)

    def forward(self, x: Tensor) -> Tensor:
        if self.igdn is not None:
            x = self.igdn(x)
        if self.leaky_slope is not None:
            x = F.leaky_relu(x, self.leaky_slope)
        return self.conv(x)


def analysis_body(channels: int) -> nn.ModuleList:
    """e1–e3 of the thesis level-1 encoder: three 5×5 stride-2 convs with GDN (3 → N → N → N)."""
    return nn.ModuleList(
        [ConvDS(3, channels, gdn=True), ConvDS(channels, channels, gdn=True), ConvDS(channels, channels, gdn=True)]
    )


def synthesis(latents: int, channels: int) -> nn.Sequential:
    """Level-1 decoder: F → N (linear) → IGDN → N → IGDN → N → IGDN → 3, all ×2 upsampling; logits out."""
    return nn.Sequential(
        DeconvUS(latents, channels),
        DeconvUS(channels, channels, igdn=True),
        DeconvUS(channels, channels, igdn=True),
        DeconvUS(channels, 3, igdn=True),
    )
