"""The training configuration: TrainConfig's defaults, then TOML files, a resumed checkpoint's config and
`--key=value` arguments over them (resolve_config)."""

import tomllib
from dataclasses import asdict, dataclass, fields

from models import ModelConfig


@dataclass(frozen=True)
class TrainConfig:
    data_dir: str = ""  # folder of training photos (searched recursively); several: joined by os.pathsep (":")
    val_dir: str = ""  # optional held-out folder, validated on whole images
    out_dir: str = "runs/default"  # checkpoint, config.json and log.jsonl go here
    crop: int = 256  # random crop size
    batch_size: int = 8  # per process
    flips: bool = False  # random horizontal flips (the thesis used none)
    steps: int = 200_000
    lr: float = 3e-5  # Adam, as in the thesis
    lr_decay_rate: float = 1.0  # lr · rate^(t / lr_decay_steps); 1.0 = constant
    lr_decay_steps: int = 1500
    grad_clip: float = 0.0  # max gradient norm (of the summed-nats loss), 0 = off
    gamma_lr: float = 0.0  # learning rate of a learned log γ, 0 = lr (γ moves slowly at lr 3e-5)
    conditioning_lr: float = 0.0  # learning rate of a variable-rate model's β tables, 0 = lr (they start at
    # zero and must move by O(1) to set each rate, which takes 10k+ steps at a fine-tuning lr of 1e-4)
    beta: float = 0.1
    kl_warmup: int = 46_540  # W, steps of linear KL warm-up (thesis: 4 epochs)
    seed: int = 1337
    device: str = "cpu"  # "cpu" or "cuda"
    amp: str = "auto"  # "bf16" autocast for the networks (KL, likelihood stay fp32), "none", or "auto":
    # bf16 on CUDA and on CPUs with native bf16 (AMX / AVX512-BF16), fp32 elsewhere (emulated bf16 is ~30× slower)
    channels_last: bool = True
    threads: int = 0  # torch CPU threads, 0 = torch's default
    log_every: int = 25
    val_every: int = 2000
    val_images: int = 8
    ckpt_minutes: float = 5.0  # write a checkpoint at least this often
    max_minutes: float = 0.0  # stop (with a checkpoint) after this much wall time, 0 = no limit
    max_bad_steps: int = 20  # abort after this many consecutive skipped (non-finite or KL-spike) batches
    kl_spike: float = 3.0  # skip the update of a batch whose KL exceeds this × the recent median, 0 = off
    ema_decay: float = 0.0  # keep an exponential moving average of the weights (e.g. 0.999) and export
    # it instead of the last weights; 0 = off
    init_from: str = ""  # start from the weights of a checkpoint or model file (fine-tuning another β)
    tag: str = ""  # export tag, default: the out_dir name
    export_dir: str = "weights"
    export_dtype: str = "float32"  # "float32", "float16" or "bfloat16"


MODEL_KEYS = {f.name for f in fields(ModelConfig)}
TRAIN_KEYS = {f.name for f in fields(TrainConfig)}


def parse_value(key: str, text: str, default):
    """Parse `--key=value` against the type of the default (bools accept true/false/1/0)."""
    if isinstance(default, bool):
        if text.lower() in ("1", "true", "yes"):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise ValueError(f"--{key} expects true or false, got {text!r}")
    try:
        return type(default)(text)
    except ValueError:
        raise ValueError(f"--{key} expects a {type(default).__name__}, got {text!r}") from None


def resolve_config(argv: list[str], base: dict | None = None) -> tuple[TrainConfig, ModelConfig, set[str]]:
    """defaults < TOML files < `base` (a resumed checkpoint's config) < --key=value.

    A checkpoint's config outranks TOML files so that resuming with the command line that started a
    fine-tuned run (say the TOML plus --beta=1.5) cannot silently put the TOML's β back."""
    defaults = {**asdict(TrainConfig()), **ModelConfig().to_dict()}
    values, flags = {}, set()
    for arg in argv:
        if arg.startswith("--") and "=" in arg:
            continue
        if arg.startswith("--"):
            flags.add(arg[2:])
        else:
            with open(arg, "rb") as f:
                for key, value in tomllib.load(f).items():
                    if key not in defaults:
                        raise ValueError(f"{arg}: unknown config key {key!r}")
                    values[key] = value
    values.update(base or {})
    for arg in argv:
        if arg.startswith("--") and "=" in arg:
            key, text = arg[2:].split("=", 1)
            if key not in defaults:
                raise ValueError(f"unknown config key --{key}")
            values[key] = parse_value(key, text, defaults[key])
    for key, value in values.items():
        default = defaults[key]
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            values[key] = float(value)
        elif type(values[key]) is not type(default):
            raise ValueError(f"config key {key!r} expects {type(default).__name__}, got {value!r}")
    unknown_flags = flags - {"resume", "export"}
    if unknown_flags:
        raise ValueError(f"unknown flags: {sorted('--' + f for f in unknown_flags)}")
    train_cfg = TrainConfig(**{k: v for k, v in values.items() if k in TRAIN_KEYS})
    model_cfg = ModelConfig(**{k: v for k, v in values.items() if k in MODEL_KEYS})
    return train_cfg, model_cfg, flags
