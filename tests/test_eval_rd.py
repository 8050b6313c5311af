"""scripts/eval_rd.py: tiny PLNs on two synthetic images, real .rec files, ideal curves, bad input."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from codec import api, store as model_store
from codec.params import PRESETS, CoderParams, LevelParams
from codec.store import ModelStore
from models import ModelConfig, build_model, load_model, save_model
from scripts import bench_presets, eval_rd
from scripts.rd_common import RESULT_KEYS, curves_of, load_rgb, read_results

# Few candidates per step, as in test_compress_cli.py, so a whole evaluation takes seconds.
SMALL = CoderParams(
    level1=LevelParams("greedy", 8, 4, 4095, 1.0, 24.0), level2=LevelParams("importance", 8, 1, 15, 1.0, 12.0)
)
SIZES = {"a.png": (40, 56), "sub/b.png": (33, 33)}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    d = tmp_path_factory.mktemp("weights")
    for seed in (0, 1):
        torch.manual_seed(seed)
        cfg = ModelConfig(arch="pln", channels=16, latents=8, level2_channels=8, level2_latents=4)
        save_model(build_model(cfg), d, f"tiny{seed}")
    return d


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for name, (h, w) in SIZES.items():
        y, x = np.mgrid[0:h, 0:w]
        img = np.stack([4 * x, 5 * y, 2 * (x + y)], -1) + rng.integers(-10, 10, (h, w, 3))
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(d / name)
    return d


@pytest.fixture(autouse=True)
def isolated(weights, monkeypatch):
    isolate(monkeypatch, weights)


def isolate(monkeypatch, weights):
    """Models come from the test folder only; the presets are replaced by SMALL."""
    monkeypatch.setenv("REC_MODEL_DIR", str(weights))
    monkeypatch.setattr(model_store, "REPO_WEIGHTS", weights / "no-such-folder")
    real = CoderParams.preset.__func__
    monkeypatch.setattr(
        CoderParams, "preset", classmethod(lambda cls, name: SMALL if name in PRESETS else real(cls, name))
    )


def run(capsys, *argv):
    code = eval_rd.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def model_files(weights):
    return sorted(weights.glob("pln-tiny*.pt"))


@pytest.fixture(scope="module")
def evaluated(weights, data, tmp_path_factory):
    """One evaluation of both tiny models, shared by the schema tests (the slow part)."""
    tmp = tmp_path_factory.mktemp("eval")
    with pytest.MonkeyPatch.context() as mp:
        isolate(mp, weights)
        code = eval_rd.main(
            [
                "--data",
                str(data),
                "--model",
                *map(str, model_files(weights)),
                "--coder",
                "fast",
                "--per-image",
                "--rec-dir",
                str(tmp / "recs"),
                "--no-progress",
                "-o",
                str(tmp / "out.json"),
            ]
        )
    return code, json.loads((tmp / "out.json").read_text()), tmp


def test_writes_one_curve_with_one_point_per_model(evaluated, weights):
    code, doc, _ = evaluated
    assert code == 0
    assert doc["kind"] == "actual" and doc["name"].endswith("(REC fast)")
    res = doc["results"]
    assert set(RESULT_KEYS) <= set(res) and "kl-bpp" in res
    assert all(len(v) == 2 for v in res.values())
    assert res["bpp"] == sorted(res["bpp"])
    assert sorted(m["path"] for m in doc["meta"]["models"]) == sorted(map(str, model_files(weights)))
    assert doc["meta"]["n_images"] == 2 and doc["meta"]["decode_mismatches"] == []
    assert doc["meta"]["coder_params"] == SMALL.to_dict()
    assert all(math.isfinite(x) and x > 0 for x in res["psnr-rgb"] + res["encoding_time"] + res["decoding_time"])
    assert res["ms-ssim-rgb"] == [None, None]  # images <= 160 px: MS-SSIM undefined, stored as null


def test_ideal_curves_sit_beside_the_actual_one(evaluated):
    _, doc, _ = evaluated
    ideal = {c["name"].split(" ideal ")[1]: c for c in doc["ideal_curves"]}
    assert set(ideal) == {"(KL, posterior sample)", "(KL + 2 ln(KL+1), posterior sample)", "(KL, posterior mean)"}
    for c in ideal.values():
        assert c["kind"] == "ideal" and all(len(v) == 2 for v in c["results"].values())
        assert set(c["per_image"]) == set(SIZES)
    kl = ideal["(KL, posterior sample)"]["results"]["bpp"]
    bound = ideal["(KL + 2 ln(KL+1), posterior sample)"]["results"]["bpp"]
    assert kl == ideal["(KL, posterior mean)"]["results"]["bpp"]
    for name, (h, w) in SIZES.items():  # the thesis bound, recomputed from the per-image KL
        for k_bpp, b_bpp in zip(
            ideal["(KL, posterior sample)"]["per_image"][name]["bpp"],
            ideal["(KL + 2 ln(KL+1), posterior sample)"]["per_image"][name]["bpp"],
        ):
            k = k_bpp * h * w * math.log(2)
            assert b_bpp == pytest.approx((k + 2 * math.log(k + 1)) / math.log(2) / (h * w))
    assert all(b > k > 0 for k, b in zip(kl, bound))
    assert len(curves_of(doc)) == 4


def test_bpp_is_the_size_of_the_rec_files_written(evaluated):
    _, doc, tmp = evaluated
    for i, m in enumerate(doc["meta"]["models"]):
        for name, (h, w) in SIZES.items():
            rec = tmp / "recs" / m["name"] / name.replace(".png", ".rec")
            assert doc["per_image"][name]["bpp"][i] == pytest.approx(8 * rec.stat().st_size / (h * w))
        assert doc["results"]["bpp"][i] == pytest.approx(np.mean([doc["per_image"][n]["bpp"][i] for n in SIZES]))


def test_metrics_are_those_of_the_decoded_file(evaluated, data, weights, tmp_path):
    _, doc, tmp = evaluated
    m = doc["meta"]["models"][0]
    x_hat, _ = api.decompress((tmp / "recs" / m["name"] / "a.rec").read_bytes(), ModelStore())
    psnr = eval_rd.image_metrics(load_rgb(data / "a.png"), x_hat)["psnr-rgb"]
    assert doc["per_image"]["a.png"]["psnr-rgb"][0] == pytest.approx(psnr)


def test_output_reads_back_with_rd_common(evaluated):
    _, _, tmp = evaluated
    doc = read_results(tmp / "out.json")
    assert [c["kind"] for c in curves_of(doc)] == ["actual", "ideal", "ideal", "ideal"]


def test_models_resolve_by_name_like_compress(tmp_path, capsys, data, weights):
    stem = model_files(weights)[0].stem
    code, out, err = run(
        capsys, "--data", data, "--model", stem.rsplit("-", 1)[0], "--coder", "fast", "--limit", "1", "--no-progress"
    )
    assert code == 0, err
    doc = json.loads(out)
    assert doc["meta"]["models"][0]["name"] == stem and doc["meta"]["n_images"] == 1
    assert doc["meta"]["n_images_available"] == 2 and "per_image" not in doc


def test_decode_mismatch_is_reported_loudly(tmp_path, capsys, data, weights, monkeypatch):
    real = api.decompress

    def corrupt(*a, **k):
        x_hat, header = real(*a, **k)
        x_hat = x_hat.copy()
        x_hat[0, 0, 0] ^= 1
        return x_hat, header

    monkeypatch.setattr(api, "decompress", corrupt)
    code, out, err = run(
        capsys,
        "--data",
        data,
        "--model",
        model_files(weights)[0],
        "--coder",
        "fast",
        "--limit",
        "1",
        "--no-progress",
        "-o",
        tmp_path / "o.json",
    )
    assert code == 1
    assert "differs from the encoder's prediction in 1 of" in err
    assert json.loads(out)["meta"]["decode_mismatches"] == [
        {"model": model_files(weights)[0].stem, "image": "a.png", "samples": 1, "max_abs_diff": 1}
    ]
    assert json.loads((tmp_path / "o.json").read_text())["meta"]["decode_mismatches"]


def test_ideal_pass_is_seeded_and_its_mean_kl_matches_forward(weights, data):
    model = load_model(model_files(weights)[0])[0]
    img = load_rgb(data / "a.png")
    a = eval_rd.ideal_pass(model, img, 3, torch.device("cpu"))
    b = eval_rd.ideal_pass(model, img, 3, torch.device("cpu"))
    c = eval_rd.ideal_pass(model, img, 4, torch.device("cpu"))
    assert np.array_equal(a["sample"], b["sample"]) and a["kl_sample"] == b["kl_sample"]
    assert a["kl_sample"] != c["kl_sample"]
    with torch.no_grad():
        out = model(eval_rd.to_tensor(img), sample=False)
    assert a["kl_mean"] == pytest.approx(sum(float(k.double().sum()) for k in out["kl"].values()), rel=1e-5)
    assert np.array_equal(a["mean"], eval_rd.to_uint8(out["x_hat"]))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--data", "{tmp}/nope", "--model", "{model}"], "data folder not found: "),
        (["--data", "{tmp}", "--model", "{model}"], "no images found under "),
        (["--data", "{data}", "--model", "no-such-model"], "model 'no-such-model' not found"),
        (["--data", "{data}", "--model", "{tmp}/junk.pt"], "cannot load model file "),
        (["--data", "{data}", "--model", "{model}", "--limit", "0"], "--limit must be >= 1"),
        (["--data", "{data}", "--model", "{model}", "--coder", "slow"], "invalid choice: 'slow'"),
        (["--data", "{data}"], "the following arguments are required: --model"),
        (
            ["--data", "{data}", "--model", "{model}", "--coder-set", "level2.colour=red"],
            "--coder-set: unknown coder parameter 'level2.colour'",
        ),
        (
            ["--data", "{data}", "--model", "{model}", "--coder-set", "level1.steps=many"],
            "--coder-set: level1.steps must be an integer, got 'many'",
        ),
    ],
)
def test_bad_input_is_one_stderr_line_and_exit_2(tmp_path, capsys, data, weights, argv, message):
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    fill = {"tmp": tmp_path, "data": data, "model": model_files(weights)[0]}
    code, out, err = run(capsys, *[a.format(**fill) for a in argv], "-o", tmp_path / "o.json")
    assert code == 2 and out == ""
    lines = [line for line in err.splitlines() if "FutureWarning" not in line and "warnings.warn" not in line]
    assert len(lines) == 1 and lines[0].startswith("eval_rd.py: error: ") and message in lines[0], err
    assert not (tmp_path / "o.json").exists()


def test_coder_set_changes_the_preset_and_is_recorded(tmp_path, capsys, data, weights):
    model = model_files(weights)[0]
    code, out, _ = run(
        capsys,
        "--data",
        data,
        "--model",
        model,
        "--coder",
        "fast",
        "--limit",
        "1",
        "--coder-set",
        "level1.oversample_bits=2",
        "level2.index_bits=10",
        "--no-progress",
    )
    doc = json.loads(out)
    assert code == 0 and doc["meta"]["decode_mismatches"] == []
    assert doc["meta"]["coder_overrides"] == ["level1.oversample_bits=2", "level2.index_bits=10"]
    assert doc["meta"]["coder_params"]["level1"]["oversample_bits"] == 2.0
    assert doc["meta"]["coder_params"]["level2"]["index_bits"] == 10
    assert doc["name"].endswith(" (REC fast + level1.oversample_bits=2 level2.index_bits=10)")
    _, plain, _ = run(capsys, "--data", data, "--model", model, "--coder", "fast", "--limit", "1", "--no-progress")
    assert json.loads(plain)["results"]["bpp"][0] < doc["results"]["bpp"][0]  # 2 of 8 bits a step spare


def test_add_to_gives_the_curve_of_one_run_over_all_models(evaluated, tmp_path, capsys, data, weights):
    first, second = model_files(weights)
    common = ["--data", data, "--coder", "fast", "--no-progress"]
    code, _, err = run(capsys, *common, "--model", second, "--per-image", "-o", tmp_path / "one.json")
    assert code == 0, err
    code, out, err = run(
        capsys, *common, "--model", first, "--add-to", tmp_path / "one.json", "-o", tmp_path / "one.json"
    )  # extended in place
    assert code == 0, err
    _, together, _ = evaluated
    added = json.loads((tmp_path / "one.json").read_text())
    assert added == json.loads(out)
    untimed = ("encoding_time", "decoding_time")

    def drop_times(values):
        return {k: v for k, v in values.items() if k not in untimed}

    assert drop_times(added["results"]) == drop_times(together["results"])
    assert {i: drop_times(v) for i, v in added["per_image"].items()} == {
        i: drop_times(v) for i, v in together["per_image"].items()
    }
    assert added["ideal_curves"] == together["ideal_curves"]
    assert [m["path"] for m in added["meta"]["models"]] == [m["path"] for m in together["meta"]["models"]]
    assert added["name"] == together["name"] and "over 2 model(s)" in added["description"]
    # the same model again, or a file written with other settings: refused before anything runs
    code, _, err = run(capsys, *common, "--model", first, "--add-to", tmp_path / "one.json")
    assert code == 2 and err.startswith("eval_rd.py: error: --add-to ") and "already holds model" in err
    code, _, err = run(capsys, *common, "--model", first, "--add-to", tmp_path / "one.json", "--seed", "5")
    assert code == 2 and "its seed differs from this run's" in err
    run(capsys, *common, "--model", second, "-o", tmp_path / "plain.json")
    code, _, err = run(capsys, *common, "--model", first, "--add-to", tmp_path / "plain.json")
    assert code == 2 and "has no per-image values" in err


@pytest.mark.parametrize(
    "names,expected",
    [
        (["pln-cpu-b4-2c1e6bc5", "pln-cpu-b1.5-882fd781"], "pln-cpu (REC thesis)"),
        (["pln-a1", "pln-a2"], "pln (REC thesis)"),
        (["abc", "abd"], "abc + abd (REC thesis)"),
        (["pln-x"], "pln-x (REC thesis)"),
    ],
)
def test_default_curve_name_is_the_models_common_name_cut_at_a_whole_token(names, expected):
    assert eval_rd.default_name(names, "thesis") == expected


def test_bench_presets_summarises_each_preset_against_the_exact_sample_and_plots_it(tmp_path, capsys, data):
    torch.manual_seed(2)
    cfg = ModelConfig(
        arch="pln",
        channels=16,
        latents=8,
        level2_channels=8,
        level2_latents=4,
        beta_knots=3,
        beta_min=0.5,
        beta_max=8.0,
    )
    model = save_model(build_model(cfg), tmp_path, "vbr")
    out = tmp_path / "out"
    argv = [
        "--data",
        str(data),
        "--model",
        str(model),
        "--presets",
        "fast",
        "thesis",
        "--quality",
        "1",
        "8",
        "-o",
        str(out),
    ]
    assert bench_presets.main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary) == ["fast", "thesis"]
    for preset, entry in summary.items():
        doc = json.loads((out / f"{preset}.json").read_text())
        assert entry["decode_mismatches"] == 0
        assert [r["bpp"] for r in entry["rows"]] == doc["results"]["bpp"]
        ideal = next(c for c in doc["ideal_curves"] if c["name"].endswith("ideal (KL, posterior sample)"))
        for row, ideal_psnr in zip(entry["rows"], ideal["results"]["psnr-rgb"]):
            assert row["ideal_psnr"] == ideal_psnr
            assert row["bits_per_kl"] > 1.0  # the header alone outweighs a tiny image's KL
    assert (out / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    written = (out / "fast.json").stat().st_mtime_ns
    assert bench_presets.main(argv) == 0  # a preset whose results are there is not run again
    assert (out / "fast.json").stat().st_mtime_ns == written
