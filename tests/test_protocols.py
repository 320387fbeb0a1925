"""The σ sweep's variants with a guidance ablation, and which (σ, scale) it carries deeper."""
import pytest

from experiments import sweep_mdm
from nds.config import ConfigError, load_config
from nds.sweep.protocols import best_sigma, depth_variants, encoder_variants, rcg_variants, shape_variants, sigma_plan, \
    sigma_variants
from nds.sweep.runner import StageOutcome, check_trial_names, preflight_trials, trial_config, trial_name, variant


def test_guidance_scales_multiply_the_nested_variants_only():
    cfg = load_config(None, ["sweep.sigmas=[0.5,1.0]", "sweep.cfg_scales=[1,3]", "sweep.seeds=[0,1]"])
    variants = sigma_variants(cfg, [1, 2])
    assert len(variants) == 2 * (1 + 2 * 2)
    names = {v.name for v in variants}
    assert names == {"L1", "L2-sigma0.5-cfg1", "L2-sigma0.5-cfg3", "L2-sigma1-cfg1", "L2-sigma1-cfg3"}
    guided = next(v for v in variants if v.name == "L2-sigma1-cfg3")
    trial = trial_config(cfg, guided)
    assert trial.diffusion.cfg_scale == 3.0 and trial.sigma(2) == 1.0 and trial.hierarchy.L == 2
    plain = load_config(None, ["sweep.sigmas=[0.5]", "diffusion.cfg_scale=2"])
    assert [v.name for v in sigma_variants(plain, [2])] == ["L2-sigma0.5"]  # no ablation: the config's scale


def test_best_sigma_is_the_best_pair_over_seeds():
    cfg = load_config(None, ["sweep.sigmas=[0.5,1.0]", "sweep.cfg_scales=[1,3]", "sweep.seeds=[0,1]"])
    values = {("L2-sigma0.5-cfg1", 0): 40, ("L2-sigma0.5-cfg1", 1): 41, ("L2-sigma0.5-cfg3", 0): 36,
              ("L2-sigma0.5-cfg3", 1): 38, ("L2-sigma1-cfg1", 0): 39, ("L2-sigma1-cfg1", 1): 39,
              ("L2-sigma1-cfg3", 0): 35, ("L2-sigma1-cfg3", 1): 40}  # mean 37.5 vs 37.0: σ 0.5 at scale 3
    trials = [{"variant": variant(name, seed), "ok": True, "metrics": {"m": value}} for (name, seed), value in values.items()]
    trials.append({"variant": variant("L2-sigma1-cfg3", 2), "ok": False, "metrics": {}})
    assert best_sigma(StageOutcome("s", "run", trials), cfg, 2, "m") == (0.5, 3.0)
    assert best_sigma(StageOutcome("s", "run", []), cfg, 2, "m") is None


def test_trial_names_are_unique_across_every_scripts_stages():
    """Every script's plan, with every list it sweeps at several values: no two trials share a name."""
    cfg = load_config(None, ["sweep.sigmas=[0, 0.25, 0.5, 1e-3, 1]", "sweep.cfg_scales=[1, 1.5, 3]", "sweep.seeds=[0, 1]",
                             "sweep.depths=[1, 2, 3]", "sweep.shapes=['28x28x1, 4x4x32', '28x28x1, 2x2x16']",
                             "sweep.encoders=[efficientnet_lite0, random_cnn]", "sweep.rcg_spec='28x28x1, 1x1x256'",
                             "sweep.mdm_resolutions=[[8, 16, 32], [16, 32]]", "sweep.mdm_phase_steps=[[0, 10], [5, 10]]",
                             "sweep.mdm_baselines=[nested, plain, cascaded]"])
    plans = [sigma_plan(cfg), [("d", depth_variants(cfg))], [("s", shape_variants(cfg))],
             [("e", encoder_variants(cfg))], [("r", rcg_variants(cfg))], sweep_mdm.plan(cfg)]
    for plan in plans:
        names = [trial_name(v) for _, variants in plan for v in variants]
        assert names and len(names) == len(set(names)), names
        check_trial_names([v for _, variants in plan for v in variants])


def test_a_name_given_twice_is_refused_before_the_stage_runs():
    cfg = load_config(None)
    first = [variant("L2-sigma0.5", 0, **{"hierarchy.sigmas": [0.5, 0.5]})]
    again = [variant("L2-sigma0.5", 0, **{"hierarchy.sigmas": [0.5000001, 0.5]})]
    with pytest.raises(ConfigError, match=r"two trials of the sweep are named L2-sigma0.5-seed0"):
        preflight_trials(cfg, first + again, check_files=False)
    with pytest.raises(ConfigError, match=r"named L2-sigma0.5-seed0"):  # a later stage against the earlier ones
        preflight_trials(cfg, again, check_files=False, earlier=first)
    assert len(preflight_trials(cfg, again, check_files=False, earlier=[variant("L1", 0)])) == 1
