"""Model registry and the on-disk model file `<arch>-<tag>-<sha8>.pt` (config as plain literals + weights)."""

import hashlib
import os
from pathlib import Path

import torch
from torch import nn

from .base import LatentVariableModel, elbo_loss
from .config import ModelConfig
from .distributions import combine_gaussians, gaussian_kl
from .lossless import LosslessHead
from .pln import LadderVAE
from .rate_head import RateHead
from .vae import GaussianVAE

MODELS: dict[str, type[LatentVariableModel]] = {"vae": GaussianVAE, "pln": LadderVAE}
MODEL_FORMAT = "rec-model/1"

__all__ = [
    "MODELS",
    "ModelConfig",
    "LatentVariableModel",
    "GaussianVAE",
    "LadderVAE",
    "build_model",
    "save_model",
    "load_model",
    "file_sha256",
    "unwrap",
    "elbo_loss",
    "gaussian_kl",
    "combine_gaussians",
]


def build_model(cfg: ModelConfig) -> LatentVariableModel:
    return MODELS[cfg.arch](cfg)


def unwrap(model: nn.Module) -> nn.Module:
    """Strip DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_model(
    model: nn.Module, out_dir: str | os.PathLike, tag: str, dtype: torch.dtype = torch.float32, meta: dict | None = None
) -> Path:
    """Export `<arch>-<tag>-<sha8>.pt`; sha8 is the first 8 hex digits of the file's SHA-256, which
    is what a .rec header refers to. `dtype` lets big models ship as fp16/bf16 (loaded back as fp32).
    A model with a lossless head (models/lossless.py) carries it in the file's "lossless" entry, one with
    a rate head (models/rate_head.py) in its "rate" entry."""
    model = unwrap(model)
    cfg: ModelConfig = model.cfg
    state = {
        k: (v.to(dtype) if v.is_floating_point() else v).detach().cpu().clone()
        for k, v in model.state_dict().items()
        if not k.startswith(("lossless_head.", "rate_head."))
    }
    blob = {"format": MODEL_FORMAT, "arch": cfg.arch, "tag": tag, "config": cfg.to_dict(), "meta": meta or {}}
    blob["state_dict"] = state
    head = model.lossless_head
    if head is not None:  # small: kept in float32, with its integer CDF tables
        blob["lossless"] = {
            "config": head.config(),
            "meta": head.meta,
            "state_dict": {k: v.detach().cpu().clone() for k, v in head.state_dict().items()},
        }
    if model.rate_head is not None:  # small: kept in float32
        blob["rate"] = {
            "config": model.rate_head.config(),
            "meta": model.rate_head.meta,
            "state_dict": {k: v.detach().cpu().clone() for k, v in model.rate_head.state_dict().items()},
        }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{cfg.arch}-{tag}.pt.tmp"
    torch.save(blob, tmp)
    final = out_dir / f"{cfg.arch}-{tag}-{file_sha256(tmp)[:8]}.pt"
    os.replace(tmp, final)
    return final


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[LatentVariableModel, dict]:
    """Load an exported model file; returns (model in eval mode, the file's dict without weights, plus
    "weights_dtype": the stored networks' floating-point dtype)."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != MODEL_FORMAT:
        raise ValueError(f"{path}: not a rec-codec model file (expected format {MODEL_FORMAT!r})")
    model = build_model(ModelConfig.from_dict(blob["config"]))
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in blob["state_dict"].items()})
    if "lossless" in blob:
        model.lossless_head = LosslessHead(**blob["lossless"]["config"])
        model.lossless_head.load_state_dict(blob["lossless"]["state_dict"])
        model.lossless_head.meta = blob["lossless"].get("meta", {})
    if "rate" in blob:
        model.rate_head = RateHead(**blob["rate"]["config"])
        model.rate_head.load_state_dict(blob["rate"]["state_dict"])
        model.rate_head.meta = blob["rate"].get("meta", {})
    info = {k: v for k, v in blob.items() if k != "state_dict"}
    info["weights_dtype"] = next((t.dtype for t in blob["state_dict"].values() if t.is_floating_point()), torch.float32)
    return model.to(device).eval(), info
