import math

import pytest
import torch
from torch import Tensor, nn

from nds.config.specs import SAMPLERS
from nds.diffusion.process import (
    cfg_denoiser,
    cosine_schedule,
    ddim_sample,
    ddpm_sample,
    diffusion_loss,
    dpm_solver_fast_sample,
    dpm_solver_sample,
    dynamic_threshold,
    fast_solver_orders,
    guided,
    linear_schedule,
    make_schedule,
    prediction_target,
    q_sample,
    resolution_snr_scale,
    sample,
    sampling_timesteps,
    shift_schedule,
    split_prediction,
)

MU, S = 1.5, 0.5  # toy data distribution x0 ~ N(MU, S^2)


def optimal_denoiser(alphas_cumprod: Tensor, mu: float = MU, s: float = S):
    """E[eps | x_t] for x0 ~ N(mu, s^2): x_t = √a x0 + √(1-a) eps is jointly Gaussian with eps,
    Cov(eps, x_t) = √(1-a), Var(x_t) = a s² + 1 - a, E[x_t] = √a mu."""
    ac = alphas_cumprod.float()

    def denoiser(x: Tensor, t: Tensor) -> Tensor:
        a = ac[t].reshape(-1, *([1] * (x.ndim - 1)))
        return (x - a.sqrt() * mu) * (1 - a).sqrt() / (a * s**2 + 1 - a)

    return denoiser


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_schedules_are_decreasing_in_unit_interval(name):
    ac = make_schedule(name, 1000)
    assert ac.shape == (1000,)
    assert ((ac > 0) & (ac < 1)).all()
    assert (ac[1:] < ac[:-1]).all()
    assert ac[0] > 0.99 and ac[-1] < 0.01


def test_schedule_parameters_and_unknown_name():
    assert linear_schedule(10)[0].item() == pytest.approx(1 - 1e-4)
    assert torch.equal(make_schedule("linear", 50, beta_end=0.03), linear_schedule(50, beta_end=0.03))
    assert torch.equal(make_schedule("cosine", 50), cosine_schedule(50))
    with pytest.raises(ValueError, match="unknown noise schedule 'sigmoid'.*cosine.*linear"):
        make_schedule("sigmoid", 10)


