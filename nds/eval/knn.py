"""Fig. 3: K nearest neighbours by each hierarchy level's features, two encoders side by side.

For each query image (test split) and each level l >= 2, the K training images whose
z_l (pooled, SVD-reduced, standardised; statistics fitted on the training images)
are closest in Euclidean distance.  A semantic encoder's neighbours share the
query's class even at coarse levels; a VAE bottleneck's share only low-level
layout.  ``label_agreement`` puts a number on that.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nds.config.specs import LevelShape
from nds.latents.hierarchy import encode_levels, fit_compressors

BANK_CHUNK = 4096  # bank rows per distance block: memory stays O(queries x chunk)


def nearest_neighbours(queries: np.ndarray, bank: np.ndarray, k: int) -> np.ndarray:
    """Indices ``[q, k]`` of the ``k`` bank rows nearest (Euclidean) to each query row, nearest first."""
    if queries.ndim != 2 or bank.ndim != 2 or queries.shape[1] != bank.shape[1]:
        raise ValueError(f"queries {queries.shape} and bank {bank.shape} must be [n, d] with the same d")
    if not 1 <= k <= len(bank):
        raise ValueError(f"k={k} must be between 1 and the bank size {len(bank)}")
    q = queries.astype(np.float64)
    best_d = np.full((len(q), 0), np.inf)
    best_i = np.zeros((len(q), 0), dtype=np.int64)
    for start in range(0, len(bank), BANK_CHUNK):
        b = np.asarray(bank[start : start + BANK_CHUNK], dtype=np.float64)
        d2 = (q**2).sum(1)[:, None] - 2.0 * q @ b.T + (b**2).sum(1)[None, :]
        cand_d = np.concatenate([best_d, d2], axis=1)
        cand_i = np.concatenate([best_i, np.broadcast_to(np.arange(start, start + len(b)), d2.shape)], axis=1)
        order = np.argsort(cand_d, axis=1, kind="stable")[:, :k]
        best_d, best_i = np.take_along_axis(cand_d, order, 1), np.take_along_axis(cand_i, order, 1)
    return best_i


def label_agreement(neighbours: np.ndarray, query_labels: np.ndarray, bank_labels: np.ndarray) -> float:
    """Fraction of neighbours sharing their query's label (chance = 1 / classes)."""
    return float((bank_labels[neighbours] == query_labels[:, None]).mean())


def levels_for(levels: list[LevelShape], feature_shape: tuple[int, int, int]) -> list[LevelShape]:
    """The requested levels cut to what an encoder's (C, h, w) map holds (a VAE has only 4 channels)."""
    c, h, w = feature_shape
    fitted: list[LevelShape] = []
    for level in levels:
        cut = LevelShape(min(level.h, h), min(level.w, w), min(level.c, c))
        if cut not in fitted:
            fitted.append(cut)
    return fitted


@dataclass
class Panel:
    """One encoder's neighbours: ``neighbours[i]`` are the indices for ``levels[i]``."""

    name: str
    levels: list[LevelShape]
    neighbours: list[np.ndarray]  # [queries, k] bank indices, one per level
    agreement: list[float]


def encoder_panel(name: str, levels: list[LevelShape], bank_features: np.ndarray, query_features: np.ndarray,
                  k: int, bank_labels: np.ndarray, query_labels: np.ndarray) -> Panel:
    """Fit each level's statistics on the bank (training) features, then find every query's neighbours."""
    levels = levels_for(levels, tuple(bank_features.shape[1:]))
    c, h, w = bank_features.shape[1:]
    spec = [LevelShape(h, w, c), *levels]  # level 1 stands for the feature map itself; levels >= 2 are compared
    compressors = fit_compressors(spec, bank_features)
    bank, query = encode_levels(spec, bank_features, compressors), encode_levels(spec, query_features, compressors)
    neighbours = [nearest_neighbours(zq.reshape(len(zq), -1), zb.reshape(len(zb), -1), k) for zq, zb in zip(query, bank)]
    agreement = [label_agreement(nn_idx, query_labels, bank_labels) for nn_idx in neighbours]
    return Panel(name, levels, neighbours, agreement)


def _show(ax, image: np.ndarray) -> None:
    ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray" if image.shape[-1] == 1 else None,
              vmin=0, vmax=255)
    ax.set_xticks([])
    ax.set_yticks([])


def render_figure(query_images: np.ndarray, bank_images, panels: list[Panel], path: str | Path,
                  title: str = "") -> Path:
    """Rows: (query, level); columns: the query, then each panel's level h x w x c and K neighbours. Saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_levels = max(len(p.levels) for p in panels)
    k = panels[0].neighbours[0].shape[1]
    rows, cols = len(query_images) * n_levels, 1 + len(panels) * (k + 1)  # query, then per panel: a gap and K images
    ratios = [1.0] + [0.3, *[1.0] * k] * len(panels)
    fig, axes = plt.subplots(rows, cols, figsize=(0.85 * sum(ratios), 0.9 * rows + 0.4), squeeze=False,
                             gridspec_kw={"wspace": 0.05, "hspace": 0.12, "width_ratios": ratios})
    for ax in axes.ravel():
        ax.axis("off")
    for q, query in enumerate(query_images):
        for li in range(n_levels):
            row = q * n_levels + li
            if li == 0:
                axes[row, 0].axis("on")
                _show(axes[row, 0], query)
                axes[row, 0].set_ylabel(f"query {q + 1}", fontsize=7)
            for p, panel in enumerate(panels):
                gap = 1 + p * (k + 1)
                if li >= len(panel.levels):
                    continue
                level = panel.levels[li]
                axes[row, gap].text(0.5, 0.5, f"{level.h}x{level.w}\nx{level.c}", ha="center", va="center",
                                    fontsize=6, transform=axes[row, gap].transAxes)
                for j, idx in enumerate(panel.neighbours[li][q]):
                    ax = axes[row, gap + 1 + j]
                    ax.axis("on")
                    _show(ax, np.asarray(bank_images[int(idx)]))
                if row == 0:
                    axes[row, gap + 1 + k // 2].set_title(panel.name, fontsize=8)
    height = fig.get_figheight()
    fig.subplots_adjust(top=1 - 0.45 / height)  # the default top margin is a fraction: far too wide on tall figures
    fig.suptitle(title or "K nearest neighbours by each level's features (rows: level h x w x c)", fontsize=9,
                 y=1 - 0.1 / height)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
