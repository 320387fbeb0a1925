"""The chain diagnostic: true- and null-condition columns that share every other draw, and what they
show about a level that uses its condition and one that cannot."""
import numpy as np
import pytest
import torch

from nds.config import load_config
from nds.diffusion.chain import keyed_generator, nested_sample, sample_levels
from nds.diffusion.process import diffusion_loss, make_schedule
from nds.eval.diagnostics import chain_diagnostic, latent_stats, null_cond_name, true_cond_name
from nds.models.uvit import UViT

SPEC = ["hierarchy.spec='8x8x1, 1x1x4'", "hierarchy.L=2", "hierarchy.sigmas=[0.0]", "sweep.depths=[1,2]",
        "diffusion.sample_steps=10", "diffusion.prediction=v", "eval.batch_size=64"]


def chain(cond_injection="kv", seed=0):
    torch.manual_seed(seed)
    level1 = UViT((8, 8, 1), 2, 32, 2, 2, cond_shape=(1, 1, 4), cond_injection=cond_injection)
    level2 = UViT((1, 1, 4), 1, 32, 2, 2)
    return {1: level1.eval(), 2: level2.eval()}


TEMPLATES = torch.stack([torch.zeros(8, 8).index_fill_(k // 2, torch.tensor([2 * (k % 2) + 2, 2 * (k % 2) + 3]), 1.0)
                         for k in range(4)]) * 1.6 - 0.8  # four bars: rows 2-3 / 4-5, columns 2-3 / 4-5


def bars(n: int, seed: int):
    """Images that are one of four bars (plus a little noise), and the one-hot class as z_2."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randint(4, (n,), generator=g)
    images = TEMPLATES[k][:, None] + 0.05 * torch.randn(n, 1, 8, 8, generator=g)
    return images, torch.nn.functional.one_hot(k, 4).float()[:, :, None, None] * 2 - 0.5


def train_level1(model, images, cond, steps=500):
    """v-prediction: under the ε loss a small level barely learns to use its condition (it informs the
    high-noise steps, where the ε target is nearly x_t itself)."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    alphas = make_schedule("linear", 1000)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(images), (64,), generator=g)
        loss = diffusion_loss(lambda x, t: model(x, t, cond=cond[idx]), images[idx], alphas, generator=g,
                              prediction="v")
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_every_column_shares_the_noise_and_the_first_samples_do_not_depend_on_n():
    cfg = load_config(None, SPEC + ["eval.batch_size=10"])  # same batch shapes for any n: same float paths
    models = chain()
    full = sample_levels(cfg, models, 80)
    torch.testing.assert_close(sample_levels(cfg, models, 30)[1], full[1][:30])
    other_seed = sample_levels(load_config(None, SPEC + ["eval.batch_size=10", "seed=1"]), models, 30)[1]
    assert (other_seed - full[1][:30]).abs().max() > 0.5
    # level 1 started from the sampled z_2 is the chain's own level 1: only the condition differs between columns
    given = sample_levels(cfg, models, 80, start=1, given=full[2])
    torch.testing.assert_close(given[1], full[1])
    assert 2 not in given
    with pytest.raises(ValueError, match="exactly one of"):
        nested_sample(models, {2: 0.0}, 4, make_schedule("linear", 1000), 3, seed=(0,), start=1)


def test_null_condition_ignores_the_condition_and_is_unguided():
    models = chain()
    alphas = make_schedule("linear", 1000)
    null = nested_sample(models, {2: 0.0}, 6, alphas, 4, seed=(1,), start=1, null_condition=True, cfg_scale=3.0)[1]
    given = nested_sample(models, {2: 0.0}, 6, alphas, 4, seed=(1,), start=1, given=torch.randn(6, 4, 1, 1))[1]
    assert not torch.allclose(null, given)
    level1 = models[1]
    noise = torch.randn(6, 1, 8, 8, generator=keyed_generator(1, 1, 0))
    with torch.no_grad():  # the null branch's first step equals a dropped-condition forward on any condition
        t = torch.full((6,), 999)
        a = level1(noise, t, cond=torch.randn(6, 4, 1, 1), drop_cond=torch.ones(6, dtype=torch.bool))
        b = level1(noise, t, cond=torch.zeros(6, 4, 1, 1), drop_cond=torch.ones(6, dtype=torch.bool))
    torch.testing.assert_close(a, b)


def test_latent_clip_bounds_a_latent_level():
    models = chain()
    alphas = make_schedule("linear", 1000)
    free = nested_sample({1: models[2]}, {}, 64, alphas, 5, seed=(0,))[1]
    clipped = nested_sample({1: models[2]}, {}, 64, alphas, 5, seed=(0,), clip={1: 0.5})[1]
    assert free.abs().max() > 0.5 >= clipped.abs().max() - 1e-5


@pytest.mark.parametrize("informative", [True, False])
def test_true_condition_beats_null_only_for_a_level_that_can_use_it(informative):
    """A level whose z_2 names the image's bar draws that bar given the true condition, and a bar at
    random given the null one; a level whose z_2 is independent of the image draws alike from both."""
    images, cond = bars(1024, seed=0)
    if not informative:
        cond = cond[torch.randperm(len(cond), generator=torch.Generator().manual_seed(1))]
    models = chain()
    train_level1(models[1], images, cond)
    held_images, held_cond = bars(128, seed=2)
    cfg = load_config(None, SPEC + ["eval.diagnostic_samples=128"])
    held_uint8 = ((held_images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()

    def paired_error(images: np.ndarray) -> float:  # distance of sample i to held-out image i
        return float(np.mean((images.astype(float) - held_uint8[: len(images)].astype(float)) ** 2))

    def decode(z1: torch.Tensor) -> np.ndarray:
        return ((z1.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()

    out = chain_diagnostic(cfg, models, "paired", paired_error, decode, {2: held_cond.numpy()})
    true, null = out[true_cond_name("paired", 1)], out[null_cond_name("paired", 1)]
    assert out["diagnostic/samples"] == 128
    if informative:
        assert true < 0.3 * null, out
    else:
        assert abs(true - null) < 0.15 * null, out


def test_guidance_changes_what_a_conditioned_level_draws():
    images, cond = bars(1024, seed=0)
    models = chain()
    train_level1(models[1], images, cond, steps=150)
    alphas = make_schedule("linear", 1000)
    given = bars(32, seed=3)[1]
    plain = nested_sample(models, {2: 0.0}, 32, alphas, 8, seed=(0,), start=1, given=given, prediction="v")[1]
    guided = nested_sample(models, {2: 0.0}, 32, alphas, 8, seed=(0,), start=1, given=given, prediction="v",
                           cfg_scale=3.0)[1]
    assert (plain - guided).abs().mean() > 0.01


def test_latent_stats_floor_is_below_a_shifted_sampler():
    rng = np.random.default_rng(0)
    train, held = rng.normal(size=(300, 4, 2, 2)), rng.normal(size=(300, 4, 2, 2))
    good = latent_stats({2: torch.as_tensor(rng.normal(size=(300, 4, 2, 2)))}, {2: held}, {2: train})
    bad = latent_stats({2: torch.as_tensor(3 * rng.normal(size=(300, 4, 2, 2)))}, {2: held}, {2: train})
    assert good["level2/z_fd"] < 2 * good["level2/z_fd_floor"] < bad["level2/z_fd"]
    assert abs(good["level2/z_std"] - 1) < 0.1 and abs(bad["level2/z_std"] - 3) < 0.3
