"""The sweep planner: what a sweep will train and cost, counted before anything starts."""
import dataclasses
import json
import subprocess
import sys

import pytest

from nds.config import REPO_ROOT, ConfigError, load_config, replace
from nds.sweep.level_store import ENTRY_FILE, level_id
from nds.sweep.planner import (
    Throughput,
    _makespan,
    chain_sampling_flops,
    parse_cluster,
    plan_chain_sweep,
    plan_mdm_sweep,
    render,
    schedule_hours,
)
from nds.sweep.protocols import sigma_variants
from nds.sweep.runner import trial_config, trial_name

SMALL = ["hierarchy.spec='8x8x1, 2x2x8, 1x1x4'", "hierarchy.L=2", "hierarchy.sigmas=[0.5,0.5]",
         "model.width=32", "model.depth=2", "model.heads=2", "diffusion.sample_steps=4", "training.steps=12"]


def stage_of(cfg, variants, name="stage"):
    return [(name, [(trial_name(v), trial_config(cfg, v)) for v in variants])]


def test_sigma_stage_trains_k_conditioned_copies_and_shares_the_rest(tmp_path):
    cfg = load_config(None, [*SMALL, f"paths.runs_dir={tmp_path}", "sweep.sigmas=[0.0,0.5,1.0]", "sweep.seeds=[0,1]"])
    plan = plan_chain_sweep(stage_of(cfg, sigma_variants(cfg, [1, 2])))
    k, seeds = 3, 2
    assert len(plan.trials) == seeds * (1 + k)
    assert len(plan.to_train) == seeds * (1 + k + 1)  # L=1's level, k conditioned level 1s, one top level
    assert all(t.flops > 0 for t in plan.trainings) and all(s.flops > 0 for s in plan.samplings)


def test_stored_levels_cost_nothing(tmp_path):
    cfg = load_config(None, [*SMALL, f"paths.runs_dir={tmp_path}"])
    plan = plan_chain_sweep(stage_of(cfg, sigma_variants(cfg, [2])))
    entry = cfg.levels_dir / level_id(replace(cfg, **{"hierarchy.L": 2}), 2)
    entry.mkdir(parents=True)
    (entry / ENTRY_FILE).write_text("{}")
    again = plan_chain_sweep(stage_of(cfg, sigma_variants(cfg, [2])))
    assert len(again.trainings) == len(plan.trainings) and len(again.to_train) == len(plan.to_train) - 1
    assert "1 already in the level store" in render(again)


def test_training_flops_follow_steps_and_guidance_doubles_conditioned_levels(tmp_path):
    base = load_config(None, [*SMALL, f"paths.runs_dir={tmp_path}", "hierarchy.L=2"])
    longer = replace(base, **{"training.steps": 2 * base.training.steps})
    fit = plan_chain_sweep([("s", [("a", base)])]).trainings
    fit_longer = plan_chain_sweep([("s", [("a", longer)])]).trainings
    assert [2 * t.flops for t in fit] == pytest.approx([t.flops for t in fit_longer])
    off = {"diffusion.cfg_scale": 1.0, "eval.diagnostic_samples": 0}
    unguided = chain_sampling_flops(replace(base, **off))
    guided = chain_sampling_flops(replace(base, **{**off, "diffusion.cfg_scale": 3.0}))
    assert unguided < guided < 2 * unguided  # level 1 (conditioned) doubles, the top level does not


def test_makespan_packs_jobs_onto_the_devices():
    assert _makespan([(1.0, 1), (2.0, 1)], 1) == 3.0
    assert _makespan([(1.0, 1), (2.0, 1)], 2) == 2.0
    assert _makespan([(1.0, 2), (1.0, 2), (1.0, 1)], 4) == 2.0  # two wide jobs cannot run together
    assert _makespan([(1.0, 16)], 8) == 1.0  # wider than the cluster: runs alone on all of it
    assert _makespan([], 8) == 0.0


def test_more_devices_never_lengthen_the_schedule(tmp_path):
    cfg = load_config(None, [*SMALL, f"paths.runs_dir={tmp_path}", "sweep.sigmas=[0.0,0.5,1.0]", "sweep.seeds=[0,1,2]"])
    plan = plan_chain_sweep(stage_of(cfg, sigma_variants(cfg, [1, 2])))
    speed = Throughput("test", 1e-3, 1e-3)
    hours = [schedule_hours(plan, devices, speed) for devices in (1, 2, 4, 16)]
    assert hours == sorted(hours, reverse=True) and hours[0] > hours[-1]


def test_mdm_trials_fit_each_phase(tmp_path):
    cfg = load_config(REPO_ROOT / "configs" / "sweep_mdm" / "tiny.yaml", [f"paths.runs_dir={tmp_path}"])
    plan = plan_mdm_sweep([("s", [("nested", cfg), ("plain", replace(cfg, **{"mdm.baseline": "plain"}))])])
    phases = [p for p in cfg.mdm.phase_steps if p]
    assert len(plan.trainings) == len(phases) + 1 and all(t.flops > 0 for t in plan.trainings)


def test_bad_cluster_and_throughput_are_named(tmp_path):
    for text in ("8", "0x8", "axb"):
        with pytest.raises(ConfigError, match="--cluster"):
            parse_cluster(text)
    assert parse_cluster("2x4") == (2, 4)
    for text in ("-1", str(tmp_path / "missing.json")):
        with pytest.raises(ConfigError, match="--throughput"):
            Throughput.parse(text)
    (tmp_path / "t.json").write_text(json.dumps({"device": "x", "train_tflops": 2}))
    with pytest.raises(ConfigError, match="sample_tflops"):
        Throughput.parse(str(tmp_path / "t.json"))


def test_plan_from_the_command_line_starts_nothing(tmp_path):
    proc = subprocess.run([sys.executable, "experiments/sweep_sigma.py", "--plan", "--cluster", "2x2", "--throughput", "0.5",
                           f"paths.runs_dir={tmp_path}"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "to train" in proc.stdout and "device-hours" in proc.stdout and "wall-clock" in proc.stdout
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "levels").exists()
    proc = subprocess.run([sys.executable, "experiments/sweep_sigma.py", "--cluster", "2x2"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--plan" in proc.stderr


def test_evaluation_shards_shorten_the_sampling_not_its_cost(tmp_path):
    cfg = load_config(None, [*SMALL, f"paths.runs_dir={tmp_path}", "sweep.sigmas=[0.5]", "sweep.seeds=[0]"])
    speed = Throughput("test", 1e-3, 1e-3)
    plans = {workers: plan_chain_sweep(stage_of(replace(cfg, **{"resources.eval_workers": workers,
                                                                 "resources.eval_gpus_per_worker": 1}),
                                                sigma_variants(cfg, [2])))
             for workers in (1, 4)}
    assert plans[1].samplings[0].flops == plans[4].samplings[0].flops  # the same work, spread
    fits_only = dataclasses.replace(plans[1], samplings=[])
    sampling = {w: schedule_hours(p, 8, speed) - schedule_hours(fits_only, 8, speed) for w, p in plans.items()}
    assert sampling[4] == pytest.approx(sampling[1] / 4)
