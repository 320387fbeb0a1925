"""Matryoshka Diffusion (Gu et al. 2023): one NestedUNet denoises all resolutions jointly.

z_t^r = α_t^r D^r(x) + σ_t^r ε^r for every resolution r, with one t per example and a schedule
per resolution whose SNR is the base schedule's times (r_base / r)^power (§3.1). The network
nests: the inner UNet works at the base resolution; each outer stage adds one resolution with
convolutions that downsample to the resolution inside it, add the result to that resolution's
own input features, run everything inside, and upsample back with long skips (§3.2). All
attention is in the inner UNet, where MDM puts the bulk of the computation (§4.1). The loss is a
weighted sum of per-resolution MSEs (Eq. 3). Progressive training (§3.3) trains the innermost
resolutions first and then `grow`s the model, reusing their weights; the link from a new stage
into the inner network starts at zero, so growth does not disturb what was learned.

MDM grows its models by hand between runs (App. B) and does not drop labels (App. F); here the
phases are one schedule (`make_phases`, `phase_for_step`, `model_for_step`), and class / text
conditions are dropped with probability cond_drop_prob for classifier-free guidance.

The same blocks build MDM's controlled baselines (§4.1): `nested=False` is the plain UNet of the
same size, and `cond_channels` turns that into a cascade's super-resolution stage, which sees the
upsampled, noise-augmented low-resolution image next to its noisy input (`noised_upsample`).

Resolutions are listed innermost first, and so are a model's inputs and outputs.
"""

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nds.config.specs import DOWNSAMPLE_MODES, NestedUNetSpec, Phase
from nds.diffusion.process import (
    cfg_denoiser,
    draw_normal,
    draw_timesteps,
    prediction_target,
    q_sample,
    resolution_snr_scale,
    sample,
    shift_schedule,
)
from nds.models.uvit import check_text, null_text_tokens, timestep_embedding


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, ch), ch)


