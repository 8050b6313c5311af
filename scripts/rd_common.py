"""Shared RD helpers: images, metrics, CompressAI results JSON, Bjøntegaard deltas.

Used by `scripts/bench_codecs.py`, `scripts/plot_rd.py` and `scripts/eval_rd.py`.

Metrics (the definitions of CompressAI's bench/eval tools and of shared/anchors):
  - images are 8-bit RGB (other modes converted), reconstructions rounded to 8 bit;
  - PSNR over all RGB samples, 10·log10(255² / MSE), mean of per-image PSNRs;
  - MS-SSIM: `pytorch_msssim.ms_ssim(data_range=255)` on (1, 3, H, W) float tensors,
    mean over images; MS-SSIM dB = −10·log10(1 − x) of that MEAN (CompressAI's plot);
  - bpp = file bytes · 8 / (H · W), mean over images; times: mean seconds per image.

Results JSON = CompressAI's schema plus optional keys that CompressAI's tools ignore:

    {"name": str, "description": str, "meta": {...},
     "kind": "actual",            # optional: "actual" (default) or "ideal"
     "results": {                 # parallel lists, one entry per RD point
         "bpp": [..], "psnr-rgb": [..], "ms-ssim-rgb": [..], "ms-ssim-db-rgb": [..],
         "encoding_time": [..], "decoding_time": [..]},
     "ideal_curves": [            # optional: coder-free curves of the SAME model
         {"name": "pln-mse ideal (KL, posterior sample)", "kind": "ideal",
          "description": "...", "results": {"bpp": [..], "psnr-rgb": [..], ...}}],
     "per_image": {               # optional, indexed like `results`
         "kodim01.png": {"bpp": [..], "psnr-rgb": [..], ...}}}

Ideal points: top-level `results` always holds the ACTUAL curve (bpp of real files), so
CompressAI's own `plot` shows the right thing. Ideal curves of the same model (rate = KL
or its bound, distortion of a posterior sample or mean) go in `ideal_curves`, each with
`"kind": "ideal"`; a whole file may instead carry a top-level `"kind": "ideal"`.
`plot_rd.py` draws ideal curves dotted with hollow markers in the colour of their
parent and BD-rates them like any other curve. NaN/inf are written as `null` (strict
JSON) and read back as NaN.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

# Images and metrics are the codec's own, re-exported for the scripts.
from codec.bitstream import write_atomic
from codec.image import IMAGE_EXTS, find_images, load_rgb  # noqa: F401
from codec.metrics import ms_ssim, msssim_to_db, psnr  # noqa: F401

RESULT_KEYS = (
    "bpp",
    "psnr-rgb",
    "ms-ssim-rgb",
    "ms-ssim-db-rgb",
    "encoding_time",
    "decoding_time",
)
METRIC_KEYS = {
    "psnr": "psnr-rgb",
    "ms-ssim": "ms-ssim-db-rgb",
}  # what plots and BD tables use


# --------------------------------------------------------------- metrics


def db_to_msssim(db: float) -> float:
    """Inverse of msssim_to_db, for anchor files that only store ms-ssim-db-rgb."""
    if db is None or not math.isfinite(db):
        return math.nan
    return 1.0 - 10.0 ** (-db / 10.0)


def image_metrics(orig: np.ndarray, rec: np.ndarray) -> dict[str, float]:
    """Per-image distortion: {"psnr-rgb", "ms-ssim-rgb"} of an 8-bit reconstruction."""
    if orig.shape != rec.shape:
        raise ValueError(f"reconstruction shape {rec.shape} != original {orig.shape}")
    return {"psnr-rgb": psnr(orig, rec), "ms-ssim-rgb": ms_ssim(orig, rec)}


def mean(xs: list[float]) -> float:
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else math.nan


# ------------------------------------------------------------------- results JSON


def _nan(x) -> float:
    return math.nan if x is None else float(x)


def _strict(obj):
    """Replace NaN/inf floats by None so the file is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    if isinstance(obj, np.generic):
        return _strict(obj.item())
    return obj


