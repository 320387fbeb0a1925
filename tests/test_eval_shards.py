"""Sharded evaluation: metric features computed in memory as clean-fid computes them from a folder, and
a chain's samples and metric the same for any number of shards."""
import numpy as np
import pytest
import torch
from PIL import Image

from nds.config import load_config
from nds.diffusion.chain import sample_batches
from nds.eval import metrics
from nds.eval.data_classifier import DataClassifier
from nds.eval.evaluate import merge_shards, sample_shard
from nds.train.engine import build_level_model


@pytest.mark.parametrize("channels", [1, 3])
def test_in_memory_features_are_clean_fids_folder_features(tmp_path, channels):
    from cleanfid import fid

    images = np.random.default_rng(channels).integers(0, 256, (9, 28, 28, channels), dtype=np.uint8)
    for i, image in enumerate(images):
        Image.fromarray(image[..., 0] if channels == 1 else image).save(tmp_path / f"{i:06d}.png")
    cpu = torch.device("cpu")
    extractor = metrics.extractors("/nonexistent", 64, cpu)[metrics.SUBSTITUTE]
    from_folder = fid.get_folder_features(str(tmp_path), model=extractor, num_workers=0, batch_size=4, device=cpu,
                                          mode="clean", verbose=False)
    np.testing.assert_allclose(metrics.image_features(images, extractor, 4, cpu), from_folder, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n, batch, shards", [(10, 3, 2), (10, 3, 3), (10, 3, 9), (7, 7, 2), (12, 4, 1)])
def test_sample_batches_split_every_batch_once_in_order(n, batch, shards):
    split = sample_batches(n, batch, shards)
    assert [first for part in split for first in part] == list(range(0, n, batch))
    assert all(split) and len(split) == min(shards, -(-n // batch))
    assert max(map(len, split)) - min(map(len, split)) <= 1


def test_any_shard_count_gives_the_same_samples_and_metric():
    cfg = load_config(None, ["hierarchy.L=2", "eval.num_samples=10", "eval.batch_size=3", "eval.grid_size=2",
                             "diffusion.sample_steps=3", "eval.substitute_image_size=32", "diffusion.cfg_scale=2"])
    torch.manual_seed(0)
    models = {level: build_level_model(cfg, level).eval() for level in (1, 2)}
    classifier = DataClassifier(1, 10, 28).eval()
    reference = np.random.default_rng(0).integers(0, 256, (20, 28, 28, 1), dtype=np.uint8)
    e = cfg.eval
    state = {"classifier": classifier,
             "ref_stats": metrics.reference_stats(reference, e.inception_dir, e.substitute_image_size, 8, classifier)}
    runs = {shards: merge_shards([sample_shard(cfg, models, state, firsts)
                                  for firsts in sample_batches(e.num_samples, e.batch_size, shards)])
            for shards in (1, 2, 4)}
    one = runs[1]
    assert set(one.features) == {metrics.SUBSTITUTE, metrics.DATA_CLASSIFIER}
    assert len(one.levels[2]) == 10 and len(one.levels[1]) == 4  # latent levels whole, level 1: the grid's
    for shards, merged in runs.items():
        for name in one.features:
            np.testing.assert_array_equal(merged.features[name], one.features[name])
        for level in one.levels:
            torch.testing.assert_close(merged.levels[level], one.levels[level], rtol=0, atol=0)
        assert metrics.distances(merged.features, state["ref_stats"]) == metrics.distances(one.features,
                                                                                            state["ref_stats"])
    with pytest.raises(ValueError, match="not the first index of a batch"):
        sample_shard(cfg, models, state, [4])


def test_reference_stats_are_computed_once_per_images_and_feature_model(tmp_path):
    from nds.config import replace
    from nds.eval.evaluate import cached_reference_stats

    cfg = load_config(None, [f"paths.cache_dir={tmp_path}", "eval.data_classifier=false",
                             "eval.substitute_image_size=32"])
    images = np.random.default_rng(0).integers(0, 256, (12, 28, 28, 1), dtype=np.uint8)
    first = cached_reference_stats(cfg, images, None)
    assert len(list((tmp_path / "reference_stats").glob("*.npz"))) == 1
    hit = cached_reference_stats(cfg, 255 - images, None)  # a hit reads the file: the images are not looked at
    for name, (mu, sigma) in first.items():
        np.testing.assert_array_equal(hit[name][0], mu)
        np.testing.assert_array_equal(hit[name][1], sigma)
    other_model = cached_reference_stats(replace(cfg, **{"eval.substitute_image_size": 48}), images, None)
    assert len(list((tmp_path / "reference_stats").glob("*.npz"))) == 2
    assert not np.allclose(other_model[metrics.SUBSTITUTE][0], first[metrics.SUBSTITUTE][0])
    cached_reference_stats(replace(cfg, **{"data.eval_limit": 12}), images, None)  # other reference images
    assert len(list((tmp_path / "reference_stats").glob("*.npz"))) == 3


def test_an_mdm_cascade_scores_the_same_in_any_number_of_shards(tmp_path):
    """A text-conditional cascade (both stages, the second conditioned on the first's noised samples):
    its samples, metric features and caption agreement are the same whatever the shards."""
    from nds.config import REPO_ROOT
    from nds.sweep.mdm import score_shard, sharded_scores
    from nds.train.mdm import generate, phase_module, prepare_images

    cfg = load_config(None, ["data.name=digits", "data.train_limit=40", "mdm.resolutions=[4,8]",
                             "mdm.core_widths=[16,32]", "mdm.stage_widths=[8]", "mdm.heads=2", "mdm.num_classes=0",
                             "mdm.phase_steps=[4,4]", "mdm.baseline=cascaded", "model.text_encoder=minilm",
                             "diffusion.cfg_scale=2", "diffusion.sample_steps=3", "eval.num_samples=10",
                             "eval.batch_size=3", "eval.grid_size=2", "eval.substitute_image_size=32",
                             f"paths.runs_dir={tmp_path}", f"paths.cache_dir={REPO_ROOT / 'runs' / 'test-cache'}"])
    bank = prepare_images(cfg)["text"]
    torch.manual_seed(0)
    models = [phase_module(cfg, "cascaded", stage).eval() for stage in (0, 1)]
    classifier = DataClassifier(1, 10, 8).eval()
    reference = np.random.default_rng(0).integers(0, 256, (20, 8, 8, 1), dtype=np.uint8)
    e = cfg.eval
    state = {"classifier": classifier,
             "ref_stats": metrics.reference_stats(reference, e.inception_dir, e.substitute_image_size, 8, classifier)}
    whole = generate(cfg, models, e.num_samples, bank)
    runs = {shards: sharded_scores(cfg, [score_shard(cfg, models, state, firsts, bank, agreement=True)
                                         for firsts in sample_batches(e.num_samples, e.batch_size, shards)], state)
            for shards in (1, 3)}
    scores, grid = runs[1]
    assert set(scores) == {metrics.SUBSTITUTE, metrics.DATA_CLASSIFIER, metrics.CAPTION_CLASS_ACCURACY}
    assert scores == metrics.images_quality(whole.images, state["ref_stats"], e.inception_dir, e.substitute_image_size,
                                            e.batch_size, classifier) | metrics.text_agreement(
        whole.images, whole.captions, whole.caption_classes, "", classifier, e.batch_size)
    np.testing.assert_array_equal(grid, whole.images[:4])
    for merged, merged_grid in runs.values():
        assert merged == scores
        np.testing.assert_array_equal(merged_grid, grid)
    with pytest.raises(ValueError, match="not the first index of a batch"):
        score_shard(cfg, models, state, [4], bank)
