from dataclasses import replace

import pytest
import torch
from torch import Tensor

from nds.config.specs import NestedUNetSpec, Phase, make_phases
from nds.diffusion.process import cosine_schedule, ddim_sample, linear_schedule, shift_schedule
from nds.models.nested_unet import (
    NestedUNet,
    PackedSchedule,
    downsample_pyramid,
    grow,
    mdm_sample,
    model_for_step,
    multires_loss,
    noised_upsample,
    pack,
    phase_for_step,
    resolution_schedules,
    unpack,
)
from nds.models.uvit import count_params, forward_flops

# Tiny 3-level spec: 4 -> 8 -> 16, a 2-level core (4 -> 2) with attention in the middle only.
SPEC = NestedUNetSpec(
    resolutions=(4, 8, 16), channels=2, core_widths=(16, 32), core_blocks=1, attention_levels=(),
    stage_widths=(8, 8), stage_blocks=1, heads=2, num_classes=3, text_dim=5,
)


def make(spec: NestedUNetSpec = SPEC, levels: int | None = None, seed: int = 0) -> NestedUNet:
    torch.manual_seed(seed)
    return NestedUNet(spec, levels).eval()


def inputs(model: NestedUNet, b: int = 2, seed: int = 0):
    """Random (xs, t, conditions) for a model's input resolutions."""
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(b, model.spec.channels, r, r, generator=g) for r in model.io_resolutions]
    t = torch.randint(0, 1000, (b,), generator=g)
    conds = {}
    if model.spec.num_classes:
        conds["labels"] = torch.randint(0, model.spec.num_classes, (b,), generator=g)
    if model.spec.text_dim:
        conds["text"] = torch.randn(b, 4, model.spec.text_dim, generator=g)
        conds["text_mask"] = torch.tensor([[True, True, False, False]] + [[True] * 4] * (b - 1))
    return xs, t, conds


@pytest.mark.parametrize(
    "resolutions, stage_widths",
    [((8,), ()), ((8, 32), (8,)), ((4, 8, 16), (8, 8)), ((4, 8, 32), (12, 8))],
    ids=["core-only", "64->256-like", "64->128->256-like", "mixed-factors"],
)
def test_forward_returns_one_prediction_per_resolution(resolutions, stage_widths):
    model = make(replace(SPEC, resolutions=resolutions, stage_widths=stage_widths))
    xs, t, conds = inputs(model)
    outs = model(xs, t, **conds)
    assert [tuple(o.shape) for o in outs] == [tuple(x.shape) for x in xs]
    assert all(torch.isfinite(o).all() for o in outs)
    assert len(model.stages) == len(resolutions) - 1


def test_every_resolution_sees_every_other_once_the_stage_links_are_trained():
    """Nesting couples the resolutions. The link from each outer stage into the inner network
    starts at zero (so growing keeps the inner outputs): at init, inner outputs ignore outer inputs."""
    model = make()
    xs, t, conds = inputs(model)

    def outputs_changed(i: int) -> list[bool]:
        base = model(xs, t, **conds)
        outs = model([x + (j == i) for j, x in enumerate(xs)], t, **conds)
        return [not torch.allclose(o, b) for o, b in zip(outs, base)]

    assert outputs_changed(2) == [False, False, True]
    assert outputs_changed(0) == [True, True, True]  # outer stages read the inner features
    with torch.no_grad():
        for stage in model.stages:
            stage.to_inner.weight.normal_(std=0.1)
    for i in range(3):
        assert outputs_changed(i) == [True, True, True]


def test_plain_unet_of_the_same_size():
    nested, plain = make(), make(replace(SPEC, nested=False))
    assert plain.io_resolutions == (16,)
    xs, t, conds = inputs(plain)
    assert [tuple(o.shape) for o in plain(xs, t, **conds)] == [(2, 2, 16, 16)]
    # Only the inner input/output convs differ.
    assert 0 < count_params(nested) - count_params(plain) < 0.01 * count_params(plain)
    xs_n, _, _ = inputs(nested)
    f_nested, f_plain = forward_flops(nested, xs_n, t, **conds), forward_flops(plain, xs, t, **conds)
    assert f_plain < f_nested < 1.05 * f_plain


