"""Block-wise Poisson-functional-representation coders of diagonal Gaussians, exact and truncated.

Each block b of dims carries a target q = N(m, diag v) in prior-standardised space (prior
p = N(0, I)) and is coded on its own: encoder and decoder share a stream of candidate points,
the encoder picks one, and only its index is sent. Four methods share one search:

* **pfr** (Li & El Gamal's Poisson functional representation = global-bound A* coding, the
  exact oracle). Shared candidates X_n ~ p, keyed by (block, n, dim); encoder-private arrivals
  T_n = E_1 + ... + E_n, E ~ Exp(1). K = argmin_n T_n / r(X_n), r = q / p. The search stops at
  the first n with T_n / r_max > the best ratio so far (no later candidate can win), r_max =
  exp(D_inf) = prod_d exp(-ln(v_d)/2 + m_d^2 / (2 (1 - v_d))). X_K ~ q exactly;
  E[log2 K] <= KL + (e^-1 + ln 2) / ln 2 ~ KL + 1.53 bits; runtime ~ 2^D_inf steps, finite only
  when every v_d < 1 (a dim with v_d >= 1 makes r unbounded: refused with ValueError, except
  v_d = 1, m_d = 0, where r_d = 1).
* **orc** (ordered random coding / truncated PFR, Theis & Yosri 2022): the same arrivals, a fixed
  budget of N candidates, n* = argmax_{n < N} log r(X_n) - log T_n. Biased for N << 2^KL,
  exact as N -> inf; needs no bound, so any v is allowed.
* **sp-pfr / sp-orc** (space partitioning, He, Flamich & Hernandez-Lobato 2024). Dim d of a block
  is cut into J_d = 2^l_d intervals of equal prior mass (sum_d l_d = L_b bits, given by the
  caller: `bin_bits`, e.g. from `allocate_bin_bits` over per-dim information both sides know).
  The encoder searches the reweighted proposal p'(x) = J pi_j(x) p(x), pi_j = prod_d pi_d,j_d;
  pi is never sent. An arrival of bin j takes the k-th point of that bin's shared stream, keyed
  by (block, bin tuple, k, dim), where k counts earlier arrivals in the same bin, and has weight
  r' = q / p' = r / (J pi_j). The bin tuple is sent raw (L_b bits) with k. With all l_d = 0 both
  are plain pfr / orc. The code length is bounded by KL + E[eps] + log2(KL - L + E[eps] + 1) +
  O(1) with eps = E_q[L - log2 r] (the poster: E[eps] <= 0.9 sqrt(KL) for Gaussians).
  - sp-pfr: pi = Q's bin masses. The superposed arrival process is the union of independent
    processes, one per bin, so `_bin_search` follows each bin's process only while its next
    arrival can still win, under that bin's own bound sup_{B_j} r' (A* coding over the bins).
    Exact; about sum_j sup_{B_j} r / J steps, ~2^(D_inf - L) where the bins follow q. One
    global bound sup r' would stop late: the bins next to q's mode, where q's tail hugs the inner
    edge, hold little Q mass and a large sup r'. It enumerates every bin of a block, so blocks of
    more than MAX_SEARCH_BIN_BITS bin bits are searched under one global bound, with the bin
    weights of sp-orc.
  - sp-orc: N arrivals of the superposed process, each drawing its bin from pi_d,j = (1 - mix)
    Q_d(bin j) + mix / J_d (privately: per dim a uniform bin with probability mix, else j_d =
    floor(J_d Phi(y_d)) with y_d ~ Q_d; mix = DEFAULT_BIN_MIX).

The proposal is the table N(0, 1) of codec/rng.py (integer hashing and a quantile table), so
the decoder's sample is the same float32 on every device; a bin is a range of the 32-bit
fixed-point uniform that table maps, so the bins have exactly equal mass under it. Its support
ends at |x| ~ 6.3: targets far outside it are not reached by any candidate.

Index coding: per block the bin tuple as L_b raw bits, and k >= 1 as a bucket floor(log2 k),
rANS-coded with a histogram table sent in the stream (codec/entropy.py, or raw when cheaper),
plus floor(log2 k) raw mantissa bits.

    u8 format version | u8 method | u32 n_blocks | u32 len(rans) | rANS buckets
    | raw bits (bucket table, bin tuples, mantissas) | u32 CRC32 of everything before

Everything is batched over blocks (no Python loop over blocks). The exact searches loop over
chunks of candidates, each for all blocks still searching; orc / sp-orc, whose budget is fixed,
take batches of consecutive blocks that fit the memory and draw every arrival's bin first, so that
one sort numbers the arrivals of each bin. The four methods stay in one module, past
~300 lines, because they are one search, one candidate stream and one index code.
"""

import math
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from codec import rng
from codec.entropy import BitReader, BitWriter, RecDecodeError, bucketize, decode_fields, encode_fields, unbucketize

FORMAT_VERSION = 1
METHODS = {"pfr": 1, "orc": 2, "sp-pfr": 3, "sp-orc": 4}
EXACT_METHODS = ("pfr", "sp-pfr")
MAX_DIMS_PER_BLOCK = 1 << rng.PFR_DIM_BITS
MAX_BLOCKS = 1 << rng.PFR_BLOCK_BITS
MAX_INDEX = 1 << rng.PFR_INDEX_BITS  # k - 1 is the counter's candidate field
MAX_BIN_BITS_PER_DIM = 20  # keeps >= 12 bits of the 32-bit uniform inside a bin
MAX_BIN_BITS_PER_BLOCK = 62  # the bin tuple is one non-negative int64
MAX_SEARCH_BIN_BITS = 12  # sp-pfr enumerates every bin of a block
INDEX_ALPHABET = 32  # symbols floor(log2 k) of the in-bin index k (< 28)
_SEARCH_BAND_NATS = math.log(2.0)  # sp-pfr: bins whose next bound is within 2x of the top go together
_BOUND_MARGIN_NATS = 1e-3  # the table's bin edges differ from Phi^-1's by ~1e-9: a safe r_max
_LN2 = math.log(2.0)
_PIECE_ELEMS = 1 << 16  # (arrivals x dims) values an orc / sp-orc step takes: about a 2-core CPU's cache
DEFAULT_BIN_MIX = 0.05  # share of uniformly drawn bins in the sp-orc search (encoder-only)
BOUNDED_MEAN_NATS = 1.0  # bounded_target: at most this much of a dim's D_inf from its mean shift
BOUNDED_MIN_GAP = 1e-3  # ... and every variance at most 1 minus this


