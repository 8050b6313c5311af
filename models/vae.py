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

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.g_a = analysis_body(cfg.channels)
        self.loc_head = ConvDS(cfg.channels, cfg.latents)
        self.scale_head = ConvDS(cfg.channels, cfg.latents)
        self.g_s = synthesis(cfg.latents, cfg.channels)

    def latent_shape(self, level: int, height: int, width: int) -> tuple[int, int, int]:
        ph, pw = self.pad_size(height, width)
        return self.cfg.latents, ph // 16, pw // 16

    def bottom_up(self, x: Tensor) -> dict[str, Tensor]:
        h = x
        for layer in self.g_a:
            h = layer(h)
        return {"loc1": self.loc_head(h).float(), "scale1": bounded_scale(self.scale_head(h), self.cfg)}

    def prior(self, level, z_above, shape):
        return self.standard_prior(shape, z_above)

    def posterior(self, level, feats, p_loc, p_scale):
        return feats["loc1"], feats["scale1"]
