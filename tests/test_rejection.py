"""The thesis's parallel rejection sampler (codec/rejection.py, preset `rejection`): its acceptance
masses, exactness where it accepts, bit-exact round trips through encode_level / decode_level and
whole .rec files, the fallback past the budget, edge cases and bad bytes.

Exactness: with a budget no dim exhausts, every dim's sample is Harsha's exact sample of q, so the
standardised residual u = (z - mu_q) / sigma_q passes a KS test at alpha = 0.001 and its mean
square is within 0.05 of 1 (about 5 standard errors at 20 000 values).
"""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from codec import rejection
from codec.entropy import BitReader, BitWriter, RecDecodeError
from codec.level import decode_level, encode_level
from codec.params import CoderParams, registered_id
from tests.test_block_levels import (  # noqa: F401 (store: a fixture)
    channel,
    check_rec_file,
    corruptions,
    residuals,
    roundtrip,
    store,
)

ALPHA = 0.001
U2_TOL = 0.05
PARAMS = CoderParams.preset("rejection")

pytestmark = pytest.mark.usefixtures("one_thread")


CASES = [(0.5, 0.3, 1.0), (0.5, 0.3, 1.8), (2.0, 0.9, 1.7), (-1.0, 2.0, 1.3), (1.0, 1.0, 1.5), (0.0, 0.01, 5.0)]


@pytest.mark.parametrize("m, v, level_", CASES)
def test_not_accepted_matches_quadrature(m, v, level_):
    """t(L) = 1 - integral of min(q, L p), against the trapezoidal rule on a fine grid."""
    x = torch.linspace(-40.0, 40.0, 400_001, dtype=torch.float64)
    q = torch.exp(-((x - m) ** 2) / (2 * v)) / math.sqrt(2 * math.pi * v)
    p = torch.exp(-x * x / 2) / math.sqrt(2 * math.pi)
    want = 1.0 - float(torch.trapezoid(torch.minimum(q, level_ * p), x))
    got = float(rejection.not_accepted(*(torch.tensor([a], dtype=torch.float64) for a in (m, v, level_))))
    assert abs(got - want) < 1e-6


def test_not_accepted_is_zero_once_the_prior_is_the_target():
    one = torch.ones(3, dtype=torch.float64)
    assert torch.equal(rejection.not_accepted(torch.zeros(3, dtype=torch.float64), one, one), torch.zeros(3).double())


@pytest.mark.parametrize("m, v", [(1.0, 0.3), (-0.5, 0.1), (0.8, 0.6), (0.0, 0.02)])
def test_accepted_samples_are_exact_posterior_samples(m, v):
    n = 20_000
    mm, vv = torch.full((n,), m, dtype=torch.float64), torch.full((n,), v, dtype=torch.float64)
    ks, x, _ = rejection.encode(mm, vv, torch.arange(n), seed=5, level=1, budget_bits=16)
    assert (ks > 0).all()
    u = ((x.double() - m) / math.sqrt(v)).numpy()
    assert stats.kstest(u, "norm").pvalue > ALPHA
    assert abs(float((u * u).mean()) - 1.0) < U2_TOL
    kl_bits = 0.5 * (v + m * m - 1 - math.log(v)) / math.log(2)
    assert float(torch.log2(ks.double()).mean()) < kl_bits + 1.0  # E[log2 K] ~ KL


def test_the_preset_samples_the_posterior_through_a_level():
    q = channel((1, 20, 32, 32), [0.6, 1.0, 1.5, 2.0, 3.0], seed=7)
    z, _, st = roundtrip(q, 1, PARAMS)
    assert st["fallbacks"] == 0 and st["n_outliers"] == 0 and st["n_zero_dims"] == 0
    u = residuals(z, q).numpy()
    assert stats.kstest(u, "norm").pvalue > ALPHA
    assert abs(float((u * u).mean()) - 1.0) < U2_TOL


@pytest.mark.parametrize("level", [1, 2])
def test_the_preset_round_trips_bit_exactly(level):
    q = channel((1, 4, 10, 12), [0.0, 0.3, 1.0, 2.5, 0.05, 9.0], seed=level)
    z, data, st = roundtrip(q, level, PARAMS)
    assert st["sampler"] == "rejection" and st["n_outliers"] > 0 and st["coded_dims"] == st["n_groups"] > 1
    other = decode_level(q[2], q[3], data, seed=4, level=level, params=PARAMS)
    assert not torch.equal(z, other)  # the seed keys the candidates


