"""Training-run plumbing kept out of the loop (loop.py): a process's run state (Run: its checkpoint and its
export), atomic checkpoints, the log trimmed on resume, the provenance record an exported model carries,
stop signals, the KL-spike guard, the weight average and the agreement of DDP ranks."""

import json
import os
import platform
import signal
import statistics
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from models import ModelConfig, save_model, unwrap
from training.config import TrainConfig


def save_checkpoint(
    path: Path, model, optimizer, step: int, config: dict, provenance: dict, average: "WeightAverage | None" = None
) -> None:
    """Atomic: write a temporary file, then rename over the old checkpoint, which is kept as
    ckpt_prev.pt (a way back if a run diverged just before a save)."""
    tmp = path.with_suffix(".tmp")
    extra = {} if average is None else {"ema": average.avg, "ema_updates": average.updates}
    torch.save(
        {
            "format": "rec-ckpt/1",
            "config": config,
            "model": unwrap(model).state_dict(),
            "optimizer": optimizer.state_dict(),
            "step": step,
            "provenance": provenance,
            **extra,
        },
        tmp,
    )
    if path.exists():
        os.replace(path, path.with_name("ckpt_prev.pt"))
    os.replace(tmp, path)


def hardware(device: torch.device, world: int, bf16: bool) -> str:
    """What a segment of training ran on, for the exported model's record."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        name += f" ({os.cpu_count()} cpus, {torch.get_num_threads()} threads)"
    return f"{world} x {name}, {'bf16 autocast' if bf16 else 'fp32'}, torch {torch.__version__}"


FINAL_TERMS = ("loss", "nll", "kl_bpp", "kl1_bpp", "kl2_bpp", "psnr", "gamma")


def training_record(out_dir: str, step: int, provenance: dict, init_from: str = "") -> dict:
    """Steps, wall time, hardware and final loss terms of a run, stored in its exported model.

    Segments (one per process run: steps, minutes, hardware) come from the checkpoint; runs
    checkpointed before they were recorded fall back to the log's clock, which restarts at 0 on
    every resume. Final terms are means over the last 50 logged steps (noisy single batches)."""
    path = Path(out_dir) / "log.jsonl"
    records = (
        [r for r in map(json.loads, path.read_text().splitlines()) if "loss" in r and r["step"] <= step]
        if path.exists()
        else []
    )
    segments = list(provenance.get("segments", []))
    early = [r for r in records if not segments or r["step"] <= segments[0]["steps"][0]]
    if early:  # steps from before segments were recorded
        bounds = [0] + [i for i in range(1, len(early)) if early[i]["time"] < early[i - 1]["time"]]
        segments[:0] = [
            {
                "steps": [early[a]["step"], early[b - 1]["step"]],
                "minutes": round(early[b - 1]["time"] / 60, 1),
                "hardware": None,
            }
            for a, b in zip(bounds, bounds[1:] + [len(early)])
        ]
    last = records[-50:]
    final = {k: round(sum(r[k] for r in last) / len(last), 5) for k in FINAL_TERMS if last and k in last[0]}
    validated = [r for r in records if any(k.startswith("val_") for k in r)]
    validation = {k: v for k, v in validated[-1].items() if k == "step" or k.startswith("val_")} if validated else None
    return {
        "steps": step,
        "minutes": round(sum(seg["minutes"] for seg in segments), 1),
        "segments": segments,
        "final_terms": final,
        "validation": validation,
        "init": provenance.get("init") or ({"from": init_from, "step": None} if init_from else None),
    }


class StopSignal:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step (a second Ctrl-C kills)."""

    def __init__(self):
        self.signal = None
        self._old = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame):
        if self.signal is not None:
            self.restore()
            raise KeyboardInterrupt
        self.signal = signum

    def requested(self, world: int, device: torch.device) -> bool:
        """Whether to stop now; under DDP every rank agrees (one may have been signalled a step later)."""
        signum = rank_max(self.signal or 0, world, device)
        if signum and self.signal is None:
            self.signal = signum
        return bool(signum)

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


