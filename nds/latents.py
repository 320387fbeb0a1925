"""Every level's frozen training targets: data -> frozen encoder -> pooled/SVD/standardised latents.

Runs once per sweep in the driver, before Ray starts; both the encoder features and the
fitted hierarchy are cached on disk, keyed by what determines them, so later sweeps over
the same data and encoder skip the encoder entirely.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from nds.config import Config, ConfigError
from nds.data import load_dataset
from nds.encoders import build_encoder
from nds.hierarchy import (FeatureCache, build_hierarchy, cached_features, check_nesting, compressors_state,
                           fit_compressors, parse_spec)

log = logging.getLogger(__name__)


@dataclass
class PreparedLatents:
    latents: dict[int, np.ndarray]  # level (1 = image space) -> float32 [N, c, h, w], training split
    labels: np.ndarray  # int64 [N]
    class_names: list[str]
    reference_images: np.ndarray  # uint8 [M, H, W, C] test split, for the sample-quality metric


def _limit(n: int) -> int | None:
    return n or None


def prepare_latents(cfg: Config) -> PreparedLatents:
    """Targets for every level of ``hierarchy.spec`` (trials use the first L of them)."""
    levels = parse_spec(cfg.hierarchy.spec)
    d = cfg.data
    image_size = d.image_size or levels[0].h
    train = load_dataset(d.name, d.root, "train", _limit(d.train_limit), image_size)
    reference = load_dataset(d.name, d.root, "test", _limit(d.eval_limit), image_size)
    if train.images.shape[-1] != levels[0].c:
        raise ConfigError(f"hierarchy.spec level 1 ({levels[0]}) has {levels[0].c} channels but "
                          f"data '{d.name}' images have {train.images.shape[-1]}")

    encoder = build_encoder(cfg.encoder.name, cfg.encoder.image_size, cfg.encoder.weights or None)
    try:
        check_nesting(levels, encoder.feature_shape)
    except ValueError as err:
        raise ConfigError(f"hierarchy.spec '{cfg.hierarchy.spec}' does not fit encoder "
                          f"'{encoder.name}' (feature map {encoder.feature_shape}): {err}") from None

    cache = FeatureCache(cfg.cache_dir)
    dataset_key = {"name": d.name, "root": d.root, "split": "train", "limit": d.train_limit, "image_size": image_size}
    key = cache.key(kind="hierarchy", dataset=dataset_key, encoder=encoder.identity, spec=[str(s) for s in levels],
                    bf16=cfg.encoder.bf16)
    hit = cache.load(key)
    if hit is None:
        features = cached_features(cache, encoder, dataset_key, train.images, cfg.encoder.batch_size, cfg.encoder.bf16)
        compressors = fit_compressors(levels, features) if len(levels) > 1 else [None]
        hierarchy = build_hierarchy(levels, train.images, features if len(levels) > 1 else None, compressors)
        arrays = {f"z{k}": hierarchy.latent(k) for k in range(1, len(levels) + 1)}
        cache.save(key, {**arrays, **compressors_state(compressors)}, meta={"spec": cfg.hierarchy.spec})
        hit = cache.load(key)
    else:
        log.info("hierarchy cache hit %s: no encoder pass", key[:12])
    latents = {k: np.ascontiguousarray(hit[f"z{k}"]) for k in range(1, len(levels) + 1)}
    return PreparedLatents(latents, train.labels, train.class_names, reference.images)
