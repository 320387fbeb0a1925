"""The trained-level store: what keys a level, and how entries are written and read back."""
import contextlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nds.config import load_config, replace
from nds.sweep.level_store import ENTRY_FILE, WEIGHTS_FILE, LevelLockError, LevelStore, level_id, load_level_model
from nds.sweep.protocols import sigma_variants
from nds.sweep.runner import trial_config
from nds.train.engine import build_level_model

SPEC = ["hierarchy.spec='8x8x1, 2x2x8, 1x1x4'", "model.width=16", "model.depth=2", "model.heads=2"]


def config(*overrides):
    return load_config(None, [*SPEC, *overrides])


def test_a_level_depends_on_its_condition_not_on_the_sigma_above_it():
    two = [trial_config(config("hierarchy.L=2"), v) for v in sigma_variants(config("sweep.sigmas=[0,1]"), [2])]
    assert level_id(two[0], 2) == level_id(two[1], 2)  # the top level has no condition
    assert level_id(two[0], 1) != level_id(two[1], 1)  # level 1 sees ẑ_2 with σ_2 = 0 vs 1
    top_of_one = config("hierarchy.L=1")
    assert level_id(top_of_one, 1) != level_id(two[0], 1)  # unconditional vs conditional level 1


@pytest.mark.parametrize("depth", [2, 3])
def test_a_sigma_sweep_needs_k_plus_the_levels_that_ignore_sigma_L(depth):
    cfg = config("sweep.sigmas=[0,0.5,1]", "hierarchy.sigmas=[0.5,0.5]")
    trials = [trial_config(cfg, v) for v in sigma_variants(cfg, [depth])]
    needed = {level_id(t, level) for t in trials for level in range(1, depth + 1)}
    k = len(cfg.sweep.sigmas)
    assert len(needed) == k + (depth - 1)  # not k * depth


def test_logging_sampling_and_execution_keys_do_not_change_a_level():
    cfg = config("hierarchy.L=2")
    same = replace(cfg, **{"training.log_every": 7, "training.fail_once_at_step": 3, "diffusion.sample_steps": 9,
                           "eval.num_samples": 11, "resources.max_concurrent_trials": 5, "paths.runs_dir": "/elsewhere",
                           "diffusion.cfg_scale": 3.0, "diffusion.latent_clip": 3.0, "diffusion.sampler": "ddpm",
                           "eval.diagnostic_samples": 7})
    assert [level_id(same, lvl) for lvl in (1, 2)] == [level_id(cfg, lvl) for lvl in (1, 2)]
    for change in ({"seed": 1}, {"training.lr": 1e-4}, {"encoder.name": "random_cnn"}, {"model.width": 32},
                   {"resources.workers_per_level": 2}, {"diffusion.prediction": "eps"}):
        assert level_id(replace(cfg, **change), 2) != level_id(cfg, 2), change
    # the two readings of the condition path never share weights
    other = "kv" if cfg.model.cond_injection == "tokens" else "tokens"
    assert level_id(replace(cfg, **{"model.cond_injection": other}), 1) != level_id(cfg, 1)
    assert level_id(replace(cfg, **{"model.cond_injection": other}), 2) == level_id(cfg, 2)  # the top has none
    with pytest.raises(RuntimeError, match="Missing key|Unexpected key|size mismatch"):
        build_level_model(replace(cfg, **{"model.cond_injection": other}), 1).load_state_dict(
            build_level_model(cfg, 1).state_dict())
    # level 1 of a one-level chain is pixels only: the encoder cannot matter
    one = replace(cfg, **{"hierarchy.L": 1})
    assert level_id(replace(one, **{"encoder.name": "random_cnn"}), 1) == level_id(one, 1)