def complete_results(results: dict) -> dict:
    """Copy of `results` with ms-ssim-rgb <-> ms-ssim-db-rgb filled in, nulls as NaN."""
    out = {k: ([_nan(x) for x in v] if isinstance(v, list) else v) for k, v in results.items()}
    if "ms-ssim-rgb" in out and "ms-ssim-db-rgb" not in out:
        out["ms-ssim-db-rgb"] = [msssim_to_db(x) for x in out["ms-ssim-rgb"]]
    elif "ms-ssim-db-rgb" in out and "ms-ssim-rgb" not in out:
        out["ms-ssim-rgb"] = [db_to_msssim(x) for x in out["ms-ssim-db-rgb"]]
    order = [k for k in RESULT_KEYS if k in out] + [k for k in out if k not in RESULT_KEYS]
    return {k: out[k] for k in order}


def make_results(
    name: str,
    description: str,
    results: dict,
    meta: dict | None = None,
    kind: str = "actual",
    ideal_curves: list[dict] | None = None,
    per_image: dict | None = None,
) -> dict:
    """Build a results document in the schema above (ms-ssim-db-rgb derived)."""
    lengths = {k: len(v) for k, v in results.items() if isinstance(v, list)}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"results lists differ in length: {lengths}")
    doc = {
        "name": name,
        "description": description,
        "meta": meta or {},
        "kind": kind,
        "results": complete_results(results),
    }
    if ideal_curves:
        doc["ideal_curves"] = [
            {
                **c,
                "kind": c.get("kind", "ideal"),
                "results": complete_results(c["results"]),
            }
            for c in ideal_curves
        ]
    if per_image is not None:
        doc["per_image"] = per_image
    return doc


def dumps(doc: dict) -> str:
    """Indented strict JSON (NaN/inf as null)."""
    return json.dumps(_strict(doc), indent=2, ensure_ascii=False)


def write_results(path: str | Path, doc: dict) -> None:
    """Write a results document as strict JSON (parent folders created)."""
    doc = {k: v for k, v in doc.items() if k != "path"}  # added by read_results
    if not doc.get("ideal_curves", True):
        del doc["ideal_curves"]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, (dumps(doc) + "\n").encode("utf-8"))  # eval_rd --add-to rewrites its input


def read_results(path: str | Path) -> dict:
    """Read any CompressAI-style results file (ours, bench, anchors, paper-*).

    Accepts files without `results` (metrics at the top level, as CompressAI's plot) and
    files with only `ms-ssim-db-rgb`; the name falls back to the file stem.
    """
    path = Path(path)
    raw = json.loads(path.read_text(encoding="utf-8"))
    results = raw.get("results", {k: v for k, v in raw.items() if isinstance(v, list)})
    if "bpp" not in results:
        raise ValueError(f"{path}: no 'bpp' list in results")
    doc = dict(raw)
    doc.update(
        name=raw.get("name") or path.stem,
        description=raw.get("description", ""),
        meta=raw.get("meta") or {},
        kind=raw.get("kind", "actual"),
        results=complete_results(results),
        path=str(path),
    )
    doc["ideal_curves"] = [
        {**c, "kind": c.get("kind", "ideal"), "results": complete_results(c["results"])}
        for c in raw.get("ideal_curves", [])
    ]
    return doc


def curves_of(doc: dict) -> list[dict]:
    """Flatten a results document into curves: {name, kind, results, parent, path}."""
    base = {
        "name": doc["name"],
        "kind": doc.get("kind", "actual"),
        "results": doc["results"],
        "parent": None,
        "path": doc.get("path"),
    }
    ideal = [
        {
            "name": c.get("name") or f"{doc['name']} (ideal)",
            "kind": c["kind"],
            "results": c["results"],
            "parent": doc["name"],
            "path": doc.get("path"),
        }
        for c in doc.get("ideal_curves", [])
    ]
    return [base, *ideal]


# ------------------------------------------------------------- Bjøntegaard deltas


