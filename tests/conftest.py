import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="module")
def one_thread():
    """For the block coders' searches (many small ops): on a busy 2-core machine a second thread only waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def photo_dir(tmp_path) -> Path:
    """Four smooth synthetic 'photos' (gradients + blobs), so a model can learn something in a few steps."""
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:96, 0:112] / 96.0
    for i in range(4):
        img = np.stack([np.sin(3 * xx + i), np.cos(2 * yy - i), xx * yy], -1) * 0.4 + 0.5
        img += 0.05 * rng.standard_normal(img.shape)
        Image.fromarray((img.clip(0, 1) * 255).astype(np.uint8)).save(folder / f"{i}.png")
    return folder


def photo(h, w, seed=0):
    """A smooth synthetic (h, w, 3) uint8 image with a little noise."""
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.stack([np.sin(9 * xx + seed), np.cos(7 * yy), np.sin(13 * xx * yy)], -1) * 0.4 + 0.5
    img += 0.05 * np.random.default_rng(seed).standard_normal(img.shape)
    return (img.clip(0, 1) * 255).astype(np.uint8)


def offline_cli(monkeypatch, capsys, folder: Path, params):
    """`run(*argv) -> (exit code, stdout, stderr)` of the rec-codec command with models only from
    `folder` and every preset replaced by the small CoderParams `params` (fast enough for tiny models)."""
    import compress
    from codec import store as model_store
    from codec.params import PRESETS, CoderParams

    monkeypatch.setenv("REC_MODEL_DIR", str(folder))
    monkeypatch.setattr(model_store, "REPO_WEIGHTS", folder / "no-such-folder")
    real = CoderParams.preset.__func__
    monkeypatch.setattr(
        CoderParams, "preset", classmethod(lambda cls, name: params if name in PRESETS else real(cls, name))
    )

    def run(*argv):
        code = compress.main([str(a) for a in argv])
        out, err = capsys.readouterr()
        assert "Traceback" not in err
        return code, out, err

    return run
