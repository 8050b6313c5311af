"""The pixel layer of a lossless .rec: the 8-bit image coded under the model's lossless head, given x̂.

The head (models/lossless.py) gives each subpixel a logistic (μ, log s) in six stages. The coder
uses them on a fixed grid, so that encoder and decoder pick the same CDF table:

    mean index  i = round(4 · clamp(μ, 0, 255))          table centre i // 4, quarter offset i % 4
    scale index j = clamp(round((log s − log S_MIN) / S_STEP), 0, N_SCALES − 1)
    symbol      k = x − i // 4  in [−255, 255],  coded by rANS with table 4 j + i % 4

The tables (discretised logistics at the grid points, 16-bit) are built once (`build_tables`) and
stored in the model file with the head, so every platform codes with the same integers.

Rounding on a grid is still ambiguous where a parameter lies near the middle between two grid
points: there a last-ulp difference between the encoder's and the decoder's networks (another thread
count, another kernel) would pick different tables and desynchronise the stream. So the encoder
flags, per subpixel, the parameters within MARGIN grid steps of such a midpoint, and both sides
round a flagged parameter down. The decoder reads the flags instead of testing its own values, so
any perturbation smaller than MARGIN grid steps (about 4 ulps of μ near 255, and 50 or more ulps
of log s) decodes to the same pixels. The flags cost about 0.012 bits a subpixel.

A larger difference (a file decoded on another device than the one that wrote it) can desynchronise
the stream; the layer carries the CRC32 of the image, and a mismatch raises LosslessMismatchError
rather than returning wrong pixels.

Layout of the section: u32 CRC32 of the (H, W, 3) uint8 image, then for each stage, for each strip
of STRIP rows: u32 length | a rANS chunk with the flags of the strip's subpixels of that stage
(raster order), then their symbols.
"""

import functools
import math
import zlib

import numpy as np
import torch

from codec.entropy import PRECISION, RecDecodeError, pmf_to_quantized_cdf, rans_decoder, rans_encoder
from codec.image import image_pixels
from models.lossless import STAGES, STRIP_HALO, LosslessHead, stage_mask

DEFAULT_QUALITY = 7  # for lossless files: the fewest bits in all on training photos (results/lossless/)
MEAN_STEPS = 4  # grid points per 8-bit level
N_SCALES = 64
S_MIN, S_MAX = 0.12, 64.0
S_STEP = math.log(S_MAX / S_MIN) / (N_SCALES - 1)
SYMBOLS = 511  # k = x − centre in [−255, 255]
OFFSET = -255
MARGIN = 2.0**-12  # grid steps either side of a rounding midpoint that are flagged
FLAG_TABLE = N_SCALES * MEAN_STEPS  # the flags' table follows the pixel tables
STRIP = 128  # rows per strip of the stage networks (plus STRIP_HALO above and below); STRIP and
# STRIP_HALO are even, so every strip's context starts on an even row and keeps the image's checkerboard


class LosslessMismatchError(RecDecodeError):
    """The decoded image fails the pixel layer's CRC32 (usually: decoded on another device)."""


def flag_probabilities() -> list[float]:
    """P(flags) for the 2-bit flag symbol (bit 0: mean flagged, bit 1: scale flagged), as if the
    parameters' positions between grid points were uniform."""
    p = 2 * MARGIN
    return [(1 - p) ** 2, p * (1 - p), p * (1 - p), p * p]


def build_tables() -> torch.Tensor:
    """(FLAG_TABLE + 1, SYMBOLS + 2) int32 quantised CDFs: table 4 j + f is the discretised logistic of
    scale S_MIN·e^(j·S_STEP) centred at f / 4 over k in [−255, 255] (plus compressai's escape symbol,
    never used); the last is the flags' table, padded with its final value."""
    k = np.arange(SYMBOLS, dtype=np.float64) + OFFSET
    rows = []
    for j in range(N_SCALES):
        scale = S_MIN * math.exp(j * S_STEP)
        for f in range(MEAN_STEPS):
            centre = f / MEAN_STEPS
            upper = 0.5 * np.tanh((k + 0.5 - centre) / (2 * scale))  # σ(t) − ½ = tanh(t / 2) / 2
            lower = 0.5 * np.tanh((k - 0.5 - centre) / (2 * scale))
            pmf = np.maximum(upper - lower, 0.0)
            rows.append(pmf_to_quantized_cdf([*(pmf / pmf.sum() * (1 - 2**-20)), 2**-20], PRECISION))
    flags = pmf_to_quantized_cdf([*flag_probabilities(), 2**-20], PRECISION)
    rows.append(flags + [flags[-1]] * (SYMBOLS + 2 - len(flags)))
    return torch.tensor(rows, dtype=torch.int32)


