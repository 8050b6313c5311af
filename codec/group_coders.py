"""How each sampler family codes a level's groups, behind one interface for codec/level.py.

A level section (codec/level.py) is the same for every sampler up to its groups: the plan, outliers,
zero runs and group sizes are shared; what differs is how a group's sample becomes an index and back.
Each family here says

    length_offset, length_alphabet(lp)   how a group's index length is written as a rANS symbol
    index_alphabet(lp)                   the alphabet of one more rANS field per group, or None
    encode(plan, lp, params, ...)        -> CodedGroups: the sample, that field, the raw payload
    read(bits, field, sizes, lens, ...)  the payload back from the raw bits (before any sampling)
    decode(payload, sizes, lens, ...)    -> the coded dims' sample, equal to the encoder's bit for bit

Families: greedy (thesis Alg. 2, codec/greedy.py), importance (Alg. 3 + 5, codec/importance.py), the
block coders of codec/pfr.py (pfr, orc, sp-pfr, sp-orc) and the rejection sampler (Alg. 1,
codec/rejection.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from codec import greedy, importance, pfr, rejection, rng
from codec.entropy import BitReader, RecDecodeError, bucketize, unbucketize
from codec.params import CoderParams, LevelParams
from codec.plan import LevelPlan, choose_shard_decay, greedy_walk, walk_settings

OUTLIER_BITS_Q = 16


def quantised_draw(m, v, dims: torch.Tensor, range_: float, *, seed: int, level: int) -> torch.Tensor:
    """A private posterior draw for each of `dims`, quantised to OUTLIER_BITS_Q bits on [-R, R]."""
    draw = m + v.sqrt() * rng.outlier_normals(seed, level, dims).double()
    return torch.round((draw.clamp(-range_, range_) + range_) / (2 * range_) * ((1 << OUTLIER_BITS_Q) - 1)).long()


def dequantise(q: torch.Tensor, range_: float) -> torch.Tensor:
    step = 2.0 * range_ / ((1 << OUTLIER_BITS_Q) - 1)
    return (q.double() * step - range_).float()


@dataclass
class CodedGroups:
    """What a family's encoder gives the section writer."""

    x: torch.Tensor  # the coded dims' standardised sample, group by group (float32)
    values: np.ndarray  # the raw payload written after the side information
    widths: int | np.ndarray  # its bit widths (one for all, or one per value)
    params: CoderParams  # the params the data decode with (greedy: the chosen shard decay)
    own_field: np.ndarray | None = None  # per group, the symbols of the family's own rANS field
    stats: dict = field(default_factory=dict)


class Family:
    """The defaults: a group's length L is written L + 1, and no rANS field of the family's own."""

    length_offset = 1

    def index_alphabet(self, lp: LevelParams) -> int | None:
        return None


