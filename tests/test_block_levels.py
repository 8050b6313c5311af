"""The block coders of codec/pfr.py as level samplers (presets pfr, orc, sp-pfr, sp-orc): bit-exact
round trips through encode_level / decode_level and whole .rec files, exactness of the exact ones,
edge cases and bad bytes.

Statistics use synthetic Gaussian channels as tests/test_pfr.py does: per dim, prior N(0, 1) (then
shifted and scaled), posterior variance v = 2^(-2 I_d) and mean m ~ N(0, 1 - v) clipped to 2 prior-side
standard deviations. With I_d >= 0.6 bits, v < 1/2, which pfr.bounded_target leaves as it is, so
the exact presets must sample q itself: the standardised residual u = (z - mu_q) / sigma_q passes a
KS test at alpha = 0.001 and its mean square is within 0.05 of 1 (about 5 standard errors at the
~20 000 coded values).
"""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from codec import pfr
from codec.api import compress_image, decompress
from codec.bitstream import RecFormatError, pack_rec, unpack_rec
from codec.entropy import RecDecodeError
from codec.level import decode_level, encode_level
from codec.params import REGISTERED_FORMATS, CoderParams, registered_id
from codec.store import ModelStore
from models import ModelConfig, build_model, save_model

BLOCK_PRESETS = ("pfr", "orc", "sp-pfr", "sp-orc")
EXACT_PRESETS = ("pfr", "sp-pfr")  # exact where a block's search ends before its arrival cap
ALPHA = 0.001
U2_TOL = 0.05


pytestmark = pytest.mark.usefixtures("one_thread")


