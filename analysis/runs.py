"""Read trial runs from MLflow into one pandas frame, one row per distinct config."""
from __future__ import annotations

import mlflow
import pandas as pd

from nds.metrics import FID, SUBSTITUTE


def load_trials(tracking_uri: str, experiments: list[str]) -> pd.DataFrame:
    """Finished trial runs; a config run twice counts once (the newest run of its config hash)."""
    mlflow.set_tracking_uri(tracking_uri)
    frame = mlflow.search_runs(experiment_names=experiments, filter_string="tags.`nds.kind` = 'trial'",
                               output_format="pandas")
    if frame.empty:
        return frame
    frame = frame[frame["status"] == "FINISHED"]
    frame = frame.sort_values("start_time").drop_duplicates("tags.nds.config_hash", keep="last")
    return frame.reset_index(drop=True)


def quality_metric(frame: pd.DataFrame) -> str:
    """True FID where every run has it; otherwise the named substitute."""
    fid_col = f"metrics.{FID}"
    if fid_col in frame and frame[fid_col].notna().all():
        return FID
    return SUBSTITUTE
