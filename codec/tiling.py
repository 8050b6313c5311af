"""Tiled coding: the top-down REC walk and the synthesis over tiles, so memory follows the tile, not the image.

Geometry. The image is padded (model.pad) to PH × PW, multiples of the model's downsampling factor f.
An image of at most tile² padded pixels is one tile: the whole image, coded exactly as without tiling.
A larger one is cut into tiles of tile × tile padded pixels (tile a multiple of f; the last row and
column of tiles are smaller), numbered in raster order. Every network runs on a tile's *context*, the
tile grown by a halo on each side and clipped to the image, and its output is cropped back to the tile:

    analysis    feats of a tile  <- pixels in tile ± model.analysis_context      (encoder only)
    prior       p(z_l | z_l+1)   <- the CODED z_l+1 in tile ± prior_context        (header field)
    synthesis   x̂ of a tile      <- the CODED z1 in tile ± synthesis_context       (header field)

A halo at least as wide as the network's receptive radius makes the cropped output the same function
of its inputs as the whole-image network's (models/base.py states each radius), so tiles meet without
seams and a tiled file is coded as the whole image would be, up to float rounding and the coder's own
grouping. The prior and synthesis halos are in the header because the decoder must repeat them.

Order. Level L for every tile, then level L-1 for every tile, and so on: a tile's level-l prior needs
the coded level-(l+1) latents around it. Only the coded latents are kept for the whole image (2 bytes
a pixel for the thesis-size PLN's z1, float32); everything else lives for one tile. Each tile's section
of a level is coded independently, with its own stream of the shared randomness (rng.tile_seed).
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from codec.image import to_uint8
from models import LatentVariableModel
from models.rate_head import predict_bits

DEFAULT_TILE = 1024  # padded pixels a side: the thesis-size PLN's analysis of a tile's context takes ~1 GB

Box = tuple[int, int, int, int]  # (top, bottom, left, right) in padded pixels, bottom/right exclusive


@dataclass(frozen=True)
class TileGrid:
    """Tiles of `tile` padded pixels over a padded image of `height` × `width` (tile=0: one tile)."""

    height: int  # padded
    width: int
    tile: int = 0

    @classmethod
    def for_image(cls, model: LatentVariableModel, height: int, width: int, tile: int) -> "TileGrid":
        """The grid the encoder uses: one tile when the padded image has at most tile² pixels (or
        tile=0), else tiles of `tile` pixels, which must be a multiple of model.downsampling_factor."""
        ph, pw = model.pad_size(height, width)
        if tile and ph * pw > tile * tile:
            check_tile(model, tile)
            return cls(ph, pw, tile)
        return cls(ph, pw)

    @property
    def rows(self) -> int:
        return math.ceil(self.height / self.tile) if self.tile else 1

    @property
    def cols(self) -> int:
        return math.ceil(self.width / self.tile) if self.tile else 1

    def __len__(self) -> int:
        return self.rows * self.cols

    def box(self, index: int) -> Box:
        if not self.tile:
            return 0, self.height, 0, self.width
        r, c = divmod(index, self.cols)
        t = self.tile
        return r * t, min((r + 1) * t, self.height), c * t, min((c + 1) * t, self.width)

    def context(self, index: int, halo: int) -> Box:
        top, bottom, left, right = self.box(index)
        return max(0, top - halo), min(self.height, bottom + halo), max(0, left - halo), min(self.width, right + halo)

    @property
    def probe(self) -> int:
        """The tile nearest the centre: where the encoder makes the per-level choices (shard decay)."""
        return (self.rows // 2) * self.cols + self.cols // 2


def check_tile(model: LatentVariableModel, tile: int) -> None:
    f = model.downsampling_factor
    if tile < 2 * f or tile % f:
        raise ValueError(f"the tile size must be a multiple of {f} and at least {2 * f} for this model, got {tile}")


def crop(t: torch.Tensor, outer: Box, inner: Box) -> torch.Tensor:
    """The part of `t`, a map over the padded-pixel box `outer` at any stride, that covers `inner`.
    The whole map is returned as it is (not a copy), so a one-tile walk computes what it always did."""
    if inner == outer:
        return t
    stride = (outer[1] - outer[0]) // t.shape[-2]
    top, bottom, left, right = ((a - b) // stride for a, b in zip(inner, (outer[0], outer[0], outer[2], outer[2])))
    return t[..., top:bottom, left:right]


def padded_pixels(model: LatentVariableModel, x: torch.Tensor, grid: TileGrid, box: Box) -> torch.Tensor:
    """The float (1, 3, h, w) pixels of `box` in the padded image (bottom/right edge replication, as
    model.pad); `x` is the (1, 3, H, W) image, uint8 (converted per box, to keep memory per tile) or float."""
    if box == (0, grid.height, 0, grid.width):
        return model.pad(x.float() / 255.0 if x.dtype == torch.uint8 else x)
    height, width = x.shape[-2:]
    rows = torch.arange(box[0], box[1], device=x.device).clamp(max=height - 1)
    cols = torch.arange(box[2], box[3], device=x.device).clamp(max=width - 1)
    part = x[..., rows[:, None], cols[None, :]]
    return part.float() / 255.0 if x.dtype == torch.uint8 else part


Draw = Callable[..., torch.Tensor]  # (level, tile, p_loc, p_scale[, predicted_bits]) -> z
PosteriorDraw = Callable[..., torch.Tensor]  # (level, tile, (q_loc, q_scale), (p_loc, p_scale)[, predicted_bits]) -> z


def encode_walk(
    model: LatentVariableModel, x: torch.Tensor, grid: TileGrid, draw: PosteriorDraw, beta, predict_rate: bool = False
) -> torch.Tensor:
    """The encoder's walk: each tile's analysis features (from its context, cropped to the tile; kept
    until the walk ends, 4 bytes a pixel for the thesis-size PLN), then top_down with
    z = draw(level, tile, (q_loc, q_scale), (p_loc, p_scale)), the posterior computed from the prior.
    `x` is the (1, 3, H, W) image, uint8 or float. The priors use model.prior_context (what a tiled
    header records; one tile's context is the whole image whatever the halo). With `predict_rate`, draw
    also gets the rate head's predicted bits of level 1, as in top_down. Returns z1 of the whole padded
    image."""
    feats = []
    for index in range(len(grid)):
        ctx, box = grid.context(index, model.analysis_context), grid.box(index)
        f = model.bottom_up(padded_pixels(model, x, grid, ctx), beta)
        feats.append(f if len(grid) == 1 else {k: crop(v, ctx, box).clone() for k, v in f.items()})

    def posterior_draw(level: int, index: int, p_loc: torch.Tensor, p_scale: torch.Tensor, *predicted) -> torch.Tensor:
        q = model.posterior(level, feats[index], p_loc, p_scale)
        return draw(level, index, q, (p_loc, p_scale), *predicted)

    z1 = top_down(model, grid, posterior_draw, beta, model.prior_context, predict_rate)
    feats.clear()  # freed before the synthesis, the peak of memory
    return z1


def top_down(
    model: LatentVariableModel, grid: TileGrid, draw: Draw, beta, prior_context: int, predict_rate: bool = False
) -> torch.Tensor:
    """The top-down walk over tiles: for each level from the top, for each tile (the probe tile
    first), the prior from the coded latents above in the tile's context, then
    z = draw(level, tile, p_loc, p_scale). With `predict_rate`, level 1's draw is
    draw(1, tile, p_loc, p_scale, predicted_bits): the model's rate head on the same context
    (models/rate_head.py; it reaches as far as the prior's networks). Returns z1 of the whole padded
    image, (1, C, PH/s, PW/s)."""
    whole = (0, grid.height, 0, grid.width)
    z_above = None
    for level in range(model.num_levels, 0, -1):
        z = None
        for index in [grid.probe, *(i for i in range(len(grid)) if i != grid.probe)]:
            box, extra = grid.box(index), ()
            if z_above is None:
                p_loc, p_scale = model.prior(level, None, _latent_shape(model, level, box), beta)
            else:
                ctx = grid.context(index, prior_context)
                above = crop(z_above, whole, ctx)
                p_loc, p_scale = model.prior(level, above, _latent_shape(model, level, ctx), beta)
                p_loc, p_scale = crop(p_loc, ctx, box), crop(p_scale, ctx, box)
                if predict_rate:
                    extra = (crop(predict_bits(model, above, beta), ctx, box),)
            z_tile = draw(level, index, p_loc, p_scale, *extra)
            if len(grid) == 1:
                z = z_tile
            else:
                if z is None:
                    z = z_tile.new_empty(_latent_shape(model, level, whole))
                crop(z, whole, box).copy_(z_tile)
        z_above = z
    return z_above


def _latent_shape(model: LatentVariableModel, level: int, box: Box) -> tuple[int, int, int, int]:
    """(1, C, h, w) of level `level`'s latents over a box of padded pixels."""
    stride = model.latent_stride(level)
    return 1, model.latent_shape(level, 1, 1)[0], (box[1] - box[0]) // stride, (box[3] - box[2]) // stride


def synthesize(
    model: LatentVariableModel, grid: TileGrid, z1: torch.Tensor, beta, synthesis_context: int, height: int, width: int
) -> np.ndarray:
    """The (height, width, 3) uint8 image of the coded z1, synthesised tile by tile from each tile's
    context and cropped to the tile (one tile: the whole image at once)."""
    if len(grid) == 1:
        return to_uint8(model.synthesize(z1, beta)[..., :height, :width])
    whole = (0, grid.height, 0, grid.width)
    out = np.empty((height, width, 3), dtype=np.uint8)
    for index in range(len(grid)):
        box = grid.box(index)
        ctx = grid.context(index, synthesis_context)
        x_hat = crop(model.synthesize(crop(z1, whole, ctx), beta), ctx, box)
        bottom, right = min(box[1], height), min(box[3], width)
        out[box[0] : bottom, box[2] : right] = to_uint8(x_hat[..., : bottom - box[0], : right - box[2]])
    return out