def test_super_resolution_stage_sees_its_noised_condition():
    """A cascade's second stage: the plain UNet with the low-res image (upsampled, noised to level
    cond_t) as an extra input; both the image and its level change the prediction."""
    sr = make(replace(SPEC, nested=False, cond_channels=2))
    xs, t, conds = inputs(sr)
    g = torch.Generator().manual_seed(1)
    low = torch.randn(2, 2, 4, 4, generator=g)
    level = torch.tensor([10, 500])
    cond = noised_upsample(low, 16, level, linear_schedule(1000), generator=g)
    assert cond.shape == (2, 2, 16, 16)
    out = sr(xs, t, **conds, cond_image=cond, cond_t=level)[0]
    assert out.shape == (2, 2, 16, 16)
    assert not torch.allclose(out, sr(xs, t, **conds, cond_image=-cond, cond_t=level)[0])
    assert not torch.allclose(out, sr(xs, t, **conds, cond_image=cond, cond_t=level.flip(0))[0])
    # a new input conv: the plain UNet's weights are all there, so it grows by little
    plain = make(replace(SPEC, nested=False))
    assert set(plain.state_dict()) < set(sr.state_dict())
    assert count_params(sr) < 1.05 * count_params(plain)
    with pytest.raises(ValueError, match=r"expects cond_image of shape \[2, 2, 16, 16\]"):
        sr(xs, t, **conds, cond_image=cond[..., :8, :8], cond_t=level)
    with pytest.raises(ValueError, match="expects cond_t"):
        sr(xs, t, **conds, cond_image=cond)
    with pytest.raises(ValueError, match="cond_channels=0"):
        plain(xs, t, **conds, cond_image=cond, cond_t=level)
    samples = mdm_sample(sr.eval(), 2, linear_schedule(100), 3, cfg_scale=2.0, labels=conds["labels"],
                         text=conds["text"], text_mask=conds["text_mask"], cond_image=cond, cond_t=level)
    assert [tuple(s.shape) for s in samples] == [(2, 2, 16, 16)]


def test_noised_upsample_is_the_bilinear_upsample_at_low_noise():
    low = torch.rand(3, 1, 4, 4) * 2 - 1
    schedule = linear_schedule(1000)
    clean = torch.nn.functional.interpolate(low, size=(8, 8), mode="bilinear", align_corners=False)
    at = lambda level: noised_upsample(low, 8, torch.full((3,), level), schedule, torch.Generator().manual_seed(0))
    assert (at(0) - clean).abs().max() < 0.05  # σ = 0.01 at t = 0
    assert (at(999) - clean).abs().mean() > 0.5  # almost pure noise


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(resolutions=(8, 12), stage_widths=(8,)), "not a power-of-two multiple"),
        (dict(resolutions=(8, 8), stage_widths=(8,)), "not a power-of-two multiple"),
        (dict(resolutions=(), stage_widths=()), "resolutions must be positive"),
        (dict(resolutions=(6, 12), stage_widths=(8,), core_widths=(8, 8, 8)), "not divisible by 2"),
        (dict(stage_widths=(8,)), "one positive width per outer resolution"),
        (dict(attention_levels=(2,)), "attention_levels"),
        (dict(heads=3), "multiple of heads=3"),
        (dict(core_blocks=0), "core_blocks must be >= 1"),
        (dict(cond_drop_prob=2.0), "cond_drop_prob"),
        (dict(num_classes=-1), "num_classes"),
        (dict(cond_channels=-1), "cond_channels"),
    ],
)
def test_bad_specs_raise(changes, message):
    with pytest.raises(ValueError, match=message):
        NestedUNet(replace(SPEC, **changes))


def test_bad_inputs_raise():
    model = make()
    xs, t, conds = inputs(model)
    with pytest.raises(ValueError, match=r"expects 3 inputs at resolutions \[4, 8, 16\]"):
        model(xs[1:], t, **conds)
    with pytest.raises(ValueError, match=r"resolution 8 must be \[2, 2, 8, 8\]"):
        model([xs[0], xs[2][:, :, :8, :8].repeat(1, 2, 1, 1), xs[2]], t, **conds)
    with pytest.raises(ValueError, match="expects labels"):
        model(xs, t, text=conds["text"])
    with pytest.raises(ValueError, match="expects text tokens"):
        model(xs, t, labels=conds["labels"])
    with pytest.raises(ValueError, match="drop_cond"):
        model(xs, t, **conds, drop_cond=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="levels=4"):
        NestedUNet(SPEC, 4)


