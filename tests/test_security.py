"""What a shared store must not let through: pickled code in weight files, credentials in MLflow params."""
import os

import pytest
from mlflow.tracking import MlflowClient

from nds import tracking
from nds.config import load_config
from nds.sweep.level_store import LevelStore, level_id, load_level_model


class _RunsCode:
    """Unpickling this runs a shell command: what a tampered weights file could carry."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_level_weights_file_that_carries_code_is_refused_unrun(tmp_path):
    import torch

    cfg = load_config(None, ["data.name=digits", "hierarchy.L=1"])
    store = LevelStore(tmp_path / "levels")
    marker = tmp_path / "code_ran"
    entry = store.put(level_id(cfg, 1), {"w": torch.zeros(1)}, {"level": 1})
    torch.save({"w": _RunsCode(marker)}, entry.weights)
    with pytest.raises(RuntimeError, match="cannot read level weights"):
        load_level_model(cfg, entry)
    assert not marker.exists()


def test_credentials_never_reach_mlflow_params(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment = tracking.prepare_experiment(uri, "nds-security", tmp_path / "artifacts")
    run_id = tracking.start_run(uri, experiment, "run", params={
        "tracking.uri": "https://alice:s3cr3t@mlflow.example.org:5000",
        "data.root": "s3://AKIAEXAMPLE:wJalrXUtnFEMI@bucket/imagenet",
        "aws_secret_access_key": "wJalrXUtnFEMI", "hf_token": "hf_abc", "MLFLOW_TRACKING_PASSWORD": "pw",
        "model.width": "64"})
    logged = MlflowClient(uri).get_run(run_id).data.params
    assert logged == {"tracking.uri": "https://***@mlflow.example.org:5000",
                      "data.root": "s3://***@bucket/imagenet", "model.width": "64"}
    assert not any("s3cr3t" in v or "wJalr" in v for v in logged.values())
