"""The real flow at tiny size: Ray Tune -> Ray Train + DeepSpeed ZeRO -> MLflow (sqlite) -> tables.

No mocks: a local Ray instance, real DeepSpeed workers on gloo, a real sqlite MLflow store.
"""
import math
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from analysis.make_tables import make_tables
from nds.config import REPO_ROOT, load_config
from nds.metrics import FID, INCEPTION_FILE, SUBSTITUTE
from nds.sweep import init_ray, run_sweep, sigma_variants

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


def test_sigma_sweep_end_to_end(tmp_path):
    # The fault drill kills every level's workers once after the step-8 checkpoint; a run that
    # restarted from scratch would hit it again and fail, so finishing proves resume works.
    cfg = tiny_config(tmp_path, "sweep.depths=[1,2]", "sweep.sigmas=[0.0,1.0]",
                      "training.fail_once_at_step=8", "training.max_failures=1")
    variants = sigma_variants(cfg)
    assert [v["L"] for v in variants] == [1, 2, 2]

    outcome = run_sweep(cfg, variants, "sweep_sigma")
    assert [t["ok"] for t in outcome.trials] == [True, True, True], outcome.trials

    client = MlflowClient(cfg.tracking_uri)
    parent = client.get_run(outcome.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["trials.total"] == 3 and parent.data.metrics["trials.failed"] == 0
    children = client.search_runs([outcome.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{outcome.parent_run_id}'")
    assert len(children) == 3
    for run in children:
        assert run.info.status == "FINISHED"
        params, metrics = run.data.params, run.data.metrics
        depth = int(params["hierarchy.L"])
        assert params["encoder.name"] == "efficientnet_lite0"
        assert params["hierarchy.shape.1"] == "8x8x1"
        assert math.isfinite(metrics[SUBSTITUTE]) and metrics[SUBSTITUTE] > 0
        assert (FID in metrics) == (Path(cfg.eval.inception_dir) / INCEPTION_FILE).is_file()
        for level in range(1, depth + 1):
            history = client.get_metric_history(run.info.run_id, f"level{level}/train_loss")
            assert max(m.step for m in history) == cfg.training.steps
            assert all(math.isfinite(m.value) for m in history)
            assert metrics[f"level{level}/gflops"] > 0 and metrics[f"level{level}/params"] > 0
        if depth == 2:
            assert params["hierarchy.sigma.2"] in ("0.0", "1.0")
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"sample_grid.png", "config.yaml"} <= artifacts

    markdown = make_tables(cfg.tracking_uri, [cfg.tracking.experiment], tmp_path / "tables")
    rows = [line for line in markdown.splitlines() if line.startswith("| 1 ") or line.startswith("| 2 ")]
    assert len(rows) == 2
    assert "missing" not in markdown
    by_sigma = {float(r.data.params["hierarchy.sigma.2"]): r.data.metrics[SUBSTITUTE]
                for r in children if r.data.params["hierarchy.L"] == "2"}
    for value in by_sigma.values():
        assert f"{value:.2f}" in rows[1]
    assert (tmp_path / "tables" / "table1_sigma.csv").is_file()


def test_failing_trial_is_recorded_and_sweep_goes_on(tmp_path):
    cfg = tiny_config(tmp_path, "sweep.depths=[1]", "sweep.seeds=[0,1]", "resources.workers_per_level=1",
                      "resources.max_concurrent_trials=1", "training.steps=4",
                      "training.fail_once_at_step=2", "training.max_failures=0")
    outcome = run_sweep(cfg, sigma_variants(cfg), "sweep_sigma")
    assert len(outcome.trials) == 2 and not any(t["ok"] for t in outcome.trials)

    client = MlflowClient(cfg.tracking_uri)
    children = client.search_runs([outcome.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{outcome.parent_run_id}'")
    assert len(children) == 2
    for run in children:
        assert run.info.status == "FAILED"
        assert "fail_once_at_step=2" in run.data.tags["error"]
    assert client.get_run(outcome.parent_run_id).data.metrics["trials.failed"] == 2
