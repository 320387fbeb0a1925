"""`ray job submit` against a head started by cluster/start_local_head.sh (real Ray, token auth on)."""
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from nds.config import REPO_ROOT

pytestmark = pytest.mark.slow


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


SCRIPT = str(REPO_ROOT / "cluster" / "start_local_head.sh")


@contextlib.contextmanager
def local_head(num_cpus: int, check_others: bool = True):
    """A head started by cluster/start_local_head.sh in its own temp dir on free ports; yields (env,
    GCS port, dashboard port). Its stop must end every process of this head (worker nodes that
    joined it included) and, with ``check_others``, only those: a Ray instance the user runs beside
    the tests is left alone. (Right after another test's head, processes of that head were seen
    to exit on their own during the next one, so only the first test here checks the others.)"""
    head_tmp = tempfile.mkdtemp(prefix="rayh", dir="/tmp")  # short: Ray's socket paths must fit 107 chars
    gcs, dashboard, client, agent = free_ports(4)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "NUM_CPUS": str(num_cpus), "HEAD_TMP": head_tmp,
           "HEAD_PORT": str(gcs), "DASHBOARD_PORT": str(dashboard), "CLIENT_PORT": str(client), "AGENT_PORT": str(agent),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    others = set(subprocess.run(["pgrep", "-f", "raylet|gcs_server"], capture_output=True, text=True).stdout.split())
    try:
        head = subprocess.run([SCRIPT], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240)
        assert head.returncode == 0, head.stdout[-3000:] + head.stderr[-3000:]
        yield env, gcs, dashboard
    finally:
        subprocess.run([SCRIPT, "stop"], cwd=REPO_ROOT, env=env, capture_output=True, timeout=120)
        shutil.rmtree(head_tmp, ignore_errors=True)
    assert not subprocess.run(["pgrep", "-f", head_tmp], capture_output=True).stdout  # this head is gone
    still = set(subprocess.run(["pgrep", "-f", "raylet|gcs_server"], capture_output=True, text=True).stdout.split())
    assert others <= still or not check_others  # every Ray process that ran before the test still runs


