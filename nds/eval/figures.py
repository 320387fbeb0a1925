"""Sample grids a person can read: tiles upscaled (nearest neighbour) to at least 512 px, a title,
labelled rows and columns.

The Fig. 1-style view of one nested sample has a row per level, top level first. Latent levels
(z_2 .. z_L) have no pixels of their own, so each is shown by the training image whose z_l is
nearest to the sampled z_l: the row reads "what this level decided", and the rows below show the
lower levels filling in detail conditioned on it. The last row is the generated image itself.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import matplotlib
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from nds.config import Config

MIN_WIDTH = 512  # px: the tiles of a grid are upscaled until the grid is at least this wide
FONT_SIZE = 14
GAP = 2  # px between tiles


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


def level_rows(samples: dict[int, torch.Tensor], train_latents: dict[int, np.ndarray],
               decode: Callable[[np.ndarray | torch.Tensor], np.ndarray]) -> dict[int, np.ndarray]:
    """uint8 [n, H, W, C] per level of n nested samples: level 1 decoded, a latent level shown by the
    training image nearest to it. ``decode`` turns z_1 into uint8 images (pixels rescaled, or the VAE)."""
    rows = {}
    for level in sorted(samples, reverse=True):
        if level == 1:
            rows[level] = decode(samples[1])
        else:
            rows[level] = decode(np.asarray(train_latents[1])[nearest_rows(samples[level], train_latents[level])])
    return rows


def _font() -> ImageFont.FreeTypeFont:
    """DejaVu Sans from matplotlib's data (it has σ and the other glyphs the labels use)."""
    return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts/ttf/DejaVuSans.ttf"), FONT_SIZE)


def labelled_grid(rows: Sequence[np.ndarray], title: str, row_labels: Sequence[str] = (),
                  column_labels: Sequence[str] = (), min_width: int = MIN_WIDTH) -> np.ndarray:
    """uint8 RGB [H, W, 3]: each row a uint8 [n, h, w, C] batch of tiles, upscaled by a whole factor
    so the tiles span at least ``min_width`` px, under ``title``, with a label left of each row and
    above each column."""
    n = max(len(r) for r in rows)
    h, w = rows[0].shape[1:3]
    scale = max(1, -(-min_width // (n * w)))
    font = _font()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_width = lambda text: int(measure.textlength(text, font=font))  # noqa: E731
    line = FONT_SIZE + 6
    left = 8 + max((text_width(t) for t in row_labels), default=0) + (8 if row_labels else 0)
    top = line + (line if column_labels else 0) + 4
    tile_w, tile_h = w * scale, h * scale
    width = max(left + n * (tile_w + GAP), text_width(title) + 16)
    canvas = Image.new("RGB", (width, top + len(rows) * (tile_h + GAP)), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((8, 3), title, fill="black", font=font)
    for j, label in enumerate(column_labels[:n]):
        draw.text((left + j * (tile_w + GAP) + (tile_w - text_width(label)) // 2, line + 2), label, fill="black", font=font)
    for i, tiles in enumerate(rows):
        y = top + i * (tile_h + GAP)
        if i < len(row_labels):
            draw.text((8, y + (tile_h - FONT_SIZE) // 2), row_labels[i], fill="black", font=font)
        for j, tile in enumerate(tiles):
            big = np.repeat(np.repeat(tile, scale, axis=0), scale, axis=1)
            canvas.paste(Image.fromarray(big[..., 0] if big.shape[-1] == 1 else big).convert("RGB"),
                         (left + j * (tile_w + GAP), y))
    return np.asarray(canvas)


def sample_grid(images: np.ndarray, side: int, title: str) -> np.ndarray:
    """The first side² samples (fewer if there are fewer) as a labelled side × side grid."""
    side = min(side, int(np.sqrt(len(images))))
    rows = [images[i * side : (i + 1) * side] for i in range(side)]
    return labelled_grid(rows, f"{title} — {side * side} samples")


def level_grid(samples: dict[int, torch.Tensor], train_latents: dict[int, np.ndarray],
               decode: Callable[[np.ndarray | torch.Tensor], np.ndarray], shapes: Sequence[str], title: str) -> np.ndarray:
    """The Fig. 1-style grid: a row per level, top level first, labelled with its level and shape
    (``shapes[l-1]`` is level l's); a column per nested sample."""
    rows = level_rows(samples, train_latents, decode)
    labels = [f"level {level} ({shapes[level - 1]})" + (": nearest training image" if level > 1 else ": sample")
              for level in rows]
    n = len(rows[1])
    return labelled_grid(list(rows.values()), title, labels, [f"#{j + 1}" for j in range(n)])


def chain_title(cfg: Config) -> str:
    """What a grid shows, in one line: depth, shapes, σ, guidance and seed."""
    h = cfg.hierarchy
    sigmas = ", ".join(f"σ_{level}={cfg.sigma(level):g}" for level in range(2, h.L + 1))
    parts = [f"L={h.L}", sigmas, f"guidance {cfg.diffusion.cfg_scale:g}" if h.L > 1 or cfg.model.num_classes
             or cfg.model.text_encoder else "", f"seed {cfg.seed}"]
    return " · ".join(p for p in parts if p)


def save_png(image: np.ndarray, path: Path) -> Path:
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path)
    return path
