"""Fig. 1-style per-level grid: latent rows are shown by their nearest training image."""
import numpy as np
import torch

from nds.figures import level_grid, nearest_rows
from nds.hierarchy import images_from_level1


def test_nearest_rows_finds_the_training_latent_a_sample_equals():
    rng = np.random.default_rng(0)
    train = rng.standard_normal((5000, 8, 2, 2)).astype(np.float32)
    picks = np.array([4999, 3, 4096, 17])
    sample = torch.from_numpy(train[picks]) + 1e-3
    assert nearest_rows(sample, train, chunk=1000).tolist() == picks.tolist()


def test_level_grid_has_a_row_per_level_top_first():
    rng = np.random.default_rng(1)
    train = {1: rng.uniform(-1, 1, (50, 1, 8, 8)).astype(np.float32),
             2: rng.standard_normal((50, 4, 2, 2)).astype(np.float32)}
    samples = {1: torch.zeros(3, 1, 8, 8), 2: torch.from_numpy(train[2][[7, 8, 9]])}
    grid = level_grid(samples, train, images_from_level1)
    assert grid.shape == (2 * 8, 3 * 8, 1) and grid.dtype == np.uint8
    np.testing.assert_array_equal(grid[:8, :8], images_from_level1(train[1][[7]])[0])  # top row: the neighbour
    assert (grid[8:] == 128).all()  # bottom row: the sampled images (zeros -> mid grey)
