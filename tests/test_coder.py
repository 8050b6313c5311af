"""REC level coder: bit-exact round trips, code length, sample fidelity, edge cases, bad bytes."""

import math

import pytest
import torch
from torch.overrides import TorchFunctionMode

from codec.entropy import RecDecodeError
from codec.level import decode_level, encode_level
from codec.plan import kl_nats, standardise
from codec.params import CoderParams, LevelParams

# Small budgets keep the suite fast; the samplers and layouts are the same as the presets'.
SMALL = CoderParams(
    level1=LevelParams("greedy", 8, 6, 300, 1.0, 16.0),
    level2=LevelParams("importance", 12, 1, 15, 1.0, 9.0),
    pool_width=32,
    pool_windows=4,
)


def targets(shape, bits_per_dim, seed=0, shrink=0.5):
    """Random q, p of the given shape with about `bits_per_dim` KL per dim."""
    g = torch.Generator().manual_seed(seed)
    p_loc = torch.randn(shape, generator=g)
    p_scale = torch.exp(0.3 * torch.randn(shape, generator=g))
    kl = -torch.log1p(-torch.rand(shape, generator=g)) * bits_per_dim * math.log(2)  # Exp(1)
    s = torch.exp(-shrink * kl / 2).clamp(min=0.05)  # part of the KL from a smaller scale
    rest = (kl - (-torch.log(s) + (s * s - 1) / 2)).clamp(min=0)
    m = torch.sqrt(2 * rest) * torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0)
    return p_loc + p_scale * m, p_scale * s, p_loc, p_scale


def roundtrip(q_loc, q_scale, p_loc, p_scale, level, params=SMALL, seed=3):
    z, data, stats = encode_level(
        q_loc, q_scale, p_loc, p_scale, seed=seed, level=level, params=params, return_stats=True
    )
    z2 = decode_level(p_loc, p_scale, data, seed=seed, level=level, params=params)
    assert torch.equal(z, z2)
    assert z.shape == p_loc.shape and z.dtype == p_loc.dtype
    return z, data, stats


def residuals(z, q_loc, q_scale):
    return ((z.double() - q_loc.double()) / q_scale.double()).flatten()


@pytest.mark.parametrize("level", [1, 2])
@pytest.mark.parametrize("shape", [(1, 8, 12, 10), (1, 3, 5, 7)])
def test_decoded_sample_equals_encoder_sample_bit_for_bit(level, shape):
    roundtrip(*targets(shape, 1.0), level)


def test_presets_round_trip_on_small_latents():
    for name in ("thesis", "fast", "thesis-importance", "thesis-code"):
        params = CoderParams.preset(name)
        roundtrip(*targets((1, 4, 8, 8), 2.0), 1, params)
        roundtrip(*targets((1, 4, 6, 6), 2.0), 2, params)


def test_bytes_do_not_depend_on_memory_budget():
    q = targets((1, 8, 16, 16), 1.0)
    a = encode_level(*q, seed=1, level=1, params=SMALL)[1]
    b = encode_level(*q, seed=1, level=1, params=SMALL.replace(memory_mb=1))[1]
    c = encode_level(*q, seed=1, level=2, params=SMALL)[1]
    d = encode_level(*q, seed=1, level=2, params=SMALL.replace(memory_mb=1))[1]
    assert a == b and c == d


def test_greedy_decode_does_not_depend_on_how_steps_are_batched(monkeypatch):
    from codec import greedy

    q = targets((1, 8, 16, 16), 1.0)
    z, data, _ = roundtrip(*q, 1)  # adaptive: groups walk unequal numbers of steps
    for chunk in (1, 5000):  # one step at a time; a few steps per batch
        monkeypatch.setattr(greedy, "_DECODE_CHUNK", chunk)
        assert torch.equal(decode_level(q[2], q[3], data, seed=3, level=1, params=SMALL), z)


