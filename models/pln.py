"""Two-level probabilistic ladder network, PLN (thesis §3.2.2, Fig. 3.2; layer table in
shared/design/thesis-reference.md §1.2).

    x ─e1─e2─e3─(+ r1(e1), r2(e2) if residual)─► μx, σx              (F ch at /16, "bottom-up")
                                                  │
                               μx ─a1─a2─► μ2, σ2=sigmoid             q(z2|x) = N(μ2, σ2²), p(z2) = N(0, I)
                                                                      (G ch at /32)
    z2 ─d1(up2)─d2─► μp1, σp1=exp                                     p(z1|z2) = N(μp1, σp1²)
    q(z1|x,z2) = combine(μx, σx, μp1, σp1)   (Gaussian product rule, or the thesis's swapped weights)
    z1 ─g_s─► sigmoid ─► x̂

Level 1 is the bottom level (z1), level 2 the top (z2). All kernels are 5×5; the level-2 encoder
reads the level-1 encoder *mean*.

Args:
    cfg: ModelConfig with arch="pln"; N=channels, F=latents, M=level2_channels, G=level2_latents,
        residual, leaky_slope, combine, likelihood and γ settings.
"""

import torch
from torch import Tensor, nn

from .base import LatentVariableModel, bounded_scale
from .config import ModelConfig
from .distributions import combine_gaussians
from .layers import ConvDS, DeconvUS, analysis_body, synthesis


class LadderVAE(LatentVariableModel):
    num_levels = 2
    downsampling_factor = 32
    # reach of each network across a tile edge (tests/test_tiling.py): loc2/scale2 under 128 px of
    # pixels; the level-1 prior 96 px of z2 (a ×2 deconv and two 5×5 convs at /16); x̂ 32 px of z1
    analysis_context = 128
    prior_context = 128
    synthesis_context = 32

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        n, f, m, g, slope = cfg.channels, cfg.latents, cfg.level2_channels, cfg.level2_latents, cfg.leaky_slope
        self.g_a = analysis_body(n)
        head_in = n
        if cfg.residual:
            self.skip1 = ConvDS(n, n, kernel=7, stride=4)  # from e1 (/2) to /8
            self.skip2 = ConvDS(n, n, kernel=5, stride=2)  # from e2 (/4) to /8
            head_in = 3 * n
        self.loc_head = ConvDS(head_in, f)
        self.scale_head = ConvDS(head_in, f)
        # level-2 encoder ("h_a"), from μx
        self.h_a = nn.Sequential(ConvDS(f, m, stride=1, leaky_slope=slope), ConvDS(m, m, stride=1, leaky_slope=slope))
        self.loc2_head = ConvDS(m, g)
        self.scale2_head = ConvDS(m, g)
        # level-2 decoder ("h_s"): the level-1 prior p(z1|z2)
        self.h_s = nn.Sequential(DeconvUS(g, m, stride=2), DeconvUS(m, m, stride=1, leaky_slope=slope))
        self.prior_loc_head = DeconvUS(m, f, stride=1, leaky_slope=slope)
        self.prior_scale_head = DeconvUS(m, f, stride=1, leaky_slope=slope)
        self.g_s = synthesis(f, n)
        # the level-2 posterior scale's floor, as a Python float holding the float32 value (any device)
        self.min_scale2 = torch.tensor(cfg.log_scale_min).exp().item()
        self.condition_on_beta(
            {
                "g_a0": n,
                "g_a1": n,
                "g_a2": n,
                "loc1": f,
                "scale1": f,
                "h_a0": m,
                "h_a1": m,
                "loc2": g,
                "scale2": g,
                "h_s0": m,
                "h_s1": m,
                "prior_loc": f,
                "prior_scale": f,
                "g_s0": n,
                "g_s1": n,
                "g_s2": n,
            }
        )

    def latent_shape(self, level: int, height: int, width: int) -> tuple[int, int, int]:
        ph, pw = self.pad_size(height, width)
        if level == 1:
            return self.cfg.latents, ph // 16, pw // 16
        return self.cfg.level2_latents, ph // 32, pw // 32

    def bottom_up(self, x: Tensor, beta=None) -> dict[str, Tensor]:
        w = self.beta_weights(beta, x)
        e1 = self.film("g_a0", self.g_a[0](x), w)
        e2 = self.film("g_a1", self.g_a[1](e1), w)
        h = self.film("g_a2", self.g_a[2](e2), w)
        if self.cfg.residual:
            h = torch.cat([h, self.skip1(e1), self.skip2(e2)], dim=1)
        loc1 = self.film("loc1", self.loc_head(h), w)
        a = self.film("h_a0", self.h_a[0](loc1), w)
        a = self.film("h_a1", self.h_a[1](a), w)
        scale2 = self.film("scale2", self.scale2_head(a), w)
        return {
            "loc1": loc1.float(),
            "scale1": bounded_scale(self.film("scale1", self.scale_head(h), w), self.cfg),
            "loc2": self.film("loc2", self.loc2_head(a), w).float(),
            "scale2": torch.sigmoid(scale2.float()).clamp(min=self.min_scale2),
        }

    def prior(self, level, z_above, shape, beta=None):
        if level == 2:
            return self.standard_prior(shape, z_above)
        w = self.beta_weights(beta, z_above)
        d = self.film("h_s0", self.h_s[0](z_above), w)
        d = self.film("h_s1", self.h_s[1](d), w)
        return (
            self.film("prior_loc", self.prior_loc_head(d), w).float(),
            bounded_scale(self.film("prior_scale", self.prior_scale_head(d), w), self.cfg),
        )

    def posterior(self, level, feats, p_loc, p_scale):
        if level == 2:
            return feats["loc2"], feats["scale2"]
        return combine_gaussians(feats["loc1"], feats["scale1"], p_loc, p_scale, self.cfg.combine)
