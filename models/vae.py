"""Gaussian VAE (thesis §3.2.1): one latent level with prior N(0, I).

    x ──g_a (3× conv5/2 + GDN)──► h ──┬─ loc head (conv5/2) ─────► μ  ┐
                                      └─ scale head (conv5/2, exp) ► σ ┴► q(z|x) = N(μ, σ²)
    z ──g_s (4× deconv5/2, IGDN between)──► sigmoid ──► x̂            p(z) = N(0, I)

Latents have F channels at 1/16 of the image size.

Args:
    cfg: ModelConfig with arch="vae"; uses channels (N), latents (F), likelihood and γ settings.
"""

from torch import Tensor

from .base import LatentVariableModel, bounded_scale
from .config import ModelConfig
from .layers import ConvDS, analysis_body, synthesis


class GaussianVAE(LatentVariableModel):
    num_levels = 1
    downsampling_factor = 16
    analysis_context = 32  # reach across a tile edge: loc/scale 30 px of pixels, x̂ 32 px of z
    synthesis_context = 32

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.g_a = analysis_body(cfg.channels)
        self.loc_head = ConvDS(cfg.channels, cfg.latents)
        self.scale_head = ConvDS(cfg.channels, cfg.latents)
        self.g_s = synthesis(cfg.latents, cfg.channels)
        n, f = cfg.channels, cfg.latents
        self.condition_on_beta(
            {"g_a0": n, "g_a1": n, "g_a2": n, "loc1": f, "scale1": f, "g_s0": n, "g_s1": n, "g_s2": n}
        )

    def latent_shape(self, level: int, height: int, width: int) -> tuple[int, int, int]:
        ph, pw = self.pad_size(height, width)
        return self.cfg.latents, ph // 16, pw // 16

    def bottom_up(self, x: Tensor, beta=None) -> dict[str, Tensor]:
        w = self.beta_weights(beta, x)
        h = x
        for i, layer in enumerate(self.g_a):
            h = self.film(f"g_a{i}", layer(h), w)
        return {
            "loc1": self.film("loc1", self.loc_head(h), w).float(),
            "scale1": bounded_scale(self.film("scale1", self.scale_head(h), w), self.cfg),
        }

    def prior(self, level, z_above, shape, beta=None):
        return self.standard_prior(shape, z_above)

    def posterior(self, level, feats, p_loc, p_scale):
        return feats["loc1"], feats["scale1"]
