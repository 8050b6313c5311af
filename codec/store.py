"""Model files: where they are looked up, how a .rec names one (ModelRef), and loading them (ModelStore).

A .rec names its model by the file's stem and the first 8 bytes of its SHA-256; the decoder finds the
file with that hash in $REC_MODEL_DIR or the checkout's weights/, or takes the user's --model PATH.
"""

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from codec.bitstream import RecHeader
from models import LatentVariableModel, file_sha256, load_model

_CHECKOUT = Path(__file__).resolve().parent.parent
# The checkout's weights/ folder when codec is imported from a checkout (pyproject.toml beside it); None for
# an installed package, which finds models through $REC_MODEL_DIR or --model only (no weights are shipped).
REPO_WEIGHTS: Path | None = _CHECKOUT / "weights" if (_CHECKOUT / "pyproject.toml").is_file() else None
MODEL_HINT = "pass --model PATH, or set $REC_MODEL_DIR to a folder of model files (its DEFAULT file names the default)"


class ModelNotFoundError(LookupError):
    """The model a .rec file (or --model) names cannot be found, or its hash differs."""


@dataclass(frozen=True)
class ModelRef:
    """How a .rec names its model: the model file's stem and the first 8 bytes of its SHA-256."""

    name: str
    sha256: bytes
    path: Path | None = None

    @classmethod
    def of_file(cls, path: str | os.PathLike) -> "ModelRef":
        path = Path(path)
        name = re.sub(r"[^A-Za-z0-9._+-]", "_", path.stem)[:64] or "model"
        return cls(name, bytes.fromhex(file_sha256(path)[:16]), path)


def model_dirs() -> list[Path]:
    """Where models are looked up: each entry of $REC_MODEL_DIR (os.pathsep-separated), then the
    checkout's weights/ (REPO_WEIGHTS, none for an installed package)."""
    env = [Path(p) for p in os.environ.get("REC_MODEL_DIR", "").split(os.pathsep) if p]
    return env + ([REPO_WEIGHTS] if REPO_WEIGHTS is not None else [])


def where_searched(dirs: list[Path]) -> str:
    """ "in A, B" for a message about the folders `dirs` (none when $REC_MODEL_DIR is unset outside a checkout)."""
    return "in " + ", ".join(str(d) for d in dirs) if dirs else "(no folder to look in: $REC_MODEL_DIR is not set)"


def _model_files(dirs: list[Path]) -> list[Path]:
    files = []
    for d in dirs:
        if d.is_dir():
            files += sorted(p for p in d.glob("*.pt") if p.is_file())
    return files


