"""Greedy sharded sampler (thesis Alg. 2), batched over all groups of a level.

In prior-standardised space the proposal N(0, I) is split into S_g shards (S_g <= S steps,
per group): shard k has variance r^k (1 - r) / (1 - r^S_g), so they sum to N(0, 1); r = 1 is
the thesis' equal split 1/S_g, r < 1 lets the last shards resolve dims with sigma_q << 1/sqrt(S)
(thesis preset r = 0.85). Starting from z = 0, each step offers every group 2^b shard
candidates s_k*x (x from the shared pool) and keeps the one maximising log q'(z + s_k*x) (or,
with `auxiliary`, the importance weight of the shard under its conditional target; with
`sample`, a draw proportional to exp(score) by Gumbel-max with encoder-private noise, which
makes `auxiliary` + `sample` an iREC-style multi-step importance sampler); the step's index
costs b bits. log q'(z + s*x) = sum_d A_d x_d^2 + B_d x_d + const with
A = -s^2 / (2 v), B = s (m - z) / v, so one step for all groups is a few GEMMs.
"""

import functools
import math

import torch

from codec import pool, rng


def shard_scale(steps: int) -> float:
    """1/sqrt(S) rounded to float32 once, so encoder and decoder multiply by the same value."""
    return float(torch.tensor(1.0 / math.sqrt(steps), dtype=torch.float32))


def shard_table(steps: int, decay: float = 1.0) -> torch.Tensor:
    """(steps, steps) float32: [S_g - 1, k] = std of shard k of a group walking S_g steps.

    Shard variances r^k (1 - r) / (1 - r^S_g) sum to 1 (prior-standardised N(0, 1)); r = 1
    gives the thesis' equal shards 1/S_g. Built on the CPU in float64, rounded once to float32.
    """
    return _shard_table(steps, decay).clone()


@functools.lru_cache(maxsize=16)
def _shard_table(steps: int, decay: float) -> torch.Tensor:  # ~2 ms to build, 1 % of a decode
    t = torch.zeros(steps, steps, dtype=torch.float32)
    for n in range(1, steps + 1):
        for k in range(n):
            if decay == 1.0:
                t[n - 1, k] = shard_scale(n)
            else:
                t[n - 1, k] = math.sqrt(decay**k * (1.0 - decay) / (1.0 - decay**n))
    return t


def pool_table(seed: int, level: int, bits: int, n_cols: int, device) -> torch.Tensor:
    """The first n_cols columns of the level's pool, all 2^bits rows: what a walk reads."""
    return rng.pool_block(seed, level, 0, 1 << bits, n_cols, device)


_DECODE_CHUNK = 1 << 18  # pool values per batch of steps: cache-sized (one step of level 1)
_GPU_DECODE_CHUNK = 1 << 23  # on a GPU, all of level 1's steps at once: each batch waits once


