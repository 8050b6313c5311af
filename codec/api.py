"""Image <-> .rec bytes: the top-down REC flow over a model's latent levels.

    encoder: feats = bottom_up(pad(x)); for level L..1: prior(level, z_above) -> posterior
             -> encode_level -> the CODED sample z_level (what the decoder will rebuild)
    decoder: for level L..1: prior(level, z_above) -> decode_level -> z_level
    both:    x_hat = synthesize(z1)[..., :H, :W] -> clamp -> 8-bit
    lossless files: then the image itself, coded under the model's lossless head given x_hat
             (codec/lossless.py), is the last section; the decoder returns it instead of x_hat

For the PLN the level-1 prior AND posterior are computed from the coded z2, exactly as the
decoder sees it. The encoder returns the 8-bit image its file decodes to; on the same device
(and torch build) the decoder reproduces it bit for bit. On another device the networks may
differ by rounding: the decoded image may then differ slightly, but the file cannot be
misparsed, because the coder reads indices and side information from the bytes and the
latent shape alone and uses the prior only to scale the decoded candidates.

Memory: an image larger than a tile (`tile`, default tiling.DEFAULT_TILE) is coded tile by tile
(codec/tiling.py), so the networks' memory follows the tile, not the image; what grows with the image
is its pixels and its coded latents (about 2 bytes a pixel for the thesis-size PLN). `max_pixels`
(default MAX_PIXELS, 120 Mpx) is a guard against absurd inputs, checked before anything is allocated.
"""

import time
from collections.abc import Callable

import numpy as np
import torch

from codec import lossless as pixel_layer
from codec import tiling
from codec.bitstream import RecFormatError, RecHeader, beta_from_code, beta_to_code, pack_rec, unpack_rec
from codec.entropy import RecDecodeError
from codec.image import image_pixels
from codec.header_params import params_from_header, params_to_bytes
from codec.level import decode_level, encode_level
from codec.params import PRESETS, CoderParams
from codec.rate import DEFAULT_QUALITY, quality_beta
from codec.rng import tile_seed
from codec.store import ModelRef
from models import LatentVariableModel

MAX_PIXELS = 120_000_000  # a guard (module docstring); image.MAX_DECODE_PIXELS is the image loader's


class ImageTooLargeError(ValueError):
    pass


def default_coder(model: LatentVariableModel) -> str:
    """The preset a file is coded with when none is asked for: `sp-orc-predicted` for a PLN that carries a
    rate head (at equal rate its samples are closer to an exact posterior sample than `thesis`'s,
    docs/coder.md), else `thesis`."""
    return "sp-orc-predicted" if model.num_levels == 2 and model.rate_head is not None else "thesis"


def _coder(params: CoderParams | str) -> tuple[str, CoderParams]:
    if isinstance(params, str):
        return params, CoderParams.preset(params)
    names = [n for n in PRESETS if CoderParams.preset(n) == params]
    return (names[0] if names else "custom"), params


def _predicts_rate(model: LatentVariableModel, params: CoderParams) -> bool:
    """Whether level 1 is laid out by the model's rate head (sp-orc-predicted); ValueError if it
    should be and the model has none."""
    if params.level1.sampler != "sp-orc-predicted":
        return False
    if model.num_levels != 2 or model.rate_head is None:
        raise ValueError("the sp-orc-predicted coder needs a PLN model with a rate head (scripts/train_rate_head.py)")
    return True


def _check_size(height: int, width: int, max_pixels: int) -> None:
    if height * width > max_pixels:
        raise ImageTooLargeError(
            f"image is {width}x{height} = {height * width} pixels, above the "
            f"limit of {max_pixels} (raise max_pixels to code it)"
        )


def coding_beta(
    model: LatentVariableModel, beta: float | None = None, quality: int | None = None
) -> tuple[float | None, int | None]:
    """(β the networks run at, its header code) for a file; (None, None) for a fixed-β model.

    A variable-rate model codes at `beta`, else at the β of `quality` (default DEFAULT_QUALITY). The β is
    rounded to the header's grid (1/256 octave) first, so the decoder, which only sees the code,
    conditions on exactly the same number. ValueError for both settings at once, a β outside the
    model's range, or a fixed-β model given either."""
    if beta is not None and quality is not None:
        raise ValueError("give beta or quality, not both")
    if not model.variable_rate:
        if quality is not None:
            raise ValueError("this model was trained at a single β: quality levels need a variable-rate model")
        if beta is not None:
            raise ValueError(
                "this model was trained at a single β: β, quality and bpp targets need a variable-rate model"
            )
        return None, None
    lo, hi = model.beta_range
    if beta is None:
        beta = quality_beta(DEFAULT_QUALITY if quality is None else quality, (lo, hi))
    code = beta_to_code(beta)
    if not beta_to_code(lo) <= code <= beta_to_code(hi):
        raise ValueError(f"β = {beta:g} is outside this model's range {lo:g} to {hi:g}")
    return beta_from_code(code), code


