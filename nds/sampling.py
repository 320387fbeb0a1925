"""Top-down nested sampling: the top level first, each level below conditioned on a
noised copy of the level above (ẑ_{l+1} = z_{l+1} + σ_{l+1}·ε), down to image space."""
from __future__ import annotations

import torch
from torch import nn

from nds.diffusion import Denoiser, cfg_denoiser, ddim_sample, split_prediction
from nds.hierarchy import add_condition_noise


def eps_denoiser(denoiser: Denoiser, alphas_cumprod: torch.Tensor, prediction: str = "eps",
                 clip: float | None = None) -> Denoiser:
    """The ε implied by a model that predicts ε or v; with ``clip``, the implied x0 is clipped to
    [-clip, clip] first (DDPM's clip_denoised).

    Image space has a known range, so clipping keeps an imperfect model's samples from
    saturating; standardised latent levels have no such bound and are left alone.
    """

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = alphas_cumprod.to(x)[t].reshape(-1, *([1] * (x.ndim - 1)))
        x0, eps = split_prediction(denoiser(x, t), x, a, prediction)
        if clip is None:
            return eps
        return (x - a.sqrt() * x0.clamp(-clip, clip)) / (1 - a).sqrt()

    return denoise


@torch.no_grad()
def nested_sample(models: dict[int, nn.Module], sigmas: dict[int, float], n: int, alphas_cumprod: torch.Tensor,
                  steps: int, cfg_scale: float = 1.0, eta: float = 0.0, labels: torch.Tensor | None = None,
                  clip_images: bool = True, generator: torch.Generator | None = None,
                  text: tuple[torch.Tensor, torch.Tensor] | None = None,
                  prediction: str = "eps") -> dict[int, torch.Tensor]:
    """Sample every level of an L-level chain; returns ``{level: [n, c, h, w]}``.

    ``models[l]`` is level l's denoiser (l = 1..L), predicting ``prediction`` (ε or v); ``sigmas[l]``
    is σ_l for l = 2..L.
    ``labels`` are the classes class-conditional levels get as class tokens; ``text`` is one caption
    per example (tokens [n, N, dim], mask [n, N]: :meth:`nds.text.TextBank.sample`), which conditions
    every level; guidance (``cfg_scale``) applies to all conditions at once.
    """
    depth = max(models)
    captions = dict(zip(("text", "text_mask"), text)) if text is not None else {}
    samples: dict[int, torch.Tensor] = {}
    for level in range(depth, 0, -1):
        model = models[level]
        cond = None
        if level < depth:
            cond = add_condition_noise(samples[level + 1], sigmas[level + 1], generator=generator)
        h, w, c = model.input_shape
        noise = torch.randn((n, c, h, w), generator=generator)
        denoiser = cfg_denoiser(model, cond, labels if model.num_classes else None, cfg_scale, **captions)
        denoiser = eps_denoiser(denoiser, alphas_cumprod, prediction, 1.0 if level == 1 and clip_images else None)
        samples[level] = ddim_sample(denoiser, noise, alphas_cumprod, steps, eta=eta, generator=generator)
    return samples
