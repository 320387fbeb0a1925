"""`ray job submit` against a head started by cluster/start_local_head.sh (real Ray, token auth on)."""
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


def test_job_submit_runs_the_sweep_script(tmp_path):
    """The head runs in its own temp dir on free ports and its stop ends only its own processes: a
    Ray instance (or sweep) the user runs beside the tests is left alone."""
    head_tmp = tempfile.mkdtemp(prefix="rayh", dir="/tmp")  # short: Ray's socket paths must fit 107 chars
    gcs, dashboard, client, agent = free_ports(4)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "NUM_CPUS": "2", "HEAD_TMP": head_tmp, "HEAD_PORT": str(gcs),
           "DASHBOARD_PORT": str(dashboard), "CLIENT_PORT": str(client), "AGENT_PORT": str(agent),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    script = str(REPO_ROOT / "cluster" / "start_local_head.sh")
    others = set(subprocess.run(["pgrep", "-f", "raylet|gcs_server"], capture_output=True, text=True).stdout.split())
    try:
        head = subprocess.run([script], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240)
        assert head.returncode == 0, head.stdout[-3000:] + head.stderr[-3000:]
        proc = subprocess.run(
            ["ray", "job", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--working-dir", ".", "--",
             "python", "experiments/sweep_sigma.py", "--dry-run", "data.name=digits", f"paths.runs_dir={tmp_path}"],
            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "4 trials: L1-seed0, L2-sigma0-seed0, L2-sigma0.5-seed0, L2-sigma1-seed0" in proc.stdout
        assert "succeeded" in proc.stdout + proc.stderr
    finally:
        subprocess.run([script, "stop"], cwd=REPO_ROOT, env=env, capture_output=True, timeout=120)
        shutil.rmtree(head_tmp, ignore_errors=True)
    assert not subprocess.run(["pgrep", "-f", head_tmp], capture_output=True).stdout  # this head is gone
    still = set(subprocess.run(["pgrep", "-f", "raylet|gcs_server"], capture_output=True, text=True).stdout.split())
    assert others <= still  # every Ray process that ran before the test still runs
