"""Every level's frozen training targets: data -> frozen encoder -> pooled/SVD/standardised latents.

Runs once per sweep in the driver, before the trials; both the encoder features and the
fitted hierarchy (latents plus the SVD/standardisation statistics) are cached on disk,
keyed by what determines them, so later sweeps over the same data and encoder never run
the encoder (a hit does not even build it).  ``encoder.parallel`` extracts features in
Ray tasks; ``encoder.level1: vae`` makes z_1 the VAE latents of the images (the paper's
256 px -> 32x32x4), and :func:`level1_decoder` turns sampled z_1 back into pixels.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from nds.config import Config, ConfigError
from nds.config.specs import LevelShape, check_nesting, parse_spec
from nds.data import ImageSet, load_config_split
from nds.latents.encoders import EncoderSpec, load_vae
from nds.latents.hierarchy import (
    ChannelCompressor,
    FeatureCache,
    build_hierarchy,
    cached_features,
    compressors_from_state,
    compressors_state,
    encode_levels,
    fit_compressors,
    images_from_level1,
    images_from_vae_latents,
)

log = logging.getLogger(__name__)

VAE_DOWNSAMPLE = 8  # Stable Diffusion's VAE: 256 px images -> 32x32 latents


@dataclass
class PreparedLatents:
    latents: dict[int, np.ndarray]  # level (1 = image space) -> float32 [N, c, h, w], training split
    labels: np.ndarray  # int64 [N]
    class_names: list[str]
    # uint8 [M, H, W, C] (possibly lazily decoded): the metric's reference, data.eval_limit images of
    # eval.reference_split (the held-out split by default; the training split where a paper says so)
    reference_images: np.ndarray
    compressors: list[ChannelCompressor | None] = field(default_factory=list)  # fitted on train, from the cache
    captions: list[list[str]] | None = None  # COCO: every caption of training image i (row i of the latents)
    # z_2.. of data.eval_limit held-out (test split) images, with the compressors fitted on train: what the
    # chain diagnostic conditions on (the true condition) and compares sampled latents with
    held_out_latents: dict[int, np.ndarray] = field(default_factory=dict)
    held_out_labels: np.ndarray | None = None  # int64 [M]: their classes


def image_size(cfg: Config) -> int:
    """Pixel size the data is loaded at: data.image_size, else what level 1 needs."""
    level1 = parse_spec(cfg.hierarchy.spec)[0]
    return cfg.data.image_size or level1.h * (VAE_DOWNSAMPLE if cfg.encoder.level1 == "vae" else 1)


def load_split(cfg: Config, split: str, limit: int) -> ImageSet:
    return load_config_split(cfg, split, limit, image_size(cfg))


def dataset_key(cfg: Config, split: str, limit: int) -> dict:
    """Identifies a split's images in cache keys (shared by sweeps and the KNN figure)."""
    d = cfg.data
    key = {"name": d.name, "root": d.root, "split": split, "limit": limit, "image_size": image_size(cfg)}
    if d.captions:
        key["captions"] = d.captions
    return key


def encoder_spec(cfg: Config, in_channels: int) -> EncoderSpec:
    """The configured encoder, for images with ``in_channels`` channels."""
    e = cfg.encoder
    return EncoderSpec(e.name, e.image_size, e.weights or None, in_channels, e.cache_dir or None)


def level1_spec(cfg: Config, in_channels: int) -> EncoderSpec | None:
    """The VAE that forms z_1, or None for pixel-space z_1."""
    e = cfg.encoder
    if e.level1 == "pixels":
        return None
    return EncoderSpec("vae", image_size(cfg), e.level1_weights or None, in_channels, e.cache_dir or None)


def extraction_args(cfg: Config) -> dict:
    e = cfg.encoder
    return {"batch_size": e.batch_size, "bf16": e.bf16, "shard_size": e.shard_size, "cpus_per_task": e.cpus_per_task}


