"""β-ELBO training of the Gaussian VAE / PLN, with KL warm-up, resume, bf16 autocast and DDP.

    rec-codec-train configs/pln_cpu.toml --data_dir=photos/ --out_dir=runs/cpu-b0.1 --beta=0.1
    rec-codec-train --out_dir=runs/cpu-b0.1 --resume --max_minutes=60     # continue where it stopped
    rec-codec-train --out_dir=runs/cpu-b0.1 --export                       # write weights/<arch>-<tag>-<sha8>.pt
    torchrun --nproc_per_node=2 train.py configs/pln_thesis_b0.1.toml --device=cuda ...

In a checkout, `python train.py ...` runs the same command. Defaults live in training.config.TrainConfig
and models.ModelConfig; a TOML file overrides them; `--key=value` wins. On --resume the checkpoint's saved
config sits above any TOML file, so only `--key=value` changes it.
Loss per batch: [Σ pixel NLL + β·w(t)·Σ KL] / B with w(t) = min(1, t/W), all in nats. A variable-rate
model (beta_knots > 0, configs/pln_vbr.toml) draws each image's β log-uniformly from [beta_min, beta_max]
every batch and weights that image's KL by it; `beta` is then unused.
"""

import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from models import ModelConfig, build_model, elbo_loss, save_model
from training.config import MODEL_KEYS, TrainConfig, resolve_config
from training.data import DataError, RandomCrops, full_images
from training.run import (SpikeGuard, StopSignal, WeightAverage, any_rank, hardware, save_checkpoint,
                          training_record, trim_log)


class Objective(torch.nn.Module):
    """Model + loss in one module, so DDP all-reduces every gradient, the learned γ's included."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, beta: float | torch.Tensor, weight: float, autocast) -> dict:
        with autocast:
            out = self.model(x, beta=beta)
        return elbo_loss(self.model, x, out, beta, weight)


def batch_betas(model_cfg: ModelConfig, cfg: "TrainConfig", step: int, rank: int, batch: int,
                device: torch.device | str = "cpu") -> float | torch.Tensor:
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


def load_weights(model, state: dict) -> None:
    """Load a state dict; a variable-rate model may take a fixed-β model's weights, its missing
    conditioning tables keeping their zero start (the same function at every β)."""
    result = model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()},
                                   strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("conditioning.")]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"weights do not fit this model: missing {missing[:3]}, unexpected "
                           f"{result.unexpected_keys[:3]}")


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


def tensorboard_writer(out_dir: str):
    """A SummaryWriter when the tensorboard package is installed, else None (it is optional)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(out_dir)


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


def export(model, cfg: TrainConfig, tag: str, step: int, provenance: dict,
           average: WeightAverage | None) -> Path:
    """The model file: the weight average when the run keeps one (loaded into `model`)."""
    record = training_record(cfg.out_dir, step, provenance, cfg.init_from)
    meta = {"step": step, "training": record, "train_config": asdict(cfg)}  # β, crops, lr, data folder
    if average is not None:
        model.load_state_dict(average.state_dict(model))
        meta["weights"] = f"exponential moving average, decay {average.decay}, {average.updates} updates"
    return save_model(model, cfg.export_dir, tag, getattr(torch, cfg.export_dtype), meta=meta)