def test_dims_past_the_budget_fall_back_to_quantised_posterior_draws():
    """With 2^2 rounds most 3-bit dims accept nothing: they are sent as 16-bit values, counted."""
    params = PARAMS.with_level(1, index_bits=2)
    q = channel((1, 4, 16, 16), [3.0], seed=12)
    z, _, st = roundtrip(q, 1, params)
    assert 0 < st["fallbacks"] < st["coded_dims"] and st["rounds"] == 4
    u = residuals(z, q)
    assert torch.isfinite(u).all() and float(u.abs().max()) < 6.0


def test_zero_kl_dims_single_dims_and_a_huge_kl_dim():
    zero = (torch.zeros(1, 1, 3, 3), torch.ones(1, 1, 3, 3), torch.zeros(1, 1, 3, 3), torch.ones(1, 1, 3, 3))
    z, _, st = roundtrip(zero, 1, PARAMS)
    assert st["kl_bits"] == 0.0 and st["rounds"] == 1 and st["fallbacks"] == 0  # r = 1: round 1 accepts
    single = tuple(t[..., :1, :1] for t in channel((1, 1, 2, 2), [2.0], seed=9))
    _, _, st = roundtrip(single, 2, PARAMS)
    assert st["coded_dims"] == 1
    huge = channel((1, 2, 4, 4), [0.5], seed=10)
    huge[0].view(-1)[5], huge[1].view(-1)[5] = huge[2].view(-1)[5] + 2.0 * huge[3].view(-1)[5], 1e-7
    z, _, st = roundtrip(huge, 1, PARAMS)
    assert st["kl_bits"] > 25.0 and st["n_outliers"] == 1 and st["coded_dims"] == 31


def test_corrupted_or_truncated_sections_raise_rec_decode_error():
    q = channel((1, 3, 6, 8), [0.5, 1.5, 3.0], seed=11)
    _, data, _ = roundtrip(q, 1, PARAMS)
    for b in corruptions(data):
        with pytest.raises(RecDecodeError):
            decode_level(q[2], q[3], b, seed=3, level=1, params=PARAMS)
    with pytest.raises(RecDecodeError, match="not supported"):
        decode_level(q[2], q[3], data, seed=3, level=1, params=CoderParams.preset("orc"))
    with pytest.raises(RecDecodeError, match="different CoderParams"):
        decode_level(q[2], q[3], data, seed=3, level=1, params=PARAMS.with_level(1, index_bits=11))


def test_an_index_above_the_budget_is_refused_before_hashing(monkeypatch):
    """A well-formed section (valid CRC) whose index exceeds 2^index_bits: the rANS symbol is in the
    alphabet, so only the budget check catches it."""
    budget = PARAMS.level1.index_bits
    real = rejection.encode

    def past_budget(*args, **kwargs):
        ks, x, rounds = real(*args, **kwargs)
        ks[0] = (1 << budget) + 1
        return ks, x, rounds

    monkeypatch.setattr(rejection, "encode", past_budget)
    q = channel((1, 2, 4, 4), [1.0], seed=13)
    _, data = encode_level(*q, seed=3, level=1, params=PARAMS)
    with pytest.raises(RecDecodeError, match="above its budget"):
        decode_level(q[2], q[3], data, seed=3, level=1, params=PARAMS)
    w = BitWriter()
    w.write([1], [budget])
    with pytest.raises(RecDecodeError, match="above its budget"):
        rejection.read_indices(np.array([budget + 1]), BitReader(w.getvalue()), budget, 1)


@pytest.mark.parametrize("arch", ["pln", "vae"])
def test_rec_files_decode_to_the_encoders_image(store, arch):  # noqa: F811 (the imported fixture)
    check_rec_file(store, "rejection", arch)
    fields = PARAMS.levels_format_bytes(2 if arch == "pln" else 1)
    assert registered_id(fields) == (38 if arch == "pln" else 39)