class SpikeGuard:
    """Flags a batch whose KL is `factor` × the median of the last accepted batches, so that its update is
    skipped. At β ≤ 0.1 a run's KL doubled within 25 steps and then exploded for good; in stable runs a
    batch's KL stays within 1.6 × (once 2.1 ×) the median of the previous ones."""

    def __init__(self, factor: float, window: int = 100, warmup: int = 20):
        self.factor, self.warmup = factor, warmup
        self.recent = deque(maxlen=window)

    def is_spike(self, kl: float) -> bool:
        if self.factor <= 0 or len(self.recent) < self.warmup:
            return False
        return kl > self.factor * statistics.median(self.recent)

    def accept(self, kl: float) -> None:
        self.recent.append(kl)


class WeightAverage:
    """Exponential moving average of a model's floating-point weights and buffers.

    Small-batch SGD leaves the weights jittering around where the loss is low; the average sits
    nearer the middle, and is what gets exported. The decay ramps up as (1 + n) / (10 + n) over
    the first updates n, so a fresh average is not dominated by the weights it started from.
    """

    def __init__(self, model, decay: float, avg: dict | None = None, updates: int = 0):
        # the live tensors are held once: the optimizer and load_state_dict update them in place
        self.live = {k: t for k, t in unwrap(model).state_dict().items() if t.is_floating_point()}
        self.decay, self.updates = decay, updates
        # kept where the model is (a checkpoint is loaded on the CPU; the model may be on a GPU)
        self.avg = {k: torch.empty_like(t).copy_(avg[k] if avg is not None else t) for k, t in self.live.items()}

    @torch.no_grad()
    def update(self) -> None:
        """Fold in the model's current weights (call after each optimizer step)."""
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k, a in self.avg.items():
            a.lerp_(self.live[k], 1.0 - decay)
        self.updates += 1

    def state_dict(self, model) -> dict:
        """The model's state with the averaged tensors in place of the live ones."""
        return {**unwrap(model).state_dict(), **self.avg}


def rank_max(value: int, world: int, device: torch.device) -> int:
    """The largest of the ranks' values, on every rank (itself without DDP)."""
    if world == 1:
        return value
    t = torch.tensor([value], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def any_rank(flag: bool, world: int, device: torch.device) -> bool:
    """True on every rank if it is true on one (DDP ranks must skip a batch together, or backward hangs)."""
    return rank_max(int(flag), world, device) > 0


def trim_log(path: Path, step: int) -> None:
    """Drop log records past the checkpoint's step: a resumed run logs those steps again."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        path.write_text("".join(kept))


@dataclass
class Run:
    """One process's share of a training run: its settings, model, optimizer and progress."""

    cfg: TrainConfig
    model_cfg: ModelConfig
    ckpt_path: Path
    resumed: bool
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    step: int  # batches done, skipped ones included
    provenance: dict  # where the weights started and the segments trained (kept in checkpoints)
    average: WeightAverage | None
    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def config(self) -> dict:
        return {**asdict(self.cfg), **self.model_cfg.to_dict()}

    def save_checkpoint(self) -> None:
        save_checkpoint(
            self.ckpt_path, self.model, self.optimizer, self.step, self.config, self.provenance, self.average
        )

    def export(self) -> Path:
        """The model file `<arch>-<tag>-<sha8>.pt` in export_dir: the weight average when the run keeps one
        (loaded into the model), with the training record and the training config."""
        cfg, average = self.cfg, self.average
        record = training_record(cfg.out_dir, self.step, self.provenance, cfg.init_from)
        meta = {"step": self.step, "training": record, "train_config": asdict(cfg)}  # β, crops, lr, data folder
        if average is not None:
            self.model.load_state_dict(average.state_dict(self.model))
            meta["weights"] = f"exponential moving average, decay {average.decay}, {average.updates} updates"
        tag = cfg.tag or Path(cfg.out_dir).name
        return save_model(self.model, cfg.export_dir, tag, getattr(torch, cfg.export_dtype), meta=meta)
