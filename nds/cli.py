"""The command line every experiment script shares:

    python experiments/<name>.py [--config FILE] [--dry-run] [key=value ...]

The config (defaults <- preset or --config <- overrides) and every trial's config are validated
and their files checked before Ray starts; errors name the key or path and exit with code 2.
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from nds.config import REPO_ROOT, Config, ConfigError, load_config, to_yaml
from nds.sweep import Sweep, preflight_trials, trial_name

Plan = list[tuple[str, list[dict]]]  # (stage name, variants) in the order they run


def preset(script: str, name: str = "tiny") -> Path:
    return REPO_ROOT / "configs" / script / f"{name}.yaml"


def run_plan(sweep: Sweep, plan: Plan) -> None:
    for stage, variants in plan:
        sweep.stage(stage, variants)


def sweep_main(script: str, doc: str, plan: Callable[[Config], Plan], argv: list[str] | None = None,
               run: Callable[[Sweep, Plan], None] = run_plan, default_config: Path | None = None) -> int:
    """Parse, validate, show the plan; unless --dry-run, run it as one sweep. Exit 1 if a trial failed."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_text = f"default: {default_config.relative_to(REPO_ROOT)}" if default_config else "default: the embedded laptop demo"
    parser.add_argument("--config", help=f"YAML config file ({default_text})")
    parser.add_argument("--dry-run", action="store_true", help="validate, print the resolved config and the trials, exit")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. sweep.seeds=[0,1] training.steps=50")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[nds] %(message)s")
    try:
        cfg = load_config(args.config or default_config, args.overrides)
        stages = plan(cfg)
        if not preflight_trials(cfg, [v for _, variants in stages for v in variants]):
            raise ConfigError(f"{script}: the config gives no trials (see the sweep.* keys this script reads)")
    except (ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for stage, variants in stages:
        print(f"[nds] {script} stage {stage}: {len(variants)} trials: {', '.join(trial_name(v) for v in variants)}",
              flush=True)
    if args.dry_run:
        print(to_yaml(cfg))
        return 0
    with Sweep(cfg, script) as sweep:
        run(sweep, stages)
    trials = [t for stage in sweep.stages for t in stage.trials]
    failed = [t for t in trials if not t["ok"]]
    for trial in failed:
        print(f"[nds] trial {trial_name(trial['variant'])} failed: {trial['error']}", file=sys.stderr)
    print(f"[nds] {len(trials) - len(failed)}/{len(trials)} trials finished; MLflow sweep run {sweep.run_id}", flush=True)
    return 1 if failed else 0