def test_q_sample_statistics():
    ac = linear_schedule(1000)
    n = 50_000
    x0 = torch.full((n, 1, 2, 2), 2.0)
    t = torch.tensor([0, 300, 999]).repeat(n // 3 + 1)[:n]
    x_t = q_sample(x0, t, torch.randn(x0.shape, generator=torch.Generator().manual_seed(0)), ac)
    assert x_t.shape == x0.shape and x_t.dtype == torch.float32
    for step in (0, 300, 999):
        a = ac[step].item()
        sel = x_t[t == step]
        assert sel.mean().item() == pytest.approx(2.0 * math.sqrt(a), abs=0.02)
        assert sel.var().item() == pytest.approx(1 - a, rel=0.03, abs=1e-5)


def test_sampling_timesteps():
    assert sampling_timesteps(1000, 1) == [999]
    assert sampling_timesteps(10, 10) == list(range(9, -1, -1))
    ts = sampling_timesteps(1000, 50)
    assert ts[0] == 999 and ts[-1] == 0 and len(set(ts)) == 50
    gaps = [a - b for a, b in zip(ts, ts[1:])]
    assert max(gaps) - min(gaps) <= 1
    for bad in (0, 1001):
        with pytest.raises(ValueError, match="steps must be in"):
            sampling_timesteps(1000, bad)


def test_diffusion_loss_is_reproducible_and_near_optimal_for_the_optimal_denoiser():
    ac = linear_schedule(1000)
    x0 = MU + S * torch.randn(4096, 1, generator=torch.Generator().manual_seed(1))
    den = optimal_denoiser(ac)
    loss = diffusion_loss(den, x0, ac, generator=torch.Generator().manual_seed(2))
    again = diffusion_loss(den, x0, ac, generator=torch.Generator().manual_seed(2))
    assert loss.ndim == 0 and loss.item() == again.item()
    zero_denoiser = lambda x, t: torch.zeros_like(x)  # noqa: E731
    zero = diffusion_loss(zero_denoiser, x0, ac, generator=torch.Generator().manual_seed(2))
    assert loss < 0.5 * zero  # E[eps^2] = 1 is the loss of predicting zero


class ToyDenoiser(nn.Module):
    def __init__(self, dim: int, timesteps: int):
        super().__init__()
        self.timesteps = timesteps
        self.net = nn.Sequential(
            nn.Linear(dim + 1, 64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, dim)
        )

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.net(torch.cat([x, t[:, None].float() / self.timesteps], dim=1))


def test_loss_decreases_when_training_on_toy_gaussian():
    torch.manual_seed(0)
    ac = linear_schedule(100)
    data = torch.tensor([1.0, -2.0]) + 0.1 * torch.randn(512, 2)
    model = ToyDenoiser(2, len(ac))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def eval_loss() -> float:
        with torch.no_grad():
            return diffusion_loss(model, data, ac, generator=torch.Generator().manual_seed(123)).item()

    before = eval_loss()
    for _ in range(300):
        loss = diffusion_loss(model, data[torch.randint(0, len(data), (128,))], ac)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert after < 0.5 * before


# DDIM with eta=0 is a first-order ODE solver, so its std is biased low by O(1/steps) (about 5%
# at 50 steps on the linear schedule); full ancestral DDPM is unbiased up to sampling noise.
@pytest.mark.parametrize(
    "sampler, std_tol",
    [
        (lambda d, n, ac, g: ddim_sample(d, n, ac, steps=50), 0.06),
        (lambda d, n, ac, g: ddim_sample(d, n, ac, steps=250), 0.02),
        (lambda d, n, ac, g: ddim_sample(d, n, ac, steps=1000, eta=1.0, generator=g), 0.02),
        (lambda d, n, ac, g: ddpm_sample(d, n, ac, generator=g), 0.02),
    ],
    ids=["ddim50", "ddim250", "ddim1000-eta1", "ddpm"],
)
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_samplers_recover_toy_gaussian_with_optimal_denoiser(sampler, std_tol, schedule):
    ac = make_schedule(schedule, 1000)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(20_000, 1, generator=g)
    x = sampler(optimal_denoiser(ac), noise, ac, g)
    assert x.shape == noise.shape and x.dtype == torch.float32
    assert abs(x.mean().item() - MU) < 0.05 * S
    assert abs(x.std().item() / S - 1) < std_tol


def test_ddim_and_ddpm_agree_in_distribution():
    ac = linear_schedule(1000)
    g = torch.Generator().manual_seed(0)
    den = optimal_denoiser(ac)
    ddim = ddim_sample(den, torch.randn(20_000, 1, generator=g), ac, steps=50)
    ddpm = ddpm_sample(den, torch.randn(20_000, 1, generator=g), ac, generator=g)
    assert abs(ddim.mean().item() - ddpm.mean().item()) < 0.05 * S
    assert abs(ddim.std().item() / ddpm.std().item() - 1) < 0.06


def test_ddim_eta1_is_ddpm_for_any_denoiser():
    """With eta=1, DDIM's update is the DDPM posterior written differently; same noise draws."""
    torch.manual_seed(0)
    ac = linear_schedule(200, beta_end=0.05)
    den = ToyDenoiser(3, len(ac))
    noise = torch.randn(16, 3)
    for steps in (200, 20):
        a = ddim_sample(den, noise, ac, steps, eta=1.0, generator=torch.Generator().manual_seed(5))
        b = ddpm_sample(den, noise, ac, steps=steps, generator=torch.Generator().manual_seed(5))
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_samplers_are_deterministic_and_do_not_track_grad():
    ac = linear_schedule(100)
    den = ToyDenoiser(2, len(ac))
    noise = torch.randn(8, 2)
    a = ddim_sample(den, noise, ac, steps=10)
    assert not a.requires_grad
    assert torch.equal(a, ddim_sample(den, noise, ac, steps=10))
    b = ddpm_sample(den, noise, ac, generator=torch.Generator().manual_seed(0))
    assert not b.requires_grad
    assert torch.equal(b, ddpm_sample(den, noise, ac, generator=torch.Generator().manual_seed(0)))


def test_guided_combines_eps():
    x, t = torch.randn(4, 3), torch.zeros(4, dtype=torch.long)
    cond = lambda x, t: 2 * x + 1  # noqa: E731
    uncond = lambda x, t: -x  # noqa: E731
    torch.testing.assert_close(guided(cond, uncond, 1.0)(x, t), cond(x, t))
    torch.testing.assert_close(guided(cond, uncond, 0.0)(x, t), uncond(x, t))
    torch.testing.assert_close(guided(cond, uncond, 3.0)(x, t), -x + 3 * (3 * x + 1))


class RecordingModel(nn.Module):
    """Stand-in for UViT: eps depends on cond unless dropped; records each call's drop mask."""

    def __init__(self):
        super().__init__()
        self.calls: list[Tensor] = []

    def forward(self, x, t, cond=None, labels=None, drop_cond=None):
        self.calls.append(drop_cond.clone())
        c = cond.flatten(1).sum(1, keepdim=True) * (~drop_cond)[:, None]
        return x + c + labels[:, None].float()


def test_cfg_denoiser_batches_both_branches():
    model = RecordingModel()
    x, t = torch.randn(3, 2), torch.full((3,), 7)
    cond, labels = torch.randn(3, 5), torch.tensor([0, 1, 2])
    eps_c = model(x, t, cond, labels, torch.zeros(3, dtype=torch.bool))
    eps_u = model(x, t, cond, labels, torch.ones(3, dtype=torch.bool))
    model.calls.clear()

    out = cfg_denoiser(model, cond, labels, scale=4.0)(x, t)
    torch.testing.assert_close(out, eps_u + 4.0 * (eps_c - eps_u))
    assert len(model.calls) == 1
    assert model.calls[0].tolist() == [False] * 3 + [True] * 3

    model.calls.clear()
    torch.testing.assert_close(cfg_denoiser(model, cond, labels, scale=1.0)(x, t), eps_c)
    assert len(model.calls) == 1 and model.calls[0].tolist() == [False] * 3


def to_v(eps_denoiser):
    """The v-prediction model equivalent to an ε model: v = √ᾱ ε - √(1-ᾱ) x0_hat."""

    def denoiser(x: Tensor, t: Tensor, ac: Tensor) -> Tensor:
        a = ac.float()[t].reshape(-1, *([1] * (x.ndim - 1)))
        eps = eps_denoiser(x, t)
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        return a.sqrt() * eps - (1 - a).sqrt() * x0

    return denoiser


def snr(ac: Tensor) -> Tensor:
    return ac / (1 - ac)


@pytest.mark.parametrize("scale", [1 / 16, 0.25, 4.0])
def test_shifted_schedule_scales_snr_exactly(scale):
    base = cosine_schedule(1000)
    shifted = shift_schedule(base, scale)
    torch.testing.assert_close(snr(shifted), scale * snr(base), rtol=1e-9, atol=0)
    assert (shifted[1:] < shifted[:-1]).all() and ((shifted > 0) & (shifted < 1)).all()
    # Less SNR means more noise at every step for a larger image.
    assert (shifted < base).all() if scale < 1 else (shifted > base).all()
    torch.testing.assert_close(make_schedule("cosine", 1000, snr_scale=scale), shifted)
    assert torch.equal(shift_schedule(base, 1.0), base)


def test_resolution_snr_scale_and_errors():
    assert resolution_snr_scale(256, 64) == 1 / 16  # MDM: 64 -> 256 at power 2
    assert resolution_snr_scale(256, 64, power=1.0) == 0.25
    assert resolution_snr_scale(64, 64) == 1.0
    with pytest.raises(ValueError, match="snr_scale must be positive"):
        shift_schedule(linear_schedule(10), 0.0)
    with pytest.raises(ValueError, match="resolutions must be positive"):
        resolution_snr_scale(0, 64)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_prediction_target_and_split_are_inverse(prediction):
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    a = torch.tensor([0.9, 0.5, 0.1, 0.99])[:, None]
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    x0_hat, eps_hat = split_prediction(prediction_target(x0, noise, a, prediction), x_t, a, prediction)
    torch.testing.assert_close(x0_hat, x0)
    torch.testing.assert_close(eps_hat, noise)
    with pytest.raises(ValueError, match="unknown prediction 'x0'"):
        prediction_target(x0, noise, a, "x0")


def test_v_loss_trains_and_v_sampling_matches_eps_sampling():
    ac = linear_schedule(1000)
    x0 = MU + S * torch.randn(4096, 1, generator=torch.Generator().manual_seed(1))
    v_den = to_v(optimal_denoiser(ac))
    v_loss = diffusion_loss(lambda x, t: v_den(x, t, ac), x0, ac, torch.Generator().manual_seed(2), prediction="v")
    zero = diffusion_loss(lambda x, t: torch.zeros_like(x), x0, ac, torch.Generator().manual_seed(2), prediction="v")
    assert v_loss < 0.5 * zero

    noise = torch.randn(1000, 1, generator=torch.Generator().manual_seed(3))
    for name in SAMPLERS:
        kw = {"generator": torch.Generator().manual_seed(4)} if name in ("ddpm", "ddim") else {}
        a = sample(name, optimal_denoiser(ac), noise, ac, 20, **kw)
        kw = {"generator": torch.Generator().manual_seed(4)} if name in ("ddpm", "ddim") else {}
        b = sample(name, lambda x, t: v_den(x, t, ac), noise, ac, 20, prediction="v", **kw)
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_dynamic_threshold():
    x0 = torch.stack([torch.linspace(-0.5, 0.5, 1000), torch.linspace(-4.0, 4.0, 1000)])
    out = dynamic_threshold(x0, 0.9)
    torch.testing.assert_close(out[0], x0[0])  # inside [-1, 1]: s = 1, untouched
    s = torch.quantile(x0[1].abs(), 0.9)
    torch.testing.assert_close(out[1], x0[1].clamp(-s, s) / s)
    assert out[1].abs().max() == 1.0
    with pytest.raises(ValueError, match="threshold percentile"):
        dynamic_threshold(x0, 0.0)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_keeps_shape_and_threshold_bounds_samples(name):
    ac = cosine_schedule(1000)
    noise = torch.randn(64, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    kw = {"generator": torch.Generator().manual_seed(1)} if name in ("ddpm", "ddim") else {}
    x = sample(name, optimal_denoiser(ac), noise, ac, 10, **kw)
    assert x.shape == noise.shape and x.dtype == noise.dtype and torch.isfinite(x).all()
    assert x.abs().max() > 1.0  # the toy data N(1.5, 0.5²) lies mostly outside [-1, 1] ...
    bounded = sample(name, optimal_denoiser(ac), noise, ac, 10, threshold=0.995, **kw)
    # ... and thresholding the x0 predictions bounds it; DPM-Solver-fast stops at timestep 0 (as
    # U-ViT's does) instead of returning x0_hat, so its last extrapolated step may overshoot a little
    limit = 1.05 if name == "dpm_solver++_fast" else 1.0 + 1e-6
    assert bounded.abs().max() <= limit


def test_sample_rejects_unknown_sampler_and_bad_solver_options():
    ac, noise = linear_schedule(10), torch.randn(2, 1)
    with pytest.raises(ValueError, match="unknown sampler 'euler'.*ddim"):
        sample("euler", optimal_denoiser(ac), noise, ac, 5)
    with pytest.raises(ValueError, match="order must be 1 or 2"):
        dpm_solver_sample(optimal_denoiser(ac), noise, ac, 5, order=3)
    with pytest.raises(ValueError, match="unknown DPM-Solver variant"):
        dpm_solver_sample(optimal_denoiser(ac), noise, ac, 5, variant="unipc")


@pytest.mark.parametrize("variant", ["dpmsolver", "dpmsolver++"])
def test_first_order_dpm_solver_is_ddim(variant):
    torch.manual_seed(0)
    ac = linear_schedule(200, beta_end=0.05)
    den, noise = ToyDenoiser(3, len(ac)), torch.randn(16, 3)
    torch.testing.assert_close(
        dpm_solver_sample(den, noise, ac, 20, order=1, variant=variant), ddim_sample(den, noise, ac, 20),
        atol=1e-5, rtol=1e-5,
    )


# Tolerances on the toy N(MU, S²) with the exact denoiser (std relative to S, mean in units of S):
# at 50 steps DPM-Solver(++) 2M is within 2% of the true std where DDIM is ~5% low; at 20 steps
# the second-order solvers are more accurate than DDIM on both schedules.
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("variant", ["dpmsolver", "dpmsolver++"])
def test_dpm_solver_matches_ddpm_distribution_on_toy_gaussian(schedule, variant):
    ac = make_schedule(schedule, 1000)
    den = optimal_denoiser(ac)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(20_000, 1, generator=g)
    ddpm = ddpm_sample(den, torch.randn(20_000, 1, generator=g), ac, generator=g)
    x = dpm_solver_sample(den, noise, ac, 50, variant=variant)
    assert abs(x.mean().item() - ddpm.mean().item()) < 0.05 * S
    assert abs(x.std().item() / ddpm.std().item() - 1) < 0.03
    assert abs(x.std().item() / S - 1) < 0.02

    err = lambda y: abs(y.std().item() / S - 1)  # noqa: E731
    assert err(dpm_solver_sample(den, noise, ac, 20, variant=variant)) < err(ddim_sample(den, noise, ac, 20))


def test_cfg_denoiser_batches_extra_conditions_and_passes_only_given_ones():
    passed = []

    def model(x, t, drop_cond, labels=None, text=None):
        passed.append((labels is not None, text is not None, len(x)))
        extra = labels[:, None].float() + (0 if text is None else text.sum(dim=(1, 2))[:, None])
        return x + (~drop_cond).float()[:, None] * extra

    x, t = torch.randn(3, 2), torch.zeros(3, dtype=torch.long)
    labels, text = torch.tensor([1, 2, 3]), torch.randn(3, 4, 5)
    out = cfg_denoiser(model, labels=labels, text=text, scale=3.0)(x, t)
    cond = x + labels[:, None].float() + text.sum(dim=(1, 2))[:, None]
    torch.testing.assert_close(out, x + 3.0 * (cond - x))
    cfg_denoiser(model, labels=labels, text=None, scale=3.0)(x, t)
    assert passed == [(True, True, 6), (True, False, 6)]  # one doubled batch per call; None not passed


class OracleLevel(nn.Module):
    """A one-level chain's model over 2x2x1 'images' drawn from N(MU, S²) per pixel, predicting ε or v."""

    input_shape, num_classes = (2, 2, 1), 0

    def __init__(self, alphas_cumprod: Tensor, prediction: str):
        super().__init__()
        self.eps = optimal_denoiser(alphas_cumprod)
        self.v = to_v(self.eps)
        self.alphas_cumprod, self.prediction = alphas_cumprod, prediction

    def forward(self, x: Tensor, t: Tensor, **conditions) -> Tensor:
        return self.eps(x, t) if self.prediction == "eps" else self.v(x, t, self.alphas_cumprod)


def test_nested_sampling_reads_v_models_as_eps_models():
    from nds.diffusion.chain import nested_sample

    ac = linear_schedule(1000)
    runs = {}
    for prediction in ("eps", "v"):
        for clip in (False, True):
            runs[prediction, clip] = nested_sample({1: OracleLevel(ac, prediction)}, {}, 2000, ac, 20,
                                                   clip={1: 1.0} if clip else {}, seed=(0,), prediction=prediction)[1]
    torch.testing.assert_close(runs["eps", False], runs["v", False], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(runs["eps", True], runs["v", True], atol=1e-4, rtol=1e-4)
    assert abs(runs["v", False].mean().item() - MU) < 0.05 and abs(runs["v", False].std().item() - S) < 0.1  # 20 DDIM steps
    assert runs["v", True].max() <= 1.0 + 1e-4 < runs["v", False].max()  # image level: x0 clipped to [-1, 1]


def test_fast_solver_orders_spend_exactly_the_model_calls():
    for steps in range(1, 60):
        for order in (2, 3):
            orders = fast_solver_orders(steps, order)
            assert sum(orders) == steps and max(orders) <= order and min(orders) >= 1
            assert orders.count(order) >= len(orders) - 2  # at most two lower-order steps, at the end
    with pytest.raises(ValueError, match="order must be 2 or 3"):
        fast_solver_orders(10, 4)


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "cosine"])
def test_dpm_solver_fast_solves_the_probability_flow_ode_of_a_gaussian(schedule):
    """For x0 ~ N(MU, S²) the probability-flow ODE keeps (x_t - √ᾱ_t MU) / √(ᾱ_t S² + 1 - ᾱ_t) fixed,
    so its exact end at timestep 0 is known; 50 model calls get closer to it than 50 DDIM steps
    get to theirs, and doubling the calls shrinks the error."""
    ac = make_schedule(schedule, 1000)
    den, noise = optimal_denoiser(ac), torch.randn(2000, 1, generator=torch.Generator().manual_seed(0)).double()
    spread = lambda a: (a * S**2 + 1 - a) ** 0.5  # noqa: E731
    z = (noise - ac[-1].sqrt() * MU) / spread(ac[-1])
    exact_at_0, exact_x0 = ac[0].sqrt() * MU + spread(ac[0]) * z, MU + S * z
    err = lambda steps: (dpm_solver_fast_sample(den, noise, ac, steps) - exact_at_0).abs().max().item()  # noqa: E731
    assert err(50) < 0.1 * S
    assert err(50) < (ddim_sample(den, noise, ac, 50) - exact_x0).abs().max().item() / 2
    assert err(98) < err(50) / 2
    with pytest.raises(ValueError, match="steps must be in"):
        dpm_solver_fast_sample(den, noise, ac, 1000)
