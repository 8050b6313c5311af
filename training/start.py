"""Starting a training run: the settings and checkpoint a command line asks for, the data, the process
(threads, DDP, device, precision), and the model and optimizer with their starting weights."""

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from models import ModelConfig, build_model
from training.config import MODEL_KEYS, TrainConfig, resolve_config
from training.data import RandomCrops, full_images
from training.run import Run, WeightAverage


class SetupError(Exception):
    """A run that cannot start; the message is its one error line."""


@dataclass(frozen=True)
class Setup:
    """What the command line asks for: the resolved settings, the flags, and the checkpoint (for
    --resume and --export; a checkpoint's config sits above TOML files, see resolve_config)."""

    cfg: TrainConfig
    model_cfg: ModelConfig
    flags: set[str]
    ckpt_path: Path
    ckpt: dict | None


def resolve_setup(argv: list[str]) -> Setup:
    """The settings of `argv`, with the checkpoint under --resume or --export (which must exist and keep
    the model settings)."""
    cfg, model_cfg, flags = resolve_config(argv)
    ckpt_path = Path(cfg.out_dir) / "ckpt.pt"
    if "resume" not in flags and "export" not in flags:
        return Setup(cfg, model_cfg, flags, ckpt_path, None)
    if not ckpt_path.exists():
        raise ValueError(f"no checkpoint to resume from: {ckpt_path}")
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    cfg, model_cfg, _ = resolve_config(argv, base=ckpt["config"])
    saved = {k: ckpt["config"][k] for k in MODEL_KEYS if k in ckpt["config"]}
    if model_cfg.to_dict() != {**ModelConfig().to_dict(), **saved}:
        raise ValueError("model settings cannot change on resume; start a new out_dir instead")
    return Setup(cfg, model_cfg, flags, ckpt_path, ckpt)


def load_data(cfg: TrainConfig, rank: int) -> tuple[RandomCrops, list[torch.Tensor]]:
    """The training crops, and the whole validation images (on the main process only)."""
    if not cfg.data_dir:
        raise ValueError("no training data: pass --data_dir=FOLDER or set data_dir in the TOML file")
    data = RandomCrops(cfg.data_dir, cfg.crop, cfg.flips, seed=cfg.seed, rank=rank)
    val_images = full_images(cfg.val_dir, cfg.val_images) if cfg.val_dir and rank == 0 else []
    return data, val_images


def start_process(cfg: TrainConfig, world: int) -> torch.device:
    """CPU threads, the DDP process group (several processes), and this process's device."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if world > 1:
        dist.init_process_group("nccl" if cfg.device == "cuda" else "gloo")
    return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cfg.device == "cuda" else "cpu")


def start_run(setup: Setup, rank: int, world: int, device: torch.device) -> Run:
    """The model (seeded: the same initial weights on every rank and every rerun) and its optimizer, with
    the weights of --init_from or the checkpoint's weights, optimizer state and weight average."""
    cfg, ckpt = setup.cfg, setup.ckpt
    torch.manual_seed(cfg.seed)
    model = build_model(setup.model_cfg).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, cfg)
    step = 0
    provenance = dict(ckpt.get("provenance", {})) if ckpt is not None else {}
    if cfg.init_from and ckpt is None:
        try:
            provenance["init"] = load_initial_weights(model, cfg.init_from)
        except (OSError, KeyError, RuntimeError) as e:
            raise SetupError(f"cannot initialise from {cfg.init_from}: {str(e).splitlines()[0]}") from None
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]
    average = None  # a run that turns the average on later starts it from its current weights
    if cfg.ema_decay > 0:
        kept = ckpt if ckpt is not None else {}
        average = WeightAverage(model, cfg.ema_decay, kept.get("ema"), kept.get("ema_updates", 0))
    return Run(
        cfg,
        setup.model_cfg,
        setup.ckpt_path,
        ckpt is not None,
        model,
        optimizer,
        step,
        provenance,
        average,
        rank,
        world,
        device,
    )


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Adam:
    """Adam over three parameter groups, each with its learning-rate scale: the networks, a learned γ
    (gamma_lr) and a variable-rate model's β tables (conditioning_lr)."""
    groups = {"other": [], "gamma": [], "conditioning": []}
    for name, param in model.named_parameters():
        key = (
            "gamma"
            if name == "likelihood.log_gamma"
            else "conditioning"
            if name.startswith("conditioning.")
            else "other"
        )
        groups[key].append(param)
    lr_scale = {
        "other": 1.0,
        "gamma": cfg.gamma_lr / cfg.lr if cfg.gamma_lr else 1.0,
        "conditioning": cfg.conditioning_lr / cfg.lr if cfg.conditioning_lr else 1.0,
    }
    # the groups keep this order (and an empty conditioning group), so fixed-β checkpoints resume as before
    return torch.optim.Adam(
        [
            {"params": params, "lr_scale": lr_scale[key]}
            for key, params in groups.items()
            if params or key != "conditioning"
        ],
        lr=cfg.lr,
    )


def load_weights(model, state: dict) -> None:
    """Load a state dict; a variable-rate model may take a fixed-β model's weights, its missing
    conditioning tables keeping their zero start (the same function at every β)."""
    result = model.load_state_dict(
        {k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=False
    )
    missing = [k for k in result.missing_keys if not k.startswith("conditioning.")]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"weights do not fit this model: missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}"
        )


def load_initial_weights(model, path: str) -> dict:
    """`--init_from`: the weights of a checkpoint or model file; returns the provenance entry."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    load_weights(model, blob["model"] if "model" in blob else blob["state_dict"])
    return {"from": path, "step": blob.get("step", blob.get("meta", {}).get("step"))}


def use_bf16(amp: str, device: torch.device) -> bool:
    if amp not in ("auto", "bf16", "none"):
        raise ValueError(f"amp must be 'auto', 'bf16' or 'none', got {amp!r}")
    if amp != "auto":
        return amp == "bf16"
    if device.type == "cuda":
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags
