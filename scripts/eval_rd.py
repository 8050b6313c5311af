"""Rate-distortion of our models: real .rec files (actual curve) plus the coder-free ideal curves.

    python -m scripts.eval_rd --data ../shared/data/kodak --model weights/pln-b4-1234abcd.pt \\
        --coder fast -o results/kodak/pln.json
    python -m scripts.eval_rd --data DIR --model M1 M2 M3 --rec-dir /tmp/recs --per-image -o OUT.json
    python -m scripts.eval_rd --data DIR --model M --coder thesis --coder-set level2.oversample_bits=1
    python -m scripts.eval_rd --data DIR --model NEW --add-to OUT.json -o OUT.json   # one more point
    python -m scripts.eval_rd --data DIR --model weights/pln-vbr-….pt --quality 1 3 5 8 -o vbr.json

Each --model (a model file, or a name / SHA-256 prefix looked up as rec-codec does: in
$REC_MODEL_DIR, then weights/) is one RD point of ONE curve (CompressAI's schema, points sorted
by bpp; see scripts/rd_common.py); a variable-rate model gives one point per --quality (default: all
of them) or per --beta, named `<model>-q<N>` or `<model>-b<β>`. For every image:

  actual   codec.api.compress_image -> bytes written to a .rec file -> read back ->
           codec.api.decompress with a model resolved from the header's hash. bpp = file size
           (header included) * 8 / (H W); PSNR / MS-SSIM of the DECODED 8-bit image; encode time =
           compress + write, decode time = read + decompress. The decoded image must equal the
           encoder's predicted reconstruction: a mismatch is reported on stderr, recorded in
           meta["decode_mismatches"] and makes the exit status 1.
  ideal    one exact pass through the model (no coder), seeded with --seed: z2 ~ q(z2|x) exactly,
           then p(z1|z2), q(z1|x,z2) from that z2 and z1 ~ q exactly. KL = sum over levels of the
           analytic Gaussian KL (padded latents included, as the coder codes them). Curves, in
           `ideal_curves`: rate KL with the sample's distortion; rate (KL + 2 ln(KL+1)) / ln 2 bits
           (the thesis's bound, KL in nats for the whole image) with the sample's distortion; rate
           KL with the distortion of the posterior mean (z2 = mean, z1 = mean of q(z1|x, mean z2)).

--add-to FILE adds the new models' points to a curve written earlier by this script with
--per-image: its models are not run again (the coder and the ideal pass are deterministic), and it
must match this run's images, coder, coder settings, seed, device and threads.

The document goes to stdout and, with -o, to a file; progress (tqdm) and messages to stderr.
Exit codes: 0 ok, 1 a decoded image differed from the prediction, 2 bad input (missing data
folder, no images, unknown model, CUDA not available).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from codec import api
from codec.params import PRESETS
from codec.store import ModelNotFoundError, ModelRef, ModelStore, find_model
from codec.bitstream import write_atomic
from codec.image import to_tensor, to_uint8
from codec.params import CoderParams
from codec.rate import QUALITY_LEVELS
from models import LatentVariableModel, gaussian_kl, load_model
from scripts.rd_common import IMAGE_EXTS, dumps, find_images, image_metrics, load_rgb, make_results, mean, write_results

LN2 = math.log(2.0)
DISTORTION_KEYS = ("psnr-rgb", "ms-ssim-rgb")
ACTUAL_KEYS = ("bpp", *DISTORTION_KEYS, "encoding_time", "decoding_time", "kl-bpp")
IDEAL = {  # key -> (curve name suffix, rate key, distortion source)
    "kl-sample": ("ideal (KL, posterior sample)", "kl", "sample"),
    "bound-sample": ("ideal (KL + 2 ln(KL+1), posterior sample)", "bound", "sample"),
    "kl-mean": ("ideal (KL, posterior mean)", "kl", "mean"),
}


class UsageError(Exception):
    """Bad input the user can fix: one stderr line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage + message
        raise UsageError(message)


# ---- one image -------------------------------------------------------------------------------------


@torch.inference_mode()
def ideal_pass(
    model: LatentVariableModel, img: np.ndarray, seed: int, device: torch.device, beta: float | None = None
) -> dict:
    """Coder-free pass: KL (nats, all levels) with an exact posterior sample, and the 8-bit
    reconstructions of that sample and of the posterior mean."""
    x = to_tensor(img, device)  # (1, 3, H, W)
    height, width = x.shape[-2:]
    feats = model.bottom_up(model.pad(x), beta)
    gen = torch.Generator(device).manual_seed(seed)
    out = {}
    for mode in ("sample", "mean"):
        kl = []

        def draw(level: int, p_loc: torch.Tensor, p_scale: torch.Tensor) -> torch.Tensor:
            q_loc, q_scale = model.posterior(level, feats, p_loc, p_scale)
            kl.append(float(gaussian_kl(q_loc, q_scale, p_loc, p_scale).double().sum()))
            if mode == "sample":
                return q_loc + q_scale * torch.randn(q_loc.shape, generator=gen, device=device)
            return q_loc

        z = model.top_down(height, width, draw, beta)
        out[mode] = to_uint8(model.synthesize(z, beta)[..., :height, :width])
        out[f"kl_{mode}"] = sum(kl)
    return out


def eval_image(
    model, ref: ModelRef, store: ModelStore, img: np.ndarray, rec_path: Path, args, beta: float | None = None
) -> tuple[dict, dict, dict]:
    """Returns (actual metrics, ideal metrics per IDEAL key, mismatch info)."""
    pixels = img.shape[0] * img.shape[1]
    t0 = time.perf_counter()
    data, predicted, stats = api.compress_image(
        model, img, model_ref=ref, seed=args.seed, params=args.params, device=args.device, beta=beta
    )
    write_atomic(rec_path, data)
    t1 = time.perf_counter()
    decoded, _ = api.decompress(rec_path.read_bytes(), store, device=args.device)
    t2 = time.perf_counter()
    size = rec_path.stat().st_size
    actual = {
        "bpp": 8.0 * size / pixels,
        **image_metrics(img, decoded),
        "encoding_time": t1 - t0,
        "decoding_time": t2 - t1,
        "kl-bpp": stats["kl_bpp"],
    }
    diff = np.abs(decoded.astype(np.int16) - predicted.astype(np.int16))
    mismatch = {"samples": int((diff != 0).sum()), "max_abs_diff": int(diff.max()) if diff.size else 0}

    ideal = ideal_pass(model, img, args.seed, torch.device(args.device), beta)
    kl = ideal["kl_sample"]
    rates = {"kl": kl / LN2 / pixels, "bound": (kl + 2.0 * math.log(kl + 1.0)) / LN2 / pixels}
    dist = {m: image_metrics(img, ideal[m]) for m in ("sample", "mean")}
    ideal_rows = {key: {"bpp": rates[rate], **dist[src]} for key, (_, rate, src) in IDEAL.items()}
    return actual, ideal_rows, mismatch


# ---- the run -----------------------------------------------------------------------------------------


def resolve_models(names: list[str], device: str) -> list[tuple[Path, LatentVariableModel, dict]]:
    """(file, model, file info) per --model, found as rec-codec finds them; UsageError if not."""
    found = []
    for name in names:
        try:
            path = find_model(name)
        except ModelNotFoundError as e:
            raise UsageError(str(e)) from None
        try:
            found.append((path, *load_model(path, device)))
        except Exception as e:  # torch/pickle raise many types for a bad file
            raise UsageError(f"cannot load model file {path}: {str(e).splitlines()[0][:200]}") from None
    return found


def load_images(data: Path, limit: int | None) -> tuple[dict[str, np.ndarray], int]:
    if not data.is_dir():
        raise UsageError(f"data folder not found: {data}")
    paths = find_images(data)
    if not paths:
        raise UsageError(f"no images found under {data} (looked for {' '.join(IMAGE_EXTS)})")
    images = {}
    for p in paths[:limit]:
        try:
            images[p.relative_to(data).as_posix()] = load_rgb(p)
        except OSError as e:
            raise UsageError(f"cannot read image {p}: {e}") from None
    big = [n for n, im in images.items() if im.shape[0] * im.shape[1] > api.MAX_PIXELS]
    if big:
        raise UsageError(f"{big[0]}: more than {api.MAX_PIXELS} pixels")
    return images, len(paths)


def rate_points(model: LatentVariableModel, ref: ModelRef, args) -> list[tuple[str, float | None]]:
    """(point name, β on the header's grid, as the decoder sees it) per RD point of a model: one for a
    fixed-β model, one per --quality / --beta for a variable-rate one."""
    if not model.variable_rate:
        return [(ref.name, None)]
    if args.beta:
        settings = [(f"{ref.name}-b{b:g}", {"beta": b}) for b in args.beta]
    else:
        settings = [(f"{ref.name}-q{q}", {"quality": q}) for q in args.quality]
    try:
        return [(name, api.coding_beta(model, **setting)[0]) for name, setting in settings]
    except ValueError as e:
        raise UsageError(f"{ref.name}: {e}") from None


def eval_model(
    path: Path,
    model: LatentVariableModel,
    info: dict,
    images: dict[str, np.ndarray],
    rec_dir: Path,
    args,
    point: tuple[str, float | None] | None = None,
) -> dict:
    """All images through one model (at one β for a variable-rate model): per-image rows for the actual
    and ideal curves."""
    ref = ModelRef.of_file(path)
    name, beta = point or (ref.name, None)
    store = ModelStore(args.device, model_path=path)  # the decoder loads the file again, checks the hash
    actual = {k: {} for k in ACTUAL_KEYS}
    ideal = {key: {k: {} for k in ("bpp", *DISTORTION_KEYS)} for key in IDEAL}
    mismatches = []
    bar = tqdm(images.items(), desc=name, unit="img", file=sys.stderr, disable=args.no_progress)
    for image, img in bar:
        rec_path = rec_dir / name / Path(image).with_suffix(".rec")
        rec_path.parent.mkdir(parents=True, exist_ok=True)
        row, ideal_rows, mismatch = eval_image(model, ref, store, img, rec_path, args, beta)
        for k in ACTUAL_KEYS:
            actual[k][image] = row[k]
        for key, r in ideal_rows.items():
            for k in r:
                ideal[key][k][image] = r[k]
        if mismatch["samples"]:
            tqdm.write(
                f"error: {name}: {image}: the DECODED image differs from the encoder's prediction in "
                f"{mismatch['samples']} of {img.size} samples (max |diff| {mismatch['max_abs_diff']})",
                file=sys.stderr,
            )
            mismatches.append({"model": name, "image": image, **mismatch})
        bar.set_postfix(bpp=f"{row['bpp']:.3f}", psnr=f"{row['psnr-rgb']:.2f}")
    return {
        "name": name,
        "path": str(path),
        "sha256": ref.sha256.hex(),
        "beta": beta,
        "arch": info.get("arch"),
        "config": info.get("config"),
        "model_meta": info.get("meta", {}),
        "actual": actual,
        "ideal": ideal,
        "mismatches": mismatches,
    }


def _curve(rows: dict[str, dict[str, float]], order: list[int], per_model: list) -> tuple[dict, dict]:
    """(results, per_image) from per-model {key: {image: value}} dicts, points in `order`."""
    results = {k: [mean(list(per_model[i][k].values())) for i in order] for k in rows}
    images = list(next(iter(rows.values())))
    per_image = {img: {k: [per_model[i][k][img] for i in order] for k in rows} for img in images}
    return results, per_image


def default_name(names: list[str], coder: str) -> str:
    """The models' common name, cut at a whole `-`/`_`/`.` token: pln-cpu-b4-…, pln-cpu-b1.5-… -> pln-cpu."""
    prefix = os.path.commonprefix(names)
    if any(n[len(prefix) :][:1] not in ("", "-", "_", ".") for n in names):  # it ends mid-token
        prefix = prefix[: max(map(prefix.rfind, "-_.")) + 1]  # back to the last separator ('' if none)
    return f"{prefix.rstrip('-_.') or ' + '.join(names)} (REC {coder})"


