"""Score a trained chain: nested samples -> sample-quality metric, cost per level, a sample grid."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nds import metrics
from nds.config import Config
from nds.diffusion import make_schedule
from nds.latents import level1_decoder
from nds.models import count_params, forward_flops
from nds.sampling import nested_sample
from nds.text import TextBank


@dataclass
class EvalReport:
    metrics: dict[str, float]
    artifacts: list[Path] = field(default_factory=list)


def prepare_metric(cfg: Config, reference_images: np.ndarray) -> dict:
    """What scoring needs, computed once in the sweep driver and shared by every trial: the data
    classifier (trained on a cache miss) at the reference images' size, and the reference statistics."""
    from nds.data_classifier import obtain_classifier

    e = cfg.eval
    classifier, accuracy = obtain_classifier(cfg, reference_images.shape[1]) if cfg.uses_data_classifier else (None, None)
    stats = metrics.reference_stats(reference_images, e.inception_dir, e.substitute_image_size, e.batch_size, classifier)
    return {"ref_stats": stats, "classifier": classifier, "classifier_accuracy": accuracy}


def score_images(cfg: Config, images: np.ndarray, metric_state: dict) -> dict[str, float]:
    """Every metric of uint8 [N,H,W,C] images against the reference (see ``nds.metrics``)."""
    e = cfg.eval
    return metrics.images_quality(images, metric_state["ref_stats"], e.inception_dir, e.substitute_image_size,
                                  e.batch_size, metric_state["classifier"])


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


def image_grid(images: np.ndarray, side: int) -> np.ndarray:
    """uint8 [N,H,W,C] -> one [side*H, side*W, C] mosaic of the first side² images."""
    n, h, w, c = images.shape
    side = min(side, int(np.sqrt(n)))
    tiles = images[: side * side].reshape(side, side, h, w, c)
    return tiles.transpose(0, 2, 1, 3, 4).reshape(side * h, side * w, c)


def sample_levels(cfg: Config, models: dict[int, nn.Module], n: int,
                  text_bank: TextBank | None = None) -> dict[int, torch.Tensor]:
    """n samples of every level of the chain, in batches, with a fixed seed.

    Class-conditional levels get classes drawn uniformly. With ``text_bank`` every level is
    conditioned on a caption of a group drawn uniformly: the class of the example for a class-name
    bank, a training image for a per-image bank (COCO; the paper's FID-30K draws validation
    captions instead, which would need the validation split's captions here)."""
    d = cfg.diffusion
    alphas = make_schedule(d.schedule, d.timesteps, beta_start=d.beta_start, beta_end=d.beta_end)
    sigmas = {level: cfg.sigma(level) for level in range(2, cfg.hierarchy.L + 1)}
    classes = cfg.model.num_classes
    clip_images = d.clip_images and cfg.encoder.level1 == "pixels"  # VAE latents have no [-1, 1] range
    generator = torch.Generator().manual_seed(cfg.seed)
    batches = []
    for start in range(0, n, cfg.eval.batch_size):
        size = min(cfg.eval.batch_size, n - start)
        labels = torch.randint(classes, (size,), generator=generator) if classes else None
        text = None
        if text_bank is not None:
            class_groups = labels is not None and not text_bank.groups_are_images  # captions of the drawn classes
            groups = labels if class_groups else torch.randint(text_bank.num_groups, (size,), generator=generator)
            text = text_bank.sample(groups, generator)[:2]
        batches.append(nested_sample(models, sigmas, size, alphas, d.sample_steps, cfg_scale=d.cfg_scale, eta=d.eta,
                                     labels=labels, clip_images=clip_images, generator=generator,
                                     text=text, prediction=d.prediction))
    return {level: torch.cat([b[level] for b in batches]) for level in batches[0]}


def generate_images(cfg: Config, models: dict[int, nn.Module], n: int,
                    text_bank: TextBank | None = None) -> np.ndarray:
    """n uint8 images from the chain: level 1 decoded to pixels as :func:`nds.latents.prepare_latents`
    formed it (rescaled pixels, or the VAE's decoder)."""
    return level1_decoder(cfg)(sample_levels(cfg, models, n, text_bank)[1])


def _save_png(image: np.ndarray, path: Path) -> Path:
    from PIL import Image

    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path)
    return path


def evaluate_chain(cfg: Config, models: dict[int, nn.Module], metric_state: dict, out_dir: Path,
                   text_bank: TextBank | None = None,
                   train_latents: dict[int, np.ndarray] | None = None) -> EvalReport:
    """Metric, per-level costs, a sample grid and, given the training latents of a chain with L > 1,
    the Fig. 1-style per-level grid (``nds.figures.level_grid``)."""
    from nds.figures import level_grid

    e = cfg.eval
    levels = sample_levels(cfg, models, e.num_samples, text_bank)
    decode = level1_decoder(cfg)
    images = decode(levels[1])
    scores = score_images(cfg, images, metric_state)
    artifacts = [_save_png(image_grid(images, e.grid_size), out_dir / "sample_grid.png")]
    if train_latents is not None and len(levels) > 1:
        columns = {level: z[: e.grid_size] for level, z in levels.items()}
        artifacts.append(_save_png(level_grid(columns, train_latents, decode), out_dir / "level_grid.png"))
    return EvalReport({**scores, **level_costs(models, text_bank)}, artifacts)
