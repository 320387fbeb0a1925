"""The σ sweep's variants with a guidance ablation, and which (σ, scale) it carries deeper."""
from nds.config import load_config
from nds.sweep.protocols import best_sigma, sigma_variants
from nds.sweep.runner import StageOutcome, trial_config, variant


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
