"""The space-partitioning paper's toys for codec/pfr.py: PFR vs SP-PFR, ORC vs SP-ORC, 5-D Gaussians.

    python -m scripts.rec_toys -o results/toys/

Each toy block is a 5-D Gaussian channel: prior N(0, I), posterior N(m, diag v) with per-dim
mutual information I_d = I * (0, 0.1, 0.2, 0.3, 0.4) bits (one collapsed dim), v_d = 2^(-2 I_d)
and m_d ~ N(0, 1 - v_d), so the posterior averages to the prior and the block's KL averages I.
SP methods get L = floor(I) bin bits, spread over the dims by I_d (codec.pfr.allocate_bin_bits):
information the decoder has. Writes rec_toys.json and rec_toys.png (three panels):

(a) steps of PFR and SP-PFR against the block's D_inf[q || p] (bits, 1-bit bins; PFR capped
    at --max-steps arrivals, capped blocks counted at the cap);
(b) code length against I: the coded bits of all blocks of one I (less the section's fixed
    14-byte framing, with the rANS table) / blocks, and the mean log2 k;
(c) ORC and SP-ORC samples at a fixed budget: KS statistic of the standardised sample (pooled
    over dims) and MMD^2 (Gaussian kernel, bandwidth 1) against N(0, I_5), against I.
"""

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from codec import pfr

DIM_SHARES = (0.0, 0.1, 0.2, 0.3, 0.4)
D = len(DIM_SHARES)
FRAMING_BYTES = 14  # the coded section's fixed header and CRC, whatever the number of blocks


