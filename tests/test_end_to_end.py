"""The real flow at tiny size: Ray Tune -> Ray Train + DeepSpeed ZeRO -> MLflow (sqlite) -> tables.

No mocks: a local Ray instance, real DeepSpeed workers on gloo, a real sqlite MLflow store.
"""
import math
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from analysis.make_tables import make_tables
from nds.config import REPO_ROOT, load_config, replace
from nds.eval.diagnostics import null_cond_name, sampled_name, true_cond_name
from nds.eval.metrics import DATA_CLASSIFIER, FID, INCEPTION_FILE, SUBSTITUTE, anchor_name
from nds.sweep.cli import sweep_plan
from nds.sweep.protocols import run_sigma_chain, sigma_plan, sigma_variants
from nds.sweep.runner import Sweep
from nds.sweep.runtime import init_ray
from nds.tracking import Tag

pytestmark = pytest.mark.slow

TINY = [
    "data.name=digits", "data.train_limit=240", "data.eval_limit=48",
    "encoder.image_size=64", "encoder.batch_size=64",
    "hierarchy.spec='8x8x1, 2x2x8'", "hierarchy.L=2", "hierarchy.sigmas=[0.5]",
    "model.width=32", "model.depth=2", "model.heads=2",
    "diffusion.sample_steps=4",
    "training.steps=12", "training.batch_size=16", "training.log_every=4", "training.checkpoint_every=4",
    "resources.workers_per_level=2", "resources.cpus_per_worker=0.45", "resources.max_concurrent_trials=2",
    "eval.num_samples=32", "eval.batch_size=32", "eval.substitute_image_size=64",
    # shared across tests and runs (git-ignored), so DeepSpeed's comm op is compiled once
    "eval.classifier_steps=50",
    f"paths.cache_dir={REPO_ROOT / 'runs' / 'test-cache'}",
]


def tiny_config(tmp_path: Path, *overrides: str):
    return load_config(None, [*TINY, f"paths.runs_dir={tmp_path}", *overrides])


@pytest.fixture(scope="module", autouse=True)
def ray_instance(tmp_path_factory):
    import ray

    init_ray(tiny_config(tmp_path_factory.mktemp("init")))
    yield
    ray.shutdown()


def trial_runs(client, experiment_id, stage_run_id):
    return client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{stage_run_id}'")


