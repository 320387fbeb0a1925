import numpy as np
import pytest
from PIL import Image

from experiments.knn_figure import main as knn_main
from experiments.knn_figure import spread_queries
from nds.config.specs import LevelShape, parse_spec
from nds.eval.knn import Panel, encoder_panel, label_agreement, levels_for, nearest_neighbours, render_figure


def test_nearest_neighbours_match_brute_force_across_bank_chunks(monkeypatch):
    import nds.eval.knn

    monkeypatch.setattr(nds.eval.knn, "BANK_CHUNK", 7)  # several chunks, merged
    rng = np.random.default_rng(0)
    bank, queries = rng.normal(size=(50, 5)), rng.normal(size=(6, 5))
    dist = ((queries[:, None] - bank[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(nearest_neighbours(queries, bank, 4), np.argsort(dist, axis=1)[:, :4])
    np.testing.assert_array_equal(nearest_neighbours(bank[[3, 9]], bank, 1), [[3], [9]])  # itself first
    with pytest.raises(ValueError, match="k=51"):
        nearest_neighbours(queries, bank, 51)
    with pytest.raises(ValueError, match="same d"):
        nearest_neighbours(queries[:, :4], bank, 1)


def test_label_agreement_and_levels_cut_to_the_map():
    neighbours = np.array([[0, 1], [2, 3]])
    assert label_agreement(neighbours, np.array([0, 1]), np.array([0, 1, 1, 1])) == 0.75
    levels = parse_spec("4x4x32, 2x2x16, 1x1x8")
    assert levels_for(levels, (4, 8, 8)) == [LevelShape(4, 4, 4), LevelShape(2, 2, 4), LevelShape(1, 1, 4)]
    assert levels_for(levels, (1280, 2, 2)) == [LevelShape(2, 2, 32), LevelShape(2, 2, 16), LevelShape(1, 1, 8)]


def test_panel_finds_class_neighbours_of_class_structured_features():
    """Features = class centre + noise: neighbours at every level share the query's class."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16, 1, 1)) * 5
    bank_labels, query_labels = np.repeat(np.arange(3), 20), np.arange(3)

    def features(labels):
        return (centres[labels] + rng.normal(size=(len(labels), 16, 4, 4))).astype(np.float32)

    panel = encoder_panel("toy", parse_spec("2x2x8, 1x1x4"), features(bank_labels), features(query_labels), 5,
                          bank_labels, query_labels)
    assert panel.levels == parse_spec("2x2x8, 1x1x4") and panel.agreement == [1.0, 1.0]
    assert [n.shape for n in panel.neighbours] == [(3, 5), (3, 5)]


def test_the_figure_shows_the_query_and_exactly_the_neighbours_of_each_level(tmp_path):
    """Each bank image is one solid colour: the PNG holds the query's and every listed neighbour's
    colour, and none of the bank images no panel lists."""
    colours = [(25 * i, 255 - 25 * i, (97 * i) % 256) for i in range(10)]
    bank = np.stack([np.full((8, 8, 3), c, dtype=np.uint8) for c in colours])
    panels = [Panel("a", parse_spec("2x2x4, 1x1x2"), [np.array([[1, 2]]), np.array([[3, 4]])], [1.0, 1.0]),
              Panel("b", parse_spec("2x2x4"), [np.array([[5, 6]])], [0.5])]
    path = render_figure(bank[:1], bank, panels, tmp_path / "fig" / "knn.png")
    with Image.open(path) as img:
        assert img.format == "PNG"
        shown = {tuple(px[:3]) for px in np.asarray(img.convert("RGB")).reshape(-1, 3)}
    assert all(colours[i] in shown for i in range(7))  # the query (0) and neighbours 1-6
    assert not any(colours[i] in shown for i in (7, 8, 9))


def test_spread_queries_pick_distinct_classes():
    labels = np.array([2, 0, 1, 0, 2, 1])
    assert sorted(labels[spread_queries(labels, 3)].tolist()) == [0, 1, 2]
    assert len(spread_queries(labels, 10)) == 3


def test_cli_renders_and_logs_to_mlflow(tmp_path):
    """Plumbing only: random-CNN features vs a randomly initialised SD-VAE on 40 digits."""
    out = tmp_path / "knn.png"
    code = knn_main(["--encoders", "random_cnn@16", "vae@16", "--weights", "vae=random", "--queries", "2", "-k", "3",
                     "--levels", "2x2x8,1x1x4", "--out", str(out), f"paths.runs_dir={tmp_path}",
                     "data.name=digits", "data.train_limit=40", "data.eval_limit=10"])
    assert code == 0 and out.is_file()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("nds-knn-figure").experiment_id])
    assert "vae-random-init @16px" in run.data.params["encoders"]
    assert {"knn.random_cnn.2x2x8.label_agreement", "knn.vae-random-init.2x2x4.label_agreement"} <= set(run.data.metrics)
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["knn.png"]
