import pytest
import torch
from torch import nn

from nds.config.specs import UVIT_SIZES
from nds.diffusion.process import cfg_denoiser, diffusion_loss, guided, linear_schedule
from nds.models.uvit import UViT, count_params, forward_flops, upsample_geometry, uvit_from_size

TINY = UVIT_SIZES["tiny"]


def make(input_shape=(8, 8, 4), patch_size=2, **kw) -> UViT:
    torch.manual_seed(0)
    return UViT(input_shape, patch_size, **{**TINY, **kw}).eval()


def inputs(model: UViT, b: int = 2, seed: int = 0):
    """Random (x, t, cond, labels) matching the model's shapes; cond/labels None when unused."""
    g = torch.Generator().manual_seed(seed)
    H, W, C = model.input_shape
    x = torch.randn(b, C, H, W, generator=g)
    t = torch.randint(0, 1000, (b,), generator=g)
    cond = None
    if model.cond_shape is not None:
        h, w, c = model.cond_shape
        cond = torch.randn(b, c, h, w, generator=g)
    labels = torch.randint(0, model.num_classes, (b,), generator=g) if model.num_classes else None
    return x, t, cond, labels


def test_tiny_size_builds_and_runs():
    torch.manual_seed(0)
    model = uvit_from_size("tiny", input_shape=(8, 8, 4), patch_size=2).eval()
    x, t, _, _ = inputs(model)
    assert model(x, t).shape == x.shape
    assert len(model.in_blocks) == len(model.out_blocks) == TINY["depth"] // 2


def test_named_sizes_parameter_counts():
    """Built on the meta device: no memory or init cost. U-ViT-S/M/L are ~44M/131M/287M params
    (plus the time MLP here); only broad ranges are asserted."""
    with torch.device("meta"):
        counts = {
            s: count_params(uvit_from_size(s, input_shape=(32, 32, 4), patch_size=2)) for s in UVIT_SIZES
        }
    assert 35e6 < counts["small"] < 60e6
    assert 110e6 < counts["mid"] < 160e6
    assert 250e6 < counts["large"] < 340e6
    assert counts["tiny"] < counts["small"] < counts["mid"] < counts["large"]


def test_uvit_from_size_rejects_unknown_size():
    with pytest.raises(ValueError, match="unknown U-ViT size 'huge'.*'large'.*'tiny'"):
        uvit_from_size("huge", input_shape=(8, 8, 4), patch_size=2)


@pytest.mark.parametrize("final_conv", [True, False])
@pytest.mark.parametrize("num_classes", [0, 10])
def test_forward_shapes_with_and_without_condition(num_classes, final_conv):
    for cond_shape in (None, (4, 4, 3)):
        model = make((8, 12, 4), 2, cond_shape=cond_shape, num_classes=num_classes, final_conv=final_conv)
        x, t, cond, labels = inputs(model)
        out = model(x, t, cond=cond, labels=labels)
        assert out.shape == x.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("seed", range(3))
def test_final_conv_starts_as_the_identity(seed):
    """At PyTorch's default init the output conv filters the head's prediction and nearly zeroes some
    frequencies, which a one-channel level then fails to predict (README: the single level's plateau)."""
    torch.manual_seed(seed)
    model = UViT((28, 28, 1), patch_size=4, width=32, depth=2, heads=2)
    x = torch.randn(2, 1, 28, 28)
    assert torch.allclose(model.final_conv(x), x)


def test_accepts_float_and_scalar_timesteps():
    model = make()
    x, t, _, _ = inputs(model)
    assert model(x, t.float() + 0.5).shape == x.shape
    torch.testing.assert_close(model(x, torch.tensor(3)), model(x, torch.tensor([3, 3])))


