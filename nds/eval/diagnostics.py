"""Where a chain's error comes from: the chain diagnostic logged by every trial with L > 1.

The sample-quality metric of a chain mixes two errors: how well each level renders a given
condition, and how good the conditions are that the levels above sample for it. Each level
l < L is therefore also sampled from the *true* condition (z_{l+1} of held-out images, noised
with σ_{l+1} exactly as in sampling) and from the *null* condition (the classifier-free
guidance branch), and the levels below it complete the chain as usual. With the same noise in
every column (``nds.diffusion.chain``), on the same number of samples:

- ``<metric>/sampled`` − ``<metric>/level<l>/true_cond``: the share of the error that comes from
  the prior above level l (the sampled z_{l+1} against real ones);
- ``<metric>/level<l>/null_cond`` − ``.../true_cond``: how much level l uses its condition
  (about 0 for a level that ignores it).

Each latent level l >= 2 is compared with the held-out z_l in z space: ``level<l>/z_fd`` (a
Fréchet distance of the flattened latents), ``level<l>/z_std`` (the data's is about 1, by
standardisation) and ``level<l>/z_fd_floor``, the same distance between as many training and
held-out latents: the value a perfect sampler would get.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from nds.config import Config
from nds.diffusion.chain import sample_levels
from nds.eval.metrics import frechet, gaussian_stats
from nds.latents.text import TextBank


def true_cond_name(metric: str, level: int) -> str:
    return f"{metric}/level{level}/true_cond"


def null_cond_name(metric: str, level: int) -> str:
    return f"{metric}/level{level}/null_cond"


def sampled_name(metric: str) -> str:
    return f"{metric}/sampled"


def latent_stats(sampled: dict[int, torch.Tensor], held_out: dict[int, np.ndarray],
                 train_latents: dict[int, np.ndarray]) -> dict[str, float]:
    """z-space comparison of each sampled latent level with the held-out latents (see the module doc)."""
    stats = {}
    for level in sorted(level for level in sampled if level >= 2):
        z = sampled[level].flatten(1).numpy().astype(np.float64)
        reference = held_out[level].reshape(len(held_out[level]), -1).astype(np.float64)
        reference_stats = gaussian_stats(reference)
        floor = train_latents[level][: len(z)].reshape(min(len(z), len(train_latents[level])), -1)
        stats[f"level{level}/z_fd"] = frechet(z, reference_stats)
        stats[f"level{level}/z_fd_floor"] = frechet(floor.astype(np.float64), reference_stats)
        stats[f"level{level}/z_std"] = float(z.std())
    return stats


def chain_diagnostic(cfg: Config, models: dict[int, nn.Module], metric: str,
                     score: Callable[[np.ndarray], float], decode: Callable[[torch.Tensor], np.ndarray],
                     held_out: dict[int, np.ndarray], held_out_labels: np.ndarray | None = None,
                     text_bank: TextBank | None = None) -> dict[str, float]:
    """The true- and null-condition columns of a chain, on n samples (n = ``eval.diagnostic_samples``,
    at most ``eval.num_samples`` and the held-out count; ``diagnostic/samples``). The column they are
    read against, ``sampled_name(metric)``, is the chain's own first n samples: its caller has them.

    ``score`` maps uint8 images to ``metric``; ``decode`` maps sampled z_1 to uint8 images;
    ``held_out[l]`` is z_l of the held-out images (levels >= 2), ``held_out_labels`` their classes
    (class-conditional chains are given them with the true condition).
    """
    depth = max(models)
    n = min(cfg.eval.diagnostic_samples, cfg.eval.num_samples,
            *(len(held_out[level]) for level in range(2, depth + 1)))
    if depth < 2 or n < 2:
        return {}
    labels = None
    if held_out_labels is not None and (cfg.model.num_classes or text_bank is not None):
        labels = torch.as_tensor(held_out_labels[:n])
    out = {"diagnostic/samples": float(n)}
    for level in range(1, depth):
        given = torch.as_tensor(held_out[level + 1][:n])
        true = sample_levels(cfg, models, n, text_bank, start=level, given=given, labels=labels)
        null = sample_levels(cfg, models, n, text_bank, start=level, null_condition=True, labels=labels)
        out[true_cond_name(metric, level)] = score(decode(true[1]))
        out[null_cond_name(metric, level)] = score(decode(null[1]))
    return out
