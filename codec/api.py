"""Image <-> .rec bytes: the top-down REC flow over a model's latent levels, and model lookup.

    encoder: feats = bottom_up(pad(x)); for level L..1: prior(level, z_above) -> posterior
             -> encode_level -> the CODED sample z_level (what the decoder will rebuild)
    decoder: for level L..1: prior(level, z_above) -> decode_level -> z_level
    both:    x_hat = synthesize(z1)[..., :H, :W] -> clamp -> 8-bit

For the PLN the level-1 prior AND posterior are computed from the coded z2, exactly as the
decoder sees it. The encoder returns the 8-bit image its file decodes to; on the same device
(and torch build) the decoder reproduces it bit for bit. On another device the networks may
differ by rounding: the decoded image may then differ slightly, but the file cannot be
misparsed, because the coder reads indices and side information from the bytes and the
latent shape alone and uses the prior only to scale the decoded candidates.

Memory: images are processed whole (no tiling), so the pixel count is limited by `max_pixels`
(default MAX_PIXELS = 12 Mpx, e.g. 4000x3000). Measured peak with the thesis-size PLN on CPU:
about 0.85 GB per megapixel, so about 10 GB at the limit.
"""

import json
import os
import re
import zlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from codec import CoderParams, RecDecodeError, decode_level, encode_level
from codec.bitstream import RecFormatError, RecHeader, beta_from_code, beta_to_code, pack_rec, unpack_rec
from codec.image import to_tensor, to_uint8
from codec.params import PRESETS, REGISTERED_FORMATS, registered_id
from codec.rate import DEFAULT_QUALITY, quality_beta
from models import LatentVariableModel, file_sha256, load_model

MAX_PIXELS = 12_000_000  # what the codec codes, whole (module docstring); image.MAX_DECODE_PIXELS: the loader's
_CHECKOUT = Path(__file__).resolve().parent.parent
# The checkout's weights/ folder when codec is imported from a checkout (pyproject.toml beside it); None for
# an installed package, which finds models through $REC_MODEL_DIR or --model only (no weights are shipped).
REPO_WEIGHTS: Path | None = _CHECKOUT / "weights" if (_CHECKOUT / "pyproject.toml").is_file() else None
MODEL_HINT = "pass --model PATH, or set $REC_MODEL_DIR to a folder of model files (its DEFAULT file names the default)"


class ModelNotFoundError(LookupError):
    """The model a .rec file (or --model) names cannot be found, or its hash differs."""


class ImageTooLargeError(ValueError):
    pass


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


# ---- coding ------------------------------------------------------------------------------------


def _coder(params: CoderParams | str) -> tuple[str, CoderParams]:
    if isinstance(params, str):
        return params, CoderParams.preset(params)
    names = [n for n in PRESETS if CoderParams.preset(n) == params]
    return (names[0] if names else "custom"), params


def _check_size(height: int, width: int, max_pixels: int) -> None:
    if height * width > max_pixels:
        raise ImageTooLargeError(f"image is {width}x{height} = {height * width} pixels, above the "
                                 f"limit of {max_pixels} (images are coded whole)")


def image_tensor(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (H, W, 3) array, or a (1|-, 3, H, W) tensor (uint8, or float in [0, 1])."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) uint8 array, got {image.dtype} {image.shape}")
        return to_tensor(image)
    x = image if image.ndim == 4 else image[None]
    if x.shape[0] != 1 or x.shape[1] != 3:
        raise ValueError(f"expected a (1, 3, H, W) tensor, got {tuple(image.shape)}")
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


def coding_beta(model: LatentVariableModel, beta: float | None = None,
                quality: int | None = None) -> tuple[float | None, int | None]:
    """(β the networks run at, its header code) for a file; (None, None) for a fixed-β model.

    A variable-rate model codes at `beta`, else at the β of `quality` (default DEFAULT_QUALITY). The β is
    rounded to the header's grid (1/256 octave) first, so the decoder, which only sees the code,
    conditions on exactly the same number. ValueError for both settings at once, a β outside the
    model's range, or a fixed-β model given either."""
    if beta is not None and quality is not None:
        raise ValueError("give beta or quality, not both")
    if not model.variable_rate:
        if quality is not None:
            raise ValueError("this model was trained at a single β: quality levels need a variable-rate model")
        if beta is not None:
            raise ValueError("this model was trained at a single β: β, quality and bpp targets need a "
                             "variable-rate model")
        return None, None
    lo, hi = model.beta_range
    if beta is None:
        beta = quality_beta(DEFAULT_QUALITY if quality is None else quality, (lo, hi))
    code = beta_to_code(beta)
    if not beta_to_code(lo) <= code <= beta_to_code(hi):
        raise ValueError(f"β = {beta:g} is outside this model's range {lo:g} to {hi:g}")
    return beta_from_code(code), code


def _deterministic(device: torch.device) -> None:
    if device.type == "cuda":  # same device => same bits: no autotuned conv algorithms
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


