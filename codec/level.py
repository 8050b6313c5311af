"""REC coding of one latent level: q, p (diagonal Gaussians) -> bytes -> the same sample.

    encode_level(q_loc, q_scale, p_loc, p_scale, seed=, level=, params=) -> (sample, bytes)
    decode_level(p_loc, p_scale, bytes, seed=, level=, params=)         -> sample

Dims are flattened in memory order and standardised by the prior. Dims whose KL exceeds
`outlier_bits` are sent as 16-bit quantised values (the encoder keeps the dequantised value,
as the decoder will see it). The rest is cut, in scan order, into runs whose KL fits the
group budget and coded by the level's sampler (greedy or importance). Layout of the bytes:

    u8 version | u8 sampler | u16 params check | varint n_groups | varint n_outliers
    | varint len(rans) | rANS side info (group sizes, outlier gaps) | raw bits (histogram
    tables, mantissas, outlier values, indices) | u32 CRC32 of everything before
"""

import math
import struct
import time
import zlib

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

FORMAT_VERSION = 1
OUTLIER_BITS_Q = 16
_SAMPLER_IDS = {"greedy": 1, "importance": 2}
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


def _check_size(n: int) -> None:
    if n >= 1 << rng.GROUP_BITS:
        raise ValueError(f"a level holds at most 2^{rng.GROUP_BITS} dims, got {n}")


def _check(params: CoderParams, level: int) -> int:
    return zlib.crc32(params.format_bytes(level)) & 0xFFFF


def _size_field(lp: LevelParams) -> tuple[int, bool]:
    direct = lp.max_group_size <= _DIRECT_ALPHABET
    return (lp.max_group_size if direct else lp.max_group_size.bit_length()), direct


@torch.no_grad()
def encode_level(q_loc, q_scale, p_loc, p_scale, *, seed: int, level: int,
                 params: CoderParams, return_stats: bool = False):
    """Code a sample of q = N(q_loc, q_scale^2) against p = N(p_loc, p_scale^2).

    Returns (sample, data) or, with return_stats, (sample, data, stats dict). `sample` has
    the shape and dtype of p_loc and equals decode_level's output bit for bit.
    """
    t0 = time.perf_counter()
    lp = params.for_level(level)
    shape = p_loc.shape
    if not (q_loc.shape == q_scale.shape == p_scale.shape == shape):
        raise ValueError("q_loc, q_scale, p_loc, p_scale must have the same shape")
    m, v = standardise(q_loc, q_scale, p_loc, p_scale)
    kl = kl_nats(m, v)
    kl_bits = (kl / math.log(2)).cpu().numpy()
    n = m.numel()
    _check_size(n)
    outlier = torch.from_numpy(kl_bits > lp.outlier_bits).to(m.device)
    out_pos = torch.nonzero(outlier).squeeze(1)
    inl_pos = torch.nonzero(~outlier).squeeze(1)
    sizes = partition(kl_bits[inl_pos.cpu().numpy()], lp.budget_bits, lp.max_group_size)
    sizes_t = torch.from_numpy(sizes).to(m.device)
    eps = torch.empty(n, dtype=torch.float32, device=m.device)

    # outliers: a private posterior draw, quantised; the encoder keeps what the decoder sees
    draw = m[out_pos] + v[out_pos].sqrt() * rng.outlier_normals(seed, level, out_pos).double()
    r = params.outlier_range
    q = torch.round((draw.clamp(-r, r) + r) / (2 * r) * ((1 << OUTLIER_BITS_Q) - 1)).long()
    eps[out_pos] = _dequantise(q, r)

    common = dict(seed=seed, level=level, bits=lp.index_bits,
                  memory_bytes=params.memory_mb << 20, gemm_dtype=params.gemm_torch_dtype)
    if lp.sampler == "greedy":
        idx, x = greedy.encode(m[inl_pos], v[inl_pos], sizes_t, steps=lp.steps,
                               width=params.pool_width, windows=params.pool_windows, **common)
    else:
        group_kl = torch.zeros(len(sizes), dtype=torch.float64, device=m.device)
        group_kl.index_add_(0, torch.repeat_interleave(
            torch.arange(len(sizes), device=m.device), sizes_t), kl[inl_pos])
        n_cand = torch.exp(group_kl + lp.oversample_bits * math.log(2)).ceil()
        n_cand = n_cand.clamp(1, 1 << lp.index_bits).long()
        idx, x = importance.encode(m[inl_pos], v[inl_pos], sizes_t, n_cand,
                                   width=lp.pool_width, sample=lp.selection == "sample",
                                   **common)
    eps[inl_pos] = x

    bits = BitWriter()
    size_alphabet, direct = _size_field(lp)
    size_sym, size_mant, size_w = bucketize(sizes - 1 if direct else sizes, direct)
    gaps = torch.diff(out_pos, prepend=out_pos.new_tensor([-1])).cpu().numpy()
    gap_sym, gap_mant, gap_w = bucketize(gaps, 0)
    rans = encode_fields([(size_sym, size_alphabet), (gap_sym, 64)], bits)
    bits.write(size_mant, size_w)
    bits.write(gap_mant, gap_w)
    bits.write(q.cpu().numpy(), OUTLIER_BITS_Q)
    side_bits = bits.n_bits
    bits.write(idx.cpu().numpy().reshape(-1), lp.index_bits)
    head = struct.pack(">BBH", FORMAT_VERSION, _SAMPLER_IDS[lp.sampler], _check(params, level))
    head += _varint(len(sizes)) + _varint(out_pos.numel()) + _varint(len(rans))
    body = head + rans + bits.getvalue()
    data = body + struct.pack(">I", zlib.crc32(body))

    sample = _destandardise(eps, p_loc, p_scale)
    if not return_stats:
        return sample, data
    index_bits = idx.numel() * lp.index_bits
    stats = dict(level=level, sampler=lp.sampler, n_dims=n, kl_bits=float(kl_bits.sum()),
                 bits=8 * len(data), index_bits=index_bits,
                 side_bits=8 * len(data) - index_bits, n_groups=len(sizes),
                 n_outliers=int(out_pos.numel()), outlier_kl_bits=float(kl_bits[kl_bits > lp.outlier_bits].sum()),
                 rans_bytes=len(rans), raw_side_bits=side_bits, seconds=time.perf_counter() - t0)
    return sample, data, stats


