"""Fig. 1-style view of one nested sample: a row per level, top level first.

Latent levels (z_2 .. z_L) have no pixels of their own, so each is shown by the training image
whose z_l is nearest to the sampled z_l: the row reads "what this level decided", and the
rows below show the lower levels filling in detail conditioned on it. The last row is the
generated image itself.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch


def nearest_rows(sample: torch.Tensor, train: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Index of the nearest training latent (L2 over the flattened level) for each sample."""
    query = sample.detach().float().reshape(len(sample), -1)
    best_dist = torch.full((len(query),), float("inf"))
    best_idx = torch.zeros(len(query), dtype=torch.long)
    for start in range(0, len(train), chunk):
        block = torch.as_tensor(np.asarray(train[start : start + chunk], dtype=np.float32)).reshape(-1, query.shape[1])
        dist, idx = torch.cdist(query, block).min(dim=1)
        better = dist < best_dist
        best_dist[better], best_idx[better] = dist[better], idx[better] + start
    return best_idx.numpy()


def level_grid(samples: dict[int, torch.Tensor], train_latents: dict[int, np.ndarray],
               decode: Callable[[np.ndarray | torch.Tensor], np.ndarray]) -> np.ndarray:
    """uint8 [L*H, n*W, C]: row l (from the top) shows level L-l+1 of n nested samples.

    ``decode`` turns z_1 into uint8 images (pixels rescaled, or the VAE decoder).
    """
    rows = []
    for level in sorted(samples, reverse=True):
        if level == 1:
            images = decode(samples[1])
        else:
            images = decode(np.asarray(train_latents[1])[nearest_rows(samples[level], train_latents[level])])
        rows.append(np.concatenate(list(images), axis=1))
    return np.concatenate(rows, axis=0)
