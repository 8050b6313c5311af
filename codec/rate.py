"""Rate control for variable-rate models: named quality levels, and the β that hits a target bpp.

    quality 1 … 8    β spread evenly in log β over the model's range, from beta_max (smallest files)
                     down to beta_min (largest)
    target bpp       regula falsi over the header's β grid on the predicted file size
                     bits(β) ≈ c(KL) · KL_bits(β) + header bits, KL from the networks alone (posterior means,
                     no coder) and c the coder's measured bits per KL bit at that rate; then the file is
                     coded; if it misses by more than the tolerance, c is scaled to the file just written
                     and the search repeats (at most `attempts` codes)

A fixed-β model has one rate per image; these need a variable-rate model (ModelConfig.beta_knots).
"""

import math
from collections.abc import Callable

import numpy as np
import torch

from codec import tiling
from codec.bitstream import beta_from_code, beta_to_code
from models.distributions import gaussian_kl

QUALITY_LEVELS = 8
DEFAULT_QUALITY = 4
BPP_TOLERANCE = 0.03  # relative
HEADER_BITS = 8 * 60  # container + section headers of a two-level file, roughly
# A coder's section bits per KL bit against the KL in bits per pixel: the search's first guess, before a
# coded file calibrates it. Means over the 24 Kodak images at the eight qualities with the default model
# ((file bits - HEADER_BITS) / KL bits; results/kodak/pln-vbr-<coder>.json): few bits a block cost more
# than their KL at low rates, and sp-orc-predicted's blocks carry more index bits at high rates.
CODER_OVERHEAD = {
    "thesis": ((0.051, 1.155), (0.121, 1.076), (0.236, 1.052), (0.368, 1.044), (0.633, 1.036), (0.93, 1.033)),
    "fast": ((0.052, 1.172), (0.122, 1.087), (0.237, 1.058), (0.37, 1.048), (0.635, 1.039), (0.93, 1.035)),
    "sp-orc-predicted": (
        (0.051, 1.078),
        (0.121, 1.010),
        (0.235, 1.038),
        (0.368, 1.076),
        (0.505, 1.092),
        (0.633, 1.119),
        (0.794, 1.116),
        (0.929, 1.127),
    ),
}
OTHER_CODER_OVERHEAD = 1.05  # coders without a table: the greedy walk's 1.03-1.07


def quality_beta(quality: int, beta_range: tuple[float, float]) -> float:
    """β of quality level 1 … QUALITY_LEVELS (lower = smaller files)."""
    if not 1 <= quality <= QUALITY_LEVELS:
        raise ValueError(f"quality must be 1 to {QUALITY_LEVELS}, got {quality}")
    lo, hi = beta_range
    return hi * (lo / hi) ** ((quality - 1) / (QUALITY_LEVELS - 1))


def coder_overhead(coder: str | None, kl_bpp: float) -> float:
    """Section bits per KL bit that `coder` is expected to write at `kl_bpp` KL bits per pixel:
    CODER_OVERHEAD's table, linear in log KL between its points and flat beyond its ends."""
    table = CODER_OVERHEAD.get(coder)
    if table is None:
        return OTHER_CODER_OVERHEAD
    rates, overheads = zip(*table)
    return float(np.interp(math.log(max(kl_bpp, 1e-9)), np.log(rates), overheads))


@torch.inference_mode()
def kl_bits(model, x: torch.Tensor, beta: float, tile: int = tiling.DEFAULT_TILE) -> float:
    """Total KL in bits of an image (1, 3, H, W) (uint8, or float in [0, 1]) at β, each level given the
    mean of the one above; an image larger than a tile is walked in tiles, as the encoder does."""
    total = 0.0

    def mean(level: int, index: int, q: tuple, p: tuple) -> torch.Tensor:
        nonlocal total
        total += float(gaussian_kl(*q, *p).double().sum())
        return q[0]

    grid = tiling.TileGrid.for_image(model, *x.shape[-2:], tile)
    tiling.encode_walk(model, x, grid, mean, beta)
    return total / math.log(2)


