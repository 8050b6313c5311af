"""Tests for the model-independent RD tools: rd_common, bench_codecs, plot_rd."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scripts import bench_codecs, plot_rd
from scripts.rd_common import (
    bd_psnr,
    bd_rate,
    bd_table,
    curves_of,
    load_rgb,
    make_results,
    msssim_to_db,
    psnr,
    read_results,
    write_results,
)

# A BPG-like curve (bpp, PSNR): concave, increasing.
RATE = np.array([0.07, 0.16, 0.35, 0.68, 1.20, 1.93])
DIST = np.array([26.2, 28.7, 31.6, 34.9, 38.3, 41.5])


def synthetic_images(folder, n=2, size=(176, 192)):
    """Smooth gradients plus noise; > 160 px per side so MS-SSIM is defined."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0 : size[0], 0 : size[1]]
    for i in range(n):
        img = np.stack([(x + 40 * i) % 256, (2 * y) % 256, (x + y) // 2 % 256], -1)
        img = np.clip(img + rng.integers(-12, 12, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"img{i}.png")
    return folder


def test_bd_rate_of_curve_against_itself_is_zero():
    assert bd_rate(RATE, DIST, RATE, DIST) == pytest.approx(0.0, abs=1e-9)
    assert bd_psnr(RATE, DIST, RATE, DIST) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("factor", [1.1, 0.8])
def test_bd_rate_of_scaled_rates_equals_factor_minus_one(factor):
    assert bd_rate(RATE, DIST, RATE * factor, DIST) == pytest.approx((factor - 1) * 100, abs=1e-9)
    assert bd_rate(RATE, DIST, RATE * factor, DIST, method="cubic") == pytest.approx((factor - 1) * 100, abs=1e-9)


def test_bd_psnr_of_shifted_quality_equals_shift():
    assert bd_psnr(RATE, DIST, RATE, DIST + 0.5) == pytest.approx(0.5, abs=1e-9)


def test_bd_rate_ignores_point_order_and_is_nan_without_overlap():
    perm = [3, 0, 5, 1, 4, 2]
    assert bd_rate(RATE, DIST, RATE[perm] * 1.1, DIST[perm]) == pytest.approx(10.0, abs=1e-9)
    assert math.isnan(bd_rate(RATE, DIST, RATE, DIST + 100))


def test_bd_numbers_need_more_than_a_sliver_of_overlap():
    top = DIST.max()
    touching = DIST - DIST.min() + top - 0.1  # overlaps the reference by 0.1 dB only
    assert math.isnan(bd_rate(RATE, DIST, RATE, touching))
    assert not math.isnan(bd_rate(RATE, DIST, RATE, DIST - DIST.min() + top - 0.6))
    assert math.isnan(bd_psnr(RATE, DIST, RATE / RATE.min() * RATE.max() / 1.05, DIST))  # rates overlap 5 %


def test_bd_table_includes_ideal_curves_against_reference():
    ref = {
        "name": "ref",
        "kind": "actual",
        "results": {"bpp": list(RATE), "psnr-rgb": list(DIST)},
    }
    doc = make_results(
        "ours",
        "",
        {"bpp": list(RATE * 1.2), "psnr-rgb": list(DIST)},
        ideal_curves=[
            {
                "name": "ours ideal",
                "results": {"bpp": list(RATE * 0.9), "psnr-rgb": list(DIST)},
            }
        ],
    )
    rows = bd_table(curves_of(doc), ref, metrics=("psnr",))
    assert [(r["name"], r["kind"]) for r in rows] == [
        ("ours", "actual"),
        ("ours ideal", "ideal"),
    ]
    assert rows[0]["bd_rate_psnr_pct"] == pytest.approx(20.0)
    assert rows[1]["bd_rate_psnr_pct"] == pytest.approx(-10.0)


def test_file_marked_ideal_yields_an_ideal_curve(tmp_path):
    path = tmp_path / "ours-ideal.json"
    path.write_text(
        json.dumps(
            {
                "name": "ours (KL)",
                "kind": "ideal",
                "results": {"bpp": [0.1, 0.2], "psnr-rgb": [28, 30]},
            }
        )
    )
    assert [c["kind"] for c in curves_of(read_results(path))] == ["ideal"]


def test_psnr_and_msssim_db_follow_definitions():
    a = np.zeros((4, 4, 3), np.uint8)
    b = a.copy()
    b[0, 0, 0] = 16  # MSE = 256 / 48
    assert psnr(a, b) == pytest.approx(10 * math.log10(255**2 * 48 / 256))
    assert msssim_to_db(0.99) == pytest.approx(20.0)


def test_psnr_of_an_image_larger_than_its_chunk_is_exact():
    rng = np.random.default_rng(0)
    a, b = (rng.integers(0, 256, (1500, 1000, 3), dtype=np.uint8) for _ in range(2))  # 4.5e6 samples, 2 chunks
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    assert psnr(a, b) == 10 * math.log10(255**2 / mse) and psnr(a, a) == math.inf
    with pytest.raises(ValueError, match=r"^images of different shapes"):
        psnr(a, b[:-1])


def test_load_rgb_converts_gray_and_rgba(tmp_path):
    Image.new("L", (5, 3), 7).save(tmp_path / "g.png")
    Image.new("RGBA", (5, 3), (1, 2, 3, 4)).save(tmp_path / "a.png")
    for name in ("g.png", "a.png"):
        img = load_rgb(tmp_path / name)
        assert img.shape == (3, 5, 3) and img.dtype == np.uint8


def test_anchor_with_only_msssim_db_is_read_without_double_conversion(tmp_path):
    path = tmp_path / "paper-x_ms-ssim.json"
    path.write_text(
        json.dumps(
            {
                "name": "x",
                "results": {"bpp": [0.1, 0.5], "ms-ssim-db-rgb": [10.0, 20.0]},
            }
        )
    )
    res = read_results(path)["results"]
    assert res["ms-ssim-db-rgb"] == [10.0, 20.0]
    assert res["ms-ssim-rgb"] == pytest.approx([0.9, 0.99])


def test_results_without_name_or_results_key_fall_back_like_compressai(tmp_path):
    path = tmp_path / "curve.json"
    path.write_text(json.dumps({"bpp": [0.1, 0.2], "psnr-rgb": [30.0, None]}))
    doc = read_results(path)
    assert doc["name"] == "curve" and doc["kind"] == "actual"
    assert math.isnan(doc["results"]["psnr-rgb"][1])


def test_bench_writes_compressai_schema_that_round_trips(tmp_path, capsys):
    data = synthetic_images(tmp_path / "imgs")
    out = tmp_path / "jpeg.json"
    rc = bench_codecs.main(
        [
            "--data",
            str(data),
            "--codec",
            "jpeg444",
            "--qualities",
            "10",
            "50",
            "90",
            "--per-image",
            "--no-progress",
            "-o",
            str(out),
        ]
    )
    assert rc == 0
    raw = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == raw  # stdout carries the same document
    assert {"name", "description", "meta", "results"} <= set(raw)
    res = raw["results"]
    assert set(res) == {
        "bpp",
        "psnr-rgb",
        "ms-ssim-rgb",
        "ms-ssim-db-rgb",
        "encoding_time",
        "decoding_time",
    }
    assert all(len(v) == 3 for v in res.values())
    assert res["bpp"] == sorted(res["bpp"]) and res["psnr-rgb"] == sorted(res["psnr-rgb"])
    assert 0 < res["ms-ssim-rgb"][0] < 1
    assert set(raw["per_image"]) == {"img0.png", "img1.png"}
    assert np.mean([raw["per_image"][n]["bpp"][1] for n in raw["per_image"]]) == pytest.approx(res["bpp"][1])
    assert read_results(out)["results"] == res  # JSON floats round-trip exactly
    write_results(tmp_path / "again.json", read_results(out))
    assert json.loads((tmp_path / "again.json").read_text()) == raw


def test_bench_rejects_missing_folder_with_exit_code_2(tmp_path, capsys):
    rc = bench_codecs.main(["--data", str(tmp_path / "nope"), "--codec", "jpeg"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: data folder not found") and err.count("\n") == 1


def test_bench_script_run_as_module_reports_bad_folder_without_traceback(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    cmd = [
        sys.executable,
        "-m",
        "scripts.bench_codecs",
        "--data",
        str(tmp_path / "nope"),
        "--codec",
        "jpeg",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=repo, check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("error: data folder not found")
    assert "Traceback" not in proc.stderr


def test_bench_rejects_folder_without_images_with_exit_code_2(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("no images here")
    rc = bench_codecs.main(["--data", str(tmp_path), "--codec", "webp"])
    assert rc == 2 and "no images found" in capsys.readouterr().err


def test_bench_bpg_without_binaries_points_to_anchor(tmp_path, capsys):
    data = synthetic_images(tmp_path / "imgs", n=1)
    rc = bench_codecs.main(
        [
            "--data",
            str(data),
            "--codec",
            "bpg",
            "--bpgenc",
            str(tmp_path / "no-bpgenc"),
            "--bpgdec",
            str(tmp_path / "x"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "bpg_444_x265_ycbcr.json" in err and "Traceback" not in err


def test_plot_rd_writes_png_and_bd_json_against_bpg_file(tmp_path, capsys):
    results = {
        "bpp": list(RATE),
        "psnr-rgb": list(DIST),
        "ms-ssim-rgb": list(1 - 10 ** (-(DIST - 14) / 10)),
    }
    write_results(tmp_path / "bpg.json", make_results("BPG", "", results))
    ideal = {"name": "ours ideal", "results": {**results, "bpp": list(RATE * 0.9)}}
    write_results(
        tmp_path / "ours.json",
        make_results("ours", "", {**results, "bpp": list(RATE * 1.1)}, ideal_curves=[ideal]),
    )
    png, bd = tmp_path / "rd.png", tmp_path / "bd.json"
    rc = plot_rd.main(
        [
            str(tmp_path / "ours.json"),
            str(tmp_path / "bpg.json"),
            "-o",
            str(png),
            "--metric",
            "ms-ssim",
            "--bd-json",
            str(bd),
        ]
    )
    assert rc == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = json.loads(bd.read_text())
    assert table["reference"]["name"] == "BPG"
    rates = {r["name"]: r["bd_rate_psnr_pct"] for r in table["curves"]}
    assert rates == pytest.approx({"ours": 10.0, "ours ideal": -10.0, "BPG": 0.0})
    assert json.loads(capsys.readouterr().out) == table


def test_plot_rd_shows_a_models_ideal_curve_once_when_several_coders_carry_it(tmp_path, capsys):
    results = {"bpp": list(RATE), "psnr-rgb": list(DIST)}
    write_results(tmp_path / "bpg.json", make_results("BPG", "", results))
    ideal = {"name": "ours ideal", "results": {**results, "bpp": list(RATE * 0.9)}}
    for coder, scale in (("a", 1.1), ("b", 1.2)):
        curve = {**results, "bpp": list(RATE * scale)}
        write_results(tmp_path / f"{coder}.json", make_results(coder, "", curve, ideal_curves=[ideal]))
        ideal = {**ideal, "results": {**ideal["results"], "psnr-rgb": list(DIST + 1e-6)}}  # another thread count
    other = {"name": "other ideal", "results": {**results, "bpp": list(RATE * 0.9 * (1 + 1e-5))}}
    write_results(tmp_path / "c.json", make_results("c", "", results, ideal_curves=[other]))
    files = [str(tmp_path / f) for f in ("a.json", "b.json", "c.json", "bpg.json")]
    assert plot_rd.main([*files, "-o", str(tmp_path / "rd.png")]) == 0
    names = [r["name"] for r in json.loads(capsys.readouterr().out)["curves"]]
    assert names == ["a", "ours ideal", "b", "c", "other ideal", "BPG"]


def test_plot_rd_reports_unreadable_file_with_exit_code_2(tmp_path, capsys):
    (tmp_path / "bad.json").write_text("{not json")
    rc = plot_rd.main([str(tmp_path / "bad.json"), "-o", str(tmp_path / "x.png")])
    assert rc == 2 and "cannot read results file" in capsys.readouterr().err


def test_plot_rd_bd_over_a_rate_range_uses_only_the_points_inside_it(tmp_path, capsys):
    rate = np.array([0.1, 0.2, 0.4, 0.8, 1.6])
    dist = np.array([25.0, 28.0, 31.0, 34.0, 37.0])
    write_results(tmp_path / "bpg.json", make_results("BPG", "", {"bpp": list(rate), "psnr-rgb": list(dist)}))
    # 10 % more bits below 0.5 bpp, 50 % more above: the range decides which one the table sees
    ours = np.where(rate < 0.5, rate * 1.1, rate * 1.5)
    write_results(tmp_path / "ours.json", make_results("ours", "", {"bpp": list(ours), "psnr-rgb": list(dist)}))
    argv = [str(tmp_path / "ours.json"), str(tmp_path / "bpg.json"), "-o", str(tmp_path / "rd.png")]
    assert plot_rd.main(argv + ["--bd-bpp", "0.05", "0.5"]) == 0
    table = json.loads(capsys.readouterr().out)
    rows = {r["name"]: r["bd_rate_psnr_pct"] for r in table["curves"]}
    assert rows["ours"] == pytest.approx(10.0) and table["bpp_range"] == [0.05, 0.5]
    assert plot_rd.main(argv) == 0
    rows = {r["name"]: r["bd_rate_psnr_pct"] for r in json.loads(capsys.readouterr().out)["curves"]}
    assert rows["ours"] > 15.0
