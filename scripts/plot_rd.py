"""Plot RD curves from results JSON files and tabulate Bjøntegaard deltas.

    python -m scripts.plot_rd results/kodak/*.json \\
        ../shared/anchors/kodak/bpg_444_x265_ycbcr.json -o results/kodak/rd_psnr.png \\
        --metric psnr --bd-json results/kodak/bd_vs_bpg.json

Any CompressAI-schema file works: ours (eval_rd.py), bench_codecs.py, CompressAI's
published results/image/kodak/*.json and paper-* files (those that store only
ms-ssim-db-rgb are NOT converted to dB twice). `--metric ms-ssim` plots MS-SSIM in dB,
−10·log10(1 − MS-SSIM).

Styles: learned codecs solid with filled markers; classical codecs (JPEG, WebP, AVIF,
BPG, HEVC/HM, VTM, AV1, JPEG XL in the name) dashed; ideal curves (`"kind": "ideal"`,
e.g. the `ideal_curves` of eval_rd.py files, see rd_common.py) dotted with hollow
markers in the colour of their model, so the coder's loss is the gap between the two. An ideal curve
with the same points as one already read (the same model's coder-free curves, stored in the file of
every coder evaluated on it) is plotted and tabulated once, under its first file's name.

BD table: every curve (ideal ones included) against the reference, for PSNR and
MS-SSIM dB (pchip in log-rate over the overlapping quality interval; negative = fewer
bits than the reference). Reference: --reference FILE, else the first file whose name
contains "bpg", else the first file. The table goes to stderr as text and to stdout
(and --bd-json) as JSON.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

import numpy as np

from scripts.rd_common import (
    METRIC_KEYS,
    bd_table,
    curves_of,
    dumps,
    read_results,
    write_results,
)

CLASSICAL = re.compile(r"jpe?g|webp|avif|bpg|hevc|\bhm\b|vtm|av1|jxl", re.IGNORECASE)
AXIS_LABEL = {
    "psnr": "PSNR RGB [dB]",
    "ms-ssim": "MS-SSIM RGB [dB]  (−10·log10(1−MS-SSIM))",
}
BD_METHOD = (
    "Bjøntegaard: log(bpp) as a function of quality (PSNR or MS-SSIM dB), piecewise "
    "cubic Hermite (pchip) interpolation, averaged over the overlapping quality "
    "interval; bd_rate = exp(mean log-rate difference) - 1 in percent, negative = "
    "fewer bits than the reference; bd_<metric>_db = quality gain at equal rate "
    "(pchip in log-rate)"
)


def pick_reference(paths: list[Path], reference: str | None) -> Path:
    if reference:
        return Path(reference)
    bpg = [p for p in paths if "bpg" in p.name.lower()]
    if not bpg:
        print(
            f"[plot] no file name contains 'bpg'; BD reference = {paths[0]}",
            file=sys.stderr,
        )
    return bpg[0] if bpg else paths[0]


def style(curve: dict, colour) -> dict:
    """Ideal: dotted, hollow markers; classical: dashed; learned: solid."""
    out = {
        "color": colour,
        "linestyle": "-",
        "linewidth": 1.8,
        "marker": "o",
        "markersize": 4,
    }
    if curve["kind"] == "ideal":
        out.update(linestyle=":", linewidth=1.6, markersize=5, markerfacecolor="none")
    elif CLASSICAL.search(f"{curve['name']} {Path(curve['path'] or '').stem}"):
        out.update(linestyle="--", linewidth=1.4, marker=".", markersize=6)
    return out


def drop_repeated_ideals(curves: list[dict]) -> list[dict]:
    """The curves without ideal curves whose results equal an earlier ideal curve's, up to the
    rounding of the networks run with another number of threads (1e-6 relative)."""

    def same(a: dict, b: dict) -> bool:
        return a.keys() == b.keys() and all(
            len(a[k]) == len(b[k]) and np.allclose(a[k], b[k], rtol=1e-6, atol=0) for k in a
        )

    kept, seen = [], []
    for c in curves:
        if c["kind"] == "ideal":
            if any(same(c["results"], r) for r in seen):
                continue
            seen.append(c["results"])
        kept.append(c)
    return kept


def plot(
    curves: list[dict],
    metric: str,
    out: Path,
    title: str | None,
    xlim: list[float] | None,
    ylim: list[float] | None,
    ref_name: str | None,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = METRIC_KEYS[metric]
    fig, ax = plt.subplots(figsize=(12, 6.5), dpi=120)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    parent_colour, ys_visible = {}, []
    for c in curves:
        if key not in c["results"]:
            print(f"[plot] skip {c['name']}: no {key}", file=sys.stderr)
            continue
        x, y = (
            np.asarray(c["results"]["bpp"], float),
            np.asarray(c["results"][key], float),
        )
        ok = np.isfinite(x) & np.isfinite(y)
        order = np.argsort(x[ok])
        x, y = x[ok][order], y[ok][order]
        if c["parent"] and c["parent"] in parent_colour:
            colour = parent_colour[c["parent"]]
        else:
            colour = colours[len(parent_colour) % len(colours)]
            parent_colour[c["name"]] = colour
        label = c["name"] + (" (ideal)" if c["kind"] == "ideal" and "ideal" not in c["name"] else "")
        label += "  [BD ref]" if c["name"] == ref_name and c["kind"] != "ideal" else ""
        ax.plot(x, y, label=label, **style(c, colour))
        lo, hi = xlim or (-math.inf, math.inf)
        ys_visible += list(y[(x >= lo) & (x <= hi)])
    if xlim:
        ax.set_xlim(*xlim)
    if ylim:
        ax.set_ylim(*ylim)
    elif xlim and ys_visible:  # fit y to what is visible, not to points outside xlim
        pad = 0.03 * (max(ys_visible) - min(ys_visible))
        ax.set_ylim(min(ys_visible) - pad, max(ys_visible) + pad)
    ax.set_xlabel("bits per pixel [bpp]")
    ax.set_ylabel(AXIS_LABEL[metric])
    ax.set_title(title or f"Rate-distortion ({'PSNR' if metric == 'psnr' else 'MS-SSIM'})")
    ax.grid(True, alpha=0.35)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, framealpha=0.9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)


def format_table(rows: list[dict], ref_name: str) -> str:
    """Human-readable BD table (one line per curve)."""

    def f(x, fmt, unit=""):
        if x is None or not math.isfinite(x):
            return "n/a".rjust(len(format(0.0, fmt) + unit))
        return format(x, fmt) + unit

    cols = [
        ("BD-rate PSNR", "bd_rate_psnr_pct", "+11.2f", "%"),
        ("BD-PSNR", "bd_psnr_db", "+7.3f", ""),
        ("BD-rate MS-SSIM", "bd_rate_msssim_pct", "+14.2f", "%"),
        ("BD-MS-SSIM", "bd_msssim_db", "+9.3f", ""),
    ]
    names = [r["name"] + (" [ideal]" if r["kind"] == "ideal" else "") for r in rows]
    width = max(len(n) for n in names + ["curve"])
    lines = [
        f"BD vs {ref_name} (pchip, log-rate)",
        "  ".join(["curve".ljust(width)] + [c[0].rjust(len(c[0])) for c in cols]),
    ]
    for name, r in zip(names, rows):
        cells = [f(r.get(key), fmt, unit).rjust(len(head)) for head, key, fmt, unit in cols]
        lines.append("  ".join([name.ljust(width)] + cells))
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", help="results JSON files (CompressAI schema)")
    p.add_argument("-o", "--output", required=True, help="PNG to write")
    p.add_argument("--metric", choices=sorted(METRIC_KEYS), default="psnr")
    p.add_argument(
        "--reference",
        help="BD reference file (default: first file with 'bpg' in its name)",
    )
    p.add_argument("--bd-json", help="also write the BD table here")
    p.add_argument(
        "--bd-bpp",
        type=float,
        nargs=2,
        metavar=("LO", "HI"),
        help="BD table over the points of every curve with LO <= bpp <= HI only",
    )
    p.add_argument("--title")
    p.add_argument("--xlim", type=float, nargs=2, metavar=("LO", "HI"))
    p.add_argument("--ylim", type=float, nargs=2, metavar=("LO", "HI"))
    return p.parse_args(argv)


def clip_to_rate(curve: dict, lo: float, hi: float) -> dict:
    """A copy of a curve with only its points of lo <= bpp <= hi (for a BD table over a rate range)."""
    res = curve["results"]
    keep = [i for i, b in enumerate(res["bpp"]) if lo <= b <= hi]
    return {
        **curve,
        "results": {
            k: [v[i] for i in keep] for k, v in res.items() if isinstance(v, list) and len(v) == len(res["bpp"])
        },
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    paths = [Path(f) for f in args.files]
    ref_path = pick_reference(paths, args.reference)
    if ref_path.resolve() not in [p.resolve() for p in paths]:
        paths.append(ref_path)
    docs = {}
    for p in paths:
        try:
            docs[p] = read_results(p)
        except (OSError, ValueError) as e:  # json.JSONDecodeError is a ValueError
            print(f"error: cannot read results file {p}: {e}", file=sys.stderr)
            return 2
    curves = drop_repeated_ideals([c for d in docs.values() for c in curves_of(d)])
    ref = next(d for p, d in docs.items() if p.resolve() == ref_path.resolve())
    plot(
        curves,
        args.metric,
        Path(args.output),
        args.title,
        args.xlim,
        args.ylim,
        ref["name"],
    )
    print(f"[plot] wrote {args.output}", file=sys.stderr)

    if args.bd_bpp:
        curves, ref = [clip_to_rate(c, *args.bd_bpp) for c in curves], clip_to_rate(ref, *args.bd_bpp)
    rows = bd_table(curves, ref)
    print(format_table(rows, ref["name"]), file=sys.stderr)
    table = {
        "reference": {"name": ref["name"], "path": str(ref_path)},
        "bpp_range": args.bd_bpp,
        "method": BD_METHOD,
        "curves": rows,
    }
    if args.bd_json:
        write_results(args.bd_json, table)
        print(f"[plot] wrote {args.bd_json}", file=sys.stderr)
    print(dumps(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
