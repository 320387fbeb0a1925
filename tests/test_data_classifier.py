"""nds.eval.data_classifier: the CNN behind fd_data_classifier, trained on the data's labelled split and cached."""
import numpy as np
import pytest
import torch

from nds.config import load_config
from nds.eval.data_classifier import DataClassifier, obtain_classifier
from nds.eval.evaluate import prepare_metric, score_images
from nds.eval.metrics import DATA_CLASSIFIER, SUBSTITUTE, anchor_name, quality_metric_name
from nds.latents.prepare import load_split

STEPS = 150


def digits_config(tmp_path, *overrides):
    return load_config(None, ["data.name=digits", "hierarchy.spec='8x8x1, 2x2x8'", "data.eval_limit=100",
                              "eval.substitute_image_size=64", "eval.batch_size=100",
                              f"eval.classifier_steps={STEPS}", f"paths.runs_dir={tmp_path}", *overrides])


def test_classifier_learns_the_classes_and_is_cached(tmp_path):
    cfg = digits_config(tmp_path)
    model, accuracy = obtain_classifier(cfg, 8)
    assert accuracy > 0.8  # digits' 10 classes, chance is 0.1
    [cached] = (cfg.cache_dir / "data_classifier").glob("*.pt")
    stamp = cached.stat().st_mtime_ns
    again, again_accuracy = obtain_classifier(cfg, 8)
    assert cached.stat().st_mtime_ns == stamp and again_accuracy == accuracy  # loaded, not retrained
    for name, value in model.state_dict().items():
        assert torch.equal(value, again.state_dict()[name]), name
    other, _ = obtain_classifier(digits_config(tmp_path, f"eval.classifier_steps={STEPS + 1}"), 8)
    assert len(list((cfg.cache_dir / "data_classifier").glob("*.pt"))) == 2  # another setting, another entry


def test_features_resize_any_input_to_the_training_size():
    """A 16 px copy of an 8 px image (each pixel doubled) reads like the 8 px image, not like 16 px
    input fed to the trunk as it is (global pooling alone would accept any size)."""
    torch.manual_seed(0)
    model = DataClassifier(channels=1, num_classes=3, image_size=8)
    small = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 1), dtype=np.uint8)
    large = small.repeat(2, axis=1).repeat(2, axis=2)
    resized, native = model.features(large, batch_size=2), model.features(small)
    assert resized.shape == (5, model.feature_dim)
    with torch.no_grad():
        unresized = model.pooled(torch.as_tensor(large).permute(0, 3, 1, 2).float() / 127.5 - 1.0).double().numpy()
    assert np.abs(resized - native).mean() < 0.5 * np.abs(unresized - native).mean()


def test_real_images_beat_degraded_ones_beat_noise(tmp_path):
    """The reason the metric exists: it orders image sets of known quality, noise worst."""
    cfg = digits_config(tmp_path)
    state = prepare_metric(cfg, np.asarray(load_split(cfg, "test", 100).images))
    real = np.asarray(load_split(cfg, "train", 100).images)
    rng = np.random.default_rng(0)
    noisy = np.clip(real + rng.normal(0, 64, real.shape), 0, 255).astype(np.uint8)
    noise = rng.integers(0, 256, real.shape, dtype=np.uint8)
    scores = {name: score_images(cfg, images, state)[DATA_CLASSIFIER]
              for name, images in (("real", real), ("noisy", noisy), ("noise", noise))}
    assert scores["real"] < scores["noisy"] < scores["noise"], scores
    anchors = state["anchors"]  # what plots draw: training images and uniform noise at a trial's sample count
    assert anchors[anchor_name(DATA_CLASSIFIER, "real")] == pytest.approx(scores["real"])  # the same 100 images
    assert scores["noisy"] < anchors[anchor_name(DATA_CLASSIFIER, "noise")]
    assert set(score_images(cfg, real, state)) >= {DATA_CLASSIFIER, SUBSTITUTE}


def test_the_ranking_metric_follows_the_config(tmp_path):
    cfg = digits_config(tmp_path)
    assert cfg.uses_data_classifier and quality_metric_name("/nonexistent", cfg.uses_data_classifier) == DATA_CLASSIFIER
    off = digits_config(tmp_path, "eval.data_classifier=false")
    assert not off.uses_data_classifier and quality_metric_name("/nonexistent", off.uses_data_classifier) == SUBSTITUTE
    assert prepare_metric(off, np.asarray(load_split(off, "test", 20).images))["classifier"] is None
    coco = load_config(None, ["data.name=coco2014", f"data.root={tmp_path}"])
    assert not coco.uses_data_classifier  # COCO has no class labels to learn
