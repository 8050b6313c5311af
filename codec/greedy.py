"""Greedy sharded sampler (thesis Alg. 2), batched over all groups of a level.

In prior-standardised space the proposal N(0, I) is split into S shards of variance 1/S.
Starting from z = 0, each of S steps offers every group 2^b shard candidates s*x (x from the
shared pool, s = 1/sqrt(S)) and keeps the one maximising log q'(z + s*x); the step's index
costs b bits. log q'(z + s*x) = sum_d A_d x_d^2 + B_d x_d + const with
A = -s^2 / (2 v), B = s (m - z) / v, so one step for all groups is a few GEMMs.
"""

import math

import torch

from codec import pool, rng


def shard_scale(steps: int) -> float:
    """1/sqrt(S) rounded to float32 once, so encoder and decoder multiply by the same value."""
    return float(torch.tensor(1.0 / math.sqrt(steps), dtype=torch.float32))


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Code N(m, v) (float64, standardised, groups of `sizes` in order).

    Returns the (G, steps) indices and the float32 sample, exactly as `decode` rebuilds it.
    """
    device = m.device
    lay = pool.make_layout(sizes, width, device, windows)
    k = 1 << bits
    s = shard_scale(steps)
    table = rng.pool_block(seed, level, 0, k, lay.n_windows * width, device)
    feats = [pool.window_features(table, width, w, gemm_dtype) for w in range(lay.n_windows)]
    a = -(s * s) / (2.0 * v)  # float64, constant over steps
    z = torch.zeros(m.shape, dtype=torch.float32, device=device)
    indices = torch.empty(lay.n_groups, steps, dtype=torch.int64, device=device)
    for step in range(steps):
        scr = pool.scramble(seed, level, step, lay)
        b = s * (m - z.double()) / v
        ab = pool.block_matrix(lay, scr, a, b)
        for groups in _group_chunks(lay.n_groups, k, memory_bytes):
            scores = pool.group_scores(feats, lay, scr, ab, groups)
            indices[groups, step] = scores.argmax(0)
        rows = pool.dim_rows(indices[lay.dim_group, step], scr, k)
        x = table[rows, scr.col] * scr.sign  # == pool.chosen_values, without hashing
        z = z + x * s
    return indices, z


@torch.no_grad()
def decode(
    indices: torch.Tensor, sizes: torch.Tensor, *, seed: int, level: int, bits: int, steps: int,
    width: int, windows: int
) -> torch.Tensor:
    """Rebuild the float32 sample from the indices: only the chosen pool entries are hashed."""
    device = indices.device
    lay = pool.make_layout(sizes, width, device, windows)
    s = shard_scale(steps)
    z = torch.zeros(lay.dim_group.numel(), dtype=torch.float32, device=device)
    for step in range(steps):
        scr = pool.scramble(seed, level, step, lay)
        x = pool.chosen_values(seed, level, indices[lay.dim_group, step], scr, 1 << bits)
        z = z + x * s
    return z
