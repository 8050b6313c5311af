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
    beams: int = 1,
    table: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Code N(m, v) (float64, standardised, groups of `sizes` in order).

    Group g takes S_g = group_steps[g] <= steps steps of variance 1/S_g (all `steps` if None).
    `table` may hold the level's pool (`pool_table`, at least as many columns as this layout
    reads) to save building it again. With `beams` > 1 (auxiliary target only) each group keeps
    that many walks, see `_extend_beams`. Returns the (G, steps) indices (entries at steps >= S_g
    are unused) and the float32 sample, exactly as `decode` rebuilds it.
    """
    if beams > 1 and not auxiliary:
        raise ValueError("beams rank walks by their importance weight: auxiliary target only")
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
    z = torch.zeros(beams, m.numel(), dtype=torch.float32, device=device)  # each beam's walk so far
    indices = torch.zeros(lay.n_groups, beams, steps, dtype=torch.int64, device=device)
    # summed log importance weights of each beam's walk (the ranking key adds the Gumbels drawn
    # along it when `sample`); beams 1.. start empty, so the first step fills them from beam 0
    weight = torch.zeros(lay.n_groups, beams, dtype=torch.float64, device=device)
    weight[:, 1:] = -math.inf
    key = weight.clone()
    offset = torch.zeros_like(weight)
    ext_rows = (torch.arange(beams, device=device)[:, None] * k + torch.arange(k, device=device)).view(1, beams, k)
    for step in range(int(group_steps.max()) if lay.n_groups else 0):
        scr = pool.scramble(seed, level, step, lay)
        s = scales[dim_steps - 1, step]
        sd = s.double()
        off = dim_steps <= step
        if auxiliary:  # log q_k(a) / p_k(a) of shard a = s x under its conditional target
            # The shards still to come sum to R ~ N(0, r) under p; under q (q(shards) =
            # p(shards) q(z) / p(z)) R given the walk so far is N(mu_r, 1 / prec), and this shard
            # is a fraction frac of R plus prior noise of variance s^2 (1 - frac).
            r = rest[dim_steps - 1, step].clamp(min=1e-300)
            zd = z.double()
            prec = 1.0 / r + 1.0 / v - 1.0  # > 0: r <= 1
            mu_r = ((m - zd) / v + zd) / prec  # (beams, N)
            frac = sd * sd / r  # share of the remaining prior variance this shard carries
            tau = (sd * sd - sd * sd * frac + frac * frac / prec).clamp(min=1e-300)
            a = (0.5 - sd * sd / (2.0 * tau)).masked_fill(off, 0.0)
            b = (sd * frac * mu_r / tau).masked_fill(off, 0.0)
            if beams > 1:  # the weight's x-free part, which differs between beams
                c = -0.5 * (frac * mu_r) ** 2 / tau - 0.5 * torch.log(tau / (sd * sd))
                offset = torch.zeros_like(weight.T).index_add_(1, lay.dim_group, c.masked_fill(off, 0.0)).T
        else:  # the thesis: log q of the running sum z + s x
            a = -(sd * sd) / (2.0 * v)
            b = sd * (m - z.double()) / v
        ab = pool.block_matrix(lay, scr, a, b)  # (beams, nb, 2 * width)
        parent = torch.arange(beams, device=device).repeat(lay.n_groups, 1)
        choice = torch.zeros_like(parent)
        new_weight, new_key = weight.clone(), key.clone()
        for groups in _group_chunks(lay.n_groups, k * beams, memory_bytes):
            scores = pool.group_scores(feats, lay, scr, ab, groups).permute(2, 1, 0)  # (n, beams, K)
            noise = 0.0
            if sample:  # pick a shard with probability proportional to its weight (Gumbel-max)
                keys = torch.arange(groups.start, groups.stop, device=device) * steps + step
                noise = rng.gumbel(seed, level, keys[:, None, None], ext_rows)
                best = (scores[:, 0].double() + noise[:, 0]).argmax(1)
            else:
                best = scores[:, 0].argmax(1)  # beam 0 walks as one beam would
            if beams == 1:
                choice[groups, 0] = best
            else:
                parent[groups], choice[groups], new_weight[groups], new_key[groups] = _extend_beams(
                    best, scores.double() + offset[groups, :, None], noise, weight[groups], key[groups]
                )
        live = (group_steps > step)[:, None]
        parent = torch.where(live, parent, torch.arange(beams, device=device))
        choice.masked_fill_(~live, 0)  # a mask index would sync
        weight, key = torch.where(live, new_weight, weight), torch.where(live, new_key, key)
        if beams > 1:  # each beam continues its parent's walk (one beam is its own parent)
            indices = indices.gather(1, parent[:, :, None].expand(-1, -1, steps))
            z = z.gather(0, parent[lay.dim_group].T)
        indices[:, :, step] = choice
        rows = pool.dim_rows(choice[lay.dim_group].T, scr, k)
        x = table[rows, scr.col] * scr.sign  # == pool.chosen_values, without hashing
        z = torch.where(off, z, z + x * s)
    pick = weight.argmax(1)  # the walk with the largest importance weight
    return indices[torch.arange(lay.n_groups, device=device), pick], z.gather(0, pick[lay.dim_group][None])[0]


def _extend_beams(best, gains, noise, weight, key):
    """One step of the beam search for n groups: their beams' (n, B, K) step log-weights `gains`
    (with the beam's x-free part) and the Gumbels `noise` added to them (0.0 without `sample`).

    Beam 0 takes its own best shard `best`, so it is always the walk one beam would take and the
    chosen walk's weight never falls below it; beams 1.. take the B - 1 other extensions of any
    beam with the largest ranking keys. Returns (parent beam, shard, weight, key), each (n, B).
    """
    n, n_beams, k = gains.shape
    ext = key[:, :, None] + gains + noise
    ranked = ext.flatten(1).scatter(1, best[:, None], -math.inf)  # (beam 0, best) is taken
    top = torch.cat([best[:, None], ranked.topk(n_beams - 1, dim=1).indices], dim=1)  # (n, B) flat
    parent, choice = top // k, top % k
    step_weight = gains.flatten(1).gather(1, top)
    return parent, choice, weight.gather(1, parent) + step_weight, ext.flatten(1).gather(1, top)


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
