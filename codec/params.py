"""REC coder parameters: one frozen dataclass per level plus shared knobs, and presets.

Only the fields in `format_bytes` change the bytes a decoder must understand; the others
(margin, outlier limit, oversampling, selection, beams, memory, GEMM dtype, shard decay choices)
steer the encoder only. The presets and the table of registered parameter sets live here with the
dataclasses, past ~300 lines, so that every change to what a file may say is reviewed in one place.
"""

import json
import math
import struct
import zlib
from dataclasses import asdict, dataclass, field, fields, replace

import torch

from codec import pfr

# ids 1, 2, ... in the header's level parameters; append only
SAMPLERS = ("greedy", "importance", *pfr.METHODS, "rejection", "sp-orc-predicted")
_FORMAT = ">BBBHHfHHBd"  # level, sampler, B, S, max group size, outlier range, pool w, windows, adaptive, r


_SCALAR_TYPES = {"int": int, "float": float, "str": str, "bool": bool, "tuple": tuple}


def _parse_value(key: str, text: str, kind: type):
    """A KEY=VALUE override's value as the field's type (ints are accepted for floats)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is str and not isinstance(value, str):
        value = text
    if (
        kind is tuple
        and isinstance(value, list)
        and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value)
    ):
        value = tuple(float(x) for x in value)
    if type(value) is not kind:
        wanted = {
            int: "an integer",
            float: "a number",
            str: "a string",
            bool: "true or false",
            tuple: "a list of numbers",
        }[kind]
        raise ValueError(f"{key} must be {wanted}, got {text!r}")
    return value


@dataclass(frozen=True)
class LevelParams:
    sampler: str = "greedy"  # "greedy" (thesis Alg. 2), "importance" (Alg. 3 + 5), a pfr.METHODS block coder,
    # "rejection" (Alg. 1) or "sp-orc-predicted" (sp-orc over blocks laid out by the rate head, codec/layout.py)
    index_bits: int = 14  # bits per greedy step, or per importance group (B); block coders and rejection below
    steps: int = 30  # greedy shards S; always 1 for importance
    max_group_size: int = 4095  # dims per group
    margin_nats: float = 1.0  # group KL budget = steps * index_bits bits - margin
    outlier_bits: float = 24.0  # dims with more KL are sent as 16-bit values
    oversample_bits: float = 0.0  # importance: n_g = min(2^B, ceil(exp(KL_g) * 2^t));
    # greedy: each step carries b - t bits of KL, so S_g = ceil((KL_g + margin) / (b - t))
    selection: str = "argmax"  # "argmax" (thesis code) or "sample" (prop. to the weight)
    adaptive: bool = True  # per-group index length from its KL, sent as side info (thesis: no)
    zero_kl_bits: float = 0.02  # dims at most this KL, in runs of >= zero_run, take a prior
    zero_run: int = 16  # sample from the shared stream and cost no index (0: off)
    target: str = "sum"  # greedy step score: "sum" (thesis: log q(z + a)) or "auxiliary"
    shard_decay: float = 1.0  # greedy shard variances r^k, normalised (1: thesis' equal)
    outlier_min_ratio: float = 0.0  # greedy: dims with sigma_q/sigma_p < ratio/sqrt(S) ...
    outlier_min_bits: float = 0.0  # ... and KL above this are sent as outliers too
    decay_choices: tuple[float, ...] = ()  # greedy: the encoder codes with the one whose sample
    decay_trial_every: int = 4  # fits q best, tried on every n-th group (level.choose_shard_decay)
    beams: int = 1  # greedy + auxiliary: walks kept per group, ranked by summed log-weight (iREC)
    low_rate_index_bits: int = 0  # sp-orc-predicted: a level whose predicted KL averages below
    low_rate_bits_per_dim: float = 0.0  # this many bits a dim is coded with these index bits (0: off)

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.sampler == "importance" and self.steps != 1:
            raise ValueError("the importance sampler has exactly one step")
        if not 1 <= self.index_bits <= 24 or not 1 <= self.steps < 256:
            raise ValueError("index_bits must be in [1, 24] and steps in [1, 255]")
        if not 1 <= self.max_group_size < 1 << 16:
            raise ValueError("max_group_size must be in [1, 65535]")
        if self.sampler == "importance" and self.max_group_size > 64:
            raise ValueError("importance groups hold at most 64 dims")
        if self.selection not in ("argmax", "sample"):
            raise ValueError("selection must be 'argmax' or 'sample'")
        if self.target not in ("sum", "auxiliary"):
            raise ValueError("target must be 'sum' or 'auxiliary'")
        if not 0.0 < self.shard_decay <= 1.0:
            raise ValueError("shard_decay must be in (0, 1]")
        object.__setattr__(self, "decay_choices", tuple(float(d) for d in self.decay_choices))
        if not all(0.0 < d <= 1.0 for d in self.decay_choices):
            raise ValueError("decay_choices must lie in (0, 1]")
        if self.decay_trial_every < 1:
            raise ValueError("decay_trial_every must be >= 1")
        if not 1 <= self.beams <= min(1 << self.index_bits, 1 << (24 - self.index_bits)):
            raise ValueError("beams must be in [1, min(2^index_bits, 2^(24 - index_bits))]")
        if self.beams > 1 and (self.sampler != "greedy" or self.target != "auxiliary"):
            raise ValueError("beams > 1 needs the greedy sampler with target 'auxiliary'")
        if self.sampler in pfr.METHODS:
            self._check_block_coder()
        if self.sampler == "sp-orc-predicted" and (self.adaptive or self.max_group_size > pfr.MAX_DIMS_PER_BLOCK):
            raise ValueError(
                f"sp-orc-predicted lays out its blocks from the rate head (adaptive false), of at most "
                f"{pfr.MAX_DIMS_PER_BLOCK} dims"
            )
        if self.low_rate_index_bits and (self.sampler != "sp-orc-predicted" or not 1 <= self.low_rate_index_bits <= 24):
            raise ValueError("low_rate_index_bits (1 to 24) is for the sp-orc-predicted sampler")
        if not (math.isfinite(self.low_rate_bits_per_dim) and self.low_rate_bits_per_dim >= 0):
            raise ValueError("low_rate_bits_per_dim must be a finite number >= 0")
        if self.sampler == "rejection" and (self.steps != 1 or self.max_group_size != 1 or self.adaptive):
            raise ValueError("the rejection sampler codes one-dim groups in one step (adaptive false)")
        if self.budget_bits <= 0:
            raise ValueError("margin_nats leaves no group budget")

    def _check_block_coder(self) -> None:
        """The pfr.METHODS samplers code each group as one block. orc / sp-orc search 2^index_bits
        candidates, pfr / sp-pfr stop after at most 2^index_bits arrivals; a block carries
        steps x (index_bits - oversample_bits) bits of KL (budget_bits), all but one step's worth
        of them, in sp-* blocks, in its bin tuple, whose length is sent per block (adaptive)."""
        spatial = self.sampler.startswith("sp-")
        if self.max_group_size > pfr.MAX_DIMS_PER_BLOCK:
            raise ValueError(f"{self.sampler} blocks hold at most {pfr.MAX_DIMS_PER_BLOCK} dims")
        if self.steps != 1 and not spatial:
            raise ValueError(f"{self.sampler} blocks have one step (use sp-{self.sampler} for more)")
        if self.adaptive != spatial:
            raise ValueError("sp-* samplers send each block's bin bits (adaptive); pfr and orc send none")
        if self.step_bits <= 0:
            raise ValueError("oversample_bits leaves no KL for a block's index")

    def replace(self, **changes) -> "LevelParams":
        return replace(self, **changes)

    @property
    def budget_bits(self) -> float:
        return self.steps * self.step_bits - self.margin_nats / math.log(2)

    @property
    def step_bits(self) -> float:
        """KL a greedy step is planned to carry (its index costs index_bits)."""
        if self.sampler == "importance":
            return float(self.index_bits)
        return self.index_bits - self.oversample_bits

    @property
    def pool_width(self) -> int:
        """Importance pool width: the smallest power of two holding a whole group."""
        return max(2, 1 << (self.max_group_size - 1).bit_length())


# The shard decays the encoder chooses between, per level and file (the one whose coded sample fits
# q best; the choice travels in the header). How fast the shards should shrink depends on the
# posterior's widths, which vary with the image and the rate; no single decay is best everywhere.
DECAY_CHOICES = (0.85, 0.9, 0.95)
# The thesis code's level-1 budgets (S=30 x b=14 bits, groups <= 4095, margin 1 nat), with
# departures in the encoder's or the format's favour: index lengths adapt per group, near-zero-KL
# runs (collapsed channels) cost no index, greedy shards shrink geometrically (thesis: equal, which
# cannot resolve dims with sigma_q << 1/sqrt(S)), and each greedy step scores a shard by its weight
# under its own conditional target given the walk so far (`target="auxiliary"`, encoder-only;
# the thesis's log q of the running sum lets a group's sharpest dims decide and spreads the others
# 2-3x wider than q).
THESIS_L1 = LevelParams(
    "greedy", 14, 30, 4095, 1.0, 24.0, zero_run=1024, target="auxiliary", shard_decay=0.85, decay_choices=DECAY_CHOICES
)
# Level 2 walks the same greedy budgets rather than the thesis's importance sampler: its groups of
# <= 15 dims carry ~10-15 bits of KL each and need ~6-7 bits of side information (size, index
# length), ~1.5x KL in all, where 420-bit greedy groups cost ~1.06x.
THESIS_L2 = THESIS_L1.replace(shard_decay=0.9)
# The importance sampler with the thesis's level-2 budgets and KL-length indices: closer to an
# exact posterior sample on very sharp dims, at ~1.5x KL. Its outlier limit is the group budget
# (thesis: 12 bits). No zero runs: level 2's KL is spread thinly (~0.2 bits a dim), and a run's
# side information costs more than its dims add inside importance groups.
IMPORTANCE_L2 = LevelParams("importance", 20, 1, 15, 1.0, 18.5, zero_run=0)
# Exactly the thesis code's semantics (fixed B-bit / S-step indices, equal shards, 12-bit limit).
THESIS_CODE_L1 = LevelParams("greedy", 14, 30, 4095, 1.0, 24.0, adaptive=False, zero_run=0)
THESIS_CODE_L2 = LevelParams("importance", 20, 1, 15, 1.0, 12.0, adaptive=False, zero_run=0)
# ~10x fewer candidate evaluations than `thesis`; level 2 walks greedily too (fewer groups).
FAST_L1 = LevelParams(
    "greedy", 10, 40, 4095, 1.0, 24.0, zero_run=1024, target="auxiliary", shard_decay=0.85, decay_choices=DECAY_CHOICES
)
# dims with sigma_q/sigma_p < 0.1/sqrt(12) go to outliers: 12 steps of 10 bits cannot pin them
# (the importance sampler costs 1.3-1.7x KL instead)
FAST_L2 = LevelParams(
    "greedy",
    10,
    12,
    4095,
    0.5,
    18.0,
    zero_run=384,
    target="auxiliary",
    shard_decay=0.9,
    outlier_min_ratio=0.1,
    decay_choices=DECAY_CHOICES,
)
# iREC (Flamich, Havasi & Hernandez-Lobato 2020): many small auxiliary-variable steps, each the best of
# 64 candidates for ~4 nats of KL (the reference code: ~20 for 3 nats), 10 beams per group ranked by
# the summed log importance weight. Shards shrink slowly (0.97 a step over up to 70 steps): on training
# photos 0.95 lost 0.2-0.3 dB against it, 0.9 over 1 dB, 0.99 and equal shards 0.1-0.5 dB.
IREC_L1 = LevelParams("greedy", 6, 70, 4095, 1.0, 24.0, zero_run=1024, target="auxiliary", shard_decay=0.97, beams=10)
IREC_L2 = IREC_L1.replace(margin_nats=0.5, outlier_bits=18.0, zero_run=384)

# The block coders of codec/pfr.py (docs/coder.md, "Exact coders"), the same on both levels. Their
# budgets keep a Kodak image's encode within about a minute on one CPU thread:
# - pfr: exact (Poisson functional representation), blocks of <= 6 bits KL and <= 8 dims, searched
#   for up to 2^16 arrivals (~2^D_inf; D_inf exceeds KL by ~0.7 bits a sharp dim), dims above 12
#   bits as outliers; ~KL + log2(KL + 1) + 2 bits a block, so about 1.5-2x KL: an oracle.
# - orc: ordered random coding with 2^10 candidates for <= 8 bits a block (2 bits of margin against
#   its bias), dims above 8 bits as outliers.
# - sp-orc: space partitioning, 32-bit blocks: all but the last 8 bits of a block's KL in its
#   bin tuple, 2^10 candidates for the rest.
# - sp-pfr: space-partitioned PFR over 12-bit blocks of <= 8 dims, all but 6 bits in the bin tuple,
#   searched for up to 2^12 arrivals: with the bins spread evenly over a block's dims (all the decoder
#   knows) many searches run long, and blocks that reach the cap are not exact.
PFR_L = LevelParams("pfr", 16, 1, 8, 0.0, 12.0, oversample_bits=10.0, adaptive=False, zero_run=1024)
ORC_L = LevelParams("orc", 10, 1, 255, 0.0, 8.0, oversample_bits=2.0, adaptive=False, zero_run=1024)
SP_PFR_L = LevelParams("sp-pfr", 12, 2, 8, 0.0, 24.0, oversample_bits=6.0, zero_run=1024)
SP_ORC_L = LevelParams("sp-orc", 10, 4, 255, 0.0, 24.0, oversample_bits=2.0, zero_run=1024)
# The thesis's parallel rejection sampler (codec/rejection.py), the same on both levels: every coded dim
# its own group, searched for up to 2^index_bits rounds (the fallback past them is a 16-bit value),
# dims above outlier_bits sent as 16-bit outliers straight away.
REJECTION_L = LevelParams("rejection", 12, 1, 1, 0.0, 8.0, adaptive=False, zero_run=16)
# sp-orc over level-1 blocks that both sides lay out from the model's rate head (codec/layout.py): blocks
# of about `steps` = 24 bits of predicted KL and at most 255 dims, 2^index_bits = 2^10 candidates each,
# no side information; 2^12 candidates (and 2 fewer bin bits a block) when the predicted KL averages
# below 1 bit a dim (about 0.5 bpp with 128 latents), where the head's errors are larger and the search
# cheap. Level 2, whose prior N(0, I) predicts nothing, walks greedily (below).
SP_ORC_PREDICTED_L1 = LevelParams(
    "sp-orc-predicted",
    10,
    24,
    255,
    0.0,
    24.0,
    adaptive=False,
    zero_run=0,
    low_rate_index_bits=12,
    low_rate_bits_per_dim=1.0,
)
# Its level 2 walks as `thesis`'s with the shard decay fixed at 0.9: trying 0.85 and 0.95 on every 4th
# group took a quarter of the encode and, on training-photo crops, made no difference to the image.
SP_ORC_PREDICTED_L2 = THESIS_L2.replace(decay_choices=())

# CoderParams.preset(name) is CoderParams(**_PRESET_FIELDS[name]); these are the names a header may carry.
_PRESET_FIELDS = {
    "thesis": {},  # the thesis code's level-1 budgets on both levels, see THESIS_L1 / THESIS_L2
    "fast": dict(level1=FAST_L1, level2=FAST_L2, gemm_dtype="float32"),
    "thesis-importance": dict(level2=IMPORTANCE_L2),  # `thesis` with the thesis's level-2 sampler
    "thesis-code": dict(level1=THESIS_CODE_L1, level2=THESIS_CODE_L2),  # for comparisons
    "pfr": dict(level1=PFR_L, level2=PFR_L),
    "orc": dict(level1=ORC_L, level2=ORC_L),
    "sp-pfr": dict(level1=SP_PFR_L, level2=SP_PFR_L),
    "sp-orc": dict(level1=SP_ORC_L, level2=SP_ORC_L),
    "irec": dict(level1=IREC_L1, level2=IREC_L2),  # iREC-style beam search over small steps
    "rejection": dict(level1=REJECTION_L, level2=REJECTION_L),  # thesis Alg. 1, exact where it accepts
    "sp-orc-predicted": dict(level1=SP_ORC_PREDICTED_L1, level2=SP_ORC_PREDICTED_L2),  # PLN models with a rate head
}
PRESETS = tuple(_PRESET_FIELDS)


# Parameter sets a file may name by a one-byte id instead of carrying their 24 bytes a level
# (`CoderParams.levels_format_bytes`, 48 of a ~120-byte header): the presets as shipped, for
# 2 and 1 levels. Append only: a file naming id k decodes with entry k forever
# (tests/expected/registered_formats.json guards the entries; a retuned preset gets a new id).
REGISTERED_FORMATS = {
    k: bytes.fromhex(v)
    for k, v in {
        1: "02010e001e0fff4200000000800008013feccccccccccccd"  # thesis (level 2 greedy), 2 levels
        "01010e001e0fff4200000000800008013feb333333333333",
        2: "01010e001e0fff4200000000800008013feb333333333333",  # thesis, thesis-importance, 1 level
        3: "02010a000c0fff4200000000800008013feccccccccccccd"  # fast, 2 levels
        "01010a00280fff4200000000800008013feb333333333333",
        4: "01010a00280fff4200000000800008013feb333333333333",  # fast, 1 level
        5: "0202140001000f4200000000800008013ff0000000000000"  # thesis-importance, 2 levels
        "01010e001e0fff4200000000800008013feb333333333333",
        6: "0202140001000f4200000000800008003ff0000000000000"  # thesis-code, 2 levels
        "01010e001e0fff4200000000800008003ff0000000000000",
        7: "01010e001e0fff4200000000800008003ff0000000000000",  # thesis-code, 1 level
        # the shard decays `thesis` and `fast` choose between (DECAY_CHOICES), other than the above
        8: "02010e001e0fff4200000000800008013feb333333333333"  # thesis, shard decays 0.85 (level 2) / 0.85 (level 1)
        "01010e001e0fff4200000000800008013feb333333333333",
        9: "02010e001e0fff4200000000800008013feb333333333333"  # thesis, shard decays 0.85 (level 2) / 0.9 (level 1)
        "01010e001e0fff4200000000800008013feccccccccccccd",
        10: "02010e001e0fff4200000000800008013feb333333333333"  # thesis, shard decays 0.85 (level 2) / 0.95 (level 1)
        "01010e001e0fff4200000000800008013fee666666666666",
        11: "02010e001e0fff4200000000800008013feccccccccccccd"  # thesis, shard decays 0.9 (level 2) / 0.9 (level 1)
        "01010e001e0fff4200000000800008013feccccccccccccd",
        12: "02010e001e0fff4200000000800008013feccccccccccccd"  # thesis, shard decays 0.9 (level 2) / 0.95 (level 1)
        "01010e001e0fff4200000000800008013fee666666666666",
        13: "02010e001e0fff4200000000800008013fee666666666666"  # thesis, shard decays 0.95 (level 2) / 0.85 (level 1)
        "01010e001e0fff4200000000800008013feb333333333333",
        14: "02010e001e0fff4200000000800008013fee666666666666"  # thesis, shard decays 0.95 (level 2) / 0.9 (level 1)
        "01010e001e0fff4200000000800008013feccccccccccccd",
        15: "02010e001e0fff4200000000800008013fee666666666666"  # thesis, shard decays 0.95 (level 2) / 0.95 (level 1)
        "01010e001e0fff4200000000800008013fee666666666666",
        16: "01010e001e0fff4200000000800008013feccccccccccccd",  # thesis, 1 level, shard decay 0.9
        17: "01010e001e0fff4200000000800008013fee666666666666",  # thesis, 1 level, shard decay 0.95
        18: "02010a000c0fff4200000000800008013feb333333333333"  # fast, shard decays 0.85 (level 2) / 0.85 (level 1)
        "01010a00280fff4200000000800008013feb333333333333",
        19: "02010a000c0fff4200000000800008013feb333333333333"  # fast, shard decays 0.85 (level 2) / 0.9 (level 1)
        "01010a00280fff4200000000800008013feccccccccccccd",
        20: "02010a000c0fff4200000000800008013feb333333333333"  # fast, shard decays 0.85 (level 2) / 0.95 (level 1)
        "01010a00280fff4200000000800008013fee666666666666",
        21: "02010a000c0fff4200000000800008013feccccccccccccd"  # fast, shard decays 0.9 (level 2) / 0.9 (level 1)
        "01010a00280fff4200000000800008013feccccccccccccd",
        22: "02010a000c0fff4200000000800008013feccccccccccccd"  # fast, shard decays 0.9 (level 2) / 0.95 (level 1)
        "01010a00280fff4200000000800008013fee666666666666",
        23: "02010a000c0fff4200000000800008013fee666666666666"  # fast, shard decays 0.95 (level 2) / 0.85 (level 1)
        "01010a00280fff4200000000800008013feb333333333333",
        24: "02010a000c0fff4200000000800008013fee666666666666"  # fast, shard decays 0.95 (level 2) / 0.9 (level 1)
        "01010a00280fff4200000000800008013feccccccccccccd",
        25: "02010a000c0fff4200000000800008013fee666666666666"  # fast, shard decays 0.95 (level 2) / 0.95 (level 1)
        "01010a00280fff4200000000800008013fee666666666666",
        26: "01010a00280fff4200000000800008013feccccccccccccd",  # fast, 1 level, shard decay 0.9
        27: "01010a00280fff4200000000800008013fee666666666666",  # fast, 1 level, shard decay 0.95
        28: "020310000100084200000000800008003ff0000000000000"  # pfr, 2 levels
        "010310000100084200000000800008003ff0000000000000",
        29: "010310000100084200000000800008003ff0000000000000",  # pfr, 1 level
        30: "02040a000100ff4200000000800008003ff0000000000000"  # orc, 2 levels
        "01040a000100ff4200000000800008003ff0000000000000",
        31: "01040a000100ff4200000000800008003ff0000000000000",  # orc, 1 level
        32: "02050c000200084200000000800008013ff0000000000000"  # sp-pfr, 2 levels
        "01050c000200084200000000800008013ff0000000000000",
        33: "01050c000200084200000000800008013ff0000000000000",  # sp-pfr, 1 level
        34: "02060a000400ff4200000000800008013ff0000000000000"  # sp-orc, 2 levels
        "01060a000400ff4200000000800008013ff0000000000000",
        35: "01060a000400ff4200000000800008013ff0000000000000",  # sp-orc, 1 level
        36: "02010600460fff4200000000800008013fef0a3d70a3d70a"  # irec, 2 levels
        "01010600460fff4200000000800008013fef0a3d70a3d70a",
        37: "01010600460fff4200000000800008013fef0a3d70a3d70a",  # irec, 1 level
        38: "02070c000100014200000000800008003ff0000000000000"  # rejection, 2 levels
        "01070c000100014200000000800008003ff0000000000000",
        39: "01070c000100014200000000800008003ff0000000000000",  # rejection, 1 level
        40: "02010e001e0fff4200000000800008013feccccccccccccd"  # sp-orc-predicted, 2 levels
        "01080a001800ff4200000000800008003ff0000000000000",
        41: "01080a001800ff4200000000800008003ff0000000000000",  # sp-orc-predicted, 1 level
        42: "02010e001e0fff4200000000800008013feb333333333333"  # sp-orc-predicted, level-2 shard decay 0.85
        "01080a001800ff4200000000800008003ff0000000000000",
        43: "02010e001e0fff4200000000800008013fee666666666666"  # sp-orc-predicted, level-2 shard decay 0.95
        "01080a001800ff4200000000800008003ff0000000000000",
        # sp-orc-predicted with the low-rate index bits (12), level-2 shard decay 0.9 / 0.85 / 0.95
        44: "02010e001e0fff4200000000800008013feccccccccccccd01080c001800ff4200000000800008003ff0000000000000",
        45: "02010e001e0fff4200000000800008013feb33333333333301080c001800ff4200000000800008003ff0000000000000",
        46: "02010e001e0fff4200000000800008013fee66666666666601080c001800ff4200000000800008003ff0000000000000",
    }.items()
}


def registered_id(format_bytes: bytes) -> int | None:
    """The id of a registered parameter set with exactly these format bytes, if any."""
    return next((k for k, v in REGISTERED_FORMATS.items() if v == format_bytes), None)


@dataclass(frozen=True)
class CoderParams:
    level1: LevelParams = field(default_factory=lambda: THESIS_L1)
    level2: LevelParams = field(default_factory=lambda: THESIS_L2)
    pool_width: int = 128  # greedy block width in the shared pool (power of two)
    pool_windows: int = 8  # greedy pool = 2^b rows x pool_windows * pool_width columns
    outlier_range: float = 32.0  # outliers quantised on [-R, R] (prior-standardised units)
    # score chunks are sized to stay around this many MB; 0 = 256 on the CPU, 4096 on a GPU (at most a
    # quarter of its free memory): an H100 ran an importance-sampled level 2 at 0.5 bpp in 0.22 s, not 0.58 s
    memory_mb: int = 0
    gemm_dtype: str = "float32"  # "bfloat16" may be faster on GPUs; can flip near-ties

    def __post_init__(self):
        w = self.pool_width
        if w < 2 or w & (w - 1) or w > 4096:
            raise ValueError("pool_width must be a power of two in [2, 4096]")
        if not 1 <= self.pool_windows <= 64:
            raise ValueError("pool_windows must be in [1, 64]")
        for lp in (self.level1, self.level2):
            if lp.sampler == "greedy" and lp.max_group_size > 255 * w:
                raise ValueError("greedy groups may span at most 255 pool blocks")
        if self.gemm_dtype not in ("float32", "bfloat16"):
            raise ValueError("gemm_dtype must be 'float32' or 'bfloat16'")
        if self.memory_mb < 0:
            raise ValueError("memory_mb must be >= 0 (0 = chosen by device)")

    @classmethod
    def preset(cls, name: str) -> "CoderParams":
        if name not in _PRESET_FIELDS:
            raise ValueError(f"unknown preset {name!r} ({', '.join(PRESETS)})")
        return cls(**_PRESET_FIELDS[name])

    def for_level(self, level: int) -> LevelParams:
        if level not in (1, 2):
            raise ValueError(f"level must be 1 or 2, got {level}")
        return self.level1 if level == 1 else self.level2

    def with_level(self, level: int, **changes) -> "CoderParams":
        """These params with fields of one level's LevelParams changed."""
        return self.replace(**{f"level{level}": self.for_level(level).replace(**changes)})

    @property
    def gemm_torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.gemm_dtype)

    def format_bytes(self, level: int) -> bytes:
        """The fields a decoder of this level depends on."""
        lp = self.for_level(level)
        return struct.pack(
            _FORMAT,
            level,
            1 + SAMPLERS.index(lp.sampler),
            lp.index_bits,
            lp.steps,
            lp.max_group_size,
            self.outlier_range,
            self.pool_width,
            self.pool_windows,
            int(lp.adaptive),
            lp.shard_decay,
        )

    def format_check(self, level: int) -> int:
        """16 bits of CRC32 of format_bytes(level): a level section carries them, so that a decoder
        given other parameters fails cleanly."""
        return zlib.crc32(self.format_bytes(level)) & 0xFFFF

    def levels_format_bytes(self, num_levels: int) -> bytes:
        """format_bytes of levels num_levels..1 (top first), concatenated: what a header carries."""
        return b"".join(self.format_bytes(lv) for lv in range(num_levels, 0, -1))

    @classmethod
    def from_format_bytes(cls, data: bytes, num_levels: int) -> "CoderParams":
        """Decoder-side params from `format_bytes` of levels num_levels..1, concatenated.

        Encoder-only fields keep their defaults (margin 0): enough to decode any file, even one
        written by a build whose preset of the same name has since changed. ValueError if the
        bytes are malformed or inconsistent.
        """
        size = struct.calcsize(_FORMAT)
        if len(data) != size * num_levels:
            raise ValueError(f"{len(data)} bytes of level parameters for {num_levels} levels")
        levels, shared = {}, set()
        for i, level in enumerate(range(num_levels, 0, -1)):
            (lv, sampler, bits, steps, max_size, outlier_range, pool_width, pool_windows, adaptive, decay) = (
                struct.unpack(_FORMAT, data[i * size : (i + 1) * size])
            )
            if lv != level or not 1 <= sampler <= len(SAMPLERS) or adaptive > 1:
                raise ValueError(f"malformed parameters for level {level}")
            levels[level] = LevelParams(
                SAMPLERS[sampler - 1],
                bits,
                steps,
                max_size,
                margin_nats=0.0,
                adaptive=bool(adaptive),
                shard_decay=decay,
            )
            shared.add((outlier_range, pool_width, pool_windows))
        if len(shared) != 1 or not math.isfinite(outlier_range) or outlier_range <= 0:
            raise ValueError("inconsistent shared coder parameters")
        default = cls()
        params = cls(
            level1=levels.get(1, default.level1),
            level2=levels.get(2, default.level2),
            outlier_range=outlier_range,
            pool_width=pool_width,
            pool_windows=pool_windows,
        )
        if params.levels_format_bytes(num_levels) != data:
            raise ValueError("level parameters do not round-trip")
        return params

    def to_dict(self) -> dict:
        """Plain JSON types (decay_choices as a list): equal to its own JSON round trip."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, d: dict) -> "CoderParams":
        d = dict(d)
        for key in ("level1", "level2"):
            if key in d:
                d[key] = LevelParams(**d[key])
        return cls(**d)

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> "CoderParams":
        return cls.from_dict(json.loads(data.decode()))

    def replace(self, **changes) -> "CoderParams":
        return replace(self, **changes)

    def memory_bytes(self, device: torch.device) -> int:
        """The encoder's score-memory budget on `device` (it never changes the bytes written)."""
        if self.memory_mb:
            return self.memory_mb << 20
        if device.type == "cuda":  # 4 GB, or a quarter of the free memory of a smaller GPU
            return min(4096 << 20, torch.cuda.mem_get_info(device)[0] // 4)
        return 256 << 20

    def with_overrides(self, items: list[str]) -> "CoderParams":
        """These params with `KEY=VALUE` changes, e.g. "level2.shard_decay=0.85", "memory_mb=512".

        VALUE is read as JSON when it parses (numbers, true/false), else as a string; all
        changes are applied at once. ValueError (one line) for an unknown key, a value of the
        wrong type, or a combination the params reject.
        """
        level_types, top_types = (
            {f.name: _SCALAR_TYPES.get(getattr(f.type, "__name__", f.type)) for f in fields(owner)}
            for owner in (LevelParams, CoderParams)
        )
        types = {"": top_types, "level1": level_types, "level2": level_types}
        changes: dict[str, dict] = {head: {} for head in types}
        for item in items:
            key, sep, text = item.partition("=")
            if not sep:
                raise ValueError(f"expected KEY=VALUE, got {item!r}")
            head, _, name = key.rpartition(".")
            kind = types.get(head, {}).get(name)
            if kind is None:
                raise ValueError(f"unknown coder parameter {key!r}")
            changes[head][name] = _parse_value(key, text, kind)
        top = changes.pop("")
        try:
            levels = {k: getattr(self, k).replace(**v) for k, v in changes.items() if v}
            return self.replace(**top, **levels)
        except ValueError as e:
            raise ValueError(f"coder parameters {' '.join(items)}: {e}") from None
