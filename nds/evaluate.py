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
from nds.hierarchy import images_from_level1
from nds.models import count_params, forward_flops
from nds.sampling import nested_sample


@dataclass
class EvalReport:
    metrics: dict[str, float]
    artifacts: list[Path] = field(default_factory=list)


def prepare_metric(cfg: Config, reference_images: np.ndarray) -> dict:
    """Reference statistics, computed once in the sweep driver and shared by every trial."""
    e = cfg.eval
    return {"ref_stats": metrics.reference_stats(reference_images, e.inception_dir, e.substitute_image_size, e.batch_size)}


def level_costs(models: dict[int, nn.Module]) -> dict[str, float]:
    """GFLOPs of one forward (batch 1) and parameters of each level: the tables' cost columns."""
    costs = {}
    for level, model in models.items():
        h, w, c = model.input_shape
        cond = torch.zeros(1, model.cond_shape[2], *model.cond_shape[:2]) if model.cond_shape else None
        labels = torch.zeros(1, dtype=torch.long) if model.num_classes else None
        flops = forward_flops(model, torch.zeros(1, c, h, w), torch.zeros(1), cond=cond, labels=labels)
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


def generate_images(cfg: Config, models: dict[int, nn.Module], n: int) -> np.ndarray:
    """n images from the chain, in batches, with a fixed seed."""
    d = cfg.diffusion
    alphas = make_schedule(d.schedule, d.timesteps, beta_start=d.beta_start, beta_end=d.beta_end)
    sigmas = {level: cfg.sigma(level) for level in range(2, cfg.hierarchy.L + 1)}
    generator = torch.Generator().manual_seed(cfg.seed)
    batches = []
    for start in range(0, n, cfg.eval.batch_size):
        size = min(cfg.eval.batch_size, n - start)
        labels = torch.randint(cfg.model.num_classes, (size,), generator=generator) if cfg.model.num_classes else None
        samples = nested_sample(models, sigmas, size, alphas, d.sample_steps, cfg_scale=d.cfg_scale, eta=d.eta,
                                labels=labels, clip_images=d.clip_images, generator=generator)
        batches.append(images_from_level1(samples[1]))
    return np.concatenate(batches)


def evaluate_chain(cfg: Config, models: dict[int, nn.Module], metric_state: dict, out_dir: Path) -> EvalReport:
    from PIL import Image

    images = generate_images(cfg, models, cfg.eval.num_samples)
    sample_dir = metrics.write_pngs(images, out_dir / "samples")
    e = cfg.eval
    scores = metrics.sample_quality(sample_dir, metric_state["ref_stats"], e.inception_dir, e.substitute_image_size,
                                    e.batch_size)
    grid = image_grid(images, e.grid_size)
    grid_path = out_dir / "sample_grid.png"
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(grid_path)
    return EvalReport({**scores, **level_costs(models)}, [grid_path])
