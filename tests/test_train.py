import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train
from models import ModelConfig, build_model, elbo_loss, load_model, save_model
from training import objective, run
from training.config import TRAIN_KEYS, resolve_config
from training.data import RandomCrops

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.toml"


def run_train(*args) -> int:
    return train.main([str(TINY), "--threads=1", "--amp=none", *map(str, args)])


def test_config_precedence_defaults_then_toml_then_command_line(tmp_path):
    cfg, model_cfg, flags = resolve_config([str(TINY), "--beta=0.5", "--flips=true", "--resume"])
    assert cfg.beta == 0.5 and cfg.flips is True  # command line wins
    assert cfg.crop == 64 and model_cfg.channels == 16  # from tiny.toml
    assert cfg.kl_warmup == 10 and cfg.lr_decay_rate == 1.0  # toml, default
    assert flags == {"resume"}


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--bta=1"], "unknown config key --bta"),
        (["--beta=high"], "--beta expects a float"),
        (["--flips=maybe"], "--flips expects true or false"),
        (["--arch=gan"], "unknown arch 'gan'"),
        (["--restart"], "unknown flags"),
    ],
)
def test_bad_config_values_are_rejected_with_a_clear_message(argv, message):
    with pytest.raises(ValueError, match=message):
        resolve_config(argv)


def test_a_few_steps_on_synthetic_images_lower_the_loss(photo_dir):
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(
            arch="pln", channels=16, latents=8, level2_channels=8, level2_latents=4, likelihood="gaussian", gamma=0.1
        )
    )
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x = RandomCrops(photo_dir, 64).batch(0, 4)
    losses, psnrs = [], []
    for _ in range(30):
        terms = elbo_loss(model, x, model(x), beta=0.1, kl_weight=1.0)
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
        losses.append(terms["loss"].item())
        psnrs.append(terms["psnr"].item())
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    assert psnrs[-1] > psnrs[0] + 2.0


def test_kl_warmup_is_linear_then_flat():
    assert objective.kl_weight(0, 100) == 0 and objective.kl_weight(50, 100) == 0.5
    assert objective.kl_weight(100, 100) == 1 and objective.kl_weight(500, 100) == 1 and objective.kl_weight(3, 0) == 1


def test_resume_continues_exactly_like_an_uninterrupted_run(photo_dir, tmp_path):
    common = [f"--data_dir={photo_dir}", f"--export_dir={tmp_path / 'w'}", "--learn_gamma=true"]
    assert run_train(*common, f"--out_dir={tmp_path / 'a'}", "--steps=6") == 0
    assert run_train(*common, f"--out_dir={tmp_path / 'b'}", "--steps=3") == 0
    assert run_train(f"--out_dir={tmp_path / 'b'}", "--steps=6", "--resume") == 0
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    assert a["step"] == b["step"] == 6
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    log_a = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    log_b = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert log_a[-1]["loss"] == log_b[-1]["loss"]


def test_resume_keeps_the_checkpoints_settings_and_drops_log_records_past_it(photo_dir, tmp_path):
    run = tmp_path / "run"
    assert (
        run_train(
            f"--data_dir={photo_dir}",
            f"--out_dir={run}",
            "--kl_warmup=2",
            "--steps=3",
            "--log_every=1",
            f"--export_dir={tmp_path / 'w'}",
        )
        == 0
    )
    with open(run / "log.jsonl", "a") as log:  # a crash after step 3's checkpoint, having logged step 4
        log.write(json.dumps({"step": 4, "loss": 0.0}) + "\n")
    assert run_train(f"--out_dir={run}", "--steps=5", "--resume") == 0  # run_train passes tiny.toml again
    assert json.loads((run / "config.json").read_text())["kl_warmup"] == 2  # not tiny.toml's 10
    assert torch.load(run / "ckpt.pt", weights_only=True)["config"]["kl_warmup"] == 2
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]
    segments = torch.load(run / "ckpt.pt", weights_only=True)["provenance"]["segments"]
    assert [seg["steps"] for seg in segments] == [[0, 3], [3, 5]]
    assert json.loads((run / "log.jsonl").read_text().splitlines()[3])["loss"] != 0.0


