"""REC coding of one latent level: q, p (diagonal Gaussians) -> bytes -> the same sample.

    encode_level(q_loc, q_scale, p_loc, p_scale, seed=, level=, params=) -> (sample, bytes)
    decode_level(p_loc, p_scale, bytes, seed=, level=, params=)         -> sample

The encoder's plan (codec/plan.py) standardises the dims by the prior and sorts them into
outliers, sent as 16-bit quantised values (the encoder keeps the dequantised value, as the
decoder will see it), zero runs (a prior sample from the shared stream, no index) and groups
whose KL fits the group budget, coded by the level's sampler.
With `adaptive` params each group's index length follows its KL (importance: L_g =
ceil(KL_g + t) bits, 2^L_g candidates; greedy: S_g = ceil((KL_g + margin) / b) steps; sp-*:
L_b = floor(KL_b - (b - t)) bin bits), and is sent as side information; otherwise every group
costs B bits / S steps (the thesis code).

The block coders of codec/pfr.py (samplers pfr, orc, sp-pfr, sp-orc) code each group as one
block, keyed by its group number: one more rANS field holds floor(log2 k) of each block's index
k, and the raw bits end with the blocks' bin tuples (sp-*: L_b bits each, spread evenly over the
block's dims, pfr.spread_bin_bits) and k's mantissas. The exact ones (pfr, sp-pfr) sample
pfr.bounded_target's variances, which keep every dim's density ratio bounded.

The rejection sampler (codec/rejection.py) codes one-dim groups: one more rANS field holds
floor(log2 K) + 1 of each dim's accepted round K, 0 where none was accepted within the budget, and
the raw bits end with K's mantissas and then the fallback dims' 16-bit quantised posterior draws.

    u8 version (2) | u8 sampler | u16 params check | varint n_segments | varint n_zero_runs
    | varint n_outliers | varint len(rans) | rANS side info (segment kinds/lengths, group
    sizes, zero-run lengths, outlier gaps[, block or rejection index buckets]) | raw bits (tables or raw
    small fields, mantissas, outlier values, indices) | u32 CRC32 of everything before
"""

import math
import struct
import time
import zlib

import numpy as np
import torch

from codec import greedy, importance, pfr, rejection, rng
from codec.entropy import (
    BitReader,
    BitWriter,
    RecDecodeError,
    bucketize,
    decode_fields,
    encode_fields,
    unbucketize,
)
from codec.params import SAMPLERS, CoderParams, LevelParams
from codec.plan import check_dims, choose_shard_decay, greedy_walk, plan_level, walk_settings

SECTION_FORMAT_VERSION = 2  # of a level section (codec/bitstream.py has the container's FORMAT_VERSION)
OUTLIER_BITS_Q = 16
_SAMPLER_IDS = {name: i + 1 for i, name in enumerate(SAMPLERS)}  # greedy 1, importance 2, then pfr.METHODS
_LONG = rng.GROUP_BITS + 1  # bit lengths of run lengths and gaps (a level has < 2^28 dims)
_DIRECT_ALPHABET = 64  # group sizes up to this are rANS symbols; larger ones are bucketed


def _quantised_draw(m, v, dims: torch.Tensor, range_: float, *, seed: int, level: int) -> torch.Tensor:
    """A private posterior draw for each of `dims`, quantised to OUTLIER_BITS_Q bits on [-R, R]."""
    draw = m + v.sqrt() * rng.outlier_normals(seed, level, dims).double()
    return torch.round((draw.clamp(-range_, range_) + range_) / (2 * range_) * ((1 << OUTLIER_BITS_Q) - 1)).long()


def _dequantise(q: torch.Tensor, rng_: float) -> torch.Tensor:
    step = 2.0 * rng_ / ((1 << OUTLIER_BITS_Q) - 1)
    return (q.double() * step - rng_).float()


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    n, shift = 0, 0
    while shift < 64:
        if pos >= len(data):
            raise RecDecodeError("header truncated")
        byte = data[pos]
        n |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return n, pos
        shift += 7
    raise RecDecodeError("malformed varint in header")


