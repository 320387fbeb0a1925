"""Diffusion training objective and samplers as pure functions of a denoiser.

A denoiser is any callable `denoiser(x_t, t) -> output` with t a [B] long tensor of timesteps in
[0, T); its output is ε or v (Salimans & Ho 2022), named by `prediction`. Schedules are given as
`alphas_cumprod` (ᾱ_t, length T, index t = noise level t+1 of the DDPM paper), so the samplers
stay independent of how the model or its conditioning is built. A schedule may also be
per-element: anything with len() = T whose [t] is ᾱ_t broadcastable against x[0] (e.g. the
packed multi-resolution schedule of nds.models.nested_unet), which is how one sampler serves all the
resolutions of a Matryoshka model at once. Conditioning (ẑ_{l+1}, labels, text, guidance) is
bound into the denoiser with a closure or `cfg_denoiser`.
"""

import math
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nds.config.specs import PREDICTIONS

Denoiser = Callable[[Tensor, Tensor], Tensor]
DPM_SOLVER_VARIANTS = ("dpmsolver", "dpmsolver++")


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


def scaled_linear_schedule(timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> Tensor:
    """ᾱ_t for β linear in √β (Stable Diffusion's and U-ViT's latent-space schedule; float64)."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


SCHEDULE_FUNCTIONS = {"linear": linear_schedule, "scaled_linear": scaled_linear_schedule, "cosine": cosine_schedule}
BETA_SCHEDULES = ("linear", "scaled_linear")  # the schedules set by (beta_start, beta_end)


def shift_schedule(alphas_cumprod: Tensor, snr_scale: float) -> Tensor:
    """The schedule with SNR_t = ᾱ_t / (1 - ᾱ_t) multiplied by snr_scale at every t.

    A larger image keeps more signal at the same noise level (neighbouring pixels average the
    noise away), so MDM, following f-DM / simple diffusion, lowers the SNR of a resolution r by
    (r_base / r)^power against the base resolution: see `resolution_snr_scale`.
    """
    if snr_scale <= 0:
        raise ValueError(f"snr_scale must be positive, got {snr_scale}")
    a = alphas_cumprod.double()
    return snr_scale * a / (1 - a + snr_scale * a)


def resolution_snr_scale(resolution: int, base_resolution: int, power: float = 2.0) -> float:
    """(base / resolution)^power: the SNR factor of `resolution` relative to the unshifted base."""
    if resolution < 1 or base_resolution < 1:
        raise ValueError(f"resolutions must be positive, got {resolution} and {base_resolution}")
    return (base_resolution / resolution) ** power


def make_schedule(name: str, timesteps: int = 1000, snr_scale: float = 1.0, beta_start: float | None = None,
                  beta_end: float | None = None) -> Tensor:
    """ᾱ of a named schedule; snr_scale != 1 gives its resolution-shifted version. beta_start/beta_end
    set the β range of the schedules in BETA_SCHEDULES (None: the schedule's own default); others ignore them."""
    if name not in SCHEDULE_FUNCTIONS:
        raise ValueError(f"unknown noise schedule {name!r}; known schedules: {sorted(SCHEDULE_FUNCTIONS)}")
    betas = {k: v for k, v in dict(beta_start=beta_start, beta_end=beta_end).items() if v is not None}
    alphas = SCHEDULE_FUNCTIONS[name](timesteps, **(betas if name in BETA_SCHEDULES else {}))
    return alphas if snr_scale == 1.0 else shift_schedule(alphas, snr_scale)


def _check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; expected one of {list(PREDICTIONS)}")


def _expand(values: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """values[t] shaped [B, 1, ..., 1] to broadcast against `like`."""
    out = values.to(like.device)[t].to(like.dtype)
    return out.reshape(-1, *([1] * (like.ndim - 1)))


def q_sample(x0: Tensor, t: Tensor, noise: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """Sample x_t ~ q(x_t | x0) = N(sqrt(ᾱ_t) x0, (1-ᾱ_t) I) with the given noise."""
    a = _expand(alphas_cumprod, t, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def prediction_target(x0: Tensor, noise: Tensor, a: Tensor, prediction: str = "eps") -> Tensor:
    """What the model regresses: ε, or v = √ᾱ ε - √(1-ᾱ) x0 (a = ᾱ_t broadcastable to x0)."""
    _check_prediction(prediction)
    return noise if prediction == "eps" else a.sqrt() * noise - (1 - a).sqrt() * x0


def split_prediction(out: Tensor, x_t: Tensor, a: Tensor, prediction: str = "eps") -> tuple[Tensor, Tensor]:
    """(x0_hat, eps_hat) from a model output; a = ᾱ_t broadcastable to x_t."""
    _check_prediction(prediction)
    if prediction == "eps":
        return (x_t - (1 - a).sqrt() * out) / a.sqrt(), out
    return a.sqrt() * x_t - (1 - a).sqrt() * out, (1 - a).sqrt() * x_t + a.sqrt() * out


def dynamic_threshold(x0: Tensor, percentile: float = 0.995) -> Tensor:
    """Imagen's dynamic thresholding: clip each sample's x0 to its `percentile` of |x0| (at least
    1) and rescale into [-1, 1], so strong guidance does not push pixels into saturation."""
    if not 0.0 < percentile <= 1.0:
        raise ValueError(f"threshold percentile must be in (0, 1], got {percentile}")
    s = torch.quantile(x0.flatten(1).abs().float(), percentile, dim=1).clamp(min=1.0).to(x0.dtype)
    s = s.reshape(-1, *([1] * (x0.ndim - 1)))
    return x0.clamp(-s, s) / s


def draw_normal(shape: tuple[int, ...] | torch.Size, like: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """N(0, 1) draws with ``like``'s dtype on its device, drawn on the generator's own device (a CPU
    generator keyed by step and rank gives the same draws whatever device trains)."""
    device = like.device if generator is None else generator.device
    return torch.randn(shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


def draw_timesteps(n: int, timesteps: int, like: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """t ~ U{0, ..., timesteps-1}, n of them, on ``like``'s device (drawn as in :func:`draw_normal`)."""
    device = like.device if generator is None else generator.device
    return torch.randint(0, timesteps, (n,), generator=generator, device=device).to(like.device)


def diffusion_loss(
    denoiser: Denoiser,
    x0: Tensor,
    alphas_cumprod: Tensor,
    generator: torch.Generator | None = None,
    prediction: str = "eps",
) -> Tensor:
    """MSE on the ε (DDPM "simple" loss) or v target with t ~ U{0, ..., T-1} per example."""
    t = draw_timesteps(x0.shape[0], len(alphas_cumprod), x0, generator)
    noise = draw_normal(x0.shape, x0, generator)
    target = prediction_target(x0, noise, _expand(alphas_cumprod, t, x0), prediction)
    return F.mse_loss(denoiser(q_sample(x0, t, noise, alphas_cumprod), t), target)


def sampling_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """`steps` evenly spaced timesteps from T-1 down to 0 (both ends included)."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in [1, {num_timesteps}], got {steps}")
    return torch.linspace(num_timesteps - 1, 0, steps).round().long().tolist()


def _alpha(alphas_cumprod: Any, t: int | None, x: Tensor) -> Tensor:
    """ᾱ_t as float64 on x's device (0-d or per-element); t=None is the clean end, ᾱ = 1."""
    a = torch.as_tensor(alphas_cumprod[0 if t is None else t], dtype=torch.float64, device=x.device)
    return torch.ones_like(a) if t is None else a


def _denoise(
    denoiser: Denoiser, x: Tensor, t: int, a: Tensor, prediction: str, threshold: float | None
) -> tuple[Tensor, Tensor]:
    """(x0_hat, eps_hat) at timestep t; with thresholding ε is re-derived from the clipped x0."""
    out = denoiser(x, torch.full((x.shape[0],), t, dtype=torch.long, device=x.device))
    a = a.to(x.dtype)
    x0, eps = split_prediction(out, x, a, prediction)
    if threshold is not None:
        x0 = dynamic_threshold(x0, threshold)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
    return x0, eps


@torch.no_grad()
def ddim_sample(
    denoiser: Denoiser,
    noise: Tensor,
    alphas_cumprod: Tensor,
    steps: int,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    prediction: str = "eps",
    threshold: float | None = None,
) -> Tensor:
    """DDIM (Song et al. 2021) from x_T = noise; eta=0 is deterministic, eta=1 is DDPM-like."""
    _check_prediction(prediction)
    ts = sampling_timesteps(len(alphas_cumprod), steps)
    x = noise
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else None
        a_t, a_prev = _alpha(alphas_cumprod, t, x), _alpha(alphas_cumprod, t_prev, x)
        x0, eps = _denoise(denoiser, x, t, a_t, prediction, threshold)
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
        dx = (1 - a_prev - sigma**2).clamp(min=0).sqrt()
        x = a_prev.sqrt().to(x.dtype) * x0 + dx.to(x.dtype) * eps
        if eta > 0 and t_prev is not None:
            x = x + sigma.to(x.dtype) * draw_normal(x.shape, x, generator)
    return x


@torch.no_grad()
def ddpm_sample(
    denoiser: Denoiser,
    noise: Tensor,
    alphas_cumprod: Tensor,
    steps: int | None = None,
    generator: torch.Generator | None = None,
    prediction: str = "eps",
    threshold: float | None = None,
) -> Tensor:
    """Ancestral sampling from the posterior q(x_prev | x_t, x0_hat) with variance β̃.

    steps=None uses all T steps; fewer steps use the respaced chain over evenly spaced timesteps.
    """
    _check_prediction(prediction)
    T = len(alphas_cumprod)
    ts = sampling_timesteps(T, T if steps is None else steps)
    x = noise
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else None
        a_t, a_prev = _alpha(alphas_cumprod, t, x), _alpha(alphas_cumprod, t_prev, x)
        beta = 1 - a_t / a_prev
        x0, _ = _denoise(denoiser, x, t, a_t, prediction, threshold)
        mean_x0 = a_prev.sqrt() * beta / (1 - a_t)
        mean_xt = (1 - beta).sqrt() * (1 - a_prev) / (1 - a_t)
        x = mean_x0.to(x.dtype) * x0 + mean_xt.to(x.dtype) * x
        if t_prev is not None:
            std = (beta * (1 - a_prev) / (1 - a_t)).sqrt().to(x.dtype)
            x = x + std * draw_normal(x.shape, x, generator)
    return x


@torch.no_grad()
def dpm_solver_sample(
    denoiser: Denoiser,
    noise: Tensor,
    alphas_cumprod: Tensor,
    steps: int,
    order: int = 2,
    variant: str = "dpmsolver++",
    prediction: str = "eps",
    threshold: float | None = None,
) -> Tensor:
    """Multistep DPM-Solver (Lu et al. 2022): exact in the linear part of the probability-flow
    ODE in λ = log(α/σ), with a 2nd-order (2M) finite difference of the model's output.

    variant "dpmsolver" extrapolates ε; "dpmsolver++" extrapolates x0, which is better behaved
    under guidance and thresholding. order=1 is DDIM(eta=0) for both. The step into t=0 is
    first-order: on a time-uniform grid it is by far the largest in λ, where extrapolating
    overshoots (the "lower order final" of the paper's code). The jump from t=0 to ᾱ = 1, where
    λ = ∞, returns x0_hat, as in DDIM.
    """
    _check_prediction(prediction)
    if order not in (1, 2):
        raise ValueError(f"DPM-Solver order must be 1 or 2, got {order}")
    if variant not in DPM_SOLVER_VARIANTS:
        raise ValueError(f"unknown DPM-Solver variant {variant!r}; expected one of {list(DPM_SOLVER_VARIANTS)}")
    data_pred = variant == "dpmsolver++"
    ts = sampling_timesteps(len(alphas_cumprod), steps)
    x, previous = noise, None  # previous: (model term, step size h) of the last step
    for i, t in enumerate(ts):
        a_t = _alpha(alphas_cumprod, t, x)
        x0, eps = _denoise(denoiser, x, t, a_t, prediction, threshold)
        if i + 1 == len(ts):
            return x0
        a_next = _alpha(alphas_cumprod, ts[i + 1], x)
        alpha, sigma, alpha_n, sigma_n = a_t.sqrt(), (1 - a_t).sqrt(), a_next.sqrt(), (1 - a_next).sqrt()
        h = torch.log(alpha_n / sigma_n) - torch.log(alpha / sigma)
        term = x0 if data_pred else eps
        d = term
        if order == 2 and previous is not None and i + 2 < len(ts):
            term_prev, h_prev = previous
            k = (h / (2 * h_prev)).to(x.dtype)  # 1/(2r) with r = h_prev / h
            d = (1 + k) * term - k * term_prev
        if data_pred:
            x = (sigma_n / sigma).to(x.dtype) * x - (alpha_n * torch.expm1(-h)).to(x.dtype) * d
        else:
            x = (alpha_n / alpha).to(x.dtype) * x - (sigma_n * torch.expm1(h)).to(x.dtype) * d
        previous = (term, h)
    return x


def fast_solver_orders(steps: int, order: int = 3) -> list[int]:
    """The order of each step of DPM-Solver-fast (Lu et al. 2022, §3.4) for `steps` model calls:
    third-order steps, with the remainder in one or two lower-order steps at the end."""
    if order == 2:
        return [2] * (steps // 2) + [1] * (steps % 2)
    if order != 3:
        raise ValueError(f"DPM-Solver-fast order must be 2 or 3, got {order}")
    k = steps // 3 + 1
    return [3] * (k - 2) + [2, 1] if steps % 3 == 0 else [3] * (k - 1) + [steps % 3]


@torch.no_grad()
def dpm_solver_fast_sample(
    denoiser: Denoiser,
    noise: Tensor,
    alphas_cumprod: Tensor,
    steps: int,
    order: int = 3,
    prediction: str = "eps",
    threshold: float | None = None,
) -> Tensor:
    """Singlestep DPM-Solver++ in its "fast" arrangement, as U-ViT samples (its DPM_Solver with
    predict_x0=True, method 'fast', order 3, time-uniform steps): `steps` model calls on a grid of
    steps + 1 timesteps from T-1 to 0; each step of order k spans k grid intervals and evaluates
    x0_hat at the k-1 grid points inside it (the third-order update of Lu et al. 2022, App. B, in
    data prediction). Like U-ViT it stops at timestep 0 and returns x there (no final denoising
    call). The grid is rounded to whole timesteps, because the denoisers here take integer t.
    """
    _check_prediction(prediction)
    T = len(alphas_cumprod)
    if not 1 <= steps < T:
        raise ValueError(f"steps must be in [1, {T - 1}], got {steps}")
    grid = torch.linspace(T - 1, 0, steps + 1).round().long().tolist()
    x, i = noise, 0

    def coefficients(t: int) -> tuple[Tensor, Tensor, Tensor]:
        a = _alpha(alphas_cumprod, t, x)
        return a.sqrt(), (1 - a).sqrt(), 0.5 * torch.log(a / (1 - a))  # α, σ, λ

    def cast(v: Tensor) -> Tensor:
        return v.to(x.dtype)

    for k in fast_solver_orders(steps, order):
        s, t = grid[i], grid[i + k]
        _, sigma_s, lam_s = coefficients(s)
        alpha_t, sigma_t, lam_t = coefficients(t)
        h = lam_t - lam_s
        d_s, _ = _denoise(denoiser, x, s, _alpha(alphas_cumprod, s, x), prediction, threshold)
        phi_1 = torch.expm1(-h)
        x_next = cast(sigma_t / sigma_s) * x - cast(alpha_t * phi_1) * d_s
        if k >= 2:
            alpha_1, sigma_1, lam_1 = coefficients(grid[i + 1])
            r1 = (lam_1 - lam_s) / h
            x_1 = cast(sigma_1 / sigma_s) * x - cast(alpha_1 * torch.expm1(-r1 * h)) * d_s
            d_1, _ = _denoise(denoiser, x_1, grid[i + 1], _alpha(alphas_cumprod, grid[i + 1], x), prediction, threshold)
            if k == 2:
                x_next = x_next - cast(0.5 / r1 * alpha_t * phi_1) * (d_1 - d_s)
            else:
                alpha_2, sigma_2, lam_2 = coefficients(grid[i + 2])
                r2 = (lam_2 - lam_s) / h
                phi_22 = torch.expm1(-r2 * h) / (r2 * h) + 1
                x_2 = (cast(sigma_2 / sigma_s) * x - cast(alpha_2 * torch.expm1(-r2 * h)) * d_s
                       + cast(r2 / r1 * alpha_2 * phi_22) * (d_1 - d_s))
                d_2, _ = _denoise(denoiser, x_2, grid[i + 2], _alpha(alphas_cumprod, grid[i + 2], x), prediction,
                                  threshold)
                x_next = x_next + cast((phi_1 / h + 1) / r2 * alpha_t) * (d_2 - d_s)
        x, i = x_next, i + k
    return x


SAMPLE_FUNCTIONS: dict[str, Callable[..., Tensor]] = {
    "ddpm": ddpm_sample,
    "ddim": ddim_sample,
    "dpm_solver": partial(dpm_solver_sample, variant="dpmsolver"),
    "dpm_solver++": partial(dpm_solver_sample, variant="dpmsolver++"),
    "dpm_solver++_fast": dpm_solver_fast_sample,
}


STOCHASTIC_SAMPLERS = ("ddpm", "ddim")  # the samplers that draw noise (DDIM only with eta > 0)


def sample(name: str, denoiser: Denoiser, noise: Tensor, alphas_cumprod: Tensor, steps: int, *,
           generator: torch.Generator | None = None, eta: float = 0.0, **kwargs) -> Tensor:
    """Run a sampler from SAMPLE_FUNCTIONS by name. ``generator`` reaches the samplers that draw noise and
    ``eta`` (DDIM's stochasticity) only DDIM; kwargs: prediction, threshold, order, ..."""
    if name not in SAMPLE_FUNCTIONS:
        raise ValueError(f"unknown sampler {name!r}; known samplers: {sorted(SAMPLE_FUNCTIONS)}")
    if eta and name != "ddim":
        raise ValueError(f"eta={eta} is a DDIM setting; sampler {name!r} does not take it")
    if name in STOCHASTIC_SAMPLERS:
        kwargs["generator"] = generator
    if name == "ddim":
        kwargs["eta"] = eta
    return SAMPLE_FUNCTIONS[name](denoiser, noise, alphas_cumprod, steps=steps, **kwargs)


def guided(denoiser_cond: Denoiser, denoiser_uncond: Denoiser, scale: float) -> Denoiser:
    """Classifier-free guidance: out_u + scale * (out_c - out_u); scale=1 is the conditional model.

    Valid for ε and v alike: both are affine in each other at fixed x_t, so guidance commutes."""
    if scale == 1.0:
        return denoiser_cond

    def denoiser(x: Tensor, t: Tensor) -> Tensor:
        eps_u = denoiser_uncond(x, t)
        return eps_u + scale * (denoiser_cond(x, t) - eps_u)

    return denoiser


def cfg_denoiser(
    model: nn.Module | Callable[..., Tensor],
    cond: Tensor | None = None,
    labels: Tensor | None = None,
    scale: float = 1.0,
    drop: bool = False,
    **conditions: Tensor | None,
) -> Denoiser:
    """Bind a UViT-like `model(x, t, cond=, labels=, ..., drop_cond=)` into a guided denoiser.

    `conditions` are further per-example inputs (e.g. text=, text_mask=); only those that are
    not None are passed. With guidance the conditional and unconditional branches run as one
    forward on a doubled batch; scale=1 or no condition needs a single conditional pass.
    ``drop=True`` gives the unconditional branch alone (the null condition, unguided).
    """
    given = {k: v for k, v in dict(cond=cond, labels=labels, **conditions).items() if v is not None}
    if drop and scale != 1.0:
        raise ValueError(f"the null condition is unguided: drop=True needs scale=1, got {scale}")

    def single(x: Tensor, t: Tensor) -> Tensor:
        mask = torch.full((x.shape[0],), drop, dtype=torch.bool, device=x.device)
        return model(x, t, **given, drop_cond=mask)

    if scale == 1.0 or not given:
        return single

    doubled = {k: torch.cat([v, v]) for k, v in given.items()}

    def denoiser(x: Tensor, t: Tensor) -> Tensor:
        b = x.shape[0]
        drop = torch.arange(2 * b, device=x.device) >= b
        out = model(torch.cat([x, x]), torch.cat([t, t]), **doubled, drop_cond=drop)
        out_c, out_u = out.chunk(2)
        return out_u + scale * (out_c - out_u)

    return denoiser
