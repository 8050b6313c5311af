"""Distortion of 8-bit reconstructions: PSNR and MS-SSIM, defined as CompressAI's tools define them."""

import math

import numpy as np


_CHUNK = 1 << 22  # samples per step of psnr: float64 copies of a whole 50 Mpx image would take 1.2 GB each


def psnr(a: np.ndarray, b: np.ndarray, max_val: float = 255.0) -> float:
    """PSNR in dB over all samples of two 8-bit images (inf when identical), in chunks of constant memory
    (for 8-bit images the squared error sums exactly, in any order)."""
    if a.shape != b.shape:
        raise ValueError(f"images of different shapes: {a.shape} and {b.shape}")
    a, b = a.reshape(-1), b.reshape(-1)
    sse = 0.0
    for i in range(0, a.size, _CHUNK):
        d = a[i : i + _CHUNK].astype(np.float64) - b[i : i + _CHUNK]
        sse += float(d @ d)
    mse = sse / max(a.size, 1)
    return math.inf if mse == 0 else 10.0 * math.log10(max_val**2 / mse)


def ms_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """MS-SSIM of two (H, W, 3) uint8 images (pytorch_msssim, data_range=255).

    pytorch_msssim needs both sides > 160 px; smaller images give NaN, not an error.
    """
    if min(a.shape[:2]) <= 160:
        return math.nan
    import torch
    from pytorch_msssim import ms_ssim as _ms_ssim

    def t(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.array(x, dtype=np.float32)).permute(2, 0, 1)[None]  # (1,3,H,W)

    with torch.no_grad():
        return float(_ms_ssim(t(a), t(b), data_range=255.0).item())


def msssim_to_db(x: float) -> float:
    """MS-SSIM → dB: −10·log10(1 − x) (inf at x = 1, NaN for NaN)."""
    if x is None or not math.isfinite(x):
        return math.nan
    return math.inf if x >= 1.0 else -10.0 * math.log10(1.0 - x)