def test_dropped_conditions_are_ignored_and_training_drops_at_the_given_rate():
    model = make()
    xs, t, conds = inputs(model)
    drop = torch.ones(2, dtype=torch.bool)
    other = dict(labels=(conds["labels"] + 1) % 3, text=torch.randn(2, 7, 5))
    dropped = model(xs, t, **conds, drop_cond=drop)
    for a, b in zip(dropped, model(xs, t, **other, drop_cond=drop)):
        torch.testing.assert_close(a, b)
    kept = model(xs, t, **conds)
    assert not torch.allclose(kept[-1], model(xs, t, **{**conds, "labels": other["labels"]})[-1])
    assert not torch.allclose(kept[-1], dropped[-1])

    half = make(replace(SPEC, cond_drop_prob=0.5)).train()
    xs, t, conds = inputs(half, b=300)
    torch.manual_seed(0)
    with torch.no_grad():
        out = half(xs, t, **conds)[0]
        null = half(xs, t, **conds, drop_cond=torch.ones(300, dtype=torch.bool))[0]
    dropped = (out - null).flatten(1).abs().amax(1) == 0
    assert 0.4 < dropped.float().mean().item() < 0.6


def test_resolution_schedules_shift_snr_by_the_resolution_ratio():
    base = cosine_schedule(1000)
    s4, s8, s16 = resolution_schedules(base, (4, 8, 16), base_resolution=4, power=2.0)
    assert torch.equal(s4, base)
    torch.testing.assert_close(s16, shift_schedule(base, 1 / 16))
    _, s16_p1 = resolution_schedules(base, (4, 16), base_resolution=4, power=1.0)
    torch.testing.assert_close(s16_p1, shift_schedule(base, 1 / 4))
    assert (s16 < s8).all() and (s8 < s4).all()  # more noise at higher resolution


def test_downsample_pyramid_area_averages_pixels_and_bilinear_keeps_smooth_images():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    one, two, four = downsample_pyramid(x, (1, 2, 4), "area")
    assert one.item() == x.mean().item()
    torch.testing.assert_close(two, torch.tensor([[[[2.5, 4.5], [10.5, 12.5]]]]))
    assert torch.equal(four, x)
    ramp = torch.linspace(-1, 1, 16).expand(1, 1, 16, 16)  # a smooth image: both agree up to the edges
    area, bilinear = downsample_pyramid(ramp, (4,), "area")[0], downsample_pyramid(ramp, (4,))[0]
    torch.testing.assert_close(bilinear[..., 1:-1], area[..., 1:-1], atol=1e-5, rtol=0)
    checker = (torch.arange(8)[:, None] + torch.arange(8)) % 2 * 2.0 - 1  # ±1 at the pixel scale
    assert downsample_pyramid(checker.expand(1, 1, 8, 8), (4,))[0].abs().max() < 0.2  # antialiased: no aliasing
    with pytest.raises(ValueError, match="multiple of every resolution"):
        downsample_pyramid(x, (3,))
    with pytest.raises(ValueError, match="unknown downsampling 'nearest'"):
        downsample_pyramid(x, (2,), "nearest")


def test_multires_loss_weights_each_resolution():
    model = make().train()
    x = torch.randn(4, 2, 16, 16)
    conds = dict(labels=torch.tensor([0, 1, 2, 0]), text=torch.randn(4, 3, 5))
    ac = cosine_schedule(100)

    def loss(weights):
        torch.manual_seed(0)  # the same condition-drop mask in every call
        return multires_loss(model, x, ac, weights=weights, generator=torch.Generator().manual_seed(1), **conds)

    total, parts = loss(None)
    assert len(parts) == 3 and total.item() == pytest.approx(sum(p.item() for p in parts), rel=1e-6)
    weighted, _ = loss([0.0, 2.0, 0.5])
    assert weighted.item() == pytest.approx(2.0 * parts[1].item() + 0.5 * parts[2].item(), rel=1e-6)
    total.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="one value per output resolution"):
        loss([1.0, 1.0])


