"""The thesis's bit-budgeted parallel rejection sampler (Flamich 2019, section 3.4.1, Alg. 1; Harsha
et al. 2007's greedy rejection sampler, thesis Alg. 4), one dim a block, all dims in parallel.

Per dim, in prior-standardised space: target q = N(m, v), prior p = N(0, 1), r = q / p. Encoder
and decoder share candidates X_1, X_2, ... ~ p keyed by (level, flat dim, round i); the encoder
alone draws uniforms U_i. Harsha's sampler accepts X_i when

    U_i < (min(r(X_i), L_i) - min(r(X_i), L_{i-1})) / (L_i - L_{i-1}) = clip((r(X_i) - L_{i-1}) / t_{i-1}, 0, 1)

where, with p*_i the probability of accepting by round i, t_i = 1 - p*_i and L_i = L_{i-1} + t_{i-1}
(L_0 = 0, t_0 = 1): the mass accepted by round i has density min(q, L_i p), so
t_i = Q(r > L_i) - L_i P(r > L_i). The accepted X_K is an exact sample of q and costs about
KL + 2 log2(KL + 1) + O(1) bits. For a diagonal Gaussian only one-dim blocks have those masses in
closed form: log r is quadratic in x, so {r > L} is an interval or the complement of one. A block of
several dims would need the masses of ellipsoids (weighted non-central chi-square tails), which
the thesis, too, sidestepped by sampling each dim on its own.

Every round tests all dims still searching at once (one hash per candidate, no loop over dims);
the loop over rounds ends when every dim has accepted or after 2^budget_bits rounds. Dims that
accept nothing within the budget take the thesis's fallback, a private posterior draw sent as a
16-bit quantised value (codec/level.py), and are counted. The index is coded by codec/level.py:
floor(log2 K) + 1 (0 for a fallback) as a rANS field with its histogram in the stream, plus the
floor(log2 K) bits of K below its leading 1.
"""

import numpy as np
import torch

from codec import rng
from codec.entropy import BitReader, RecDecodeError, bucketize

MAX_BUDGET_BITS = rng.REJECTION_INDEX_BITS  # round i - 1 is the counter's candidate field
_TINY = 1e-300  # t_i below this: only candidates with r > L_{i-1} can still be accepted


