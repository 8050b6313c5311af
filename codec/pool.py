"""Shared candidate pool: how each group reads its candidates from one pool of normals.

Instead of K fresh candidates per group, every group of a level reads the same pool
P (K rows x n_windows*width columns) through its own hashed scramble: its dims are cut into
blocks of `width`; block j of group g at step k reads pool window (offset_gk + j) mod
n_windows, through an affine column permutation (a*u + c) mod width and random signs. Within one
group and step every candidate value is a distinct pool entry, so candidates are exactly i.i.d.
N(0, I); across groups and steps the scrambles decorrelate them (tests/test_coder_statistics.py checks this).

Scores become GEMMs: log-weights are quadratic in x, so for all blocks at once
scores = [P_w^2, P_w] @ [A; B]^T per window w, summed into groups with index_add.
"""

from dataclasses import dataclass

import torch

from codec import rng


@dataclass
class Layout:
    """Where every coded dim sits: group, block, position inside the block."""

    n_groups: int
    width: int
    n_windows: int  # pool windows: most blocks in any group, capped
    n_shifts: int  # row shifts: a group's blocks past the windows wrap around with a shift
    dim_group: torch.Tensor  # (N,) group of each dim
    dim_block: torch.Tensor  # (N,) global block id of each dim
    dim_pos: torch.Tensor  # (N,) position u inside its block, < width
    block_group: torch.Tensor  # (nb,) group of each block
    block_index: torch.Tensor  # (nb,) j: index of the block inside its group
    dim_slot: torch.Tensor | None  # (N,) block * width + position; None when that is arange(N)


def make_layout(sizes: torch.Tensor, width: int, device, max_windows: int = 1 << 30) -> Layout:
    """Cut consecutive groups of the given sizes into blocks of at most `width` dims."""
    if width & (width - 1) or width < 2:
        raise ValueError(f"pool width must be a power of two >= 2, got {width}")
    sizes = sizes.to(device=device, dtype=torch.int64)
    g = torch.arange(sizes.numel(), device=device)
    dim_group = torch.repeat_interleave(g, sizes)
    starts = torch.cumsum(sizes, 0) - sizes
    t = torch.arange(dim_group.numel(), device=device) - starts[dim_group]  # dim index in group
    blocks_per_group = (sizes + width - 1) // width
    first_block = torch.cumsum(blocks_per_group, 0) - blocks_per_group
    block_group = torch.repeat_interleave(g, blocks_per_group)
    block_index = torch.arange(block_group.numel(), device=device) - first_block[block_group]
    dim_block = first_block[dim_group] + t // width
    dim_pos = t % width
    full = bool((sizes % width == 0).all())  # every block full: slots are just 0..N-1
    most_blocks = max(1, int(blocks_per_group.max())) if sizes.numel() else 1
    n_windows = min(max_windows, most_blocks)
    return Layout(
        n_groups=sizes.numel(),
        width=width,
        n_windows=n_windows,
        n_shifts=(most_blocks + n_windows - 1) // n_windows,
        dim_group=dim_group,
        dim_block=dim_block,
        dim_pos=dim_pos,
        block_group=block_group,
        block_index=block_index,
        dim_slot=None if full else dim_block * width + dim_pos,
    )


@dataclass
class Scramble:
    col: torch.Tensor  # (N,) pool column of each dim
    sign: torch.Tensor  # (N,) float32 +-1
    block_window: torch.Tensor  # (nb,) pool window read by each block
    block_shift: torch.Tensor  # (nb,) row shift of blocks that wrapped around the windows
    dim_shift: torch.Tensor  # (N,) the row shift of each dim's block


def block_scramble(seed: int, level: int, step: int, lay: Layout):
    """Per block and slot u < width: column inside the block's pool window (nb, width) and sign
    bit (nb, width), plus the pool window and row shift of every block (nb,). Slots past a group's
    last dim are unused."""
    blocks = torch.arange(lay.block_group.numel(), device=lay.block_group.device)
    return pair_scramble(seed, level, step, blocks, lay)  # an int step: no wait on the device