def test_packed_schedule_runs_each_resolution_on_its_own_schedule():
    """One sampler over a packed two-resolution state equals two separate runs."""
    ac = linear_schedule(1000)
    low, high = resolution_schedules(ac, (4, 8), base_resolution=4)
    shapes = [(1, 4, 4), (1, 8, 8)]
    schedule = PackedSchedule([low, high], [16, 64])
    assert len(schedule) == 1000
    assert torch.equal(schedule[10][:16], low[10].expand(16)) and torch.equal(schedule[10][16:], high[10].expand(64))

    def toy(ac_r: Tensor):  # exact ε for x0 = 0.5 everywhere
        def den(x, t):
            a = ac_r.float()[t].reshape(-1, *([1] * (x.ndim - 1)))
            return (x - a.sqrt() * 0.5) / (1 - a).sqrt()
        return den

    xs = [torch.randn(3, *s) for s in shapes]

    def packed_den(x, t):
        lo, hi = unpack(x, shapes)
        return pack([toy(low)(lo, t), toy(high)(hi, t)])

    out = unpack(ddim_sample(packed_den, pack(xs), schedule, 10), shapes)
    torch.testing.assert_close(out[0], ddim_sample(toy(low), xs[0], low, 10))
    torch.testing.assert_close(out[1], ddim_sample(toy(high), xs[1], high, 10))


def test_grow_reuses_every_inner_weight_and_preserves_inner_outputs():
    small = make(levels=1)
    grown = grow(small, 3)
    assert grown.levels == 3 and grown.resolutions == (4, 8, 16)
    small_state, grown_state = small.state_dict(), grown.state_dict()
    for key, value in small_state.items():
        assert torch.equal(grown_state[key], value), key
    new = set(grown_state) - set(small_state)
    assert new and all(k.startswith(("stages.", "inputs.8", "inputs.16", "outputs.8", "outputs.16")) for k in new)

    xs, t, conds = inputs(grown)
    with torch.no_grad():
        torch.testing.assert_close(grown(xs, t, **conds)[0], small(xs[:1], t, **conds)[0])

    middle = grow(small, 2)
    torch.testing.assert_close(grow(middle, 3).state_dict()["core.mid.res.0.conv1.weight"],
                               small_state["core.mid.res.0.conv1.weight"])
    with pytest.raises(ValueError, match="must exceed"):
        grow(grown, 2)
    with pytest.raises(ValueError, match="nested=False"):
        grow(make(replace(SPEC, nested=False), levels=1), 2)


def test_model_for_step_builds_then_grows_at_phase_starts():
    phases = make_phases([(1, 2), (3, 2)], num_levels=3)
    first = model_for_step(None, SPEC, phases, 0)
    assert first.levels == 1 and model_for_step(first, SPEC, phases, 1) is first
    grown = model_for_step(first, SPEC, phases, 2)
    assert grown.levels == 3 and model_for_step(grown, SPEC, phases, 3) is grown
    with pytest.raises(ValueError, match="different spec"):
        model_for_step(first, replace(SPEC, heads=4), phases, 2)


def test_phase_schedule():
    phases = make_phases([(1, 10), (3, 5)], num_levels=3)
    assert phases == [Phase(1, 10), Phase(3, 5)]
    assert [phase_for_step(phases, s) for s in (0, 9, 10, 14)] == [0, 0, 1, 1]
    for bad in (-1, 15):
        with pytest.raises(ValueError, match="outside the 15 steps"):
            phase_for_step(phases, bad)
    for bad, message in [
        ([], "at least one phase"),
        ([(1, 0), (2, 5)], "steps=0"),
        ([(2, 5), (2, 5)], "increase strictly"),
        ([(1, 5), (2, 5)], "must reach all 3"),
        ([(4, 5)], "increase strictly within 1..3"),
    ]:
        with pytest.raises(ValueError, match=message):
            make_phases(bad, num_levels=3)


