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

main() reads top to bottom: resolve the settings (and the checkpoint), load the data, start the process
(threads, DDP), start the run (model, optimizer, weights, average: training/start.py), then export it or
train() it: one batch's terms, the update, the log record, checkpoints, the finish.
"""

import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from training.data import DataError, RandomCrops
from training.objective import Objective, batch_betas, kl_weight, learning_rate, validate, validation_betas
from training.run import Run, SpikeGuard, StopSignal, any_rank, hardware, trim_log
from training.start import SetupError, load_data, resolve_setup, start_process, start_run, use_bf16


def main(argv: list[str] | None = None, prog: str = "rec-codec-train") -> int:
    """Train, resume or export as the arguments say; returns the exit status. `prog` names the command
    in messages."""
    argv = sys.argv[1:] if argv is None else argv
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    try:
        setup = resolve_setup(argv)
        data, val_images = (None, []) if "export" in setup.flags else load_data(setup.cfg, rank)
    except (ValueError, DataError, OSError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    device = start_process(setup.cfg, world)
    try:
        run = start_run(setup, rank, world, device)
    except SetupError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    if "export" in setup.flags:
        print(run.export())
        return 0
    return train(run, data, val_images, prog)


def train(run: Run, data: RandomCrops, val_images: list[torch.Tensor], prog: str) -> int:
    """Steps from run.step to cfg.steps, or until max_minutes or a stop signal; a checkpoint every
    ckpt_minutes and at the end, the model file once every step is done. Returns the exit status."""
    cfg = run.cfg
    bf16 = use_bf16(cfg.amp, run.device)
    if run.is_main:
        announce(run, bf16, len(data.files))
    objective = Objective(run.model)
    net = torch.nn.parallel.DistributedDataParallel(objective) if run.world > 1 else objective
    logs = Logs(run)
    autocast = torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=bf16)
    start = last_ckpt = time.time()
    bad_steps = 0
    spikes = SpikeGuard(cfg.kl_spike)
    segment = {
        "steps": [run.step, run.step],
        "minutes": 0.0,
        "skipped": 0,
        "hardware": hardware(run.device, run.world, bf16),
    }
    run.provenance["segments"] = list(run.provenance.get("segments", [])) + [segment]
    stop = StopSignal()  # Ctrl-C / SIGTERM: finish the step, checkpoint, exit 130 / 143
    try:
        bar = tqdm(total=cfg.steps, initial=run.step, disable=not run.is_main, dynamic_ncols=True)
        run.model.train()
        while run.step < cfg.steps:
            terms = batch_terms(run, net, data, autocast)
            kl = float(terms["kl"].detach())
            # no spike test during the KL warm-up: the KL climbs fast while its weight is small
            # (thesis-size runs at β = 0.1 and 0.01 were stopped at steps 60-117 by such "spikes")
            reason = (
                "non-finite loss"
                if not torch.isfinite(terms["loss"])
                else "KL spike"
                if run.step >= cfg.kl_warmup and spikes.is_spike(kl)
                else ""
            )
            if any_rank(bool(reason), run.world, run.device):
                bad_steps += 1
                segment["skipped"] += 1
                if bad_steps >= cfg.max_bad_steps:
                    print(
                        f"{prog}: error: {bad_steps} batches skipped in a row at step {run.step} "
                        f"(last: {reason or 'on another rank'}); resume from ckpt_prev.pt with a lower --lr",
                        file=sys.stderr,
                    )
                    return 1
                run.step += 1  # skip this batch; the weights are untouched
                bar.update(1)
                continue
            bad_steps = 0
            spikes.accept(kl)
            grad_norm = update(run, terms)
            run.step += 1
            bar.update(1)
            if run.is_main and (run.step % cfg.log_every == 0 or run.step == cfg.steps):
                record = step_record(run, terms, grad_norm, segment["skipped"], time.time() - start, val_images)
                bar.set_postfix(
                    loss=f"{record['loss']:.0f}", kl_bpp=f"{record['kl_bpp']:.3f}", psnr=f"{record['psnr']:.2f}"
                )
                logs.write(record)
            out_of_time = cfg.max_minutes > 0 and time.time() - start > 60 * cfg.max_minutes
            out_of_time |= stop.requested(run.world, run.device)
            segment.update(steps=[segment["steps"][0], run.step], minutes=round((time.time() - start) / 60, 2))
            if run.is_main and time.time() - last_ckpt > 60 * cfg.ckpt_minutes:
                run.save_checkpoint()
                last_ckpt = time.time()
            if out_of_time:
                break
        bar.close()
        return finish(run, stop, prog)
    finally:
        stop.restore()


def announce(run: Run, bf16: bool, n_images: int) -> None:
    """The out_dir with the resolved config.json; the config and a summary line on stderr."""
    out_dir = Path(run.cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(run.config, indent=2))
    n_params = sum(p.numel() for p in run.model.parameters())
    print(json.dumps(run.config), file=sys.stderr)
    print(
        f"{run.model_cfg.arch}: {n_params / 1e6:.2f} M parameters; {n_images} training images; "
        f"starting at step {run.step}; {'bf16 autocast' if bf16 else 'fp32'}",
        file=sys.stderr,
    )


def batch_terms(run: Run, net: torch.nn.Module, data: RandomCrops, autocast) -> dict:
    """The loss terms of this step's batch: its crops, posterior noise, learning rate and β all follow
    from (seed, rank, step), so a resumed run repeats them."""
    cfg, step = run.cfg, run.step
    x = data.batch(step, cfg.batch_size).to(run.device)
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    torch.manual_seed((cfg.seed * 1_000_003 + run.rank) * 1_000_000_007 + step)  # posterior noise of this step
    for group in run.optimizer.param_groups:
        group["lr"] = learning_rate(cfg, step) * group["lr_scale"]
    beta = batch_betas(run.model_cfg, cfg, step, run.rank, x.shape[0], run.device)
    return net(x, beta, kl_weight(step + 1, cfg.kl_warmup), autocast)


def update(run: Run, terms: dict) -> torch.Tensor:
    """Backward, gradient clipping, the Adam step and the weight average; returns the gradient norm."""
    run.optimizer.zero_grad(set_to_none=True)
    terms["loss"].backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.grad_clip or float("inf"))
    run.optimizer.step()
    if run.average is not None:
        run.average.update()
    return grad_norm


def step_record(
    run: Run, terms: dict, grad_norm: torch.Tensor, skipped: int, seconds: float, val_images: list[torch.Tensor]
) -> dict:
    """A step's log line: its loss terms, and the validation results when one is due."""
    cfg = run.cfg
    record = {
        "step": run.step,
        "time": round(seconds, 1),
        "lr": learning_rate(cfg, run.step),
        "grad_norm": round(float(grad_norm), 2),
        "skipped": skipped,
        **{k: round(float(v.detach()), 5) for k, v in terms.items()},
    }
    if val_images and run.step % cfg.val_every == 0:
        for b in validation_betas(run.model_cfg):
            at = "" if b is None else f"@{b:g}"
            record.update({k + at: v for k, v in validate(run.model, val_images, run.device, b).items()})
    return record


