"""Regenerate the σ-sweep table (paper Table 1 layout) from the runs in MLflow.

    python analysis/make_tables.py [--config FILE] [--experiment NAME ...] [--out-dir DIR] [key=value ...]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from analysis.runs import load_trials, quality_metric
from analysis.tables import sigma_table, to_markdown, to_wide
from nds.config import ConfigError, load_config
from nds.metrics import SUBSTITUTE

METRIC_TITLES = {
    "fid": "FID (clean-fid, Inception-v3)",
    SUBSTITUTE: "Fréchet distance in EfficientNet-Lite0 features (substitute: Inception weights absent; not FID)",
}


def make_tables(tracking_uri: str, experiments: list[str], out_dir: Path) -> str:
    trials = load_trials(tracking_uri, experiments)
    if trials.empty:
        raise SystemExit(f"no finished trial runs in experiment(s) {experiments} at {tracking_uri}")
    metric = quality_metric(trials)
    wide = to_wide(sigma_table(trials, metric))
    out_dir.mkdir(parents=True, exist_ok=True)
    markdown = to_markdown(wide, f"Table 1 layout — {METRIC_TITLES[metric]} (lower is better; best σ_L per row in bold)")
    (out_dir / "table1_sigma.md").write_text(markdown)
    wide.to_csv(out_dir / "table1_sigma.csv", index=False)
    return markdown


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (for the tracking URI and experiment name)")
    parser.add_argument("--experiment", action="append", help="MLflow experiment name (repeatable)")
    parser.add_argument("--out-dir", help="where to write the tables (default: <runs_dir>/tables)")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    out_dir = Path(args.out_dir) if args.out_dir else cfg.runs_dir / "tables"
    print(make_tables(cfg.tracking_uri, args.experiment or [cfg.tracking.experiment], out_dir))
    print(f"written to {out_dir}/table1_sigma.{{md,csv}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
