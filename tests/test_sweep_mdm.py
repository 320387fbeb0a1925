"""experiments/sweep_mdm.py: the MDM ablations (Fig. 8a/8b, baselines) as Tune stages of MDM trials.

The slow tests run the real thing at tiny size on the 8x8 digits: Ray Tune -> Ray Train +
DeepSpeed -> MLflow sqlite, with the quality metric logged over training iterations.
"""
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from experiments.sweep_mdm import main, plan
from nds.config import REPO_ROOT, ConfigError, load_config
from nds.eval.metrics import SUBSTITUTE
from nds.sweep.cli import preset
from nds.sweep.runner import experiment_hash, trial_config
from nds.tracking import RunKind, Tag, tag_filter

TINY = [
    "data.name=digits", "data.train_limit=64", "data.eval_limit=48",
    "mdm.resolutions=[4,8]", "mdm.core_widths=[16,32]", "mdm.stage_widths=[8]", "mdm.heads=2",
    "mdm.phase_steps=[2,2]",
    "training.batch_size=8", "training.warmup_steps=2", "training.log_every=2", "training.checkpoint_every=2",
    "resources.workers_per_level=1", "resources.max_concurrent_trials=2",
    "diffusion.sample_steps=4", "eval.num_samples=32", "eval.batch_size=32", "eval.substitute_image_size=64",
    "eval.grid_size=4",
    "eval.classifier_steps=50",
    f"paths.cache_dir={REPO_ROOT / 'runs' / 'test-cache'}",  # DeepSpeed's comm op compiled once
]


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "experiments/sweep_mdm.py", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)


def test_plan_adapts_the_spec_to_each_variant_and_every_trial_validates():
    cfg = load_config(preset("sweep_mdm"), ["mdm.loss_weights=[0.5,1.0]"])
    stages = dict(plan(cfg))
    assert list(stages) == ["resolutions", "progressive", "baselines"]
    three = next(v for v in stages["resolutions"] if v.name == "res8-16-32")
    changes = trial_config(cfg, three).mdm
    assert changes.resolutions == [8, 16, 32] and changes.stage_widths == [16, 8]  # one per outer resolution
    assert changes.phase_steps == [100, 0, 100] and changes.loss_weights == [1.0, 1.0, 1.0]
    assert [v.name for v in stages["progressive"]] == ["phase0-100", "phase100-100", "phase150-100"]
    baselines = {v.name: trial_config(cfg, v) for v in stages["baselines"]}
    assert {name: c.mdm.baseline for name, c in baselines.items()} == \
        {"nested": "nested", "cascaded": "cascaded", "plain": "plain"}
    assert len({experiment_hash(c) for c in baselines.values()}) == 3  # the baseline is part of the experiment
    assert dict(plan(load_config(preset("sweep_mdm"), ["sweep.mdm_resolutions=[]", "sweep.mdm_baselines=[]"]))).keys() \
        == {"progressive"}
    with pytest.raises(ConfigError, match=r"sweep.mdm_baselines\[1\] = cascaded: mdm.baseline=cascaded: the cascaded baseline"):
        plan(load_config(preset("sweep_mdm"), ["mdm.phase_steps=[0,200]"]))
    with pytest.raises(ConfigError, match=r"sweep.mdm_phase_steps\[0\] = \[200\]: mdm.phase_steps needs one entry"):
        plan(load_config(preset("sweep_mdm"), ["sweep.mdm_phase_steps=[[200]]"]))


def test_dry_run_lists_the_stages_and_starts_nothing(tmp_path):
    proc = run_script("--dry-run", f"paths.runs_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    assert "[nds] sweep_mdm stage resolutions: 2 trials: res8-32-seed0, res8-16-32-seed0" in proc.stdout
    assert "stage progressive: 3 trials: phase0-100-seed0, phase100-100-seed0, phase150-100-seed0" in proc.stdout
    assert "stage baselines: 3 trials: nested-seed0, cascaded-seed0, plain-seed0" in proc.stdout
    assert not any(tmp_path.iterdir())


def test_a_variant_that_cannot_nest_stops_the_sweep_before_ray_starts(tmp_path):
    proc = run_script("sweep.mdm_resolutions=[[8,32],[14,21]]", f"paths.runs_dir={tmp_path}")
    assert proc.returncode == 2
    assert "sweep.mdm_resolutions[1] = [14, 21]" in proc.stderr and "not a power-of-two multiple" in proc.stderr
    assert not any(tmp_path.iterdir())  # no MLflow store, no Ray results


@pytest.fixture(scope="module")
def ray_instance(tmp_path_factory):
    import ray

    from nds.sweep.runtime import init_ray

    init_ray(load_config(None, [*TINY, f"paths.runs_dir={tmp_path_factory.mktemp('init')}"]))
    yield
    ray.shutdown()


def sweep_trials(runs_dir: Path, *overrides: str) -> tuple[dict, MlflowClient]:
    """Run the sweep; its finished trial runs by variant name."""
    assert main([*TINY, f"paths.runs_dir={runs_dir}", *overrides]) == 0
    client = MlflowClient(f"sqlite:///{runs_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("nds-sweep-mdm")
    runs = client.search_runs([experiment.experiment_id], filter_string=tag_filter(Tag.KIND, RunKind.TRIAL))
    assert all(r.info.status == "FINISHED" for r in runs)
    return {r.data.tags[Tag.VARIANT]: r for r in runs}, client


def curve(client: MlflowClient, run) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run.info.run_id, SUBSTITUTE))


