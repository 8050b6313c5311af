"""Exact and truncated PFR coders (codec/pfr.py): exactness, code length, bias, round trips, errors.

Statistical tests use fixed seeds (deterministic) on synthetic Gaussian channels: per dim,
prior N(0, 1), posterior N(m, v) with v = 2^(-2 I_d) and m ~ N(0, 1 - v), so that I_d bits is
the dim's mutual information and its KL averages I_d (m is drawn clipped to 2 prior-side
standard deviations, which bounds D_inf and so the exact coders' run time). An exact coder's standardised sample
u = (z - m) / sqrt(v) is N(0, 1): KS test at alpha = 0.001 and mean u^2 within 0.06 of 1
(about 5 standard errors at 15000 values).
"""

import math

import pytest
import torch
from scipy import stats

from codec import pfr, rng
from codec.entropy import RecDecodeError

ALPHA = 0.001
U2_TOL = 0.06


pytestmark = pytest.mark.usefixtures("one_thread")


def channel(n_blocks: int, info_bits: list[float], seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(m, v, per-dim information) of n_blocks blocks with per-dim information `info_bits`."""
    g = torch.Generator().manual_seed(seed)
    info = torch.tensor(info_bits, dtype=torch.float64).repeat(n_blocks)
    v = 2.0 ** (-2.0 * info)
    m = torch.randn(info.numel(), generator=g, dtype=torch.float64).clamp(-2.0, 2.0) * (1.0 - v).sqrt()
    return m, v, info


def standardised(z: torch.Tensor, m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (z.double() - m) / v.sqrt()


def sp_bits(info: torch.Tensor, n_blocks: int, d: int) -> torch.Tensor:
    """The toys' allocation: floor(block information) bits, spread by per-dim information."""
    return pfr.allocate_bin_bits(info, [d] * n_blocks, math.floor(float(info[:d].sum())))


INFO_5D = [0.0, 0.4, 0.8, 1.2, 1.6]  # 4 bits a block, one collapsed dim


def test_sp_pfr_search_returns_the_argmax_over_every_bins_arrivals():
    # The per-bin bounds only skip arrivals that cannot win: brute force over the first 4000
    # arrivals of every bin's process (far past any winner here) picks the same point.
    n_blocks, seed, arrivals = 12, 7, 4000
    m, v, info = channel(n_blocks, [1.0, 2.5], seed=5)
    bins = sp_bits(info, n_blocks, 2)
    _, _, st = pfr.encode_blocks(m, v, [2] * n_blocks, seed=seed, method="sp-pfr", bin_bits=bins)
    lay = pfr.make_layout([2] * n_blocks, bins, "cpu")
    ks = torch.arange(1, arrivals + 1)
    for b in range(n_blocks):
        dims = torch.tensor([2 * b, 2 * b + 1])
        n_bits = int(lay.block_bin_bits[b])
        best = (-math.inf, None, None)
        for key in range(1 << n_bits):
            j = (key >> lay.key_shift[dims]) & ((1 << lay.bin_bits[dims]) - 1)
            lo, hi = pfr._bin_edges(j, lay.bin_bits[dims])
            sd = v[dims].sqrt()
            log_pi = float(pfr._log_interval_mass((lo - m[dims]) / sd, (hi - m[dims]) / sd).sum())
            keys = torch.full((arrivals,), key)
            u = rng.pfr_private_bin_uniforms(seed, 0, torch.full((arrivals,), b), ks - 1, keys)
            t = torch.cumsum(-torch.log(u), 0) * math.exp(-log_pi)
            x = pfr._points(seed, 0, lay, dims[None, :], ks[:, None], keys[:, None]).double()
            score = pfr._log_ratio_dims(x, m[dims], v[dims]).sum(1) - n_bits * math.log(2) - log_pi - torch.log(t)
            i = int(score.argmax())
            if float(score[i]) > best[0]:
                best = (float(score[i]), key, i + 1)
        assert (int(st["bin_key"][b]), int(st["index"][b])) == best[1:]


def test_sp_pfr_blocks_with_too_many_bins_to_list_are_searched_under_one_bound():
    # 14 bin bits on one sharp dim: past MAX_SEARCH_BIN_BITS, so the global-bound search codes it
    # beside per-bin searches of the small blocks; the file decodes to the encoder's sample.
    m = torch.tensor([1.3, 0.2, -0.4, 0.5, -1.0], dtype=torch.float64)
    v = torch.tensor([1e-8, 0.3, 0.5, 0.2, 0.4], dtype=torch.float64)
    sizes, bins = [1, 2, 2], torch.tensor([14, 1, 1, 1, 0])
    assert 14 > pfr.MAX_SEARCH_BIN_BITS
    z, data, st = pfr.encode_blocks(m, v, sizes, seed=5, method="sp-pfr", bin_bits=bins)
    assert not st["capped"].any()
    assert torch.equal(pfr.decode_blocks(sizes, data, seed=5, method="sp-pfr", bin_bits=bins), z)
    assert abs(float(z[0]) - 1.3) < 1e-3  # the sharp dim lands within ~10 of its sigma_q
    assert int(st["steps"][0]) > 0


@pytest.mark.parametrize("method", ["pfr", "sp-pfr"])
def test_exact_coders_sample_the_target(method):
    n_blocks = 3000
    m, v, info = channel(n_blocks, INFO_5D, seed=1)
    bins = sp_bits(info, n_blocks, 5) if method == "sp-pfr" else None
    z, _, st = pfr.encode_blocks(m, v, [5] * n_blocks, seed=11, method=method, bin_bits=bins)
    u = standardised(z, m, v)
    assert not st["capped"].any()
    assert stats.kstest(u.numpy(), "norm").pvalue > ALPHA
    assert abs(float((u * u).mean()) - 1.0) < U2_TOL
    assert abs(float(u.mean())) < 0.03


def test_space_partitioning_cuts_the_steps():
    n_blocks = 400
    m, v, info = channel(n_blocks, [0.0, 0.8, 1.6, 2.4, 3.2], seed=2)  # 8 bits a block
    _, _, plain = pfr.encode_blocks(m, v, [5] * n_blocks, seed=3, method="pfr")
    _, _, sp = pfr.encode_blocks(m, v, [5] * n_blocks, seed=3, method="sp-pfr", bin_bits=sp_bits(info, n_blocks, 5))
    assert float(sp["bound_bits"].mean()) < float(plain["dinf_bits"].mean()) - 2.0
    assert float(sp["steps"].double().mean()) < float(plain["steps"].double().mean()) / 4


@pytest.mark.parametrize("method", ["pfr", "sp-pfr"])
def test_code_length_within_the_pfr_bound(method):
    """mean log2 K <= KL + log2(KL + 1) + 1, and the bytes <= KL + log2(KL + 1) + 4 bits a block."""
    n_blocks = 500
    m, v, info = channel(n_blocks, [0.0, 0.6, 1.2, 1.8, 2.4], seed=4)  # 6 bits a block
    bins = sp_bits(info, n_blocks, 5) if method == "sp-pfr" else None
    _, data, st = pfr.encode_blocks(m, v, [5] * n_blocks, seed=5, method=method, bin_bits=bins)
    kl = float(st["kl_bits"].mean())
    bound = kl + math.log2(kl + 1.0)
    if method == "pfr":
        assert float(torch.log2(st["index"].double()).mean()) <= bound + 1.0
    assert 8.0 * len(data) / n_blocks <= bound + 4.0
    assert st["code_bits"] == 8.0 * len(data)


def test_orc_bias_shrinks_with_the_budget():
    n_blocks = 400
    m, v, _ = channel(n_blocks, [0.5, 1.0, 1.5, 2.0], seed=6)  # 5 bits a block
    excess = []
    for budget in (4, 64, 2048):
        z, _, st = pfr.encode_blocks(m, v, [4] * n_blocks, seed=7, method="orc", budget=budget)
        assert (st["steps"] == budget).all()
        u = standardised(z, m, v)
        excess.append(abs(float((u * u).mean()) - 1.0))
    assert excess[0] > 0.5  # 4 candidates for 5 bits: far from q
    assert excess[0] > excess[1] > excess[2]
    assert excess[2] < 0.1


def test_space_partitioning_removes_most_of_orcs_bias():
    n_blocks = 400
    m, v, info = channel(n_blocks, [0.0, 0.8, 1.6, 2.4, 3.2], seed=8)  # 8 bits a block, 64 candidates
    z, _, _ = pfr.encode_blocks(m, v, [5] * n_blocks, seed=9, method="orc", budget=64)
    z_sp, _, _ = pfr.encode_blocks(
        m, v, [5] * n_blocks, seed=9, method="sp-orc", budget=64, bin_bits=sp_bits(info, n_blocks, 5)
    )
    u, u_sp = standardised(z, m, v), standardised(z_sp, m, v)
    assert abs(float((u_sp * u_sp).mean()) - 1.0) < abs(float((u * u).mean()) - 1.0) / 5


@pytest.mark.parametrize("method", ["pfr", "orc", "sp-pfr", "sp-orc"])
def test_round_trip_is_bit_exact(method):
    n_blocks = 50
    m, v, info = channel(n_blocks, [0.2, 1.0, 2.0], seed=10)
    sizes = [3] * n_blocks
    bins = sp_bits(info, n_blocks, 3) if method.startswith("sp-") else None
    z, data, st = pfr.encode_blocks(m, v, sizes, seed=2**64 - 1, method=method, budget=300, bin_bits=bins, level=3)
    back = pfr.decode_blocks(sizes, data, seed=2**64 - 1, method=method, bin_bits=bins, level=3)
    assert z.dtype == back.dtype == torch.float32
    assert torch.equal(z.view(torch.int32), back.view(torch.int32))
    other = pfr.decode_blocks(sizes, data, seed=1, method=method, bin_bits=bins, level=3)
    assert not torch.equal(z, other)  # the seed keys the candidates


def test_search_does_not_depend_on_chunking():
    n_blocks = 60
    m, v, info = channel(n_blocks, [0.5, 1.0, 2.0, 3.0], seed=12)
    bins = sp_bits(info, n_blocks, 4)
    # orc / sp-orc: 1 or 7-15 batches of blocks; sp-orc's dims of 2^3 bins > 4 candidates skip the bin table
    cases = (("pfr", None, None, 500), ("sp-pfr", bins, None, 500), ("orc", None, 64, 500), ("sp-orc", bins, 4, 20))
    for method, bin_bits, budget, small in cases:
        runs = [
            pfr.encode_blocks(
                m, v, [4] * n_blocks, seed=1, method=method, budget=budget, bin_bits=bin_bits, memory_elems=mem
            )
            for mem in (small, 1 << 18)
        ]
        assert runs[0][1] == runs[1][1]
        assert torch.equal(runs[0][2]["steps"], runs[1][2]["steps"])


def test_orc_search_on_several_threads_writes_the_same_bytes():
    n_blocks = 60
    m, v, info = channel(n_blocks, [0.5, 1.0, 2.0, 3.0], seed=15)
    bins = sp_bits(info, n_blocks, 4)
    for method, bin_bits, budget in (("orc", None, 64), ("sp-orc", bins, 16)):
        runs = []
        for threads in (1, 2, 3):  # 2 and 3 Python threads over 7-30 batches of blocks
            torch.set_num_threads(threads)
            try:
                runs.append(
                    pfr.encode_blocks(
                        m, v, [4] * n_blocks, seed=5, method=method, budget=budget, bin_bits=bin_bits, memory_elems=600
                    )[1]
                )
            finally:
                torch.set_num_threads(1)
        assert runs[0] == runs[1] == runs[2]


def test_sp_orc_bin_weights_are_the_same_tabled_or_computed_per_arrival():
    n_blocks = 30
    m, v, info = channel(n_blocks, [0.5, 1.0, 2.0, 3.0], seed=14)
    lay = pfr.make_layout([4] * n_blocks, sp_bits(info, n_blocks, 4), "cpu")  # 0-3 bits a dim
    dims = torch.arange(4 * n_blocks)
    # 2^3 bins: computed per arrival with 4 candidates, tabled with 64; a table cut short by the memory
    runs = [
        pfr._arrival_bins(
            m, v.sqrt(), lay, dims, lay.dim_block, n_blocks, seed=3, level=1, budget=budget, memory_elems=mem, mix=0.05
        )
        for budget, mem in ((4, 1 << 16), (64, 1 << 16), (64, 100))
    ]
    for keys, log_pi in runs[1:]:
        assert torch.equal(runs[0][0], keys[:4])
        assert torch.allclose(runs[0][1], log_pi[:4], rtol=0, atol=1e-12)
    assert float(runs[1][1].min()) < -1.0  # the weights are not all 0


def test_sp_orc_numbers_the_arrivals_of_each_bin_in_order():
    keys = torch.tensor([[5, 0], [3, 0], [5, 7], [5, 0], [3, 7]])
    assert pfr._ranks_in_bins(keys).tolist() == [[1, 1], [1, 2], [2, 1], [3, 3], [2, 2]]


def test_zero_kl_block_takes_the_first_candidate():
    m, v = torch.zeros(6, dtype=torch.float64), torch.ones(6, dtype=torch.float64)
    z, data, st = pfr.encode_blocks(m, v, [3, 3], seed=1, method="pfr")
    assert st["index"].tolist() == [1, 1] and st["steps"].tolist() == [1, 1]
    assert torch.equal(pfr.decode_blocks([3, 3], data, seed=1, method="pfr"), z)


def test_single_dimension_blocks():
    n = 4000
    m, v, _ = channel(n, [2.0], seed=13)
    z, data, _ = pfr.encode_blocks(m, v, [1] * n, seed=2, method="pfr")
    assert stats.kstest(standardised(z, m, v).numpy(), "norm").pvalue > ALPHA
    assert torch.equal(pfr.decode_blocks([1] * n, data, seed=2, method="pfr"), z)


def test_one_huge_kl_dimension_is_coded_through_its_bins():
    """A 16-bit dim (sigma_q = 1e-3 at 3 prior sigmas) next to two quiet ones: 12 bin bits on it."""
    n_blocks = 200
    m = torch.tensor([3.0, 0.1, -0.2], dtype=torch.float64).repeat(n_blocks)
    v = torch.tensor([1e-6, 0.8, 0.9], dtype=torch.float64).repeat(n_blocks)
    bins = torch.tensor([12, 0, 0]).repeat(n_blocks)
    z, data, st = pfr.encode_blocks(m, v, [3] * n_blocks, seed=4, method="sp-pfr", bin_bits=bins)
    assert float(st["kl_bits"][0]) > 15.5
    assert float(st["steps"].double().mean()) < 100
    u = standardised(z, m, v).view(n_blocks, 3)
    assert float(u[:, 0].abs().max()) < 5.0
    assert stats.kstest(u.flatten().numpy(), "norm").pvalue > ALPHA
    assert torch.equal(pfr.decode_blocks([3] * n_blocks, data, seed=4, method="sp-pfr", bin_bits=bins), z)


@pytest.mark.parametrize("method", ["pfr", "sp-pfr"])
def test_exact_coders_refuse_wider_posteriors(method):
    m = torch.tensor([0.0, 0.5], dtype=torch.float64)
    v = torch.tensor([0.5, 1.0], dtype=torch.float64)  # v = 1 with m != 0: r is unbounded
    with pytest.raises(ValueError, match="v < 1"):
        pfr.encode_blocks(m, v, [2], seed=1, method=method, bin_bits=[0, 1] if method == "sp-pfr" else None)


def test_orc_accepts_wider_posteriors():
    m = torch.tensor([0.3, -0.2], dtype=torch.float64)
    v = torch.tensor([1.5, 4.0], dtype=torch.float64)
    z, data, _ = pfr.encode_blocks(m, v, [2], seed=1, method="orc", budget=16)
    assert torch.equal(pfr.decode_blocks([2], data, seed=1, method="orc"), z)


def test_bad_arguments_are_refused():
    m, v = torch.zeros(4, dtype=torch.float64), torch.full((4,), 0.5, dtype=torch.float64)
    with pytest.raises(ValueError, match="budget"):
        pfr.encode_blocks(m, v, [4], seed=1, method="orc")
    with pytest.raises(ValueError, match="method"):
        pfr.encode_blocks(m, v, [4], seed=1, method="astar")
    with pytest.raises(ValueError, match="takes no bins"):
        pfr.encode_blocks(m, v, [4], seed=1, method="pfr", bin_bits=[1, 0, 0, 0])
    with pytest.raises(ValueError, match="bin_bits"):
        pfr.encode_blocks(m, v, [4], seed=1, method="sp-pfr", bin_bits=[21, 0, 0, 0])
    with pytest.raises(ValueError, match="one value per dim"):
        pfr.encode_blocks(m, v, [3], seed=1, method="pfr")


def _coded(method="sp-pfr"):
    n_blocks = 40
    m, v, info = channel(n_blocks, [0.5, 1.5, 2.5], seed=14)
    bins = sp_bits(info, n_blocks, 3)
    _, data, _ = pfr.encode_blocks(m, v, [3] * n_blocks, seed=3, method=method, bin_bits=bins, budget=64)
    return [3] * n_blocks, bins, data


def test_corrupted_or_truncated_bytes_raise_rec_decode_error():
    sizes, bins, data = _coded()
    for pos in range(len(data)):
        bad = bytearray(data)
        bad[pos] ^= 0x10
        with pytest.raises(RecDecodeError):
            pfr.decode_blocks(sizes, bytes(bad), seed=3, method="sp-pfr", bin_bits=bins)
    for cut in (0, 3, len(data) // 2, len(data) - 1):
        with pytest.raises(RecDecodeError):
            pfr.decode_blocks(sizes, data[:cut], seed=3, method="sp-pfr", bin_bits=bins)
    with pytest.raises(RecDecodeError, match="other parameters"):
        pfr.decode_blocks(sizes, data, seed=3, method="sp-orc", bin_bits=bins)
    with pytest.raises(RecDecodeError, match="other parameters"):
        pfr.decode_blocks(sizes[:-1], data, seed=3, method="sp-pfr", bin_bits=bins[:-3])


def test_allocation_follows_information_and_sums_to_the_block_bits():
    info = torch.tensor([0.0, 1.0, 3.0, 0.0, 0.0, 2.0, 2.0, 0.5])
    bits = pfr.allocate_bin_bits(info, [3, 5], [8, 5])
    assert bits[:3].tolist() == [0, 2, 6]
    assert int(bits[3:].sum()) == 5 and bits[3:5].tolist() == [0, 0]
    assert bits[5] + bits[6] >= 4


def test_points_computed_in_pieces_equal_the_whole_array_formula():
    g = torch.Generator().manual_seed(4)
    sizes = torch.randint(1, 40, (3000,), generator=g)
    lay = pfr.make_layout(sizes, torch.randint(0, 2, (int(sizes.sum()),), generator=g), "cpu")
    n = lay.dim_block.numel()  # > rng.CHUNK: a row spans several pieces
    keys = torch.randint(0, 1 << 40, (4, lay.n_blocks), generator=g)
    ks = torch.randint(1, 1000, (4, lay.n_blocks), generator=g)

    def whole(dims, k, key):
        bits = lay.bin_bits[dims]
        words = rng.pfr_point_words(9, 2, lay.dim_block[dims], k - 1, lay.dim_pos[dims], key)
        j = (key >> lay.key_shift[dims]) & ((1 << bits) - 1)
        return rng.normal_quantile_words((j << (32 - bits)) | (words >> bits))

    dims, few = torch.arange(n), torch.arange(1000)  # and pieces of several rows
    cases = [
        (dims, ks[:, lay.dim_block], keys[:, lay.dim_block]),
        (dims, ks[0, lay.dim_block], keys[0, lay.dim_block]),
        (few, torch.arange(1, 101)[:, None], torch.zeros((), dtype=torch.int64)),
    ]
    assert n > rng.CHUNK
    for args in cases:
        assert torch.equal(pfr._points(9, 2, lay, *args).view(torch.int32), whole(*args).view(torch.int32))


def test_point_stream_is_frozen():
    """The PFR domain's values: changing them would change every coded sample (RNG_VERSION)."""
    blocks, ks, dims = torch.tensor([0, 0, 5]), torch.tensor([0, 1, 7]), torch.tensor([0, 2, 1])
    keys = torch.tensor([0, 0, 2**40 + 3])
    words = rng.pfr_point_words(12345, 1, blocks, ks, dims, keys)
    assert [hex(w) for w in words.tolist()] == ["0xb630c584", "0xa0ae8fea", "0x21b73e03"]
    counters = rng.pfr_counters(1, rng.PFR_POINT, blocks, ks, dims).tolist()
    key = rng.seed_key(12345)
    for c, bin_key, w in zip(counters, keys.tolist(), words.tolist()):  # the Python-int reference
        h = rng.mix64_int(key + ((c & (2**64 - 1)) + 1) * rng.GAMMA)
        assert rng.mix64_int(h + (bin_key + 1) * rng.GAMMA) & 0xFFFFFFFF == w
    z = rng.normal_quantile_words(torch.tensor([0, 2**31 - 1, 2**31, 2**32 - 1, 3 << 30]))
    assert z[1] == 0 and z[2] == 0 and z[0] == -z[3] and z[0] < -6 and abs(float(z[4]) - 0.6744898) < 1e-6


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_encode_decodes_on_the_cpu():
    n_blocks = 100
    m, v, info = channel(n_blocks, [0.5, 1.5, 2.5], seed=15)
    bins = sp_bits(info, n_blocks, 3)
    for method in ("pfr", "sp-orc"):
        b = bins if method.startswith("sp-") else None
        z, data, _ = pfr.encode_blocks(m.cuda(), v.cuda(), [3] * n_blocks, seed=6, method=method, budget=64, bin_bits=b)
        back = pfr.decode_blocks([3] * n_blocks, data, seed=6, method=method, bin_bits=b, device="cpu")
        assert torch.equal(z.cpu(), back)
