"""Against a real `mlflow server`: the runs line up in the UI's compare view (same flat param names
across sweeps, trials under their stage) and make_tables reads the server's REST API."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from test_tables import chain_metrics, chain_params, log_sigma_sweep, log_trial

from analysis.make_tables import make_tables
from nds.tracking import RunKind, Tag, tag_filter, unreachable

pytestmark = pytest.mark.slow  # the server takes 20 s or more to start on a 2-core machine
MLFLOW = Path(sys.executable).parent / "mlflow"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(tmp: Path, port: int) -> subprocess.Popen:
    """`mlflow server` on 127.0.0.1:port over the sqlite store in ``tmp``, once it answers /health."""
    log = open(tmp / "server.log", "a")
    proc = subprocess.Popen(
        [str(MLFLOW), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp / 'db'}", "--default-artifact-root", str(tmp / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,  # its own group: the server and its workers
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})  # no job runner: one process less to start
    log.close()
    deadline = time.monotonic() + 180  # generous: other work may load the machine
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return proc
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_server(proc)
            pytest.fail(f"mlflow server did not come up:\n{(tmp / 'server.log').read_text()[-3000:]}")
        time.sleep(0.5)


def stop_server(proc: subprocess.Popen) -> None:
    """End the server's process group (the server and its workers), and only that."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A tracking server on a fresh sqlite store; its process group is ended afterwards."""
    tmp = tmp_path_factory.mktemp("server")
    port = _free_port()
    proc = start_server(tmp, port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_server(proc)


def _rest(url: str, path: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def logged(server):
    client = MlflowClient(server)
    log_sigma_sweep(client)
    log_trial(client, "sweep_encoders", "encoder=vae", chain_params(depth=3, sigma=0.5, encoder="vae"),
              chain_metrics(3, 33.0))
    return server


def test_runs_line_up_for_the_compare_view(logged):
    experiment = _rest(logged, "/api/2.0/mlflow/experiments/get-by-name?experiment_name=nds-sweep-sigma")["experiment"]
    encoders = _rest(logged, "/api/2.0/mlflow/experiments/get-by-name?experiment_name=nds-sweep-encoders")["experiment"]
    ids = [experiment["experiment_id"], encoders["experiment_id"]]
    trials = _rest(logged, "/api/2.0/mlflow/runs/search",
                   {"experiment_ids": ids, "filter": tag_filter(Tag.KIND, RunKind.TRIAL), "max_results": 100})["runs"]
    sigma_trials = _rest(logged, "/api/2.0/mlflow/runs/search",
                         {"experiment_ids": ids, "filter": tag_filter(Tag.SWEEP, "sweep_sigma"), "max_results": 100})["runs"]
    assert len(trials) == 12 and len(sigma_trials) == 12  # 11 + 1 trials; the sweep_sigma stage and its 11
    tags = lambda run: {t["key"]: t["value"] for t in run["data"]["tags"]}  # noqa: E731
    params = lambda run: {p["key"]: p["value"] for p in run["data"]["params"]}  # noqa: E731

    by_id = {run["info"]["run_id"]: run for run in sigma_trials}
    for run in trials:
        parent = tags(run)["mlflow.parentRunId"]
        stage = by_id.get(parent) or _rest(logged, f"/api/2.0/mlflow/runs/get?run_id={parent}")["run"]
        assert tags(stage)[Tag.KIND] == RunKind.STAGE and tags(stage)[Tag.SWEEP] == tags(run)[Tag.SWEEP]

    deepest = [params(r) for r in trials if params(r)["hierarchy.L"] == "3"]
    sweeps = {tags(r)[Tag.SWEEP] for r in trials if params(r)["hierarchy.L"] == "3"}
    assert sweeps == {"sweep_sigma", "sweep_encoders"}  # the same columns in the compare view across sweeps
    shared = set.intersection(*(set(p) for p in deepest))
    assert {"hierarchy.L", "hierarchy.sigma.2", "hierarchy.sigma.3", "hierarchy.shape.3", "encoder.name",
            "data.name", "seed"} <= shared
    assert {p["encoder.name"] for p in deepest} == {"efficientnet_lite0", "vae"}


def test_the_preflight_probe_knows_a_tracking_server_from_another_server(server, tmp_path):
    """The check before a sweep reads MLflow's REST API: a real server passes (with credentials in its
    URI too); a web server that is not MLflow, or nothing at all, is named in one line."""
    host = server.split("://")[1]
    assert unreachable(server) == "" and unreachable(f"http://user:secret@{host}/") == ""
    other = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port := _free_port())],
                             cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while "no MLflow server answers" in (problem := unreachable(f"http://127.0.0.1:{port}")):
            assert time.monotonic() < deadline, problem
            time.sleep(0.2)
        assert "is not an MLflow tracking server (HTTP 404" in problem
    finally:
        other.terminate()
        other.wait()