def main(argv: list[str] | None = None, prog: str = "rec-codec-train") -> int:
    """Train, resume or export as the arguments say; returns the exit status. `prog` names the command
    in messages."""
    argv = sys.argv[1:] if argv is None else argv
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    is_main = rank == 0
    try:
        cfg, model_cfg, flags = resolve_config(argv)
        ckpt_path = Path(cfg.out_dir) / "ckpt.pt"
        ckpt = None
        if "resume" in flags or "export" in flags:
            if not ckpt_path.exists():
                raise ValueError(f"no checkpoint to resume from: {ckpt_path}")
            ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
            cfg, model_cfg, _ = resolve_config(argv, base=ckpt["config"])
            if model_cfg.to_dict() != {**ModelConfig().to_dict(), **{k: ckpt["config"][k] for k in MODEL_KEYS
                                                                       if k in ckpt["config"]}}:
                raise ValueError("model settings cannot change on resume; start a new out_dir instead")
        if "export" not in flags:
            if not cfg.data_dir:
                raise ValueError("no training data: pass --data_dir=FOLDER or set data_dir in the TOML file")
            data = RandomCrops(cfg.data_dir, cfg.crop, cfg.flips, seed=cfg.seed, rank=rank)
            val_images = full_images(cfg.val_dir, cfg.val_images) if cfg.val_dir and is_main else []
    except (ValueError, DataError, OSError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if world > 1:
        dist.init_process_group("nccl" if cfg.device == "cuda" else "gloo")
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cfg.device == "cuda" else "cpu")
    config = {**asdict(cfg), **model_cfg.to_dict()}

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank and every rerun
    model = build_model(model_cfg).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    groups = {"other": [], "gamma": [], "conditioning": []}
    for name, param in model.named_parameters():
        key = ("gamma" if name == "likelihood.log_gamma" else
               "conditioning" if name.startswith("conditioning.") else "other")
        groups[key].append(param)
    lr_scale = {"other": 1.0, "gamma": cfg.gamma_lr / cfg.lr if cfg.gamma_lr else 1.0,
                "conditioning": cfg.conditioning_lr / cfg.lr if cfg.conditioning_lr else 1.0}
    # the groups keep this order (and an empty conditioning group), so fixed-β checkpoints resume as before
    optimizer = torch.optim.Adam([{"params": params, "lr_scale": lr_scale[key]} for key, params in groups.items()
                                  if params or key != "conditioning"], lr=cfg.lr)
    step = 0
    provenance = dict(ckpt.get("provenance", {})) if ckpt is not None else {}
    if cfg.init_from and ckpt is None:
        try:
            provenance["init"] = load_initial_weights(model, cfg.init_from)
        except (OSError, KeyError, RuntimeError) as e:
            print(f"{prog}: error: cannot initialise from {cfg.init_from}: {str(e).splitlines()[0]}", file=sys.stderr)
            return 2
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]
    average = None  # a run that turns the average on later starts it from its current weights
    if cfg.ema_decay > 0:
        kept = ckpt if ckpt is not None else {}
        average = WeightAverage(model, cfg.ema_decay, kept.get("ema"), kept.get("ema_updates", 0))
    tag = cfg.tag or Path(cfg.out_dir).name
    if "export" in flags:
        print(export(model, cfg, tag, step, provenance, average))
        return 0

    bf16 = use_bf16(cfg.amp, device)
    if is_main:
        Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.out_dir) / "config.json").write_text(json.dumps(config, indent=2))
        n_params = sum(p.numel() for p in model.parameters())
        print(json.dumps(config), file=sys.stderr)
        print(f"{model_cfg.arch}: {n_params / 1e6:.2f} M parameters; {len(data.files)} training images; "
              f"starting at step {step}; {'bf16 autocast' if bf16 else 'fp32'}", file=sys.stderr)
    objective = Objective(model)
    net = torch.nn.parallel.DistributedDataParallel(objective) if world > 1 else objective
    if is_main and ckpt is not None:
        trim_log(Path(cfg.out_dir) / "log.jsonl", step)
    log = open(Path(cfg.out_dir) / "log.jsonl", "a") if is_main else None
    board = tensorboard_writer(cfg.out_dir) if is_main else None
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    start = last_ckpt = time.time()
    bad_steps = 0
    spikes = SpikeGuard(cfg.kl_spike)
    segment = {"steps": [step, step], "minutes": 0.0, "skipped": 0, "hardware": hardware(device, world, bf16)}
    provenance["segments"] = list(provenance.get("segments", [])) + [segment]
    stop = StopSignal()  # Ctrl-C / SIGTERM: finish the step, checkpoint, exit 130 / 143
    try:
        bar = tqdm(total=cfg.steps, initial=step, disable=not is_main, dynamic_ncols=True)
        model.train()
        while step < cfg.steps:
            x = data.batch(step, cfg.batch_size).to(device)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            torch.manual_seed((cfg.seed * 1_000_003 + rank) * 1_000_000_007 + step)  # posterior noise of this step
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(cfg, step) * group["lr_scale"]
            beta = batch_betas(model_cfg, cfg, step, rank, x.shape[0], device)
            terms = net(x, beta, kl_weight(step + 1, cfg.kl_warmup), autocast)
            kl = float(terms["kl"].detach())
            # no spike test during the KL warm-up: the KL climbs fast while its weight is small
            # (thesis-size runs at β = 0.1 and 0.01 were stopped at steps 60-117 by such "spikes")
            reason = ("non-finite loss" if not torch.isfinite(terms["loss"])
                      else "KL spike" if step >= cfg.kl_warmup and spikes.is_spike(kl) else "")
            if any_rank(bool(reason), world, device):
                bad_steps += 1
                segment["skipped"] += 1
                if bad_steps >= cfg.max_bad_steps:
                    print(f"{prog}: error: {bad_steps} batches skipped in a row at step {step} "
                          f"(last: {reason or 'on another rank'}); resume from ckpt_prev.pt with a lower --lr",
                          file=sys.stderr)
                    return 1
                step += 1  # skip this batch; the weights are untouched
                bar.update(1)
                continue
            bad_steps = 0
            spikes.accept(kl)
            optimizer.zero_grad(set_to_none=True)
            terms["loss"].backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
            optimizer.step()
            if average is not None:
                average.update()
            step += 1
            bar.update(1)

            if is_main and (step % cfg.log_every == 0 or step == cfg.steps):
                record = {"step": step, "time": round(time.time() - start, 1), "lr": learning_rate(cfg, step),
                          "grad_norm": round(float(grad_norm), 2), "skipped": segment["skipped"],
                          **{k: round(float(v.detach()), 5) for k, v in terms.items()}}
                bar.set_postfix(loss=f"{record['loss']:.0f}", kl_bpp=f"{record['kl_bpp']:.3f}",
                                psnr=f"{record['psnr']:.2f}")
                if val_images and step % cfg.val_every == 0:
                    for b in validation_betas(model_cfg):
                        at = "" if b is None else f"@{b:g}"
                        record.update({k + at: v for k, v in validate(model, val_images, device, b).items()})
                log.write(json.dumps(record) + "\n")
                log.flush()
                if board is not None:
                    for key, value in record.items():
                        if key != "step":
                            board.add_scalar(key, value, step)
            out_of_time = cfg.max_minutes > 0 and time.time() - start > 60 * cfg.max_minutes
            out_of_time |= stop.requested(world, device)
            segment.update(steps=[segment["steps"][0], step], minutes=round((time.time() - start) / 60, 2))
            if is_main and time.time() - last_ckpt > 60 * cfg.ckpt_minutes:
                save_checkpoint(ckpt_path, model, optimizer, step, config, provenance, average)
                last_ckpt = time.time()
            if out_of_time:
                break
        bar.close()
        if is_main:
            save_checkpoint(ckpt_path, model, optimizer, step, config, provenance, average)
            if step >= cfg.steps:
                print(f"exported {export(model, cfg, tag, step, provenance, average)}", file=sys.stderr)
        if world > 1:
            dist.destroy_process_group()
        if stop.signal is not None:
            if is_main:
                print(f"{prog}: stopped by {signal.Signals(stop.signal).name} at step {step}; checkpoint saved "
                      f"to {ckpt_path} (continue with --resume)", file=sys.stderr)
            return 128 + stop.signal
        return 0
    finally:
        stop.restore()


if __name__ == "__main__":
    sys.exit(main())