@functools.cache
def _table_lists(cdfs_bytes: bytes, shape: tuple[int, int]) -> tuple[list, list, list]:
    cdfs = np.frombuffer(cdfs_bytes, dtype=np.int32).reshape(shape)
    lengths = [SYMBOLS + 2] * (shape[0] - 1) + [len(flag_probabilities()) + 2]
    offsets = [OFFSET] * (shape[0] - 1) + [0]
    return [row[:n].tolist() for row, n in zip(cdfs, lengths)], lengths, offsets


def _tables(head: LosslessHead) -> tuple[list, list, list]:
    cdfs = head.cdfs.cpu().numpy().astype(np.int32)
    shape = (FLAG_TABLE + 1, SYMBOLS + 2)
    if cdfs.shape != shape:
        raise ValueError(f"the lossless head's tables are {cdfs.shape}, this build codes with {shape}")
    return _table_lists(cdfs.tobytes(), cdfs.shape)


def grid_indices(loc: torch.Tensor, log_scale: torch.Tensor, flags: torch.Tensor | None = None):
    """(mean index, scale index, flags) of float parameters: `flags` None computes them (the encoder);
    given (the decoder), a flagged parameter is rounded down."""
    u = loc.double().clamp(0, 255) * MEAN_STEPS
    v = ((log_scale.double() - math.log(S_MIN)) / S_STEP).clamp(0, N_SCALES - 1)
    if flags is None:
        flags = ((u - u.floor() - 0.5).abs() < MARGIN).long() | (((v - v.floor() - 0.5).abs() < MARGIN).long() << 1)
    mean = torch.where(flags & 1 == 1, u.floor(), (u + 0.5).floor()).long()
    scale = torch.where(flags & 2 == 2, v.floor(), (v + 0.5).floor()).long()
    return mean, scale, flags


def _strips(height: int) -> list[tuple[int, int, int, int]]:
    """(top, bottom, context top, context bottom) of each strip of STRIP rows."""
    return [
        (top, min(height, top + STRIP), max(0, top - STRIP_HALO), min(height, top + STRIP + STRIP_HALO))
        for top in range(0, height, STRIP)
    ]


def _chunk_params(head, stage, strip, x_hat, residual, beta) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """(positions in the strip, μ, log s) of the subpixels of `stage` in one strip: the head runs on
    the strip grown by STRIP_HALO rows (its receptive radius), so memory follows the image's width."""
    top, bottom, lo, hi = strip
    params = head.stage_params(stage, x_hat[..., lo:hi, :], residual[..., lo:hi, :], beta)[0, :, top - lo : bottom - lo]
    where = stage_mask(stage, hi - lo, x_hat.shape[-1], params.device)[top - lo : bottom - lo]
    where = where.reshape(-1)
    loc, log_scale = (t.reshape(-1)[where].cpu() for t in params)
    return where.cpu().numpy(), loc, log_scale