@pytest.mark.slow
@pytest.mark.extended  # ~4 min here; the baselines stage below covers the same machinery in the default suite
def test_resolution_stage_logs_the_metric_over_training(tmp_path, ray_instance):
    """A 3-level NestedUNet derived from the 2-level base; the progressive stage's trials are the
    same kind of trial with another mdm.phase_steps (planned above), so they are not run here:
    every Ray Train fit costs ~30 s on a 2-core machine."""
    runs, client = sweep_trials(tmp_path, "sweep.mdm_resolutions=[[2,4,8]]", "sweep.mdm_phase_steps=[]",
                                "sweep.mdm_baselines=[]")
    three = runs["res2-4-8"]
    assert set(runs) == {"res2-4-8"} and three.data.tags[Tag.STAGE] == "resolutions"
    assert three.data.params["mdm.resolutions"] == "[2, 4, 8]" and three.data.params["mdm.phase_steps"] == "[2, 0, 2]"
    assert curve(client, three) == [2, 4]  # end of the 2px phase, end of training
    metrics = three.data.metrics
    assert three.data.tags[Tag.MDM_BASELINE] == "nested" and metrics["iterations"] == 4
    last = max(client.get_metric_history(three.info.run_id, SUBSTITUTE), key=lambda m: m.step)
    assert metrics[SUBSTITUTE] == last.value  # the final evaluation is the run's value
    assert 0 < metrics["unet/params"] < metrics["mdm/params"] and 0 < metrics["unet/gflops"] < metrics["mdm/gflops"]
    assert {"sample_grid.png", "config.yaml"} <= {a.path for a in client.list_artifacts(three.info.run_id)}


@pytest.mark.slow
def test_baselines_stage_trains_cascade_and_plain_unet_on_the_same_budget(tmp_path, ray_instance):
    runs, client = sweep_trials(tmp_path, "sweep.mdm_resolutions=[]", "sweep.mdm_phase_steps=[]",
                                "sweep.mdm_baselines=[cascaded,plain]")
    cascaded, plain = runs["cascaded"], runs["plain"]
    assert cascaded.data.tags[Tag.MDM_BASELINE] == "cascaded" and plain.data.tags[Tag.MDM_BASELINE] == "plain"
    assert curve(client, cascaded) == curve(client, plain) == [2, 4]
    # the cascade: its 4px model, then the super-resolution model, each trained for its own steps
    assert {"phase1/final_loss", "phase2/final_loss"} <= set(cascaded.data.metrics)
    assert cascaded.data.metrics["mdm/params"] > 1.5 * cascaded.data.metrics["unet/params"]
    assert plain.data.metrics["mdm/params"] == plain.data.metrics["unet/params"] == cascaded.data.metrics["unet/params"]
    assert "phase1/final_loss" not in plain.data.metrics  # one phase at the full resolution
    # MDM trials train their own models: the stage and sweep runs log no level-store counts
    experiment = client.get_experiment_by_name("nds-sweep-mdm")
    for kind in (RunKind.STAGE, RunKind.SWEEP):
        (run,) = client.search_runs([experiment.experiment_id], filter_string=tag_filter(Tag.KIND, kind))
        assert run.data.metrics["trials.total"] == 2 and "levels.trained" not in run.data.metrics


@pytest.mark.slow
def test_guidance_curve_of_a_text_conditional_nested_unet(tmp_path, ray_instance):
    """MDM Fig. 8c at tiny size: a caption-conditioned NestedUNet (MiniLM tokens of the digits' class
    captions), its final model sampled at each guidance scale, each point scored for quality and for
    agreement with the captions (the data classifier's substitute: no CLIP weights here), each
    scoring sampled in two evaluation shards."""
    from nds.eval.metrics import CAPTION_CLASS_ACCURACY, DATA_CLASSIFIER
    from nds.sweep.mdm import guidance_name

    runs, client = sweep_trials(tmp_path, "sweep.mdm_resolutions=[]", "sweep.mdm_phase_steps=[]",
                                "sweep.mdm_baselines=[nested]", "model.text_encoder=minilm", "sweep.cfg_scales=[1,3]",
                                "eval.batch_size=16", "resources.eval_workers=2", "resources.eval_cpus_per_worker=0.5")
    run = runs["nested"]
    assert run.data.params["model.text_encoder"] == "minilm"
    metrics = run.data.metrics
    for scale in (1, 3):
        assert 0.0 <= metrics[guidance_name(scale, CAPTION_CLASS_ACCURACY)] <= 1.0
        assert metrics[guidance_name(scale, DATA_CLASSIFIER)] > 0
    assert metrics[guidance_name(1, DATA_CLASSIFIER)] != metrics[guidance_name(3, DATA_CLASSIFIER)]
    assert curve(client, run) == [2, 4]  # the training curve is logged as before
    assert metrics["eval.shards"] == 2  # each scoring sampled in two Ray tasks