def _deterministic(device: torch.device) -> None:
    if device.type == "cuda":  # same device => same bits: no autotuned conv algorithms
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


@torch.inference_mode()
def compress_image(
    model: LatentVariableModel,
    image: np.ndarray | torch.Tensor,
    *,
    model_ref: ModelRef,
    seed: int = 0,
    params: CoderParams | str | None = None,
    device: str | torch.device = "cpu",
    max_pixels: int = MAX_PIXELS,
    beta: float | None = None,
    quality: int | None = None,
    tile: int = tiling.DEFAULT_TILE,
    lossless: bool = False,
) -> tuple[bytes, np.ndarray, dict]:
    """Compress one image into .rec bytes (lossy, or with `lossless` the exact pixels).

    Args:
        model: a VAE (1 level) or PLN (2 levels); moved to `device`.
        image: (H, W, 3) uint8, or a (1, 3, H, W) tensor (uint8 or float in [0, 1]).
        model_ref: name + SHA-256 prefix of the model file, written into the header.
        seed: the file seed of the shared randomness, in [0, 2^64).
        params: a CoderParams or a preset name ("thesis", "fast", …); None: default_coder(model).
        beta: the rate setting of a variable-rate model (larger = smaller files), rounded to the
            header's 1/256-octave grid; must be None for a model trained at one β.
        quality: instead of beta, a quality level 1 (smallest files) to 8 (codec.rate.quality_beta);
            a variable-rate model given neither codes at codec.rate.DEFAULT_QUALITY.
        tile: an image of more than tile² padded pixels is coded in tiles of tile × tile pixels
            (codec/tiling.py; a multiple of the model's downsampling factor); 0 codes every image whole.
        lossless: after the latents, code the 8-bit image itself under the model's lossless head given
            the lossy decode (codec/lossless.py); needs a model file with a head and uint8 pixels.
    Returns:
        (data, x_hat, stats): the file bytes, the (H, W, 3) uint8 image they decode to, and
        {"height", "width", "bytes", "bpp" (8 * bytes / (H W), header included), "kl_bits",
        "kl_bpp", "levels" (the coder's per-level stats, summed over tiles), "tiles", "beta" (the
        coded β or None), "coder" (the header's preset name), "seconds", and for a lossless file
        "pixel_bytes" (its pixel layer)}.
    Raises:
        ImageTooLargeError: more than max_pixels pixels. ValueError: bad arguments.
    """
    t0 = time.perf_counter()
    device = torch.device(device)
    _deterministic(device)
    coder, params = _coder(default_coder(model) if params is None else params)
    if model.num_levels not in (1, 2):
        raise ValueError(f"models with {model.num_levels} levels are not supported")
    predict_rate = _predicts_rate(model, params)
    x = image_pixels(image).to(device)  # (1, 3, H, W)
    height, width = x.shape[-2:]
    _check_size(height, width, max_pixels)
    if lossless:
        if model.lossless_head is None:
            raise ValueError(f"model {model_ref.name} has no lossless head (scripts/train_lossless.py adds one)")
        if x.dtype != torch.uint8:
            raise ValueError("lossless coding needs 8-bit pixels: give a uint8 array or tensor")
        if model.variable_rate and beta is None and quality is None:
            quality = pixel_layer.DEFAULT_QUALITY
    beta, beta_code = coding_beta(model, beta, quality)
    model = model.to(device).eval()
    grid = tiling.TileGrid.for_image(model, height, width, tile)
    sections, levels = {}, {}

    def code(level: int, index: int, q: tuple, p: tuple, predicted_bits=None) -> torch.Tensor:
        nonlocal params
        # the CODED sample: the next level's prior and posterior are computed from it. The per-level
        # choices (shard decay, index bits) are made on the first tile coded, grid.probe, and kept for the rest.
        z, data, stats = encode_level(
            *q,
            *p,
            seed=tile_seed(seed, index),
            level=level,
            params=params,
            return_stats=True,
            choose=level not in levels,
            predicted_bits=predicted_bits,
        )
        if stats["chosen"]:  # the header carries the shard decay or index bits each level was coded with
            params = params.with_level(level, **stats["chosen"])
        sections[level, index] = data
        levels[level] = _add_stats(levels.get(level), stats)
        return z

    tiled = len(grid) > 1
    z = tiling.encode_walk(model, x, grid, code, beta, predict_rate)
    x_hat = tiling.synthesize(model, grid, z, beta, model.synthesis_context, height, width)
    pixels = []
    if lossless:
        original = x[0].permute(1, 2, 0).cpu().numpy()
        pixels = [pixel_layer.encode_pixels(model.lossless_head, original, x_hat, beta)]
        x_hat = original
    header = RecHeader(
        model_ref.name,
        model_ref.sha256,
        height,
        width,
        seed,
        coder,
        params_to_bytes(params, model.num_levels),
        beta_code=beta_code,
        **(_tiling_fields(model, grid) if tiled else {}),
        lossless=lossless,
    )
    data = pack_rec(header, [sections[key] for key in sorted(sections, key=lambda k: (-k[0], k[1]))] + pixels)
    levels = [levels[level] for level in sorted(levels, reverse=True)]
    kl_bits = sum(s["kl_bits"] for s in levels)
    stats = {
        "height": height,
        "width": width,
        "bytes": len(data),
        "bpp": 8 * len(data) / (height * width),
        "kl_bits": kl_bits,
        "kl_bpp": kl_bits / (height * width),
        "levels": levels,
        "tiles": len(grid),
        "beta": beta,
        "coder": coder,
        "seconds": time.perf_counter() - t0,
    }
    if lossless:
        stats["pixel_bytes"] = len(pixels[0])
    return data, x_hat, stats


