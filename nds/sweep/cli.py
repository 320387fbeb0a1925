"""The command line every experiment script shares:

    python experiments/<name>.py [--config FILE] [--dry-run | --plan [--cluster NxG] [--throughput T]] [key=value ...]
    python experiments/<name>.py --help-config [SECTION]

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
from nds.config.arguments import add_config_arguments, config_file, config_help
from nds.sweep.runner import Sweep, Variant, preflight_trials, trial_config, trial_name

Plan = list[tuple[str, list[Variant]]]  # (stage name, variants) in the order they run


def preset(script: str, name: str = "tiny") -> Path:
    return REPO_ROOT / "configs" / script / f"{name}.yaml"


def run_plan(sweep: Sweep, plan: Plan) -> None:
    for stage, variants in plan:
        sweep.stage(stage, variants)


def sweep_plan(cfg: Config, stages: Plan, planner: Callable | None = None):
    """The stages' trials costed by ``planner`` (default: nds.sweep.planner.plan_chain_sweep): a SweepPlan."""
    from nds.sweep.planner import plan_chain_sweep  # torch: not needed for --help

    trials = [(stage, [(trial_name(v), trial_config(cfg, v)) for v in variants]) for stage, variants in stages]
    return (planner or plan_chain_sweep)(trials)


def plan_report(cfg: Config, stages: Plan, planner: Callable | None, cluster: str | None,
                throughput: str | None) -> str:
    """What ``--plan`` prints: counted on meta models, nothing started."""
    from nds.sweep.planner import Throughput, parse_cluster, render  # torch: as above

    shape = parse_cluster(cluster) if cluster else None
    speed = Throughput.parse(throughput) if throughput else None
    return render(sweep_plan(cfg, stages, planner), speed, shape)


def sweep_main(script: str, doc: str, plan: Callable[[Config], Plan], argv: list[str] | None = None,
               run: Callable[[Sweep, Plan], None] = run_plan, default_config: Path | None = None,
               planner: Callable | None = None, kind: str = "chain") -> int:
    """Parse, validate, show the plan; unless --dry-run or --plan, run it as one sweep. Exit 1 if a trial failed.

    ``planner`` costs the trials for --plan (default: ``nds.sweep.planner.plan_chain_sweep``); ``kind``
    is what the trials train (``TrialKind.name``: chain or mdm), whose data-dependent keys are checked."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, str(default_config.relative_to(REPO_ROOT)) if default_config else "the embedded laptop demo")
    parser.add_argument("--dry-run", action="store_true", help="validate, print the resolved config and the trials, exit")
    parser.add_argument("--plan", action="store_true",
                        help="print what the sweep will train and cost (FLOPs, device-hours, schedule), start nothing")
    parser.add_argument("--cluster", metavar="NODESxGPUS", help="with --plan: the schedule's length on this cluster")
    parser.add_argument("--throughput", metavar="TFLOPS|FILE",
                        help="with --plan: achieved TFLOP/s per device, or bench/bench_models.py --write-throughput's JSON")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. sweep.seeds=[0,1] training.steps=50")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[nds] %(message)s")
    try:
        helped = config_help(args)
        if helped is not None:
            print(helped)
            return 0
        cfg = load_config(config_file(args) or default_config, args.overrides)
        stages = plan(cfg)
        if not preflight_trials(cfg, [v for _, variants in stages for v in variants], check_files=not args.plan,
                                kind=kind):
            raise ConfigError(f"{script}: the config gives no trials (see the sweep.* keys this script reads)")
        if (args.cluster or args.throughput) and not args.plan:
            raise ConfigError("--cluster and --throughput go with --plan")
        report = plan_report(cfg, stages, planner, args.cluster, args.throughput) if args.plan else None
    except (ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for stage, variants in stages:
        print(f"[nds] {script} stage {stage}: {len(variants)} trials: {', '.join(trial_name(v) for v in variants)}",
              flush=True)
    if report is not None:
        print(report, flush=True)
        return 0
    if args.dry_run:
        print(to_yaml(cfg))
        return 0
    try:
        sweep = Sweep(cfg, script)
    except ConfigError as err:  # what only the started cluster can tell (resources no node has)
        print(f"error: {err}", file=sys.stderr)
        return 2
    with sweep:
        run(sweep, stages)
    trials = [t for stage in sweep.stages for t in stage.trials]
    failed = [t for t in trials if not t["ok"]]
    for trial in failed:
        print(f"[nds] trial {trial_name(trial['variant'])} failed: {trial['error']}", file=sys.stderr)
    print(f"[nds] {len(trials) - len(failed)}/{len(trials)} trials finished; MLflow sweep run {sweep.run_id}", flush=True)
    return 1 if failed else 0