@torch.inference_mode()
def compress_image(model: LatentVariableModel, image: np.ndarray | torch.Tensor, *, model_ref: ModelRef,
                   seed: int = 0, params: CoderParams | str = "thesis", device: str | torch.device = "cpu",
                   max_pixels: int = MAX_PIXELS, beta: float | None = None,
                   quality: int | None = None) -> tuple[bytes, np.ndarray, dict]:
    """Compress one image into .rec bytes.

    Args:
        model: a VAE (1 level) or PLN (2 levels); moved to `device`.
        image: (H, W, 3) uint8, or a (1, 3, H, W) tensor (uint8 or float in [0, 1]).
        model_ref: name + SHA-256 prefix of the model file, written into the header.
        seed: the file seed of the shared randomness, in [0, 2^64).
        params: a CoderParams or a preset name ("thesis", "fast").
        beta: the rate setting of a variable-rate model (larger = smaller files), rounded to the
            header's 1/256-octave grid; must be None for a model trained at one β.
        quality: instead of beta, a quality level 1 (smallest files) to 8 (codec.rate.quality_beta);
            a variable-rate model given neither codes at codec.rate.DEFAULT_QUALITY.
    Returns:
        (data, x_hat, stats): the file bytes, the (H, W, 3) uint8 image they decode to, and
        {"height", "width", "bytes", "bpp" (8 * bytes / (H W), header included), "kl_bits",
        "kl_bpp", "levels" (the coder's per-level stats), "beta" (the coded β or None), "seconds"}.
    Raises:
        ImageTooLargeError: more than max_pixels pixels. ValueError: bad arguments.
    """
    t0 = time.perf_counter()
    device = torch.device(device)
    _deterministic(device)
    coder, params = _coder(params)
    if model.num_levels not in (1, 2):
        raise ValueError(f"models with {model.num_levels} levels are not supported")
    x = image_tensor(image).to(device)  # (1, 3, H, W)
    height, width = x.shape[-2:]
    _check_size(height, width, max_pixels)
    beta, beta_code = coding_beta(model, beta, quality)
    model = model.to(device).eval()
    feats = model.bottom_up(model.pad(x), beta)
    z, sections, levels = None, [], []
    for level in range(model.num_levels, 0, -1):
        p_loc, p_scale = model.prior(level, z, (1, *model.latent_shape(level, height, width)), beta)
        q_loc, q_scale = model.posterior(level, feats, p_loc, p_scale)
        # z is the CODED sample: the next level's prior and posterior are computed from it
        z, data, stats = encode_level(q_loc, q_scale, p_loc, p_scale, seed=seed, level=level,
                                      params=params, return_stats=True, choose_decay=True)
        if stats["shard_decay"] is not None:  # the header carries the decay each level was coded with
            params = params.with_level(level, shard_decay=stats["shard_decay"])
        sections.append(data)
        levels.append(stats)
        del q_loc, q_scale
    del feats
    x_hat = to_uint8(model.synthesize(z, beta)[..., :height, :width])
    header = RecHeader(model_ref.name, model_ref.sha256, height, width, seed, coder,
                       params_to_bytes(params, model.num_levels), beta_code=beta_code)
    data = pack_rec(header, sections)
    kl_bits = sum(s["kl_bits"] for s in levels)
    stats = {"height": height, "width": width, "bytes": len(data), "bpp": 8 * len(data) / (height * width),
             "kl_bits": kl_bits, "kl_bpp": kl_bits / (height * width), "levels": levels, "beta": beta,
             "seconds": time.perf_counter() - t0}
    return data, x_hat, stats


# Coder parameters in the header: the `coder` field names the preset ("thesis", "fast"; "custom"
# for any other params). A shipped preset's decoder fields are a registered parameter set, sent as
# b"R" + its one-byte id (REGISTERED_FORMATS); any other params as b"P" + CoderParams.format_bytes
# of each level (the fields a decoder depends on, 24 bytes a level). Either way the decoder rebuilds
# its params from those fields, so files stay decodable if a preset is retuned or a newer build adds
# one. Files of earlier builds may carry custom params in full: b"J" + zlib(JSON), still read.
_MAX_JSON = 1 << 16


def params_to_bytes(params: CoderParams, num_levels: int) -> bytes:
    fields = params.levels_format_bytes(num_levels)
    known = registered_id(fields)
    return b"P" + fields if known is None else b"R" + bytes([known])


def params_from_header(header: RecHeader, num_levels: int) -> CoderParams:
    """The CoderParams to decode a file with (the full preset when this build's preset of that name
    matches the file); RecFormatError if missing or invalid."""
    data, tag = header.coder_params[1:], header.coder_params[:1]
    if tag == b"R":
        if len(data) != 1 or data[0] not in REGISTERED_FORMATS:
            raise RecFormatError("coder_params", f"unknown registered parameter set {data.hex() or '(none)'} "
                                                 "(written by a newer build?)")
        data, tag = REGISTERED_FORMATS[data[0]], b"P"
    if tag == b"P":
        try:  # the decoder fields travel in the file: a preset may change without orphaning files
            decodable = CoderParams.from_format_bytes(data, num_levels)
        except ValueError as e:
            raise RecFormatError("coder_params", f"invalid coder parameters ({e})") from None
        preset = CoderParams.preset(header.coder) if header.coder in PRESETS else None
        if preset is not None and preset.levels_format_bytes(num_levels) == data:
            return preset
        return decodable
    if tag == b"J":
        try:
            d = zlib.decompressobj()
            text = d.decompress(data, _MAX_JSON)
            if d.unconsumed_tail or not d.eof:
                raise ValueError("bad zlib stream")
            return CoderParams.from_dict(json.loads(text.decode("utf-8")))
        except (zlib.error, ValueError, TypeError, KeyError, AttributeError, RecursionError) as e:
            raise RecFormatError("coder_params", f"invalid coder parameters ({e})") from None
    raise RecFormatError("coder_params", f"unknown encoding {tag!r}")


