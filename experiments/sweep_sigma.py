"""Table 1 protocol: sweep σ_L at each depth in ``sweep.depths`` (L = 1 is the baseline).

    python experiments/sweep_sigma.py [--config FILE] [--dry-run] [key=value ...]
    ray job submit --working-dir . -- python experiments/sweep_sigma.py paths.runs_dir=/shared/nds-runs

Without a config file the embedded default runs: a local Ray instance, an MLflow sqlite
store under runs/, real Fashion-MNIST, tiny U-ViTs.
"""
from __future__ import annotations

import argparse
import logging
import sys

from nds.config import ConfigError, load_config, preflight, to_yaml
from nds.sweep import run_sweep, sigma_variants, trial_config, variant_name

SWEEP = "sweep_sigma"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config file (default: the embedded laptop demo)")
    parser.add_argument("--dry-run", action="store_true", help="validate, print the resolved config and the trials, exit")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. sweep.sigmas=[0,0.5] training.steps=50")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[nds] %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
        variants = sigma_variants(cfg)
        for variant in variants:
            trial_config(cfg, variant)  # every trial's config must validate before Ray starts
        preflight(cfg)
    except (ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"[nds] {SWEEP}: {len(variants)} trials: {', '.join(variant_name(v) for v in variants)}", flush=True)
    if args.dry_run:
        print(to_yaml(cfg))
        return 0
    outcome = run_sweep(cfg, variants, SWEEP)
    failed = [t for t in outcome.trials if not t["ok"]]
    for trial in failed:
        print(f"[nds] trial {variant_name(trial['variant'])} failed: {trial['error']}", file=sys.stderr)
    print(f"[nds] {len(outcome.trials) - len(failed)}/{len(outcome.trials)} trials finished; "
          f"MLflow parent run {outcome.parent_run_id}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
