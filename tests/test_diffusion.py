import math

import pytest
import torch
from torch import Tensor, nn

from nds.diffusion import (
    cfg_denoiser,
    cosine_schedule,
    ddim_sample,
    ddpm_sample,
    diffusion_loss,
    guided,
    linear_schedule,
    make_schedule,
    q_sample,
    sampling_timesteps,
)

MU, S = 1.5, 0.5  # toy data distribution x0 ~ N(MU, S^2)


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny shapes gain nothing from intra-op threads, and OpenMP spin-waiting makes them ~30x
    slower on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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