def test_sigma_sweep_chains_stages_and_trains_each_level_once(tmp_path):
    # The fault drill kills every level's workers once after the step-8 checkpoint; a run that
    # restarted from scratch would hit it again and fail, so finishing proves resume works.
    cfg = tiny_config(tmp_path, "hierarchy.spec='8x8x1, 2x2x8, 1x1x4'", "hierarchy.sigmas=[0.5,0.5]",
                      "sweep.depths=[1,2,3]", "sweep.sigmas=[0.0,1.0]",
                      "training.fail_once_at_step=8", "training.max_failures=1",
                      "eval.batch_size=16", "resources.eval_workers=2", "resources.eval_cpus_per_worker=0.45")
    k = len(cfg.sweep.sigmas)
    planned = sweep_plan(cfg, sigma_plan(cfg))
    with Sweep(cfg, "sweep_sigma") as sweep:
        first, second = run_sigma_chain(sweep)
    assert [t["ok"] for t in first.trials + second.trials] == [True] * 5, first.trials + second.trials

    # Stage L1+2 (empty store): L = 1 trains its one level; the σ_2 sweep trains k conditioned
    # copies of level 1 plus the σ-free top level once: k + (L - 1), not k * L.
    assert first.count("levels.trained") == 1 + k + 1
    assert first.count("levels.reused") == (1 + 2 * k) - (1 + k + 1)
    # Stage L3 carries the best σ_2, so level 1 (conditioned on it) is already in the store:
    # only the k copies of level 2 and the new top level train.
    assert second.count("levels.trained") == k + 1
    assert second.count("levels.reused") == 3 * k - (k + 1)

    client = MlflowClient(cfg.tracking_uri)
    sweep_run = client.get_run(sweep.run_id)
    assert sweep_run.info.status == "FINISHED"
    assert sweep_run.data.metrics["trials.total"] == 5 and sweep_run.data.metrics["trials.failed"] == 0
    assert sweep_run.data.metrics["levels.trained"] == 1 + k + 1 + k + 1
    # the planner counted exactly those trainings before anything ran, and none once they are stored
    assert len(planned.to_train) == sweep_run.data.metrics["levels.trained"]
    assert len(planned.trials) == sweep_run.data.metrics["trials.total"]
    assert not sweep_plan(cfg, sigma_plan(cfg)).to_train
    stage = client.get_run(first.run_id)
    best = stage.data.tags[Tag.BEST_SIGMA]
    has_inception = (Path(cfg.eval.inception_dir) / INCEPTION_FILE).is_file()
    assert sweep.metric == (FID if has_inception else DATA_CLASSIFIER)  # the σ carried on is chosen by it
    by_sigma = {float(r.data.params["hierarchy.sigma.2"]): r.data.metrics[sweep.metric]
                for r in trial_runs(client, sweep.experiment_id, first.run_id) if r.data.params["hierarchy.L"] == "2"}
    assert float(best) == min(by_sigma, key=by_sigma.get)

    deep = trial_runs(client, sweep.experiment_id, second.run_id)
    assert {r.data.params["hierarchy.sigma.2"] for r in deep} == {str(float(best))}
    for run in trial_runs(client, sweep.experiment_id, first.run_id) + deep:
        assert run.info.status == "FINISHED"
        params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
        depth = int(params["hierarchy.L"])
        assert params["encoder.name"] == "efficientnet_lite0" and params["hierarchy.shape.1"] == "8x8x1"
        assert all(math.isfinite(metrics[m]) and metrics[m] > 0 for m in (SUBSTITUTE, DATA_CLASSIFIER))
        assert (FID in metrics) == has_inception
        # where the metric sits for real training images and for noise, for the plots' range
        assert 0 < metrics[anchor_name(sweep.metric, "real")] < metrics[anchor_name(sweep.metric, "noise")]
        assert metrics["levels.trained"] + metrics["levels.reused"] == depth
        assert metrics["eval.shards"] == 2  # sampled and scored in two Ray tasks
        # the chain diagnostic, in the metric that ranks the sweep, for every level below the top
        assert (sampled_name(sweep.metric) in metrics) == (depth > 1)
        for level in range(1, depth):
            for name in (true_cond_name(sweep.metric, level), null_cond_name(sweep.metric, level)):
                assert math.isfinite(metrics[name]) and metrics[name] > 0, name
        for level in range(2, depth + 1):
            assert metrics[f"level{level}/z_fd"] > 0 and metrics[f"level{level}/z_fd_floor"] > 0
            assert metrics[f"level{level}/z_std"] > 0
        if depth > 1:
            assert metrics["diagnostic/samples"] == min(cfg.eval.num_samples, cfg.data.eval_limit)
        for level in range(1, depth + 1):
            assert metrics[f"level{level}/gflops"] > 0 and metrics[f"level{level}/params"] > 0
            entry = Path(tags[Tag.level(level, "path")])  # the link to the level store entry it used
            assert entry.parent == cfg.levels_dir and (entry / "ema_weights.pt").is_file()
            if tags[Tag.level(level, "trained_here")] == "true":
                history = client.get_metric_history(run.info.run_id, f"level{level}/train_loss")
                assert max(m.step for m in history) == cfg.training.steps
                assert all(math.isfinite(m.value) for m in history)
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"sample_grid.png", "config.yaml"} <= artifacts and (("level_grid.png" in artifacts) == (depth > 1))

    markdown = make_tables(cfg.tracking_uri, None, tmp_path / "tables")
    ours = markdown.split("### paper")[0].split("— chain diagnostic")[0]  # the σ table, not the diagnostic's
    rows = {line.split("|")[1].strip(): line for line in ours.splitlines() if line.startswith("| ")}
    assert {"1", "2", "3"} <= set(rows)
    for run in deep:  # L = 3 trials land in the L = 3 row under their σ_3
        assert f"{run.data.metrics[sweep.metric]:.2f}" in rows["3"]
    assert (tmp_path / "tables" / "table1_sigma.csv").is_file() and (tmp_path / "tables" / "table1_sigma.png").is_file()

    # a second sweep over the same settings reuses every finished trial (nothing runs) ...
    with Sweep(cfg, "sweep_sigma") as again:
        stage = again.stage("again", sigma_variants(cfg, [2]))
    assert {t.get("reused_run") for t in stage.trials} == {
        r.info.run_id for r in trial_runs(client, sweep.experiment_id, first.run_id) if r.data.params["hierarchy.L"] == "2"}
    assert client.get_run(stage.run_id).data.metrics["trials.reused"] == k
    # ... and, told to run them again, trains no level: all come from the store
    again_cfg = replace(cfg, **{"sweep.reuse_finished": False})
    with Sweep(again_cfg, "sweep_sigma") as again:
        stage = again.stage("again", sigma_variants(again_cfg, [2]))
    assert stage.count("levels.trained") == 0 and stage.count("levels.reused") == 2 * k


