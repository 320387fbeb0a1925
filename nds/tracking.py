"""MLflow bookkeeping: one parent run per sweep, one child run per trial.

Everything goes through ``MlflowClient`` with explicit run ids (no global active run), so
concurrent Ray workers can log to the same store. The store and the experiment are
created once in the driver, before any trial starts: concurrent first-time creation of a
sqlite store races in its schema migration.
"""
from __future__ import annotations

import os
import re
import socket
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.tracking import MlflowClient

PARENT_TAG = "mlflow.parentRunId"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # what MLflow 3's UI reads to choose an experiment's landing page
MODEL_TRAINING = "custom_model_development"
MAX_BATCH = 100  # MLflow's limit on params per log_batch call
# params are readable by everyone with access to the store: names like these are never logged, and
# the user:password part of a URL value (an MLflow or S3 address) is masked
CREDENTIAL_NAME = re.compile(r"pass(word|wd)?|secret|token|api[_-]?key|credential|private[_-]?key|auth", re.I)
URL_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")


def mask_credentials(text: str) -> str:
    """``text`` with the user:password part of every URL in it masked."""
    return URL_USERINFO.sub("***@", text)


def public_params(params: dict[str, str]) -> dict[str, str]:
    """``params`` without credentials: credential-like names dropped, URL user:password masked."""
    return {k: mask_credentials(str(v)) for k, v in params.items() if not CREDENTIAL_NAME.search(k)}


MLFLOW_PROBE = "/api/2.0/mlflow/experiments/search?max_results=1"  # a read every MLflow tracking server answers


def unreachable(uri: str, timeout_s: float = 10.0) -> str:
    """Why an ``http(s)`` tracking URI is not an MLflow server that answers, or "" if it is one (or the
    store is not a server). A quick read of its REST API: MLflow's own client retries an unreachable
    server for minutes before it fails, and a server that is not MLflow fails only at the first log."""
    if not uri.startswith(("http://", "https://")):
        return ""
    import base64
    import json
    import urllib.error
    import urllib.parse
    import urllib.request

    parts = urllib.parse.urlsplit(uri)
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    netloc += f":{parts.port}" if parts.port else ""
    request = urllib.request.Request(urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
                                     + MLFLOW_PROBE)
    if parts.username:  # user:password@ in the URI: what MLflow's client sends as basic auth
        login = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
        request.add_header("Authorization", "Basic " + base64.b64encode(login.encode()).decode())
    shown = mask_credentials(uri)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            body = response.read(1 << 16)
    except urllib.error.HTTPError as err:
        if err.code in (401, 403):  # an MLflow server behind authentication: MLflow's client logs in
            return ""
        what = "fails" if err.code >= 500 else "is not an MLflow tracking server"
        return f"the server at {shown} {what} (HTTP {err.code} for MLflow's REST API {MLFLOW_PROBE.split('?')[0]})"
    except (OSError, ValueError) as err:
        return f"no MLflow server answers at {shown} ({getattr(err, 'reason', err)})"
    try:
        answer = json.loads(body)
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        return (f"the server at {shown} answers, but not as an MLflow tracking server (no JSON from "
                f"{MLFLOW_PROBE.split('?')[0]})")
    return ""


def prepare_experiment(uri: str, name: str, artifact_root: Path) -> str:
    """Create the store (if new) and the experiment (with an absolute artifact location), marked as
    model training so MLflow's UI opens it on its runs, not on the GenAI (traces) overview."""
    client = MlflowClient(uri)
    client.search_experiments(max_results=1)  # runs the store's schema migration, once, here
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        artifact_root.mkdir(parents=True, exist_ok=True)
        return client.create_experiment(name, artifact_location=artifact_root.resolve().as_uri(),
                                        tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING})
    if experiment.tags.get(EXPERIMENT_KIND_TAG) != MODEL_TRAINING:  # made before nds tagged its experiments
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
    return experiment.experiment_id


def ui_link(uri: str, experiment_id: str) -> str:
    """Where to see an experiment's runs: MLflow 3's UI opens on its GenAI pages unless the link asks
    for the model-training view."""
    route = f"/#/experiments/{experiment_id}?workflowType=machine_learning"
    if uri.startswith(("http://", "https://")):
        return mask_credentials(uri.rstrip("/")) + route
    return f"`mlflow ui --backend-store-uri {mask_credentials(uri)}`, then http://127.0.0.1:5000{route}"


def start_run(uri: str, experiment_id: str, name: str, params: dict[str, str] | None = None,
              tags: dict[str, str] | None = None, parent_run_id: str | None = None) -> str:
    client = MlflowClient(uri)
    tags = dict(tags or {})
    if parent_run_id:
        tags[PARENT_TAG] = parent_run_id
    run = client.create_run(experiment_id, run_name=name, tags=tags)
    items = [Param(k, v[:6000]) for k, v in public_params(params or {}).items()]
    for i in range(0, len(items), MAX_BATCH):
        client.log_batch(run.info.run_id, params=items[i : i + MAX_BATCH])
    return run.info.run_id


@contextmanager
def open_run(uri: str, experiment_id: str, name: str, params: dict[str, str] | None = None,
             tags: dict[str, str] | None = None, parent_run_id: str | None = None) -> Iterator[str]:
    """A run (its id) that ends FINISHED when the block completes, FAILED with the error when it raises."""
    run_id = start_run(uri, experiment_id, name, params, tags, parent_run_id)
    try:
        yield run_id
    except BaseException as err:
        end_run(uri, run_id, error=err)
        raise
    end_run(uri, run_id)


