"""Score a trained chain: nested samples -> sample-quality metric, cost per level, a sample grid."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nds.config import Config, config_hash
from nds.data import load_config_split
from nds.diffusion.chain import sample_levels
from nds.eval import metrics
from nds.eval.data_classifier import classifier_key, obtain_classifier
from nds.eval.diagnostics import chain_diagnostic, latent_stats, sampled_name
from nds.eval.figures import chain_title, level_grid, sample_grid, save_png
from nds.files import atomic_path
from nds.latents.prepare import dataset_key, level1_decoder
from nds.latents.text import TextBank
from nds.models.uvit import count_params, forward_flops


@dataclass
class EvalReport:
    metrics: dict[str, float]
    artifacts: list[Path] = field(default_factory=list)


def reference_stats_key(cfg: Config, image_size: int) -> dict:
    """What a sweep's reference statistics depend on: the reference images (data, split, count, size) and
    each metric's feature model."""
    e = cfg.eval
    features: dict = {metrics.SUBSTITUTE: {"image_size": e.substitute_image_size}}
    if metrics.inception_available(e.inception_dir):
        features[metrics.FID] = metrics.INCEPTION_FILE
    if cfg.uses_data_classifier:
        features[metrics.DATA_CLASSIFIER] = classifier_key(cfg, image_size)
    return {"images": dataset_key(cfg, e.reference_split, cfg.data.eval_limit), "features": features}


def cached_reference_stats(cfg: Config, reference_images: np.ndarray, classifier) -> dict:
    """Each metric's (mu, sigma) of the reference images, computed once per :func:`reference_stats_key`
    and kept under ``paths.cache_dir`` (at paper scale: 50,000 images through Inception)."""
    e = cfg.eval
    path = cfg.cache_dir / "reference_stats" / f"{config_hash(reference_stats_key(cfg, reference_images.shape[1]))}.npz"
    if path.is_file():
        with np.load(path) as saved:
            return {name: (saved[f"{name}/mu"], saved[f"{name}/sigma"]) for name in saved["names"]}
    stats = metrics.reference_stats(reference_images, e.inception_dir, e.substitute_image_size, e.batch_size, classifier)
    arrays = {f"{name}/{part}": value for name, (mu, sigma) in stats.items() for part, value in (("mu", mu), ("sigma", sigma))}
    with atomic_path(path) as tmp, tmp.open("wb") as f:  # a concurrent sweep reads a whole file or none
        np.savez(f, names=np.array(list(stats)), **arrays)
    return stats


def prepare_metric(cfg: Config, reference_images: np.ndarray) -> dict:
    """What scoring needs, computed once in the sweep driver and shared by every trial: the data
    classifier (trained on a cache miss) at the reference images' size, and the reference statistics
    (cached too)."""
    classifier, accuracy = obtain_classifier(cfg, reference_images.shape[1]) if cfg.uses_data_classifier else (None, None)
    stats = cached_reference_stats(cfg, reference_images, classifier)
    ranking = metrics.quality_metric_name(cfg.eval.inception_dir, cfg.uses_data_classifier)
    state = {"ref_stats": stats, "classifier": classifier, "classifier_accuracy": accuracy, "ranking": ranking}
    return {**state, "anchors": metric_anchors(cfg, state, reference_images)}


def metric_anchors(cfg: Config, metric_state: dict, reference_images: np.ndarray) -> dict[str, float]:
    """Where the ranking metric sits for known image sets of a trial's sample count: real training
    images (the best a model can do) and uniform noise (learned nothing). Plots draw them, so a
    difference reads against the metric's whole range."""
    n = min(cfg.eval.num_samples, len(reference_images))
    size = reference_images.shape[1]
    real = np.asarray(load_config_split(cfg, "train", n, size).images[:n])
    noise = np.random.default_rng(0).integers(0, 256, (n, *reference_images.shape[1:]), dtype=np.uint8)
    ranking = metric_state["ranking"]
    return {metrics.anchor_name(ranking, what): score_images(cfg, images, metric_state, names=(ranking,))[ranking]
            for what, images in (("real", real), ("noise", noise))}


def score_images(cfg: Config, images: np.ndarray, metric_state: dict,
                 names: tuple[str, ...] | None = None) -> dict[str, float]:
    """Every metric (or those in ``names``) of uint8 [N,H,W,C] images against the reference (``nds.eval.metrics``)."""
    e = cfg.eval
    return metrics.images_quality(images, metric_state["ref_stats"], e.inception_dir, e.substitute_image_size,
                                  e.batch_size, metric_state["classifier"], names)


def level_costs(models: dict[int, nn.Module], text_bank: TextBank | None = None) -> dict[str, float]:
    """GFLOPs of one forward (batch 1) and parameters of each level: the tables' cost columns.

    Text-conditional levels are counted with the tokens of the bank's example caption."""
    costs = {}
    text = dict(zip(("text", "text_mask"), text_bank.example())) if text_bank is not None else {}
    for level, model in models.items():
        if model.text_dim and text_bank is None:
            raise ValueError(f"level {level} is text-conditional: level_costs needs its text_bank")
        h, w, c = model.input_shape
        cond = torch.zeros(1, model.cond_shape[2], *model.cond_shape[:2]) if model.cond_shape else None
        labels = torch.zeros(1, dtype=torch.long) if model.num_classes else None
        flops = forward_flops(model, torch.zeros(1, c, h, w), torch.zeros(1), cond=cond, labels=labels,
                              **(text if model.text_dim else {}))
        costs[f"level{level}/gflops"] = flops / 1e9
        costs[f"level{level}/params"] = float(count_params(model))
    costs["total/gflops"] = sum(v for k, v in costs.items() if k.endswith("/gflops"))
    costs["total/params"] = sum(v for k, v in costs.items() if k.endswith("/params"))
    return costs