def test_text_and_class_conditional_chains_run_through_the_sweep(tmp_path):
    cfg = tiny_config(tmp_path, "resources.workers_per_level=1", "training.steps=4", "sweep.sigmas=[0.5]",
                      "model.text_encoder=minilm", "model.num_classes=10", "diffusion.cfg_scale=2.0")
    with Sweep(cfg, "sweep_sigma") as sweep:
        stage = sweep.stage("L2", sigma_variants(cfg, [2]))
    assert [t["ok"] for t in stage.trials] == [True], stage.trials
    run = trial_runs(MlflowClient(cfg.tracking_uri), sweep.experiment_id, stage.run_id)[0]
    assert run.data.params["model.text_encoder"] == "minilm" and run.data.params["model.num_classes"] == "10"
    assert math.isfinite(run.data.metrics[SUBSTITUTE]) and run.data.metrics["levels.trained"] == 2


def test_failing_trial_is_recorded_and_sweep_goes_on(tmp_path):
    cfg = tiny_config(tmp_path, "sweep.seeds=[0,1]", "resources.workers_per_level=1",
                      "resources.max_concurrent_trials=1", "training.steps=4",
                      "training.fail_once_at_step=2", "training.max_failures=0")
    with Sweep(cfg, "sweep_sigma") as sweep:
        stage = sweep.stage("L1", sigma_variants(cfg, [1]))
    assert len(stage.trials) == 2 and not any(t["ok"] for t in stage.trials)

    client = MlflowClient(cfg.tracking_uri)
    children = trial_runs(client, sweep.experiment_id, stage.run_id)
    assert len(children) == 2
    for run in children:
        assert run.info.status == "FAILED"
        assert "fail_once_at_step=2" in run.data.tags["error"]
    assert client.get_run(stage.run_id).data.metrics["trials.failed"] == 2
    assert client.get_run(sweep.run_id).info.status == "FINISHED"


def test_a_nonfinite_loss_fails_its_trial_at_once_and_keeps_no_weights(tmp_path):
    """Rank 0 of two draws a NaN loss at step 3: both ranks stop at the step-4 report, the fit is not
    retried (max_failures=2 would only repeat it), the trial run ends FAILED naming the step, and
    neither the level store nor the fit's checkpoints hold weights from after it."""
    from nds.sweep.level_store import LevelStore, level_id
    from nds.sweep.runner import trial_config

    cfg = tiny_config(tmp_path, "sweep.depths=[1]", "hierarchy.L=1", "resources.max_concurrent_trials=1",
                      "training.nan_at_step=3", "training.max_failures=2")
    variants = sigma_variants(cfg, [1])
    with Sweep(cfg, "sweep_sigma") as sweep:
        stage = sweep.stage("L1", variants)
    assert [t["ok"] for t in stage.trials] == [False]
    client = MlflowClient(cfg.tracking_uri)
    (run,) = trial_runs(client, sweep.experiment_id, stage.run_id)
    assert run.info.status == "FAILED" and "NonFiniteLoss" in run.data.tags["error"]
    assert "non-finite at step 3" in run.data.tags["error"] and "NonFiniteLoss" in stage.trials[0]["error"]
    assert client.get_run(sweep.run_id).info.status == "FINISHED"  # the sweep went on
    assert LevelStore(cfg.levels_dir).get(level_id(trial_config(cfg, variants[0]), 1)) is None
    assert client.get_metric_history(run.info.run_id, "level1/train_loss") == []  # its first report was the NaN's
    assert not list(Path(tmp_path, "ray_results").rglob("checkpoint_*"))  # no weights were checkpointed


def test_an_imagenet_layout_folder_runs_a_sweep(tmp_path):
    """An RGB image folder in ImageNet's train/ + val/ layout (val/ is the held-out split), with the
    metric's reference taken from the training split as the paper's ImageNet-100 protocol does."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("val", 4)):
        for cls, colour in (("red", (200, 30, 30)), ("blue", (30, 30, 200))):
            folder = tmp_path / "data" / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(np.array(colour) + rng.normal(0, 20, (12, 12, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    cfg = tiny_config(tmp_path, "data.name=image_folder", f"data.root={tmp_path / 'data'}", "data.train_limit=null",
                      "data.eval_limit=8", "hierarchy.spec='8x8x3, 2x2x8'", "eval.reference_split=train",
                      "eval.num_samples=8", "eval.batch_size=8", "resources.workers_per_level=1", "training.steps=4",
                      "sweep.sigmas=[0.5]")
    with Sweep(cfg, "sweep_sigma") as sweep:
        stage = sweep.stage("L2", sigma_variants(cfg, [2]))
    assert [t["ok"] for t in stage.trials] == [True], stage.trials
    run = trial_runs(MlflowClient(cfg.tracking_uri), sweep.experiment_id, stage.run_id)[0]
    assert run.data.params["eval.reference_split"] == "train"
    assert math.isfinite(run.data.metrics[sweep.metric]) and run.data.metrics["diagnostic/samples"] == 8