def _check(params: CoderParams, level: int) -> int:
    return zlib.crc32(params.format_bytes(level)) & 0xFFFF


def _size_field(lp: LevelParams) -> tuple[int, bool]:
    direct = lp.max_group_size <= _DIRECT_ALPHABET
    return (lp.max_group_size if direct else lp.max_group_size.bit_length()), direct


@torch.no_grad()
def encode_level(
    q_loc,
    q_scale,
    p_loc,
    p_scale,
    *,
    seed: int,
    level: int,
    params: CoderParams,
    return_stats: bool = False,
    choose_decay: bool = False,
):
    """Code a sample of q = N(q_loc, q_scale^2) against p = N(p_loc, p_scale^2).

    With `choose_decay`, a greedy level codes with the shard decay among its `decay_choices`
    whose sample fits q best; the data then decode with `params.with_level(level,
    shard_decay=stats["shard_decay"])`, which is what a header must carry. Returns (sample,
    data) or, with return_stats, (sample, data, stats dict). `sample` has the shape and dtype of
    p_loc and equals decode_level's output bit for bit.
    """
    t0 = time.perf_counter()
    lp = params.for_level(level)
    plan = plan_level(q_loc, q_scale, p_loc, p_scale, lp)
    table = None
    if lp.sampler == "greedy":
        most_blocks = int(-(-plan.sizes.max() // params.pool_width)) if plan.sizes.size else 1
        table = greedy.pool_table(
            seed, level, lp.index_bits, min(params.pool_windows, most_blocks) * params.pool_width, plan.m.device
        )
        if choose_decay:
            params = params.with_level(
                level, shard_decay=choose_shard_decay(plan, lp, params, table, seed=seed, level=level)
            )
            lp = params.for_level(level)
    m, v, sizes, lens, out_pos, zero_pos, cod_pos = (
        plan.m,
        plan.v,
        plan.sizes,
        plan.lens,
        plan.out_pos,
        plan.zero_pos,
        plan.cod_pos,
    )
    seg_sizes, seg_zero = plan.seg_sizes, plan.seg_zero
    n, device = m.numel(), m.device
    eps = torch.empty(n, dtype=torch.float32, device=device)

    # outliers: a private posterior draw, quantised; the encoder keeps what the decoder sees
    q = _quantised_draw(m[out_pos], v[out_pos], out_pos, params.outlier_range, seed=seed, level=level)
    eps[out_pos] = _dequantise(q, params.outlier_range)
    eps[zero_pos] = rng.zero_run_normals(seed, level, zero_pos)

    if lp.sampler == "greedy":
        idx, x = greedy_walk(
            m[cod_pos], v[cod_pos], sizes, lens, lp, params, lp.shard_decay, table, seed=seed, level=level
        )
        steps_np = np.full(len(sizes), lp.steps) if lens is None else lens
        used = np.arange(lp.steps)[None, :] < steps_np[:, None]
        idx_np = idx.cpu().numpy()[used]
        widths = lp.index_bits
    elif lp.sampler in pfr.METHODS:
        x, block_fields, block_stats = _code_blocks(m[cod_pos], v[cod_pos], sizes, lens, lp, params, seed, level)
    elif lp.sampler == "rejection":
        x, block_fields, block_stats = _code_rejection(m[cod_pos], v[cod_pos], cod_pos, lp, params, seed, level)
    else:
        if lens is None:
            n_cand = torch.exp(plan.group_kl + lp.oversample_bits * math.log(2)).ceil()
            widths = lp.index_bits
        else:
            n_cand = torch.exp2(torch.from_numpy(lens).to(device).double())
            widths = lens
        n_cand = n_cand.clamp(1, 1 << lp.index_bits).long()
        idx, x = importance.encode(
            m[cod_pos],
            v[cod_pos],
            torch.from_numpy(sizes).to(device),
            n_cand,
            seed=seed,
            level=level,
            bits=lp.index_bits,
            width=lp.pool_width,
            memory_bytes=params.memory_bytes(device),
            gemm_dtype=params.gemm_torch_dtype,
            sample=lp.selection == "sample",
        )
        idx_np = idx.cpu().numpy()
    if lp.sampler in pfr.METHODS or lp.sampler == "rejection":  # floor(log2 k) in the rANS fields
        buckets, idx_np, widths = block_fields
    eps[cod_pos] = x

    bits = BitWriter()
    len_sym, len_alphabet = _length_symbols(lens, seg_zero, lp)
    size_alphabet, direct = _size_field(lp)
    size_sym, size_mant, size_w = bucketize(sizes - 1 if direct else sizes, direct)
    zl_sym, zl_mant, zl_w = bucketize(seg_sizes[seg_zero], 0)
    gaps = torch.diff(out_pos, prepend=out_pos.new_tensor([-1])).cpu().numpy()
    gap_sym, gap_mant, gap_w = bucketize(gaps, 0)
    fields = [(len_sym, len_alphabet), (size_sym, size_alphabet), (zl_sym, _LONG), (gap_sym, _LONG)]
    if lp.sampler in pfr.METHODS:
        fields.append((buckets, pfr.INDEX_ALPHABET))
    elif lp.sampler == "rejection":
        fields.append((buckets, rejection.index_alphabet(lp.index_bits)))
    rans = encode_fields(fields, bits)
    bits.write(size_mant, size_w)
    bits.write(zl_mant, zl_w)
    bits.write(gap_mant, gap_w)
    bits.write(q.cpu().numpy(), OUTLIER_BITS_Q)
    side_bits = bits.n_bits
    bits.write(idx_np.reshape(-1), widths)
    index_bits = bits.n_bits - side_bits
    head = struct.pack(">BBH", SECTION_FORMAT_VERSION, _SAMPLER_IDS[lp.sampler], _check(params, level))
    head += _varint(len(seg_sizes)) + _varint(int(seg_zero.sum())) + _varint(out_pos.numel()) + _varint(len(rans))
    body = head + rans + bits.getvalue()
    data = body + struct.pack(">I", zlib.crc32(body))

    sample = _destandardise(eps, p_loc, p_scale)
    if not return_stats:
        return sample, data
    kl_bits = plan.kl_bits
    stats = dict(
        level=level,
        sampler=lp.sampler,
        n_dims=n,
        kl_bits=float(kl_bits.sum()),
        bits=8 * len(data),
        index_bits=index_bits,
        side_bits=8 * len(data) - index_bits,
        n_groups=len(sizes),
        n_outliers=int(out_pos.numel()),
        outlier_kl_bits=float(kl_bits[plan.out_np].sum()),
        n_zero_runs=int(seg_zero.sum()),
        n_zero_dims=int(zero_pos.numel()),
        zero_kl_bits=float(kl_bits[plan.inl_np][plan.seg_dim_zero].sum()),
        shard_decay=lp.shard_decay if lp.sampler == "greedy" else None,
        rans_bytes=len(rans),
        raw_side_bits=side_bits,
        seconds=time.perf_counter() - t0,
    )
    if lp.sampler in pfr.METHODS or lp.sampler == "rejection":
        stats.update(block_stats)
    return sample, data, stats


def _block_layout(sizes: np.ndarray, lens, lp: LevelParams, device) -> pfr.BlockLayout:
    """The groups as pfr blocks; sp-* blocks' L_b bin bits spread evenly over their dims."""
    sizes_t = torch.from_numpy(sizes).to(device)
    bins = None if lens is None else pfr.spread_bin_bits(sizes_t, torch.from_numpy(lens).to(device), device)
    return pfr.make_layout(sizes_t, bins, device)


def _code_blocks(m, v, sizes: np.ndarray, lens, lp: LevelParams, params: CoderParams, seed: int, level: int):
    """The coded groups by a pfr block coder: (sample, (buckets, raw values, raw widths), stats)."""
    device = m.device
    if not sizes.size:  # every dim an outlier or in a zero run
        empty = np.zeros(0, dtype=np.int64)
        stats = dict(mean_steps=0.0, max_steps=0, capped_blocks=0, bounded_dims=0, bin_bits=0)
        return m.float(), (empty, empty, empty), stats
    lay = _block_layout(sizes, lens, lp, device)
    exact = lp.sampler in pfr.EXACT_METHODS
    target_v = pfr.bounded_target(m, v) if exact else v
    x, keys, ks, st = pfr.code_blocks(
        m,
        target_v,
        lay,
        seed=seed,
        method=lp.sampler,
        level=level,
        budget=None if exact else 1 << lp.index_bits,
        max_steps=1 << lp.index_bits,
        memory_elems=params.memory_bytes(device) // 64,  # ~8 float64 temporaries per candidate-dim
    )
    buckets, mantissas, widths = bucketize(ks.cpu().numpy(), 0)
    key_widths = lay.block_bin_bits.cpu().numpy()
    values = np.concatenate([keys.cpu().numpy(), mantissas])
    stats = dict(
        mean_steps=float(st["steps"].double().mean()),
        max_steps=int(st["steps"].max()),
        capped_blocks=int(st["capped"].sum()),
        bounded_dims=int((target_v < v).sum()),
        bin_bits=int(key_widths.sum()),
    )
    return x, (buckets, values, np.concatenate([key_widths, widths])), stats


def _code_rejection(m, v, dims, lp: LevelParams, params: CoderParams, seed: int, level: int):
    """The coded dims by the rejection sampler: (sample, (buckets, raw values, raw widths), stats).

    Dims that accept nothing within 2^index_bits rounds fall back to a 16-bit quantised posterior
    draw, as outliers do (they are coded dims, never outliers, so their draws are distinct)."""
    ks, x, rounds = rejection.encode(m, v, dims, seed=seed, level=level, budget_bits=lp.index_bits)
    fallback = ks == 0
    q = _quantised_draw(m[fallback], v[fallback], dims[fallback], params.outlier_range, seed=seed, level=level)
    x[fallback] = _dequantise(q, params.outlier_range)
    ks_np = ks.cpu().numpy()
    buckets, mantissas, widths = rejection.index_fields(ks_np)
    values = np.concatenate([mantissas, q.cpu().numpy()])
    widths = np.concatenate([widths, np.full(q.numel(), OUTLIER_BITS_Q)])
    stats = dict(coded_dims=int(ks_np.size), fallbacks=int(fallback.sum()), rounds=rounds)
    return x, (buckets, values, widths), stats


def _length_symbols(lens, seg_zero: np.ndarray, lp: LevelParams) -> tuple[np.ndarray, int]:
    """One symbol per segment: 0 for a zero run, else 1 + the group's index length (importance
    L_g) or its steps - 1 (greedy S_g); just 1 when lengths are fixed (not adaptive)."""
    sym = np.zeros(seg_zero.size, dtype=np.int64)
    if lens is None:
        sym[~seg_zero] = 1
        return sym, 2
    sym[~seg_zero] = lens if lp.sampler == "greedy" else lens + 1
    return sym, _length_alphabet(lp)


def _length_alphabet(lp: LevelParams) -> int:
    if not lp.adaptive:
        return 2
    if lp.sampler in pfr.METHODS:
        return pfr.MAX_BIN_BITS_PER_BLOCK + 2
    return lp.index_bits + 2 if lp.sampler == "importance" else lp.steps + 1


def _destandardise(eps: torch.Tensor, p_loc: torch.Tensor, p_scale: torch.Tensor) -> torch.Tensor:
    eps = eps.view(p_loc.shape).to(p_loc.dtype)
    return p_loc + p_scale * eps  # two separately rounded ops, as in the decoder


@torch.no_grad()
def decode_level(p_loc, p_scale, data: bytes, *, seed: int, level: int, params: CoderParams) -> torch.Tensor:
    """Rebuild encode_level's sample from its bytes; raises RecDecodeError on bad data."""
    lp = params.for_level(level)
    if p_loc.shape != p_scale.shape:
        raise ValueError("p_loc and p_scale must have the same shape")
    data = bytes(data)
    if len(data) < 11:
        raise RecDecodeError(f"level {level}: {len(data)} bytes is too short")
    body, (crc,) = data[:-4], struct.unpack(">I", data[-4:])
    if zlib.crc32(body) != crc:
        raise RecDecodeError(f"level {level}: CRC mismatch (corrupted or truncated data)")
    version, sampler, check = struct.unpack(">BBH", body[:4])
    if version != SECTION_FORMAT_VERSION or sampler != _SAMPLER_IDS[lp.sampler]:
        raise RecDecodeError(f"level {level}: format {version}/{sampler} is not supported")
    if check != _check(params, level):
        raise RecDecodeError(f"level {level}: coded with different CoderParams")
    n_seg, pos = _read_varint(body, 4)
    n_zero, pos = _read_varint(body, pos)
    n_out, pos = _read_varint(body, pos)
    n_rans, pos = _read_varint(body, pos)
    n = p_loc.numel()
    check_dims(n)
    n_groups = n_seg - n_zero
    if n_out > n or n_seg > n - n_out or n_zero > n_seg or (n_seg == 0) != (n_out == n):
        raise RecDecodeError(f"level {level}: {n_seg} segments / {n_out} outliers for {n} dims")
    if pos + n_rans > len(body):
        raise RecDecodeError(f"level {level}: side information truncated")
    bits = BitReader(body[pos + n_rans :])
    size_alphabet, direct = _size_field(lp)
    fields = [(n_seg, _length_alphabet(lp)), (n_groups, size_alphabet), (n_zero, _LONG), (n_out, _LONG)]
    if lp.sampler in pfr.METHODS:
        fields.append((n_groups, pfr.INDEX_ALPHABET))
    elif lp.sampler == "rejection":
        fields.append((n_groups, rejection.index_alphabet(lp.index_bits)))
    len_sym, size_sym, zl_sym, gap_sym, *block_sym = decode_fields(body[pos : pos + n_rans], fields, bits)
    seg_zero = len_sym == 0
    if int(seg_zero.sum()) != n_zero:
        raise RecDecodeError(f"level {level}: zero-run count mismatch")
    sizes = unbucketize(size_sym, bits, direct) + (1 if direct else 0)
    zero_len = unbucketize(zl_sym, bits, False)
    gaps = unbucketize(gap_sym, bits, False)
    q = torch.from_numpy(bits.read(n_out, OUTLIER_BITS_Q).astype(np.int64))
    lens = len_sym[~seg_zero] - (0 if lp.sampler == "greedy" else 1)
    if lp.sampler in pfr.METHODS:
        idx = _read_block_indices(bits, block_sym[0], sizes, lens if lp.adaptive else None, level)
    elif lp.sampler == "rejection":
        idx = rejection.read_indices(block_sym[0], bits, lp.index_bits, level)
        fallback_q = torch.from_numpy(bits.read(int((idx == 0).sum()), OUTLIER_BITS_Q).astype(np.int64))
    elif lp.sampler == "greedy":
        steps_np = lens if lp.adaptive else np.full(n_groups, lp.steps, dtype=np.int64)
        flat = bits.read(int(steps_np.sum()), lp.index_bits).astype(np.int64)
        idx = np.zeros((n_groups, lp.steps), dtype=np.int64)
        idx[np.arange(lp.steps)[None, :] < steps_np[:, None]] = flat
    else:
        idx = bits.read(n_groups, lens if lp.adaptive else lp.index_bits).astype(np.int64)
    bits.finish()
    out_pos = np.cumsum(gaps) - 1
    if sizes.size and (sizes.min() < 1 or sizes.max() > lp.max_group_size):
        raise RecDecodeError(f"level {level}: group size out of range")
    if int(sizes.sum()) + int(zero_len.sum()) != n - n_out or (out_pos.size and out_pos[-1] >= n):
        raise RecDecodeError(f"level {level}: groups and outliers do not cover {n} dims")
    seg_sizes = np.zeros(n_seg, dtype=np.int64)
    seg_sizes[seg_zero], seg_sizes[~seg_zero] = zero_len, sizes

    device = p_loc.device
    outlier = torch.zeros(n, dtype=torch.bool, device=device)
    out_t = torch.from_numpy(out_pos).to(device)
    outlier[out_t] = True
    inl_pos = torch.nonzero(~outlier).squeeze(1)
    seg_dim_zero = torch.from_numpy(np.repeat(seg_zero, seg_sizes)).to(device)
    zero_pos, cod_pos = inl_pos[seg_dim_zero], inl_pos[~seg_dim_zero]
    eps = torch.empty(n, dtype=torch.float32, device=device)
    eps[out_t] = _dequantise(q.to(device), params.outlier_range)
    eps[zero_pos] = rng.zero_run_normals(seed, level, zero_pos)
    sizes_t = torch.from_numpy(sizes).to(device)
    idx_t = torch.from_numpy(idx).to(device)
    if lp.sampler == "greedy":
        eps[cod_pos] = greedy.decode(
            idx_t,
            sizes_t,
            **walk_settings(lp, params, seed=seed, level=level),
            group_steps=torch.from_numpy(steps_np).to(device),
            decay=lp.shard_decay,
        )
    elif lp.sampler in pfr.METHODS:
        if sizes.size:
            lay = _block_layout(sizes, lens if lp.adaptive else None, lp, device)
            eps[cod_pos] = pfr.regenerate(seed, level, lay, idx_t[0], idx_t[1])
    elif lp.sampler == "rejection":
        hit = idx_t > 0
        eps[cod_pos[hit]] = rejection.decode(idx_t[hit], cod_pos[hit], seed=seed, level=level)
        eps[cod_pos[~hit]] = _dequantise(fallback_q.to(device), params.outlier_range)
    else:
        eps[cod_pos] = importance.decode(
            idx_t, sizes_t, seed=seed, level=level, bits=lp.index_bits, width=lp.pool_width
        )
    return _destandardise(eps, p_loc, p_scale)


def _read_block_indices(bits: BitReader, buckets: np.ndarray, sizes: np.ndarray, lens, level: int) -> np.ndarray:
    """(2, n_blocks): the blocks' bin tuples and indices k, checked before any candidate is hashed."""
    n_blocks = buckets.size
    if n_blocks > pfr.MAX_BLOCKS:
        raise RecDecodeError(f"level {level}: {n_blocks} blocks, above {pfr.MAX_BLOCKS}")
    key_bits = np.zeros(n_blocks, dtype=np.int64) if lens is None else lens
    if n_blocks and (
        key_bits.max() > pfr.MAX_BIN_BITS_PER_BLOCK or (key_bits > sizes * pfr.MAX_BIN_BITS_PER_DIM).any()
    ):
        raise RecDecodeError(f"level {level}: more bin bits than a block can hold")
    keys = bits.read(n_blocks, key_bits).astype(np.int64)
    ks = unbucketize(buckets, bits, False)
    if n_blocks and ks.max() >= pfr.MAX_INDEX:
        raise RecDecodeError(f"level {level}: block index out of range")
    return np.stack([keys, ks])
