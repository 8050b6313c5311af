"""Importance sampler for small groups (thesis Alg. 3 + 5, Havasi et al.'s MIRACLE step).

Group g draws n_g = min(2^B, ceil(exp(KL_g) * 2^t)) candidates x ~ N(0, I) (prior-standardised)
and keeps one by its log-weight log q'(x) - log N(x; 0, I) = sum_d A_d x_d^2 + B_d x_d + const,
A = (1 - 1/v) / 2, B = m / v: the argmax (thesis code) or a draw proportional to the weight
(Gumbel-max with encoder-private noise). The index costs B bits. Candidates are the rows
(offset_g + i) mod 2^B, i < n_g, of a shared pool, seen through each group's column
permutation and signs; the hashed offset keeps groups with few candidates apart.
"""

import torch

from codec import pool, rng


def _row_chunks(n_rows: int, n_groups: int, memory_bytes: int):
    per = max(1, memory_bytes // (4 * 6 * max(1, n_groups)))  # scores, mask, GEMM, slack
    per = 1 << max(0, per.bit_length() - 1)
    for r0 in range(0, n_rows, per):
        yield r0, min(per, n_rows - r0)


@torch.no_grad()
def encode(
    m: torch.Tensor,
    v: torch.Tensor,
    sizes: torch.Tensor,
    n_candidates: torch.Tensor,
    *,
    seed: int,
    level: int,
    bits: int,
    width: int,
    memory_bytes: int,
    sample: bool = False,
    gemm_dtype=torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Code N(m, v) (float64, standardised) in groups of `sizes` (each <= width).

    Returns the (G,) indices and the float32 sample, exactly as `decode` rebuilds it.
    """
    device = m.device
    lay = pool.make_layout(sizes, width, device)
    k = 1 << bits
    scr = pool.scramble(seed, level, 0, lay)
    ab = pool.block_matrix(lay, scr, (1.0 - 1.0 / v) / 2.0, m / v).to(gemm_dtype)
    offset = row_offsets(seed, level, lay.n_groups, bits, device)
    n_cand = n_candidates.to(device)
    groups = torch.arange(lay.n_groups, device=device)
    best = torch.full((lay.n_groups,), -torch.inf, dtype=torch.float64, device=device)
    best_rel = torch.zeros(lay.n_groups, dtype=torch.int64, device=device)
    for r0, n in _row_chunks(k, lay.n_groups, memory_bytes):
        # Group g draws rows (offset_g + i) mod K, i < n_g: classify its overlap with the chunk.
        rel0 = (r0 - offset) & (k - 1)
        full = (rel0 + n <= n_cand) & (rel0 + n <= k)
        none = (rel0 >= n_cand) & (rel0 + n <= k)
        active = torch.nonzero(~none).squeeze(1)
        if active.numel() == 0:
            continue
        feats = pool.window_features(rng.pool_block(seed, level, r0, n, width, device), width, 0, gemm_dtype)
        scores = (feats @ ab[active].T).float()  # (n, active)
        rel = (torch.arange(r0, r0 + n, device=device)[:, None] - offset[active]) & (k - 1)
        part = torch.nonzero(~full[active]).squeeze(1)
        if part.numel():
            cols = scores[:, part]
            cols.masked_fill_(rel[:, part] >= n_cand[active[part]], -torch.inf)
            scores[:, part] = cols
        if sample:
            scores = scores.double() + rng.gumbel(seed, level, groups[active][None, :], rel)
        top, arg = scores.max(0)
        better = top.double() > best[active]
        best[active] = torch.where(better, top.double(), best[active])
        best_rel[active] = torch.where(better, rel[arg, torch.arange(active.numel())], best_rel[active])
    rows = (best_rel + offset) & (k - 1)
    x = pool.chosen_values(seed, level, rows[lay.dim_group], scr, k)
    return best_rel, x


def row_offsets(seed: int, level: int, n_groups: int, bits: int, device) -> torch.Tensor:
    """Each group's first pool row, so groups with few candidates still draw different rows."""
    g = torch.arange(n_groups, device=device)
    word = rng.scramble_words(seed, level, g, 0, torch.full_like(g, 255), 1)[:, 0]
    return rng._srl(word, 8) & ((1 << bits) - 1)


@torch.no_grad()
def decode(indices: torch.Tensor, sizes: torch.Tensor, *, seed: int, level: int, bits: int, width: int) -> torch.Tensor:
    """Rebuild the float32 sample from the indices: one pool row per group is hashed."""
    lay = pool.make_layout(sizes, width, indices.device)
    scr = pool.scramble(seed, level, 0, lay)
    rows = (indices + row_offsets(seed, level, lay.n_groups, bits, indices.device)) & ((1 << bits) - 1)
    return pool.chosen_values(seed, level, rows[lay.dim_group], scr, 1 << bits)
