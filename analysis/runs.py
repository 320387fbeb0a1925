"""Read trial runs from MLflow into pandas: one row per distinct config, seeds aggregated per setting."""
from __future__ import annotations

import pandas as pd
from mlflow.tracking import MlflowClient

from nds.eval.metrics import METRIC_PREFERENCE, SUBSTITUTE
from nds.tracking import RunKind, Tag, tag_filter

EXPERIMENT_PREFIX = "nds-"
IDENTITY = [f"tags.{Tag.SWEEP}", f"tags.{Tag.VARIANT}", f"tags.{Tag.CONFIG_HASH}"]


def _frame(runs) -> pd.DataFrame:
    """The columns mlflow.search_runs would give (params.*, metrics.*, tags.*), without its global URI."""
    rows = []
    for run in runs:
        row = {"run_id": run.info.run_id, "status": run.info.status, "start_time": run.info.start_time}
        row.update({f"params.{k}": v for k, v in run.data.params.items()})
        row.update({f"metrics.{k}": v for k, v in run.data.metrics.items()})
        row.update({f"tags.{k}": v for k, v in run.data.tags.items()})
        rows.append(row)
    return pd.DataFrame(rows)


def _pages(search, **kwargs) -> list:
    items, token = [], None
    while True:
        page = search(page_token=token, **kwargs)
        items.extend(page)
        token = page.token
        if not token:
            return items


def experiment_names(client: MlflowClient) -> list[str]:
    """Every experiment a sweep wrote with the default naming (nds-sweep-sigma, ...)."""
    found = _pages(client.search_experiments, filter_string=f"name LIKE '{EXPERIMENT_PREFIX}%'")
    return sorted(e.name for e in found)


def load_trials(tracking_uri: str, experiments: list[str] | None = None) -> pd.DataFrame:
    """Finished trial runs (default: of every nds-* experiment). A config a sweep ran twice counts
    once: the newest run per (``nds.sweep``, ``nds.variant``, ``nds.config_hash``). The same config
    in another sweep, or under another label (MDM's "nested" baseline may equal a Fig. 8a
    schedule), keeps its own row for its own table or curve."""
    client = MlflowClient(tracking_uri)
    names = experiments or experiment_names(client)
    ids = [e.experiment_id for name in names if (e := client.get_experiment_by_name(name)) is not None]
    if not ids:
        return pd.DataFrame()
    runs = _pages(client.search_runs, experiment_ids=ids, max_results=1000,
                  filter_string=tag_filter(Tag.KIND, RunKind.TRIAL) + " and attributes.status = 'FINISHED'")
    frame = _frame(runs)
    if frame.empty:
        return frame
    frame = frame.reindex(columns=[*frame.columns, *(c for c in IDENTITY if c not in frame)])  # older runs lack tags
    frame = frame.sort_values("start_time").drop_duplicates(IDENTITY, keep="last")
    return frame.reset_index(drop=True)


def quality_metric(frame: pd.DataFrame) -> str:
    """The metric the newest run logged, first of true FID, the data classifier's Fréchet distance,
    the EfficientNet substitute: the tables follow the latest runs (older runs that lack it are
    superseded by newer settings on the same cells, or show as missing)."""
    newest = frame.sort_values("start_time").iloc[-1] if not frame.empty else pd.Series(dtype=object)
    for metric in METRIC_PREFERENCE:
        if pd.notna(newest.get(f"metrics.{metric}")):
            return metric
    return SUBSTITUTE


def metric_history(tracking_uri: str, run_ids: list[str], metric: str) -> pd.DataFrame:
    """The metric at every step it was logged (MDM: training iterations): run_id, step, value."""
    client = MlflowClient(tracking_uri)
    rows = [{"run_id": run_id, "step": m.step, "value": m.value}
            for run_id in run_ids for m in client.get_metric_history(run_id, metric)]
    return pd.DataFrame(rows, columns=["run_id", "step", "value"])


def settings(frame: pd.DataFrame, keys: list[str], averaged: tuple[str, ...] = ()) -> tuple[pd.DataFrame, int]:
    """Seeds of one setting (same ``group``: variant label and ``nds.group_hash``) → mean, std, n of ``value``
    (and the mean over seeds of each ``averaged`` column); the other columns from its newest run. Where
    several settings fall on the same ``keys`` (a sweep re-run with other hyperparameters), the newest
    is kept; returns how many were set aside."""
    frame = frame.sort_values("start_time")
    stats = frame.groupby("group")["value"].agg(["mean", "std", "count"]).rename(columns={"count": "n"})
    averaged = [column for column in averaged if column in frame]
    newest = frame.drop_duplicates("group", keep="last").set_index("group").drop(columns=["value", *averaged])
    cells = newest.join(stats).join(frame.groupby("group")[averaged].mean()).sort_values("start_time")
    kept = cells.drop_duplicates(keys, keep="last")
    return kept.reset_index(), len(cells) - len(kept)
