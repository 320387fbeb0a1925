"""analysis/metric_scale.py: the metric's scale from image sets of known quality."""
import numpy as np

from analysis.metric_scale import degraded_sets, main
from nds.eval.metrics import DATA_CLASSIFIER, SUBSTITUTE


def test_degraded_sets_keep_the_shape_and_dtype():
    real = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 1), dtype=np.uint8)
    sets = degraded_sets(real)
    assert all(s.shape == real.shape and s.dtype == np.uint8 for s in sets.values())
    blocky = sets["real, 4x4 blocks"]
    assert (blocky[:, :4, :4] == blocky[:, :1, :1]).all()  # constant within a block


def test_real_images_score_better_than_noise(tmp_path):
    result = main(["--n", "48", "data.name=digits", "data.eval_limit=48", "eval.substitute_image_size=64",
                   "eval.batch_size=48", "eval.classifier_steps=100", f"paths.runs_dir={tmp_path}"])
    scores = result["scores"]
    assert result["metric"] == DATA_CLASSIFIER and result["images_per_set"] == 48
    assert 0 < result["data_classifier_accuracy"] <= 1
    for metric in (DATA_CLASSIFIER, SUBSTITUTE):
        assert scores["real (training split)"][metric] < scores["uniform noise"][metric]
        assert scores["real (training split)"][metric] < scores["salt and pepper"][metric]
