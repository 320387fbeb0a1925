"""What the config is checked against, with no implementation behind it: the names each registry
accepts (samplers, schedules, U-ViT sizes, ...), the hierarchy's level shapes, the U-ViT patch rule,
and the NestedUNet's architecture and phase schedule as plain data. The implementations import these
(their registries are tested to agree), so validating a config never imports torch models.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from nds.config.errors import ConfigError

if TYPE_CHECKING:
    from nds.config.schema import Config

PREDICTIONS = ("eps", "v")  # what a denoiser regresses
SCHEDULES = ("linear", "scaled_linear", "cosine")  # nds.diffusion.process.SCHEDULE_FUNCTIONS
SAMPLERS = ("ddim", "ddpm", "dpm_solver", "dpm_solver++", "dpm_solver++_fast")  # nds.diffusion.process.SAMPLE_FUNCTIONS
TEXT_ENCODERS = ("minilm", "clip", "t5")
DOWNSAMPLE_MODES = ("bilinear", "area")  # how MDM makes the lower resolutions of an image
COND_INJECTIONS = ("kv", "tokens")  # how ẑ_{l+1} enters a U-ViT level (nds/models/uvit.py)
DATASETS = ("fashion_mnist", "digits", "image_folder", "coco2014")  # nds.data.DATASETS
ENCODERS = ("efficientnet_lite0", "dino_vit_b16", "clip_vit_b16", "moco_v3_vit_b16", "rcg_moco_v3", "vae", "pixels",
            "random_cnn")  # nds.latents.encoders.ENCODERS
LEVEL1_SOURCES = ("pixels", "vae")  # what z_1 is: the image, or an AutoencoderKL's codes of it
BAD_IMAGE_POLICIES = ("fail", "skip")  # what a file dataset does with a file that does not decode
PRECISIONS = ("auto", "bf16", "fp32")  # a fit's compute precision
REFERENCE_SPLITS = ("train", "test")  # where the metric's reference images come from

UVIT_SIZES = {
    "tiny": dict(width=64, depth=4, heads=2),
    "small": dict(width=512, depth=12, heads=8),
    "mid": dict(width=768, depth=16, heads=12),
    "large": dict(width=1024, depth=20, heads=16),
}
BASELINES = ("nested", "cascaded", "plain", "latent")


# -- the hierarchy's levels -----------------------------------------------------------------


@dataclass(frozen=True)
class LevelShape:
    h: int
    w: int
    c: int

    def __str__(self) -> str:
        return f"{self.h}x{self.w}x{self.c}"

    @property
    def dims(self) -> int:
        return self.h * self.w * self.c


_LEVEL_RE = re.compile(r"^(\d+)\s*[xX×]\s*(\d+)\s*[xX×]\s*(\d+)$")


def parse_spec(spec: str) -> list[LevelShape]:
    """'28x28x1, 4x4x32, 2x2x16' -> levels, level 1 (the image space) first, as the paper writes them."""
    levels = []
    for token in spec.split(","):
        m = _LEVEL_RE.match(token.strip())
        if m is None:
            raise ValueError(f"bad level {token.strip()!r} in hierarchy spec {spec!r}: expected HxWxC, e.g. 4x4x32")
        level = LevelShape(*(int(g) for g in m.groups()))
        if min(level.h, level.w, level.c) < 1:
            raise ValueError(f"bad level {token.strip()!r} in hierarchy spec {spec!r}: sizes must be >= 1")
        levels.append(level)
    return levels


def check_nesting(levels: list[LevelShape], feature_shape: tuple[int, int, int] | None = None) -> None:
    """Each level must carry no more than the one below it and fit in the encoder's feature map.

    ``feature_shape`` is the encoder's (C, h, w); levels >= 2 are cut from it.
    """
    if not levels:
        raise ValueError("hierarchy has no levels")
    for k in range(1, len(levels)):
        below, level, name = levels[k - 1], levels[k], f"level {k + 1} ({levels[k]})"
        if level.dims > below.dims:
            raise ValueError(f"{name} has more dimensions ({level.dims}) than level {k} ({below}, {below.dims})")
        if level.h > below.h or level.w > below.w:
            raise ValueError(f"{name} is spatially larger than level {k} ({below})")
        if feature_shape is not None:
            fc, fh, fw = feature_shape
            if level.c > fc:
                raise ValueError(f"{name} has more channels than the encoder's {fc}")
            if level.h > fh or level.w > fw:
                raise ValueError(f"{name} is larger than the encoder's {fh}x{fw} feature map")


def patch_size_for(h: int, w: int, max_grid: int) -> int:
    """Smallest patch that divides h and w and keeps the token grid within max_grid per side."""
    for p in range(1, min(h, w) + 1):
        if h % p == 0 and w % p == 0 and h // p <= max_grid and w // p <= max_grid:
            return p
    raise ValueError(f"no patch size divides {h}x{w} into a grid of at most {max_grid} per side")


# -- the NestedUNet and its phase schedule ------------------------------------------------------


@dataclass(frozen=True)
class NestedUNetSpec:
    """The full architecture; a model built with `levels=k` has the k innermost resolutions.

    nested=False builds the plain UNet of the same size (MDM App. D.1): the same blocks, but
    input and output at the top resolution only. cond_channels > 0 adds an image condition at the
    top resolution and the embedding of its noise level (a cascade's super-resolution stage).
    """

    resolutions: tuple[int, ...] = (16, 32)  # innermost first; each a power-of-two multiple of the last
    channels: int = 3
    core_widths: tuple[int, ...] = (64, 128)  # inner UNet width per level, halving resolution between
    core_blocks: int = 2
    attention_levels: tuple[int, ...] = (1,)  # core levels with self-attention; the middle always has it
    stage_widths: tuple[int, ...] = (32,)  # one per outer resolution
    stage_blocks: int = 2
    heads: int = 4
    num_classes: int = 0
    text_dim: int = 0
    text_layers: int = 2  # self-attention layers over the projected caption tokens (MDM §4.1)
    cond_drop_prob: float = 0.1
    nested: bool = True
    cond_channels: int = 0  # > 0: an image condition (a cascade's low-res image) joins the top input

    def __post_init__(self) -> None:  # lists from a YAML config become tuples: hashable, comparable
        for name in ("resolutions", "core_widths", "attention_levels", "stage_widths"):
            object.__setattr__(self, name, tuple(getattr(self, name)))

    def validate(self) -> None:
        res = self.resolutions
        if not res or min(res) < 1:
            raise ValueError(f"resolutions must be positive, got {res}")
        for small, large in zip(res, res[1:]):
            ratio = large // small
            if large % small or ratio < 2 or ratio & (ratio - 1):
                raise ValueError(f"resolution {large} is not a power-of-two multiple (>= 2x) of {small}")
        if not self.core_widths or min(self.core_widths) < 1:
            raise ValueError(f"core_widths must be positive, got {self.core_widths}")
        down = 2 ** (len(self.core_widths) - 1)
        if res[0] % down:
            raise ValueError(f"base resolution {res[0]} is not divisible by 2^{len(self.core_widths) - 1} "
                             f"(one halving between each of the {len(self.core_widths)} core_widths)")
        if len(self.stage_widths) != len(res) - 1 or (self.stage_widths and min(self.stage_widths) < 1):
            raise ValueError(f"stage_widths needs one positive width per outer resolution ({len(res) - 1}), "
                             f"got {self.stage_widths}")
        if any(not 0 <= i < len(self.core_widths) for i in self.attention_levels):
            raise ValueError(f"attention_levels {self.attention_levels} must index core_widths "
                             f"(0..{len(self.core_widths) - 1})")
        for i in {*self.attention_levels, len(self.core_widths) - 1}:
            if self.heads < 1 or self.core_widths[i] % self.heads:
                raise ValueError(f"core width {self.core_widths[i]} (level {i}, with attention) is not a "
                                 f"multiple of heads={self.heads}")
        for name in ("channels", "core_blocks", "stage_blocks"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.text_layers < 0:
            raise ValueError(f"text_layers must be >= 0, got {self.text_layers}")
        if self.num_classes < 0 or self.text_dim < 0 or self.cond_channels < 0:
            raise ValueError(f"num_classes, text_dim and cond_channels must be >= 0, got {self.num_classes}, "
                             f"{self.text_dim}, {self.cond_channels}")
        if not 0.0 <= self.cond_drop_prob <= 1.0:
            raise ValueError(f"cond_drop_prob must be in [0, 1], got {self.cond_drop_prob}")

    def width(self, level: int) -> int:
        """Feature width at resolutions[level] (where that resolution's input joins)."""
        return self.core_widths[0] if level == 0 else self.stage_widths[level - 1]


@dataclass(frozen=True)
class Phase:
    levels: int  # innermost resolutions trained in this phase
    steps: int


def make_phases(phases: Sequence[Phase | tuple[int, int]], num_levels: int) -> list[Phase]:
    """Validated phases from (levels, steps) pairs: levels strictly increasing and ending at
    num_levels (the full model); a phase may skip levels, as MDM's 64 -> 256 on a 3-level net."""
    out = [p if isinstance(p, Phase) else Phase(*p) for p in phases]
    if not out:
        raise ValueError("progressive training needs at least one phase")
    for i, p in enumerate(out):
        if p.steps < 1:
            raise ValueError(f"phase {i} has steps={p.steps}; every phase needs >= 1 step")
        if not 1 <= p.levels <= num_levels or (i and p.levels <= out[i - 1].levels):
            raise ValueError(f"phase {i} has levels={p.levels}; levels must increase strictly within 1..{num_levels}")
    if out[-1].levels != num_levels:
        raise ValueError(f"the last phase trains {out[-1].levels} levels; it must reach all {num_levels}")
    return out


def mdm_spec(cfg: Config, text_dim: int = 0) -> NestedUNetSpec:
    """The NestedUNet of the config; ``text_dim`` > 0: its core attends to caption tokens of that width
    (the text encoder's, which only the text layer knows)."""
    m = cfg.mdm
    return NestedUNetSpec(
        resolutions=m.resolutions, channels=m.channels, core_widths=m.core_widths, core_blocks=m.core_blocks,
        attention_levels=m.attention_levels, stage_widths=m.stage_widths, stage_blocks=m.stage_blocks,
        heads=m.heads, num_classes=m.num_classes, cond_drop_prob=m.cond_drop_prob, text_layers=m.text_layers,
        text_dim=text_dim,
    )


def latent_spec(cfg: Config, text_dim: int = 0) -> NestedUNetSpec:
    """The latent baseline's UNet: the innermost UNet of the NestedUNet, at the autoencoder's code size."""
    m = cfg.mdm
    return dataclasses.replace(mdm_spec(cfg, text_dim), resolutions=(m.resolutions[-1] // m.latent_downsample,),
                               stage_widths=(), channels=m.latent_channels)


def mdm_phases(cfg: Config) -> list[Phase]:
    """phase_steps[i] > 0 is a phase over the i+1 innermost resolutions; zeros are skipped."""
    steps = cfg.mdm.phase_steps
    return make_phases([(i + 1, n) for i, n in enumerate(steps) if n], len(cfg.mdm.resolutions))


def baseline_phases(cfg: Config, baseline: str) -> list[Phase]:
    """What ``baseline`` fits, in order, on the budget of the NestedUNet's schedule (nds/train/mdm.py's docstring)."""
    phases = mdm_phases(cfg)
    levels, total = len(cfg.mdm.resolutions), sum(p.steps for p in phases)
    if baseline == "nested":
        return phases
    if baseline == "plain":
        return [Phase(levels, total)]
    if baseline == "latent":
        return [Phase(1, total)]
    if baseline == "cascaded":
        low = total - phases[-1].steps
        if low < 1:
            raise ConfigError(f"the cascaded baseline trains its {cfg.mdm.resolutions[0]}px stage for the iterations "
                              f"mdm.phase_steps={cfg.mdm.phase_steps} spends before its last phase: there are none "
                              "(needs two resolutions and low-resolution steps)")
        return [Phase(1, low), Phase(levels, phases[-1].steps)]
    raise ConfigError(f"unknown MDM baseline '{baseline}'; known: {', '.join(BASELINES)}")
