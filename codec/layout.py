"""The `sp-orc-predicted` level coder: space-partitioned ORC blocks laid out without side information.

The block coders of codec/pfr.py need a layout both sides know: which dims form each block and how
many bins each dim is cut into. `sp-orc` sends it (each block's size and bin bits, ~5 bits a block);
here both sides compute it from the model's rate head (models/rate_head.py), a prediction of each
dim's KL from the coded z2 (rec-algorithms §3.3, option B):

    predicted KL   -> integers in 1/GRID bit (the encoder flags values within MARGIN of a rounding
                      midpoint; both sides round flagged values down, so any device agrees)
    zero dims      -> dims predicted below 1/(2 GRID) bit take a prior sample from the shared stream
    scan order     -> the other dims, but the outliers, in the file's pseudo-random order (rng.scan_order)
    blocks         -> consecutive dims of the scan, a new block each time the predicted bits pass a
                      multiple of `steps` bits, and after `max_group_size` dims
    bin bits       -> L_b = round(P_b) - (index_bits - RESIDUAL_BITS) for a block's predicted P_b bits,
                      spread over its dims by their predicted bits (pfr.allocate_bin_bits)

Each block is then coded by sp-orc with 2^index_bits candidates: the in-bin index carries the block's
KL beyond its bin bits, about RESIDUAL_BITS plus the prediction's error. Outliers (dims above
`outlier_bits` of KL, which the head cannot know) are 16-bit values, as in every level section.
A wrong prediction costs rate or fidelity, never correctness.

    u8 version | u8 sampler | u16 params check | varint n_outliers | varint n_flags | varint n_blocks
    | varint len(rans) | rANS (outlier gaps, flag gaps, floor(log2 k) of each block's index k)
    | raw bits (gap mantissas, outlier values, the blocks' bin tuples, k's mantissas) | u32 CRC32
"""

import time

import numpy as np
import torch

from codec import pfr, rng
from codec.entropy import (
    BitWriter,
    RecDecodeError,
    bucketize,
    decode_fields,
    encode_fields,
    frame_section,
    open_section,
    position_gaps,
    unbucketize,
)
from codec.group_coders import OUTLIER_BITS_Q, dequantise, quantised_draw
from codec.params import SAMPLERS, CoderParams, LevelParams
from codec.plan import check_dims, destandardise, standardise

SECTION_FORMAT_VERSION = 1
SAMPLER = "sp-orc-predicted"
GRID = 16  # predicted bits are counted in 1/GRID bit
MARGIN = 2.0**-20  # grid steps either side of a rounding midpoint within which the encoder flags a value
MAX_PREDICTED_BITS = 64.0  # a dim's prediction is clamped to this (a block's bin bits stay in range)
RESIDUAL_BITS = 10  # the in-bin index's share of a block's predicted KL with 2^10 candidates
_LONG = rng.GROUP_BITS + 1  # bit lengths of gaps (a level has < 2^28 dims)
_SAMPLER_ID = 1 + SAMPLERS.index(SAMPLER)


