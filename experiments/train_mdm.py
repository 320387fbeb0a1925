"""Matryoshka Diffusion: train one NestedUNet progressively (mdm.phase_steps), sample it, log to MLflow.

    python experiments/train_mdm.py [--config FILE] [--dry-run] [key=value ...]
    python experiments/train_mdm.py mdm.phase_steps=[300,300] mdm.num_classes=10 diffusion.cfg_scale=2

Without a config file: Fashion-MNIST at 14 -> 28, a tiny NestedUNet, a local Ray instance and an
MLflow sqlite store under runs/. Each phase is a Ray Train + DeepSpeed fit; the MLflow run gets the
flattened config, per-phase losses, a sample grid, and the GFLOPs/params of the final model next to
those of the plain UNet of the same size.
"""
from __future__ import annotations

import argparse
import logging
import sys

from nds.config import ConfigError, load_config, to_yaml
from nds.config.arguments import add_config_arguments, config_file, config_help
from nds.config.specs import mdm_phases
from nds.sweep.mdm import run_mdm
from nds.sweep.preflight import preflight
from nds.train.mdm import phase_name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--dry-run", action="store_true", help="validate, print the resolved config and the phases, exit")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. mdm.phase_steps=[100,100] training.lr=1e-3")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[nds] %(message)s")
    try:
        helped = config_help(args)
        if helped is not None:
            print(helped)
            return 0
        cfg = load_config(config_file(args), args.overrides)
        preflight(cfg, kind="mdm")
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    res = cfg.mdm.resolutions
    plan = ", ".join(f"{phase_name(p)} ({'->'.join(map(str, res[: p.levels]))}, {p.steps} steps)"
                     for p in mdm_phases(cfg))
    print(f"[nds] train_mdm: {plan}", flush=True)
    if args.dry_run:
        print(to_yaml(cfg))
        return 0
    outcome = run_mdm(cfg)
    print(f"[nds] finished {len(outcome.phases)} phases; MLflow run {outcome.run_id}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
