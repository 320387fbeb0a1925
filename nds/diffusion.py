"""DDPM training objective and samplers as pure functions of a denoiser.

A denoiser is any callable `denoiser(x_t, t) -> eps_hat` with t a [B] long tensor of timesteps in
[0, T). Schedules are given as `alphas_cumprod` (ᾱ_t, length T, index t = noise level t+1 of the
DDPM paper), so the samplers stay independent of how the model or its conditioning is built.
Conditioning (ẑ_{l+1}, labels, guidance) is bound into the denoiser with a closure or
`cfg_denoiser`.
"""

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Denoiser = Callable[[Tensor, Tensor], Tensor]


def linear_schedule(timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """ᾱ_t for the DDPM linear β schedule (float64)."""
    betas = torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


def cosine_schedule(timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """ᾱ_t for the cosine schedule of Nichol & Dhariwal (2021), β clipped at max_beta (float64)."""
    steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1.0 - f[1:] / f[:-1]).clamp(max=max_beta)
    return torch.cumprod(1.0 - betas, dim=0)


SCHEDULES = {"linear": linear_schedule, "cosine": cosine_schedule}


def make_schedule(name: str, timesteps: int = 1000, **kwargs) -> Tensor:
    if name not in SCHEDULES:
        raise ValueError(f"unknown noise schedule {name!r}; known schedules: {sorted(SCHEDULES)}")
    return SCHEDULES[name](timesteps, **kwargs)


def _expand(values: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """values[t] shaped [B, 1, ..., 1] to broadcast against `like`."""
    out = values.to(like.device)[t].to(like.dtype)
    return out.reshape(-1, *([1] * (like.ndim - 1)))


def q_sample(x0: Tensor, t: Tensor, noise: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """Sample x_t ~ q(x_t | x0) = N(sqrt(ᾱ_t) x0, (1-ᾱ_t) I) with the given noise."""
    a = _expand(alphas_cumprod, t, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def diffusion_loss(
    denoiser: Denoiser, x0: Tensor, alphas_cumprod: Tensor, generator: torch.Generator | None = None
) -> Tensor:
    """ε-prediction MSE with t ~ U{0, ..., T-1} per example (the DDPM "simple" loss)."""
    t = torch.randint(0, len(alphas_cumprod), (x0.shape[0],), generator=generator, device=x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    return F.mse_loss(denoiser(q_sample(x0, t, noise, alphas_cumprod), t), noise)


def sampling_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """`steps` evenly spaced timesteps from T-1 down to 0 (both ends included)."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in [1, {num_timesteps}], got {steps}")
    return torch.linspace(num_timesteps - 1, 0, steps).round().long().tolist()


@torch.no_grad()
def ddim_sample(
    denoiser: Denoiser,
    noise: Tensor,
    alphas_cumprod: Tensor,
    steps: int,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """DDIM (Song et al. 2021) from x_T = noise; eta=0 is deterministic, eta=1 is DDPM-like."""
    ac = alphas_cumprod.double().tolist()
    ts = sampling_timesteps(len(ac), steps)
    x = noise
    for i, t in enumerate(ts):
        a_t = ac[t]
        a_prev = ac[ts[i + 1]] if i + 1 < len(ts) else 1.0
        eps = denoiser(x, torch.full((x.shape[0],), t, dtype=torch.long, device=x.device))
        x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
        x = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - sigma**2, 0.0)) * eps
        if sigma > 0:
            x = x + sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x


@torch.no_grad()
def ddpm_sample(
    denoiser: Denoiser,
    noise: Tensor,
    alphas_cumprod: Tensor,
    steps: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Ancestral sampling from the posterior q(x_prev | x_t, x0_hat) with variance β̃.

    steps=None uses all T steps; fewer steps use the respaced chain over evenly spaced timesteps.
    """
    ac = alphas_cumprod.double().tolist()
    ts = sampling_timesteps(len(ac), len(ac) if steps is None else steps)
    x = noise
    for i, t in enumerate(ts):
        a_t = ac[t]
        a_prev = ac[ts[i + 1]] if i + 1 < len(ts) else 1.0
        beta = 1 - a_t / a_prev
        eps = denoiser(x, torch.full((x.shape[0],), t, dtype=torch.long, device=x.device))
        x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        mean_x0 = math.sqrt(a_prev) * beta / (1 - a_t)
        mean_xt = math.sqrt(1 - beta) * (1 - a_prev) / (1 - a_t)
        x = mean_x0 * x0 + mean_xt * x
        var = beta * (1 - a_prev) / (1 - a_t)
        if var > 0:
            x = x + math.sqrt(var) * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x


def guided(denoiser_cond: Denoiser, denoiser_uncond: Denoiser, scale: float) -> Denoiser:
    """Classifier-free guidance: eps_u + scale * (eps_c - eps_u); scale=1 is the conditional model."""
    if scale == 1.0:
        return denoiser_cond

    def denoiser(x: Tensor, t: Tensor) -> Tensor:
        eps_u = denoiser_uncond(x, t)
        return eps_u + scale * (denoiser_cond(x, t) - eps_u)

    return denoiser


def cfg_denoiser(
    model: nn.Module, cond: Tensor | None = None, labels: Tensor | None = None, scale: float = 1.0
) -> Denoiser:
    """Bind a UViT-like `model(x, t, cond=, labels=, drop_cond=)` into a guided denoiser.

    With guidance the conditional and unconditional branches run as one forward on a doubled
    batch; scale=1 or no condition needs a single conditional pass.
    """

    def conditional(x: Tensor, t: Tensor) -> Tensor:
        keep = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        return model(x, t, cond=cond, labels=labels, drop_cond=keep)

    if scale == 1.0 or (cond is None and labels is None):
        return conditional

    def twice(v: Tensor | None) -> Tensor | None:
        return None if v is None else torch.cat([v, v])

    def denoiser(x: Tensor, t: Tensor) -> Tensor:
        b = x.shape[0]
        drop = torch.arange(2 * b, device=x.device) >= b
        eps = model(twice(x), twice(t), cond=twice(cond), labels=twice(labels), drop_cond=drop)
        eps_c, eps_u = eps.chunk(2)
        return eps_u + scale * (eps_c - eps_u)

    return denoiser
