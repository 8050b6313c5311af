"""REC coding of one latent level: q, p (diagonal Gaussians) -> bytes -> the same sample.

    encode_level(q_loc, q_scale, p_loc, p_scale, seed=, level=, params=) -> (sample, bytes)
    decode_level(p_loc, p_scale, bytes, seed=, level=, params=)         -> sample

Dims are flattened in memory order and standardised by the prior. Dims whose KL exceeds
`outlier_bits` are sent as 16-bit quantised values (the encoder keeps the dequantised value,
as the decoder will see it). The rest is cut, in scan order, into segments: zero runs (at
least `zero_run` consecutive dims of KL <= `zero_kl_bits`: a prior sample from the shared
stream, no index) and groups whose KL fits the group budget, coded by the level's sampler.
With `adaptive` params each group's index length follows its KL (importance: L_g =
ceil(KL_g + t) bits, 2^L_g candidates; greedy: S_g = ceil((KL_g + margin) / b) steps), and is
sent as side information; otherwise every group costs B bits / S steps (the thesis code).

    u8 version (2) | u8 sampler | u16 params check | varint n_segments | varint n_zero_runs
    | varint n_outliers | varint len(rans) | rANS side info (segment kinds/lengths, group
    sizes, zero-run lengths, outlier gaps) | raw bits (tables or raw small fields, mantissas,
    outlier values, indices) | u32 CRC32 of everything before
"""

import math
import struct
import time
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from codec import greedy, importance, rng
from codec.entropy import (
    BitReader,
    BitWriter,
    RecDecodeError,
    bucketize,
    decode_fields,
    encode_fields,
    unbucketize,
)
from codec.params import CoderParams, LevelParams

SECTION_FORMAT_VERSION = 2  # of a level section (codec/bitstream.py has the container's FORMAT_VERSION)
OUTLIER_BITS_Q = 16
_SAMPLER_IDS = {"greedy": 1, "importance": 2}
_LONG = rng.GROUP_BITS + 1  # bit lengths of run lengths and gaps (a level has < 2^28 dims)
_DIRECT_ALPHABET = 64  # group sizes up to this are rANS symbols; larger ones are bucketed


