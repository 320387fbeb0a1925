"""`ray job submit` against a head started by cluster/start_local_head.sh (real Ray, token auth on)."""
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
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

