"""What the encoder decides about a level before it samples: its standardised target, which dims
are outliers, zero runs or coded groups, each group's index length, and the greedy shard decay.

Dims are flattened in memory order and standardised by the prior. Dims whose KL exceeds
`outlier_bits` (and, greedy, sharp dims the shards cannot resolve) are outliers; the rest is cut,
in scan order, into zero runs (at least `zero_run` consecutive dims of KL <= `zero_kl_bits`) and
groups whose KL fits the group budget.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch

from codec import greedy, pfr, rng
from codec.params import CoderParams, LevelParams


def kl_nats(m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Per-dim KL(N(m, v) || N(0, 1)) in nats (float64)."""
    return 0.5 * (v + m * m - 1.0 - torch.log(v))


def standardise(q_loc, q_scale, p_loc, p_scale) -> tuple[torch.Tensor, torch.Tensor]:
    """Target in prior-standardised space, float64: mean (mu_q - mu_p)/sigma_p, var (s_q/s_p)^2."""
    p_scale = p_scale.double().flatten()
    m = (q_loc.double().flatten() - p_loc.double().flatten()) / p_scale
    v = (q_scale.double().flatten() / p_scale) ** 2
    return m, v


def destandardise(eps: torch.Tensor, p_loc: torch.Tensor, p_scale: torch.Tensor) -> torch.Tensor:
    """A level's sample from its standardised values eps (float32, flat), in p_loc's shape and dtype."""
    eps = eps.view(p_loc.shape).to(p_loc.dtype)
    return p_loc + p_scale * eps  # two separately rounded ops, as in the decoder


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


def index_lengths(group_kl_bits: np.ndarray, sizes: np.ndarray, lp: LevelParams) -> np.ndarray:
    """Per coded group: importance index bits L_g, greedy steps S_g or sp-* bin bits L_b (adaptive
    params only).

    Importance: L_g = ceil(KL_g + t) in [0, B], so the group draws 2^L_g candidates and its
    index costs L_g bits. Greedy: S_g = ceil((KL_g + margin) / (b - t)) in [1, S] steps.
    sp-*: L_b = floor(KL_b - (b - t)) bin bits, so the index inside the bin carries the last
    b - t bits of KL; at most pfr.MAX_BIN_BITS_PER_DIM a dim and MAX_BIN_BITS_PER_BLOCK a block.
    """
    if lp.sampler in pfr.METHODS:
        raw = np.floor(group_kl_bits - lp.step_bits + 1e-9)
        most = np.minimum(sizes * pfr.MAX_BIN_BITS_PER_DIM, pfr.MAX_BIN_BITS_PER_BLOCK)
        return np.clip(raw, 0, most).astype(np.int64)
    if lp.sampler == "importance":
        raw = np.ceil(group_kl_bits + lp.oversample_bits - 1e-9)
        return np.clip(raw, 0, lp.index_bits).astype(np.int64)
    raw = np.ceil((group_kl_bits + lp.margin_nats / math.log(2)) / lp.step_bits - 1e-9)
    return np.clip(raw, 1, lp.steps).astype(np.int64)


def check_dims(n: int) -> None:
    if n >= 1 << rng.GROUP_BITS:
        raise ValueError(f"a level holds at most 2^{rng.GROUP_BITS} dims, got {n}")


@dataclass
class LevelPlan:
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


def plan_level(q_loc, q_scale, p_loc, p_scale, lp: LevelParams) -> LevelPlan:
    if not (q_loc.shape == q_scale.shape == p_scale.shape == p_loc.shape):
        raise ValueError("q_loc, q_scale, p_loc, p_scale must have the same shape")
    m, v = standardise(q_loc, q_scale, p_loc, p_scale)
    kl = kl_nats(m, v)
    kl_bits = (kl / math.log(2)).cpu().numpy()
    check_dims(m.numel())
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
    lens = index_lengths((group_kl / math.log(2)).cpu().numpy(), sizes, lp) if lp.adaptive else None
    return LevelPlan(
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


def walk_settings(lp: LevelParams, params: CoderParams, *, seed: int, level: int) -> dict:
    """The arguments greedy.encode and greedy.decode share: the pool a level's walk reads."""
    return dict(
        seed=seed, level=level, bits=lp.index_bits, steps=lp.steps, width=params.pool_width, windows=params.pool_windows
    )


def greedy_walk(
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
        **walk_settings(lp, params, seed=seed, level=level),
        memory_bytes=params.memory_bytes(device),
        gemm_dtype=params.gemm_torch_dtype,
        group_steps=None if lens is None else torch.from_numpy(lens).to(device),
        decay=decay,
        auxiliary=lp.target == "auxiliary",
        sample=lp.selection == "sample",
        beams=lp.beams,
        table=table,
    )


def choose_shard_decay(
    plan: LevelPlan, lp: LevelParams, params: CoderParams, table: torch.Tensor, *, seed: int, level: int
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
        _, x = greedy_walk(m, v, plan.sizes[pick], lens, lp, params, decay, table, seed=seed, level=level)
        scores.append(float(((x.double() - m) ** 2 / v).mean()))
    return lp.decay_choices[int(np.argmin(scores))]