def prepare_latents(cfg: Config) -> PreparedLatents:
    """Targets for every level of ``hierarchy.spec`` (trials use the first L of them)."""
    levels = parse_spec(cfg.hierarchy.spec)
    d = cfg.data
    train = load_split(cfg, "train", d.train_limit)
    held_out = load_split(cfg, "test", d.eval_limit)
    reference = held_out if cfg.eval.reference_split == "test" else load_split(cfg, "train", d.eval_limit)
    channels = train.images.shape[-1]
    z1_spec = level1_spec(cfg, channels)
    if z1_spec is None and channels != levels[0].c:
        raise ConfigError(f"hierarchy.spec level 1 ({levels[0]}) has {levels[0].c} channels but "
                          f"data '{d.name}' images have {channels}")
    spec = encoder_spec(cfg, channels)
    if cfg.encoder.parallel:  # extraction fans out over the Ray the caller runs (a sweep's driver has one)
        import ray  # only here: the serial path needs no Ray

        if not ray.is_initialized():
            raise ConfigError("encoder.parallel=true extracts features in Ray tasks, but no Ray is running here: "
                              "run it inside a sweep (which starts or joins Ray), call ray.init() first, or set "
                              "encoder.parallel=false")

    cache = FeatureCache(cfg.cache_dir)
    train_key = dataset_key(cfg, "train", d.train_limit)
    key = cache.key(kind="hierarchy", dataset=train_key, encoder=spec.identity(), spec=[str(s) for s in levels],
                    level1=z1_spec.identity() if z1_spec else "pixels", bf16=cfg.encoder.bf16)
    hit = cache.load(key)
    if hit is None:
        hierarchy = _build(cfg, cache, levels, train, spec, z1_spec, train_key)
        arrays = {f"z{k}": hierarchy.latent(k) for k in range(1, len(levels) + 1)}
        cache.save(key, {**arrays, **compressors_state(hierarchy.compressors)}, meta={"spec": cfg.hierarchy.spec})
        hit = cache.load(key)
    else:
        log.info("hierarchy cache hit %s: no encoder pass", key[:12])
    latents = {k: np.ascontiguousarray(hit[f"z{k}"]) for k in range(1, len(levels) + 1)}
    stats = {name: np.asarray(arr) for name, arr in hit.items() if name.startswith("level")}
    compressors = compressors_from_state(stats, len(levels))
    return PreparedLatents(latents, train.labels, train.class_names, reference.images, compressors, train.captions,
                           _held_out_latents(cfg, cache, levels, held_out, spec, compressors), held_out.labels)


def _held_out_latents(cfg: Config, cache: FeatureCache, levels: list[LevelShape], held_out: ImageSet,
                      spec: EncoderSpec, compressors: list[ChannelCompressor | None]) -> dict[int, np.ndarray]:
    """z_2..z_n of the held-out split through the training split's compressors (features cached)."""
    if len(levels) < 2:
        return {}
    features = cached_features(cache, spec, dataset_key(cfg, "test", cfg.data.eval_limit), held_out.images,
                               **extraction_args(cfg))
    return dict(enumerate(encode_levels(levels, features, compressors), start=2))


def _build(cfg: Config, cache: FeatureCache, levels: list[LevelShape], train: ImageSet, spec: EncoderSpec,
           z1_spec: EncoderSpec | None, train_key: dict):
    """Features (cached), then SVD statistics fitted on them, then every level's latents."""

    def fits_encoder(shape: tuple[int, int, int]) -> None:
        try:
            check_nesting(levels, shape)
        except ValueError as err:
            raise ConfigError(f"hierarchy.spec '{cfg.hierarchy.spec}' does not fit encoder "
                              f"'{spec.name}' (feature map {shape}): {err}") from None

    def fits_level1(shape: tuple[int, int, int]) -> None:
        level = levels[0]
        if tuple(shape) != (level.c, level.h, level.w):
            raise ConfigError(f"hierarchy.spec level 1 ({level}) does not match the encoder.level1=vae latents "
                              f"{shape[1]}x{shape[2]}x{shape[0]} of {image_size(cfg)} px images (data.image_size)")

    features = None
    if len(levels) > 1:
        features = cached_features(cache, spec, train_key, train.images, check=fits_encoder, **extraction_args(cfg))
    z1 = None
    if z1_spec is not None:
        z1 = np.asarray(cached_features(cache, z1_spec, train_key, train.images, check=fits_level1,
                                        **extraction_args(cfg)))
    compressors = fit_compressors(levels, features) if features is not None else [None]
    return build_hierarchy(levels, train.images, features, compressors, level1=z1)


def level1_decoder(cfg: Config) -> Callable[[np.ndarray | torch.Tensor], np.ndarray]:
    """Sampled z_1 -> uint8 images: the inverse of how :func:`prepare_latents` formed z_1.

    Pixel-space z_1 is rescaled; VAE z_1 is decoded by the same AutoencoderKL.
    """
    spec = level1_spec(cfg, in_channels=3)
    if spec is None:
        return images_from_level1
    return functools.partial(images_from_vae_latents, vae=load_vae(spec))