def clean_points(x, y) -> tuple[np.ndarray, np.ndarray]:
    """Finite points sorted by x, duplicate x averaged (interpolants need x to rise)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    ux = np.unique(x)
    uy = np.array([y[x == v].mean() for v in ux])
    return ux, uy


def _avg_integral(x, y, lo: float, hi: float, method: str) -> float:
    """Mean of the interpolant of y(x) over [lo, hi]: 'pchip' or 'cubic' (VCEG-M33)."""
    if method == "pchip":
        from scipy.interpolate import PchipInterpolator

        return float(PchipInterpolator(x, y).integrate(lo, hi)) / (hi - lo)
    if method == "cubic":
        p = np.polyint(np.polyfit(x, y, 3))
        return float(np.polyval(p, hi) - np.polyval(p, lo)) / (hi - lo)
    raise ValueError(f"unknown BD method {method!r} (pchip|cubic)")


def _log(x) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):  # bpp <= 0 or NaN -> dropped by clean_points
        return np.log(np.asarray(x, dtype=np.float64))


# Shortest overlap a BD number is averaged over: a sliver (two curves touching at one end) gives a
# number of any size that means nothing.
MIN_OVERLAP_DB = 0.5  # BD-rate: quality interval, dB
MIN_OVERLAP_LOG_RATE = math.log(1.1)  # BD-quality: rate interval, 10 %


def _bd(x_ref, y_ref, x_test, y_test, method: str, min_overlap: float) -> tuple[float, list[float]]:
    (xr, yr), (xt, yt) = clean_points(x_ref, y_ref), clean_points(x_test, y_test)
    need = 4 if method == "cubic" else 2
    if len(xr) < need or len(xt) < need:
        return math.nan, [math.nan, math.nan]
    lo, hi = max(xr.min(), xt.min()), min(xr.max(), xt.max())
    if not hi - lo >= min_overlap:  # the curves do not overlap, or barely
        return math.nan, [float(lo), float(hi)]
    diff = _avg_integral(xt, yt, lo, hi, method) - _avg_integral(xr, yr, lo, hi, method)
    return diff, [float(lo), float(hi)]


def bd_rate(
    ref_rate,
    ref_dist,
    test_rate,
    test_dist,
    method: str = "pchip",
    return_interval: bool = False,
):
    """Bjøntegaard delta rate of `test` vs `ref` in percent (negative = fewer bits).

    log(rate) is interpolated as a function of quality (PSNR or MS-SSIM dB) by piecewise
    cubic Hermite interpolation (pchip, as the common BD-rate implementations; 'cubic' =
    the VCEG-M33 polynomial fit) and averaged over the overlapping quality interval;
    BD-rate = exp(mean log-rate difference) − 1.
    NaN when the curves overlap by less than MIN_OVERLAP_DB or have too few points.
    """
    diff, interval = _bd(ref_dist, _log(ref_rate), test_dist, _log(test_rate), method, MIN_OVERLAP_DB)
    pct = (math.exp(diff) - 1.0) * 100.0 if math.isfinite(diff) else math.nan
    return (pct, interval) if return_interval else pct


def bd_psnr(ref_rate, ref_dist, test_rate, test_dist, method: str = "pchip") -> float:
    """Bjøntegaard delta quality: dB gained at equal rate (pchip in log-rate); NaN when the rate
    ranges overlap by less than 10 %."""
    diff, _ = _bd(_log(ref_rate), ref_dist, _log(test_rate), test_dist, method, MIN_OVERLAP_LOG_RATE)
    return diff


def bd_table(curves: list[dict], reference: dict, metrics=("psnr", "ms-ssim")) -> list[dict]:
    """BD-rate and BD-quality of every curve (as from `curves_of`) against `reference`.

    One row per curve: {name, kind, path, bd_rate_<m>_pct, bd_<m>_db, <m>_interval} for
    each metric in `metrics` ('psnr': psnr-rgb, 'ms-ssim': ms-ssim-db-rgb).
    """
    rows = []
    for c in curves:
        row = {"name": c["name"], "kind": c["kind"], "path": c.get("path")}
        for m in metrics:
            key, tag = METRIC_KEYS[m], m.replace("-", "")
            ref, res = reference["results"], c["results"]
            if key not in ref or key not in res:
                row.update({f"bd_rate_{tag}_pct": math.nan, f"bd_{tag}_db": math.nan})
                continue
            pct, interval = bd_rate(ref["bpp"], ref[key], res["bpp"], res[key], return_interval=True)
            row[f"bd_rate_{tag}_pct"] = pct
            row[f"bd_{tag}_db"] = bd_psnr(ref["bpp"], ref[key], res["bpp"], res[key])
            row[f"{tag}_interval_db"] = interval
        rows.append(row)
    return rows