class Greedy(Family):
    """Per group S_g greedy steps of `index_bits` each (its adaptive length: S_g >= 1, written S_g)."""

    length_offset = 0

    def length_alphabet(self, lp: LevelParams) -> int:
        return lp.steps + 1

    def encode(self, plan: LevelPlan, lp, params, *, seed, level, choose_decay=False) -> CodedGroups:
        most_blocks = int(-(-plan.sizes.max() // params.pool_width)) if plan.sizes.size else 1
        table = greedy.pool_table(
            seed, level, lp.index_bits, min(params.pool_windows, most_blocks) * params.pool_width, plan.m.device
        )
        if choose_decay:
            decay = choose_shard_decay(plan, lp, params, table, seed=seed, level=level)
            params = params.with_level(level, shard_decay=decay)
            lp = params.for_level(level)
        m, v, sizes, lens = plan.m[plan.cod_pos], plan.v[plan.cod_pos], plan.sizes, plan.lens
        idx, x = greedy_walk(m, v, sizes, lens, lp, params, lp.shard_decay, table, seed=seed, level=level)
        steps = np.full(len(sizes), lp.steps) if lens is None else lens
        used = np.arange(lp.steps)[None, :] < steps[:, None]
        return CodedGroups(x, idx.cpu().numpy()[used], lp.index_bits, params, stats={"shard_decay": lp.shard_decay})

    def read(self, bits: BitReader, own_field, sizes, lens, lp: LevelParams, level: int):
        steps = lens if lp.adaptive else np.full(sizes.size, lp.steps, dtype=np.int64)
        flat = bits.read(int(steps.sum()), lp.index_bits).astype(np.int64)
        idx = np.zeros((sizes.size, lp.steps), dtype=np.int64)
        idx[np.arange(lp.steps)[None, :] < steps[:, None]] = flat
        return idx, steps

    def decode(self, payload, sizes, lens, cod_pos, lp, params, *, seed, level) -> torch.Tensor:
        idx, steps = payload
        device = cod_pos.device
        return greedy.decode(
            torch.from_numpy(idx).to(device),
            torch.from_numpy(sizes).to(device),
            **walk_settings(lp, params, seed=seed, level=level),
            group_steps=torch.from_numpy(steps).to(device),
            decay=lp.shard_decay,
        )


class Importance(Family):
    """One index per group among n_g = 2^L_g candidates (adaptive) or ~exp(KL_g) 2^t (the thesis)."""

    def length_alphabet(self, lp: LevelParams) -> int:
        return lp.index_bits + 2

    def encode(self, plan: LevelPlan, lp, params, *, seed, level, choose_decay=False) -> CodedGroups:
        device, lens = plan.m.device, plan.lens
        if lens is None:
            n_cand = torch.exp(plan.group_kl + lp.oversample_bits * math.log(2)).ceil()
            widths = lp.index_bits
        else:
            n_cand = torch.exp2(torch.from_numpy(lens).to(device).double())
            widths = lens
        idx, x = importance.encode(
            plan.m[plan.cod_pos],
            plan.v[plan.cod_pos],
            torch.from_numpy(plan.sizes).to(device),
            n_cand.clamp(1, 1 << lp.index_bits).long(),
            seed=seed,
            level=level,
            bits=lp.index_bits,
            width=lp.pool_width,
            memory_bytes=params.memory_bytes(device),
            gemm_dtype=params.gemm_torch_dtype,
            sample=lp.selection == "sample",
        )
        return CodedGroups(x, idx.cpu().numpy(), widths, params)

    def read(self, bits: BitReader, own_field, sizes, lens, lp: LevelParams, level: int):
        return bits.read(sizes.size, lens if lp.adaptive else lp.index_bits).astype(np.int64)

    def decode(self, idx, sizes, lens, cod_pos, lp, params, *, seed, level) -> torch.Tensor:
        device = cod_pos.device
        return importance.decode(
            torch.from_numpy(idx).to(device),
            torch.from_numpy(sizes).to(device),
            seed=seed,
            level=level,
            bits=lp.index_bits,
            width=lp.pool_width,
        )


class Blocks(Family):
    """Each group one block of a pfr block coder: floor(log2 k) of its index k in the family's rANS
    field, then the blocks' bin tuples (sp-*: L_b bits) and k's mantissas raw."""

    def length_alphabet(self, lp: LevelParams) -> int:
        return pfr.MAX_BIN_BITS_PER_BLOCK + 2

    def index_alphabet(self, lp: LevelParams) -> int:
        return pfr.INDEX_ALPHABET

    def encode(self, plan: LevelPlan, lp, params, *, seed, level, choose_decay=False) -> CodedGroups:
        m, v, sizes = plan.m[plan.cod_pos], plan.v[plan.cod_pos], plan.sizes
        if not sizes.size:  # every dim an outlier or in a zero run
            empty = np.zeros(0, dtype=np.int64)
            stats = dict(mean_steps=0.0, max_steps=0, capped_blocks=0, bounded_dims=0, bin_bits=0)
            return CodedGroups(m.float(), empty, empty, params, empty, stats)
        lay = block_layout(sizes, plan.lens, m.device)
        exact = lp.sampler in pfr.EXACT_METHODS
        target_v = pfr.bounded_target(m, v) if exact else v
        x, keys, ks, st = pfr.code_blocks(
            m,
            target_v,
            lay,
            seed=seed,
            method=lp.sampler,
            level=level,
            budget=None if exact else 1 << lp.index_bits,
            max_steps=1 << lp.index_bits,
            memory_elems=params.memory_bytes(m.device) // 64,  # ~8 float64 temporaries per candidate-dim
        )
        buckets, mantissas, widths = bucketize(ks.cpu().numpy(), 0)
        key_widths = lay.block_bin_bits.cpu().numpy()
        stats = dict(
            mean_steps=float(st["steps"].double().mean()),
            max_steps=int(st["steps"].max()),
            capped_blocks=int(st["capped"].sum()),
            bounded_dims=int((target_v < v).sum()),
            bin_bits=int(key_widths.sum()),
        )
        values = np.concatenate([keys.cpu().numpy(), mantissas])
        return CodedGroups(x, values, np.concatenate([key_widths, widths]), params, buckets, stats)

    def read(self, bits: BitReader, buckets, sizes, lens, lp: LevelParams, level: int):
        """(2, n_blocks): the blocks' bin tuples and indices k, checked before any candidate is hashed."""
        n_blocks = buckets.size
        if n_blocks > pfr.MAX_BLOCKS:
            raise RecDecodeError(f"level {level}: {n_blocks} blocks, above {pfr.MAX_BLOCKS}")
        key_bits = lens if lp.adaptive else np.zeros(n_blocks, dtype=np.int64)
        if n_blocks and (
            key_bits.max() > pfr.MAX_BIN_BITS_PER_BLOCK or (key_bits > sizes * pfr.MAX_BIN_BITS_PER_DIM).any()
        ):
            raise RecDecodeError(f"level {level}: more bin bits than a block can hold")
        keys = bits.read(n_blocks, key_bits).astype(np.int64)
        ks = unbucketize(buckets, bits, False)
        if n_blocks and ks.max() >= pfr.MAX_INDEX:
            raise RecDecodeError(f"level {level}: block index out of range")
        return np.stack([keys, ks])

    def decode(self, idx, sizes, lens, cod_pos, lp, params, *, seed, level) -> torch.Tensor:
        if not sizes.size:
            return torch.empty(0, dtype=torch.float32, device=cod_pos.device)
        lay = block_layout(sizes, lens if lp.adaptive else None, cod_pos.device)
        idx = torch.from_numpy(idx).to(cod_pos.device)
        return pfr.regenerate(seed, level, lay, idx[0], idx[1])


def block_layout(sizes: np.ndarray, lens, device) -> pfr.BlockLayout:
    """The groups as pfr blocks; sp-* blocks' L_b bin bits spread evenly over their dims."""
    sizes_t = torch.from_numpy(sizes).to(device)
    bins = None if lens is None else pfr.spread_bin_bits(sizes_t, torch.from_numpy(lens).to(device), device)
    return pfr.make_layout(sizes_t, bins, device)


class Rejection(Family):
    """One-dim groups: floor(log2 K) + 1 of each dim's accepted round K in the family's rANS field
    (0 where none was accepted within the budget), then K's mantissas and the fallback dims' 16-bit
    quantised posterior draws raw."""

    def length_alphabet(self, lp: LevelParams) -> int:
        return lp.steps + 1

    def index_alphabet(self, lp: LevelParams) -> int:
        return rejection.index_alphabet(lp.index_bits)

    def encode(self, plan: LevelPlan, lp, params, *, seed, level, choose_decay=False) -> CodedGroups:
        """Dims that accept nothing within 2^index_bits rounds fall back to a 16-bit quantised posterior
        draw, as outliers do (they are coded dims, never outliers, so their draws are distinct)."""
        dims = plan.cod_pos
        m, v = plan.m[dims], plan.v[dims]
        ks, x, rounds = rejection.encode(m, v, dims, seed=seed, level=level, budget_bits=lp.index_bits)
        fallback = ks == 0
        q = quantised_draw(m[fallback], v[fallback], dims[fallback], params.outlier_range, seed=seed, level=level)
        x[fallback] = dequantise(q, params.outlier_range)
        ks_np = ks.cpu().numpy()
        buckets, mantissas, widths = rejection.index_fields(ks_np)
        values = np.concatenate([mantissas, q.cpu().numpy()])
        widths = np.concatenate([widths, np.full(q.numel(), OUTLIER_BITS_Q)])
        stats = dict(coded_dims=int(ks_np.size), fallbacks=int(fallback.sum()), rounds=rounds)
        return CodedGroups(x, values, widths, params, buckets, stats)

    def read(self, bits: BitReader, buckets, sizes, lens, lp: LevelParams, level: int):
        ks = rejection.read_indices(buckets, bits, lp.index_bits, level)
        fallback_q = bits.read(int((ks == 0).sum()), OUTLIER_BITS_Q).astype(np.int64)
        return ks, fallback_q

    def decode(self, payload, sizes, lens, cod_pos, lp, params, *, seed, level) -> torch.Tensor:
        ks, fallback_q = (torch.from_numpy(a).to(cod_pos.device) for a in payload)
        x = torch.empty(cod_pos.numel(), dtype=torch.float32, device=cod_pos.device)
        hit = ks > 0
        x[hit] = rejection.decode(ks[hit], cod_pos[hit], seed=seed, level=level)
        x[~hit] = dequantise(fallback_q, params.outlier_range)
        return x


def group_coder(sampler: str) -> Family:
    """The family that codes a level whose LevelParams.sampler is `sampler`."""
    if sampler in pfr.METHODS:
        return Blocks()
    return {"greedy": Greedy, "importance": Importance, "rejection": Rejection}[sampler]()
