"""Matryoshka Diffusion ablations as one sweep, each stage one Ray Tune run (nds.train.mdm.MDM trials):

    python experiments/sweep_mdm.py [--config FILE] [--dry-run] [key=value ...]
    python experiments/sweep_mdm.py --config configs/sweep_mdm/imagenet256.yaml

  resolutions  MDM Fig. 8b: a variant per entry of sweep.mdm_resolutions (e.g. [[8,32],[8,16,32]]);
               the rest of the mdm spec follows from the base config (``resolution_changes``).
  progressive  MDM Fig. 8a: a variant per entry of sweep.mdm_phase_steps (e.g. [[0,200],[100,100]]).
  baselines    MDM Fig. 4: NestedUNet vs cascaded vs plain UNet (sweep.mdm_baselines) at the base
               config's size and iteration budget: a variant per value of mdm.baseline
               (nds/train/mdm.py says what each one is).

A stage runs only if its list is non-empty; every variant runs once per seed in sweep.seeds. Each
trial logs the quality metric at the end of every phase of any trial in its stage, with MLflow
step = training iterations, so analysis/make_tables.py draws Fig. 8-style curves.
"""
from __future__ import annotations

import sys

from nds.config import Config, ConfigError
from nds.sweep.cli import Plan, preset, sweep_main
from nds.sweep.mdm import MDM
from nds.sweep.planner import plan_mdm_sweep
from nds.sweep.runner import Sweep, Variant, trial_config, variant

SCRIPT = "sweep_mdm"


def resolution_changes(cfg: Config, resolutions: list[int]) -> dict:
    """The mdm keys of a NestedUNet over ``resolutions`` that keep the base config's core UNet and
    budget: the outermost stage keeps the base's outermost width, each stage inside it doubles it
    (at most the core's width); the schedule trains the innermost resolution for the base's
    low-resolution iterations, then the full model for its last phase's, as MDM grows its CC12M
    models straight from the innermost one (App. B); loss weights follow their resolution (default 1)."""
    m = cfg.mdm
    top, core = resolutions[-1], m.core_widths[0]
    outer = m.stage_widths[-1] if m.stage_widths else core // 2
    low, last = sum(m.phase_steps[:-1]), m.phase_steps[-1]
    weights = dict(zip(m.resolutions, m.loss_weights or []))
    return {
        "mdm.resolutions": resolutions,
        "mdm.stage_widths": [min(core, outer * top // r) for r in resolutions[1:]],
        "mdm.phase_steps": [low, *[0] * (len(resolutions) - 2), last] if len(resolutions) > 1 else [low + last],
        "mdm.loss_weights": [weights.get(r, 1.0) for r in resolutions] if m.loss_weights else None,
    }


def checked(cfg: Config, key: str, index: int, value, v: Variant) -> Variant:
    """``v`` if its trial config is valid; else an error that names the sweep key the user wrote."""
    try:
        trial_config(cfg, v)
    except ConfigError as err:
        raise ConfigError(f"{key}[{index}] = {value}: {err}") from None
    return v


def resolution_variants(cfg: Config) -> list[Variant]:
    return [checked(cfg, "sweep.mdm_resolutions", i, res,
                    variant("res" + "-".join(map(str, res)), seed, **resolution_changes(cfg, res),
                            **{"mdm.baseline": "nested"}))
            for seed in cfg.sweep.seeds for i, res in enumerate(cfg.sweep.mdm_resolutions)]


def phase_variants(cfg: Config) -> list[Variant]:
    return [checked(cfg, "sweep.mdm_phase_steps", i, steps,
                    variant("phase" + "-".join(map(str, steps)), seed,
                            **{"mdm.phase_steps": steps, "mdm.baseline": "nested"}))
            for seed in cfg.sweep.seeds for i, steps in enumerate(cfg.sweep.mdm_phase_steps)]


def baseline_variants(cfg: Config) -> list[Variant]:
    return [checked(cfg, "sweep.mdm_baselines", i, baseline, variant(baseline, seed, **{"mdm.baseline": baseline}))
            for seed in cfg.sweep.seeds for i, baseline in enumerate(cfg.sweep.mdm_baselines)]


def plan(cfg: Config) -> Plan:
    stages = [("resolutions", resolution_variants(cfg)), ("progressive", phase_variants(cfg)),
              ("baselines", baseline_variants(cfg))]
    return [(name, variants) for name, variants in stages if variants]


def run(sweep: Sweep, stages: Plan) -> None:
    for name, variants in stages:
        sweep.stage(name, variants, kind=MDM)


def main(argv: list[str] | None = None) -> int:
    return sweep_main(SCRIPT, __doc__, plan, argv, run=run, default_config=preset(SCRIPT), planner=plan_mdm_sweep,
                      kind=MDM.name)


if __name__ == "__main__":
    sys.exit(main())
