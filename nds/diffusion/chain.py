"""Top-down nested sampling: the top level first, each level below conditioned on a
noised copy of the level above (ẑ_{l+1} = z_{l+1} + σ_{l+1}·ε), down to image space.

The chain can also start lower, from a given z_{l+1} (e.g. the held-out latents of real
images: the *true condition*) or with the learned null condition, which is how the chain
diagnostic (:mod:`nds.eval.diagnostics`) splits a chain's error between its levels. Every level's
random draws come from generators keyed by (seed, level, stream), so the same seed gives
level l the same starting noise and the same condition noise whichever level the chain starts
from, and the first k of n samples do not depend on n: columns of the diagnostic differ only in
the condition.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from nds.config import Config
from nds.diffusion.process import Denoiser, cfg_denoiser, make_schedule, sample, split_prediction
from nds.latents.hierarchy import add_condition_noise
from nds.latents.text import TextBank, sampling_groups

NOISE, CONDITION_NOISE, SAMPLER_NOISE = range(3)  # a level's three streams of draws


def keyed_generator(*key: int) -> torch.Generator:
    """A torch generator fixed by a tuple of non-negative ints (independent streams per key)."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(key)).generate_state(1)[0]))


def eps_denoiser(denoiser: Denoiser, alphas_cumprod: torch.Tensor, prediction: str = "eps",
                 clip: float | None = None) -> Denoiser:
    """The ε implied by a model that predicts ε or v; with ``clip``, the implied x0 is clipped to
    [-clip, clip] first (DDPM's clip_denoised).

    Image space has a known range ([-1, 1]); a standardised latent level has unit variance per
    channel, so a bound of a few standard deviations keeps one bad early x0 estimate from being
    amplified through the deterministic sampler (see ``diffusion.latent_clip``).
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
                  steps: int, *, seed: tuple[int, ...], cfg_scale: float = 1.0, eta: float = 0.0,
                  labels: torch.Tensor | None = None, clip: dict[int, float] | None = None,
                  text: tuple[torch.Tensor, torch.Tensor] | None = None, prediction: str = "eps",
                  sampler: str = "ddim", start: int | None = None, given: torch.Tensor | None = None,
                  null_condition: bool = False) -> dict[int, torch.Tensor]:
    """Sample levels ``start``..1 of an L-level chain; returns ``{level: [n, c, h, w]}``.

    ``seed`` keys every draw: level l's come from ``keyed_generator(*seed, l, stream)``.
    ``models[l]`` is level l's denoiser (l = 1..L), predicting ``prediction`` (ε or v); ``sigmas[l]``
    is σ_l for l = 2..L; ``clip[l]`` bounds level l's implied x0 (absent: unbounded).
    ``labels`` are the classes class-conditional levels get as class tokens; ``text`` is one caption
    per example (tokens [n, N, dim], mask [n, N]: :meth:`nds.latents.text.TextBank.sample`), which conditions
    every level; guidance (``cfg_scale``) applies to all conditions at once.

    ``start`` (default: the top level L) is the first level sampled. Below the top it is conditioned
    on ``given`` (a clean z_{start+1}, noised with σ_{start+1} as in sampling) or, with
    ``null_condition``, on the null condition (the classifier-free-guidance branch, unguided).
    """
    depth = max(models)
    start = depth if start is None else start
    if not 1 <= start <= depth:
        raise ValueError(f"start level {start} is not in 1..{depth}")
    if start < depth and (given is None) == (not null_condition):
        raise ValueError(f"starting below the top (level {start} of {depth}) needs exactly one of a given "
                         f"z_{start + 1} or null_condition=True")
    if start == depth and (given is not None or null_condition):
        raise ValueError("the top level is unconditional: it takes no given condition or null condition")
    device = next((p.device for p in models[start].parameters()), torch.device("cpu"))  # draws: on the CPU, moved
    captions = dict(zip(("text", "text_mask"), text)) if text is not None else {}
    captions = {key: value.to(device) for key, value in captions.items()}
    labels = None if labels is None else labels.to(device)
    clip = clip or {}
    samples: dict[int, torch.Tensor] = {} if given is None else {start + 1: given.to(device)}
    for level in range(start, 0, -1):
        model = models[level]
        h, w, c = model.input_shape
        noise = torch.randn((n, c, h, w), generator=keyed_generator(*seed, level, NOISE)).to(device)
        cond, scale, drop = None, cfg_scale, False
        if null_condition and level == start:  # the model ignores cond under drop; any tensor of its shape
            ch, cw, cc = model.cond_shape
            cond, scale, drop = torch.zeros(n, cc, ch, cw, device=device), 1.0, True
        elif level < depth:
            cond = add_condition_noise(samples[level + 1], sigmas[level + 1],
                                       generator=keyed_generator(*seed, level, CONDITION_NOISE))
        denoiser = cfg_denoiser(model, cond, labels if model.num_classes else None, scale, drop=drop, **captions)
        denoiser = eps_denoiser(denoiser, alphas_cumprod, prediction, clip.get(level))
        samples[level] = sample(sampler, denoiser, noise, alphas_cumprod, steps, eta=eta,
                                generator=keyed_generator(*seed, level, SAMPLER_NOISE))
    return {level: z.cpu() for level, z in samples.items() if level <= start}


def noise_schedule(cfg: Config) -> torch.Tensor:
    """ᾱ_t of ``cfg.diffusion`` (every level of a chain, and the NestedUNet's base schedule)."""
    d = cfg.diffusion
    return make_schedule(d.schedule, d.timesteps, beta_start=d.beta_start, beta_end=d.beta_end)


def level_clips(cfg: Config, depth: int) -> dict[int, float]:
    """The bound on each level's implied x0 while sampling: [-1, 1] for pixel images (VAE latents have
    no such range), ± ``diffusion.latent_clip`` for the standardised latent levels."""
    d = cfg.diffusion
    clips = {1: 1.0} if d.clip_images and cfg.encoder.level1 == "pixels" else {}
    if d.latent_clip is not None:
        clips.update({level: d.latent_clip for level in range(2, depth + 1)})
    return clips


def sample_batches(n: int, batch_size: int, shards: int = 1) -> list[list[int]]:
    """The first indices of the batches of n samples (``eval.batch_size`` each), split into ``shards``
    contiguous runs of nearly equal length (fewer when there are fewer batches): what each evaluation
    shard samples. Batches are keyed by their first index, so any split gives the same samples."""
    firsts = list(range(0, n, batch_size))
    shards = max(1, min(shards, len(firsts)))
    bounds = np.linspace(0, len(firsts), shards + 1).round().astype(int)
    return [firsts[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def seeded_batches(cfg: Config, n: int, firsts: list[int] | None = None) -> list[tuple[int, int, torch.Generator]]:
    """(first index, size, generator keyed by (seed, first index)) of each batch of n samples in
    ``eval.batch_size`` batches, or of the batches ``firsts`` (:func:`sample_batches`) only: a batch's
    draws depend on nothing else, so any split of the batches gives the same samples."""
    b = cfg.eval.batch_size
    for first in firsts or ():
        if first % b or not 0 <= first < n:
            raise ValueError(f"{first} is not the first index of a batch of {n} samples in eval.batch_size {b}")
    return [(first, min(b, n - first), keyed_generator(cfg.seed, first))
            for first in (range(0, n, b) if firsts is None else firsts)]


def sample_levels(cfg: Config, models: dict[int, nn.Module], n: int, text_bank: TextBank | None = None, *,
                  start: int | None = None, given: torch.Tensor | None = None, null_condition: bool = False,
                  labels: torch.Tensor | None = None, firsts: list[int] | None = None) -> dict[int, torch.Tensor]:
    """n samples of levels ``start``..1 of the chain (default: all of them), in batches, seeded.

    Class-conditional levels get classes drawn uniformly, unless ``labels`` are given. With
    ``text_bank`` every level is conditioned on a caption of a group drawn uniformly: the class of
    the example for a class-name bank, a training image for a per-image bank (COCO; the paper's
    FID-30K draws validation captions instead, which would need the validation split's captions
    here). ``start``/``given``/``null_condition``: see :func:`nds.diffusion.chain.nested_sample`.
    Batch b's draws are keyed by (seed, b's first index): the first k samples are the same for any
    n >= k, and the same whichever level the chain starts from. ``firsts`` (of :func:`sample_batches`)
    samples only those batches of the n: one shard's share, the same samples as in the whole."""
    d = cfg.diffusion
    alphas = noise_schedule(cfg)
    sigmas = {level: cfg.sigma(level) for level in range(2, cfg.hierarchy.L + 1)}
    classes = cfg.model.num_classes
    clips = level_clips(cfg, max(models))
    batches = []
    for first, size, generator in seeded_batches(cfg, n, firsts):
        batch_labels = None
        if labels is not None:
            batch_labels = labels[first:first + size]
        elif classes:
            batch_labels = torch.randint(classes, (size,), generator=generator)
        text = None
        if text_bank is not None:
            text = text_bank.sample(sampling_groups(text_bank, batch_labels, size, generator), generator)[:2]
        batches.append(nested_sample(models, sigmas, size, alphas, d.sample_steps, seed=(cfg.seed, first),
                                     cfg_scale=d.cfg_scale, eta=d.eta, labels=batch_labels, clip=clips, text=text,
                                     prediction=d.prediction, sampler=d.sampler, start=start,
                                     given=None if given is None else given[first:first + size],
                                     null_condition=null_condition))
    return {level: torch.cat([b[level] for b in batches]) for level in batches[0]}
