"""ModelConfig: every architecture knob of the VAE and the PLN, with the thesis values as defaults."""

from dataclasses import asdict, dataclass, fields


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "pln"  # "pln" (two-level probabilistic ladder network) or "vae" (one level, prior N(0, I))
    channels: int = 192  # N: level-1 hidden channels
    latents: int = 128  # F: level-1 latent channels (at /16)
    level2_channels: int = 128  # M: level-2 hidden channels
    level2_latents: int = 24  # G: level-2 latent channels (at /32)
    residual: bool = False  # the thesis configs' level-1 skip convs into the latent heads (13.25 M vs 8.06 M)
    leaky_slope: float = 0.1  # thesis code; the thesis caption says 0.2
    combine: str = "product"  # level-1 posterior: "product" (Gaussian product rule) or "thesis" (swapped)
    likelihood: str = "laplace"  # "laplace" or "gaussian" (MSE-like)
    gamma: float = 1.0  # likelihood scale γ (initial value when learned)
    learn_gamma: bool = False  # γ-PLN: learn a scalar log γ
    gamma_min: float = 0.0  # γ∞: lower clamp of γ, 0 = none (the thesis code had none)
    log_scale_min: float = -9.0  # clamp of encoder log-scales, bounding any single dimension's KL
    log_scale_max: float = 4.0
    beta_knots: int = 0  # > 0: a variable-rate model conditioned on β (models/conditioning.py), 0 = one β
    beta_min: float = 0.0  # the β range a variable-rate model is trained for and accepts
    beta_max: float = 0.0

    def __post_init__(self):
        if self.arch not in ("pln", "vae"):
            raise ValueError(f"unknown arch {self.arch!r} (expected 'pln' or 'vae')")
        if self.combine not in ("product", "thesis"):
            raise ValueError(f"unknown combine rule {self.combine!r} (expected 'product' or 'thesis')")
        if self.likelihood not in ("laplace", "gaussian"):
            raise ValueError(f"unknown likelihood {self.likelihood!r} (expected 'laplace' or 'gaussian')")
        if self.beta_knots and not (self.beta_knots >= 2 and 0 < self.beta_min < self.beta_max):
            raise ValueError(
                f"a variable-rate model needs beta_knots >= 2 and 0 < beta_min < beta_max, got "
                f"{self.beta_knots} knots over [{self.beta_min}, {self.beta_max}]"
            )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**d)
