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

How a group becomes an index and back is the sampler family's (codec/group_coders.py): the greedy
walk's S_g indices of b bits, the importance sampler's one index of L_g bits, or, below, the block
coders' and the rejection sampler's own rANS field and raw payload.
The block coders of codec/pfr.py (samplers pfr, orc, sp-pfr, sp-orc) code each group as one
block, keyed by its group number: one more rANS field holds floor(log2 k) of each block's index
k, and the raw bits end with the blocks' bin tuples (sp-*: L_b bits each, spread evenly over the
block's dims, pfr.spread_bin_bits) and k's mantissas. The exact ones (pfr, sp-pfr) sample
pfr.bounded_target's variances, which keep every dim's density ratio bounded.

The rejection sampler (codec/rejection.py) codes one-dim groups: one more rANS field holds
floor(log2 K) + 1 of each dim's accepted round K, 0 where none was accepted within the budget, and
the raw bits end with K's mantissas and then the fallback dims' 16-bit quantised posterior draws.

The sp-orc-predicted sampler has a section of its own (codec/layout.py): its blocks are laid out from
the model's rate head, so it sends no segments or group sizes. Every other sampler's section is

    u8 version (2) | u8 sampler | u16 params check | varint n_segments | varint n_zero_runs
    | varint n_outliers | varint len(rans) | rANS side info (segment kinds/lengths, group
    sizes, zero-run lengths, outlier gaps[, block or rejection index buckets]) | raw bits (tables or raw
    small fields, mantissas, outlier values, indices) | u32 CRC32 of everything before