@dataclass
class BlockLayout:
    """Dims in block order (block b holds sizes[b] consecutive dims) and their bins."""

    sizes: torch.Tensor  # (B,) int64
    dim_block: torch.Tensor  # (D,) block of each dim
    dim_pos: torch.Tensor  # (D,) position of each dim inside its block
    bin_bits: torch.Tensor  # (D,) l_d: dim d is cut into 2^l_d bins
    key_shift: torch.Tensor  # (D,) where j_d sits in its block's bin tuple
    block_bin_bits: torch.Tensor  # (B,) L_b = sum of the block's l_d

    @property
    def n_blocks(self) -> int:
        return self.sizes.numel()


def make_layout(block_sizes, bin_bits, device) -> BlockLayout:
    sizes = torch.as_tensor(block_sizes, dtype=torch.int64, device=device).flatten()
    if sizes.numel() == 0 or int(sizes.min()) < 1:
        raise ValueError("blocks must be non-empty and hold at least one dim each")
    if sizes.numel() > MAX_BLOCKS or int(sizes.max()) > MAX_DIMS_PER_BLOCK:
        raise ValueError(f"at most {MAX_BLOCKS} blocks of at most {MAX_DIMS_PER_BLOCK} dims")
    n_dims = int(sizes.sum())
    dim_block = torch.repeat_interleave(torch.arange(sizes.numel(), device=device), sizes)
    starts = torch.cumsum(sizes, 0) - sizes
    dim_pos = torch.arange(n_dims, device=device) - starts[dim_block]
    if bin_bits is None:
        bits = torch.zeros(n_dims, dtype=torch.int64, device=device)
    else:
        bits = torch.as_tensor(bin_bits, dtype=torch.int64, device=device).flatten()
    if bits.numel() != n_dims or int(bits.min()) < 0 or int(bits.max()) > MAX_BIN_BITS_PER_DIM:
        raise ValueError(f"bin_bits must hold one value in [0, {MAX_BIN_BITS_PER_DIM}] per dim")
    block_bits = torch.zeros(sizes.numel(), dtype=torch.int64, device=device).index_add_(0, dim_block, bits)
    if int(block_bits.max()) > MAX_BIN_BITS_PER_BLOCK:
        raise ValueError(f"at most {MAX_BIN_BITS_PER_BLOCK} bin bits per block")
    key_shift = torch.cumsum(bits, 0) - bits
    key_shift -= (torch.cumsum(block_bits, 0) - block_bits)[dim_block]
    return BlockLayout(sizes, dim_block, dim_pos, bits, key_shift, block_bits)


