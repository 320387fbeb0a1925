"""`ray job submit` against a head started by cluster/start_local_head.sh (real Ray, token auth on)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nds.config import REPO_ROOT

pytestmark = pytest.mark.slow


def test_job_submit_runs_the_sweep_script(tmp_path):
    env = {**os.environ, "RAY_AUTH_MODE": "token", "NUM_CPUS": "2",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    script = str(REPO_ROOT / "cluster" / "start_local_head.sh")
    try:
        head = subprocess.run([script], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240)
        assert head.returncode == 0, head.stdout[-3000:] + head.stderr[-3000:]
        proc = subprocess.run(
            ["ray", "job", "submit", "--address", "http://127.0.0.1:8265", "--working-dir", ".", "--",
             "python", "experiments/sweep_sigma.py", "--dry-run", "data.name=digits", f"paths.runs_dir={tmp_path}"],
            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "4 trials: L1-seed0, L2-sigma0-seed0, L2-sigma0.5-seed0, L2-sigma1-seed0" in proc.stdout
        assert "succeeded" in proc.stdout + proc.stderr
    finally:
        subprocess.run([script, "stop"], cwd=REPO_ROOT, env=env, capture_output=True, timeout=120)