@torch.inference_mode()
def encode_pixels(head: LosslessHead, image: np.ndarray, x_hat: np.ndarray, beta: float | None) -> bytes:
    """The pixel layer of `image` (H, W, 3) uint8 given the lossy decode `x_hat` (H, W, 3) uint8.

    One rANS chunk per stage and strip (`u32 length | bytes`, after the image's CRC32): the decoder
    pads each chunk against overreads, so its memory follows the strip."""
    cdfs, lengths, offsets = _tables(head)
    device = head.cdfs.device
    height, width, _ = image.shape
    x, xh = image_pixels(image).to(device), image_pixels(x_hat).to(device)
    residual = torch.zeros(1, 3, height, width, dtype=torch.int16, device=device)  # x − x̂ where coded
    out = bytearray(zlib.crc32(np.ascontiguousarray(image).tobytes()).to_bytes(4, "big"))
    for stage in range(STAGES):
        c = stage % 3
        for strip in _strips(height):
            where, loc, log_scale = _chunk_params(head, stage, strip, xh, residual, beta)
            mean, scale, flags = (t.numpy() for t in grid_indices(loc, log_scale))
            pixels = image[strip[0] : strip[1], :, c].reshape(-1)[where].astype(np.int64)
            symbols = np.concatenate([flags, pixels - mean // MEAN_STEPS])
            indexes = np.concatenate([np.full(flags.size, FLAG_TABLE), scale * MEAN_STEPS + mean % MEAN_STEPS])
            chunk = b""
            if symbols.size:
                chunk = rans_encoder().encode_with_indexes(symbols.tolist(), indexes.tolist(), cdfs, lengths, offsets)
            out += len(chunk).to_bytes(4, "big") + chunk
        mask = stage_mask(stage, height, width, device)
        residual[0, c][mask] = (x[0, c].short() - xh[0, c].short())[mask]
    return bytes(out)


@torch.inference_mode()
def decode_pixels(head: LosslessHead, data: bytes, x_hat: np.ndarray, beta: float | None) -> np.ndarray:
    """The (H, W, 3) uint8 image of a pixel layer, given the lossy decode `x_hat` it was coded with.

    Raises RecDecodeError for a truncated or corrupted layer, LosslessMismatchError when the decoded
    image fails the layer's CRC32."""
    cdfs, lengths, offsets = _tables(head)
    device = head.cdfs.device
    height, width, _ = x_hat.shape
    xh = image_pixels(x_hat).to(device)
    residual = torch.zeros(1, 3, height, width, dtype=torch.int16, device=device)
    image = np.zeros((height, width, 3), dtype=np.uint8)
    pos = 4
    if len(data) < pos:
        raise RecDecodeError(f"truncated: {len(data)} bytes, the pixel layer starts with a 4-byte CRC")
    for stage in range(STAGES):
        c = stage % 3
        for strip in _strips(height):
            where, loc, log_scale = _chunk_params(head, stage, strip, xh, residual, beta)
            if pos + 4 > len(data):
                raise RecDecodeError(f"truncated in stage {stage} at row {strip[0]}")
            size = int.from_bytes(data[pos : pos + 4], "big")
            chunk, pos = data[pos + 4 : pos + 4 + size], pos + 4 + size
            if len(chunk) != size:
                raise RecDecodeError(f"truncated in stage {stage} at row {strip[0]}")
            n = loc.numel()
            if not n:
                if size:
                    raise RecDecodeError(f"stage {stage} at row {strip[0]}: bytes where no pixels are")
                continue
            decoder = rans_decoder()
            decoder.set_stream(chunk + bytes(8 * n + 64))  # a corrupted chunk must not read past the buffer
            flags = np.asarray(decoder.decode_stream([FLAG_TABLE] * n, cdfs, lengths, offsets), dtype=np.int64)
            if flags.min() < 0 or flags.max() > 3:
                raise RecDecodeError(f"stage {stage} at row {strip[0]}: invalid flags")
            mean, scale, _ = (t.numpy() for t in grid_indices(loc, log_scale, torch.from_numpy(flags)))
            indexes = (scale * MEAN_STEPS + mean % MEAN_STEPS).tolist()
            k = np.asarray(decoder.decode_stream(indexes, cdfs, lengths, offsets), dtype=np.int64)
            pixels = k + mean // MEAN_STEPS
            if pixels.min() < 0 or pixels.max() > 255:
                raise RecDecodeError(f"stage {stage} at row {strip[0]}: pixel values outside 0..255")
            rows = image[strip[0] : strip[1], :, c].reshape(-1)
            rows[where] = pixels
            image[strip[0] : strip[1], :, c] = rows.reshape(strip[1] - strip[0], width)
        mask = stage_mask(stage, height, width, device)
        got = torch.from_numpy(image[..., c]).to(device).short() - xh[0, c].short()
        residual[0, c][mask] = got[mask]
    if pos != len(data):
        raise RecDecodeError(f"{len(data) - pos} unexpected bytes after the last stage")
    if zlib.crc32(image.tobytes()) != int.from_bytes(data[:4], "big"):
        raise LosslessMismatchError(
            "the decoded image fails the pixel layer's CRC32: lossless files decode on the device "
            "(and torch build) that wrote them, or the file is corrupted"
        )
    return image