def test_make_tables_reads_the_server(logged, tmp_path):
    markdown = make_tables(logged, None, tmp_path, formats=("md",))
    assert "**21.00**" in markdown and "| 3 | 2x2x16 |" in markdown
    assert {p.name for p in tmp_path.iterdir()} >= {"table1_sigma.md", "table2_sigma.md", "table4a_encoders.md"}


@pytest.fixture(scope="module")
def restarted_sweep(tmp_path_factory):
    """A tiny sweep against a real server that is stopped while a trial trains and started again ~20 s
    later on the same store; yields (server url, the sweep's exit code, its output) with the server up."""
    from nds.config import REPO_ROOT

    tmp_path = tmp_path_factory.mktemp("restart")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(tmp_path, port)
    sweep = subprocess.Popen(
        [sys.executable, "experiments/sweep_sigma.py", "data.name=digits", "data.train_limit=240", "data.eval_limit=48",
         "encoder.image_size=64", "hierarchy.spec='8x8x1, 2x2x8'", "hierarchy.sigmas=[0.5]", "sweep.depths=[2]",
         "sweep.sigmas=[0.5]", "sweep.seeds=[0,1]", "model.width=32", "model.depth=2", "model.heads=2",
         "diffusion.sample_steps=4", "training.steps=30", "training.batch_size=16", "training.log_every=2",
         "resources.workers_per_level=1", "resources.max_concurrent_trials=1", "eval.num_samples=32",
         "eval.batch_size=32", "eval.substitute_image_size=64", "eval.classifier_steps=50",
         f"paths.cache_dir={REPO_ROOT / 'runs' / 'test-cache'}", f"tracking.uri={url}", f"paths.runs_dir={tmp_path / 'runs'}"],
        cwd=REPO_ROOT, stdout=open(tmp_path / "sweep.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    output = lambda: (tmp_path / "sweep.log").read_text()[-4000:]  # noqa: E731
    try:
        client = MlflowClient(url)
        deadline = time.monotonic() + 900
        while not [r for r in client.search_runs(["0", *(e.experiment_id for e in client.search_experiments())],
                                                 filter_string=tag_filter(Tag.KIND, RunKind.TRIAL))
                   if any(k.endswith("train_loss") for k in r.data.metrics)]:
            assert sweep.poll() is None and time.monotonic() < deadline, output()
            time.sleep(2)
        stop_server(proc)  # mid-fit: the trial's workers are logging losses
        time.sleep(20)
        proc = start_server(tmp_path, port)
        code = sweep.wait(timeout=1200)
        yield url, code, (tmp_path / "sweep.log").read_text()
    finally:
        if sweep.poll() is None:
            os.killpg(sweep.pid, signal.SIGKILL)
            sweep.wait()
        stop_server(proc)


def test_a_server_restart_mid_sweep_loses_no_trial(restarted_sweep):
    """MLflow's client retries (with backoff) carry the sweep over the restart; every run ends FINISHED."""
    url, code, output = restarted_sweep
    assert code == 0, output[-4000:]
    client = MlflowClient(url)
    experiment = client.get_experiment_by_name("nds-sweep-sigma")
    runs = client.search_runs([experiment.experiment_id])
    assert {r.info.status for r in runs} == {"FINISHED"}
    trials = [r for r in runs if r.data.tags[Tag.KIND] == RunKind.TRIAL]
    assert len(trials) == 2 and all(r.data.metrics["level1/train_loss"] > 0 for r in trials)
    # the console: one line per trial as it ends, not Tune's status tables
    lines = [line for line in output.splitlines() if line.startswith("[nds] stage") and ": trial " in line]
    assert sorted(line.split(": trial ")[1].split()[0] for line in lines) == sorted(r.info.run_name for r in trials)
    assert "Trial status:" not in output
    # each progress line once (Ray's own dedup may still fold lines of concurrent fits into "[repeated Nx]"),
    # and no warning per second from Ray Train's placement-group cleaner
    progress = [line for line in output.splitlines() if "[nds] level" in line and ": step " in line]
    assert progress and len(set(progress)) == len(progress)
    assert "Failed to query Ray Train Controller" not in output
    assert "Attempting to start training worker group" not in output  # Ray Train's INFO lines: in its logs only


def test_the_mlflow_ui_shows_the_sweep_as_a_researcher_reads_it(restarted_sweep, tmp_path):
    """In headless Chromium: the experiment opens on its training runs, a trial's parent is its stage and
    the stage's the sweep, the compare view lines up the swept params and the metric, a grid displays,
    and the sweep's HTML report (logged by make_tables) is among its artifacts. Screenshots go under runs/."""
    from browser import Browser, browser_missing

    from nds.config import REPO_ROOT

    if browser_missing():
        pytest.skip(browser_missing())
    url, code, output = restarted_sweep
    assert code == 0, output[-4000:]
    client = MlflowClient(url)
    experiment = client.get_experiment_by_name("nds-sweep-sigma")
    runs = client.search_runs([experiment.experiment_id])
    by_kind = lambda kind: [r for r in runs if r.data.tags[Tag.KIND] == kind]  # noqa: E731
    [sweep], [stage], trials = by_kind(RunKind.SWEEP), by_kind(RunKind.STAGE), by_kind(RunKind.TRIAL)
    make_tables(url, ["nds-sweep-sigma"], tmp_path / "tables", ("md", "png"), report_dir=tmp_path / "report")
    assert "report/nds-sweep-sigma.html" in {a.path for a in client.list_artifacts(sweep.info.run_id, "report")}

    shots = REPO_ROOT / "runs" / "ui-screenshots"
    with Browser(url, shots) as ui:
        page = ui.open(f"/experiments/{experiment.experiment_id}", "experiment")
        assert "/runs" in ui.url and sweep.info.run_name in page  # the runs table, not the GenAI overview
        assert "Token Usage" not in page and "Traces\n0" not in page
        trial_page = ui.open(f"/experiments/{experiment.experiment_id}/runs/{trials[0].info.run_id}", "trial")
        assert f"Parent run\n{stage.info.run_name}" in trial_page
        stage_page = ui.open(f"/experiments/{experiment.experiment_id}/runs/{stage.info.run_id}", "stage")
        assert f"Parent run\n{sweep.info.run_name}" in stage_page
        ids = json.dumps([r.info.run_id for r in trials])
        compare = ui.open(f"/compare-runs?runs={ids}&experiments={json.dumps([experiment.experiment_id])}", "compare")
        assert all(r.info.run_name in compare for r in trials)  # a column per trial
        for name in ("hierarchy.L", "hierarchy.sigma.2", "seed", sweep.data.tags[Tag.METRIC]):
            assert name in compare, name
        ui.open(f"/experiments/{experiment.experiment_id}/runs/{trials[0].info.run_id}/artifacts/level_grid.png", "grid")
        assert max(ui.image_widths()) >= 512  # the level grid, loaded and readable
        report = ui.open_file(tmp_path / "report" / "nds-sweep-sigma.html", "report")
        assert "What the runs show" in report or "table1_sigma" in report
        assert all(r.info.run_id in report for r in trials)
    assert {p.name for p in shots.iterdir()} >= {"experiment.png", "compare.png", "grid.png", "report.png"}