def kl_nats(m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Per-dim KL(N(m, v) || N(0, 1)) in nats (float64)."""
    return 0.5 * (v + m * m - 1.0 - torch.log(v))


def standardise(q_loc, q_scale, p_loc, p_scale) -> tuple[torch.Tensor, torch.Tensor]:
    """Target in prior-standardised space, float64: mean (mu_q - mu_p)/sigma_p, var (s_q/s_p)^2."""
    p_scale = p_scale.double().flatten()
    m = (q_loc.double().flatten() - p_loc.double().flatten()) / p_scale
    v = (q_scale.double().flatten() / p_scale) ** 2
    return m, v


def partition(kl_bits: np.ndarray, budget_bits: float, max_size: int) -> np.ndarray:
    """Group sizes: consecutive runs closed before their KL would exceed the budget.

    A dim above the budget gets a group of its own; there is never an empty group and the
    last group is simply what is left.
    """
    n = kl_bits.size
    cum = np.concatenate([[0.0], np.cumsum(kl_bits)])
    sizes, s = [], 0
    while s < n:  # one iteration per group, each a binary search
        e = int(np.searchsorted(cum, cum[s] + budget_bits, side="right")) - 1
        e = min(max(e, s + 1), s + max_size, n)
        sizes.append(e - s)
        s = e
    return np.asarray(sizes, dtype=np.int64)


def segments(kl_bits: np.ndarray, lp: LevelParams) -> tuple[np.ndarray, np.ndarray]:
    """Cut the (non-outlier) dims into segments: (sizes, is_zero_run).

    Maximal runs of at least `lp.zero_run` dims each with KL <= `lp.zero_kl_bits` become zero
    runs (a prior sample from the shared stream, no index); the dims between them are
    partitioned into coded groups.
    """
    n = kl_bits.size
    cuts = [(0, 0)]
    if lp.zero_run > 0 and n:
        zero = np.concatenate([[False], kl_bits <= lp.zero_kl_bits, [False]])
        edges = np.flatnonzero(np.diff(zero.astype(np.int8)))
        starts, ends = edges[0::2], edges[1::2]
        keep = ends - starts >= lp.zero_run
        cuts += list(zip(starts[keep].tolist(), ends[keep].tolist()))
    cuts.append((n, n))
    sizes, zero_flags = [], []
    for (_, a), (b, e) in zip(cuts[:-1], cuts[1:]):
        if b > a:
            part = partition(kl_bits[a:b], lp.budget_bits, lp.max_group_size)
            sizes += part.tolist()
            zero_flags += [False] * part.size
        if e > b:
            sizes.append(e - b)
            zero_flags.append(True)
    return np.asarray(sizes, dtype=np.int64), np.asarray(zero_flags, dtype=bool)


def index_lengths(group_kl_bits: np.ndarray, lp: LevelParams) -> np.ndarray:
    """Per coded group: importance index bits L_g, or greedy steps S_g (adaptive params only).

    Importance: L_g = ceil(KL_g + t) in [0, B], so the group draws 2^L_g candidates and its
    index costs L_g bits. Greedy: S_g = ceil((KL_g + margin) / (b - t)) in [1, S] steps.
    """
    if lp.sampler == "importance":
        raw = np.ceil(group_kl_bits + lp.oversample_bits - 1e-9)
        return np.clip(raw, 0, lp.index_bits).astype(np.int64)
    raw = np.ceil((group_kl_bits + lp.margin_nats / math.log(2)) / lp.step_bits - 1e-9)
    return np.clip(raw, 1, lp.steps).astype(np.int64)


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


def _check_dims(n: int) -> None:
    if n >= 1 << rng.GROUP_BITS:
        raise ValueError(f"a level holds at most 2^{rng.GROUP_BITS} dims, got {n}")


def _check(params: CoderParams, level: int) -> int:
    return zlib.crc32(params.format_bytes(level)) & 0xFFFF


def _size_field(lp: LevelParams) -> tuple[int, bool]:
    direct = lp.max_group_size <= _DIRECT_ALPHABET
    return (lp.max_group_size if direct else lp.max_group_size.bit_length()), direct


@dataclass
class _Plan:
    """What the encoder decides from q and p before any sampling: the dims' standardised target,
    which dims are outliers, zero runs or coded, and the coded groups' sizes and index lengths."""

    m: torch.Tensor  # (n,) float64 standardised posterior mean
    v: torch.Tensor  # (n,) float64 standardised posterior variance
    kl: torch.Tensor  # (n,) float64 KL of each dim, nats
    kl_bits: np.ndarray  # (n,) the same in bits
    out_np: np.ndarray  # (n,) bool: sent as a quantised outlier
    out_pos: torch.Tensor  # positions of the outliers
    inl_np: np.ndarray  # positions of the other dims
    seg_sizes: np.ndarray  # segments of the inliers, in scan order
    seg_zero: np.ndarray  # whether each segment is a zero run
    seg_dim_zero: np.ndarray  # per inlier dim: in a zero run
    zero_pos: torch.Tensor  # positions of the zero-run dims
    cod_pos: torch.Tensor  # positions of the coded dims, group by group
    sizes: np.ndarray  # coded group sizes
    group_kl: torch.Tensor  # (G,) float64 KL of each coded group, nats
    lens: np.ndarray | None  # per coded group: steps (greedy) or index bits (importance); None if fixed


def _plan(q_loc, q_scale, p_loc, p_scale, lp: LevelParams) -> _Plan:
    if not (q_loc.shape == q_scale.shape == p_scale.shape == p_loc.shape):
        raise ValueError("q_loc, q_scale, p_loc, p_scale must have the same shape")
    m, v = standardise(q_loc, q_scale, p_loc, p_scale)
    kl = kl_nats(m, v)
    kl_bits = (kl / math.log(2)).cpu().numpy()
    _check_dims(m.numel())
    device = m.device
    out_np = kl_bits > lp.outlier_bits
    if lp.outlier_min_ratio > 0:  # greedy: shards of variance 1/S cannot resolve these
        ratio = (v.sqrt() * math.sqrt(lp.steps)).cpu().numpy()
        out_np |= (ratio < lp.outlier_min_ratio) & (kl_bits > lp.outlier_min_bits)
    outlier = torch.from_numpy(out_np).to(device)
    inl_pos = torch.nonzero(~outlier).squeeze(1)
    inl_np = inl_pos.cpu().numpy()
    seg_sizes, seg_zero = segments(kl_bits[inl_np], lp)
    seg_dim_zero = np.repeat(seg_zero, seg_sizes)
    cod_pos = inl_pos[torch.from_numpy(~seg_dim_zero).to(device)]
    sizes = seg_sizes[~seg_zero]
    group_kl = torch.zeros(len(sizes), dtype=torch.float64, device=device)
    group_kl.index_add_(
        0,
        torch.repeat_interleave(torch.arange(len(sizes), device=device), torch.from_numpy(sizes).to(device)),
        kl[cod_pos],
    )
    lens = index_lengths((group_kl / math.log(2)).cpu().numpy(), lp) if lp.adaptive else None
    return _Plan(
        m=m,
        v=v,
        kl=kl,
        kl_bits=kl_bits,
        out_np=out_np,
        out_pos=torch.nonzero(outlier).squeeze(1),
        inl_np=inl_np,
        seg_sizes=seg_sizes,
        seg_zero=seg_zero,
        seg_dim_zero=seg_dim_zero,
        zero_pos=inl_pos[torch.from_numpy(seg_dim_zero).to(device)],
        cod_pos=cod_pos,
        sizes=sizes,
        group_kl=group_kl,
        lens=lens,
    )


def _greedy_walk(
    m,
    v,
    sizes: np.ndarray,
    lens: np.ndarray | None,
    lp: LevelParams,
    params: CoderParams,
    decay: float,
    table: torch.Tensor,
    *,
    seed: int,
    level: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """greedy.encode of these groups with the level's settings, the given shard decay and pool."""
    device = m.device
    return greedy.encode(
        m,
        v,
        torch.from_numpy(sizes).to(device),
        seed=seed,
        level=level,
        bits=lp.index_bits,
        steps=lp.steps,
        width=params.pool_width,
        windows=params.pool_windows,
        memory_bytes=params.memory_bytes(device),
        gemm_dtype=params.gemm_torch_dtype,
        group_steps=None if lens is None else torch.from_numpy(lens).to(device),
        decay=decay,
        auxiliary=lp.target == "auxiliary",
        sample=lp.selection == "sample",
        table=table,
    )


def _choose_decay(
    plan: _Plan, lp: LevelParams, params: CoderParams, table: torch.Tensor, *, seed: int, level: int
) -> float:
    """The shard decay, among `lp.decay_choices`, whose coded sample lies closest to the posterior
    mean: the smallest mean of u^2 = (z - mu_q)^2 / sigma_q^2 over the coded dims.

    A greedy walk's sample is biased, and how much depends on how its shard sizes fit the
    posterior's widths: shards that shrink too fast leave the broad dims to a few coarse steps,
    too slowly and the last steps cannot pin the sharp ones. Where the walk misses, u^2 grows; and
    since the posterior precision is the prior's plus the likelihood's curvature, the excess of
    sum u^2 tracks the excess distortion of the decoded image. Each choice is tried on every
    `decay_trial_every`-th coded group (the same statistics, a fraction of the work).
    """
    pick = np.arange(plan.sizes.size) % lp.decay_trial_every == 0
    if len(lp.decay_choices) < 2 or not pick.any():
        return lp.shard_decay
    dims = plan.cod_pos[torch.from_numpy(np.repeat(pick, plan.sizes)).to(plan.m.device)]
    m, v = plan.m[dims], plan.v[dims]
    lens = None if plan.lens is None else plan.lens[pick]
    scores = []
    for decay in lp.decay_choices:
        _, x = _greedy_walk(m, v, plan.sizes[pick], lens, lp, params, decay, table, seed=seed, level=level)
        scores.append(float(((x.double() - m) ** 2 / v).mean()))
    return lp.decay_choices[int(np.argmin(scores))]


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
    plan = _plan(q_loc, q_scale, p_loc, p_scale, lp)
    table = None
    if lp.sampler == "greedy":
        most_blocks = int(-(-plan.sizes.max() // params.pool_width)) if plan.sizes.size else 1
        table = greedy.pool_table(
            seed, level, lp.index_bits, min(params.pool_windows, most_blocks) * params.pool_width, plan.m.device
        )
        if choose_decay:
            params = params.with_level(
                level, shard_decay=_choose_decay(plan, lp, params, table, seed=seed, level=level)
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
    draw = m[out_pos] + v[out_pos].sqrt() * rng.outlier_normals(seed, level, out_pos).double()
    r = params.outlier_range
    q = torch.round((draw.clamp(-r, r) + r) / (2 * r) * ((1 << OUTLIER_BITS_Q) - 1)).long()
    eps[out_pos] = _dequantise(q, r)
    eps[zero_pos] = rng.zero_run_normals(seed, level, zero_pos)

    if lp.sampler == "greedy":
        idx, x = _greedy_walk(
            m[cod_pos], v[cod_pos], sizes, lens, lp, params, lp.shard_decay, table, seed=seed, level=level
        )
        steps_np = np.full(len(sizes), lp.steps) if lens is None else lens
        used = np.arange(lp.steps)[None, :] < steps_np[:, None]
        idx_np = idx.cpu().numpy()[used]
        widths = lp.index_bits
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
    eps[cod_pos] = x

    bits = BitWriter()
    len_sym, len_alphabet = _length_symbols(lens, seg_zero, lp)
    size_alphabet, direct = _size_field(lp)
    size_sym, size_mant, size_w = bucketize(sizes - 1 if direct else sizes, direct)
    zl_sym, zl_mant, zl_w = bucketize(seg_sizes[seg_zero], 0)
    gaps = torch.diff(out_pos, prepend=out_pos.new_tensor([-1])).cpu().numpy()
    gap_sym, gap_mant, gap_w = bucketize(gaps, 0)
    rans = encode_fields([(len_sym, len_alphabet), (size_sym, size_alphabet), (zl_sym, _LONG), (gap_sym, _LONG)], bits)
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
    return sample, data, stats


def _length_symbols(lens, seg_zero: np.ndarray, lp: LevelParams) -> tuple[np.ndarray, int]:
    """One symbol per segment: 0 for a zero run, else 1 + the group's index length (importance
    L_g) or its steps - 1 (greedy S_g); just 1 when lengths are fixed (not adaptive)."""
    sym = np.zeros(seg_zero.size, dtype=np.int64)
    if lens is None:
        sym[~seg_zero] = 1
        return sym, 2
    sym[~seg_zero] = lens + 1 if lp.sampler == "importance" else lens
    return sym, _length_alphabet(lp)


def _length_alphabet(lp: LevelParams) -> int:
    if not lp.adaptive:
        return 2
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
    _check_dims(n)
    n_groups = n_seg - n_zero
    if n_out > n or n_seg > n - n_out or n_zero > n_seg or (n_seg == 0) != (n_out == n):
        raise RecDecodeError(f"level {level}: {n_seg} segments / {n_out} outliers for {n} dims")
    if pos + n_rans > len(body):
        raise RecDecodeError(f"level {level}: side information truncated")
    bits = BitReader(body[pos + n_rans :])
    size_alphabet, direct = _size_field(lp)
    len_sym, size_sym, zl_sym, gap_sym = decode_fields(
        body[pos : pos + n_rans],
        [(n_seg, _length_alphabet(lp)), (n_groups, size_alphabet), (n_zero, _LONG), (n_out, _LONG)],
        bits,
    )
    seg_zero = len_sym == 0
    if int(seg_zero.sum()) != n_zero:
        raise RecDecodeError(f"level {level}: zero-run count mismatch")
    sizes = unbucketize(size_sym, bits, direct) + (1 if direct else 0)
    zero_len = unbucketize(zl_sym, bits, False)
    gaps = unbucketize(gap_sym, bits, False)
    q = torch.from_numpy(bits.read(n_out, OUTLIER_BITS_Q).astype(np.int64))
    lens = len_sym[~seg_zero] - (1 if lp.sampler == "importance" else 0)
    if lp.sampler == "greedy":
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
            seed=seed,
            level=level,
            bits=lp.index_bits,
            steps=lp.steps,
            width=params.pool_width,
            windows=params.pool_windows,
            group_steps=torch.from_numpy(steps_np).to(device),
            decay=lp.shard_decay,
        )
    else:
        eps[cod_pos] = importance.decode(
            idx_t, sizes_t, seed=seed, level=level, bits=lp.index_bits, width=lp.pool_width
        )
    return _destandardise(eps, p_loc, p_scale)
