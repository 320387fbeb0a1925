"""Regenerate the papers' ablation tables (Markdown, LaTeX, CSV) and plots (PNG) from the MLflow runs.

    python analysis/make_tables.py [--config FILE] [--tracking-uri URI] [--experiments NAME ...]
                                   [--out-dir DIR] [--report-dir DIR] [--format md,latex,csv,png]
                                   [--metric NAME] [key=value ...]

Reads the finished trial runs of every nds-* experiment (or the named ones; or the config's
tracking.experiment when it sets one), counts a config hash once (newest run) and averages the
seeds of a setting. Writes, per table, <name>.md/.tex/.csv (and .png where there is a plot):
table1_sigma, table2_sigma, table3_text, depth, shapes, table4a_encoders, table4b_rcg, mdm (+ mdm_*.png), fig8c_guidance (+ .png), and
tables.md with all of them. A sweep without runs is skipped with a line saying so. Per experiment, one
static HTML report (analysis/report.py: tables, plots, grids, run ids) under --report-dir
(default <runs_dir>/report), also logged to the experiment's newest sweep run.
"""
from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

from mlflow.tracking import MlflowClient

from analysis.plots import depth_plot, guidance_plot, mdm_plots, sigma_plot
from analysis.render import to_csv, to_latex, to_markdown
from analysis.report import publish_report, render_report
from analysis.runs import EXPERIMENT_PREFIX, experiment_names, load_trials, metric_history
from analysis.tables import (
    Table,
    depth_table,
    encoders_table,
    guidance_table,
    mdm_table,
    rcg_table,
    shapes_table,
    sigma_tables,
    text_table,
)
from nds.config import ConfigError, load_config
from nds.config.arguments import add_config_arguments, config_file, config_help
from nds.eval.metrics import METRIC_PREFERENCE

FORMATS = ("md", "latex", "csv", "png")
WRITERS = {"md": (".md", to_markdown), "latex": (".tex", to_latex), "csv": (".csv", to_csv)}
PLOTS = {"table1_sigma": sigma_plot, "table2_sigma": sigma_plot, "depth": depth_plot, "fig8c_guidance": guidance_plot}


def build_tables(tracking_uri: str, experiments: list[str] | None = None,
                 metric: str | None = None) -> tuple[list[Table], list[str]]:
    """Every table with runs behind it, and one line per table skipped or per setting set aside.
    ``metric``: what the tables show (default: per table, ``analysis.runs.quality_metric``)."""
    trials = load_trials(tracking_uri, experiments)
    if trials.empty:
        where = f"experiment(s) {experiments}" if experiments else f"the {EXPERIMENT_PREFIX}* experiments"
        raise SystemExit(f"no finished trial runs in {where} at {tracking_uri}")
    tables, messages = sigma_tables(trials, metric)
    for table, skipped in [text_table(trials, metric), depth_table(trials, metric), shapes_table(trials, metric), encoders_table(trials, metric),
                           rcg_table(trials, metric), mdm_table(trials, partial(metric_history, tracking_uri), metric),
                           guidance_table(trials, metric)]:
        tables += [table] if table else []
        messages += [skipped] if skipped else []
    if not tables:
        raise SystemExit("no table to make: " + "; ".join(messages))
    return tables, messages + [note for table in tables for note in table.notes]


def write_reports(tracking_uri: str, experiments: list[str] | None, report_dir: Path,
                  metric: str | None = None) -> list[Path]:
    """One HTML report per experiment (default: every nds-* one), a page saying so where none finished."""
    names = experiments or experiment_names(MlflowClient(tracking_uri))
    paths = []
    for name in names:
        try:
            tables, messages = build_tables(tracking_uri, [name], metric)
        except SystemExit as nothing:
            tables, messages = [], [str(nothing)]
        paths.append(publish_report(tracking_uri, name, render_report(tracking_uri, name, tables, messages, PLOTS),
                                    report_dir))
    return paths


def make_tables(tracking_uri: str, experiments: list[str] | None, out_dir: Path,
                formats: tuple[str, ...] = FORMATS, metric: str | None = None, report_dir: Path | None = None) -> str:
    """Write every table in ``formats`` under ``out_dir`` (and, given ``report_dir``, each experiment's
    HTML report); returns the tables as Markdown."""
    if report_dir is not None:  # first: a store without finished runs still gets its page saying so
        for path in write_reports(tracking_uri, experiments, report_dir, metric):
            print(f"[nds] report: {path}", file=sys.stderr)
    tables, messages = build_tables(tracking_uri, experiments, metric)
    out_dir.mkdir(parents=True, exist_ok=True)
    for table in tables:
        for fmt in formats:
            if fmt in WRITERS:
                suffix, write = WRITERS[fmt]
                (out_dir / f"{table.name}{suffix}").write_text(write(table))
        if "png" in formats and table.name in PLOTS:
            PLOTS[table.name](table, out_dir / f"{table.name}.png")
        if "png" in formats and table.curves is not None:
            mdm_plots(table, out_dir)
    report = "\n".join(to_markdown(table) for table in tables)
    if "md" in formats:
        (out_dir / "tables.md").write_text(report)
    for message in messages:
        print(f"[nds] {message}", file=sys.stderr)
    return report


def _formats(text: str) -> tuple[str, ...]:
    chosen = tuple(f.strip() for f in text.split(",") if f.strip())
    unknown = set(chosen) - set(FORMATS)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown format(s) {sorted(unknown)}; choose from {','.join(FORMATS)}")
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: from the config)")
    parser.add_argument("--experiments", nargs="+", metavar="NAME",
                        help=f"MLflow experiments to read (default: every {EXPERIMENT_PREFIX}* experiment)")
    parser.add_argument("--out-dir", help="where to write the tables (default: <runs_dir>/tables)")
    parser.add_argument("--report-dir", help="where each experiment's HTML report goes (default: <runs_dir>/report)")
    parser.add_argument("--format", type=_formats, default=FORMATS, help="comma-separated subset of md,latex,csv,png")
    parser.add_argument("--metric", choices=METRIC_PREFERENCE,
                        help="the metric the tables show (default: the newest run's best of " + ", ".join(METRIC_PREFERENCE) + ")")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = parser.parse_args(argv)
    if args.experiments:  # --experiments takes every word after it: key=value words are overrides
        args.overrides += [word for word in args.experiments if "=" in word]
        args.experiments = [word for word in args.experiments if "=" not in word] or None
    try:
        helped = config_help(args)
        if helped is not None:
            print(helped)
            return 0
        cfg = load_config(config_file(args), args.overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    out_dir = Path(args.out_dir) if args.out_dir else cfg.runs_dir / "tables"
    report_dir = Path(args.report_dir) if args.report_dir else cfg.runs_dir / "report"
    experiments = args.experiments or ([cfg.tracking.experiment] if cfg.tracking.experiment else None)
    print(make_tables(args.tracking_uri or cfg.tracking_uri, experiments, out_dir, args.format, args.metric, report_dir))
    print(f"written to {out_dir}/ ({', '.join(args.format)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