def test_job_submit_runs_the_sweep_script(tmp_path):
    with local_head(2) as (env, _, dashboard):
        proc = subprocess.run(
            ["ray", "job", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--working-dir", ".", "--",
             "python", "experiments/sweep_sigma.py", "--dry-run", "data.name=digits", f"paths.runs_dir={tmp_path}"],
            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "4 trials: L1-seed0, L2-sigma0-seed0, L2-sigma0.5-seed0, L2-sigma1-seed0" in proc.stdout
        assert "succeeded" in proc.stdout + proc.stderr


# CPUs of each node that ran a Ray Train worker, and the nodes that ran evaluation shards, read from Ray's
# state API
STATE_QUERY = """
import json, sys
import ray
from ray.util.state import list_actors, list_tasks
ray.init(address=sys.argv[1])
workers = list_actors(address=sys.argv[1], filters=[("class_name", "=", "RayTrainWorker")], limit=100, detail=True)
shards = [t for t in list_tasks(address=sys.argv[1], limit=10000, detail=True) if t.name.endswith("eval_shard")]
cpus = {n["NodeID"]: n["Resources"].get("CPU", 0) for n in ray.nodes()}
print(json.dumps({"fits": {w.node_id: cpus[w.node_id] for w in workers},
                  "shards": sorted({t.node_id: cpus[t.node_id] for t in shards if t.state == "FINISHED"}.values())}))
"""


def join(env: dict, gcs: int, name: str) -> None:
    """A worker node of one CPU (and a custom resource named ``name``) joins the head at ``gcs``."""
    node = subprocess.run(["ray", "start", "--address", f"127.0.0.1:{gcs}", "--num-cpus", "1",
                           "--resources", f'{{"{name}": 1}}', "--disable-usage-stats"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert node.returncode == 0, node.stdout[-3000:] + node.stderr[-3000:]


def test_level_fits_spread_over_worker_nodes(tmp_path):
    """A head without CPUs and two worker nodes of one CPU each (``ray start --address``, each with
    its own custom resource): an L = 2 trial trains its two levels at once, which cannot share a node,
    then samples and scores in two shards, spread; Ray's state API shows the Train workers and the
    shards on both nodes. The head's stop ends the worker nodes too."""
    with local_head(0, check_others=False) as (env, gcs, _):
        for name in ("node_a", "node_b"):
            join(env, gcs, name)
        sweep = subprocess.run(
            [sys.executable, "experiments/sweep_sigma.py", "data.name=digits", "data.train_limit=240", "data.eval_limit=48",
             "encoder.image_size=64", "hierarchy.spec='8x8x1, 2x2x8'", "hierarchy.L=2", "hierarchy.sigmas=[0.5]",
             "model.width=32", "model.depth=2", "model.heads=2", "diffusion.sample_steps=4", "training.steps=8",
             "training.batch_size=16", "eval.num_samples=32", "eval.batch_size=16", "eval.substitute_image_size=64",
             "resources.eval_workers=2", "resources.eval_cpus_per_worker=0.5",
             "eval.classifier_steps=50", "sweep.depths=[2]", "sweep.sigmas=[0.5]", f"paths.runs_dir={tmp_path}",
             f"paths.cache_dir={REPO_ROOT / 'runs' / 'test-cache'}"],
            cwd=REPO_ROOT, env={**env, "RAY_ADDRESS": f"127.0.0.1:{gcs}"}, capture_output=True, text=True, timeout=900)
        assert sweep.returncode == 0, sweep.stdout[-3000:] + sweep.stderr[-3000:]
        assert "levels trained 2" in sweep.stdout
        state = subprocess.run([sys.executable, "-c", STATE_QUERY, f"127.0.0.1:{gcs}"], cwd=REPO_ROOT, env=env,
                               capture_output=True, text=True, timeout=120)  # the client needs the head's token mode
        assert state.returncode == 0, state.stderr[-3000:]
        placed = json.loads(state.stdout.splitlines()[-1])
        assert len(placed["fits"]) == 2 and set(placed["fits"].values()) == {1}  # the two worker nodes
        assert placed["shards"] == [1, 1]  # the two shards ran, one on each worker node


# The node of the one Ray Train worker alive and what else runs there (actor classes), from Ray's state API
KILLED_NODE_QUERY = """
import json, sys
import ray
from ray.util.state import list_actors
ray.init(address=sys.argv[1])
alive = list_actors(address=sys.argv[1], filters=[("state", "=", "ALIVE")], limit=1000, detail=True)
(node,) = {a.node_id for a in alive if a.class_name == "RayTrainWorker"}
print(json.dumps({"node": node, "actors": sorted(a.class_name for a in alive if a.node_id == node)}))
"""
NODE_CHECKPOINT_EVERY, NODE_STEPS = 20, 120


def test_a_lost_worker_node_costs_its_fit_at_most_a_checkpoint_interval(tmp_path):
    """A worker node is lost mid-fit (its raylet SIGKILLed, as a preempted machine is) with everything its
    trial ran there: an L = 1 sweep starts on a head without CPUs and one worker node of one CPU (its trial
    driver, the level's Train controller and worker all land there); a second one-CPU node joins once the fit
    trains, and after the fit's first checkpoint the first node's raylet is killed. Ray Tune runs the trial
    again on the second node (its abandoned MLflow run closed KILLED), Ray Train's placement-group cleaner
    frees the dead fit's CPUs there, the fit resumes from its last checkpoint, the sweep finishes, and the
    level store holds one whole entry, nothing half-written. A second Ray instance runs beside (as on a
    shared machine: the cleaner lost its cluster among several, and the retried fit waited for CPUs held by
    the dead one). The figures are printed as JSON (README, reliability table)."""
    from mlflow.tracking import MlflowClient

    from nds.config import load_config
    from nds.tracking import RunKind, Tag, tag_filter

    runs = tmp_path / "runs"
    uri = load_config(None, [f"paths.runs_dir={runs}"]).tracking_uri
    log = tmp_path / "sweep.log"
    with local_head(0, check_others=False), local_head(0, check_others=False) as (env, gcs, _):
        join(env, gcs, "node_a")
        with log.open("w") as out:
            sweep = subprocess.Popen(
                [sys.executable, "experiments/sweep_depth.py", "data.name=digits", "data.train_limit=240",
                 "data.eval_limit=48", "hierarchy.spec='8x8x1'", "hierarchy.L=1", "sweep.depths=[1]",
                 "model.width=32", "model.depth=2", "model.heads=2", "diffusion.sample_steps=4",
                 f"training.steps={NODE_STEPS}", "training.batch_size=16", "training.log_every=5",
                 f"training.checkpoint_every={NODE_CHECKPOINT_EVERY}", "training.max_failures=2",
                 # the default resources: a shard fits beside its trial driver on the one node left
                 "eval.num_samples=16", "eval.batch_size=16",
                 "eval.substitute_image_size=64", "eval.classifier_steps=50", f"paths.runs_dir={runs}",
                 f"paths.cache_dir={REPO_ROOT / 'runs' / 'test-cache'}"],
                cwd=REPO_ROOT, env={**env, "RAY_ADDRESS": f"127.0.0.1:{gcs}"}, stdout=out, stderr=subprocess.STDOUT,
                text=True, start_new_session=True)
        client = MlflowClient(uri)

        def trials() -> list:
            experiment = client.get_experiment_by_name("nds-sweep-depth") if (runs / "mlflow.db").exists() else None
            return client.search_runs([experiment.experiment_id], tag_filter(Tag.KIND, RunKind.TRIAL)) if experiment else []

        def steps(run) -> list[int]:
            return [m.step for m in client.get_metric_history(run.info.run_id, "level1/train_loss")]

        def wait_for(predicate, what: str, timeout: float = 600) -> None:
            deadline = time.monotonic() + timeout
            while not predicate():
                assert sweep.poll() is None and time.monotonic() < deadline, f"{what}:\n{log.read_text()[-4000:]}"
                time.sleep(1)

        try:
            wait_for(lambda: any(steps(r) for r in trials()), "the fit never trained")
            join(env, gcs, "node_b")  # where the trial goes when the first node is lost
            wait_for(lambda: any(NODE_CHECKPOINT_EVERY + 5 <= max(steps(r), default=0) for r in trials()),
                     "the fit never passed its first checkpoint")
            query = subprocess.run([sys.executable, "-c", KILLED_NODE_QUERY, f"127.0.0.1:{gcs}"], cwd=REPO_ROOT,
                                   env=env, capture_output=True, text=True, timeout=120)
            assert query.returncode == 0, query.stderr[-3000:]
            node = json.loads(query.stdout.splitlines()[-1])
            raylet = subprocess.run(["pgrep", "-f", f"raylet.*--node_id={node['node']}"], capture_output=True, text=True)
            (pid,) = raylet.stdout.split()
            os.kill(int(pid), signal.SIGKILL)
            killed_at = time.time()
            (abandoned,) = trials()
            logged_before = max(steps(abandoned))  # (re-read below: a last report may land after the kill)
            assert sweep.wait(timeout=600) == 0, log.read_text()[-6000:]
            done_in = time.time() - killed_at
        finally:
            if sweep.poll() is None:
                os.killpg(sweep.pid, signal.SIGKILL)
                sweep.wait(timeout=60)
    # the trial driver (a Tune function trainable) and the fit's worker were on the lost node
    assert {"ImplicitFunc", "RayTrainWorker"} <= set(node["actors"]), node
    by_status = {}
    for run in trials():
        by_status.setdefault(run.info.status, []).append(run)
    assert set(by_status) == {"FINISHED", "KILLED"}, {k: len(v) for k, v in by_status.items()}
    (finished,), (killed,) = by_status["FINISHED"], by_status["KILLED"]
    assert killed.info.run_id == abandoned.info.run_id and "abandoned" in killed.data.tags["error"]
    assert finished.data.metrics["levels.trained"] == 1
    logged_before = max(logged_before, *steps(killed))
    resumed = client.get_metric_history(finished.info.run_id, "level1/resumed_from")
    assert len(resumed) == 1 and resumed[0].value > 0, resumed  # from a checkpoint, not from step 0
    lost = max(logged_before - resumed[0].value, 0)
    assert lost <= NODE_CHECKPOINT_EVERY
    assert max(steps(finished)) == NODE_STEPS
    # one whole level entry; no staging directory, no lock heartbeat left
    levels = load_config(None, [f"paths.runs_dir={runs}"]).levels_dir
    (entry,) = [p for p in levels.iterdir() if p.is_dir()]
    assert (entry / "level.json").is_file() and (entry / "ema_weights.pt").is_file()
    assert json.loads((entry / "level.json").read_text())["trained_by_mlflow_run"] == finished.info.run_id
    assert not list(levels.glob("*.holder.json"))
    first_after = min(m.timestamp for m in client.get_metric_history(finished.info.run_id, "level1/train_loss")) / 1000
    print(json.dumps({"drill": "raylet_kill", "killed_node_ran": node["actors"], "steps_lost": lost,
                      "killed_after_step": logged_before, "resumed_from": resumed[0].value,
                      "first_step_after_kill_s": round(first_after - killed_at, 1),
                      "sweep_done_after_kill_s": round(done_in, 1)}))