@pytest.mark.parametrize(
    "input_shape, patch_size, cond_shape",
    [
        ((32, 32, 4), 4, (6, 6, 32)),  # 6 -> 32: stride 5, kernel 7
        ((28, 28, 4), 4, (4, 4, 24)),  # 4 -> 28: stride 7, kernel 7
        ((4, 4, 8), 1, (2, 2, 16)),  # 2 -> 4
        ((6, 6, 8), 2, (4, 4, 4)),  # 4 -> 6: stride 1, kernel 3
        ((8, 12, 4), 2, (3, 5, 2)),  # different geometry per axis
        ((8, 8, 4), 2, (8, 8, 2)),  # same resolution: 1x1 transposed conv
    ],
)
@pytest.mark.parametrize("cond_injection", ["tokens", "kv"])
def test_condition_upsampling_to_any_resolution(input_shape, patch_size, cond_shape, cond_injection):
    """kv upsamples ẑ to the level's pixels (then patches); tokens to its token grid, mixing channels."""
    H, W, _ = input_shape
    if cond_injection == "tokens" and cond_shape[0] > H // patch_size:
        with pytest.raises(ValueError, match="finer than the level's .* token grid"):
            make(input_shape, patch_size, cond_shape=cond_shape, cond_injection=cond_injection)
        return
    model = make(input_shape, patch_size, cond_shape=cond_shape, cond_injection=cond_injection)
    x, t, cond, _ = inputs(model)
    grid = (H, W) if cond_injection == "kv" else (H // patch_size, W // patch_size)
    assert model.cond_upsample(cond).shape[-2:] == grid
    assert model(x, t, cond=cond).shape == x.shape


def test_upsample_geometry_is_exact():
    for large in range(1, 33):
        for small in range(1, large + 1):
            kernel, stride = upsample_geometry(small, large)
            assert (small - 1) * stride + kernel == large
            assert kernel >= stride >= 1  # no output pixel is left uncovered


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(input_shape=(10, 8, 4), patch_size=4), "not divisible by patch_size"),
        (dict(input_shape=(8, 8, 4), patch_size=0), "not divisible by patch_size"),
        (dict(width=30, heads=4), "multiple of heads"),
        (dict(depth=3), "depth=3 must be even"),
        (dict(cond_shape=(16, 4, 2)), "larger than the level"),
        (dict(cond_shape=(4, 4)), "cond_shape must be positive"),
        (dict(input_shape=(8, 8)), "input_shape must be positive"),
        (dict(num_classes=-1), "num_classes"),
        (dict(cond_drop_prob=1.5), "cond_drop_prob"),
        (dict(mlp_ratio=0.0), "mlp_ratio"),
    ],
)
def test_bad_configs_raise(kwargs, message):
    args = {"input_shape": (8, 8, 4), "patch_size": 2, **TINY, **kwargs}
    with pytest.raises(ValueError, match=message):
        UViT(**args)


def test_bad_inputs_raise():
    plain = make()
    x, t, _, _ = inputs(plain)
    with pytest.raises(ValueError, match="unconditional level"):
        plain(x, t, cond=torch.randn(2, 2, 4, 4))
    with pytest.raises(ValueError, match="num_classes=0"):
        plain(x, t, labels=torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"x must be \[B, 4, 8, 8\]"):
        plain(torch.randn(2, 4, 8, 6), t)

    conditional = make(cond_shape=(4, 4, 2), num_classes=3)
    x, t, cond, labels = inputs(conditional)
    with pytest.raises(ValueError, match=r"cond must be \[2, 2, 4, 4\]"):
        conditional(x, t, cond=torch.randn(2, 2, 2, 2), labels=labels)
    with pytest.raises(ValueError, match="expects cond"):
        conditional(x, t, labels=labels)
    with pytest.raises(ValueError, match="expects labels"):
        conditional(x, t, cond=cond)
    with pytest.raises(ValueError, match="drop_cond"):
        conditional(x, t, cond=cond, labels=labels, drop_cond=torch.ones(3, dtype=torch.bool))


def test_condition_tokens_join_every_other_block():
    """kv: blocks 0, 2, 4 of the in/mid/out sequence get the condition tokens as keys and values, 1 and 3
    do not. tokens: every block runs on [main; condition] tokens, the condition part fresh before blocks
    0, 2, 4 and carried (updated by the block before) into 1 and 3."""
    def block_inputs(model, cond_shape):
        seen = []
        for block in [*model.in_blocks, model.mid_block, *model.out_blocks]:
            block.register_forward_pre_hook(lambda m, args, kwargs: seen.append((args[0], kwargs.get("ctx"))),
                                            with_kwargs=True)
        x, t, cond, _ = inputs(model)
        with torch.no_grad():
            model(x, t, cond=cond)
        return seen

    for cond_shape, expected in (((4, 4, 2), [True, False, True, False, True]), (None, [False] * 5)):
        seen = block_inputs(make(cond_shape=cond_shape, depth=4, cond_injection="kv"), cond_shape)
        assert [ctx is not None for _, ctx in seen] == expected

    model = make(cond_shape=(4, 4, 2), depth=4, cond_injection="tokens")
    seen = block_inputs(model, (4, 4, 2))
    n = model.num_extras + model.num_patches
    assert all(ctx is None and h.shape[1] == n + model.num_patches for h, ctx in seen)
    conds = [h[:, n:] for h, _ in seen]
    torch.testing.assert_close(conds[0], conds[2])
    torch.testing.assert_close(conds[0], conds[4])
    assert not torch.allclose(conds[0], conds[1]) and not torch.allclose(conds[2], conds[3])