class BetaSearch:
    """The β on the header's grid whose predicted file size overhead(KL bpp)·KL + header is nearest a target.

    log(predicted bits) falls smoothly as log β grows, so regula falsi (Illinois) over the integer β codes
    brackets the target in a handful of network passes where bisection over the ~1,800 codes of a
    7-octave range takes 11. KL values are cached: a recalibrated search reuses them."""

    def __init__(self, model, x: torch.Tensor, tile: int = tiling.DEFAULT_TILE):
        self.model, self.x, self.tile = model, x, tile
        self.pixels = x.shape[-2] * x.shape[-1]
        self.lo, self.hi = (beta_to_code(b) for b in model.beta_range)
        self.kl: dict[int, float] = {}

    def kl_at(self, code: int) -> float:
        if code not in self.kl:
            self.kl[code] = kl_bits(self.model, self.x, beta_from_code(code), self.tile)
        return self.kl[code]

    def __call__(
        self,
        target_bits: float,
        overhead: Callable[[float], float] = lambda kl_bpp: OTHER_CODER_OVERHEAD,
        header_bits: float = HEADER_BITS,
    ) -> tuple[float, float]:
        """(β, its KL bits) for section bits overhead(KL bpp) · KL; the end of the model's range when the
        target lies beyond it."""

        def miss(code: int) -> float:  # > 0: the file would be too big
            kl = self.kl_at(code)
            return math.log(max(overhead(kl / self.pixels) * kl + header_bits, 1.0) / target_bits)

        a, b = self.lo, self.hi
        fa, fb = miss(a), miss(b)
        if fa <= 0 or fb >= 0:  # even the largest / smallest files miss the target
            best = a if fa <= 0 else b
            return beta_from_code(best), self.kl_at(best)
        side = 0
        while b - a > 1:
            guess = a + (b - a) * fa / (fa - fb)
            code = min(b - 1, max(a + 1, round(guess)))
            fc = miss(code)
            if abs(fc) < 1e-3:
                a = b = code
                break
            if fc > 0:
                a, fa = code, fc
                if side == 1:
                    fb /= 2  # Illinois: halve the end that stayed, so the bracket keeps shrinking
                side = 1
            else:
                b, fb = code, fc
                if side == -1:
                    fa /= 2
                side = -1
        best = min({a, b}, key=lambda c: abs(miss(c)))
        return beta_from_code(best), self.kl_at(best)


def compress_to_bpp(
    compress,
    model,
    x: torch.Tensor,
    target_bpp: float,
    attempts: int = 3,
    tolerance: float = BPP_TOLERANCE,
    tile: int = tiling.DEFAULT_TILE,
    coder: str | None = None,
) -> tuple[bytes, object, dict]:
    """Code `x` at the β whose file lands nearest `target_bpp`.

    `compress(beta)` codes the image and returns (data, x_hat, stats) as codec.api.compress_image does;
    `tile` is the tile size it codes with (the KL is predicted over the same tiles) and `coder` the preset
    it codes with (its CODER_OVERHEAD table is the first guess of the file size).
    Returns the closest of the attempts, its stats with "target_bpp" and "attempts" added; whether it is
    within `tolerance` is for the caller to say.
    """
    if not (math.isfinite(target_bpp) and target_bpp > 0):
        raise ValueError(f"target bpp must be a positive number, got {target_bpp}")
    target_bits = target_bpp * x.shape[-2] * x.shape[-1]
    search = BetaSearch(model, x, tile)
    scale, header_bits, tried, best = 1.0, HEADER_BITS, set(), None
    for _ in range(attempts):
        beta, predicted_kl = search(target_bits, lambda kl_bpp: scale * coder_overhead(coder, kl_bpp), header_bits)
        if beta in tried:  # the search cannot do better than a file already written
            break
        tried.add(beta)
        data, x_hat, stats = compress(beta)
        error = abs(stats["bpp"] / target_bpp - 1)
        if best is None or error < best[0]:
            best = (error, data, x_hat, stats)
        if error <= tolerance:
            break
        # calibrate on this file: its container bits exactly, the coder's table scaled to its sections'
        # bits per predicted KL bit
        sections_bits = sum(level["bits"] for level in stats["levels"])
        header_bits = 8 * len(data) - sections_bits
        kl_bpp = predicted_kl / search.pixels
        scale = sections_bits / max(predicted_kl, 1.0) / coder_overhead(coder, kl_bpp)
    _, data, x_hat, stats = best
    return data, x_hat, {**stats, "target_bpp": target_bpp, "attempts": len(tried)}
