"""Read trial runs from MLflow into one pandas frame, one row per distinct config."""
from __future__ import annotations

import pandas as pd
from mlflow.tracking import MlflowClient

from nds.metrics import FID, SUBSTITUTE


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


def load_trials(tracking_uri: str, experiments: list[str]) -> pd.DataFrame:
    """Finished trial runs; a config run twice counts once (the newest run of its config hash)."""
    client = MlflowClient(tracking_uri)
    ids = [e.experiment_id for name in experiments if (e := client.get_experiment_by_name(name)) is not None]
    runs, token = [], None
    while ids:
        page = client.search_runs(ids, filter_string="tags.`nds.kind` = 'trial' and attributes.status = 'FINISHED'",
                                  max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            break
    frame = _frame(runs)
    if frame.empty:
        return frame
    frame = frame.sort_values("start_time").drop_duplicates("tags.nds.config_hash", keep="last")
    return frame.reset_index(drop=True)


def quality_metric(frame: pd.DataFrame) -> str:
    """True FID where every run has it; otherwise the named substitute."""
    fid_col = f"metrics.{FID}"
    if fid_col in frame and frame[fid_col].notna().all():
        return FID
    return SUBSTITUTE
