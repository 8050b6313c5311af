"""Shared randomness for REC: counter-based hashing to N(0,1), identical on every device.

Every random number the coder uses is a pure function of (file seed, counter), where the
64-bit counter packs (domain, level, fields...) injectively. The hash is SplitMix64,
`mix64(key + (counter + 1) * GAMMA)` with `key = mix64(seed)`: for one seed it is a
bijection of the counter, so two different keys can never give the same stream.

Only integer ops, table gathers and separately executed IEEE +,-,* (correctly rounded on
CPU and CUDA) are used: integers AND float normals are bit-identical across devices.
Bump RNG_VERSION on ANY change that alters a value (tests/expected/rng_v1.json guards it).
"""

import sys

import torch

RNG_VERSION = 1

_MASK64 = (1 << 64) - 1
GAMMA = 0x9E3779B97F4A7C15
_M1, _M2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB

# Counter layout: domain (3 bits) | level (3 bits) | 58-bit payload.
SCAN, POOL, SCRAMBLE, OUTLIER, GUMBEL, ZERO_RUN = 0, 1, 2, 3, 4, 5
MAX_LEVEL = 7
ROW_BITS, COL_BITS = 24, 16  # pool entries: row = candidate, col = pool column
GROUP_BITS, STEP_BITS, BLOCK_BITS, WORD_BITS = 28, 8, 8, 4  # scramble words


def _signed(x: int) -> int:
    """Python int in [0, 2^64) -> the int64 with the same bits."""
    x &= _MASK64
    return x - (1 << 64) if x >> 63 else x


def mix64_int(x: int) -> int:
    """SplitMix64 finaliser on Python ints (the reference for the tensor version)."""
    x &= _MASK64
    x = ((x ^ (x >> 30)) * _M1) & _MASK64
    x = ((x ^ (x >> 27)) * _M2) & _MASK64
    return x ^ (x >> 31)


