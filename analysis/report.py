"""One static HTML page per sweep experiment: what the runs show, the tables with their chain
diagnostic, the plots, a few sample grids per setting, and the MLflow run ids behind each.

Written by ``analysis/make_tables.py`` to ``<runs_dir>/report/<experiment>.html`` (images inlined, so
the file opens anywhere without a server) and logged as an artifact of the experiment's newest sweep
run, so the MLflow UI links to it.
"""
from __future__ import annotations

import base64
import html
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
from mlflow.tracking import MlflowClient

from analysis.render import BOLD
from analysis.runs import load_trials
from analysis.tables import Table, describe
from nds.tracking import RunKind, Tag, mask_credentials, tag_filter

GRID_FILES = ("level_grid.png", "sample_grid.png")  # what a chain trial logs (MDM: sample_grid.png)
MAX_GRID_SETTINGS = 24  # settings whose grids are shown (newest first); the page stays a few MB
ARTIFACT_DIR = "report"  # where the page goes among the sweep run's artifacts
STYLE = """body{font-family:sans-serif;margin:2em auto;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:13px}th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}.ids{font-family:monospace;font-size:11px;color:#555}
img{max-width:100%;border:1px solid #ddd;margin:4px 0}.caption{color:#444;font-size:14px}figure{margin:0 0 1.5em}"""


def _text(value) -> str:
    """Escaped text with the tables' **bold** kept as <b>."""
    return BOLD.sub(r"<b>\1</b>", html.escape(str(value)))


def _frame_html(frame: pd.DataFrame) -> str:
    head = "".join(f"<th>{_text(c)}</th>" for c in frame.columns)
    rows = "".join("<tr>" + "".join(f"<td>{_text(v)}</td>" for v in row) + "</tr>"
                   for row in frame.itertuples(index=False))
    return f"<table><tr>{head}</tr>{rows}</table>"


def _png(data: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def _run_ids(ids) -> str:
    return "<p class='ids'>MLflow runs: " + " ".join(sorted(set(ids))) + "</p>"


def _table_runs(table: Table, runs: pd.DataFrame) -> list[str]:
    """Every run (all seeds) of the settings a table shows."""
    if "group" in table.cells:
        return list(runs.loc[runs["group"].isin(table.cells["group"]), "run_id"])
    return list(table.cells.get("run_id", []))


def _table_section(table: Table, runs: pd.DataFrame, plot: Callable[[Table, Path], Path] | None) -> str:
    parts = [f"<h2 id='{table.name}'>{_text(table.title)}</h2>", f"<p class='caption'>{_text(table.caption)}</p>"]
    if table.summary:
        parts.append("<p><b>What the runs show:</b></p><ul>" + "".join(f"<li>{_text(s)}</li>" for s in table.summary)
                     + "</ul>")
    for part in table.parts:
        parts += [f"<h3>{_text(part.title)}</h3>", _frame_html(part.frame)]
    if plot is not None:
        with tempfile.TemporaryDirectory() as tmp:
            path = plot(table, Path(tmp) / f"{table.name}.png")
            parts.append(f"<figure>{_png(path.read_bytes(), table.name)}</figure>")
    parts.append(_run_ids(_table_runs(table, runs)))
    return "\n".join(parts)


def _grid_section(client: MlflowClient, runs: pd.DataFrame) -> str:
    """The logged grids of the newest run of each setting (up to MAX_GRID_SETTINGS)."""
    newest = runs.sort_values("start_time").drop_duplicates("group", keep="last").iloc[::-1][:MAX_GRID_SETTINGS]
    blocks = []
    for _, run in newest.iterrows():
        logged = {a.path for a in client.list_artifacts(run["run_id"])}
        images = []
        with tempfile.TemporaryDirectory() as tmp:
            for name in GRID_FILES:
                if name in logged:
                    images.append(_png(Path(client.download_artifacts(run["run_id"], name, tmp)).read_bytes(), name))
        if images:
            seeds = runs.loc[runs["group"] == run["group"], "seed"].astype(str)
            blocks.append(f"<h3>{_text(run['variant'] or run['group'])} — seed {_text(run['seed'])} "
                          f"(of seeds {', '.join(sorted(seeds))})</h3>" + "".join(images) + _run_ids([run["run_id"]]))
    return "<h2 id='grids'>Sample grids, newest run per setting</h2>\n" + "\n".join(blocks) if blocks else ""


def _runs_section(runs: pd.DataFrame) -> str:
    """Every finished trial run read, newest first: the ids behind the tables, and those set aside."""
    shown = runs.sort_values("start_time", ascending=False)
    frame = pd.DataFrame({"run id": shown["run_id"], "setting": shown["variant"], "seed": shown["seed"],
                          "dataset": shown["dataset"], "condition": shown["condition"], "L": shown["L"],
                          "σ_2..σ_L": shown["sigmas"], "guidance": shown["cfg_scale"],
                          "started": pd.to_datetime(shown["start_time"], unit="ms").dt.strftime("%Y-%m-%d %H:%M")})
    return "<h2 id='runs'>Finished trial runs read</h2>" + _frame_html(frame)


def render_report(tracking_uri: str, experiment: str, tables: list[Table], messages: list[str],
                  plots: dict[str, Callable[[Table, Path], Path]]) -> str:
    """The page for one experiment, from its tables (``analysis.make_tables.build_tables``)."""
    client = MlflowClient(tracking_uri)
    trials = load_trials(tracking_uri, [experiment])
    title = f"nds report — {experiment}"
    head = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<p class='caption'>MLflow store {html.escape(mask_credentials(tracking_uri))}; written "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')}. Lower is better for every Fréchet distance.</p>")
    if trials.empty:
        return head + (f"<p><b>No finished trial runs</b> in experiment {html.escape(experiment)} yet: nothing to "
                       "report. Run a sweep, then make_tables again.</p></body></html>")
    runs = describe(trials)
    body = ["<p>Contents: " + ", ".join(f"<a href='#{t.name}'>{_text(t.title)}</a>" for t in tables)
            + ", <a href='#grids'>sample grids</a>, <a href='#runs'>runs</a>.</p>"]
    body += [_table_section(table, runs, plots.get(table.name)) for table in tables]
    body += [_grid_section(client, runs), _runs_section(runs)]
    if messages:
        body.append("<h2>Notes</h2><ul>" + "".join(f"<li>{_text(m)}</li>" for m in messages) + "</ul>")
    return head + "\n".join(body) + "</body></html>"


def publish_report(tracking_uri: str, experiment: str, page: str, out_dir: Path) -> Path:
    """Write the page to ``out_dir/<experiment>.html`` and log it to the experiment's newest sweep run."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / (re.sub(r"[^\w.-]+", "_", experiment) + ".html")  # a file name whatever the experiment's name
    path.write_text(page)
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        sweeps = client.search_runs([found.experiment_id], filter_string=tag_filter(Tag.KIND, RunKind.SWEEP),
                                    order_by=["attributes.start_time DESC"], max_results=1)
        if sweeps:
            client.log_artifact(sweeps[0].info.run_id, str(path), ARTIFACT_DIR)
    return path