def test_dropped_condition_ignores_cond_and_labels():
    model = make(cond_shape=(4, 4, 2), num_classes=5)
    x, t, cond, labels = inputs(model)
    other_cond, other_labels = torch.randn_like(cond), (labels + 1) % 5
    drop, keep = torch.ones(2, dtype=torch.bool), torch.zeros(2, dtype=torch.bool)

    torch.testing.assert_close(
        model(x, t, cond=cond, labels=labels, drop_cond=drop),
        model(x, t, cond=other_cond, labels=other_labels, drop_cond=drop),
    )
    kept = model(x, t, cond=cond, labels=labels, drop_cond=keep)
    assert not torch.allclose(kept, model(x, t, cond=other_cond, labels=labels, drop_cond=keep))
    assert not torch.allclose(kept, model(x, t, cond=cond, labels=other_labels, drop_cond=keep))
    # Eval mode without drop_cond is the conditional branch; the mask is per example.
    torch.testing.assert_close(model(x, t, cond=cond, labels=labels), kept)
    mixed = model(x, t, cond=cond, labels=labels, drop_cond=torch.tensor([True, False]))
    torch.testing.assert_close(mixed[1], kept[1])
    assert not torch.allclose(mixed[0], kept[0])


def test_training_mode_drops_condition_with_cond_drop_prob():
    x, t, cond, _ = inputs(make(cond_shape=(4, 4, 2)))
    other = torch.randn_like(cond)
    always = make(cond_shape=(4, 4, 2), cond_drop_prob=1.0).train()
    torch.testing.assert_close(always(x, t, cond=cond), always(x, t, cond=other))
    never = make(cond_shape=(4, 4, 2), cond_drop_prob=0.0).train()
    assert not torch.allclose(never(x, t, cond=cond), never(x, t, cond=other))

    half = make(cond_shape=(4, 4, 2), cond_drop_prob=0.5).train()
    torch.manual_seed(0)
    x, t, cond, _ = inputs(half, b=400)
    same = (half(x, t, cond=cond) - half(x, t, cond=cond, drop_cond=torch.ones(400, dtype=torch.bool)))
    dropped = same.flatten(1).abs().amax(1) == 0
    assert 0.4 < dropped.float().mean().item() < 0.6


def test_cfg_on_uvit_matches_two_separate_passes():
    model = make(cond_shape=(4, 4, 2), num_classes=3)
    x, t, cond, labels = inputs(model)
    keep, drop = torch.zeros(2, dtype=torch.bool), torch.ones(2, dtype=torch.bool)
    expected = guided(
        lambda x, t: model(x, t, cond=cond, labels=labels, drop_cond=keep),
        lambda x, t: model(x, t, cond=cond, labels=labels, drop_cond=drop),
        2.5,
    )(x, t)
    with torch.no_grad():
        out = cfg_denoiser(model, cond, labels, 2.5)(x, t)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


def test_adam_steps_reduce_diffusion_loss_on_fixed_batch():
    model = make(cond_shape=(4, 4, 2), num_classes=3).train()
    ac = linear_schedule(1000)
    x, _, cond, labels = inputs(model, b=8)
    denoiser = lambda x_t, t: model(x_t, t, cond=cond, labels=labels)  # noqa: E731

    def fixed_loss():
        return diffusion_loss(denoiser, x, ac, generator=torch.Generator().manual_seed(0))

    torch.manual_seed(0)
    with torch.no_grad():
        before = fixed_loss().item()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(30):
        loss = fixed_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = fixed_loss().item()
    assert after < 0.8 * before


def test_forward_flops_positive_and_grows_with_input_size():
    flops = []
    for side in (8, 16):
        model = make((side, side, 4), 2, cond_shape=(4, 4, 2)).train()
        x, t, cond, _ = inputs(model)
        flops.append(forward_flops(model, x, t, cond=cond))
        assert model.training  # restored after counting
    assert 0 < flops[0] < flops[1]
    # 4x the patch tokens: per-token layers scale 4x, attention 16x; the time token does not.
    assert flops[1] > 3.5 * flops[0]


def test_condition_adds_modest_flops():
    """As many condition tokens as patches: as keys and values only, in 3 of 5 blocks, they add ~10%
    here; as real tokens in every block they about double a forward."""
    plain, kv = make(), make(cond_shape=(4, 4, 2), cond_injection="kv")
    tokens = make(cond_shape=(4, 4, 2), cond_injection="tokens")
    x, t, cond, _ = inputs(kv)
    base = forward_flops(plain, x, t)
    assert base < forward_flops(kv, x, t, cond=cond) < 1.2 * base
    assert 1.5 * base < forward_flops(tokens, x, t, cond=cond) < 2.3 * base