def _srl(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _srl_xor_(x: torch.Tensor, tmp: torch.Tensor, k: int) -> None:
    torch.bitwise_right_shift(x, k, out=tmp)
    x.bitwise_xor_(tmp.bitwise_and_((1 << (64 - k)) - 1))


def mix64_(x: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """SplitMix64 finaliser, in place on int64 (multiplication wraps like uint64).

    In-place on cache-sized chunks: fresh multi-MB tensors per op cost 10x in page faults.
    """
    _srl_xor_(x, tmp, 30)
    x.mul_(_signed(_M1))
    _srl_xor_(x, tmp, 27)
    x.mul_(_signed(_M2))
    _srl_xor_(x, tmp, 31)
    return x


def seed_key(seed: int) -> int:
    if not 0 <= seed < 1 << 64:
        raise ValueError(f"seed must be in [0, 2^64), got {seed}")
    return mix64_int(seed)


def tile_seed(seed: int, tile: int) -> int:
    """The seed of tile `tile`'s sections in a tiled file (tile 0 keeps the file seed): distinct for
    every tile of a file, since GAMMA is odd, so every tile draws from its own streams."""
    seed_key(seed)
    return (seed + tile * GAMMA) & _MASK64


def counter_base(domain: int, level: int) -> int:
    """High bits of the counter; the payload below them is filled by the caller."""
    if not 0 <= level <= MAX_LEVEL:
        raise ValueError(f"level must be in [0, {MAX_LEVEL}], got {level}")
    return (domain << 61) | (level << 58)


CHUNK = 1 << 15  # elements per in-place chunk: cache-sized, and at torch's parallel grain size
# so these small ops run serially (OpenMP sync per tiny op costs 20x on a busy machine)
GPU_CHUNK = 1 << 22  # on a GPU, kernel launches cost more than cache misses (not yet timed on one)


def _chunk(device: torch.device) -> int:
    return CHUNK if device.type == "cpu" else GPU_CHUNK


def _tail_without_sync(device: torch.device) -> bool:
    """On a GPU, `if mask.any()` would wait for the device once per chunk."""
    return device.type != "cpu"


def _chunks(n: int, device: torch.device):
    step = _chunk(device)
    for i in range(0, n, step):
        yield i, min(i + step, n)


def _hash_(x: torch.Tensor, tmp: torch.Tensor, key: int) -> torch.Tensor:
    x.mul_(_signed(GAMMA)).add_(_signed(key + GAMMA))  # key + (x + 1) * GAMMA mod 2^64
    return mix64_(x, tmp)


def hash64(seed: int, counters: torch.Tensor) -> torch.Tensor:
    """int64 hash of each counter (any shape), keyed by the file seed."""
    key = _signed(seed_key(seed))
    out = counters.to(torch.int64).flatten().clone()
    tmp = torch.empty(min(_chunk(out.device), out.numel()), dtype=torch.int64, device=out.device)
    for i, j in _chunks(out.numel(), out.device):
        _hash_(out[i:j], tmp[: j - i], key)
    return out.view(counters.shape)


# --- N(0,1) from 32 hash bits: sign | 16-bit cell | 15-bit fraction -------------------------
# |z| = H(v) = Phi^-1((1+v)/2) is a piecewise-linear interpolation of a 2^16-cell quantile
# table; the outermost cell (prob 2^-16) uses a 2^15-entry tail table reaching |z| ~ 6.


def _build_tables() -> tuple[torch.Tensor, torch.Tensor]:
    # Built in float64 on the CPU from the small tail probabilities (accurate), then rounded
    # to float32 once; the tables are data, so every device sees the same values.
    k = torch.arange(65536, dtype=torch.float64)
    central = -torch.special.ndtri((1.0 - k / 65536.0) / 2.0)  # H(k / 2^16), k < 2^16
    j = torch.arange(32768, dtype=torch.float64)
    tail = -torch.special.ndtri((2.0**-16 - (j + 0.5) * 2.0**-31) / 2.0)
    return central.float(), tail.float()


_CENTRAL, _TAIL = _build_tables()
# hi - lo of each cell, rounded to float32 once (the value the subtraction gives at run time),
# pre-scaled by 2^-15: exact, so (diff * 2^-15) * f rounds like diff * (f * 2^-15).
_DIFF = (_CENTRAL[torch.arange(1, 65537).clamp(max=65535)] - _CENTRAL) * 2.0**-15
_TABLES: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if device not in _TABLES:
        _TABLES[device] = (_CENTRAL.to(device), _TAIL.to(device), _DIFF.to(device))
    return _TABLES[device]


def _normal_(bits: torch.Tensor, out: torch.Tensor, cell: torch.Tensor, tmp: torch.Tensor, lo: torch.Tensor) -> None:
    """float32 N(0,1) from the low 32 bits of int64 `bits`, written into `out` (same length)."""
    central, tail, diff = _tables(bits.device)
    torch.bitwise_right_shift(bits, 15, out=cell).bitwise_and_(0xFFFF)
    torch.index_select(central, 0, cell, out=lo)
    torch.index_select(diff, 0, cell, out=out)  # (hi - lo) * 2^-15
    out.mul_(torch.bitwise_and(bits, 0x7FFF, out=tmp))  # times the 15-bit fraction (exact in fp32)
    out.add_(lo)  # lo + (hi - lo) * frac as separately rounded ops: the same on every device
    in_tail = cell == 65535
    if _tail_without_sync(bits.device):  # gather a tail value for every entry instead
        torch.where(in_tail, tail[tmp], out, out=out)
    elif bool(in_tail.any()):
        out[in_tail] = tail[tmp[in_tail]]
    # bit 31 of `bits` onto the float's sign bit: int64 -> int32 keeps the low 32 bits, the same
    # two's-complement wrap-around the hash's int64 products rely on (torch.where(x < 0, -x, x)
    # gives the same values but made level-1 decoding ~15 % slower)
    sign = torch.bitwise_and(bits, 0x80000000, out=tmp).to(torch.int32)
    out.view(torch.int32).bitwise_xor_(sign)


def normal_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """float32 N(0,1) from the low 32 bits of each int64 in `bits` (any shape)."""
    flat = bits.flatten()
    out = torch.empty(flat.shape, dtype=torch.float32, device=bits.device)
    n = min(_chunk(flat.device), flat.numel())
    cell, tmp = (torch.empty(n, dtype=torch.int64, device=bits.device) for _ in range(2))
    lo = torch.empty(n, dtype=torch.float32, device=bits.device)
    for i, j in _chunks(flat.numel(), flat.device):
        m = j - i
        _normal_(flat[i:j], out[i:j], cell[:m], tmp[:m], lo[:m])
    return out.view(bits.shape)


def normals(seed: int, counters: torch.Tensor) -> torch.Tensor:
    """One float32 N(0,1) per counter (any shape): low 32 bits of its hash."""
    key = _signed(seed_key(seed))
    flat = counters.to(torch.int64).flatten()
    out = torch.empty(flat.shape, dtype=torch.float32, device=flat.device)
    n = min(_chunk(flat.device), flat.numel())
    h, cell, tmp = (torch.empty(n, dtype=torch.int64, device=flat.device) for _ in range(3))
    lo = torch.empty(n, dtype=torch.float32, device=flat.device)
    for i, j in _chunks(flat.numel(), flat.device):
        m = j - i
        _hash_(h[:m].copy_(flat[i:j]), tmp[:m], key)
        _normal_(h[:m], out[i:j], cell[:m], tmp[:m], lo[:m])
    return out.view(counters.shape)


def normal_pairs(seed: int, counters: torch.Tensor) -> torch.Tensor:
    """Two float32 N(0,1) per counter, from the low and high 32 bits of its hash: (..., 2)."""
    key = _signed(seed_key(seed))
    flat = counters.to(torch.int64).flatten()
    out = torch.empty(flat.numel(), 2, dtype=torch.float32, device=flat.device)
    n = min(_chunk(flat.device), flat.numel())
    h, cell, tmp = (torch.empty(n, dtype=torch.int64, device=flat.device) for _ in range(3))
    lo, half = (torch.empty(n, dtype=torch.float32, device=flat.device) for _ in range(2))
    for i, j in _chunks(flat.numel(), flat.device):
        m = j - i
        _hash_(h[:m].copy_(flat[i:j]), tmp[:m], key)
        _normal_(h[:m], half[:m], cell[:m], tmp[:m], lo[:m])
        out[i:j, 0] = half[:m]
        _normal_(h[:m].bitwise_right_shift_(32), half[:m], cell[:m], tmp[:m], lo[:m])
        out[i:j, 1] = half[:m]
    return out.view(*counters.shape, 2)


def uniform53(seed: int, counters: torch.Tensor) -> torch.Tensor:
    """float64 uniforms in (0, 1) from 53 hash bits (never 0 or 1: safe for -log(-log u))."""
    top = _srl(hash64(seed, counters), 11).to(torch.float64)
    return (top + 0.5) * 2.0**-53


# --- the shared candidate pool and its per-group scrambling -----------------------------------


def pool_counters(level: int, rows: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """Counters of pool entry pairs: (row, col // 2) -> the hash giving columns col, col+1."""
    base = _signed(counter_base(POOL, level))
    return base | (rows.to(torch.int64) << COL_BITS) | pairs.to(torch.int64)


def pool_entries(seed: int, level: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Random access into the pool: the decoder regenerates only the chosen entries."""
    cols = cols.to(torch.int64)
    bits = hash64(seed, pool_counters(level, rows, cols >> 1))
    bits = torch.where((cols & 1).bool(), bits >> 32, bits)  # odd columns: high half
    return normal_from_bits(bits)


def pool_window_bits(seed: int, level: int, rows: torch.Tensor, windows: torch.Tensor, width: int) -> torch.Tensor:
    """(nb, width) int64 whose low 32 bits make (normal_from_bits) the pool entries of row rows[b],
    columns windows[b] * width ... + width - 1: one hash per two columns, as pool_block. The
    decoder's hot loop permutes and signs these bits before turning them into normals (flipping
    bit 31 negates the normal exactly)."""
    half = width // 2
    pairs = (windows.to(torch.int64) * half)[:, None] + torch.arange(half, device=rows.device)
    h = hash64(seed, pool_counters(level, rows[:, None], pairs))  # (nb, half)
    if sys.byteorder == "little":  # each int64 viewed as its (low, high) int32 halves
        return h.view(torch.int32).view(-1, width).to(torch.int64)  # sign-extended: bits 0-31 kept
    return torch.stack([h & 0xFFFFFFFF, _srl(h, 32)], dim=2).view(-1, width)


def pool_block(seed: int, level: int, row0: int, n_rows: int, n_cols: int, device) -> torch.Tensor:
    """(n_rows, n_cols) slice of the pool starting at row0; equal to pool_entries elementwise."""
    if row0 + n_rows > 1 << ROW_BITS or n_cols > 1 << COL_BITS or n_cols % 2:
        raise ValueError("pool block does not fit the counter layout")
    rows = torch.arange(row0, row0 + n_rows, device=device)[:, None]
    pairs = torch.arange(n_cols // 2, device=device)[None, :]
    return normal_pairs(seed, pool_counters(level, rows, pairs)).view(n_rows, n_cols)


def scramble_words(
    seed: int, level: int, groups: torch.Tensor, step: int | torch.Tensor, blocks: torch.Tensor, n_words: int
) -> torch.Tensor:
    """(..., n_words) int64 hashes keyed by (group, step, block): permutation, signs, offsets.

    `step` is an int or a tensor broadcasting with `groups` and `blocks`."""
    if torch.is_tensor(step):
        max_step = int(step.max()) if step.numel() else 0
    else:
        max_step = step
    if max_step >= 1 << STEP_BITS or n_words > 1 << WORD_BITS:
        raise ValueError("step or word count too large for the counter layout")
    base = _signed(counter_base(SCRAMBLE, level))
    key = (
        (groups.to(torch.int64) << (STEP_BITS + BLOCK_BITS + WORD_BITS))
        | (step << (BLOCK_BITS + WORD_BITS))
        | (blocks.to(torch.int64) << WORD_BITS)
    )
    words = torch.arange(n_words, device=groups.device)
    return hash64(seed, base | key[..., None] | words)


def outlier_normals(seed: int, level: int, dims: torch.Tensor) -> torch.Tensor:
    """Encoder-private N(0,1) draws for outlier dims (keyed by flat dim index)."""
    return normals(seed, _signed(counter_base(OUTLIER, level)) | dims.to(torch.int64))


def zero_run_normals(seed: int, level: int, dims: torch.Tensor) -> torch.Tensor:
    """Shared N(0,1) prior draws for dims in zero-KL runs (keyed by flat dim index)."""
    return normals(seed, _signed(counter_base(ZERO_RUN, level)) | dims.to(torch.int64))


def scan_order(seed: int, level: int, n: int, device) -> torch.Tensor:
    """A shared pseudo-random permutation of a level's n flat dims: the dims sorted by their hash."""
    return torch.argsort(hash64(seed, _signed(counter_base(SCAN, level)) | torch.arange(n, device=device)))


def gumbel(seed: int, level: int, groups: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Encoder-private float64 Gumbel noise for sampling an index proportionally to its weight."""
    base = _signed(counter_base(GUMBEL, level))
    u = uniform53(seed, base | (groups.to(torch.int64) << ROW_BITS) | rows.to(torch.int64))
    return -torch.log(-torch.log(u))


# --- the exact coders' streams (codec/pfr.py) -------------------------------------------------
# Counter payload: sub-stream (2 bits) | block (20) | candidate index (28) | dim in block (8).
PFR = 6
PFR_POINT, PFR_ARRIVAL, PFR_BIN = 0, 1, 2  # shared within-bin points; private arrivals; private bins
PFR_BIN_ARRIVAL = 3  # private arrivals of one bin's own process (the sp-pfr search)
PFR_BLOCK_BITS, PFR_INDEX_BITS, PFR_DIM_BITS = 20, 28, 8


def pfr_counters(level: int, sub: int, blocks: torch.Tensor, indices: torch.Tensor, dims: torch.Tensor) -> torch.Tensor:
    """Counters of the PFR domain (broadcasting): (sub-stream, block, candidate index, dim in block)."""
    base = _signed(counter_base(PFR, level) | (sub << (PFR_BLOCK_BITS + PFR_INDEX_BITS + PFR_DIM_BITS)))
    return (
        base
        | (blocks.to(torch.int64) << (PFR_INDEX_BITS + PFR_DIM_BITS))
        | (indices.to(torch.int64) << PFR_DIM_BITS)
        | dims.to(torch.int64)
    )


def pfr_point_words(
    seed: int, level: int, blocks: torch.Tensor, ks: torch.Tensor, dims: torch.Tensor, bin_keys: torch.Tensor
) -> torch.Tensor:
    """Shared uniform words (low 32 bits of int64) of point k of bin `bin_keys` of a block, per dim.

    The bin key (up to 63 bits) does not fit the counter, so it keys a second SplitMix64 round:
    mix64(h + (bin_key + 1) * GAMMA) with h the hash of (block, k, dim). For one (block, k, dim)
    this is a bijection of the bin key, so distinct bins never share a word.
    """
    h = hash64(seed, pfr_counters(level, PFR_POINT, blocks, ks, dims))
    h = torch.broadcast_tensors(h, bin_keys)[0].clone()
    x = bin_keys.to(torch.int64).expand_as(h).clone()
    x.mul_(_signed(GAMMA)).add_(h).add_(_signed(GAMMA))
    return mix64_(x, torch.empty_like(x)) & 0xFFFFFFFF


def normal_quantile_words(words: torch.Tensor) -> torch.Tensor:
    """float32 quantile of the table N(0,1) at the 32-bit fixed-point uniforms `words` (int64).

    Monotone in the word: the upper half maps to +H(v) and the lower half, mirrored, to -H(v),
    with normal_from_bits' table H. So 2^l consecutive equal ranges of words are 2^l bins of
    equal mass under the table distribution, the proposal every coder here draws from.
    """
    w = words & 0xFFFFFFFF
    flip = torch.where(w < 0x80000000, 0xFFFFFFFF, 0x80000000)  # lower half: mirror, then set the sign bit
    return normal_from_bits(w ^ flip)


def pfr_private_uniforms(
    seed: int, level: int, sub: int, blocks: torch.Tensor, indices: torch.Tensor, dims: torch.Tensor
) -> torch.Tensor:
    """Encoder-private float64 uniforms in (0, 1): arrival gaps (PFR_ARRIVAL) and bin draws (PFR_BIN)."""
    return uniform53(seed, pfr_counters(level, sub, blocks, indices, dims))


def pfr_private_bin_uniforms(
    seed: int, level: int, blocks: torch.Tensor, ks: torch.Tensor, bin_keys: torch.Tensor
) -> torch.Tensor:
    """Encoder-private float64 uniforms in (0, 1) keyed by (block, bin tuple, k): the arrival gaps
    of each bin's own Poisson process. The bin key (up to 63 bits) is added to the hash of
    (block, k) and hashed again, as in pfr_point_words."""
    h = hash64(seed, pfr_counters(level, PFR_BIN_ARRIVAL, blocks, ks, torch.zeros_like(ks)))
    return uniform53(seed, h + (bin_keys.to(torch.int64) + 1) * _signed(GAMMA))


# --- the rejection sampler's streams (codec/rejection.py) --------------------------------------
# Counter payload: sub-stream (1 bit) | flat dim (28) | candidate index i - 1 (24).
REJECTION = 7
REJECTION_CANDIDATE, REJECTION_UNIFORM = 0, 1  # shared prior candidates; private acceptance uniforms
REJECTION_INDEX_BITS = 24


def rejection_counters(level: int, sub: int, dims: torch.Tensor, rounds: torch.Tensor) -> torch.Tensor:
    """Counters of the rejection domain (broadcasting): (sub-stream, flat dim, round - 1)."""
    base = _signed(counter_base(REJECTION, level) | (sub << (GROUP_BITS + REJECTION_INDEX_BITS)))
    return base | (dims.to(torch.int64) << REJECTION_INDEX_BITS) | (rounds.to(torch.int64) - 1)
