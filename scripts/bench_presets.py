"""Every coder preset on the same images and rates: bits / KL, PSNR against an exact posterior sample, seconds.

    python -m scripts.bench_presets --data ../shared/data/kodak --limit 4 --quality 1 4 8 --threads 1 \\
        -o results/coders/
    python -m scripts.bench_presets --data DIR --presets orc sp-orc --model weights/pln-vbr-b466eb67.pt -o OUT/

Runs scripts.eval_rd once per preset (real .rec files, decoded and checked against the encoder's
image; the ideal pass gives the exact-sample PSNR) into OUT/<preset>.json with per-image values,
skipping presets whose file is already there (delete it to rerun), then writes OUT/summary.json:
per preset and rate point, means over the images of

  bits_per_kl        file bits (header included) / the coder's KL target
  psnr_minus_ideal   PSNR of the decoded image - PSNR of an exact posterior sample at rate = KL (dB)
  encode_s, decode_s seconds per image (encode = compress + write, decode = read + decompress)

and the mean bpp, PSNR and decode mismatches, and OUT/summary.png: encode and decode seconds,
PSNR - exact-sample PSNR and bits / KL of every preset against bpp (the thesis's Fig. 4.9 is the
first). Exit status 1 if any decoded image differed.
"""

import argparse
import json
import sys
from pathlib import Path

from codec.params import PRESETS
from codec.store import find_model
from scripts import eval_rd

IDEAL_SAMPLE = "kl-sample"


def summarise(doc: dict) -> list[dict]:
    """One row per rate point of an eval_rd document written with --per-image."""
    ideal = next(c for c in doc["ideal_curves"] if c["name"].endswith(eval_rd.IDEAL[IDEAL_SAMPLE][0]))
    rows = []
    for i, model in enumerate(doc["meta"]["models"]):
        per = doc["per_image"]
        images = list(per)
        n = len(images)
        rows.append(
            {
                "point": model["name"],
                "beta": model["beta"],
                "bpp": doc["results"]["bpp"][i],
                "psnr": doc["results"]["psnr-rgb"][i],
                "ideal_psnr": ideal["results"]["psnr-rgb"][i],
                "bits_per_kl": sum(per[k]["bpp"][i] / per[k]["kl-bpp"][i] for k in images) / n,
                "psnr_minus_ideal": sum(per[k]["psnr-rgb"][i] - ideal["per_image"][k]["psnr-rgb"][i] for k in images)
                / n,
                "encode_s": doc["results"]["encoding_time"][i],
                "decode_s": doc["results"]["decoding_time"][i],
            }
        )
    return rows


def plot_summary(summary: dict, path: Path) -> None:
    """Four panels against bpp, one line per preset (its rate points)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (
        ("encode_s", "encode seconds / image", True),
        ("decode_s", "decode seconds / image", True),
        ("psnr_minus_ideal", "PSNR - exact-sample PSNR (dB)", False),
        ("bits_per_kl", "file bits / KL", False),
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8))
    for ax, (key, label, log) in zip(axes, panels):
        for preset, entry in summary.items():
            rows = sorted(entry["rows"], key=lambda r: r["bpp"])
            ax.plot([r["bpp"] for r in rows], [r[key] for r in rows], "o-", label=preset)
        ax.set(xlabel="bpp", ylabel=label, yscale="log" if log else "linear")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="folder of images")
    p.add_argument("--model", default=None, help="model file, name or hash (default: weights/DEFAULT)")
    p.add_argument("--presets", nargs="+", default=list(PRESETS), choices=PRESETS)
    p.add_argument("--quality", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--limit", type=int, default=4, help="the first N images (sorted by path)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--out", required=True, help="output folder")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = args.model or str(find_model(None))
    status, summary = 0, {}
    for preset in args.presets:
        path = out / f"{preset}.json"
        if not path.exists():
            code = eval_rd.main(
                [
                    *("--data", args.data, "--model", model, "--coder", preset, "--per-image", "--no-progress"),
                    *("--limit", str(args.limit), "--threads", str(args.threads), "--seed", str(args.seed)),
                    *("--quality", *map(str, args.quality), "-o", str(path)),
                ]
            )
            status = max(status, code)
        doc = json.loads(path.read_text())
        summary[preset] = {
            "rows": summarise(doc),
            "decode_mismatches": len(doc["meta"]["decode_mismatches"]),
            "images": doc["meta"]["images"],
            "torch_threads": doc["meta"]["torch_threads"],
        }
        print(f"{preset}: " + json.dumps(summary[preset]["rows"]), file=sys.stderr)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot_summary(summary, out / "summary.png")
    return status


if __name__ == "__main__":
    sys.exit(main())