def pair_scramble(seed: int, level: int, steps: int | torch.Tensor, blocks: torch.Tensor, lay: Layout):
    """block_scramble for a list of (step, block) pairs: (P, width) columns and sign bits, (P,)
    windows and row shifts. Pairs are in (step, block) order and hold every block of a group
    whenever they hold one (the decoder batches the blocks still walking, step by step)."""
    w = lay.width
    n_words = 1 + (w + 63) // 64
    group, index = lay.block_group[blocks], lay.block_index[blocks]
    words = rng.scramble_words(seed, level, group, steps, index, n_words)
    w0 = words[:, 0]
    mult = ((w0 & (w // 2 - 1)) << 1) | 1  # odd, so u -> mult*u + add is a bijection mod w
    add = rng._srl(w0, 16) & (w - 1)
    # The group's window offset comes from word 0 of its first block (index 0) at this step.
    # A group's blocks are consecutive and walk the same steps, so when pairs are in (step,
    # block) order its first block sits `index` pairs earlier.
    first_w0 = w0[torch.arange(w0.numel(), device=w0.device) - index]
    window = (rng._srl(first_w0, 24) % lay.n_windows + index) % lay.n_windows
    # Broadcast over (pair, slot), in place: no per-dim gathers, no multi-MB temporaries.
    u = torch.arange(w, device=w0.device)
    local = (mult[:, None] * u).add_(add[:, None]).bitwise_and_(w - 1)
    sign_bit = words[:, 1:].repeat_interleave(64, dim=1)[:, :w].contiguous()
    sign_bit.bitwise_right_shift_(u % 64).bitwise_and_(1)
    return local, sign_bit, window, index // lay.n_windows


def scramble(seed: int, level: int, step: int, lay: Layout) -> Scramble:
    """The hashed column permutation, window and signs of every coded dim at a step."""
    local, sign_bit, block_window, shift = block_scramble(seed, level, step, lay)
    col = ((block_window * lay.width)[:, None] + local).reshape(-1)
    sign = 1.0 - 2.0 * sign_bit.reshape(-1).to(torch.float32)
    if lay.dim_slot is not None:
        col, sign = col[lay.dim_slot], sign[lay.dim_slot]
    return Scramble(col=col, sign=sign, block_window=block_window, block_shift=shift, dim_shift=shift[lay.dim_block])


def block_matrix(lay: Layout, scr: Scramble, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(..., nb, 2*width): per block, the x^2 coefficients then the (sign-folded) x coefficients.

    `b` may have leading dims (beams, each with its own walk so far); `a` is shared by them."""
    w = lay.width
    nb = lay.block_group.numel()
    lead = b.shape[:-1]
    ab = torch.zeros(*lead, nb * 2 * w, dtype=torch.float32, device=a.device)
    slot = lay.dim_block * 2 * w + scr.col % w
    ab[..., slot] = a.float()
    ab[..., slot + w] = (b * scr.sign).float()
    return ab.view(*lead, nb, 2 * w)


def window_features(pool: torch.Tensor, width: int, window: int, dtype) -> torch.Tensor:
    """[P_w^2, P_w] for one window: (K, 2*width)."""
    p = pool[:, window * width : (window + 1) * width]
    return torch.cat([p * p, p], dim=1).to(dtype)


def group_scores(
    feats: list[torch.Tensor], lay: Layout, scr: Scramble, ab: torch.Tensor, groups: slice
) -> torch.Tensor:
    """(K, ..., n) scores of every pool row as a candidate for groups[groups]: sum of block GEMMs.

    `ab` is block_matrix's (..., nb, 2*width); its leading dims (beams) become columns of the same
    GEMMs. One GEMM per (window, row shift) that some block reads, blocks in ascending order; the
    blocks are sorted into those segments on the device, so a step waits for it only once (the
    segment sizes), not once per segment: on a GPU each wait also stalls the kernel queue.
    """
    g0, g1 = groups.start, groups.stop
    k = feats[0].shape[0]
    lead = ab.shape[:-2]
    n_shifts = lay.n_shifts
    out = torch.zeros(k, *lead, g1 - g0, dtype=torch.float32, device=ab.device)
    n_segments = len(feats) * n_shifts  # blocks of other groups go to one more, unused, at the end
    in_range = (lay.block_group >= g0) & (lay.block_group < g1)
    segment = torch.where(in_range, scr.block_window * n_shifts + scr.block_shift, n_segments)
    order = torch.argsort(segment, stable=True)
    sizes = torch.bincount(segment, minlength=n_segments + 1).tolist()[:n_segments]
    start = 0
    for seg, n in enumerate(sizes):
        if not n:
            continue
        sel = order[start : start + n]
        start += n
        w, shift = divmod(seg, n_shifts)
        rows = ab[..., sel, :].reshape(-1, ab.shape[-1]).to(feats[w].dtype)
        s = (feats[w] @ rows.T).view(k, *lead, n)  # row r scores candidate r - shift
        if shift:
            s = torch.roll(s, -shift, 0)
        out.index_add_(out.dim() - 1, lay.block_group[sel] - g0, s.float())
    return out


def dim_rows(candidates: torch.Tensor, scr: Scramble, n_rows: int) -> torch.Tensor:
    """Pool row of each dim for the chosen candidate of its group (one per dim)."""
    return (candidates + scr.dim_shift) & (n_rows - 1)


def chosen_values(seed: int, level: int, candidates: torch.Tensor, scr: Scramble, n_rows: int) -> torch.Tensor:
    """Random access: the signed pool values of the chosen candidates (one per dim)."""
    return rng.pool_entries(seed, level, dim_rows(candidates, scr, n_rows), scr.col) * scr.sign