def _group_chunks(n_groups: int, n_rows: int, memory_bytes: int):
    per = max(1, memory_bytes // (4 * 4 * n_rows))  # scores + GEMM output + slack
    for g0 in range(0, n_groups, per):
        yield slice(g0, min(n_groups, g0 + per))


@torch.no_grad()
def encode(
    m: torch.Tensor,
    v: torch.Tensor,
    sizes: torch.Tensor,
    *,
    seed: int,
    level: int,
    bits: int,
    steps: int,
    width: int,
    windows: int,
    memory_bytes: int,
    gemm_dtype=torch.float32,
    group_steps: torch.Tensor | None = None,
    decay: float = 1.0,
    auxiliary: bool = False,
    sample: bool = False,
    table: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Code N(m, v) (float64, standardised, groups of `sizes` in order).

    Group g takes S_g = group_steps[g] <= steps steps of variance 1/S_g (all `steps` if None).
    `table` may hold the level's pool (`pool_table`, at least as many columns as this layout
    reads) to save building it again. Returns the (G, steps) indices (entries at steps >= S_g
    are unused) and the float32 sample, exactly as `decode` rebuilds it.
    """
    device = m.device
    lay = pool.make_layout(sizes, width, device, windows)
    k = 1 << bits
    if group_steps is None:
        group_steps = torch.full((lay.n_groups,), steps, dtype=torch.int64, device=device)
    group_steps = group_steps.to(device)
    dim_steps = group_steps[lay.dim_group]
    scales = shard_table(steps, decay).to(device)
    var = scales.double() ** 2
    rest = var.flip(1).cumsum(1).flip(1)  # [S_g - 1, k]: variance of shards k.. of the group
    if table is None:
        table = pool_table(seed, level, bits, lay.n_windows * width, device)
    table = table[:, : lay.n_windows * width]  # pool entries are a function of (row, column) alone
    feats = [pool.window_features(table, width, w, gemm_dtype) for w in range(lay.n_windows)]
    z = torch.zeros(m.shape, dtype=torch.float32, device=device)
    indices = torch.zeros(lay.n_groups, steps, dtype=torch.int64, device=device)
    for step in range(int(group_steps.max()) if lay.n_groups else 0):
        scr = pool.scramble(seed, level, step, lay)
        s = scales[dim_steps - 1, step]
        sd = s.double()
        if auxiliary:  # log q_k(a) / p_k(a) of shard a = s x under its conditional target
            # The shards still to come sum to R ~ N(0, r) under p; under q (q(shards) =
            # p(shards) q(z) / p(z)) R given the walk so far is N(mu_r, 1 / prec), and this shard
            # is a fraction frac of R plus prior noise of variance s^2 (1 - frac).
            r = rest[dim_steps - 1, step].clamp(min=1e-300)
            zd = z.double()
            prec = 1.0 / r + 1.0 / v - 1.0  # > 0: r <= 1
            mu_r = ((m - zd) / v + zd) / prec
            frac = sd * sd / r  # share of the remaining prior variance this shard carries
            tau = (sd * sd - sd * sd * frac + frac * frac / prec).clamp(min=1e-300)
            a = 0.5 - sd * sd / (2.0 * tau)
            b = sd * frac * mu_r / tau
            off = dim_steps <= step
            a, b = a.masked_fill(off, 0.0), b.masked_fill(off, 0.0)
        else:  # the thesis: log q of the running sum z + s x
            a = -(sd * sd) / (2.0 * v)
            b = sd * (m - z.double()) / v
        ab = pool.block_matrix(lay, scr, a, b)
        for groups in _group_chunks(lay.n_groups, k, memory_bytes):
            scores = pool.group_scores(feats, lay, scr, ab, groups)
            if sample:  # pick a shard with probability proportional to its weight (Gumbel-max)
                keys = torch.arange(groups.start, groups.stop, device=device) * steps + step
                scores = scores.double() + rng.gumbel(
                    seed, level, keys[None, :], torch.arange(k, device=device)[:, None]
                )
            indices[groups, step] = scores.argmax(0)
        indices[:, step].masked_fill_(group_steps <= step, 0)  # a mask index would sync
        rows = pool.dim_rows(indices[lay.dim_group, step], scr, k)
        x = table[rows, scr.col] * scr.sign  # == pool.chosen_values, without hashing
        z = torch.where(dim_steps > step, z + x * s, z)
    return indices, z


@torch.no_grad()
def decode(
    indices: torch.Tensor,
    sizes: torch.Tensor,
    *,
    seed: int,
    level: int,
    bits: int,
    steps: int,
    width: int,
    windows: int,
    group_steps: torch.Tensor | None = None,
    decay: float = 1.0,
) -> torch.Tensor:
    """Rebuild the float32 sample from the indices: only the chosen pool entries are hashed.

    Works on (step, block) pairs, a cache-sized batch of steps at a time (one chosen row per
    pair), in the layout's slot space, and gathers the coded dims out of it once at the end:
    the same per-dim float ops, in the same order, as the encoder.
    """
    device = indices.device
    lay = pool.make_layout(sizes, width, device, windows)
    if group_steps is None:
        group_steps = torch.full((lay.n_groups,), steps, dtype=torch.int64, device=device)
    nb = lay.block_group.numel()
    block_steps = group_steps.to(device)[lay.block_group]
    scales = shard_table(steps, decay).to(device)
    z = torch.zeros(nb, width, dtype=torch.float32, device=device)
    n_steps = int(group_steps.max()) if lay.n_groups else 0
    chunk = _DECODE_CHUNK if device.type == "cpu" else _GPU_DECODE_CHUNK
    per = max(1, chunk // max(1, nb * width))  # steps per batch: bounded memory
    for s0 in range(0, n_steps, per):
        # every (step, block) pair still walking in steps s0.., ordered by step
        step, block = torch.nonzero(
            block_steps[None, :] > torch.arange(s0, min(n_steps, s0 + per), device=device)[:, None], as_tuple=True
        )
        step = step + s0
        local, sign_bit, window, shift = pool.pair_scramble(seed, level, step, block, lay)
        rows = (indices[lay.block_group[block], step] + shift) & ((1 << bits) - 1)
        # A block reads all `width` columns of its window in its chosen row (one hash per two),
        # permuted; the scramble's sign flips bit 31, which negates the normal exactly.
        words = rng.pool_window_bits(seed, level, rows, window, width).gather(1, local)
        x = rng.normal_from_bits(words.bitwise_xor_(sign_bit.bitwise_left_shift_(31)))
        x.mul_(scales[block_steps[block] - 1, step][:, None])  # z + x * s: two roundings, as encoded
        # add the steps in order, as the encoder did
        counts = torch.bincount(step - s0, minlength=per).tolist()
        start = 0
        for n in counts:
            if n == nb:
                z.add_(x[start : start + n])
            elif n:
                z[block[start : start + n]] += x[start : start + n]
            start += n
    z = z.view(-1)
    return z if lay.dim_slot is None else z[lay.dim_slot]