def smooth_images(n: int, side: int, channels: int, seed: int = 0) -> Tensor:
    """Toy data with structure at every scale: upsampled random 4x4 patterns in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, channels, 4, 4, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=(side, side), mode="bilinear", align_corners=False)


def test_progressive_training_grows_through_phases_and_samples():
    """Phase 0 trains the 4x4 core alone, phase 1 grows to 4 -> 8, phase 2 to 4 -> 8 -> 16;
    every phase lowers its loss, growth keeps the inner prediction, and the result samples."""
    spec = replace(SPEC, cond_drop_prob=0.2)
    phases = make_phases([(1, 30), (2, 25), (3, 25)], num_levels=3)
    ac = cosine_schedule(1000)
    data, labels = smooth_images(16, 16, 2), torch.arange(16) % 3
    text = torch.randn(3, 4, 5)[labels]  # one "caption" per class

    def fixed_loss(model: NestedUNet) -> float:
        torch.manual_seed(123)
        with torch.no_grad():
            return multires_loss(model, data, ac, generator=torch.Generator().manual_seed(7),
                                 labels=labels, text=text)[0].item()

    torch.manual_seed(0)
    model, opt, start_loss = None, None, []
    for step in range(sum(p.steps for p in phases)):
        previous = model
        model = model_for_step(model, spec, phases, step)
        if model is not previous:
            if previous is not None:  # just grown: the inner prediction is unchanged
                xs, t, conds = inputs(model.eval())
                with torch.no_grad():
                    before = previous.eval()(xs[: previous.levels], t, **conds)
                    torch.testing.assert_close(model(xs, t, **conds)[0], before[0])
            model.train()
            opt = torch.optim.Adam(model.parameters(), lr=2e-3)
            start_loss.append(fixed_loss(model))
        loss, _ = multires_loss(model, data, ac, labels=labels, text=text)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step + 1 in (30, 55, 80):  # end of a phase
            assert fixed_loss(model) < 0.9 * start_loss[-1]

    assert model.levels == 3 and len(start_loss) == 3
    model.eval()
    samples = mdm_sample(model, 4, ac, 8, sampler="dpm_solver++", labels=torch.tensor([0, 1, 2, 0]),
                         text=text[:4], cfg_scale=2.0, threshold=0.995)
    assert [tuple(s.shape) for s in samples] == [(4, 2, 4, 4), (4, 2, 8, 8), (4, 2, 16, 16)]
    assert all(torch.isfinite(s).all() and s.abs().max() <= 1 + 1e-6 for s in samples)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm_solver", "dpm_solver++"])
def test_mdm_sample_every_sampler(sampler):
    model = make()
    g = torch.Generator().manual_seed(0)
    conds = dict(labels=torch.tensor([0, 2]), text=torch.randn(2, 3, 5))
    out = mdm_sample(model, 2, linear_schedule(100), 4, sampler=sampler, generator=g, cfg_scale=1.5, **conds)
    assert [tuple(s.shape) for s in out] == [(2, 2, 4, 4), (2, 2, 8, 8), (2, 2, 16, 16)]
    assert all(torch.isfinite(s).all() for s in out)
    plain = make(replace(SPEC, nested=False))
    assert [tuple(s.shape) for s in mdm_sample(plain, 2, linear_schedule(100), 2, sampler=sampler, **conds)] == [
        (2, 2, 16, 16)
    ]


def test_flops_and_params_count_nested_unet():
    model = make()
    xs, t, conds = inputs(model)
    flops = forward_flops(model, xs, t, **conds)
    inner = make(levels=1)
    assert 0 < forward_flops(inner, xs[:1], t, **conds) < flops
    assert count_params(inner) < count_params(model)


def test_text_layers_mix_the_caption_tokens_and_respect_their_padding():
    """MDM's learned self-attention layers over the caption tokens: they add parameters, padded
    positions (mask False) still change nothing, a real token does."""
    assert count_params(make(replace(SPEC, text_layers=2))) > count_params(make(replace(SPEC, text_layers=0)))
    model = make()
    xs, t, conds = inputs(model)
    out = model(xs, t, **conds)[-1]
    padded = conds["text"].clone()
    padded[0, 2:] = torch.randn(2, SPEC.text_dim)  # example 0's masked-out positions
    torch.testing.assert_close(model(xs, t, **{**conds, "text": padded})[-1], out)
    changed = conds["text"].clone()
    changed[0, 1] += 1.0
    assert not torch.allclose(model(xs, t, **{**conds, "text": changed})[-1][0], out[0])
    with pytest.raises(ValueError, match="text_layers must be >= 0"):
        replace(SPEC, text_layers=-1).validate()