def test_store_round_trip_and_half_written_entries(tmp_path):
    cfg = config("hierarchy.L=2")
    store = LevelStore(tmp_path)
    ident = level_id(cfg, 2)
    assert store.get(ident) is None
    model = build_level_model(cfg, 2)
    entry = store.put(ident, model.state_dict(), {"level": 2, "final_loss": 0.5})
    assert store.get(ident).info["final_loss"] == 0.5
    loaded = load_level_model(cfg, entry)
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging directory left

    # a crash before the rename leaves a whole staging directory (weights and level.json), which is never
    # read as an entry; the level is then trained and published as if it had never been tried
    other = level_id(cfg, 1)
    shutil.copytree(entry.path, tmp_path / f".staging-{other}-dead")
    assert store.get(other) is None
    assert store.put(other, build_level_model(cfg, 1).state_dict(), {"level": 1}).info["level"] == 1

    (entry.path / WEIGHTS_FILE).write_bytes(b"truncated")
    with pytest.raises(RuntimeError, match=f"cannot read level weights .*{WEIGHTS_FILE}.*delete"):
        load_level_model(cfg, store.get(ident))
    (entry.path / WEIGHTS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="no ema_weights.pt; delete the directory"):
        store.get(ident)
    assert json.loads((entry.path / ENTRY_FILE).read_text())["level_id"] == ident


HOLD_AND = """
import os, signal, sys, time
from nds.sweep.level_store import LevelStore
with LevelStore(sys.argv[1]).hold("lvl", stale_s=float(sys.argv[3]), holder="run-abc"):
    print("held", flush=True)
    if sys.argv[2] == "die":
        os.kill(os.getpid(), signal.SIGKILL)  # the OOM killer's way: no cleanup runs
    if sys.argv[2] == "hang":
        os.kill(os.getpid(), signal.SIGSTOP)  # alive, holding the lock, heartbeat stopped
    time.sleep(600)
"""


@contextlib.contextmanager
def lock_holder(root: Path, how: str, stale_s: float = 1.0):
    """A separate process that takes level 'lvl''s lock and then dies, hangs, or holds it while beating."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD_AND, str(root), how, str(stale_s)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_a_killed_lock_holder_frees_the_level_at_once(tmp_path):
    with lock_holder(tmp_path, "die") as proc:
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL and (tmp_path / "lvl.holder.json").exists()  # it left its heartbeat
        start = time.monotonic()
        with LevelStore(tmp_path).hold("lvl", stale_s=60):
            assert time.monotonic() - start < 10
    assert not (tmp_path / "lvl.holder.json").exists()


def test_a_stuck_lock_holder_is_named_not_waited_for(tmp_path):
    with lock_holder(tmp_path, "hang") as proc:
        start = time.monotonic()
        with pytest.raises(LevelLockError, match=rf"locked by .*:{proc.pid} \(run-abc\), whose heartbeat stopped.*delete .*lvl.lock"):
            with LevelStore(tmp_path).hold("lvl", stale_s=3):
                pass
        assert time.monotonic() - start < 30


def test_a_live_holder_is_waited_for_up_to_the_limit(tmp_path):
    with lock_holder(tmp_path, "hold", stale_s=1.0) as proc:
        time.sleep(2.5)  # longer than stale_s: only a live heartbeat keeps the waiter from calling it stuck
        with pytest.raises(LevelLockError, match=rf"waited \d+ s \(resources.level_wait_s=3\).*:{proc.pid}"):
            with LevelStore(tmp_path).hold("lvl", stale_s=5, wait_s=3):
                pass


def test_a_trial_is_reused_only_for_the_same_results():
    from nds.sweep.mdm import MDM
    from nds.sweep.runner import CHAIN, trial_key

    cfg = config("hierarchy.L=2")
    key = trial_key(cfg, CHAIN, "fd")
    for where, how in {"paths.runs_dir": "/elsewhere", "resources.cpus_per_worker": 0.5,
                       "resources.max_concurrent_trials": 7, "tracking.experiment": "nds-other"}.items():
        assert trial_key(replace(cfg, **{where: how}), CHAIN, "fd") == key, where  # how it runs, not what
    for where, how in {"seed": 1, "resources.workers_per_level": 2, "sweep.cfg_scales": [1.0, 3.0],
                       "training.steps": 7, "hierarchy.sigmas": [0.25, 0.5]}.items():
        assert trial_key(replace(cfg, **{where: how}), CHAIN, "fd") != key, where
    assert trial_key(cfg, MDM, "fd") != key and trial_key(cfg, CHAIN, "fid") != key