def _destandardise(eps: torch.Tensor, p_loc: torch.Tensor, p_scale: torch.Tensor) -> torch.Tensor:
    eps = eps.view(p_loc.shape).to(p_loc.dtype)
    return p_loc + p_scale * eps  # two separately rounded ops, as in the decoder


@torch.no_grad()
def decode_level(p_loc, p_scale, data: bytes, *, seed: int, level: int,
                 params: CoderParams) -> torch.Tensor:
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
    if version != FORMAT_VERSION or sampler != _SAMPLER_IDS[lp.sampler]:
        raise RecDecodeError(f"level {level}: format {version}/{sampler} is not supported")
    if check != _check(params, level):
        raise RecDecodeError(f"level {level}: coded with different CoderParams")
    n_groups, pos = _read_varint(body, 4)
    n_out, pos = _read_varint(body, pos)
    n_rans, pos = _read_varint(body, pos)
    n = p_loc.numel()
    _check_size(n)
    if n_out > n or n_groups > n - n_out or (n_groups == 0) != (n_out == n):
        raise RecDecodeError(f"level {level}: {n_groups} groups / {n_out} outliers for {n} dims")
    if pos + n_rans > len(body):
        raise RecDecodeError(f"level {level}: side information truncated")
    bits = BitReader(body[pos + n_rans :])
    size_alphabet, direct = _size_field(lp)
    size_sym, gap_sym = decode_fields(body[pos : pos + n_rans],
                                      [(n_groups, size_alphabet), (n_out, 64)], bits)
    sizes = unbucketize(size_sym, bits, direct) + (1 if direct else 0)
    gaps = unbucketize(gap_sym, bits, False)
    q = torch.from_numpy(bits.read(n_out, OUTLIER_BITS_Q).astype(np.int64))
    idx = bits.read(n_groups * lp.steps, lp.index_bits).astype(np.int64)
    bits.finish()
    out_pos = np.cumsum(gaps) - 1
    if sizes.size and (sizes.min() < 1 or sizes.max() > lp.max_group_size):
        raise RecDecodeError(f"level {level}: group size out of range")
    if int(sizes.sum()) != n - n_out or (out_pos.size and out_pos[-1] >= n):
        raise RecDecodeError(f"level {level}: groups and outliers do not cover {n} dims")

    device = p_loc.device
    outlier = torch.zeros(n, dtype=torch.bool, device=device)
    out_t = torch.from_numpy(out_pos).to(device)
    outlier[out_t] = True
    inl_pos = torch.nonzero(~outlier).squeeze(1)
    eps = torch.empty(n, dtype=torch.float32, device=device)
    eps[out_t] = _dequantise(q.to(device), params.outlier_range)
    sizes_t = torch.from_numpy(sizes).to(device)
    idx_t = torch.from_numpy(idx).to(device)
    if lp.sampler == "greedy":
        eps[inl_pos] = greedy.decode(idx_t.view(n_groups, lp.steps), sizes_t, seed=seed,
                                     level=level, bits=lp.index_bits, steps=lp.steps,
                                     width=params.pool_width, windows=params.pool_windows)
    else:
        eps[inl_pos] = importance.decode(idx_t, sizes_t, seed=seed, level=level,
                                         bits=lp.index_bits, width=lp.pool_width)
    return _destandardise(eps, p_loc, p_scale)