def channel(shape, info_bits, seed=0):
    """(q_loc, q_scale, p_loc, p_scale), float32, per-dim information cycling through `info_bits`."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    info = torch.tensor(info_bits, dtype=torch.float64).repeat(-(-n // len(info_bits)))[:n]
    v = 2.0 ** (-2.0 * info)
    m = torch.randn(n, generator=g, dtype=torch.float64).clamp(-2.0, 2.0) * (1.0 - v).sqrt()
    p_loc = torch.randn(n, generator=g, dtype=torch.float64)
    p_scale = torch.exp(0.3 * torch.randn(n, generator=g, dtype=torch.float64))
    q_loc, q_scale = p_loc + p_scale * m, p_scale * v.sqrt()
    return tuple(t.float().view(shape) for t in (q_loc, q_scale, p_loc, p_scale))


def roundtrip(q, level, params, seed=3):
    z, data, st = encode_level(*q, seed=seed, level=level, params=params, return_stats=True)
    back = decode_level(q[2], q[3], data, seed=seed, level=level, params=params)
    assert z.dtype == back.dtype == torch.float32 and z.shape == q[2].shape
    assert torch.equal(z.view(torch.int32), back.view(torch.int32))
    return z, data, st


def residuals(z, q):
    return ((z.double() - q[0].double()) / q[1].double()).flatten()


def corruptions(data: bytes) -> list[bytes]:
    """A section truncated, emptied, extended and with single bytes flipped throughout."""
    bad = [data[:-1], data[: len(data) // 2], b"", data + b"\0"]
    for i in range(0, len(data), max(1, len(data) // 23)):
        flipped = bytearray(data)
        flipped[i] ^= 0x41
        bad.append(bytes(flipped))
    return bad


@pytest.mark.parametrize("name", BLOCK_PRESETS)
@pytest.mark.parametrize("level", [1, 2])
def test_block_presets_round_trip_bit_exactly(name, level):
    q = channel((1, 4, 10, 12), [0.0, 0.3, 1.0, 2.5, 0.05], seed=level)
    z, data, st = roundtrip(q, level, CoderParams.preset(name))
    assert st["sampler"] == name and st["n_groups"] > 1
    if name == "pfr":
        assert st["capped_blocks"] == 0
    assert st["bits"] == 8 * len(data)
    if name.startswith("sp-"):
        assert st["bin_bits"] > 0  # some blocks carry more KL than the in-bin index does
    other = decode_level(q[2], q[3], data, seed=4, level=level, params=CoderParams.preset(name))
    assert not torch.equal(z, other)  # the seed keys the candidates


def test_the_pfr_preset_samples_the_posterior():
    q = channel((1, 20, 32, 32), [0.6, 1.0, 1.5, 2.0, 3.0], seed=7)
    z, _, st = roundtrip(q, 1, CoderParams.preset("pfr"))
    assert st["bounded_dims"] == 0 and st["capped_blocks"] == 0 and st["n_outliers"] == 0
    u = residuals(z, q).numpy()
    assert stats.kstest(u, "norm").pvalue > ALPHA
    assert abs(float((u * u).mean()) - 1.0) < U2_TOL
    assert abs(float(u.mean())) < 0.03


def test_exact_presets_bound_prior_wide_posteriors():
    """Dims with v >= 1 (here 1.5 and 1 with a shifted mean) make r unbounded: their variance is
    capped (pfr.bounded_target), counted in the stats, and the level still codes and decodes."""
    q_loc = torch.tensor([0.0, 0.4, 0.3, 1.0, -0.5] * 8).view(1, 2, 4, 5)
    q_scale = torch.tensor([1.2, 1.0, 0.2, 0.5, 0.9] * 8).view(1, 2, 4, 5)
    p = (torch.zeros_like(q_loc), torch.ones_like(q_loc))
    for name in EXACT_PRESETS:
        z, _, st = roundtrip((q_loc, q_scale, *p), 1, CoderParams.preset(name))
        assert st["bounded_dims"] == 16  # the two prior-wide dims of each block of five
        assert torch.isfinite(z).all()
    assert torch.equal(pfr.bounded_target(torch.tensor([0.3]), torch.tensor([0.2])), torch.tensor([0.2]))


def test_sp_pfr_counts_the_blocks_that_reach_its_arrival_cap():
    """sp-pfr's bins are spread evenly over a block's dims (the decoder knows nothing finer), which
    lengthens the search: on this channel most blocks reach the 2^12-arrival cap (never more) and keep
    the truncated search's sample. The stats say how many; the sample still decodes bit for bit."""
    q = channel((1, 4, 16, 16), [0.6, 1.0, 1.5, 2.0, 3.0], seed=7)
    params = CoderParams.preset("sp-pfr")
    _, _, st = roundtrip(q, 1, params)
    assert 0 < st["capped_blocks"] <= st["n_groups"]
    assert st["max_steps"] == 1 << params.level1.index_bits


def test_orc_with_a_small_budget_is_biased():
    """ORC's 2^10 candidates for up to 8-bit blocks (2 bits of margin) leave a measurable bias."""
    q = channel((1, 16, 24, 24), [1.0, 2.0, 3.0], seed=8)
    z, _, _ = roundtrip(q, 1, CoderParams.preset("orc"))
    u = residuals(z, q)
    assert float((u * u).mean()) - 1.0 > 0.04


@pytest.mark.parametrize("name", BLOCK_PRESETS)
def test_zero_kl_dims_single_dims_and_a_huge_kl_dim(name):
    params = CoderParams.preset(name)
    zero = (torch.zeros(1, 1, 3, 3), torch.ones(1, 1, 3, 3), torch.zeros(1, 1, 3, 3), torch.ones(1, 1, 3, 3))
    z, data, st = roundtrip(zero, 1, params)
    assert st["kl_bits"] == 0.0
    if name in EXACT_PRESETS:  # PFR stops at the first arrival; ORC spends its budget
        assert st["mean_steps"] == 1.0
    single = tuple(t[..., :1, :1] for t in channel((1, 1, 2, 2), [2.0], seed=9))
    roundtrip(single, 2, params)
    huge = channel((1, 2, 4, 4), [0.5], seed=10)
    huge[0].view(-1)[5], huge[1].view(-1)[5] = huge[2].view(-1)[5] + 2.0 * huge[3].view(-1)[5], 1e-7
    z, _, st = roundtrip(huge, 1, params)
    assert st["kl_bits"] > 25.0
    sharp = float(residuals(z, huge)[5])
    if params.level1.outlier_bits < 25.0:  # sent as a 16-bit value, as the greedy coder does
        assert st["n_outliers"] == 1
    else:  # coded through its bins: within a few sigma_q
        assert st["n_outliers"] == 0 and abs(sharp) < 6.0