class ResBlock(nn.Module):
    """Pre-norm residual conv block; the (time + class) embedding is added between the convs."""

    def __init__(self, cin: int, cout: int, emb_dim: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, cout)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + self.emb(F.silu(emb))[:, :, None, None]
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class AttnBlock(nn.Module):
    """Self-attention over positions; with text, the text tokens are extra keys and values
    (cross-attention fused into the same softmax), padding masked out."""

    def __init__(self, ch: int, heads: int, text_width: int):
        super().__init__()
        self.heads = heads
        self.norm = _norm(ch)
        self.qkv = nn.Linear(ch, 3 * ch)
        self.text_kv = nn.Linear(text_width, 2 * ch) if text_width else None
        self.proj = nn.Linear(ch, ch)

    def forward(self, x: Tensor, text: Tensor | None = None, text_mask: Tensor | None = None) -> Tensor:
        b, c, height, width = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)
        q, k, v = self.qkv(tokens).chunk(3, dim=-1)
        mask = None
        if self.text_kv is not None:
            tk, tv = self.text_kv(text).chunk(2, dim=-1)
            k, v = torch.cat([k, tk], dim=1), torch.cat([v, tv], dim=1)
            mask = F.pad(text_mask, (height * width, 0), value=True)[:, None, None, :]

        def heads(z: Tensor) -> Tensor:
            return z.reshape(b, z.shape[1], self.heads, c // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=mask)
        out = self.proj(out.transpose(1, 2).reshape(b, height * width, c))
        return x + out.transpose(1, 2).reshape(b, c, height, width)


class Level(nn.Module):
    """`blocks` ResBlocks at one resolution, each followed by attention where enabled."""

    def __init__(self, cin: int, cout: int, blocks: int, emb_dim: int, attention: bool = False,
                 heads: int = 1, text_width: int = 0):
        super().__init__()
        self.res = nn.ModuleList(ResBlock(cin if i == 0 else cout, cout, emb_dim) for i in range(blocks))
        self.attn = nn.ModuleList(AttnBlock(cout, heads, text_width) for _ in range(blocks)) if attention else None

    def forward(self, x: Tensor, emb: Tensor, text: Tensor | None = None, text_mask: Tensor | None = None) -> Tensor:
        for i, block in enumerate(self.res):
            x = block(x, emb)
            if self.attn is not None:
                x = self.attn[i](x, text, text_mask)
        return x


def _downsample(ch: int) -> nn.Conv2d:
    return nn.Conv2d(ch, ch, 3, stride=2, padding=1)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNetCore(nn.Module):
    """The inner UNet at the base resolution: one skip per level, attention where asked and in
    the middle. Maps features of width widths[0] to features of width widths[0]."""

    def __init__(self, spec: NestedUNetSpec, emb_dim: int, text_width: int):
        super().__init__()
        w, n = spec.core_widths, len(spec.core_widths)

        def level(cin: int, cout: int, blocks: int, attention: bool) -> Level:
            return Level(cin, cout, blocks, emb_dim, attention, spec.heads, text_width)

        self.down = nn.ModuleList(
            level(w[max(i - 1, 0)], w[i], spec.core_blocks, i in spec.attention_levels) for i in range(n)
        )
        self.downsample = nn.ModuleList(_downsample(w[i]) for i in range(n - 1))
        self.mid = level(w[-1], w[-1], 1, True)
        self.upsample = nn.ModuleList(Upsample(w[i + 1]) for i in range(n - 1))
        self.up = nn.ModuleList(
            level((w[i + 1] if i + 1 < n else w[i]) + w[i], w[i], spec.core_blocks, i in spec.attention_levels)
            for i in range(n)
        )

    def forward(self, h: Tensor, emb: Tensor, text: Tensor | None, text_mask: Tensor | None) -> Tensor:
        skips = []
        for i, level in enumerate(self.down):
            h = level(h, emb, text, text_mask)
            skips.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
        h = self.mid(h, emb, text, text_mask)
        for i in reversed(range(len(self.up))):
            if i < len(self.upsample):
                h = self.upsample[i](h)
            h = self.up[i](torch.cat([h, skips[i]], dim=1), emb, text, text_mask)
        return h


class OuterStage(nn.Module):
    """One outer resolution: ResBlocks and stride-2 convs down to the resolution inside it, and
    back up with one long skip per halving. No attention: at high resolution it is the costly
    part, and MDM keeps it in the inner UNet."""

    def __init__(self, width: int, inner_width: int, factor: int, blocks: int, emb_dim: int):
        super().__init__()
        n = factor.bit_length() - 1  # log2 of the power-of-two factor
        self.down = nn.ModuleList(Level(width, width, blocks, emb_dim) for _ in range(n))
        self.downsample = nn.ModuleList(_downsample(width) for _ in range(n))
        self.to_inner = nn.Conv2d(width, inner_width, 1)
        nn.init.zeros_(self.to_inner.weight)  # a freshly grown stage leaves the inner network's input as it was
        nn.init.zeros_(self.to_inner.bias)
        self.from_inner = nn.Conv2d(inner_width, width, 1)
        self.upsample = nn.ModuleList(Upsample(width) for _ in range(n))
        self.up = nn.ModuleList(Level(2 * width, width, blocks, emb_dim) for _ in range(n))

    def down_path(self, h: Tensor, emb: Tensor) -> tuple[Tensor, list[Tensor]]:
        skips = []
        for level, down in zip(self.down, self.downsample):
            h = level(h, emb)
            skips.append(h)
            h = down(h)
        return self.to_inner(h), skips

    def up_path(self, h: Tensor, skips: list[Tensor], emb: Tensor) -> Tensor:
        h = self.from_inner(h)
        for level, up in zip(self.up, self.upsample):
            h = level(torch.cat([up(h), skips.pop()], dim=1), emb)
        return h


class NestedUNet(nn.Module):
    """NestedUNet over the `levels` innermost resolutions of `spec` (default: all of them).

    forward(xs, t, ...) takes the noisy inputs [B, C, r, r] for `io_resolutions` (innermost
    first) and returns the predictions (ε or v, as trained) in the same order.
    """

    def __init__(self, spec: NestedUNetSpec, levels: int | None = None):
        super().__init__()
        spec.validate()
        levels = len(spec.resolutions) if levels is None else levels
        if not 1 <= levels <= len(spec.resolutions):
            raise ValueError(f"levels={levels} must be between 1 and the {len(spec.resolutions)} "
                             "resolutions of the spec")
        self.spec, self.levels = spec, levels
        self.resolutions = spec.resolutions[:levels]
        self.io_resolutions = self.resolutions if spec.nested else self.resolutions[-1:]
        base = spec.core_widths[0]
        emb_dim = 4 * base

        self.time_embed = nn.Sequential(nn.Linear(base, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_embed = nn.Embedding(spec.num_classes + 1, emb_dim) if spec.num_classes else None
        if spec.text_dim:
            self.text_proj = nn.Linear(spec.text_dim, emb_dim)
            self.text_layers = nn.ModuleList(
                nn.TransformerEncoderLayer(emb_dim, spec.heads, 2 * emb_dim, dropout=0.0, batch_first=True, norm_first=True)
                for _ in range(spec.text_layers))
            self.null_text = nn.Parameter(0.02 * torch.randn(1, 1, emb_dim))
        if spec.cond_channels:
            # Concatenating the condition to the noisy input before the input conv is the same as
            # adding a conv of the condition to that conv's output; the input convs stay as they are.
            self.cond_input = nn.Conv2d(spec.cond_channels, spec.width(levels - 1), 3, padding=1)
            self.cond_level_embed = nn.Sequential(nn.Linear(base, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.core = UNetCore(spec, emb_dim, emb_dim if spec.text_dim else 0)
        self.stages = nn.ModuleList(
            OuterStage(spec.width(i), spec.width(i - 1), spec.resolutions[i] // spec.resolutions[i - 1],
                       spec.stage_blocks, emb_dim)
            for i in range(1, levels)
        )
        io_levels = [self.resolutions.index(r) for r in self.io_resolutions]
        self.inputs = nn.ModuleDict(
            {str(self.resolutions[i]): nn.Conv2d(spec.channels, spec.width(i), 3, padding=1) for i in io_levels}
        )
        self.outputs = nn.ModuleDict({
            str(self.resolutions[i]): nn.Sequential(
                _norm(spec.width(i)), nn.SiLU(), nn.Conv2d(spec.width(i), spec.channels, 3, padding=1)
            )
            for i in io_levels
        })

    def _check_inputs(self, xs: Sequence[Tensor], labels: Tensor | None, text: Tensor | None,
                      text_mask: Tensor | None, cond_image: Tensor | None, cond_t: Tensor | None) -> None:
        if len(xs) != len(self.io_resolutions):
            raise ValueError(f"model expects {len(self.io_resolutions)} inputs at resolutions "
                             f"{list(self.io_resolutions)}, got {len(xs)}")
        b, c = xs[0].shape[0], self.spec.channels
        for x, r in zip(xs, self.io_resolutions):
            if x.ndim != 4 or tuple(x.shape) != (b, c, r, r):
                raise ValueError(f"input at resolution {r} must be [{b}, {c}, {r}, {r}], got {list(x.shape)}")
        if not self.spec.num_classes and labels is not None:
            raise ValueError("labels were passed to a model built with num_classes=0")
        if self.spec.num_classes and (labels is None or tuple(labels.shape) != (b,)):
            got = None if labels is None else list(labels.shape)
            raise ValueError(f"model expects labels of shape [{b}], got {got}")
        check_text(self.spec.text_dim, b, text, text_mask)
        cc, top = self.spec.cond_channels, self.resolutions[-1]
        if not cc and (cond_image is not None or cond_t is not None):
            raise ValueError("cond_image / cond_t were passed to a model built with cond_channels=0")
        if cc and (cond_image is None or tuple(cond_image.shape) != (b, cc, top, top)):
            got = None if cond_image is None else list(cond_image.shape)
            raise ValueError(f"model expects cond_image of shape [{b}, {cc}, {top}, {top}], got {got}")
        if cc and (cond_t is None or torch.as_tensor(cond_t).shape not in ((), (b,))):
            raise ValueError(f"model expects cond_t (the condition's noise level) of shape [{b}], got {cond_t}")

    def forward(
        self,
        xs: Sequence[Tensor],
        t: Tensor,
        labels: Tensor | None = None,
        drop_cond: Tensor | None = None,
        text: Tensor | None = None,
        text_mask: Tensor | None = None,
        cond_image: Tensor | None = None,
        cond_t: Tensor | None = None,
    ) -> list[Tensor]:
        """t: [B] timesteps shared by all resolutions; labels: [B] long; text: [B, N, text_dim]
        with text_mask [B, N] bool (False = padding); drop_cond: [B] bool, True = null class and
        null text. drop_cond=None drops with cond_drop_prob in training and nothing in eval.
        cond_image [B, cond_channels, R, R] at the top resolution R, noised to timestep cond_t [B]:
        the image condition of a model built with cond_channels (never dropped)."""
        self._check_inputs(xs, labels, text, text_mask, cond_image, cond_t)
        b, device = xs[0].shape[0], xs[0].device
        t = torch.as_tensor(t, device=device)
        t = t.expand(b) if t.ndim == 0 else t
        if drop_cond is None:
            drop_cond = (torch.rand(b, device=device) < self.spec.cond_drop_prob) if self.training else \
                torch.zeros(b, dtype=torch.bool, device=device)
        elif tuple(drop_cond.shape) != (b,):
            raise ValueError(f"drop_cond must be [{b}] bool, got {list(drop_cond.shape)}")

        emb = self.time_embed(timestep_embedding(t, self.spec.core_widths[0]))
        if self.label_embed is not None:
            emb = emb + self.label_embed(torch.where(drop_cond, self.spec.num_classes, labels))
        if self.spec.text_dim:
            tokens, padding = self.text_proj(text), None if text_mask is None else ~text_mask
            for layer in self.text_layers:  # learned over the frozen encoder's tokens, before the drop
                tokens = layer(tokens, src_key_padding_mask=padding)
            text, text_mask = null_text_tokens(tokens, text_mask, drop_cond, self.null_text)
        if self.spec.cond_channels:
            cond_t = torch.as_tensor(cond_t, device=device).expand(b)
            emb = emb + self.cond_level_embed(timestep_embedding(cond_t, self.spec.core_widths[0]))

        inputs = dict(zip(self.io_resolutions, xs))

        def join_input(h: Tensor | None, r: int) -> Tensor:
            if r not in inputs:
                return h
            x = self.inputs[str(r)](inputs[r])
            if self.spec.cond_channels and r == self.resolutions[-1]:
                x = x + self.cond_input(cond_image)
            return x if h is None else h + x

        h, skips = None, []
        for level in reversed(range(1, self.levels)):  # outermost stage first
            h, stage_skips = self.stages[level - 1].down_path(join_input(h, self.resolutions[level]), emb)
            skips.append(stage_skips)
        h = self.core(join_input(h, self.resolutions[0]), emb, text, text_mask)

        outs = {}
        for level, r in enumerate(self.resolutions):
            if level > 0:
                h = self.stages[level - 1].up_path(h, skips.pop(), emb)
            if r in inputs:
                outs[r] = self.outputs[str(r)](h)
        return [outs[r] for r in self.io_resolutions]


# -- the joint multi-resolution diffusion ---------------------------------------------------


def downsample_pyramid(x: Tensor, resolutions: Sequence[int], mode: str = "bilinear") -> list[Tensor]:
    """D^r(x) for each r: the coarse views of one image. MDM §3.1 uses bilinear interpolation
    (antialiased here, as an image resize is); "area" averages each r-block of pixels."""
    if mode not in DOWNSAMPLE_MODES:
        raise ValueError(f"unknown downsampling {mode!r}; expected one of {list(DOWNSAMPLE_MODES)}")
    side = x.shape[-1]
    if x.shape[-2] != side or any(side % r for r in resolutions):
        raise ValueError(f"image {x.shape[-2]}x{side} is not square or not a multiple of every "
                         f"resolution {list(resolutions)}")
    if mode == "area":
        return [F.avg_pool2d(x, side // r) if r < side else x for r in resolutions]
    return [F.interpolate(x, size=(r, r), mode="bilinear", antialias=True, align_corners=False) if r < side else x
            for r in resolutions]


def resolution_schedules(alphas_cumprod: Tensor, resolutions: Sequence[int], base_resolution: int,
                         power: float = 2.0) -> list[Tensor]:
    """ᾱ per resolution: the base schedule at base_resolution, SNR × (base / r)^power elsewhere."""
    return [shift_schedule(alphas_cumprod, resolution_snr_scale(r, base_resolution, power)) for r in resolutions]


def multires_loss(
    model: NestedUNet,
    x: Tensor,
    alphas_cumprod: Tensor,
    power: float = 2.0,
    weights: Sequence[float] | None = None,
    prediction: str = "v",
    generator: torch.Generator | None = None,
    downsample: str = "bilinear",
    **conditions: Tensor | None,
) -> tuple[Tensor, list[Tensor]]:
    """MDM's loss (Eq. 3): Σ_r ω_r · MSE_r over the model's output resolutions, each MSE on the
    prediction target (v by default: MDM's parameterization, App. C).

    x: clean images at (a multiple of) the model's top resolution; each resolution sees its
    downsampled view, noised with the same t but its own shifted schedule. ω defaults to 1 (the
    paper's default). Returns (total, [loss per resolution]). `conditions`: labels, text, ...
    """
    resolutions = model.io_resolutions
    weights = [1.0] * len(resolutions) if weights is None else list(weights)
    if len(weights) != len(resolutions):
        raise ValueError(f"weights needs one value per output resolution {list(resolutions)}, got {weights}")
    schedules = resolution_schedules(alphas_cumprod, resolutions, model.spec.resolutions[0], power)
    t = draw_timesteps(x.shape[0], len(alphas_cumprod), x, generator)
    x0s = downsample_pyramid(x, resolutions, downsample)
    noises = [draw_normal(x0.shape, x0, generator) for x0 in x0s]
    noisy = [q_sample(x0, t, n, a) for x0, n, a in zip(x0s, noises, schedules)]
    outs = model(noisy, t, **{k: v for k, v in conditions.items() if v is not None})
    losses = []
    for out, x0, noise, a in zip(outs, x0s, noises, schedules):
        a_t = a.to(x.device)[t].to(x.dtype).reshape(-1, 1, 1, 1)
        losses.append(F.mse_loss(out, prediction_target(x0, noise, a_t, prediction)))
    return sum(w * loss for w, loss in zip(weights, losses)), losses


def noised_upsample(low: Tensor, size: int, t: Tensor, alphas_cumprod: Tensor,
                    generator: torch.Generator | None = None) -> Tensor:
    """A cascade's condition (Ho et al. 2022b; MDM App. E.1): the low-resolution image upsampled
    (bilinear) to size x size and noised to timestep t [B] under the super-resolution model's own
    schedule. Random t in training is noise augmentation; sampling uses one fixed level, so the
    super-resolution model does not depend on the exact pixels of the first stage's samples."""
    up = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    noise = draw_normal(up.shape, up, generator)
    return q_sample(up, t, noise, alphas_cumprod.to(up.device)).to(up.dtype)


class PackedSchedule:
    """ᾱ_t per element of a packed multi-resolution state: resolution i's schedule repeated over
    its sizes[i] elements. Indexed like a [T] schedule but built per step, so no [T, D] table."""

    def __init__(self, schedules: Sequence[Tensor], sizes: Sequence[int]):
        if len(schedules) != len(sizes) or len({len(s) for s in schedules}) != 1:
            raise ValueError("PackedSchedule needs one schedule per size, all of the same length")
        self.table = torch.stack([s.double() for s in schedules], dim=1)  # [T, R]
        self.sizes = torch.tensor(list(sizes))

    def __len__(self) -> int:
        return self.table.shape[0]

    def __getitem__(self, t: int) -> Tensor:
        return torch.repeat_interleave(self.table[t], self.sizes)


def pack(xs: Sequence[Tensor]) -> Tensor:
    """[B, C, r, r] per resolution -> [B, D]: one state vector for the single-tensor samplers."""
    return torch.cat([x.flatten(1) for x in xs], dim=1)


def unpack(flat: Tensor, shapes: Sequence[tuple[int, ...]]) -> list[Tensor]:
    sizes = [math.prod(s) for s in shapes]
    return [part.reshape(-1, *s) for part, s in zip(flat.split(sizes, dim=1), shapes)]


@torch.no_grad()
def mdm_sample(
    model: NestedUNet,
    n: int,
    alphas_cumprod: Tensor,
    steps: int,
    sampler: str = "ddim",
    power: float = 2.0,
    prediction: str = "v",
    cfg_scale: float = 1.0,
    labels: Tensor | None = None,
    text: Tensor | None = None,
    text_mask: Tensor | None = None,
    threshold: float | None = None,
    generator: torch.Generator | None = None,
    cond_image: Tensor | None = None,
    cond_t: Tensor | None = None,
    **sampler_kwargs,
) -> list[Tensor]:
    """Sample every output resolution in parallel (MDM App. C): one model call per step denoises
    all of them, each under its own shifted schedule. Returns [n, C, r, r] per io resolution.
    cond_image / cond_t: the image condition of a cascade's super-resolution model."""
    shapes = [(model.spec.channels, r, r) for r in model.io_resolutions]
    schedules = resolution_schedules(alphas_cumprod, model.io_resolutions, model.spec.resolutions[0], power)
    schedule = PackedSchedule(schedules, [math.prod(s) for s in shapes])

    def packed_model(x: Tensor, t: Tensor, **kwargs) -> Tensor:
        return pack(model(unpack(x, shapes), t, **kwargs))

    denoiser = cfg_denoiser(packed_model, labels=labels, scale=cfg_scale, text=text, text_mask=text_mask,
                            cond_image=cond_image, cond_t=cond_t)
    noise = draw_normal((n, sum(math.prod(s) for s in shapes)), next(model.parameters()), generator)
    out = sample(sampler, denoiser, noise, schedule, steps, generator=generator, prediction=prediction,
                 threshold=threshold, **sampler_kwargs)
    return unpack(out, shapes)


# -- progressive training -------------------------------------------------------------------


def phase_for_step(phases: Sequence[Phase], step: int) -> int:
    """Index of the phase that global step `step` (0-based) belongs to."""
    end = 0
    for i, p in enumerate(phases):
        end += p.steps
        if 0 <= step < end:
            return i
    raise ValueError(f"step {step} is outside the {end} steps of the phase schedule")


def grow(model: NestedUNet, levels: int) -> NestedUNet:
    """The model over `levels` innermost resolutions of model.spec, with every weight of `model`
    reused; only the new outer stages (and their input/output convs) start fresh."""
    if not model.spec.nested:
        raise ValueError("grow needs a nested model: a plain UNet (nested=False) has no inner inputs to reuse")
    if levels <= model.levels:
        raise ValueError(f"grow to levels={levels} must exceed the model's {model.levels} levels")
    param = next(model.parameters())
    grown = NestedUNet(model.spec, levels).to(device=param.device, dtype=param.dtype)
    result = grown.load_state_dict(model.state_dict(), strict=False)
    new = tuple([f"stages.{i - 1}." for i in range(model.levels, levels)]
                + [f"{kind}.{r}." for kind in ("inputs", "outputs") for r in grown.resolutions[model.levels:]])
    unexpected_missing = [k for k in result.missing_keys if not k.startswith(new)]
    if result.unexpected_keys or unexpected_missing:
        raise ValueError(f"weights do not nest: unexpected {result.unexpected_keys}, missing {unexpected_missing}")
    return grown.train(model.training)



def model_for_step(model: NestedUNet | None, spec: NestedUNetSpec, phases: Sequence[Phase], step: int) -> NestedUNet:
    """The model to train at global `step`: a fresh one for the first phase (model=None), or
    `model` grown when `step` starts a later phase; otherwise `model` itself. A new object means a
    new set of parameters, so the caller rebuilds its optimizer."""
    levels = phases[phase_for_step(phases, step)].levels
    if model is None:
        return NestedUNet(spec, levels)
    if model.spec != spec:
        raise ValueError("model was built from a different spec than the phase schedule's")
    return model if model.levels == levels else grow(model, levels)
