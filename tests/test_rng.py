"""Shared randomness: exact integers, device-free normals, random access, frozen stream."""

import json
import math
import os
from pathlib import Path

import pytest
import torch

from codec import rng

GOLDEN = Path(__file__).parent / "expected" / f"rng_v{rng.RNG_VERSION}.json"


def _golden_values() -> dict:
    counters = torch.arange(8)
    pool = rng.pool_block(seed=12345, level=1, row0=0, n_rows=2, n_cols=4, device="cpu")
    words = rng.scramble_words(12345, 2, torch.tensor([0, 7]), 3, torch.tensor([0, 1]), 2)
    return {
        "rng_version": rng.RNG_VERSION,
        "hash64_seed0": [int(h) & (2**64 - 1) for h in rng.hash64(0, counters).tolist()],
        "normals_seed1": [v.hex() for v in rng.normals(1, counters).double().tolist()],
        "pool_12345_level1": [v.hex() for v in pool.flatten().double().tolist()],
        "scramble": [int(w) & (2**64 - 1) for w in words.flatten().tolist()],
    }


def test_hash_matches_python_uint64_reference():
    counters = torch.tensor([0, 1, 2, 2**40 + 5, -(2**63), 2**63 - 1])
    key = rng.seed_key(2**64 - 1)
    expect = [rng.mix64_int(key + ((c & (2**64 - 1)) + 1) * rng.GAMMA) for c in counters.tolist()]
    got = [h & (2**64 - 1) for h in rng.hash64(2**64 - 1, counters).tolist()]
    assert got == expect


def test_stream_matches_golden_file():
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps(_golden_values(), indent=1) + "\n")
    assert json.loads(GOLDEN.read_text()) == _golden_values(), (
        "the shared random stream changed: bump RNG_VERSION (old files would decode wrongly)"
    )


def test_candidate_generated_alone_equals_row_of_batch():
    batch = rng.pool_block(seed=9, level=2, row0=100, n_rows=300, n_cols=16, device="cpu")
    rows = torch.tensor([100, 257, 399, 101])
    for col in range(16):
        alone = rng.pool_entries(9, 2, rows, torch.full_like(rows, col))
        assert torch.equal(alone, batch[rows - 100, col])


@pytest.mark.parametrize("chunk", [64, 1 << 15])
def test_whole_window_reads_equal_random_access(monkeypatch, chunk):
    monkeypatch.setattr(rng, "CHUNK", chunk)
    gen = torch.Generator().manual_seed(0)
    rows = torch.randint(0, 1 << 14, (37,), generator=gen)
    windows = torch.randint(0, 8, (37,), generator=gen)
    cols = windows[:, None] * 16 + torch.arange(16)
    block = rng.normal_from_bits(rng.pool_window_bits(5, 1, rows, windows, 16))
    assert torch.equal(block, rng.pool_entries(5, 1, rows[:, None].expand_as(cols), cols))


def test_values_do_not_depend_on_chunk_size(monkeypatch):
    counters = torch.arange(5000) * 7919
    ref = rng.normals(3, counters)
    monkeypatch.setattr(rng, "CHUNK", 64)
    assert torch.equal(rng.normals(3, counters), ref)
    assert torch.equal(rng.normal_pairs(3, counters)[:, 0], rng.normal_from_bits(rng.hash64(3, counters)))


def test_tail_values_are_the_same_with_or_without_a_host_sync(monkeypatch):
    # bits in the outermost cell (16-bit cell 65535), both signs, and some ordinary ones
    frac = torch.arange(0, 1 << 15, 997)
    tail = (65535 << 15) | frac
    bits = torch.cat([tail, tail | (1 << 31), torch.arange(1000) * 4_000_037])
    ref = rng.normal_from_bits(bits)
    monkeypatch.setattr(rng, "_tail_without_sync", lambda device: True)  # the GPU path, here on the CPU
    assert torch.equal(rng.normal_from_bits(bits), ref)
    assert (ref[: frac.numel()] >= 4.32).all() and torch.equal(
        ref[frac.numel() : 2 * frac.numel()], -ref[: frac.numel()]
    )


def test_normals_are_standard_normal():
    x = rng.normals(5, torch.arange(200_000)).double()
    assert abs(x.mean().item()) < 0.01 and abs(x.var().item() - 1) < 0.01
    xs, _ = torch.sort(x)
    cdf = 0.5 * (1 + torch.erf(xs / math.sqrt(2)))
    ks = (cdf - torch.arange(1, xs.numel() + 1) / xs.numel()).abs().max().item()
    assert ks < 1.63 / math.sqrt(xs.numel())  # alpha = 0.01
    assert x.abs().max() < 6.5 and (x.abs() > 4).sum() > 0  # tails reach beyond the table


def test_streams_of_different_levels_and_domains_differ():
    c = torch.arange(1000)
    a = rng.pool_entries(1, 1, torch.zeros_like(c), c)
    b = rng.pool_entries(1, 2, torch.zeros_like(c), c)
    assert not torch.equal(a, b)
    assert not torch.equal(rng.hash64(1, c), rng.hash64(2, c))
    with pytest.raises(ValueError):
        rng.counter_base(rng.POOL, rng.MAX_LEVEL + 1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_values_are_bit_identical_to_cpu():
    counters = torch.arange(1 << 18) * 104729
    assert torch.equal(rng.hash64(4, counters.cuda()).cpu(), rng.hash64(4, counters))
    assert torch.equal(rng.normals(4, counters.cuda()).cpu(), rng.normals(4, counters))
    assert torch.equal(rng.pool_block(4, 1, 0, 512, 256, "cuda").cpu(), rng.pool_block(4, 1, 0, 512, 256, "cpu"))