def _tiling_fields(model: LatentVariableModel, grid: tiling.TileGrid) -> dict:
    return dict(tile=grid.tile, prior_context=model.prior_context, synthesis_context=model.synthesis_context)


def _add_stats(total: dict | None, stats: dict) -> dict:
    """One level's coder stats summed over its tiles (counts, bits, seconds; the rest as coded)."""
    if total is None:
        return dict(stats)
    summed = {k: total[k] + v for k, v in stats.items() if k not in ("level", "shard_decay") and _is_number(v)}
    return {**total, **summed}


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


Resolver = Callable[[RecHeader], LatentVariableModel]


@torch.inference_mode()
def decompress(
    data: bytes, resolve: Resolver, device: str | torch.device = "cpu", max_pixels: int = MAX_PIXELS
) -> tuple[np.ndarray, RecHeader]:
    """Decode .rec bytes into the (H, W, 3) uint8 image the encoder returned (a lossless file: the
    encoder's input).

    Args:
        resolve: header -> model (e.g. a ModelStore); raises ModelNotFoundError.
    Raises:
        RecFormatError: corrupt, truncated or unsupported data (the coder's errors are wrapped,
            naming the section). ModelNotFoundError: from `resolve`.
    """
    device = torch.device(device)
    _deterministic(device)
    header, sections = unpack_rec(data)
    if header.height * header.width > max_pixels:
        raise RecFormatError("height", f"{header.width}x{header.height} is above the limit of {max_pixels} pixels")
    model = resolve(header).to(device).eval()
    n_tiles = header.n_tiles
    if len(sections) != model.num_levels * n_tiles + header.lossless:
        raise RecFormatError("n_sections", f"{len(sections)} sections, but the model has {model.num_levels} levels")
    if header.lossless and model.lossless_head is None:
        raise RecFormatError("pixel layer", f"the file is lossless, but model {header.model_name} has no lossless head")
    params = params_from_header(header, model.num_levels)
    beta = _header_beta(header, model)
    height, width = header.height, header.width
    grid = _header_grid(header, model)

    def decode(level: int, index: int, p_loc: torch.Tensor, p_scale: torch.Tensor, predicted_bits=None) -> torch.Tensor:
        i = (model.num_levels - level) * n_tiles + index  # sections: the top level's tiles first
        try:
            return decode_level(
                p_loc,
                p_scale,
                sections[i],
                seed=tile_seed(header.seed, index),
                level=level,
                params=params,
                predicted_bits=predicted_bits,
            )
        except RecDecodeError as e:
            raise RecFormatError(f"section {i + 1} (level {level})", str(e)) from None

    try:
        predict_rate = _predicts_rate(model, params)
    except ValueError as e:
        raise RecFormatError("coder", str(e)) from None
    z = tiling.top_down(model, grid, decode, beta, header.prior_context, predict_rate)
    x_hat = tiling.synthesize(model, grid, z, beta, header.synthesis_context, height, width)
    if header.lossless:
        try:
            x_hat = pixel_layer.decode_pixels(model.lossless_head, sections[-1], x_hat, beta)
        except RecDecodeError as e:
            raise RecFormatError(f"section {len(sections)} (pixel layer)", str(e)) from None
    return x_hat, header


def _header_grid(header: RecHeader, model: LatentVariableModel) -> tiling.TileGrid:
    """The file's tile grid; RecFormatError for tiling fields this model cannot use."""
    ph, pw = model.pad_size(header.height, header.width)
    if header.tile is None:
        return tiling.TileGrid(ph, pw)
    f = model.downsampling_factor
    for name in ("tile", "prior_context", "synthesis_context"):
        if getattr(header, name) % f:
            raise RecFormatError(name, f"{getattr(header, name)} is not a multiple of the model's {f} pixels")
    return tiling.TileGrid(ph, pw, header.tile)


def _header_beta(header: RecHeader, model: LatentVariableModel) -> float | None:
    """The β to decode at; RecFormatError if the file and its model disagree on having one."""
    if not model.variable_rate:
        if header.beta_code is not None:
            raise RecFormatError("beta_code", "the file carries a β, but its model was trained at a single β")
        return None
    if header.beta_code is None:
        raise RecFormatError("beta_code", "the model is variable-rate, but the file carries no β")
    try:
        return coding_beta(model, header.beta)[0]
    except ValueError as e:
        raise RecFormatError("beta_code", str(e)) from None
