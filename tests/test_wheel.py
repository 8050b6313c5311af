"""The wheel: built offline from the sources, installed into a fresh venv outside the checkout, its
`rec-codec` command encodes and decodes with a model from $REC_MODEL_DIR, and says what to do without one.

Each command run starts torch in a new process (3-6 s on a busy machine): the round trip and the training
command are marked slow; the error without a model, which builds and installs the wheel too, is not."""

import os
import shutil
import site
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from codec.api import compress_image
from codec.store import ModelStore
from models import ModelConfig, build_model, save_model

REPO = Path(__file__).resolve().parents[1]


def build_wheel(dest: Path) -> Path:
    """`pip wheel` of a copy of what pyproject.toml packages (the checkout gets no build/ or egg-info)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    src = dest / "src"
    src.mkdir()
    for name in ["pyproject.toml", project["project"]["readme"]]:
        shutil.copy(REPO / name, src / name)
    for package in project["tool"]["setuptools"]["packages"]:
        shutil.copytree(REPO / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(src),
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            "-w",
            str(dest / "dist"),
        ],
        check=True,
    )
    (wheel,) = (dest / "dist").glob("rec_codec-*.whl")
    return wheel


def fresh_venv(folder: Path, wheel: Path) -> Path:
    """A venv with the wheel installed; its dependencies (torch, ...) come from this interpreter's
    site-packages through a .pth file, which adds the folders without running their .pth files, so the
    checkout's editable install stays out."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    python = folder / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    ours = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib"), *site.getsitepackages()}
    (Path(purelib) / "rec_codec_test_deps.pth").write_text("\n".join(sorted(ours)) + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel)],
        check=True,
    )
    return folder / "bin"


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The venv's bin folder, with `rec-codec` and `rec-codec-train` from the wheel."""
    root = tmp_path_factory.mktemp("wheel")
    return fresh_venv(root / "venv", build_wheel(root))


def run(bin_dir: Path, cwd: Path, *argv, model_dir: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "REC_MODEL_DIR")}
    if model_dir is not None:
        env["REC_MODEL_DIR"] = str(model_dir)
    return subprocess.run(
        [str(bin_dir / argv[0]), *map(str, argv[1:])], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.slow
def test_the_installed_command_encodes_and_decodes_outside_the_checkout(installed, tmp_path):
    where = "import importlib.util as u; print(u.find_spec('codec').origin)"
    origin = subprocess.run(
        [installed / "python", "-c", where], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert Path(origin).is_relative_to(installed.parent)  # the wheel's codec, not the checkout's
    models = tmp_path / "models"
    torch.manual_seed(0)
    cfg = ModelConfig(arch="pln", channels=16, latents=8, level2_channels=8, level2_latents=4, log_scale_min=-4.0)
    model_file = save_model(build_model(cfg), models, "tiny")
    (models / "DEFAULT").write_text(model_file.name + "\n")
    x = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(x).save(tmp_path / "photo.png")

    listed = run(installed, tmp_path, "rec-codec", "models", model_dir=models)
    assert listed.returncode == 0 and listed.stdout.startswith(f"{model_file.stem} (default): pln N=16"), listed.stderr
    encoded = run(installed, tmp_path, "rec-codec", "encode", "photo.png", "--coder", "fast", model_dir=models)
    assert encoded.returncode == 0, encoded.stderr
    decoded = run(installed, tmp_path, "rec-codec", "decode", "photo.rec", model_dir=models)
    assert decoded.returncode == 0, decoded.stderr

    model, ref = ModelStore(dirs=[models]).load(model_file)
    data, x_hat, _ = compress_image(model, x, model_ref=ref, params="fast")
    assert (tmp_path / "photo.rec").read_bytes() == data
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "photo.rec.png")), x_hat)


def test_without_a_model_folder_one_line_names_rec_model_dir_and_model(installed, tmp_path):
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "photo.png")
    result = run(installed, tmp_path, "rec-codec", "encode", "photo.png")
    assert result.returncode == 1 and not (tmp_path / "photo.rec").exists()
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: no model given") and "$REC_MODEL_DIR" in line and "--model PATH" in line


@pytest.mark.slow
def test_the_installed_training_command_runs(installed, tmp_path):
    result = run(installed, tmp_path, "rec-codec-train", f"--out_dir={tmp_path / 'run'}", "--export")
    assert (result.returncode, result.stderr.strip()) == (
        2,
        f"rec-codec-train: error: no checkpoint to resume from: {tmp_path / 'run' / 'ckpt.pt'}",
    )