def _block_sum(values: torch.Tensor, dim_block: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """Sum of per-dim values over each block, along the last axis."""
    out = values.new_zeros(*values.shape[:-1], n_blocks)
    return out.index_add_(values.dim() - 1, dim_block, values)


# --- per-dim information: KL, D_inf, bin allocation ------------------------------------------


def kl_bits(m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Per-dim KL(N(m, v) || N(0, 1)) in bits."""
    return 0.5 * (v + m * m - 1.0 - torch.log(v)) / _LN2


def dinf_bits(m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Per-dim D_inf = log2 sup_x q(x) / p(x) (inf where v >= 1, except v = 1, m = 0: 0)."""
    trivial = (v == 1.0) & (m == 0.0)
    d = (-0.5 * torch.log(v) + 0.5 * m * m / (1.0 - v)) / _LN2
    d = torch.where(v < 1.0, d, torch.full_like(d, math.inf))
    return torch.where(trivial, torch.zeros_like(d), d)


def allocate_bin_bits(info_bits: torch.Tensor, block_sizes, block_bin_bits) -> torch.Tensor:
    """l_d proportional to each dim's share of its block's information (largest remainder).

    `info_bits` is per-dim information both sides know (for a channel, the mutual information;
    for the toys here, the true per-dim KL). Block b gets L_b = block_bin_bits[b] bits, fewer
    where the per-dim cap MAX_BIN_BITS_PER_DIM binds.
    """
    info = info_bits.double().clamp(min=0.0)
    lay = make_layout(block_sizes, None, info.device)
    target = torch.as_tensor(block_bin_bits, dtype=torch.int64, device=info.device).expand(lay.n_blocks)
    total = _block_sum(info, lay.dim_block, lay.n_blocks)
    share = torch.where(total > 0, target.double() / total.clamp(min=1e-300), 0.0)[lay.dim_block] * info
    base = share.floor()
    frac = share - base
    left = target - _block_sum(base, lay.dim_block, lay.n_blocks).long()
    # rank of each dim's remainder inside its block, largest first: sort by (block, -frac)
    order = torch.argsort(lay.dim_block.double() * 2.0 - frac, stable=True)
    starts = torch.cumsum(lay.sizes, 0) - lay.sizes
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=info.device) - starts[lay.dim_block[order]]
    bits = base.long() + (rank < left[lay.dim_block]).long()
    return bits.clamp(max=MAX_BIN_BITS_PER_DIM)


def spread_bin_bits(block_sizes, block_bin_bits, device="cpu") -> torch.Tensor:
    """L_b bin bits of each block spread evenly over its dims (the first dims take the remainder).

    What a decoder computes from the block sizes and L_b alone, when no per-dim information is
    shared; at most MAX_BIN_BITS_PER_DIM a dim, so L_b <= MAX_BIN_BITS_PER_DIM * size."""
    sizes = torch.as_tensor(block_sizes, dtype=torch.int64, device=device)
    return allocate_bin_bits(torch.ones(int(sizes.sum()), dtype=torch.float64, device=device), sizes, block_bin_bits)


def bounded_target(m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Variances an exact search can reach: v' = min(v, max(1 - m^2 / (2 c), 1/2), 1 - gap), c = BOUNDED_MEAN_NATS.

    A dim's D_inf is -ln(v)/2 + m^2 / (2 (1 - v)) nats: unbounded for v >= 1 and huge for v just
    below 1 with m != 0, so a posterior almost as wide as the prior but shifted would make PFR run
    ~e^D_inf steps. Capping v bounds the shift's part by c nats (by m^2 nats where |m| > sqrt(c)
    and the cap stops at 1/2). The capped dims are nearly prior-wide and carry little KL (on
    Kodak latents of the shipped model 0.3-0.6 % of the coded dims, 0.1-5 % of a level's KL),
    and their sample is sqrt(v'/v) narrower than q's (median 0.96-0.98 there); the exact coders
    sample N(m, v') exactly."""
    cap = torch.clamp(1.0 - m * m / (2.0 * BOUNDED_MEAN_NATS), min=0.5).clamp(max=1.0 - BOUNDED_MIN_GAP)
    return torch.minimum(v, cap)


# --- the shared proposal --------------------------------------------------------------------


def _points(seed, level, lay: BlockLayout, dims, ks, keys) -> torch.Tensor:
    """float32 point k (1-based) of bin `keys` of each dim's block, for dims `dims` (broadcasting to at
    most 2-D). Computed a cache-sized piece at a time (codec/rng.py's chunk): the ~30 integer ops per
    value then stay in the cache instead of streaming whole (arrivals x dims) arrays through memory."""
    shape = torch.broadcast_shapes(dims.shape, ks.shape, keys.shape)
    out = torch.empty(shape, dtype=torch.float32, device=dims.device)
    rows, cols = (1, *shape) if len(shape) == 1 else shape
    per_dim = (lay.dim_block[dims], lay.dim_pos[dims], lay.bin_bits[dims], lay.key_shift[dims])
    parts = [t.expand(shape).reshape(rows, cols) for t in (ks, keys, *per_dim)]  # views, no copies
    step = rng.CHUNK if dims.device.type == "cpu" else max(1, rows * cols)  # a GPU takes it whole
    if cols >= step:
        pieces = [(slice(r, r + 1), slice(c, c + step)) for r in range(rows) for c in range(0, cols, step)]
    else:
        per = step // max(1, cols)
        pieces = [(slice(r, r + per), slice(None)) for r in range(0, rows, per)]
    flat = out.view(rows, cols)
    for rs, cs in pieces:
        k, key, block, pos, bits, shift = (t[rs, cs] for t in parts)
        j = (key >> shift) & ((1 << bits) - 1)
        words = rng.pfr_point_words(seed, level, block, k - 1, pos, key)
        flat[rs, cs] = rng.normal_quantile_words((j << (32 - bits)) | (words >> bits))
    return out


def _log_interval_mass(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """log(Phi(hi) - Phi(lo)) for lo < hi, accurate in both tails and for narrow intervals."""
    flip = lo > 0  # work on the side of the mean where Phi is small
    a, b = torch.where(flip, -hi, lo), torch.where(flip, -lo, hi)
    la, lb = torch.special.log_ndtr(a), torch.special.log_ndtr(b)
    return lb + torch.log(-torch.expm1(la - lb))


def _bin_edges(j: torch.Tensor, bits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Prior quantile edges of bin j of 2^bits equal-mass bins (float64, +-inf at the ends)."""
    n_bins = (1 << bits).double()
    return torch.special.ndtri(j.double() / n_bins), torch.special.ndtri((j + 1).double() / n_bins)


def _log_bin_weight(m, s, j, bits, mix: float) -> torch.Tensor:
    """log pi_d,j = log((1 - mix) Q_d(bin j) + mix / J_d): the search's probability of bin j."""
    lo, hi = _bin_edges(j, bits)
    log_q = _log_interval_mass((lo - m) / s, (hi - m) / s)
    if mix == 0.0:
        return log_q
    return torch.logaddexp(log_q + math.log1p(-mix), math.log(mix) - bits * _LN2)


def _log_ratio_dims(x: torch.Tensor, m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Per-dim log q(x)/p(x) in nats (float64)."""
    return -0.5 * (x - m) ** 2 / v - 0.5 * torch.log(v) + 0.5 * x * x


def _bin_table(m, v, lay: BlockLayout, mix: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every bin of every dim (sum_d 2^l_d entries, dim d's from offset[d]): (offset, log pi_d,j,
    log sup_{bin j} r_d / (J_d pi_d,j)), in nats.

    log r_d is a concave quadratic (v < 1) peaking at x* = m / (1 - v), so its sup over a bin is
    at x* clamped into the bin.
    """
    n_bins = 1 << lay.bin_bits
    offset = torch.cumsum(n_bins, 0) - n_bins
    dims = torch.repeat_interleave(torch.arange(m.numel(), device=m.device), n_bins)
    j = _segment_ranks(n_bins)
    md, vd, bits = m[dims], v[dims], lay.bin_bits[dims]
    peak = torch.where(vd < 1.0, md / (1.0 - vd).clamp(min=1e-300), torch.zeros_like(md))
    lo, hi = _bin_edges(j, bits)
    x = torch.minimum(torch.maximum(peak, lo), hi)
    log_pi = _log_bin_weight(md, vd.sqrt(), j, bits, mix)
    return offset, log_pi, _log_ratio_dims(x, md, vd) - bits * _LN2 - log_pi


def _log_bounds(m, v, lay: BlockLayout, mix: float) -> torch.Tensor:
    """Per block log sup_x r'(x) in nats: per dim, the max over its bins of sup r_d / (J_d pi_d,j)."""
    offset, _, log_sup = _bin_table(m, v, lay, mix)
    dims = torch.repeat_interleave(torch.arange(m.numel(), device=m.device), 1 << lay.bin_bits)
    per_dim = torch.full_like(m, -math.inf).scatter_reduce_(0, dims, log_sup, "amax")
    return _block_sum(per_dim, lay.dim_block, lay.n_blocks) + _BOUND_MARGIN_NATS


# --- the search -----------------------------------------------------------------------------


def _unique_rows(pairs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.unique(pairs, dim=0, return_inverse=True) for (n, 2) int64, by two stable 1-D sorts
    (torch's row-wise unique sorts rows one by one and dominated the SP search's time)."""
    order = torch.argsort(pairs[:, 1], stable=True)
    order = order[torch.argsort(pairs[order, 0], stable=True)]
    rows = pairs[order]
    new = torch.ones(rows.shape[0], dtype=torch.bool, device=pairs.device)
    new[1:] = (rows[1:] != rows[:-1]).any(1)
    inv = torch.empty_like(order)
    inv[order] = torch.cumsum(new.long(), 0) - 1
    return rows[new], inv


class _BinCounter:
    """How many arrivals each (block, bin tuple) has had: gives an arrival its index k in its bin."""

    def __init__(self, device):
        self.pairs = torch.zeros(0, 2, dtype=torch.int64, device=device)
        self.counts = torch.zeros(0, dtype=torch.int64, device=device)

    def next_ks(self, blocks: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """1-based k of each arrival of (C, A) `keys` (arrival order = row order) of `blocks` (A,)."""
        chunk = torch.stack([blocks.expand_as(keys), keys], dim=-1).view(-1, 2)
        uniq, inv = _unique_rows(torch.cat([self.pairs, chunk]))
        before = torch.zeros(uniq.shape[0], dtype=torch.int64, device=keys.device)
        before[inv[: self.pairs.shape[0]]] = self.counts
        new = inv[self.pairs.shape[0] :]
        in_chunk = torch.bincount(new, minlength=uniq.shape[0])
        order = torch.sort(new, stable=True).indices  # same bin: in arrival order
        rank = torch.empty_like(new)
        rank[order] = torch.arange(new.numel(), device=keys.device) - (torch.cumsum(in_chunk, 0) - in_chunk)[new[order]]
        self.pairs, self.counts = uniq, before + in_chunk
        return (before[new] + rank + 1).view(keys.shape)

    def keep_blocks(self, still: torch.Tensor) -> None:
        keep = still[self.pairs[:, 0]]
        self.pairs, self.counts = self.pairs[keep], self.counts[keep]


@dataclass
class _Best:
    score: torch.Tensor  # (B,) log r'(X) - log T of the best arrival so far
    key: torch.Tensor  # (B,) its bin tuple
    k: torch.Tensor  # (B,) its index in the bin


@torch.no_grad()
def _search(m, v, lay: BlockLayout, *, seed, level, max_steps, memory_elems, mix, only=None):
    """Run the pfr search (sp-pfr's under one global bound) of every block (of the blocks `only`, a
    bool mask, if given) over the superposed arrivals: returns (best, steps, capped)."""
    device = m.device
    n_blocks = lay.n_blocks
    spatial = bool(lay.bin_bits.any())
    s = v.sqrt()
    log_bound = _log_bounds(m, v, lay, mix)
    best = _Best(
        torch.full((n_blocks,), -math.inf, dtype=torch.float64, device=device),
        torch.zeros(n_blocks, dtype=torch.int64, device=device),
        torch.ones(n_blocks, dtype=torch.int64, device=device),
    )
    steps = torch.full((n_blocks,), max_steps, dtype=torch.int64, device=device)
    capped = torch.zeros(n_blocks, dtype=torch.bool, device=device)
    t_last = torch.zeros(n_blocks, dtype=torch.float64, device=device)
    active = torch.ones(n_blocks, dtype=torch.bool, device=device) if only is None else only.clone()
    counter = _BinCounter(device)
    n0, chunk = 0, 64
    while n0 < max_steps and bool(active.any()):
        blocks = torch.nonzero(active).squeeze(1)  # (A,)
        dims = torch.nonzero(active[lay.dim_block]).squeeze(1)  # (D_a,) in block order
        local = torch.cumsum(active.long(), 0)[lay.dim_block[dims]] - 1  # dim -> column of its block
        c = max(1, min(chunk, memory_elems // max(1, dims.numel()), max_steps - n0))
        ns = torch.arange(n0, n0 + c, device=device)[:, None]  # (C, 1)
        gaps = -torch.log(rng.pfr_private_uniforms(seed, level, rng.PFR_ARRIVAL, blocks, ns, torch.zeros_like(ns)))
        t = t_last[blocks] + torch.cumsum(gaps, 0)  # (C, A) arrival times
        md, sd, vd, bits = m[dims], s[dims], v[dims], lay.bin_bits[dims]
        if spatial:
            j = _draw_bins(md, sd, bits, lay.dim_block[dims], lay.dim_pos[dims], ns, seed=seed, level=level, mix=mix)
            keys = _block_sum(j << lay.key_shift[dims], local, blocks.numel())  # disjoint bit fields
            ks = counter.next_ks(blocks, keys)
            log_pi = _log_bin_weight(md, sd, j, bits, mix)
        else:
            keys = torch.zeros(c, blocks.numel(), dtype=torch.int64, device=device)
            ks = (ns + 1).expand_as(keys)
            log_pi = torch.zeros((), dtype=torch.float64, device=device)
        x = _points(seed, level, lay, dims, ks[:, local], keys[:, local]).double()
        per_dim = _log_ratio_dims(x, md, vd) - bits * _LN2 - log_pi
        score = _block_sum(per_dim, local, blocks.numel()) - torch.log(t)  # (C, A)
        before_chunk = best.score[blocks]
        _keep_best(best, blocks, score, keys, ks)
        if int(ks.max()) >= MAX_INDEX:
            raise ValueError(f"a bin index reached {MAX_INDEX}: use a smaller max_steps")
        n0 += c
        t_last[blocks] = t[-1]
        # stop at the first n with log r'_max - log T_n < the best score before n
        shifted = torch.cat([torch.full_like(score[:1], -math.inf), torch.cummax(score, 0).values[:-1]])
        done = log_bound[blocks][None] - torch.log(t) < torch.maximum(shifted, before_chunk[None])
        stopped = done.any(0)
        steps[blocks[stopped]] = n0 - c + (~done).sum(0)[stopped]
        active[blocks[stopped]] = False
        if n0 >= max_steps:
            capped[blocks[active[blocks]]] = True
            active[:] = False
        if spatial:
            counter.keep_blocks(active)
        chunk *= 2
    return best, steps, capped


def _draw_bins(md, sd, bits, blocks, positions, ns, *, seed, level, mix) -> torch.Tensor:
    """The bin j of (C, D) arrivals `ns` of dims (md, sd, bits, their block and position in it), drawn
    privately from pi: with probability mix a uniform bin (which keeps far bins' weight bounded),
    else j = floor(J Phi(y)) for y ~ q."""
    u = rng.pfr_private_uniforms(seed, level, rng.PFR_BIN, blocks, ns, positions)
    n_bins = 1 << bits
    from_q = u >= mix
    u = torch.where(from_q, (u - mix) / (1.0 - mix), u / mix if mix > 0 else u)
    cdf = torch.where(from_q, torch.special.ndtr(md + sd * torch.special.ndtri(u)), u)
    return torch.minimum((cdf * n_bins).floor().long(), n_bins - 1)


def _keep_best(best: _Best, blocks, score, keys, ks) -> None:
    """Update the best arrival of `blocks` with (C, A) scores of a chunk of their arrivals."""
    chunk_best, at = score.max(0)
    better = chunk_best > best.score[blocks]
    cols = torch.arange(blocks.numel(), device=score.device)
    take = blocks[better]
    best.score[take] = chunk_best[better]
    best.key[take] = keys[at, cols][better]
    best.k[take] = ks[at, cols][better]


def _ranks_in_bins(keys: torch.Tensor) -> torch.Tensor:
    """1-based k of each arrival in its bin: (N, A) bin keys of N arrivals (in order) of A blocks."""
    n = keys.shape[0]
    ordered, order = torch.sort(keys, dim=0, stable=True)
    row = torch.arange(n, device=keys.device)[:, None].expand_as(keys)
    new = torch.ones_like(keys, dtype=torch.bool)
    new[1:] = ordered[1:] != ordered[:-1]
    run_start = torch.cummax(torch.where(new, row, 0), dim=0).values
    return torch.empty_like(keys).scatter_(0, order, row - run_start + 1)


def _arrival_bins(m, s, lay: BlockLayout, dims, local, n_cols, *, seed, level, budget, memory_elems, mix):
    """(bin keys, log pi of the bin tuple), (budget, n_cols), of the first `budget` arrivals of the
    blocks of `dims` (columns `local`). A dim with at most `budget` bins has its log pi_d,j tabled
    once, cheaper than computing it for each arrival, as long as the table fits `memory_elems`."""
    device = m.device
    keys = torch.zeros(budget, n_cols, dtype=torch.int64, device=device)
    log_pi = torch.zeros(budget, n_cols, dtype=torch.float64, device=device)
    binned = lay.bin_bits[dims] > 0
    dims, local = dims[binned], local[binned]
    if dims.numel() == 0:
        return keys, log_pi
    md, sd, bits, shift = m[dims], s[dims], lay.bin_bits[dims], lay.key_shift[dims]
    blocks, positions = lay.dim_block[dims], lay.dim_pos[dims]
    tabled = (1 << bits) <= budget
    tabled &= torch.cumsum(torch.where(tabled, 1 << bits, 0), 0) <= memory_elems
    t_dims = torch.nonzero(tabled).squeeze(1)
    t_bins = 1 << bits[t_dims]
    offset = torch.cumsum(t_bins, 0) - t_bins
    t_rep = torch.repeat_interleave(t_dims, t_bins)
    table = _log_bin_weight(md[t_rep], sd[t_rep], _segment_ranks(t_bins), bits[t_rep], mix)
    other = torch.nonzero(~tabled).squeeze(1)
    chunk = max(1, min(budget, memory_elems // dims.numel(), _PIECE_ELEMS // dims.numel()))
    for n0 in range(0, budget, chunk):
        ns = torch.arange(n0, min(budget, n0 + chunk), device=device)[:, None]
        j = _draw_bins(md, sd, bits, blocks, positions, ns, seed=seed, level=level, mix=mix)
        keys[n0 : n0 + ns.numel()] = _block_sum(j << shift, local, n_cols)  # disjoint bit fields
        per_dim = torch.empty(j.shape, dtype=torch.float64, device=device)
        per_dim[:, t_dims] = table[offset + j[:, t_dims]]
        if other.numel():
            per_dim[:, other] = _log_bin_weight(md[other], sd[other], j[:, other], bits[other], mix)
        log_pi[n0 : n0 + ns.numel()] = _block_sum(per_dim, local, n_cols)
    return keys, log_pi


@torch.no_grad()
def _orc_search(m, v, lay: BlockLayout, *, seed, level, budget, memory_elems, mix):
    """The orc / sp-orc search: the argmax of log r'(X_n) - log T_n over the first `budget` arrivals
    of every block. Consecutive blocks go in batches (`_orc_batch`). On a CPU with several torch threads
    the batches run on that many Python threads, each op single-threaded: the search is mostly small
    in-place integer ops on cache-sized chunks (codec/rng.py), which torch runs serially."""
    device = m.device
    s = v.sqrt()
    workers = torch.get_num_threads() if device.type == "cpu" else 1
    per_batch = max(1, memory_elems // workers // budget)  # blocks a batch: its (budget, blocks) tables fit
    ends = torch.cumsum(lay.sizes, 0).tolist()
    batches = [(b0, min(lay.n_blocks, b0 + per_batch)) for b0 in range(0, lay.n_blocks, per_batch)]

    def run(batch: tuple[int, int]) -> _Best:
        b0, b1 = batch
        dims = (ends[b0] - int(lay.sizes[b0]), ends[b1 - 1])
        return _orc_batch(
            m,
            s,
            v,
            lay,
            b0,
            b1,
            dims,
            seed=seed,
            level=level,
            budget=budget,
            memory_elems=memory_elems // workers,
            mix=mix,
        )

    if workers == 1 or len(batches) == 1:
        found = [run(b) for b in batches]
    else:
        torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(workers) as pool:
                found = list(pool.map(run, batches))
        finally:
            torch.set_num_threads(workers)
    return _Best(*(torch.cat([getattr(f, k) for f in found]) for k in ("score", "key", "k")))


def _orc_batch(m, s, v, lay: BlockLayout, b0, b1, dim_range, *, seed, level, budget, memory_elems, mix) -> _Best:
    """The best arrivals of blocks b0..b1 - 1 (dims `dim_range`), in two passes over their arrivals:
    first their bins (all of them, so that one sort gives every arrival its index k in its bin), then
    their points and scores, a chunk of arrivals at a time."""
    device = m.device
    blocks = torch.arange(b0, b1, device=device)
    best = _Best(
        torch.full((b1 - b0,), -math.inf, dtype=torch.float64, device=device),
        torch.zeros(b1 - b0, dtype=torch.int64, device=device),
        torch.ones(b1 - b0, dtype=torch.int64, device=device),
    )
    dims = torch.arange(*dim_range, device=device)
    local = lay.dim_block[dims] - b0
    ns_all = torch.arange(budget, device=device)[:, None]
    arrivals = rng.pfr_private_uniforms(seed, level, rng.PFR_ARRIVAL, blocks, ns_all, torch.zeros_like(ns_all))
    log_t = torch.log(torch.cumsum(-torch.log(arrivals), 0))  # (budget, A) log arrival times
    keys, log_pi = _arrival_bins(
        m,
        s,
        lay,
        dims,
        local,
        blocks.numel(),
        seed=seed,
        level=level,
        budget=budget,
        memory_elems=memory_elems,
        mix=mix,
    )
    spatial = bool(lay.bin_bits[dims].any())
    ks = _ranks_in_bins(keys) if spatial else (ns_all + 1).expand_as(keys)
    if int(ks.max()) >= MAX_INDEX:
        raise ValueError(f"a bin index reached {MAX_INDEX}: use a smaller budget")
    md, vd = m[dims], v[dims]
    scale = lay.block_bin_bits[blocks] * _LN2  # log J
    chunk = max(1, min(budget, memory_elems // dims.numel(), _PIECE_ELEMS // dims.numel()))
    columns = torch.arange(b1 - b0, device=device)
    for n0 in range(0, budget, chunk):
        n1 = min(budget, n0 + chunk)
        if spatial:
            x = _points(seed, level, lay, dims, ks[n0:n1, local], keys[n0:n1, local])
        else:  # one bin: point n of every block
            x = _points(seed, level, lay, dims, ns_all[n0:n1] + 1, torch.zeros((), dtype=torch.int64, device=device))
        x = x.double()
        log_r = _block_sum(_log_ratio_dims(x, md, vd), local, blocks.numel())
        score = log_r - scale - log_pi[n0:n1] - log_t[n0:n1]
        _keep_best(best, columns, score, keys[n0:n1], ks[n0:n1])
    return best


def _segment_ranks(counts: torch.Tensor) -> torch.Tensor:
    """0, 1, ... within each segment (consecutive runs of `counts` values)."""
    total = int(counts.sum())
    return torch.arange(total, device=counts.device) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)


def _segment_cumsum(values: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Cumulative sums restarting at each segment (consecutive runs of `counts` values)."""
    total = torch.cumsum(values, 0)
    ends = torch.cumsum(counts, 0)
    before = torch.cat([total.new_zeros(1), total[ends[:-1] - 1]]) if counts.numel() else total
    return total - torch.repeat_interleave(before, counts)


@torch.no_grad()
def _bin_search(m, v, lay: BlockLayout, *, seed, level, max_steps, memory_elems, only=None):
    """The exact SP search with one bound per bin (A* coding over the bins, with pi = Q's masses).

    The superposed arrival process over p' is the union of independent processes, one per bin j,
    of rate pi_j = Q(B_j) on the bin's own points. An arrival of bin j can only win while
    log sup_{B_j} r' - log T > the best score so far, so each bin's process is followed only that
    far: every bin of every block is a search of its own, in A* order a band of bins at a time,
    each a few arrivals at a time (a quarter of those it has had), until no bin's next arrival
    can win or the block has had max_steps arrivals (then `capped`: not exact). The result is the
    argmax over the whole superposed process, so the sample is exact; the steps are about
    sum_j sup_{B_j} r / J (~2^(D_inf - L) where the bins follow q), where one global bound needs
    ~sup r'. Every bin of a block is enumerated, so only the blocks `only` (a bool mask) are
    searched if given.

    Returns (best, steps, capped, log sum_j pi_j sup_{B_j} r' = log sum_j sup_{B_j} r / J per block,
    the scale of its steps)."""
    device = m.device
    n_blocks = lay.n_blocks
    t_start, log_q, log_sup = _bin_table(m, v, lay, 0.0)  # pi = Q's masses
    n_bins = 1 << lay.bin_bits
    # every bin tuple of every block ("cells"): its log pi and log bound, summed over the block's dims
    n_cells = 1 << lay.block_bin_bits
    if only is not None:
        n_cells = torch.where(only, n_cells, 0)
    cell_block = torch.repeat_interleave(torch.arange(n_blocks, device=device), n_cells)
    cell_key = _segment_ranks(n_cells)
    block_start = torch.cumsum(lay.sizes, 0) - lay.sizes
    cell_sizes = lay.sizes[cell_block]
    cd_cell = torch.repeat_interleave(torch.arange(cell_block.numel(), device=device), cell_sizes)
    cd_dim = block_start[cell_block][cd_cell] + _segment_ranks(cell_sizes)
    j = (cell_key[cd_cell] >> lay.key_shift[cd_dim]) & (n_bins[cd_dim] - 1)
    n_all = cell_block.numel()
    log_pi = torch.zeros(n_all, dtype=torch.float64, device=device).index_add_(0, cd_cell, log_q[t_start[cd_dim] + j])
    log_bound = torch.zeros_like(log_pi).index_add_(0, cd_cell, log_sup[t_start[cd_dim] + j]) + _BOUND_MARGIN_NATS
    cell_dims_start = torch.cumsum(cell_sizes, 0) - cell_sizes  # where each cell's dims start in cd_*

    def gap(cells, ks):  # Exp(pi) gap before arrival ks of each cell
        u = rng.pfr_private_bin_uniforms(seed, level, cell_block[cells], ks - 1, cell_key[cells])
        return -torch.log(u) * torch.exp(-log_pi[cells])

    all_cells = torch.arange(n_all, device=device)
    done_k = torch.zeros(n_all, dtype=torch.int64, device=device)  # arrivals evaluated per cell
    t_next = gap(all_cells, done_k + 1)  # time of each cell's next arrival
    best = _Best(
        torch.full((n_blocks,), -math.inf, dtype=torch.float64, device=device),
        torch.zeros(n_blocks, dtype=torch.int64, device=device),
        torch.ones(n_blocks, dtype=torch.int64, device=device),
    )
    steps = torch.zeros(n_blocks, dtype=torch.int64, device=device)
    capped = torch.zeros(n_blocks, dtype=torch.bool, device=device)
    while True:
        prio = torch.where(capped[cell_block], -math.inf, log_bound - torch.log(t_next))
        top = _block_max(prio, cell_block, n_blocks)
        # in A* order, a band at a time: the cells within _SEARCH_BAND_NATS of their block's top
        live = (prio > best.score[cell_block]) & (prio >= top[cell_block] - _SEARCH_BAND_NATS)
        cells = torch.nonzero(live).squeeze(1)
        if cells.numel() == 0:
            break
        # a quarter of the arrivals each cell has had (at least one), within the block's steps left
        blocks = cell_block[cells]
        per_block = torch.bincount(blocks, minlength=n_blocks)
        steps_left = (max_steps - steps)[blocks]
        keep = _segment_ranks(per_block) < steps_left  # cells of a block in bin order, one per step left
        cells, left = cells[keep], (steps_left // per_block[blocks])[keep]
        count = torch.minimum(done_k[cells] // 4, left).clamp(min=1)
        dims_per = cell_sizes[cells]
        scale = max(1, int((count * dims_per).sum()) // memory_elems + 1)
        if scale > 1:  # keep the batch near memory_elems candidate dims
            count = torch.clamp(count // scale, min=1)
        # the arrivals: cell, its k, its time
        a_cell = torch.repeat_interleave(cells, count)
        a_k = done_k[a_cell] + _segment_ranks(count) + 1
        gaps = gap(a_cell, a_k)
        first = torch.cumsum(count, 0) - count
        gaps[first] = 0.0
        a_t = torch.repeat_interleave(t_next[cells], count) + _segment_cumsum(gaps, count)
        # their candidate dims
        a_sizes = cell_sizes[a_cell]
        ad_arr = torch.repeat_interleave(torch.arange(a_cell.numel(), device=device), a_sizes)
        ad_dim = cd_dim[cell_dims_start[a_cell][ad_arr] + _segment_ranks(a_sizes)]
        xs = _points(seed, level, lay, ad_dim, a_k[ad_arr], cell_key[a_cell][ad_arr]).double()
        log_r = torch.zeros(a_cell.numel(), dtype=torch.float64, device=device).index_add_(
            0, ad_arr, _log_ratio_dims(xs, m[ad_dim], v[ad_dim])
        )
        a_block = cell_block[a_cell]
        score = log_r - lay.block_bin_bits[a_block] * _LN2 - log_pi[a_cell] - torch.log(a_t)
        top = _block_max(score, a_block, n_blocks)
        tops = torch.nonzero((score == top[a_block]) & (score > best.score[a_block])).squeeze(1)
        winner = torch.full((n_blocks,), score.numel(), dtype=torch.int64, device=device)
        winner.scatter_reduce_(0, a_block[tops], tops, "amin")  # one a block, should two arrivals tie
        win = winner[winner < score.numel()]
        wb = a_block[win]
        best.score[wb] = score[win]
        best.key[wb] = cell_key[a_cell[win]]
        best.k[wb] = a_k[win]
        steps += torch.bincount(a_block, minlength=n_blocks)
        done_k[cells] += count
        last = first + count - 1
        t_next[cells] = a_t[last] + gap(cells, done_k[cells] + 1)
        capped |= steps >= max_steps
    if int(best.k.max()) >= MAX_INDEX:
        raise ValueError(f"a bin index reached {MAX_INDEX}: use a smaller max_steps")
    return best, steps, capped, _block_logsumexp(log_pi + log_bound, cell_block, n_blocks)


def _block_max(values: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    """Max of the values of each of n groups (-inf for an empty one)."""
    out = torch.full((n,), -math.inf, dtype=values.dtype, device=values.device)
    return out.scatter_reduce_(0, index, values, "amax")


def _block_logsumexp(values: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    top = _block_max(values, index, n)
    total = torch.zeros_like(top).index_add_(0, index, torch.exp(values - top[index]))
    return top + torch.log(total)


# --- index coding ---------------------------------------------------------------------------


def _pack(method: str, lay: BlockLayout, keys: torch.Tensor, ks: torch.Tensor) -> bytes:
    bits = BitWriter()
    buckets, mantissas, widths = bucketize(ks.cpu().numpy(), 0)
    rans = encode_fields([(buckets, INDEX_ALPHABET)], bits)
    bits.write(keys.cpu().numpy(), lay.block_bin_bits.cpu().numpy())
    bits.write(mantissas, widths)
    body = struct.pack(">BBII", FORMAT_VERSION, METHODS[method], lay.n_blocks, len(rans)) + rans + bits.getvalue()
    return body + struct.pack(">I", zlib.crc32(body))


def _unpack(data: bytes, method: str, lay: BlockLayout) -> tuple[np.ndarray, np.ndarray]:
    head = struct.calcsize(">BBII")
    if len(data) < head + 4 or zlib.crc32(data[:-4]) != struct.unpack(">I", data[-4:])[0]:
        raise RecDecodeError("PFR section truncated or corrupted (CRC mismatch)")
    version, method_id, n_blocks, n_rans = struct.unpack(">BBII", data[:head])
    if version != FORMAT_VERSION or method_id != METHODS[method] or n_blocks != lay.n_blocks:
        raise RecDecodeError(f"PFR section written with other parameters (format {version}, method {method_id})")
    if head + n_rans > len(data) - 4:
        raise RecDecodeError("PFR section truncated")
    bits = BitReader(data[head + n_rans : -4])
    (buckets,) = decode_fields(data[head : head + n_rans], [(n_blocks, INDEX_ALPHABET)], bits)
    keys = bits.read(n_blocks, lay.block_bin_bits.cpu().numpy()).astype(np.int64)
    ks = unbucketize(buckets, bits, False)
    bits.finish()
    if ks.max() >= MAX_INDEX:
        raise RecDecodeError("PFR index out of range")
    return keys, ks


# --- the API --------------------------------------------------------------------------------


def _check_method(method: str, bin_bits) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    if not method.startswith("sp-") and bin_bits is not None and bool(torch.as_tensor(bin_bits).any()):
        raise ValueError(f"{method} takes no bins: use sp-{method}")


def regenerate(seed, level, lay: BlockLayout, keys: torch.Tensor, ks: torch.Tensor) -> torch.Tensor:
    """The float32 points (bin `keys`, index `ks` per block) of every dim: the decoded sample."""
    dims = torch.arange(lay.dim_block.numel(), device=keys.device)
    return _points(seed, level, lay, dims, ks[lay.dim_block], keys[lay.dim_block])


@torch.no_grad()
def code_blocks(
    m: torch.Tensor,
    v: torch.Tensor,
    lay: BlockLayout,
    *,
    seed: int,
    method: str,
    budget: int | None = None,
    level: int = 0,
    max_steps: int = 1 << 20,
    memory_elems: int = 1 << 18,
    bin_mix: float = DEFAULT_BIN_MIX,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """encode_blocks without the byte packing: (sample, bin keys, indices k, stats), per block."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    if not method.startswith("sp-") and bool(lay.bin_bits.any()):
        raise ValueError(f"{method} takes no bins: use sp-{method}")
    m, v = m.double().flatten(), v.double().flatten()
    if m.numel() != lay.dim_block.numel() or v.numel() != m.numel():
        raise ValueError("m and v must hold one value per dim of the blocks")
    if not bool((v > 0).all()):
        raise ValueError("variances must be positive")
    exact = method in EXACT_METHODS
    if exact and not bool(torch.isfinite(dinf_bits(m, v)).all()):
        raise ValueError(f"{method} needs every v < 1 (r = q/p is unbounded otherwise): use orc / sp-orc")
    if not exact and (budget is None or not 1 <= budget <= MAX_INDEX):
        raise ValueError(f"{method} needs a candidate budget in [1, {MAX_INDEX}]")
    search = dict(seed=seed, level=level, max_steps=min(max_steps, MAX_INDEX - 1), memory_elems=memory_elems)
    if method == "sp-pfr":  # one bound per bin; blocks with too many bins to list under one global bound
        listed = lay.block_bin_bits <= MAX_SEARCH_BIN_BITS
        best, steps, capped, log_bound = _bin_search(m, v, lay, only=listed, **search)
        if not bool(listed.all()):
            other, other_steps, other_capped = _search(m, v, lay, mix=bin_mix, only=~listed, **search)
            best.key = torch.where(listed, best.key, other.key)
            best.k = torch.where(listed, best.k, other.k)
            steps = torch.where(listed, steps, other_steps)
            capped = torch.where(listed, capped, other_capped)
            log_bound = torch.where(listed, log_bound, _log_bounds(m, v, lay, bin_mix))
    elif exact:
        best, steps, capped = _search(m, v, lay, mix=bin_mix, **search)
        log_bound = _log_bounds(m, v, lay, bin_mix)
    else:
        best = _orc_search(m, v, lay, seed=seed, level=level, budget=budget, memory_elems=memory_elems, mix=bin_mix)
        steps = torch.full((lay.n_blocks,), budget, dtype=torch.int64, device=m.device)
        capped, log_bound = torch.zeros_like(steps, dtype=torch.bool), None
    stats = dict(
        steps=steps,
        index=best.k,
        bin_key=best.key,
        capped=capped,
        kl_bits=_block_sum(kl_bits(m, v), lay.dim_block, lay.n_blocks),
        dinf_bits=_block_sum(dinf_bits(m, v), lay.dim_block, lay.n_blocks),
        bound_bits=log_bound / _LN2 if exact else None,
    )
    return regenerate(seed, level, lay, best.key, best.k), best.key, best.k, stats


@torch.no_grad()
def encode_blocks(
    m: torch.Tensor,
    v: torch.Tensor,
    block_sizes,
    *,
    seed: int,
    method: str,
    budget: int | None = None,
    bin_bits=None,
    level: int = 0,
    max_steps: int = 1 << 20,
    memory_elems: int = 1 << 18,
    bin_mix: float = DEFAULT_BIN_MIX,
) -> tuple[torch.Tensor, bytes, dict]:
    """Code q = N(m, diag v) (prior-standardised, blocks of `block_sizes` consecutive dims).

    `method` is one of METHODS. orc / sp-orc search `budget` candidates per block; pfr / sp-pfr
    run to the PFR stopping rule, at most `max_steps` arrivals (blocks that reach it are flagged
    in stats["capped"]: their sample is then the truncated search's, not exact). sp-* take
    `bin_bits` (l_d per dim), which the decoder must be given too. `memory_elems` bounds the
    candidate-dim values evaluated at once. Returns the float32 sample (what decode_blocks
    rebuilds), the bytes, and per-block stats (tensors): steps, index k, bin key, capped,
    kl_bits, dinf_bits, bound_bits (log2 of the search's bound: sup r for pfr, sum_j sup_{B_j} r / J
    for sp-pfr, which sets its steps), code_bits (total, float).
    """
    _check_method(method, bin_bits)
    lay = make_layout(block_sizes, bin_bits, m.device)
    sample, keys, ks, stats = code_blocks(
        m,
        v,
        lay,
        seed=seed,
        method=method,
        budget=budget,
        level=level,
        max_steps=max_steps,
        memory_elems=memory_elems,
        bin_mix=bin_mix,
    )
    data = _pack(method, lay, keys, ks)
    stats["code_bits"] = 8.0 * len(data)
    return sample, data, stats


@torch.no_grad()
def decode_blocks(block_sizes, data: bytes, *, seed: int, method: str, bin_bits=None, level: int = 0, device="cpu"):
    """The encoder's float32 sample from its bytes: only the chosen candidate of each block is hashed."""
    _check_method(method, bin_bits)
    lay = make_layout(block_sizes, bin_bits, torch.device(device))
    keys, ks = _unpack(data, method, lay)
    keys_t = torch.from_numpy(keys).to(lay.sizes.device)
    return regenerate(seed, level, lay, keys_t, torch.from_numpy(ks).to(lay.sizes.device))