def channel(info_bits: float, n_blocks: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    info = (torch.tensor(DIM_SHARES, dtype=torch.float64) * info_bits).repeat(n_blocks)
    v = 2.0 ** (-2.0 * info)
    m = torch.randn(info.numel(), generator=g, dtype=torch.float64) * (1.0 - v).sqrt()
    return m, v, pfr.allocate_bin_bits(info, [D] * n_blocks, math.floor(info_bits))


def ks_statistic(u: np.ndarray) -> float:
    from scipy import stats

    return float(stats.kstest(u, "norm").statistic)


def mmd2(x: torch.Tensor, seed: int) -> float:
    """Unbiased MMD^2 between rows of x and as many N(0, I) draws, Gaussian kernel of bandwidth 1."""
    y = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

    def mean_k(a, b, same):
        k = torch.exp(-0.5 * torch.cdist(a, b) ** 2)
        if same:
            return float((k.sum() - k.diagonal().sum()) / (a.shape[0] * (a.shape[0] - 1)))
        return float(k.mean())

    return mean_k(x, x, True) + mean_k(y, y, True) - 2.0 * mean_k(x, y, False)


def exact_runs(infos, n_blocks, max_steps, seed):
    """Per I: PFR and SP-PFR steps, D_inf, code lengths."""
    out = []
    for i, info in enumerate(infos):
        m, v, bins = channel(info, n_blocks, seed + i)
        row = {"info_bits": info, "bin_bits": math.floor(info)}
        for method in ("pfr", "sp-pfr"):
            t0 = time.perf_counter()
            _, data, st = pfr.encode_blocks(
                m, v, [D] * n_blocks, seed=seed + i, method=method, bin_bits=bins if method == "sp-pfr" else None,
                max_steps=max_steps,
            )  # fmt: skip
            row[method] = {
                "seconds": time.perf_counter() - t0,
                "steps": st["steps"].tolist(),
                "capped": int(st["capped"].sum()),
                "dinf_bits": st["dinf_bits"].tolist(),
                "kl_bits_mean": float(st["kl_bits"].mean()),
                "code_bits_per_block": 8.0 * len(data) / n_blocks,
                "payload_bits_per_block": 8.0 * (len(data) - FRAMING_BYTES) / n_blocks,
                "log2_index_mean": float(torch.log2(st["index"].double()).mean()),
                "search_bound_bits_mean": float(st["bound_bits"].mean()),
            }
        out.append(row)
        print(
            f"I={info:5.1f}  pfr steps {np.mean(row['pfr']['steps']):9.1f} (capped {row['pfr']['capped']})"
            f"  sp-pfr steps {np.mean(row['sp-pfr']['steps']):7.1f}"
            f"  bits/block {row['pfr']['code_bits_per_block']:5.2f} / {row['sp-pfr']['code_bits_per_block']:5.2f}",
            flush=True,
        )
    return out


def steps_by_dinf(runs, method):
    """Mean, median and IQR of steps in 1-bit bins of the block's D_inf[q || p]."""
    dinf = np.concatenate([r[method]["dinf_bits"] for r in runs])
    steps = np.concatenate([r[method]["steps"] for r in runs]).astype(np.float64)
    rows = []
    for lo in range(int(dinf.min()), int(dinf.max()) + 1):
        sel = (dinf >= lo) & (dinf < lo + 1)
        if sel.sum() >= 5:
            q25, q50, q75 = np.percentile(steps[sel], [25, 50, 75])
            mean = float(steps[sel].mean())
            rows.append(dict(dinf_bits=lo + 0.5, n=int(sel.sum()), mean=mean, median=q50, q25=q25, q75=q75))
    return rows


def orc_runs(infos, n_blocks, budget, seed):
    out = []
    for i, info in enumerate(infos):
        m, v, bins = channel(info, n_blocks, seed + 1000 + i)
        row = {"info_bits": info}
        for method in ("orc", "sp-orc"):
            z, data, _ = pfr.encode_blocks(
                m, v, [D] * n_blocks, seed=seed + i, method=method, budget=budget,
                bin_bits=bins if method == "sp-orc" else None,
            )  # fmt: skip
            u = ((z.double() - m) / v.sqrt()).view(n_blocks, D)
            row[method] = {
                "ks": ks_statistic(u.flatten().numpy()),
                "mmd2": mmd2(u, seed + i),
                "u2_mean": float((u * u).mean()),
                "code_bits_per_block": 8.0 * len(data) / n_blocks,
            }
        out.append(row)
        print(f"I={info:5.1f}  N={budget}  KS orc {row['orc']['ks']:.3f}  sp-orc {row['sp-orc']['ks']:.3f}", flush=True)
    return out


def plot(path, exact, orc, budget):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    for method, color in (("pfr", "C0"), ("sp-pfr", "C1")):
        rows = steps_by_dinf(exact, method)
        x = [r["dinf_bits"] for r in rows]
        ax[0].plot(x, [r["mean"] for r in rows], color=color, label=f"{method} mean")
        ax[0].fill_between(x, [r["q25"] for r in rows], [r["q75"] for r in rows], color=color, alpha=0.2)
        info = [r["info_bits"] for r in exact]
        bits = [r[method]["payload_bits_per_block"] for r in exact]
        ax[1].plot(info, bits, "o-", color=color, label=f"{method} coded bits")
        ax[1].plot(info, [r[method]["log2_index_mean"] for r in exact], "x--", color=color, label=f"{method} log2 k")
    ax[0].set(yscale="log", xlabel="D_inf[q || p] (bits)", ylabel="steps (mean, IQR)", title="(a) exact: steps")
    info = np.array([r["info_bits"] for r in exact])
    ax[1].plot(info, info + np.log2(info + 1), "k:", label="I + log2(I + 1)")
    ax[1].set(xlabel="I (bits)", ylabel="bits per block", title="(b) code length")
    for method, color in (("orc", "C0"), ("sp-orc", "C1")):
        ax[2].plot([r["info_bits"] for r in orc], [r[method]["ks"] for r in orc], "o-", color=color, label=method)
    ax[2].set(xlabel="I (bits)", ylabel="KS statistic vs N(0, 1)", title=f"(c) approximate, N = {budget}")
    for a in ax:
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-o", "--out", default="results/toys")
    ap.add_argument("--blocks", type=int, default=1000, help="blocks per I for the exact coders")
    ap.add_argument("--orc-blocks", type=int, default=1000)
    ap.add_argument("--budget", type=int, default=64, help="ORC / SP-ORC candidates per block")
    ap.add_argument("--max-steps", type=int, default=1 << 18, help="cap on PFR's arrivals per block")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    infos = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0]
    t0 = time.perf_counter()
    exact = exact_runs(infos, args.blocks, args.max_steps, args.seed)
    orc = orc_runs(infos, args.orc_blocks, args.budget, args.seed)
    summary = {method: steps_by_dinf(exact, method) for method in ("pfr", "sp-pfr")}  # the poster's Fig. 2a
    result = dict(
        setup=dict(
            dims=D, dim_shares=DIM_SHARES, blocks=args.blocks, orc_blocks=args.orc_blocks, budget=args.budget,
            max_steps=args.max_steps, seed=args.seed, sp_orc_bin_mix=pfr.DEFAULT_BIN_MIX, threads=1,
        ),
        steps_by_dinf=summary,
        exact=exact,
        orc=orc,
        seconds=time.perf_counter() - t0,
    )  # fmt: skip
    (out / "rec_toys.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(out / "rec_toys.png", exact, orc, args.budget)
    print(f"wrote {out / 'rec_toys.json'} and rec_toys.png in {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
