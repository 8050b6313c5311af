"""Beam search in the greedy walk (auxiliary target) and the `irec` preset built on it."""

import numpy as np
import pytest
import torch

from codec import greedy
from codec.api import compress_image, decompress
from codec.level import decode_level, encode_level
from codec.params import CoderParams, LevelParams
from codec.store import ModelStore
from models import ModelConfig, build_model, save_model
from tests.test_coder import SMALL, _HostWaits, targets

SIZES = torch.tensor([70, 9, 40, 64, 3, 120])  # up to 15 blocks of 8 over 4 windows: row shifts 0-3
WALK = dict(seed=1, level=1, bits=5, steps=6, width=8, windows=4, decay=0.9)


def latents(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A standardised target whose 6-step groups carry about the 20 nats their 5-bit steps can."""
    g = torch.Generator().manual_seed(seed)
    n = int(SIZES.sum())
    v = torch.exp(-1.5 * torch.rand(n, generator=g, dtype=torch.float64))
    return 0.4 * torch.randn(n, generator=g, dtype=torch.float64), v


def log_weights(z: torch.Tensor, m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Per group: log q(z) / p(z), q = N(m, v), p = N(0, 1), which the summed step weights telescope to."""
    z = z.double()
    per_dim = -0.5 * (z - m) ** 2 / v - 0.5 * torch.log(v) + 0.5 * z * z
    return torch.zeros(SIZES.numel(), dtype=torch.float64).index_add_(
        0, torch.repeat_interleave(torch.arange(SIZES.numel()), SIZES), per_dim
    )


def walk(m, v, beams: int, sample: bool = False, steps: torch.Tensor | None = None, memory_bytes: int = 1 << 12):
    """The walk of greedy.encode; its small score budget scores 2 groups at a time (4 beams)."""
    return greedy.encode(
        m, v, SIZES, memory_bytes=memory_bytes, auxiliary=True, sample=sample, beams=beams, group_steps=steps, **WALK
    )


@pytest.mark.parametrize("sample", [False, True])
def test_beams_never_lower_the_chosen_walks_log_weight(sample):
    m, v = latents()
    steps = torch.tensor([6, 2, 6, 5, 1, 6])
    one = log_weights(walk(m, v, 1, sample, steps)[1], m, v)
    four = log_weights(walk(m, v, 4, sample, steps)[1], m, v)
    # beam 0 is the one-beam walk, so the chosen walk is at least as heavy (up to float32 scores)
    assert (four >= one - 1e-3 * (1 + one.abs())).all()
    assert (four > one + 0.3).sum() >= 2 and (four - one).sum() > 2.0  # and they do find heavier walks


def test_beams_agree_with_one_beam_where_there_is_nothing_to_search():
    # With one step, the heaviest walk is the best candidate of the first step, which one beam takes.
    m, v = latents(1)
    one = walk(m, v, 1, steps=torch.ones(SIZES.numel(), dtype=torch.int64))
    four = walk(m, v, 4, steps=torch.ones(SIZES.numel(), dtype=torch.int64))
    assert torch.equal(one[0], four[0]) and torch.equal(one[1], four[1])
    one, four = walk(m, v, 1), walk(m, v, 4)
    assert not torch.equal(one[0], four[0])  # with six steps they do not


@pytest.mark.parametrize("sample", [False, True])
def test_beam_walk_decodes_bit_for_bit_from_its_indices(sample):
    m, v = latents(2)
    steps = torch.tensor([6, 2, 6, 5, 1, 6])
    indices, z = walk(m, v, 4, sample, steps)
    settings = {k: WALK[k] for k in ("seed", "level", "bits", "steps", "width", "windows", "decay")}
    assert torch.equal(greedy.decode(indices, SIZES, group_steps=steps, **settings), z)


def test_beam_search_is_encoder_only():
    # The decoder's params come from the header's level fields, which do not carry the beams.
    beamed = SMALL.replace(level1=SMALL.level1.replace(target="auxiliary", beams=4))
    assert beamed.levels_format_bytes(2) == SMALL.replace(level1=beamed.level1.replace(beams=1)).levels_format_bytes(2)
    q = targets((1, 8, 12, 10), 1.5)
    z, data = encode_level(*q, seed=3, level=1, params=beamed)
    decoder = CoderParams.from_format_bytes(beamed.levels_format_bytes(2), 2)
    assert decoder.level1.beams == 1
    assert torch.equal(decode_level(q[2], q[3], data, seed=3, level=1, params=decoder), z)
    assert data != encode_level(*q, seed=3, level=1, params=SMALL.replace(level1=beamed.level1.replace(beams=1)))[1]


def test_beam_walk_waits_on_the_device_about_once_a_step(monkeypatch):
    from codec import rng

    monkeypatch.setattr(rng, "_tail_without_sync", lambda device: True)  # the GPU path, on the CPU
    m, v = latents(3)
    greedy.shard_table(6, 0.9)  # built on the host once, then cached
    with _HostWaits() as waits:
        walk(m, v, 4, True, torch.tensor([6, 2, 6, 5, 1, 6]), memory_bytes=1 << 20)
    assert waits.count <= 6 + 3  # one a step (the GEMM segment sizes) + the layout and step count


def test_beams_need_the_auxiliary_target_and_fit_the_candidate_counter():
    with pytest.raises(ValueError, match="auxiliary"):
        LevelParams("greedy", 8, 6, beams=2)
    with pytest.raises(ValueError, match="auxiliary"):
        LevelParams("importance", 8, 1, 15, target="auxiliary", beams=2)
    with pytest.raises(ValueError, match="beams"):
        LevelParams("greedy", 3, 6, target="auxiliary", beams=9)  # more beams than candidates
    with pytest.raises(ValueError, match="beams"):
        LevelParams("greedy", 20, 6, target="auxiliary", beams=32)  # beam * 2^bits + candidate >= 2^24
    with pytest.raises(ValueError, match="auxiliary"):
        greedy.encode(*latents(), SIZES, memory_bytes=1 << 20, beams=2, **WALK)


# ---- the irec preset, end to end ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    d = tmp_path_factory.mktemp("weights")
    for arch in ("pln", "vae"):
        torch.manual_seed(0)
        config = ModelConfig(arch=arch, channels=16, latents=8, level2_channels=8, level2_latents=4, log_scale_min=-4.0)
        save_model(build_model(config), d, "tiny")
    return ModelStore(dirs=[d])


@pytest.mark.parametrize("arch", ["pln", "vae"])
def test_irec_preset_round_trips_a_rec_file(store, arch):
    model, ref = store.load(next(p for p in store.dirs[0].glob(f"{arch}-*.pt")))
    x = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    data, x_hat, stats = compress_image(model, x, model_ref=ref, seed=5, params="irec")
    y, header = decompress(data, store)
    np.testing.assert_array_equal(y, x_hat)
    assert header.coder == "irec" and header.coder_params == bytes([ord("R"), 36 if arch == "pln" else 37])
    assert len(stats["levels"]) == model.num_levels