def log_metrics(uri: str, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    now = int(time.time() * 1000)
    MlflowClient(uri).log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])


def set_tags(uri: str, run_id: str, tags: dict[str, str]) -> None:
    MlflowClient(uri).log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def log_artifact(uri: str, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    MlflowClient(uri).log_artifact(run_id, str(path), artifact_path)


def end_run(uri: str, run_id: str, error: BaseException | None = None) -> None:
    """Close a run FINISHED, or FAILED with the error recorded as tags."""
    client = MlflowClient(uri)
    if error is not None:
        text = "".join(traceback.format_exception(error))
        client.set_tag(run_id, "error", f"{type(error).__name__}: {error}"[:5000])
        client.set_tag(run_id, "error.traceback", text[-5000:])
    client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED if error else RunStatus.FINISHED))


class Tag:
    """The ``nds.*`` tags on every run nds logs: code, analysis and tests name them through this class."""

    KIND = "nds.kind"  # a RunKind
    SWEEP = "nds.sweep"  # the sweep a run belongs to (sweep_sigma, sweep_mdm, ...)
    STAGE = "nds.stage"  # the stage (one Ray Tune run) a trial belongs to
    VARIANT = "nds.variant"  # the trial's setting, without the seed
    CONFIG_HASH = "nds.config_hash"  # what the run computes, seed included
    GROUP_HASH = "nds.group_hash"  # the same without the seed: a setting's seeds share it
    METRIC = "nds.metric"  # the quality metric that ranks the sweep's runs
    DRIVER = "nds.driver"  # host:pid of the sweep driver a run belongs to
    TRIAL_KEY = "nds.trial_key"  # what a trial computes and reports: equal keys, interchangeable results
    MDM_BASELINE = "nds.mdm_baseline"  # nested | cascaded | plain | latent
    BEST_SIGMA = "nds.best_sigma"  # on a σ stage: the σ carried into the next depth
    BEST_CFG_SCALE = "nds.best_cfg_scale"  # ... and the guidance scale

    @staticmethod
    def level(level: int, field: str = "") -> str:
        """The level-store entry a chain trial used for ``level`` (field: path | trained_here)."""
        return f"nds.level.{level}" + (f".{field}" if field else "")


class RunKind:
    """The values of ``Tag.KIND``: what a run is."""

    SWEEP = "sweep"  # a sweep: its stages are its children
    STAGE = "stage"  # one Ray Tune run: its trials are its children
    TRIAL = "trial"  # one setting at one seed: the runs the tables read
    MDM = "mdm"  # a whole NestedUNet run (experiments/train_mdm.py)
    KNN_FIGURE = "knn_figure"  # experiments/knn_figure.py


def tag_filter(tag: str, value: str) -> str:
    """An MLflow search filter on one tag's value."""
    return f"tags.`{tag}` = '{value}'"


def driver_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _driver_gone(driver: str) -> bool:
    """True only when the driver certainly died: it ran on this host and its process is gone (a driver
    on another host cannot be checked from here, so it counts as alive)."""
    host, _, pid = driver.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # someone else's live process
        return False
    return False


def close_abandoned_runs(uri: str, experiment_id: str) -> int:
    """Runs left RUNNING by a sweep driver that was killed (SIGKILL, OOM, a stopped job) end KILLED,
    with the reason; returns how many. Runs of live drivers, or of drivers on other hosts, are left."""
    client = MlflowClient(uri)
    running = client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=5000)
    closed = 0
    for run in running:
        driver = run.data.tags.get(Tag.DRIVER)
        if driver and _driver_gone(driver):
            _close_killed(client, run.info.run_id, f"abandoned: its sweep driver {driver} died; closed by a later sweep")
            closed += 1
    return closed


def close_earlier_attempts(uri: str, experiment_id: str, stage_run_id: str, trial_run_name: str) -> int:
    """A trial's runs still RUNNING under its stage's run when Ray Tune starts the trial again: earlier
    attempts whose trial driver died (its node was lost), which nothing else would close. They end
    KILLED, saying so; returns how many."""
    client = MlflowClient(uri)
    earlier = client.search_runs([experiment_id], filter_string=(
        f"tags.`mlflow.parentRunId` = '{stage_run_id}' and attributes.run_name = '{trial_run_name}' "
        "and attributes.status = 'RUNNING'"))
    for run in earlier:
        _close_killed(client, run.info.run_id,
                      "abandoned: its trial driver died (a lost node); Ray Tune ran the trial again under a new run")
    return len(earlier)


def _close_killed(client: MlflowClient, run_id: str, reason: str) -> None:
    """End a run whose process is gone: KILLED, with why in its ``error`` tag."""
    client.set_tag(run_id, "error", reason)
    client.set_terminated(run_id, RunStatus.to_string(RunStatus.KILLED))


def finished_trials(uri: str, experiment_id: str) -> dict[str, tuple[str, dict[str, float]]]:
    """Finished trial runs of the experiment by their trial key: (run id, final metrics); the newest
    run of a key wins."""
    client = MlflowClient(uri)
    found: dict[str, tuple[str, dict[str, float]]] = {}
    token = None
    while True:
        page = client.search_runs([experiment_id], filter_string=tag_filter(Tag.KIND, RunKind.TRIAL) + " and attributes.status = 'FINISHED'",
                                  max_results=1000, order_by=["attributes.start_time ASC"], page_token=token)
        for run in page:
            key = run.data.tags.get(Tag.TRIAL_KEY)
            if key:
                found[key] = (run.info.run_id, dict(run.data.metrics))
        token = page.token
        if not token:
            return found