def quantise(bits: torch.Tensor, flagged: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(int64 predicted bits in 1/GRID bit, bool flags) of float64 predictions: `flagged` None computes
    the flags (the encoder); given (the decoder), flagged values round down and the others to nearest."""
    u = bits.double().clamp(0.0, MAX_PREDICTED_BITS) * GRID
    if flagged is None:
        flagged = (u - u.floor() - 0.5).abs() < MARGIN
    return torch.where(flagged, u.floor(), (u + 0.5).floor()).long(), flagged


def block_layout(units: torch.Tensor, lp: LevelParams) -> pfr.BlockLayout:
    """The blocks of the scanned dims, from their predicted bits `units` (int64, 1/GRID bit)."""
    n = units.numel()
    target = lp.steps * GRID
    before = torch.cumsum(units, 0) - units
    band = torch.div(before, target, rounding_mode="floor")
    start = torch.ones(n, dtype=torch.bool, device=units.device)
    start[1:] = band[1:] != band[:-1]
    run = torch.cumsum(start.long(), 0) - 1  # blocks by predicted bits, then at most max_group_size dims
    run_start = torch.nonzero(start).squeeze(1)
    rank = torch.arange(n, device=units.device) - run_start[run]
    block = torch.cumsum((rank % lp.max_group_size == 0).long(), 0) - 1
    sizes = torch.bincount(block)
    predicted = torch.zeros(sizes.numel(), dtype=torch.int64, device=units.device).index_add_(0, block, units)
    offset = (lp.index_bits - RESIDUAL_BITS) * GRID
    bin_bits = torch.div(predicted - offset + GRID // 2, GRID, rounding_mode="floor")
    most = torch.clamp(sizes * pfr.MAX_BIN_BITS_PER_DIM, max=pfr.MAX_BIN_BITS_PER_BLOCK)
    bin_bits = torch.minimum(bin_bits.clamp(min=0), most)
    return pfr.make_layout(sizes, pfr.allocate_bin_bits(units.double(), sizes, bin_bits), units.device)


def _scan(seed: int, level: int, n: int, units: torch.Tensor, outlier: torch.Tensor):
    """(zero dims, coded dims in scan order): dims predicted at 0 units and the rest, outliers left out."""
    order = rng.scan_order(seed, level, n, units.device)
    order = order[~outlier[order]]
    zero = units[order] == 0
    return order[zero], order[~zero]


@torch.no_grad()
def encode_level(
    q_loc, q_scale, p_loc, p_scale, predicted_bits, *, seed: int, level: int, params: CoderParams, choose: bool = False
):
    """(sample, data, stats) of q = N(q_loc, q_scale^2) against p = N(p_loc, p_scale^2), with the layout
    from `predicted_bits` (float64, one per dim: models/rate_head.predict_bits on the coded level above).

    With `choose`, a level whose predictions average below `low_rate_bits_per_dim` is coded with
    `low_rate_index_bits`; stats["chosen"] then holds {"index_bits": ...}, and the data decode with
    `params.with_level(level, **stats["chosen"])`."""
    t0 = time.perf_counter()
    lp = params.for_level(level)
    m, v = standardise(q_loc, q_scale, p_loc, p_scale)
    n, device = m.numel(), m.device
    check_dims(n)
    kl_bits = pfr.kl_bits(m, v)
    units, flagged = quantise(predicted_bits.flatten().to(device))
    chosen = {}
    if choose and lp.low_rate_index_bits and float(units.sum()) / GRID < lp.low_rate_bits_per_dim * n:
        chosen = {"index_bits": lp.low_rate_index_bits}
        params = params.with_level(level, **chosen)
        lp = params.for_level(level)
    outlier = kl_bits > lp.outlier_bits
    out_pos = torch.nonzero(outlier).squeeze(1)
    flag_pos = torch.nonzero(flagged & ~outlier).squeeze(1)
    zero_pos, cod_pos = _scan(seed, level, n, units, outlier)

    eps = torch.empty(n, dtype=torch.float32, device=device)
    q = quantised_draw(m[out_pos], v[out_pos], out_pos, params.outlier_range, seed=seed, level=level)
    eps[out_pos] = dequantise(q, params.outlier_range)
    eps[zero_pos] = rng.zero_run_normals(seed, level, zero_pos)
    keys = ks = torch.zeros(0, dtype=torch.int64, device=device)
    lay = None
    if cod_pos.numel():
        lay = block_layout(units[cod_pos], lp)
        eps[cod_pos], keys, ks, _ = pfr.code_blocks(
            m[cod_pos],
            v[cod_pos],
            lay,
            seed=seed,
            method="sp-orc",
            budget=1 << lp.index_bits,
            level=level,
            memory_elems=params.memory_bytes(device) // 64,
        )

    bits = BitWriter()
    out_sym, out_mant, out_w = bucketize(position_gaps(out_pos), 0)
    flag_sym, flag_mant, flag_w = bucketize(position_gaps(flag_pos), 0)
    k_sym, k_mant, k_w = bucketize(ks.cpu().numpy(), 0)
    rans = encode_fields([(out_sym, _LONG), (flag_sym, _LONG), (k_sym, pfr.INDEX_ALPHABET)], bits)
    bits.write(out_mant, out_w)
    bits.write(flag_mant, flag_w)
    bits.write(q.cpu().numpy(), OUTLIER_BITS_Q)
    side_bits = bits.n_bits
    if lay is not None:
        bits.write(keys.cpu().numpy(), lay.block_bin_bits.cpu().numpy())
    bits.write(k_mant, k_w)
    n_blocks = 0 if lay is None else lay.n_blocks
    counts = [out_pos.numel(), flag_pos.numel(), n_blocks]
    data = frame_section(SECTION_FORMAT_VERSION, _SAMPLER_ID, params.format_check(level), counts, rans, bits.getvalue())
    sample = destandardise(eps, p_loc, p_scale)
    predicted = units.double() / GRID
    stats = dict(
        level=level,
        sampler=SAMPLER,
        n_dims=n,
        kl_bits=float(kl_bits.sum()),
        predicted_bits=float(predicted[~outlier].sum()),
        bits=8 * len(data),
        index_bits=bits.n_bits - side_bits,
        side_bits=8 * len(data) - (bits.n_bits - side_bits),
        n_groups=n_blocks,
        n_outliers=int(out_pos.numel()),
        outlier_kl_bits=float(kl_bits[outlier].sum()),
        n_zero_dims=int(zero_pos.numel()),
        zero_kl_bits=float(kl_bits[zero_pos].sum()),
        n_flags=int(flag_pos.numel()),
        bin_bits=0 if lay is None else int(lay.block_bin_bits.sum()),
        shard_decay=None,
        chosen=chosen,
        seconds=time.perf_counter() - t0,
    )
    return sample, data, stats


@torch.no_grad()
def decode_level(p_loc, p_scale, data: bytes, predicted_bits, *, seed: int, level: int, params: CoderParams):
    """Rebuild encode_level's sample from its bytes and the same `predicted_bits`; RecDecodeError on bad data."""
    lp = params.for_level(level)
    (n_out, n_flags, n_blocks), rans, bits = open_section(
        data,
        level=level,
        version=SECTION_FORMAT_VERSION,
        sampler_id=_SAMPLER_ID,
        check=params.format_check(level),
        n_counts=3,
    )
    n, device = p_loc.numel(), p_loc.device
    check_dims(n)
    if n_out > n or n_flags > n or n_blocks > min(n, pfr.MAX_BLOCKS):
        raise RecDecodeError(f"level {level}: {n_out} outliers / {n_flags} flags / {n_blocks} blocks for {n} dims")
    fields = [(n_out, _LONG), (n_flags, _LONG), (n_blocks, pfr.INDEX_ALPHABET)]
    out_sym, flag_sym, k_sym = decode_fields(rans, fields, bits)
    out_pos = _positions(unbucketize(out_sym, bits, False), n, level, "outlier")
    flag_pos = _positions(unbucketize(flag_sym, bits, False), n, level, "flag")
    q = torch.from_numpy(bits.read(n_out, OUTLIER_BITS_Q).astype(np.int64)).to(device)

    flagged = torch.zeros(n, dtype=torch.bool, device=device)
    flagged[torch.from_numpy(flag_pos).to(device)] = True
    units, _ = quantise(predicted_bits.flatten().to(device), flagged)
    outlier = torch.zeros(n, dtype=torch.bool, device=device)
    out_t = torch.from_numpy(out_pos).to(device)
    outlier[out_t] = True
    zero_pos, cod_pos = _scan(seed, level, n, units, outlier)
    lay = block_layout(units[cod_pos], lp) if cod_pos.numel() else None
    if (0 if lay is None else lay.n_blocks) != n_blocks:
        raise RecDecodeError(f"level {level}: {n_blocks} blocks coded, {0 if lay is None else lay.n_blocks} laid out")
    keys = ks = None
    if lay is not None:
        keys = bits.read(n_blocks, lay.block_bin_bits.cpu().numpy()).astype(np.int64)
        ks = unbucketize(k_sym, bits, False)
        if ks.max() >= pfr.MAX_INDEX:
            raise RecDecodeError(f"level {level}: block index out of range")
    bits.finish()

    eps = torch.empty(n, dtype=torch.float32, device=device)
    eps[out_t] = dequantise(q, params.outlier_range)
    eps[zero_pos] = rng.zero_run_normals(seed, level, zero_pos)
    if lay is not None:
        eps[cod_pos] = pfr.regenerate(
            seed, level, lay, torch.from_numpy(keys).to(device), torch.from_numpy(ks).to(device)
        )
    return destandardise(eps, p_loc, p_scale)


def _positions(gaps: np.ndarray, n: int, level: int, what: str) -> np.ndarray:
    pos = np.cumsum(gaps) - 1
    if pos.size and pos[-1] >= n:
        raise RecDecodeError(f"level {level}: {what} position out of range")
    return pos