def log_ratio(x: torch.Tensor, m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """log q(x) / p(x) for q = N(m, v), p = N(0, 1), float64."""
    return -0.5 * torch.log(v) - (x - m) ** 2 / (2.0 * v) + 0.5 * x * x


def _mass(lo: torch.Tensor, hi: torch.Tensor, inside: torch.Tensor, mean, std) -> torch.Tensor:
    """N(mean, std^2) mass of (lo, hi) where `inside`, else of its complement; tails kept accurate."""
    a, b = (lo - mean) / std, (hi - mean) / std
    nd = torch.special.ndtr
    between = torch.where(a > 0, nd(-a) - nd(-b), nd(b) - nd(a))
    return torch.where(inside, between, nd(a) + nd(-b))


def not_accepted(m: torch.Tensor, v: torch.Tensor, level_: torch.Tensor) -> torch.Tensor:
    """t = Q(r > L) - L P(r > L): the probability of accepting nothing once the cumulative accepted
    density is min(q, L p), L >= 1 (float64, per dim).

    {r > L} = {(v - 1) x^2 + 2 m x + c > 0}, c = -m^2 - v ln v - 2 v ln L: between the roots for
    v < 1, outside them for v > 1, a half-line for v = 1 (nothing if also m = 0).
    """
    a = v - 1.0
    c = -m * m - v * torch.log(v) - 2.0 * v * torch.log(level_)
    disc = m * m - a * c  # a quarter of the discriminant
    root = torch.sqrt(disc.clamp_min(0.0))
    qq = -(m + torch.where(m >= 0, root, -root))  # the stable quadratic formula: roots qq / a and c / qq
    r1, r2 = qq / a, c / qq
    real = disc > 0
    lo = torch.where(real, torch.minimum(r1, r2), 0.0)
    hi = torch.where(real, torch.maximum(r1, r2), 0.0)
    unit = a == 0
    t = (m * m + 2.0 * torch.log(level_)) / torch.where(m == 0, 1.0, 2.0 * m)
    inf = torch.full_like(m, float("inf"))
    lo = torch.where(unit, torch.where(m > 0, t, torch.where(m < 0, -inf, 0.0)), lo)
    hi = torch.where(unit, torch.where(m > 0, inf, torch.where(m < 0, t, 0.0)), hi)
    inside = (a < 0) | unit
    q_mass = _mass(lo, hi, inside, m, torch.sqrt(v))
    p_mass = _mass(lo, hi, inside, 0.0, 1.0)
    return (q_mass - level_ * p_mass).clamp(0.0, 1.0)


def _candidates(seed: int, level: int, dims: torch.Tensor, rounds) -> torch.Tensor:
    counters = rng.rejection_counters(level, rng.REJECTION_CANDIDATE, dims, torch.as_tensor(rounds))
    return rng.normals(seed, counters)


def encode(
    m: torch.Tensor, v: torch.Tensor, dims: torch.Tensor, *, seed: int, level: int, budget_bits: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Rejection-sample every dim of q = N(m, v) (float64, prior-standardised) from the shared stream.

    `dims` are the dims' flat positions in the level (they key the stream). Returns (ks, x, rounds):
    ks (n,) int64, the accepted round K in [1, 2^budget_bits], 0 where nothing was accepted; x (n,)
    float32, the accepted candidates (0 for the fallbacks, which the caller fills); rounds run.
    """
    if not 0 <= budget_bits <= MAX_BUDGET_BITS:
        raise ValueError(f"budget_bits must be in [0, {MAX_BUDGET_BITS}]")
    n, device = m.numel(), m.device
    ks = torch.zeros(n, dtype=torch.int64, device=device)
    x = torch.zeros(n, dtype=torch.float32, device=device)
    pos = torch.arange(n, device=device)  # the dims still searching, compacted every round
    am, av, adims = m, v, dims.to(torch.int64)
    level_ = torch.zeros(n, dtype=torch.float64, device=device)  # L_{i-1}
    tail = torch.ones(n, dtype=torch.float64, device=device)  # t_{i-1}
    rounds = 0
    for i in range(1, (1 << budget_bits) + 1):
        if not pos.numel():
            break
        rounds = i
        cand = _candidates(seed, level, adims, i)
        u = rng.uniform53(seed, rng.rejection_counters(level, rng.REJECTION_UNIFORM, adims, torch.tensor(i)))
        r = torch.exp(log_ratio(cand.double(), am, av))
        accept = u < ((r - level_) / tail.clamp_min(_TINY)).clamp(0.0, 1.0)
        ks[pos[accept]] = i
        x[pos[accept]] = cand[accept]
        keep = ~accept
        pos, am, av, adims = pos[keep], am[keep], av[keep], adims[keep]
        level_ = (level_ + tail)[keep]
        tail = not_accepted(am, av, level_)
    return ks, x, rounds


def decode(ks: torch.Tensor, dims: torch.Tensor, *, seed: int, level: int) -> torch.Tensor:
    """The accepted candidates (float32) of dims `dims` at rounds ks >= 1: only these are hashed."""
    return _candidates(seed, level, dims.to(torch.int64), ks.to(torch.int64))


def index_alphabet(budget_bits: int) -> int:
    """Symbols 0 (fallback) and floor(log2 K) + 1 for K in [1, 2^budget_bits]."""
    return budget_bits + 2


def index_fields(ks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(symbols, mantissas, mantissa widths) of the indices; fallbacks have symbol 0 and no mantissa."""
    sym, mant, widths = (np.zeros(ks.size, dtype=np.int64) for _ in range(3))
    hit = ks > 0
    sym[hit], mant[hit], widths[hit] = bucketize(ks[hit], 0)
    sym[hit] += 1
    return sym, mant[hit], widths[hit]


def read_indices(sym: np.ndarray, bits: BitReader, budget_bits: int, level: int) -> np.ndarray:
    """ks from index_fields' symbols and the mantissas read from `bits`; checked against the budget."""
    hit = sym > 0
    ks = np.zeros(sym.size, dtype=np.int64)
    exp = sym[hit] - 1
    ks[hit] = (np.int64(1) << exp) + bits.read(int(hit.sum()), exp).astype(np.int64)
    if ks.size and ks.max() > 1 << budget_bits:
        raise RecDecodeError(f"level {level}: rejection index above its budget of 2^{budget_bits} rounds")
    return ks
