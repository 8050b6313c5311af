"""Training speed benchmark: seconds per step and peak memory for given configs, written as JSON.

Each config runs in its own subprocess (so peak RSS is its own), on random data at the config's batch
size and crop, with the same precision rules as train.py (--amp=auto). Quote the median.

    python -m scripts.bench_train --configs configs/pln_thesis_b0.1.toml configs/pln_cpu.toml \
        --steps 5 --warmup 2 -o results/bench_train_cpu.json [--device cuda] [--batch_size 8 --crop 256]
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path


def measure(config: str, steps: int, warmup: int, device: str, overrides: list[str]) -> dict:
    """Runs inside the child process: time `steps` optimiser steps after `warmup` untimed ones."""
    import torch

    from models import build_model, elbo_loss
    from training.config import resolve_config
    from training.start import use_bf16

    cfg, model_cfg, _ = resolve_config([config, f"--device={device}", *overrides])
    dev = torch.device(device)
    bf16 = use_bf16(cfg.amp, dev)
    model = build_model(model_cfg).to(dev)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    x = torch.rand(cfg.batch_size, 3, cfg.crop, cfg.crop, device=dev)
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    times = []
    for i in range(warmup + steps):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(x)
        loss = elbo_loss(model, x, out, cfg.beta, 1.0)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    result = {
        "config": config,
        "arch": model_cfg.arch,
        "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
        "batch_size": cfg.batch_size,
        "crop": cfg.crop,
        "precision": "bf16 autocast" if bf16 else "fp32",
        "device": device,
        "threads": torch.get_num_threads(),
        "step_s": [round(t, 3) for t in times],
        "median_step_s": round(statistics.median(times), 3),
        "steps_per_s": round(1 / statistics.median(times), 3),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
    }
    if dev.type == "cuda":
        result["peak_cuda_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        result["gpu"] = torch.cuda.get_device_name()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", required=True)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch_size", type=int, help="override the configs' batch size")
    parser.add_argument("--crop", type=int, help="override the configs' crop")
    parser.add_argument("-o", "--output", required=True)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    overrides = [f"--{k}={v}" for k in ("batch_size", "crop") if (v := getattr(args, k)) is not None]
    if args.child:
        print(json.dumps(measure(args.child, args.steps, args.warmup, args.device, overrides)))
        return 0
    runs = []
    for config in args.configs:
        cmd = [
            sys.executable,
            "-m",
            "scripts.bench_train",
            "--configs",
            config,
            "--child",
            config,
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
            "--device",
            args.device,
            "-o",
            os.devnull,
            *[a for k in ("batch_size", "crop") if (v := getattr(args, k)) is not None for a in (f"--{k}", str(v))],
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"bench_train: error: {config} failed: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
            return 1
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(runs[-1]), file=sys.stderr)
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    report = {
        "machine": {
            "platform": platform.platform(),
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "loadavg_at_end": load,
        },
        "runs": runs,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
