"""Benchmark the REC coder on synthetic latents shaped like a 768x512 image under the thesis PLN.

    python -m scripts.bench_coder [--device cpu] [--bpp 0.25 0.5 1.0] [--runs 3]
        [--presets thesis fast thesis-importance thesis-code] [--set level2.shard_decay=0.85 ...] [--threads 1]
        [--out results/bench_coder_cpu.json]

Level 1 is (1, 128, 32, 48), level 2 (1, 24, 16, 24). Total KL is split 88% / 12% between the
levels (the thesis' level 2 took 10-14% of the rate). Per-dim KLs follow the spread measured on
a trained VAE (prototype-findings: >2 bits 12-18%, >4 bits 2-3%, >8 bits 0.2%, a few dims of
12-30 bits): per-channel activity (20% of channels almost off) times Gamma(1.2) dims. Writes JSON:
seconds (median of runs), bits / KL per level, sample stats.
"""

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from codec.level import decode_level, encode_level
from codec.plan import kl_nats, standardise
from codec.params import CoderParams

SHAPES = {1: (1, 128, 32, 48), 2: (1, 24, 16, 24)}
PIXELS = 768 * 512
LEVEL_SHARE = {1: 0.88, 2: 0.12}


def _sigma_for_kl(kl_var: torch.Tensor) -> torch.Tensor:
    """s < 1 with -log s + (s^2 - 1) / 2 = kl_var (nats), by bisection."""
    lo, hi = torch.full_like(kl_var, 1e-9), torch.ones_like(kl_var)
    for _ in range(80):
        mid = (lo + hi) / 2
        too_big = -torch.log(mid) + (mid * mid - 1) / 2 > kl_var
        lo, hi = torch.where(too_big, mid, lo), torch.where(too_big, hi, mid)
    return (lo + hi) / 2


def synthetic_level(shape, kl_bits_total: float, gen: torch.Generator):
    """(q_loc, q_scale, p_loc, p_scale) float32 with the given total KL and a realistic spread."""
    c = shape[1]
    activity = torch.exp(0.5 * torch.randn(c, generator=gen, dtype=torch.float64))
    activity[torch.rand(c, generator=gen) < 0.2] *= 0.02  # nearly switched-off channels
    gamma = torch.distributions.Gamma(torch.tensor(1.2, dtype=torch.float64), 1.0)
    kl = gamma.sample(shape) * activity.view(1, c, 1, 1)
    kl *= kl_bits_total / kl.sum()
    hot = torch.rand(shape, generator=gen) < 2e-4  # a few very informative dims
    kl[hot] = 12 + 18 * torch.rand(int(hot.sum()), generator=gen, dtype=torch.float64)
    kl *= kl_bits_total / kl.sum()
    kl_nats = kl * math.log(2)
    var_part = torch.rand(shape, generator=gen, dtype=torch.float64)  # KL split: shrink / shift
    s = _sigma_for_kl(var_part * kl_nats)
    sign = torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0).double()
    m = sign * torch.sqrt(2 * (1 - var_part) * kl_nats)
    p_loc = torch.randn(shape, generator=gen, dtype=torch.float64)
    p_scale = torch.exp(0.5 * torch.randn(shape, generator=gen, dtype=torch.float64))
    out = (p_loc + p_scale * m, p_scale * s, p_loc, p_scale)
    return tuple(t.float() for t in out)


def sample_stats(z, q_loc, q_scale, p_loc, p_scale, outlier_bits: float) -> dict:
    """Standardised residuals (z - mu_q) / sigma_q of the coded (non-outlier) dims."""
    m, v = standardise(q_loc, q_scale, p_loc, p_scale)
    coded = kl_nats(m, v) / math.log(2) <= outlier_bits
    r = ((z.double() - q_loc.double()) / q_scale.double()).flatten()[coded]
    return {
        "resid_mean": r.mean().item(),
        "resid_var": r.var().item(),
        "resid_var_robust": (r * r).median().item() / 0.4549,
    }  # chi2_1 median = 0.4549


def bench(preset: str, params: CoderParams, bpp: float, runs: int, device: str, seed: int = 1) -> dict:
    """`params`: the preset's, with any --set changes."""
    torch.manual_seed(int(bpp * 1000))  # torch.distributions.Gamma samples from the global RNG
    gen = torch.Generator().manual_seed(int(bpp * 1000))
    total_bits = bpp * PIXELS
    result = {"preset": preset, "target_kl_bpp": bpp, "levels": {}}
    for level in (2, 1):
        ql, qs, pl, ps = (t.to(device) for t in synthetic_level(SHAPES[level], LEVEL_SHARE[level] * total_bits, gen))
        enc_t, dec_t = [], []
        for _ in range(runs):
            t0 = time.perf_counter()
            z, data, stats = encode_level(ql, qs, pl, ps, seed=seed, level=level, params=params, return_stats=True)
            _sync(device)
            enc_t.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            z2 = decode_level(pl, ps, data, seed=seed, level=level, params=params)
            _sync(device)
            dec_t.append(time.perf_counter() - t0)
            if not torch.equal(z, z2):
                raise SystemExit(f"level {level}: decoded sample differs from the encoder's")
        stats.pop("seconds")
        result["levels"][level] = {
            **stats,
            "bits_over_kl": stats["bits"] / stats["kl_bits"],
            "encode_s": statistics.median(enc_t),
            "decode_s": statistics.median(dec_t),
            "encode_runs_s": enc_t,
            "decode_runs_s": dec_t,
            **sample_stats(z, ql, qs, pl, ps, params.for_level(level).outlier_bits),
        }
    lv = result["levels"]
    result["total"] = {
        "kl_bits": lv[1]["kl_bits"] + lv[2]["kl_bits"],
        "bits": lv[1]["bits"] + lv[2]["bits"],
        "encode_s": lv[1]["encode_s"] + lv[2]["encode_s"],
        "decode_s": lv[1]["decode_s"] + lv[2]["decode_s"],
    }
    result["total"]["bits_over_kl"] = result["total"]["bits"] / result["total"]["kl_bits"]
    result["total"]["bpp"] = result["total"]["bits"] / PIXELS
    return result


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bpp", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    ap.add_argument("--presets", nargs="+", default=["thesis", "fast"])
    ap.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="change every preset's fields, e.g. level2.oversample_bits=1",
    )
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)  # on 2 shared cores 1 beats 2
    ap.add_argument("--out", default="results/bench_coder_cpu.json")
    args = ap.parse_args(argv)
    try:
        params = {p: CoderParams.preset(p).with_overrides(args.set) for p in args.presets}
    except ValueError as e:
        ap.error(str(e))
    torch.set_num_threads(args.threads)
    report = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "threads": args.threads,
            "device": args.device,
            "loadavg_before": _loadavg(),
        },
        "results": [],
    }
    for preset in args.presets:
        for bpp in args.bpp:
            r = bench(preset, params[preset], bpp, args.runs, args.device)
            report["results"].append(r)
            t = r["total"]
            print(
                f"{preset:7s} {bpp:.2f} bpp: enc {t['encode_s']:.2f}s dec {t['decode_s']:.3f}s "
                f"bits/KL total {t['bits_over_kl']:.3f} L1 {r['levels'][1]['bits_over_kl']:.3f} "
                f"L2 {r['levels'][2]['bits_over_kl']:.3f}",
                file=sys.stderr,
                flush=True,
            )
    report["machine"]["loadavg_after"] = _loadavg()
    report["overrides"] = args.set
    report["params"] = {p: params[p].to_dict() for p in args.presets}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps({"out": args.out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
