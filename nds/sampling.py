"""Top-down nested sampling: the top level first, each level below conditioned on a
noised copy of the level above (ẑ_{l+1} = z_{l+1} + σ_{l+1}·ε), down to image space."""
from __future__ import annotations

import torch
from torch import nn

from nds.diffusion import cfg_denoiser, ddim_sample
from nds.hierarchy import add_condition_noise


@torch.no_grad()
def nested_sample(models: dict[int, nn.Module], sigmas: dict[int, float], n: int, alphas_cumprod: torch.Tensor,
                  steps: int, cfg_scale: float = 1.0, eta: float = 0.0, labels: torch.Tensor | None = None,
                  generator: torch.Generator | None = None) -> dict[int, torch.Tensor]:
    """Sample every level of an L-level chain; returns ``{level: [n, c, h, w]}``.

    ``models[l]`` is level l's denoiser (l = 1..L); ``sigmas[l]`` is σ_l for l = 2..L.
    """
    depth = max(models)
    samples: dict[int, torch.Tensor] = {}
    for level in range(depth, 0, -1):
        model = models[level]
        cond = None
        if level < depth:
            cond = add_condition_noise(samples[level + 1], sigmas[level + 1], generator=generator)
        h, w, c = model.input_shape
        noise = torch.randn((n, c, h, w), generator=generator)
        denoiser = cfg_denoiser(model, cond, labels, cfg_scale)
        samples[level] = ddim_sample(denoiser, noise, alphas_cumprod, steps, eta=eta, generator=generator)
    return samples
