"""Readable grids: tiles upscaled to at least 512 px with labels; the Fig. 1-style per-level grid shows
latent rows by their nearest training image."""
import numpy as np
import torch

from nds.eval.figures import MIN_WIDTH, labelled_grid, level_grid, level_rows, nearest_rows, sample_grid
from nds.latents.hierarchy import images_from_level1


def test_nearest_rows_finds_the_training_latent_a_sample_equals():
    rng = np.random.default_rng(0)
    train = rng.standard_normal((5000, 8, 2, 2)).astype(np.float32)
    picks = np.array([4999, 3, 4096, 17])
    sample = torch.from_numpy(train[picks]) + 1e-3
    assert nearest_rows(sample, train, chunk=1000).tolist() == picks.tolist()


def _two_levels():
    rng = np.random.default_rng(1)
    train = {1: rng.uniform(-1, 1, (50, 1, 8, 8)).astype(np.float32),
             2: rng.standard_normal((50, 4, 2, 2)).astype(np.float32)}
    samples = {1: torch.zeros(3, 1, 8, 8), 2: torch.from_numpy(train[2][[7, 8, 9]])}
    return samples, train


def test_level_rows_show_the_top_level_first_by_its_nearest_training_image():
    samples, train = _two_levels()
    rows = level_rows(samples, train, images_from_level1)
    assert list(rows) == [2, 1]
    np.testing.assert_array_equal(rows[2][0], images_from_level1(train[1][[7]])[0])  # top row: the neighbour
    assert (rows[1] == 128).all()  # bottom row: the sampled images (zeros -> mid grey)


def _tile_pixels(grid: np.ndarray, value: int) -> int:
    return int((grid == value).all(axis=-1).sum())


def test_a_grid_of_small_tiles_is_upscaled_to_a_readable_width_with_its_tiles_whole():
    tiles = np.full((3, 8, 8, 1), 200, np.uint8)
    tiles[1] = 37  # one tile in a value nothing else in the grid has
    grid = labelled_grid([tiles], "title")
    assert grid.ndim == 3 and grid.shape[2] == 3 and grid.dtype == np.uint8
    assert grid.shape[1] >= MIN_WIDTH
    scale = -(-MIN_WIDTH // (3 * 8))
    assert _tile_pixels(grid, 37) == (8 * scale) ** 2  # the tile, nearest-neighbour upscaled, not blurred
    plain = labelled_grid([tiles], "")
    assert (grid[:20] < 128).any() and not (plain[:20] < 128).any()  # the title is drawn at the top


def test_row_and_column_labels_take_room_beside_and_above_the_tiles():
    samples, train = _two_levels()
    bare = labelled_grid(list(level_rows(samples, train, images_from_level1).values()), "t")
    grid = level_grid(samples, train, images_from_level1, ["8x8x1", "2x2x4"], "t")
    assert grid.shape[0] > bare.shape[0] and grid.shape[1] > bare.shape[1]
    assert grid.shape[1] >= MIN_WIDTH


def test_a_sample_grid_is_square_and_takes_only_what_fits():
    images = np.random.default_rng(2).integers(0, 255, (10, 4, 4, 3), dtype=np.uint8)
    grid = sample_grid(images, side=8, title="s")  # 10 images: a 3 x 3 grid
    tile = -(-MIN_WIDTH // (3 * 4)) * 4
    assert grid.shape[1] >= 3 * tile and grid.shape[0] >= 3 * tile and grid.shape[0] < 4 * tile + 100