def build_doc(evals: list[dict], images: dict, n_available: int, args, wall_s: float) -> dict:
    order = sorted(
        range(len(evals)),  # by rate; by name on a tie, whatever order the models ran in
        key=lambda i: (mean(list(evals[i]["actual"]["bpp"].values())), evals[i]["name"]),
    )
    name = args.name or default_name([e["name"] for e in evals], args.coder_label)
    results, per_image = _curve(evals[0]["actual"], order, [e["actual"] for e in evals])
    ideal_curves = []
    for key, (suffix, rate, src) in IDEAL.items():
        r, p = _curve(evals[0]["ideal"][key], order, [e["ideal"][key] for e in evals])
        rate_text = "KL bits" if rate == "kl" else "(KL + 2 ln(KL+1)) / ln 2 bits, KL in nats per image"
        curve = {
            "name": f"{name} {suffix}",
            "kind": "ideal",
            "description": f"rate = {rate_text} / (H W); distortion of the posterior {src} "
            f"(exact, no coder; z2 ~ q exactly, seed {args.seed})",
            "results": r,
        }
        if args.per_image:
            curve["per_image"] = p
        ideal_curves.append(curve)
    mismatches = [m for e in evals for m in e["mismatches"]]
    meta = {
        "source": "eval_rd",
        "models": [
            {k: evals[i].get(k) for k in ("name", "path", "sha256", "beta", "arch", "config", "model_meta")}
            for i in order
        ],  # one per RD point, in the order of the lists
        "coder": args.coder,
        "coder_overrides": args.coder_set,
        "coder_params": args.params.to_dict(),
        "seed": args.seed,
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "dataset": Path(args.data).name,
        "n_images": len(images),
        "n_images_available": n_available,
        "limit": args.limit,
        "images": list(images),
        "bpp": "size of the .rec file (header included) * 8 / (H * W), mean over images",
        "kl-bpp": "the coder's KL target (level 1 given the CODED z2), bits / (H * W)",
        "metrics": "on the DECODED 8-bit RGB image; PSNR and MS-SSIM means over images, "
        "ms-ssim-db-rgb of the mean MS-SSIM",
        "timing": "mean seconds per image; encode = compress + write, decode = read + decompress",
        "decode_mismatches": mismatches,
        "wall_s": wall_s,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    desc = (
        f"REC ({args.coder_label}) over {len(evals)} model(s), real .rec files; "
        f"{len(images)} of {n_available} images of {Path(args.data).name}"
    )
    return make_results(
        name, desc, results, meta=meta, ideal_curves=ideal_curves, per_image=per_image if args.per_image else None
    )


def earlier_evals(path: Path, images: dict, args) -> tuple[list[dict], float]:
    """The per-model rows of an earlier eval_rd document (--add-to), and its wall seconds.

    UsageError, before any model runs, if the file is not one this run can extend."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        meta, per_image = doc["meta"], doc.get("per_image")
        if meta.get("source") != "eval_rd":
            raise ValueError("not written by eval_rd.py")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"--add-to {path}: cannot read an eval_rd results file ({e})") from None
    curves = doc.get("ideal_curves", [])
    if per_image is None or len(curves) != len(IDEAL) or any("per_image" not in c for c in curves):
        raise UsageError(f"--add-to {path}: has no per-image values (written without --per-image)")
    wanted = {
        "images": list(images),
        "coder": args.coder,
        "coder_params": args.params.to_dict(),
        "seed": args.seed,
        "device": args.device,
        "torch_threads": args.threads,
    }
    for key, value in wanted.items():
        if meta.get(key) != value:
            raise UsageError(f"--add-to {path}: its {key} differs from this run's")
    evals = []
    try:
        for i, m in enumerate(meta["models"]):
            actual = {k: {img: per_image[img][k][i] for img in images} for k in ACTUAL_KEYS}
            ideal = {
                key: {k: {img: c["per_image"][img][k][i] for img in images} for k in ("bpp", *DISTORTION_KEYS)}
                for key, c in zip(IDEAL, curves)
            }
            evals.append(
                {
                    **m,
                    "actual": actual,
                    "ideal": ideal,
                    "mismatches": [x for x in meta["decode_mismatches"] if x["model"] == m["name"]],
                }
            )
        return evals, float(meta["wall_s"])
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise UsageError(f"--add-to {path}: incomplete results file (missing {e})") from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="folder of images (searched recursively)")
    p.add_argument("--model", required=True, nargs="+", metavar="M", help="model files, names or hashes")
    p.add_argument("--coder", default="thesis", choices=PRESETS, help="coder preset")
    p.add_argument(
        "--coder-set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="change preset fields, e.g. level1.steps=20 level2.decay_choices=[] level2.shard_decay=0.85 "
        "(an empty decay_choices fixes the decay; see codec/params.py)",
    )
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--seed", type=int, default=0, help="file seed of the coder and seed of the ideal sample")
    p.add_argument(
        "--quality",
        type=int,
        nargs="+",
        default=list(range(1, QUALITY_LEVELS + 1)),
        metavar="N",
        help=f"variable-rate models: the quality levels to evaluate (default: 1 to {QUALITY_LEVELS})",
    )
    p.add_argument("--beta", type=float, nargs="+", metavar="B", help="variable-rate models: these β instead")
    p.add_argument("--limit", type=int, help="only the first N images (sorted by path)")
    p.add_argument("--per-image", action="store_true", help="also store per-image values")
    p.add_argument("--rec-dir", help="keep the .rec files here (REC_DIR/<model>/<image>.rec); default: a temp dir")
    p.add_argument("--name", help="curve name (default: from the model names)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar on stderr")
    p.add_argument("-o", "--output", help="write the results JSON here (also printed to stdout)")
    p.add_argument(
        "--add-to",
        metavar="FILE",
        help="add the new points to this earlier --per-image "
        "results file of the same images, coder, seed, device and threads (implies --per-image)",
    )
    args = p.parse_args(argv)
    args.per_image = args.per_image or bool(args.add_to)
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be >= 1, got {args.limit}")
    if not 0 <= args.seed < 1 << 64:
        raise UsageError("--seed must be in [0, 2^64)")
    if args.threads < 1:
        raise UsageError("--threads must be >= 1")
    bad = [q for q in args.quality if not 1 <= q <= QUALITY_LEVELS]
    if bad:
        raise UsageError(f"--quality {bad[0]} is outside 1 to {QUALITY_LEVELS}")
    try:
        args.params = CoderParams.preset(args.coder).with_overrides(args.coder_set)
    except ValueError as e:
        raise UsageError(f"--coder-set: {e}") from None
    args.coder_label = args.coder + (" + " + " ".join(args.coder_set) if args.coder_set else "")
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        if args.device == "cuda" and not torch.cuda.is_available():
            raise UsageError("--device cuda: CUDA is not available")
        torch.set_num_threads(args.threads)
        images, n_available = load_images(Path(args.data), args.limit)
        models = resolve_models(args.model, args.device)
        earlier, earlier_s = earlier_evals(Path(args.add_to), images, args) if args.add_to else ([], 0.0)
        points = [(m, point) for m in models for point in rate_points(m[1], ModelRef.of_file(m[0]), args)]
        held = {e["name"] for e in earlier}
        for (path, _, _), (name, _) in points:
            if name in held:
                what = f"model {path.name}" if name == path.stem else name
                raise UsageError(f"--add-to {args.add_to}: already holds {what}")
        print(
            f"[eval_rd] {len(points)} point(s) of {len(models)} model(s), {len(images)} of {n_available} images, "
            f"coder {args.coder_label}, "
            f"device {args.device}",
            file=sys.stderr,
        )
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="eval_rd_") as tmp:
            rec_dir = Path(args.rec_dir) if args.rec_dir else Path(tmp)
            evals = [eval_model(*m, images, rec_dir, args, point) for m, point in points]
        doc = build_doc(earlier + evals, images, n_available, args, earlier_s + time.perf_counter() - t0)
    except UsageError as e:
        print(f"eval_rd.py: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    except KeyboardInterrupt:
        print("eval_rd.py: interrupted", file=sys.stderr)
        return 130
    if args.output:
        write_results(args.output, doc)
        print(f"[eval_rd] wrote {args.output}", file=sys.stderr)
    print(dumps(doc))
    bad = doc["meta"]["decode_mismatches"]
    if bad:
        print(
            f"eval_rd.py: error: {len(bad)} decoded image(s) differ from the encoder's prediction "
            f"(see meta.decode_mismatches)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
