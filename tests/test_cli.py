"""The user-facing scripts: validation happens before anything runs, with errors that name the problem."""
import subprocess
import sys

import pytest

from nds.config import REPO_ROOT


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)


def test_dry_run_lists_trials_and_starts_nothing(tmp_path):
    proc = run("experiments/sweep_sigma.py", "--dry-run", "data.name=digits", "sweep.sigmas=[0,1]",
               f"paths.runs_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    assert "stage L1+2: 3 trials: L1-seed0, L2-sigma0-seed0, L2-sigma1-seed0" in proc.stdout
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


def test_every_preset_validates_and_every_tiny_preset_plans_trials(tmp_path):
    from nds.config import load_config

    presets = sorted((REPO_ROOT / "configs").rglob("*.yaml"))
    assert len(presets) >= 10
    for path in presets:
        load_config(path)  # the paper presets name cluster paths, so only the structure is checked here
    for script in ("sweep_depth", "sweep_shapes", "sweep_encoders", "sweep_rcg"):
        proc = run(f"experiments/{script}.py", "--dry-run", f"paths.runs_dir={tmp_path}")
        assert proc.returncode == 0, proc.stderr
        assert f"[nds] {script} stage" in proc.stdout


def test_a_trial_that_cannot_run_stops_the_sweep_before_it_starts(tmp_path):
    proc = run("experiments/sweep_encoders.py", "--dry-run", "sweep.encoders=[efficientnet_lite0,nope]")
    assert proc.returncode == 2
    assert "nope" in proc.stderr
    proc = run("experiments/sweep_shapes.py", "--dry-run", "sweep.shapes=['28x28x1, 8x8x32']")
    assert proc.returncode == 2
    assert "8x8x32" in proc.stderr and "more dimensions" in proc.stderr
    proc = run("experiments/sweep_encoders.py", "--dry-run", "sweep.encoders=[random_cnn]", "sweep.encoder_specs=[]",
               f"paths.runs_dir={tmp_path}", "--config", str(tmp_path / "missing.yaml"))
    assert proc.returncode == 2 and "config file not found" in proc.stderr


def test_image_folder_problems_stop_in_the_dry_run(tmp_path):
    """An RGB image folder against a greyscale level 1, and a folder without a held-out split, fail
    before anything runs (both used to pass the dry run and die in the sweep); ImageNet's train/ + val/
    layout passes."""
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("a", "b"):  # the data classifier needs two classes
            (tmp_path / split / cls).mkdir(parents=True)
            Image.new("RGB", (12, 12), (200, 10, 10)).save(tmp_path / split / cls / "0.png")
    folder = ["data.name=image_folder", f"data.root={tmp_path}", f"paths.runs_dir={tmp_path / 'runs'}"]
    proc = run("experiments/sweep_sigma.py", "--dry-run", *folder)
    assert proc.returncode == 2
    assert "hierarchy.spec level 1 (28x28x1) has 1 channel(s) but data.name=image_folder images have 3" in proc.stderr
    rgb = "hierarchy.spec='28x28x3, 4x4x32, 2x2x16'"
    proc = run("experiments/sweep_sigma.py", "--dry-run", *folder, rgb)
    assert proc.returncode == 0, proc.stderr
    (tmp_path / "val").rename(tmp_path / "held")
    proc = run("experiments/sweep_sigma.py", "--dry-run", *folder, rgb)
    assert proc.returncode == 2 and "no test split" in proc.stderr and "val/" in proc.stderr


def test_resources_no_node_can_hold_are_named():
    from nds.config import load_config
    from nds.sweep.runtime import unplaceable

    def node(cpu, gpu=0.0, alive=True):
        return {"Alive": alive, "Resources": {"CPU": cpu, **({"GPU": gpu} if gpu else {})}}

    cfg = load_config(None, ["resources.workers_per_level=2", "resources.cpus_per_worker=4", "resources.gpus_per_worker=1"])
    assert unplaceable(cfg, [node(8, 1), node(8, 1)]) is None  # one worker per node
    assert "resources.gpus_per_worker: one needs 4 CPU, 1 GPU on a single node" in unplaceable(cfg, [node(2), node(8)])
    assert "nodes: 2 CPU, 0 GPU; 8 CPU, 0 GPU" in unplaceable(cfg, [node(2), node(8)])
    assert "resources.workers_per_level=2: beside a trial driver (resources.driver_cpus=0.1) the Ray cluster holds 1 " \
        "workers" in unplaceable(cfg, [node(8, 1), node(8, 1, False)])
    assert unplaceable(cfg, [node(4, 1), node(4, 1)]).startswith("resources.workers_per_level=2")  # no room for the driver
    assert unplaceable(cfg, [node(4, 1), node(4, 1), node(1)]) is None  # the driver on a third node
    cpu = load_config(None, ["resources.cpus_per_worker=3", "resources.driver_cpus=0.5"])
    assert unplaceable(cpu, [node(2)]).startswith("resources.cpus_per_worker: one needs 3 CPU")
    assert unplaceable(load_config(None, ["resources.driver_cpus=4"]), [node(2)]).startswith("resources.driver_cpus")
    shard = load_config(None, ["resources.eval_gpus_per_worker=1"])
    assert unplaceable(shard, [node(2)]).startswith("resources.eval_gpus_per_worker: one needs 0.9 CPU, 1 GPU")
    assert unplaceable(shard, [node(2, 1)]) is None
    wide = load_config(None, ["resources.eval_cpus_per_worker=4"])
    assert unplaceable(wide, [node(2), node(2)]).startswith("resources.eval_cpus_per_worker: one needs 4 CPU")
    # a shard that fits a node, but never beside its own trial driver (a sweep that used to hang for good)
    crowded = load_config(None, ["resources.eval_cpus_per_worker=1"])
    assert unplaceable(crowded, [node(0), node(1)]).startswith(
        "resources.eval_cpus_per_worker=1: no evaluation shard fits beside its trial driver (resources.driver_cpus=0.1)")
    assert unplaceable(crowded, [node(1), node(1)]) is None  # driver and shard on two nodes
    assert unplaceable(load_config(None), [node(0), node(1)]) is None  # the defaults: both on one one-CPU node


@pytest.mark.parametrize("key", ["resources.gpus_per_worker", "resources.eval_gpus_per_worker"])
def test_a_sweep_asking_for_a_gpu_this_machine_lacks_stops_before_its_mlflow_run(tmp_path, key):
    """On a local Ray instance (it cannot grow) a level fit or an evaluation shard no node can hold fails
    at once, naming the key, where it used to wait for hours; the sweep's MLflow run is only made after
    that check."""
    from mlflow.tracking import MlflowClient

    proc = run("experiments/sweep_depth.py", "sweep.depths=[1]", f"{key}=1", f"paths.runs_dir={tmp_path}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"{key}: one needs" in proc.stderr and "cannot grow" in proc.stderr
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert not [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


def unused_port() -> int:
    """A port on 127.0.0.1 that nothing listens on."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_mlflow_server_stops_the_sweep_before_compute(tmp_path):
    port = unused_port()
    proc = run("experiments/sweep_sigma.py", "data.name=digits", f"tracking.uri=http://127.0.0.1:{port}",
               f"paths.runs_dir={tmp_path}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"tracking.uri: no MLflow server answers at http://127.0.0.1:{port}" in proc.stderr
    assert not (tmp_path / "ray_results").exists() and not (tmp_path / "levels").exists()


def test_a_ray_address_where_nothing_listens_stops_the_sweep_at_once(tmp_path):
    port = unused_port()
    proc = run("experiments/sweep_sigma.py", "data.name=digits", f"resources.ray_address=127.0.0.1:{port}",
               f"paths.runs_dir={tmp_path}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"resources.ray_address = 127.0.0.1:{port}: nothing answers at 127.0.0.1:{port}" in proc.stderr