def test_count_params():
    assert count_params(nn.Linear(3, 4)) == 3 * 4 + 4  # counted by hand: weights and biases
    assert count_params(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2, bias=False))) == 16 + 8
    model = make()
    assert count_params(make(cond_shape=(4, 4, 2))) > count_params(model) > 0  # the condition path adds weights


def text_inputs(b: int = 2, n: int = 5, dim: int = 6, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[0, 3:] = False  # the first caption is shorter: two padding tokens
    return torch.randn(b, n, dim, generator=g), mask


def test_text_tokens_condition_the_output_and_padding_is_ignored():
    model = make(text_dim=6)
    x, t, _, _ = inputs(model)
    text, mask = text_inputs()
    out = model(x, t, text=text, text_mask=mask)
    assert out.shape == x.shape
    other = text.clone()
    other[1] += 1.0
    assert not torch.allclose(out[1], model(x, t, text=other, text_mask=mask)[1])
    # Changing or adding padding tokens changes nothing.
    padded = text.clone()
    padded[0, 3:] = 100.0
    torch.testing.assert_close(model(x, t, text=padded, text_mask=mask), out)
    longer = torch.cat([text, torch.randn(2, 3, 6)], dim=1)
    longer_mask = torch.cat([mask, torch.zeros(2, 3, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(model(x, t, text=longer, text_mask=longer_mask), out, atol=1e-5, rtol=1e-5)
    # No mask means every token counts.
    assert not torch.allclose(model(x, t, text=text)[0], out[0])


def test_dropped_text_is_independent_of_the_caption_and_its_length():
    model = make(cond_shape=(4, 4, 2), num_classes=3, text_dim=6)
    x, t, cond, labels = inputs(model)
    text, mask = text_inputs()
    drop = torch.ones(2, dtype=torch.bool)
    dropped = model(x, t, cond=cond, labels=labels, text=text, text_mask=mask, drop_cond=drop)
    other, _ = text_inputs(n=9, seed=7)
    torch.testing.assert_close(model(x, t, cond=cond, labels=labels, text=other, drop_cond=drop), dropped)
    kept = model(x, t, cond=cond, labels=labels, text=text, text_mask=mask)
    assert not torch.allclose(kept, dropped)


def test_cfg_with_text_matches_two_separate_passes():
    model = make(num_classes=3, text_dim=6)
    x, t, _, labels = inputs(model)
    text, mask = text_inputs()
    keep, drop = torch.zeros(2, dtype=torch.bool), torch.ones(2, dtype=torch.bool)
    expected = guided(
        lambda x, t: model(x, t, labels=labels, text=text, text_mask=mask, drop_cond=keep),
        lambda x, t: model(x, t, labels=labels, text=text, text_mask=mask, drop_cond=drop),
        3.0,
    )(x, t)
    with torch.no_grad():
        out = cfg_denoiser(model, labels=labels, scale=3.0, text=text, text_mask=mask)(x, t)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


def test_bad_text_inputs_raise():
    plain, texty = make(), make(text_dim=6)
    x, t, _, _ = inputs(plain)
    text, mask = text_inputs()
    with pytest.raises(ValueError, match="text_dim=0"):
        plain(x, t, text=text)
    with pytest.raises(ValueError, match=r"expects text tokens \[2, N, 6\]"):
        texty(x, t)
    with pytest.raises(ValueError, match=r"expects text tokens \[2, N, 6\]"):
        texty(x, t, text=torch.randn(2, 5, 4))
    with pytest.raises(ValueError, match="text_mask must be bool"):
        texty(x, t, text=text, text_mask=mask.long())
    with pytest.raises(ValueError, match="text_dim"):
        make(text_dim=-1)


def test_text_tokens_add_flops_and_params():
    plain, texty = make(), make(text_dim=6)
    x, t, _, _ = inputs(plain)
    text, mask = text_inputs()
    assert forward_flops(plain, x, t) < forward_flops(texty, x, t, text=text, text_mask=mask)
    assert count_params(texty) == count_params(plain) + 6 * 64 + 64 + 64  # projection + null token



@pytest.mark.parametrize("size", sorted(UVIT_SIZES))
def test_every_size_trains_two_steps_on_cpu(size):
    """Every named size builds and trains at batch 1 on a small input. SGD keeps no optimiser
    state, so U-ViT-L's ~290M parameters cost weights + grads (~2.3 GB), not four copies."""
    torch.manual_seed(0)
    model = uvit_from_size(size, input_shape=(8, 8, 4), patch_size=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    watched = model.in_blocks[0].mlp[0].weight
    before = watched.detach().clone()
    x0 = torch.randn(1, 4, 8, 8)
    for _ in range(2):
        loss = diffusion_loss(model, x0, linear_schedule(1000))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)
    assert not torch.equal(watched.detach(), before)
