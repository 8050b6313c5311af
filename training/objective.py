"""What training optimises and measures: the β-ELBO of a batch as one module (so DDP all-reduces every
gradient), the schedules a step number sets (KL warm-up, learning rate, each image's β) and validation
on whole images."""

import math

import torch

from models import ModelConfig, elbo_loss
from training.config import TrainConfig


class Objective(torch.nn.Module):
    """Model + loss in one module, so DDP all-reduces every gradient, the learned γ's included."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, beta: float | torch.Tensor, weight: float, autocast) -> dict:
        with autocast:
            out = self.model(x, beta=beta)
        return elbo_loss(self.model, x, out, beta, weight)


def batch_betas(
    model_cfg: ModelConfig, cfg: TrainConfig, step: int, rank: int, batch: int, device: torch.device | str = "cpu"
) -> float | torch.Tensor:
    """This step's β: the fixed `beta`, or one per image, log-uniform over a variable-rate model's range
    (a pure function of seed, rank and step, like the crops, so a resumed run draws the same)."""
    if not model_cfg.beta_knots:
        return cfg.beta
    gen = torch.Generator().manual_seed((cfg.seed * 1_000_003 + rank) * 1_000_000_009 + step)
    lo, hi = math.log(model_cfg.beta_min), math.log(model_cfg.beta_max)
    return torch.exp(lo + (hi - lo) * torch.rand(batch, generator=gen)).to(device)


def validation_betas(model_cfg: ModelConfig) -> list[float | None]:
    """β values validated at: the ends and the geometric middle of a variable-rate model's range."""
    if not model_cfg.beta_knots:
        return [None]
    return [model_cfg.beta_min, math.sqrt(model_cfg.beta_min * model_cfg.beta_max), model_cfg.beta_max]


def kl_weight(step: int, warmup: int) -> float:
    return 1.0 if warmup <= 0 else min(1.0, step / warmup)


def learning_rate(cfg: TrainConfig, step: int) -> float:
    return cfg.lr * cfg.lr_decay_rate ** (step / max(1, cfg.lr_decay_steps))


@torch.no_grad()
def validate(model, images: list[torch.Tensor], device: torch.device, beta: float | None = None) -> dict:
    """KL bpp, PSNR and MS-SSIM of one posterior-sample reconstruction per whole image (fp32)."""
    from pytorch_msssim import ms_ssim

    model.eval()
    kl_bits = pixels = 0.0
    psnr, msssim = [], []
    gen_state = torch.get_rng_state()
    torch.manual_seed(0)  # the same posterior noise at every validation
    for x in images:
        x = x.to(device)
        out = model(x, beta=beta)
        kl_bits += sum(k.sum().item() for k in out["kl"].values()) / math.log(2)
        pixels += x.shape[-2] * x.shape[-1]
        x8, y8 = (x * 255).round(), (out["x_hat"] * 255).round()
        psnr.append(10 * math.log10(255**2 / max(1e-10, torch.mean((x8 - y8) ** 2).item())))
        if min(x.shape[-2:]) > 160:  # MS-SSIM's five scales need > 160 pixels
            msssim.append(ms_ssim(x8, y8, data_range=255).item())
    torch.set_rng_state(gen_state)
    model.train()
    result = {"val_kl_bpp": kl_bits / pixels, "val_psnr": sum(psnr) / len(psnr)}
    if msssim:
        result["val_ms_ssim"] = sum(msssim) / len(msssim)
    return result