def generate_images(cfg: Config, models: dict[int, nn.Module], n: int,
                    text_bank: TextBank | None = None) -> np.ndarray:
    """n uint8 images from the chain: level 1 decoded to pixels as :func:`nds.latents.prepare.prepare_latents`
    formed it (rescaled pixels, or the VAE's decoder)."""
    return level1_decoder(cfg)(sample_levels(cfg, models, n, text_bank)[1])


@dataclass
class ChainSamples:
    """What evaluation shards return of their batches (concatenated, of the whole sample set): each
    metric's features of every image, every latent level's samples (levels >= 2: the z-space
    statistics) and level 1's first ``eval.grid_size``² samples (the grids). The images themselves stay
    in the shard: at paper scale they would not fit a message."""

    features: dict[str, np.ndarray]
    levels: dict[int, torch.Tensor]


def sample_shard(cfg: Config, models: dict[int, nn.Module], metric_state: dict, firsts: list[int],
                 text_bank: TextBank | None = None, device: torch.device = torch.device("cpu")) -> ChainSamples:
    """The batches ``firsts`` (:func:`nds.diffusion.chain.sample_batches`) of the chain's
    ``eval.num_samples`` samples, decoded and passed through every metric's features on ``device``."""
    e = cfg.eval
    levels = sample_levels(cfg, models, e.num_samples, text_bank, firsts=firsts)
    images = level1_decoder(cfg)(levels[1])
    features = metrics.metric_features(images, e.inception_dir, e.substitute_image_size, e.batch_size,
                                       metric_state["classifier"], tuple(metric_state["ref_stats"]), device)
    head = max(0, min(e.grid_size ** 2 - firsts[0], len(images)))
    return ChainSamples(features, {**levels, 1: levels[1][:head]})


def merge_shards(shards: list[ChainSamples]) -> ChainSamples:
    """Shards' samples in shard order (shards hold contiguous runs of batches): the whole sample set."""
    return ChainSamples({name: np.concatenate([s.features[name] for s in shards]) for name in shards[0].features},
                        {level: torch.cat([s.levels[level] for s in shards]) for level in shards[0].levels})


def diagnostic(cfg: Config, models: dict[int, nn.Module], metric_state: dict, held_out: dict[int, np.ndarray],
               held_out_labels: np.ndarray | None = None, text_bank: TextBank | None = None) -> dict[str, float]:
    """The chain diagnostic's true- and null-condition columns (``nds.eval.diagnostics``) in the metric
    that ranks the sweep; empty where it does not apply: L = 1, ``eval.diagnostic_samples`` 0, or a
    per-image caption bank (COCO: the held-out images' captions are not at hand)."""
    if len(models) < 2 or not cfg.eval.diagnostic_samples or (text_bank is not None and text_bank.groups_are_images):
        return {}
    ranking = metric_state["ranking"]

    def ranking_score(images: np.ndarray) -> float:
        return score_images(cfg, images, metric_state, names=(ranking,))[ranking]

    return chain_diagnostic(cfg, models, ranking, ranking_score, level1_decoder(cfg), held_out, held_out_labels,
                            text_bank)


def evaluate_chain(cfg: Config, models: dict[int, nn.Module], samples: ChainSamples, metric_state: dict,
                   out_dir: Path, text_bank: TextBank | None = None,
                   train_latents: dict[int, np.ndarray] | None = None, held_out: dict[int, np.ndarray] | None = None,
                   diagnosed: dict[str, float] | None = None) -> EvalReport:
    """Metric of the chain's ``samples`` (its shards, merged), per-level costs (of ``models``: the
    architectures count, not their weights), a sample grid and, given
    the training latents of a chain with L > 1, the Fig. 1-style per-level grid
    (``nds.eval.figures.level_grid``) and, given the held-out latents, their z-space statistics;
    ``diagnosed`` (:func:`diagnostic`) is read against the chain's own first samples."""
    e = cfg.eval
    levels = samples.levels
    decode = level1_decoder(cfg)
    images = decode(levels[1])
    ref_stats = metric_state["ref_stats"]
    scores = metrics.distances(samples.features, ref_stats)
    title = chain_title(cfg)
    artifacts = [save_png(sample_grid(images, e.grid_size, title), out_dir / "sample_grid.png")]
    if train_latents is not None and len(levels) > 1:
        columns = {level: z[: e.grid_size] for level, z in levels.items()}
        grid = level_grid(columns, train_latents, decode, [str(shape) for shape in cfg.levels], title)
        artifacts.append(save_png(grid, out_dir / "level_grid.png"))
        if held_out and e.diagnostic_samples:
            scores.update(latent_stats(levels, held_out, train_latents))
    if diagnosed:
        ranking, n = metric_state["ranking"], int(diagnosed["diagnostic/samples"])
        scores.update({**diagnosed, sampled_name(ranking): metrics.frechet(samples.features[ranking][:n],
                                                                            ref_stats[ranking])})
    return EvalReport({**scores, **level_costs(models, text_bank), **metric_state.get("anchors", {})}, artifacts)
