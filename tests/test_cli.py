"""The user-facing scripts: validation happens before anything runs, with errors that name the problem."""
import subprocess
import sys

from nds.config import REPO_ROOT


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)


def test_dry_run_lists_trials_and_starts_nothing(tmp_path):
    proc = run("experiments/sweep_sigma.py", "--dry-run", "data.name=digits", "sweep.sigmas=[0,1]",
               f"paths.runs_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    assert "3 trials: L1-seed0, L2-sigma0-seed0, L2-sigma1-seed0" in proc.stdout
    assert "spec: 28x28x1, 4x4x32, 2x2x16" in proc.stdout
    assert not any(tmp_path.iterdir())  # no store, no cache, no Ray results


def test_bad_override_is_named():
    proc = run("experiments/sweep_sigma.py", "--dry-run", "model.widht=4")
    assert proc.returncode == 2
    assert "unknown config key 'model.widht'" in proc.stderr


def test_missing_dataset_says_how_to_get_it(tmp_path):
    proc = run("experiments/sweep_sigma.py", "--dry-run", f"data.root={tmp_path / 'nowhere'}")
    assert proc.returncode == 2
    assert "nowhere" in proc.stderr and "apt-get install dataset-fashion-mnist" in proc.stderr


def test_missing_encoder_weights_named(tmp_path):
    proc = run("experiments/sweep_sigma.py", "--dry-run", "data.name=digits", f"encoder.weights={tmp_path / 'w.pth'}")
    assert proc.returncode == 2
    assert "w.pth" in proc.stderr


def test_tables_from_an_empty_store_say_so(tmp_path):
    proc = run("analysis/make_tables.py", f"paths.runs_dir={tmp_path}")
    assert proc.returncode != 0
    assert "no finished trial runs" in proc.stderr