def test_training_record_of_a_run_without_segments_reads_the_logs_clock_restarts(tmp_path):
    terms = {k: 1.0 for k in run.FINAL_TERMS}
    lines = [
        {"step": 10, "time": 6.0},
        {"step": 20, "time": 12.0},
        {"step": 30, "time": 3.0},
        {"step": 40, "time": 9.0},
        {"step": 50, "time": 99.0},
    ]  # step 50: past the checkpoint
    (tmp_path / "log.jsonl").write_text("".join(json.dumps({**r, **terms}) + "\n" for r in lines))
    record = run.training_record(str(tmp_path), 40, {})
    assert [seg["steps"] for seg in record["segments"]] == [[10, 20], [30, 40]]
    assert record["minutes"] == 0.3 and record["final_terms"]["psnr"] == 1.0


def test_finished_run_exports_a_self_describing_model_file(photo_dir, tmp_path):
    assert (
        run_train(
            f"--data_dir={photo_dir}",
            f"--out_dir={tmp_path / 'run'}",
            f"--export_dir={tmp_path / 'w'}",
            "--steps=2",
            "--tag=smoke",
        )
        == 0
    )
    (path,) = (tmp_path / "w").glob("pln-smoke-*.pt")
    blob = torch.load(path, weights_only=True)
    assert blob["config"]["channels"] == 16 and blob["meta"]["step"] == 2
    record = blob["meta"]["training"]
    assert record["steps"] == 2 and [seg["steps"] for seg in record["segments"]] == [[0, 2]]
    assert "fp32, torch" in record["segments"][0]["hardware"] and record["init"] is None
    assert set(record["final_terms"]) == set(run.FINAL_TERMS)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert blob["meta"]["train_config"] == {k: v for k, v in config.items() if k in TRAIN_KEYS}
    assert config["crop"] == 64 and config["arch"] == "pln"


def test_validation_reports_kl_psnr_on_whole_held_out_images(photo_dir, tmp_path):
    assert (
        run_train(
            f"--data_dir={photo_dir}",
            f"--val_dir={photo_dir}",
            f"--out_dir={tmp_path / 'run'}",
            f"--export_dir={tmp_path / 'w'}",
            "--steps=10",
        )
        == 0
    )
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert "val_psnr" in records[-1] and records[-1]["val_kl_bpp"] > 0


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda d: d / "missing", "data folder not found"),
        (lambda d: d, "no images"),
        (lambda d: (d / "a.png").write_bytes(b"not a png") and d, "cannot read image"),
    ],
)
def test_bad_data_folder_gives_one_clear_error(tmp_path, capsys, make, message):
    folder = tmp_path / "data"
    folder.mkdir()
    folder = make(folder)
    assert run_train(f"--data_dir={folder}", f"--out_dir={tmp_path / 'run'}") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train.py: error:") and message in err[0]


def test_an_empty_data_dir_is_an_error_not_the_current_folder(tmp_path, capsys):
    assert run_train("--data_dir=", f"--out_dir={tmp_path / 'run'}") == 2
    assert capsys.readouterr().err.strip() == (
        "train.py: error: no training data: pass --data_dir=FOLDER or set data_dir in the TOML file"
    )


def test_sigterm_finishes_the_step_saves_a_checkpoint_and_exits_143(photo_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        str(REPO / "train.py"),
        str(TINY),
        f"--data_dir={photo_dir}",
        f"--out_dir={run}",
        "--steps=1000000",
        "--log_every=1",
        "--amp=none",
        "--threads=1",
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not ((run / "log.jsonl").exists() and (run / "log.jsonl").read_text().count("\n") >= 2):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:]
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    step = torch.load(run / "ckpt.pt", weights_only=True)["step"]
    assert json.loads((run / "log.jsonl").read_text().splitlines()[-1])["step"] == step
    assert err.strip().splitlines()[-1] == (
        f"train.py: stopped by SIGTERM at step {step}; checkpoint saved to {run / 'ckpt.pt'} (continue with --resume)"
    )


def test_ddp_with_two_gloo_processes_trains_and_saves_once(photo_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    with socket.socket() as s:  # a free port, so that overlapping test runs do not collide
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={port}",
        str(REPO / "train.py"),
        str(TINY),
        f"--data_dir={photo_dir}",
        f"--out_dir={tmp_path / 'ddp'}",
        f"--export_dir={tmp_path / 'w'}",
        "--steps=3",
        "--amp=none",
        "--threads=1",
    ]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "ddp" / "ckpt.pt").exists()
    assert len(list((tmp_path / "w").glob("*.pt"))) == 1