def describe_model(path: Path) -> dict:
    """What a model file says about itself (architecture, size, training record), without building it."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    meta, config = blob.get("meta", {}), blob.get("config", {})
    record = meta.get("training") or {}
    segments, terms = record.get("segments") or [], record.get("final_terms") or {}
    return {
        "name": path.stem,
        "path": str(path),
        "arch": blob.get("arch"),
        "channels": config.get("channels"),
        "parameters": sum(t.numel() for t in blob["state_dict"].values()),
        "megabytes": round(path.stat().st_size / 1e6, 1),
        "beta": None if config.get("beta_knots") else (meta.get("train_config") or {}).get("beta"),
        "beta_range": [config["beta_min"], config["beta_max"]] if config.get("beta_knots") else None,
        "validation": record.get("validation"),
        "steps": record.get("steps"),
        "minutes": record.get("minutes"),
        "hardware": segments[-1].get("hardware") if segments else None,
        "init_from": (record.get("init") or {}).get("from"),
        "train_kl_bpp": terms.get("kl_bpp"),
        "train_psnr": terms.get("psnr"),
        "lossless": "lossless" in blob,  # carries a lossless head (encode --lossless)
        "rate_head": "rate" in blob,  # carries a rate head (encode --coder sp-orc-predicted)
    }


def list_models(dirs: list[Path] | None = None) -> tuple[list[Path], Path | None]:
    """The model files in `dirs` (see model_dirs) and the default one, if any."""
    dirs = model_dirs() if dirs is None else dirs
    try:
        default = find_model(None, dirs)
    except ModelNotFoundError:
        default = None
    return _model_files(dirs), default


def find_model(arg: str | None, dirs: list[Path] | None = None) -> Path:
    """The model file for `--model`: a path, a file name/stem, or a hex SHA-256 prefix (>= 4 digits)
    found in `dirs`; with no argument the file named by `DEFAULT` in one of `dirs`."""
    dirs = model_dirs() if dirs is None else dirs
    where = where_searched(dirs)
    if arg is None:
        for d in dirs:
            if (d / "DEFAULT").is_file():
                name = (d / "DEFAULT").read_text().strip()
                if (d / name).is_file():
                    return d / name
                raise ModelNotFoundError(f"{d / 'DEFAULT'} names {name!r}, which is not in {d}")
        raise ModelNotFoundError(f"no model given and no DEFAULT file {where}; {MODEL_HINT}")
    if Path(arg).is_file():
        return Path(arg)
    stem = arg[:-3] if arg.endswith(".pt") else arg
    is_hash = re.fullmatch(r"[0-9a-fA-F]{4,64}", arg) is not None
    hits = [
        p
        for p in _model_files(dirs)
        if p.stem == stem
        or p.stem.startswith(stem + "-")
        or (is_hash and p.stem.rsplit("-", 1)[-1].startswith(arg.lower()[:8]))
    ]
    if is_hash and len(arg) > 8:  # a longer prefix than the file name holds: check the content
        hits = [p for p in hits if file_sha256(p).startswith(arg.lower())]
    hits = list(dict.fromkeys(hits))
    if not hits:
        raise ModelNotFoundError(f"model {arg!r} not found {where}; {MODEL_HINT}")
    if len({p.name for p in hits}) > 1:
        raise ModelNotFoundError(f"model {arg!r} is ambiguous: {', '.join(sorted(p.name for p in hits))}")
    return hits[0]


class ModelStore:
    """Loads models from files and resolves a .rec header to its model, checking the hash.

    Lookup order: `model_path` (the user's --model PATH) if given, else files in `dirs` named
    `*-<sha8>.pt`, then any other `*.pt` there whose hash matches.
    """

    def __init__(
        self,
        device: str | torch.device = "cpu",
        dirs: list[Path] | None = None,
        model_path: str | os.PathLike | None = None,
    ):
        self.device = device
        self.dirs = model_dirs() if dirs is None else dirs
        self.model_path = Path(model_path) if model_path is not None else None
        self._refs: dict[Path, ModelRef] = {}
        self._models: dict[Path, LatentVariableModel] = {}

    def ref(self, path: Path) -> ModelRef:
        key = path.resolve()
        if key not in self._refs:
            self._refs[key] = ModelRef.of_file(path)
        return self._refs[key]

    def load(self, path: str | os.PathLike) -> tuple[LatentVariableModel, ModelRef]:
        path = Path(path)
        ref = self.ref(path)
        key = path.resolve()
        if key not in self._models:
            try:
                self._models[key] = load_model(path, self.device)[0]
            except Exception as e:  # torch/pickle raise many types for a bad file
                raise ModelNotFoundError(f"cannot load model file {path}: {str(e).splitlines()[0][:200]}") from None
        return self._models[key], ref

    def find(self, header: RecHeader) -> Path:
        want = header.model_hash.hex()
        need = f"this file needs model {header.model_name} (SHA-256 {want}...)"
        if self.model_path is not None:
            got = self.ref(self.model_path).sha256.hex()
            if got != want:
                raise ModelNotFoundError(f"{need}, but {self.model_path} has SHA-256 {got}...")
            return self.model_path
        files = _model_files(self.dirs)
        named = [p for p in files if p.stem.endswith("-" + want[:8]) or p.stem == header.model_name]
        for p in named + [p for p in files if p not in named]:
            if self.ref(p).sha256 == header.model_hash:
                return p
        hint = "".join(f"; {p} has SHA-256 {self.ref(p).sha256.hex()}..." for p in named)
        raise ModelNotFoundError(f"{need}: not found {where_searched(self.dirs)}{hint}; {MODEL_HINT}")

    def __call__(self, header: RecHeader) -> LatentVariableModel:
        return self.load(self.find(header))[0]
