"""What the MLflow UI is told about nds's experiments, against a real sqlite store."""
from mlflow.tracking import MlflowClient

from nds import tracking


def test_experiments_declare_themselves_model_training_old_ones_too(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    fresh = tracking.prepare_experiment(uri, "nds-fresh", tmp_path / "artifacts")
    client = MlflowClient(uri)
    assert client.get_experiment(fresh).tags[tracking.EXPERIMENT_KIND_TAG] == tracking.MODEL_TRAINING
    older = client.create_experiment("nds-older")  # as a store made before the tag was set holds it
    assert tracking.EXPERIMENT_KIND_TAG not in client.get_experiment(older).tags
    assert tracking.prepare_experiment(uri, "nds-older", tmp_path / "artifacts") == older
    assert client.get_experiment(older).tags[tracking.EXPERIMENT_KIND_TAG] == tracking.MODEL_TRAINING


def test_the_ui_link_opens_the_training_view_and_hides_credentials():
    link = tracking.ui_link("https://bob:hunter2@mlflow.lab:5000/", "7")
    assert link == "https://***@mlflow.lab:5000/#/experiments/7?workflowType=machine_learning"
    local = tracking.ui_link("sqlite:////data/runs/mlflow.db", "3")
    assert "mlflow ui --backend-store-uri sqlite:////data/runs/mlflow.db" in local
    assert local.endswith("/#/experiments/3?workflowType=machine_learning")


def test_a_retried_trial_closes_only_its_own_abandoned_attempt(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment = tracking.prepare_experiment(uri, "nds-retry", tmp_path / "artifacts")
    stage, other_stage = (tracking.start_run(uri, experiment, name) for name in ("stage", "other-stage"))
    abandoned = tracking.start_run(uri, experiment, "L2-seed0", parent_run_id=stage)
    sibling = tracking.start_run(uri, experiment, "L1-seed0", parent_run_id=stage)
    elsewhere = tracking.start_run(uri, experiment, "L2-seed0", parent_run_id=other_stage)
    assert tracking.close_earlier_attempts(uri, experiment, stage, "L2-seed0") == 1
    client = MlflowClient(uri)
    assert client.get_run(abandoned).info.status == "KILLED"
    assert "trial driver died" in client.get_run(abandoned).data.tags["error"]
    assert {client.get_run(r).info.status for r in (sibling, elsewhere, stage)} == {"RUNNING"}
    assert tracking.close_earlier_attempts(uri, experiment, stage, "L2-seed0") == 0