"""

import time

import numpy as np
import torch

from codec import layout, rng
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
from codec.group_coders import OUTLIER_BITS_Q, dequantise, group_coder, quantised_draw
from codec.params import SAMPLERS, CoderParams, LevelParams
from codec.plan import check_dims, destandardise, plan_level

SECTION_FORMAT_VERSION = 2  # of a level section (codec/bitstream.py has the container's FORMAT_VERSION)
_SAMPLER_IDS = {name: i + 1 for i, name in enumerate(SAMPLERS)}  # greedy 1, importance 2, then pfr.METHODS
_LONG = rng.GROUP_BITS + 1  # bit lengths of run lengths and gaps (a level has < 2^28 dims)
_DIRECT_ALPHABET = 64  # group sizes up to this are rANS symbols; larger ones are bucketed


def _predicted(predicted_bits: torch.Tensor | None, p_loc: torch.Tensor) -> torch.Tensor:
    if predicted_bits is None:
        raise ValueError(f"{layout.SAMPLER} needs the rate head's predicted bits (a PLN model with a rate head)")
    if predicted_bits.numel() != p_loc.numel():
        raise ValueError(f"{predicted_bits.numel()} predicted bits for {p_loc.numel()} dims")
    return predicted_bits


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
    choose: bool = False,
    predicted_bits: torch.Tensor | None = None,
):
    """Code a sample of q = N(q_loc, q_scale^2) against p = N(p_loc, p_scale^2).

    The sp-orc-predicted sampler (codec/layout.py) lays out its blocks from `predicted_bits`, the
    rate head's per-dim KL prediction (models/rate_head.predict_bits), which the decoder is given too.

    With `choose`, the encoder makes the level's per-file choices: a greedy level codes with the
    shard decay among its `decay_choices` whose sample fits q best, an sp-orc-predicted level with
    its low-rate index bits where the predicted rate is low. The data then decode with
    `params.with_level(level, **stats["chosen"])`, which is what a header must carry. Returns (sample,
    data) or, with return_stats, (sample, data, stats dict). `sample` has the shape and dtype of
    p_loc and equals decode_level's output bit for bit.
    """
    t0 = time.perf_counter()
    lp = params.for_level(level)
    if lp.sampler == layout.SAMPLER:
        sample, data, stats = layout.encode_level(
            q_loc,
            q_scale,
            p_loc,
            p_scale,
            _predicted(predicted_bits, p_loc),
            seed=seed,
            level=level,
            params=params,
            choose=choose,
        )
        return (sample, data, stats) if return_stats else (sample, data)
    plan = plan_level(q_loc, q_scale, p_loc, p_scale, lp)
    coder = group_coder(lp.sampler)
    coded = coder.encode(plan, lp, params, seed=seed, level=level, choose_decay=choose)
    params = coded.params  # greedy: with the shard decay it chose
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
    q = quantised_draw(m[out_pos], v[out_pos], out_pos, params.outlier_range, seed=seed, level=level)
    eps[out_pos] = dequantise(q, params.outlier_range)
    eps[zero_pos] = rng.zero_run_normals(seed, level, zero_pos)
    eps[cod_pos] = coded.x

    bits = BitWriter()
    len_sym, len_alphabet = _length_symbols(lens, seg_zero, lp)
    size_alphabet, direct = _size_field(lp)
    size_sym, size_mant, size_w = bucketize(sizes - 1 if direct else sizes, direct)
    zl_sym, zl_mant, zl_w = bucketize(seg_sizes[seg_zero], 0)
    gap_sym, gap_mant, gap_w = bucketize(position_gaps(out_pos), 0)
    fields = [(len_sym, len_alphabet), (size_sym, size_alphabet), (zl_sym, _LONG), (gap_sym, _LONG)]
    if coder.index_alphabet(lp) is not None:
        fields.append((coded.own_field, coder.index_alphabet(lp)))
    rans = encode_fields(fields, bits)
    bits.write(size_mant, size_w)
    bits.write(zl_mant, zl_w)
    bits.write(gap_mant, gap_w)
    bits.write(q.cpu().numpy(), OUTLIER_BITS_Q)
    side_bits = bits.n_bits
    bits.write(coded.values.reshape(-1), coded.widths)
    index_bits = bits.n_bits - side_bits
    counts = [len(seg_sizes), int(seg_zero.sum()), out_pos.numel()]
    sampler_id, check = _SAMPLER_IDS[lp.sampler], params.format_check(level)
    data = frame_section(SECTION_FORMAT_VERSION, sampler_id, check, counts, rans, bits.getvalue())

    sample = destandardise(eps, p_loc, p_scale)
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
        shard_decay=None,
        rans_bytes=len(rans),
        raw_side_bits=side_bits,
        seconds=time.perf_counter() - t0,
    )
    stats.update(coded.stats)  # greedy: its shard decay; block coders and rejection: their search
    stats["chosen"] = {} if stats["shard_decay"] is None else {"shard_decay": stats["shard_decay"]}
    return sample, data, stats


def _length_symbols(lens, seg_zero: np.ndarray, lp: LevelParams) -> tuple[np.ndarray, int]:
    """One symbol per segment: 0 for a zero run, else 1 + the group's index length (importance
    L_g) or its steps - 1 (greedy S_g); just 1 when lengths are fixed (not adaptive)."""
    sym = np.zeros(seg_zero.size, dtype=np.int64)
    if lens is None:
        sym[~seg_zero] = 1
        return sym, 2
    sym[~seg_zero] = lens + group_coder(lp.sampler).length_offset
    return sym, _length_alphabet(lp)


def _length_alphabet(lp: LevelParams) -> int:
    return group_coder(lp.sampler).length_alphabet(lp) if lp.adaptive else 2


@torch.no_grad()
def decode_level(
    p_loc, p_scale, data: bytes, *, seed: int, level: int, params: CoderParams, predicted_bits=None
) -> torch.Tensor:
    """Rebuild encode_level's sample from its bytes (and the same `predicted_bits`); raises
    RecDecodeError on bad data."""
    lp = params.for_level(level)
    if p_loc.shape != p_scale.shape:
        raise ValueError("p_loc and p_scale must have the same shape")
    if lp.sampler == layout.SAMPLER:
        predicted = _predicted(predicted_bits, p_loc)
        return layout.decode_level(p_loc, p_scale, data, predicted, seed=seed, level=level, params=params)
    sampler_id, check = _SAMPLER_IDS[lp.sampler], params.format_check(level)
    (n_seg, n_zero, n_out), rans, bits = open_section(
        data, level=level, version=SECTION_FORMAT_VERSION, sampler_id=sampler_id, check=check, n_counts=3
    )
    n = p_loc.numel()
    check_dims(n)
    n_groups = n_seg - n_zero
    if n_out > n or n_seg > n - n_out or n_zero > n_seg or (n_seg == 0) != (n_out == n):
        raise RecDecodeError(f"level {level}: {n_seg} segments / {n_out} outliers for {n} dims")
    size_alphabet, direct = _size_field(lp)
    coder = group_coder(lp.sampler)
    fields = [(n_seg, _length_alphabet(lp)), (n_groups, size_alphabet), (n_zero, _LONG), (n_out, _LONG)]
    if coder.index_alphabet(lp) is not None:
        fields.append((n_groups, coder.index_alphabet(lp)))
    len_sym, size_sym, zl_sym, gap_sym, *own_field = decode_fields(rans, fields, bits)
    seg_zero = len_sym == 0
    if int(seg_zero.sum()) != n_zero:
        raise RecDecodeError(f"level {level}: zero-run count mismatch")
    sizes = unbucketize(size_sym, bits, direct) + (1 if direct else 0)
    zero_len = unbucketize(zl_sym, bits, False)
    gaps = unbucketize(gap_sym, bits, False)
    q = torch.from_numpy(bits.read(n_out, OUTLIER_BITS_Q).astype(np.int64))
    lens = len_sym[~seg_zero] - coder.length_offset
    payload = coder.read(bits, own_field[0] if own_field else None, sizes, lens, lp, level)
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
    eps[out_t] = dequantise(q.to(device), params.outlier_range)
    eps[zero_pos] = rng.zero_run_normals(seed, level, zero_pos)
    eps[cod_pos] = coder.decode(payload, sizes, lens, cod_pos, lp, params, seed=seed, level=level)
    return destandardise(eps, p_loc, p_scale)