class _HostWaits(TorchFunctionMode):
    """Counts the calls that, on a GPU, make the host wait for the device (and stall its queue)."""

    WAITS = {"tolist", "item", "nonzero", "unique", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        index = args[1] if name in ("__getitem__", "__setitem__") else None
        masks = [
            i for i in (index if isinstance(index, tuple) else (index,)) if torch.is_tensor(i) and i.dtype == torch.bool
        ]
        self.count += name in self.WAITS or bool(masks)
        return func(*args, **(kwargs or {}))


def test_greedy_walk_waits_on_the_device_about_once_a_step(monkeypatch):
    from codec import greedy, rng

    monkeypatch.setattr(rng, "_tail_without_sync", lambda device: True)  # the GPU path, on the CPU
    monkeypatch.setattr(greedy, "_DECODE_CHUNK", greedy._GPU_DECODE_CHUNK)
    g = torch.Generator().manual_seed(0)
    sizes = torch.tensor([70, 9, 40, 64, 3])  # up to 9 blocks of 8 over 4 windows: row shifts 0-2
    m = torch.randn(int(sizes.sum()), generator=g, dtype=torch.float64)
    v = torch.full_like(m, 0.3)
    steps = torch.tensor([6, 2, 6, 5, 1])
    walk = dict(seed=1, level=1, bits=6, steps=6, width=8, windows=4, group_steps=steps)
    greedy.shard_table(6)  # built on the host once, then cached
    with _HostWaits() as waits:
        indices, z = greedy.encode(m, v, sizes, memory_bytes=1 << 20, auxiliary=True, **walk)
    assert waits.count <= 6 + 3  # one a step (the GEMM segment sizes) + the layout and step count
    with _HostWaits() as waits:
        assert torch.equal(greedy.decode(indices, sizes, **walk), z)
    assert waits.count <= 6  # all steps in one batch


def test_memory_budget_follows_the_device_unless_set():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert CoderParams().memory_bytes(cpu) == 256 << 20
    assert CoderParams(memory_mb=64).memory_bytes(cuda) == 64 << 20 == CoderParams(memory_mb=64).memory_bytes(cpu)
    if torch.cuda.is_available():
        assert 0 < CoderParams().memory_bytes(cuda) <= 4096 << 20
    with pytest.raises(ValueError, match="memory_mb"):
        CoderParams(memory_mb=-1)


def test_greedy_code_length_is_close_to_kl():
    _, data, st = roundtrip(*targets((1, 32, 16, 16), 1.0), 1)
    assert st["bits"] == 8 * len(data)
    coded_kl = st["kl_bits"] - st["outlier_kl_bits"] - st["zero_kl_bits"]
    assert st["index_bits"] <= st["n_groups"] * 6 * 8  # adaptive: S_g <= 6 steps of 8 bits
    assert coded_kl < st["index_bits"] < 1.1 * coded_kl  # groups filled to budget - 1 nat
    assert st["bits"] < 1.3 * st["kl_bits"]  # tiny groups here: side info is relatively big


def test_importance_code_length_is_index_bits_plus_side_info():
    _, data, st = roundtrip(*targets((1, 16, 16, 16), 2.0), 2)
    coded_kl = st["kl_bits"] - st["outlier_kl_bits"] - st["zero_kl_bits"]
    # adaptive: L_g = ceil(KL_g) <= 12 bits per group, so index bits ~ coded KL + 1/2 per group
    assert coded_kl <= st["index_bits"] <= min(coded_kl + st["n_groups"], 12 * st["n_groups"])
    assert st["bits"] < 1.8 * st["kl_bits"]  # 12-bit groups of <= 15 dims: coarse packing
    fixed = SMALL.replace(level2=LevelParams("importance", 12, 1, 15, 1.0, 9.0, adaptive=False, zero_run=0))
    _, _, st = roundtrip(*targets((1, 16, 16, 16), 2.0), 2, fixed)
    assert st["index_bits"] == st["n_groups"] * 12  # the thesis code: B bits per group


def test_importance_argmax_residuals_have_mean_zero_and_unit_variance():
    q = targets((1, 16, 32, 32), 1.0, shrink=0.3)
    z, _, _ = roundtrip(*q, 2)
    r = residuals(z, q[0], q[1])
    assert abs(r.mean()) < 0.05 and 0.8 < r.var() < 1.4  # argmax at t = 0: ~1.1


def test_importance_sampling_matches_target_ks():
    # Proportional-to-weight selection with 3 bits of oversampling is close to exact.
    # (Even i.i.d. candidates fail this KS at n = 4000 for targets further from the prior.)
    # 2^14 pool rows: the pool itself must be a large sample of N(0, 1).
    params = SMALL.replace(level2=LevelParams("importance", 14, 1, 2, 1.0, 9.0, 3.0, "sample"))
    q_loc = torch.full((4000,), 0.4)
    q_scale = torch.full((4000,), 0.8)
    z, _, _ = roundtrip(q_loc, q_scale, torch.zeros(4000), torch.ones(4000), 2, params)
    r, _ = torch.sort(residuals(z, q_loc, q_scale))
    cdf = 0.5 * (1 + torch.erf(r / math.sqrt(2)))
    ks = (cdf - torch.arange(1, r.numel() + 1) / r.numel()).abs().max().item()
    assert ks < 1.95 / math.sqrt(r.numel())  # alpha = 0.001; i.i.d. candidates give ~1.1/sqrt(n)


def test_greedy_residuals_have_mean_zero_and_bounded_variance():
    # The greedy walk is mode-seeking and its precision floor is ~1/S per dim (thesis: "blurrier").
    q = targets((1, 32, 16, 16), 1.0, shrink=0.3)
    z, _, _ = roundtrip(*q, 1)
    r = residuals(z, q[0], q[1])
    assert abs(r.mean()) < 0.1 and 0.4 < r.var() < 2.5


def test_conditional_target_scores_leave_collapsed_dims_prior_samples_and_pin_sharp_ones():
    # Like a real level 1: 30 % sharp dims (sigma_q / sigma_p 0.05-0.2) among collapsed ones (q = p).
    g = torch.Generator().manual_seed(0)
    shape = (1, 16, 16, 16)
    sharp = torch.rand(shape, generator=g) < 0.3
    q_scale = torch.where(sharp, 0.05 + 0.15 * torch.rand(shape, generator=g), torch.ones(shape))
    q_loc = torch.where(sharp, torch.randn(shape, generator=g), torch.zeros(shape))
    median_sq = {}
    for target in ("sum", "auxiliary"):
        level1 = LevelParams("greedy", 10, 20, 4095, 1.0, 24.0, zero_run=0, target=target, shard_decay=0.85)
        params = SMALL.replace(level1=level1)
        z, _, _ = roundtrip(q_loc, q_scale, torch.zeros(shape), torch.ones(shape), 1, params)
        r2 = residuals(z, q_loc, q_scale) ** 2
        median_sq[target] = r2[sharp.flatten()].median().item() / 0.4549  # 1 for an exact sample
        if target == "auxiliary":  # a collapsed dim's shards are untouched prior draws
            assert 0.9 < r2[~sharp.flatten()].mean() < 1.1
    assert median_sq["auxiliary"] < 3.0 < median_sq["sum"]


def test_greedy_selection_by_weight_round_trips_and_keeps_the_step_count():
    q = targets((1, 32, 16, 16), 1.0, shrink=0.3)
    z, _, st = roundtrip(*q, 1)
    params = SMALL.replace(level1=SMALL.level1.replace(selection="sample"))
    zs, _, sts = roundtrip(*q, 1, params)
    assert not torch.equal(z, zs) and sts["index_bits"] == st["index_bits"]
    assert abs(residuals(zs, q[0], q[1]).mean()) < 0.1


def test_greedy_oversampling_plans_fewer_bits_per_step():
    # Each 8-bit step is planned to carry 8 - t bits, so groups walk ~8 / (8 - t) times as many steps.
    q = targets((1, 32, 16, 16), 1.0, shrink=0.3)
    _, _, st = roundtrip(*q, 1)
    params = SMALL.replace(level1=SMALL.level1.replace(oversample_bits=2.0, steps=8))
    z, _, sto = roundtrip(*q, 1, params)
    assert 1.2 * st["index_bits"] < sto["index_bits"] < 1.45 * st["index_bits"]
    assert SMALL.level1.replace(oversample_bits=2.0).budget_bits == pytest.approx(6 * 6 - 1 / math.log(2))


def test_overrides_change_preset_fields_all_at_once():
    # steps=30 alone would be rejected by the importance sampler: the changes apply together
    p = CoderParams.preset("thesis-importance").with_overrides(
        [
            "level2.steps=30",
            "level2.sampler=greedy",
            "level2.shard_decay=0.85",
            "memory_mb=64",
            "level1.target=sum",
            "level1.margin_nats=2",
        ]
    )
    assert (p.level2.sampler, p.level2.steps, p.level2.shard_decay) == ("greedy", 30, 0.85)
    assert p.memory_mb == 64 and p.level1.target == "sum" and p.level1.margin_nats == 2.0
    assert p.level1.index_bits == CoderParams.preset("thesis").level1.index_bits
    for items, message in [
        (["level3.steps=2"], "unknown coder parameter 'level3.steps'"),
        (["level1=3"], "unknown coder parameter 'level1'"),
        (["steps"], "expected KEY=VALUE, got 'steps'"),
        (["level1.adaptive=1"], "level1.adaptive must be true or false, got '1'"),
        (["level1.index_bits=7.5"], "level1.index_bits must be an integer, got '7.5'"),
        (
            ["level2.sampler=importance"],
            "coder parameters level2.sampler=importance: the importance sampler has exactly one step",
        ),
    ]:
        with pytest.raises(ValueError) as e:
            CoderParams().with_overrides(items)
        assert str(e.value) == message


def test_groups_with_identical_targets_get_independent_samples():
    # Shared pool + per-group scramble must not correlate groups coding the same target.
    n = 4 * 600
    for level in (1, 2):
        z, _, st = roundtrip(torch.full((n,), 0.7), torch.full((n,), 0.5), torch.zeros(n), torch.ones(n), level)
        x = residuals(z, torch.full((n,), 0.7), torch.full((n,), 0.5))
        per = n // st["n_groups"]
        blocks = x[: per * st["n_groups"]].view(st["n_groups"], per)
        corr = torch.corrcoef(blocks[:, :2].T.contiguous() if per > 1 else blocks.T)[0, 1]
        lag = torch.corrcoef(torch.stack([blocks[:-1, 0], blocks[1:, 0]]))[0, 1]
        assert abs(lag) < 0.15 and (per == 1 or abs(corr) < 0.15)
        assert torch.unique(blocks, dim=0).shape[0] == blocks.shape[0]


def test_all_zero_kl_round_trips_in_a_few_bytes():
    shape = (1, 16, 16, 16)
    g = torch.Generator().manual_seed(0)
    p_loc, p_scale = torch.randn(shape, generator=g), torch.rand(shape, generator=g) + 0.5
    for params in (SMALL, CoderParams.preset("thesis"), CoderParams.preset("fast")):
        for level in (1, 2):
            z, data, st = roundtrip(p_loc, p_scale, p_loc, p_scale, level, params)
            assert st["kl_bits"] == 0 and st["n_outliers"] == 0
            assert len(data) <= 40  # one zero run, or (no zero runs) groups of 0-bit indices
            assert st["n_zero_dims"] == (p_loc.numel() if params.for_level(level).zero_run else 0)
            assert st["index_bits"] == 0
            r = residuals(z, p_loc, p_scale)  # a prior sample from the shared stream
            assert abs(r.mean()) < 0.1 and 0.85 < r.var() < 1.15


def test_collapsed_channels_cost_almost_nothing():
    # Real latents: many channels carry ~0 KL. They must not pay an index per group.
    q_loc, q_scale, p_loc, p_scale = targets((1, 8, 16, 32), 0.5)
    off = torch.zeros(8, dtype=torch.bool)
    off[::2] = True
    q_loc[:, off], q_scale[:, off] = p_loc[:, off], p_scale[:, off] * (1 - 1e-4)
    new = SMALL.replace(level1=SMALL.level1.replace(zero_run=256))
    fixed = lambda lp: lp.replace(adaptive=False, zero_run=0)  # noqa: E731
    old_way = SMALL.replace(level1=fixed(SMALL.level1), level2=fixed(SMALL.level2))
    for level in (1, 2):
        _, _, st = roundtrip(q_loc, q_scale, p_loc, p_scale, level, new)
        assert st["n_zero_runs"] >= 4 and st["zero_kl_bits"] < 1.0
        _, _, old = roundtrip(q_loc, q_scale, p_loc, p_scale, level, old_way)
        assert st["bits"] < (0.95 if level == 1 else 0.6) * old["bits"], (level, st, old)


def test_level2_rate_on_a_realistic_latent():
    # Bench-like spread (collapsed channels, Gamma dims, a few 12-30 bit dims), 1.3 bits/dim.
    from scripts.bench_coder import synthetic_level

    g = torch.Generator().manual_seed(7)
    torch.manual_seed(7)
    q = synthetic_level((1, 24, 4, 12), 1.3 * 24 * 4 * 12, g)
    rate = {}
    for name in ("thesis", "thesis-importance", "thesis-code", "fast"):
        _, _, st = roundtrip(*q, 2, CoderParams.preset(name))
        rate[name] = st["bits"] / st["kl_bits"]
    # measured: thesis (greedy walk) 1.12, thesis-importance 1.78, thesis-code 2.02, fast 1.44
    assert rate["thesis"] < 1.2 and rate["thesis-importance"] < 0.9 * rate["thesis-code"], rate
    assert rate["fast"] < 1.5, rate


def test_shrinking_shards_resolve_sharp_dims():
    # sigma_q / sigma_p well below the equal shard std 1/sqrt(S): equal shards leave residuals
    # of several sigma_q; geometric shards (thesis preset) bring them close to an exact sample.
    g = torch.Generator().manual_seed(11)
    n = 3000
    ratio = torch.exp(torch.empty(n).uniform_(math.log(0.03), math.log(0.15), generator=g))
    q_loc, q_scale = torch.randn(n, generator=g) * 0.8, ratio
    sharp = q_loc.abs() < 10
    p = (torch.zeros(n), torch.ones(n))
    stats = {}
    for decay in (1.0, 0.85):
        params = SMALL.replace(level1=LevelParams("greedy", 10, 24, 1000, 1.0, 30.0, shard_decay=decay))
        z, _, st = roundtrip(q_loc, q_scale, *p, 1, params)
        r = residuals(z, q_loc, q_scale)[sharp]
        stats[decay] = (r.var().item(), (r * r).median().item() / 0.4549, r.mean().item())
    # Measured: equal shards var 20 / robust 20; geometric 8 / 6.6 (an exact sample: 1 / 1).
    assert stats[1.0][1] > 10.0  # the thesis' equal shards cannot resolve these dims
    assert stats[0.85][1] < 0.4 * stats[1.0][1] and stats[0.85][0] < 0.5 * stats[1.0][0], stats
    assert abs(stats[0.85][2]) < 0.15


def _mean_u2(z, q_loc, q_scale):
    return (residuals(z, q_loc, q_scale) ** 2).mean().item()


@pytest.mark.parametrize("low, high", [(0.03, 0.15), (0.3, 0.9)])
def test_chosen_shard_decay_codes_the_sample_closest_to_the_posterior(low, high):
    # Which decay fits depends on the posterior's widths: the chooser, trying each decay on a
    # quarter of the groups, must pick the one whose WHOLE-level sample has the smallest mean u^2
    # (or one within noise of it); every choice round-trips.
    g = torch.Generator().manual_seed(5)
    n = 6000
    ratio = torch.exp(torch.empty(n).uniform_(math.log(low), math.log(high), generator=g))
    q_loc, q_scale, p = torch.randn(n, generator=g) * 0.8, ratio, (torch.zeros(n), torch.ones(n))
    choices = (0.7, 0.85, 1.0)
    params = SMALL.replace(level1=LevelParams("greedy", 10, 24, 400, 1.0, 30.0, decay_choices=choices))
    u2 = {}
    for decay in choices:
        z, _, _ = roundtrip(q_loc, q_scale, *p, 1, params.with_level(1, shard_decay=decay))
        u2[decay] = _mean_u2(z, q_loc, q_scale)
    z, data, st = encode_level(q_loc, q_scale, *p, seed=3, level=1, params=params, return_stats=True, choose=True)
    chosen = st["shard_decay"]
    assert torch.equal(z, decode_level(*p, data, seed=3, level=1, params=params.with_level(1, shard_decay=chosen)))
    assert chosen in choices and u2[chosen] <= 1.05 * min(u2.values()), (chosen, u2)
    assert max(u2.values()) > 1.3 * min(u2.values()), u2  # the choice matters here


def test_shard_decay_is_not_chosen_without_choices_or_for_the_importance_sampler():
    q_loc, q_scale, p_loc, p_scale = targets((800,), 0.5)
    for params, level in [(SMALL, 1), (SMALL.with_level(2, decay_choices=(0.5, 0.9)), 2)]:
        z, data = encode_level(q_loc, q_scale, p_loc, p_scale, seed=1, level=level, params=params, choose=True)
        assert data == encode_level(q_loc, q_scale, p_loc, p_scale, seed=1, level=level, params=params)[1]


def test_decay_choices_are_set_from_the_command_line_form():
    p = SMALL.with_overrides(["level1.decay_choices=[0.8, 0.9]", "level1.decay_trial_every=2"])
    assert p.level1.decay_choices == (0.8, 0.9) and p.level1.decay_trial_every == 2
    assert CoderParams.from_dict(p.to_dict()) == p  # JSON round trip keeps a tuple
    with pytest.raises(ValueError, match=r"^level1.decay_choices must be a list of numbers, got '0.9'$"):
        SMALL.with_overrides(["level1.decay_choices=0.9"])
    with pytest.raises(ValueError, match=r"decay_choices must lie in \(0, 1\]$"):
        SMALL.with_overrides(["level1.decay_choices=[0.9, 1.5]"])


def test_one_huge_kl_dim_is_sent_as_an_outlier_the_encoder_also_uses():
    n = 500
    q_loc, q_scale = torch.zeros(n), torch.ones(n) * 0.9
    q_loc[123], q_scale[123] = 7.0, 1e-4
    for level in (1, 2):
        z, _, st = roundtrip(q_loc, q_scale, torch.zeros(n), torch.ones(n), level)
        assert st["n_outliers"] == 1
        step = 2 * SMALL.outlier_range / 65535
        assert abs(z[123].item() - 7.0) < step  # dequantised value, not the raw draw
        assert ((z[123].double() + 32) / step - torch.round((z[123].double() + 32) / step)).abs() < 1e-3


@pytest.mark.parametrize("level", [1, 2])
def test_single_dim_and_sizes_not_multiple_of_group_size(level):
    roundtrip(torch.tensor([0.5]), torch.tensor([0.3]), torch.tensor([0.0]), torch.tensor([1.0]), level)
    roundtrip(*targets((1, 1, 1, 37), 0.2), level)  # caps at 15/300 dims leave a partial group


@pytest.mark.parametrize("level", [1, 2])
def test_posterior_wider_than_prior_round_trips(level):
    q_loc, q_scale, p_loc, p_scale = targets((1, 4, 8, 8), 0.5)
    z, _, _ = roundtrip(q_loc, p_scale * 2.5, p_loc, p_scale, level)
    assert torch.isfinite(z).all()


def test_no_empty_first_group_and_no_wasted_last_group():
    from codec.plan import partition
    import numpy as np

    sizes = partition(np.array([0.5] * 10 + [30.0] + [0.5] * 3), budget_bits=4.0, max_size=15)
    assert sizes.min() >= 1 and sizes.sum() == 14
    assert sizes.tolist() == [8, 2, 1, 3]


@pytest.mark.parametrize("level", [1, 2])
def test_corrupted_or_truncated_bytes_raise_rec_decode_error(level):
    q = targets((1, 8, 8, 8), 1.5)
    _, data, _ = roundtrip(*q, level)
    p_loc, p_scale = q[2], q[3]
    bad = [data[:-1], data[: len(data) // 2], b"", data + b"\0"]
    for i in range(0, len(data), max(1, len(data) // 23)):
        flipped = bytearray(data)
        flipped[i] ^= 0x41
        bad.append(bytes(flipped))
    for b in bad:
        with pytest.raises(RecDecodeError):
            decode_level(p_loc, p_scale, b, seed=3, level=level, params=SMALL)
    with pytest.raises(RecDecodeError, match="CoderParams"):
        decode_level(p_loc, p_scale, data, seed=3, level=level, params=SMALL.replace(pool_width=64))
    with pytest.raises(RecDecodeError):
        decode_level(p_loc[..., :4], p_scale[..., :4], data, seed=3, level=level, params=SMALL)


def test_params_serialise_to_dict_and_bytes():
    for name in ("thesis", "fast", "thesis-importance", "thesis-code"):
        p = CoderParams.preset(name)
        assert CoderParams.from_dict(p.to_dict()) == p
        assert CoderParams.from_bytes(p.to_bytes()) == p
    with pytest.raises(ValueError):
        CoderParams.preset("nope")
    with pytest.raises(ValueError):
        LevelParams("importance", 20, 2)


def test_kl_is_computed_in_prior_standardised_space():
    q_loc, q_scale, p_loc, p_scale = (torch.tensor([v], dtype=torch.float64) for v in (3.0, 0.5, 1.0, 2.0))
    m, v = standardise(q_loc, q_scale, p_loc, p_scale)
    expect = math.log(2.0 / 0.5) + (0.25 + 4.0) / 8.0 - 0.5
    assert kl_nats(m, v).item() == pytest.approx(expect, rel=1e-12)


# ---- CUDA (skipped without a GPU) -------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("level", [1, 2])
def test_cuda_round_trip_is_bit_exact_and_its_bytes_decode_to_the_same_sample_on_cpu(level):
    q_cpu = targets((1, 8, 12, 10), 1.5)
    z, data, _ = roundtrip(*(t.cuda() for t in q_cpu), level)
    z_cpu = decode_level(q_cpu[2], q_cpu[3], data, seed=3, level=level, params=SMALL)
    assert torch.equal(z_cpu, z.cpu())
    # and the other way: bytes written on the CPU decode on the GPU to the CPU's sample
    z_enc, data_cpu = encode_level(*q_cpu, seed=3, level=level, params=SMALL)
    z_gpu = decode_level(q_cpu[2].cuda(), q_cpu[3].cuda(), data_cpu, seed=3, level=level, params=SMALL)
    assert torch.equal(z_gpu.cpu(), z_enc)