class Logs:
    """OUT_DIR/log.jsonl (records past a resumed checkpoint's step dropped) and TensorBoard's event files
    when tensorboard is installed; the main process writes them, the others nothing."""

    def __init__(self, run: Run):
        self.file = self.board = None
        if not run.is_main:
            return
        path = Path(run.cfg.out_dir) / "log.jsonl"
        if run.resumed:
            trim_log(path, run.step)
        self.file = open(path, "a")
        self.board = tensorboard_writer(run.cfg.out_dir)

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.board is not None:
            for key, value in record.items():
                if key != "step":
                    self.board.add_scalar(key, value, record["step"])


def tensorboard_writer(out_dir: str):
    """A SummaryWriter when the tensorboard package is installed, else None (it is optional)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(out_dir)


def finish(run: Run, stop: StopSignal, prog: str) -> int:
    """The last checkpoint, the model file if every step is done, and the exit status (128 + the signal
    that stopped the run)."""
    if run.is_main:
        run.save_checkpoint()
        if run.step >= run.cfg.steps:
            print(f"exported {run.export()}", file=sys.stderr)
    if run.world > 1:
        dist.destroy_process_group()
    if stop.signal is not None:
        if run.is_main:
            print(
                f"{prog}: stopped by {signal.Signals(stop.signal).name} at step {run.step}; checkpoint saved "
                f"to {run.ckpt_path} (continue with --resume)",
                file=sys.stderr,
            )
        return 128 + stop.signal
    return 0


if __name__ == "__main__":
    sys.exit(main())