def test_extract_patches_writes_coef_times_tiles_patches_per_image(photo_dir, tmp_path):
    from scripts.extract_patches import main as extract

    assert extract(["--src", str(photo_dir), "--out", str(tmp_path / "p"), "--crop", "40", "--coef", "3"]) == 0
    patches = sorted((tmp_path / "p").glob("*.png"))
    assert len(patches) == 4 * 3 * (96 // 40) * (112 // 40)  # 4 images of 96×112
    assert all(RandomCrops(tmp_path / "p", 32).sizes[i] == (40, 40) for i in range(3))


def test_the_previous_checkpoint_is_kept_as_a_way_back(photo_dir, tmp_path):
    common = [f"--data_dir={photo_dir}", f"--out_dir={tmp_path / 'run'}", f"--export_dir={tmp_path / 'w'}"]
    assert run_train(*common, "--steps=2") == 0
    assert run_train(f"--out_dir={tmp_path / 'run'}", "--steps=3", "--resume") == 0
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["step"] == 3
    assert torch.load(tmp_path / "run" / "ckpt_prev.pt", weights_only=True)["step"] == 2


def test_init_from_starts_a_new_run_from_another_runs_weights(photo_dir, tmp_path):
    common = [f"--data_dir={photo_dir}", f"--export_dir={tmp_path / 'w'}"]
    assert run_train(*common, f"--out_dir={tmp_path / 'base'}", "--steps=2") == 0
    base = torch.load(tmp_path / "base" / "ckpt.pt", weights_only=True)
    assert (
        run_train(
            *common,
            f"--out_dir={tmp_path / 'ft'}",
            "--steps=0",
            f"--init_from={tmp_path / 'base' / 'ckpt.pt'}",
            "--beta=1.0",
        )
        == 0
    )
    tuned = torch.load(tmp_path / "ft" / "ckpt.pt", weights_only=True)
    assert tuned["step"] == 0 and all(torch.equal(base["model"][k], tuned["model"][k]) for k in base["model"])
    assert tuned["provenance"]["init"] == {"from": str(tmp_path / "base" / "ckpt.pt"), "step": 2}
    assert run_train(*common, f"--out_dir={tmp_path / 'bad'}", f"--init_from={tmp_path / 'nope.pt'}") == 2


def test_spike_guard_flags_only_a_kl_far_above_the_recent_median():
    guard = run.SpikeGuard(3.0, window=50, warmup=20)
    assert not guard.is_spike(1e9)  # no history yet: nothing to compare with
    for kl in [100.0, 120.0, 90.0, 110.0] * 5:
        guard.accept(kl)
    assert not guard.is_spike(2.5 * 105)
    assert guard.is_spike(3.5 * 105)
    assert not run.SpikeGuard(0.0).is_spike(1e9)  # 0 turns it off


def test_skipped_batches_leave_the_weights_alone_and_are_counted_in_the_record(photo_dir, tmp_path):
    # a tiny factor flags every batch once the guard has 20 accepted ones to compare with
    assert (
        run_train(
            f"--data_dir={photo_dir}",
            f"--out_dir={tmp_path / 'run'}",
            f"--export_dir={tmp_path / 'w'}",
            "--steps=30",
            "--kl_spike=1e-9",
            "--max_bad_steps=100",
            "--log_every=1",
        )
        == 0
    )
    (path,) = (tmp_path / "w").glob("*.pt")
    record = torch.load(path, weights_only=True)["meta"]["training"]
    assert record["steps"] == 30 and record["segments"][0]["skipped"] == 10
    logged = [json.loads(line)["step"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert logged == list(range(1, 21))  # only updated steps are logged
    assert (
        run_train(
            f"--data_dir={photo_dir}",
            f"--out_dir={tmp_path / 'run20'}",
            f"--export_dir={tmp_path / 'w20'}",
            "--steps=20",
        )
        == 0
    )
    (path20,) = (tmp_path / "w20").glob("*.pt")
    weights, weights20 = (torch.load(p, weights_only=True)["state_dict"] for p in (path, path20))
    assert all(torch.equal(weights[k], weights20[k]) for k in weights20)  # the 10 skipped steps changed nothing
    # during the KL warm-up nothing counts as a spike
    assert (
        run_train(
            f"--data_dir={photo_dir}",
            f"--out_dir={tmp_path / 'warm'}",
            f"--export_dir={tmp_path / 'ww'}",
            "--steps=30",
            "--kl_warmup=30",
            "--kl_spike=1e-9",
            "--max_bad_steps=5",
        )
        == 0
    )
    (path_warm,) = (tmp_path / "ww").glob("*.pt")
    assert torch.load(path_warm, weights_only=True)["meta"]["training"]["segments"][0]["skipped"] == 0


def test_weight_average_ramps_its_decay_up_then_holds_it():
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    average = run.WeightAverage(model, decay=0.5)
    expected = torch.zeros(1, 2)
    for n in range(12):
        with torch.no_grad():
            model.weight.fill_(float(n + 1))
        average.update()
        decay = min(0.5, (1 + n) / (10 + n))  # 0.1, 0.18, ..., then 0.5 from n = 8 on
        expected = decay * expected + (1 - decay) * (n + 1)
        assert torch.allclose(average.avg["weight"], expected, rtol=1e-6)
    assert average.updates == 12 and model.weight[0, 0].item() == 12.0  # the live weights are untouched


def test_weight_average_is_checkpointed_resumed_and_exported(photo_dir, tmp_path):
    common = [f"--data_dir={photo_dir}", f"--export_dir={tmp_path / 'w'}", "--ema_decay=0.9"]
    assert run_train(*common, f"--out_dir={tmp_path / 'a'}", "--steps=6", "--tag=a") == 0
    assert run_train(*common, f"--out_dir={tmp_path / 'b'}", "--steps=3") == 0
    assert run_train(f"--out_dir={tmp_path / 'b'}", "--steps=6", "--resume") == 0
    a, b = (torch.load(tmp_path / r / "ckpt.pt", weights_only=True) for r in "ab")
    assert a["ema_updates"] == b["ema_updates"] == 6
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
    assert any(not torch.equal(a["ema"][k], a["model"][k]) for k in a["ema"])
    (path,) = (tmp_path / "w").glob("pln-a-*.pt")
    blob = torch.load(path, weights_only=True)
    assert all(torch.equal(blob["state_dict"][k], a["ema"][k]) for k in a["ema"])
    assert blob["meta"]["weights"] == "exponential moving average, decay 0.9, 6 updates"


def test_weight_average_is_kept_on_the_models_device_dtype_and_layout():
    model = torch.nn.Conv2d(2, 3, 3).to(memory_format=torch.channels_last)
    saved = {k: t.double().contiguous() for k, t in model.state_dict().items()}  # as a checkpoint might hold it
    average = run.WeightAverage(model, decay=0.9, avg=saved)
    for k, t in model.state_dict().items():
        a = average.avg[k]
        assert (a.device, a.dtype, a.stride()) == (t.device, t.dtype, t.stride()) and torch.equal(a, t)
    average.update()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_run_with_a_weight_average_resumes(photo_dir, tmp_path):
    common = [f"--data_dir={photo_dir}", f"--export_dir={tmp_path / 'w'}", "--ema_decay=0.9", "--device=cuda"]
    assert run_train(*common, f"--out_dir={tmp_path / 'b'}", "--steps=3") == 0
    assert run_train(f"--out_dir={tmp_path / 'b'}", "--steps=6", "--resume") == 0
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["ema_updates"] == 6


def test_device_training_round_runs_end_to_end_on_the_cpu(photo_dir, tmp_path):
    """scripts/device_train.sh, as a GPU call runs it, with DEVICE=cpu and a tiny variable-rate model."""
    torch.manual_seed(0)
    tiny = dict(arch="pln", channels=16, latents=8, level2_channels=8, level2_latents=4)
    init = save_model(build_model(ModelConfig(**tiny, beta_knots=3, beta_min=0.5, beta_max=8.0)), tmp_path, "v")
    env = {
        **os.environ,
        "DEVICE": "cpu",
        "CONFIG": str(TINY),
        "INIT": str(init),
        "DATA": str(photo_dir),
        "OUT": str(tmp_path / "out"),
        "RUN": str(tmp_path / "run"),
        "PYTHON": sys.executable,
        "MINUTES": "5",
    }
    result = subprocess.run(
        [
            "bash",
            str(REPO / "scripts" / "device_train.sh"),
            "--crop=64",
            "--steps=3",
            "--beta_knots=3",
            "--beta_min=0.5",
            "--beta_max=8",
            "--amp=none",
            "--threads=1",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (exported,) = (tmp_path / "out").glob("pln-vbr-*.pt")
    model, info = load_model(exported)
    assert model.variable_rate and info["meta"]["training"]["init"]["from"] == str(init)
    state = torch.load(exported, weights_only=True)["state_dict"]
    assert all(t.dtype == torch.float16 for t in state.values() if t.is_floating_point())
    assert (tmp_path / "out" / "log.jsonl").read_text().count('"step"') >= 1