@pytest.mark.parametrize("name", BLOCK_PRESETS)
def test_corrupted_or_truncated_sections_raise_rec_decode_error(name):
    params = CoderParams.preset(name)
    q = channel((1, 3, 6, 8), [0.5, 1.5, 3.0], seed=11)
    _, data, _ = roundtrip(q, 1, params)
    for b in corruptions(data):
        with pytest.raises(RecDecodeError):
            decode_level(q[2], q[3], b, seed=3, level=1, params=params)
    other = "orc" if name != "orc" else "pfr"
    with pytest.raises(RecDecodeError, match="not supported"):
        decode_level(q[2], q[3], data, seed=3, level=1, params=CoderParams.preset(other))


def test_block_index_past_the_counter_is_refused_before_hashing():
    from codec.entropy import BitReader, BitWriter
    from codec.group_coders import Blocks

    w = BitWriter()
    w.write([1, 5], [40, 29])  # a bin key, then the mantissa of a k with floor(log2 k) = 29
    blocks, lp = Blocks(), CoderParams.preset("sp-pfr").for_level(1)
    with pytest.raises(RecDecodeError, match="out of range"):
        blocks.read(BitReader(w.getvalue()), np.array([29]), np.array([2]), np.array([40]), lp, 1)
    with pytest.raises(RecDecodeError, match="bin bits"):
        blocks.read(BitReader(w.getvalue()), np.array([1]), np.array([1]), np.array([21]), lp, 1)


# ---- whole .rec files ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    d = tmp_path_factory.mktemp("weights")
    for arch in ("pln", "vae"):
        torch.manual_seed(0)
        cfg = ModelConfig(arch=arch, channels=16, latents=8, level2_channels=8, level2_latents=4, log_scale_min=-4.0)
        save_model(build_model(cfg), d, "tiny")
    return ModelStore(dirs=[d])


@pytest.mark.parametrize("name", BLOCK_PRESETS)
@pytest.mark.parametrize("arch", ["pln", "vae"])
def test_rec_files_of_block_presets_decode_to_the_encoders_image(store, name, arch):
    check_rec_file(store, name, arch)


def check_rec_file(store: ModelStore, name: str, arch: str) -> None:
    """A .rec of preset `name` on a tiny model: registered parameters, the encoder's image decoded,
    and a flipped byte in the level-1 section reported as that section's error."""
    model, ref = store.load(next(p for p in store.dirs[0].glob(f"{arch}-*.pt")))
    x = np.random.default_rng(1).integers(0, 256, (19, 27, 3), dtype=np.uint8)
    data, x_hat, stats_ = compress_image(model, x, model_ref=ref, seed=2, params=name)
    header, sections = unpack_rec(data)
    fields = CoderParams.preset(name).levels_format_bytes(model.num_levels)
    assert header.coder == name and len(sections) == model.num_levels
    assert header.coder_params == b"R" + bytes([registered_id(fields)])
    assert REGISTERED_FORMATS[registered_id(fields)] == fields
    assert [s["sampler"] for s in stats_["levels"]] == [name] * model.num_levels
    y, _ = decompress(data, store)
    np.testing.assert_array_equal(y, x_hat)
    bad = bytearray(sections[-1])
    bad[len(bad) // 2] ^= 0x20
    with pytest.raises(RecFormatError, match=rf"section {len(sections)} \(level 1\)"):
        decompress(pack_rec(header, [*sections[:-1], bytes(bad)]), store)