def describe_params(header: RecHeader, num_levels: int) -> dict:
    """JSON view of a header's coder parameters for `rec-codec info` (never raises)."""
    try:
        params = params_from_header(header, num_levels)
    except RecFormatError as e:
        return {"error": str(e)}
    return params.to_dict()


Resolver = Callable[[RecHeader], LatentVariableModel]


@torch.inference_mode()
def decompress(data: bytes, resolve: Resolver, device: str | torch.device = "cpu",
               max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, RecHeader]:
    """Decode .rec bytes into the (H, W, 3) uint8 image the encoder returned.

    Args:
        resolve: header -> model (e.g. a ModelStore); raises ModelNotFoundError.
    Raises:
        RecFormatError: corrupt, truncated or unsupported data (the coder's errors are wrapped,
            naming the section). ModelNotFoundError: from `resolve`.
    """
    device = torch.device(device)
    _deterministic(device)
    header, sections = unpack_rec(data)
    if header.height * header.width > max_pixels:
        raise RecFormatError("height", f"{header.width}x{header.height} is above the limit of {max_pixels} pixels")
    model = resolve(header).to(device).eval()
    if len(sections) != model.num_levels:
        raise RecFormatError("n_sections", f"{len(sections)} sections, but the model has {model.num_levels} levels")
    params = params_from_header(header, model.num_levels)
    beta = _header_beta(header, model)
    height, width, z = header.height, header.width, None
    for i, level in enumerate(range(model.num_levels, 0, -1)):
        p_loc, p_scale = model.prior(level, z, (1, *model.latent_shape(level, height, width)), beta)
        try:
            z = decode_level(p_loc, p_scale, sections[i], seed=header.seed, level=level, params=params)
        except RecDecodeError as e:
            raise RecFormatError(f"section {i + 1} (level {level})", str(e)) from None
    return to_uint8(model.synthesize(z, beta)[..., :height, :width]), header


def _header_beta(header: RecHeader, model: LatentVariableModel) -> float | None:
    """The β to decode at; RecFormatError if the file and its model disagree on having one."""
    if not model.variable_rate:
        if header.beta_code is not None:
            raise RecFormatError("beta_code", "the file carries a β, but its model was trained at a single β")
        return None
    if header.beta_code is None:
        raise RecFormatError("beta_code", "the model is variable-rate, but the file carries no β")
    try:
        return coding_beta(model, header.beta)[0]
    except ValueError as e:
        raise RecFormatError("beta_code", str(e)) from None


# ---- model files ---------------------------------------------------------------------------------


def model_dirs() -> list[Path]:
    """Where models are looked up: each entry of $REC_MODEL_DIR (os.pathsep-separated), then the
    checkout's weights/ (REPO_WEIGHTS, none for an installed package)."""
    env = [Path(p) for p in os.environ.get("REC_MODEL_DIR", "").split(os.pathsep) if p]
    return env + ([REPO_WEIGHTS] if REPO_WEIGHTS is not None else [])


def where_searched(dirs: list[Path]) -> str:
    """"in A, B" for a message about the folders `dirs` (none when $REC_MODEL_DIR is unset outside a checkout)."""
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
    return {"name": path.stem, "path": str(path), "arch": blob.get("arch"), "channels": config.get("channels"),
            "parameters": sum(t.numel() for t in blob["state_dict"].values()),
            "megabytes": round(path.stat().st_size / 1e6, 1),
            "beta": None if config.get("beta_knots") else (meta.get("train_config") or {}).get("beta"),
            "beta_range": [config["beta_min"], config["beta_max"]] if config.get("beta_knots") else None,
            "validation": record.get("validation"), "steps": record.get("steps"),
            "minutes": record.get("minutes"), "hardware": segments[-1].get("hardware") if segments else None,
            "init_from": (record.get("init") or {}).get("from"),
            "train_kl_bpp": terms.get("kl_bpp"), "train_psnr": terms.get("psnr")}


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
    hits = [p for p in _model_files(dirs)
            if p.stem == stem or p.stem.startswith(stem + "-")
            or (is_hash and p.stem.rsplit("-", 1)[-1].startswith(arg.lower()[:8]))]
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

    def __init__(self, device: str | torch.device = "cpu", dirs: list[Path] | None = None,
                 model_path: str | os.PathLike | None = None):
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
