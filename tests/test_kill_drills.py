"""Kill drills with real processes: a Train worker SIGKILLed mid-fit (as the OOM killer would), then the
sweep driver SIGKILLed mid-sweep and the same command run again. What each loses is counted from
MLflow and the level store; the figures are printed as JSON (README, reliability table)."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from nds.config import REPO_ROOT, load_config
from nds.tracking import RunKind, Tag, tag_filter

pytestmark = pytest.mark.slow

CHECKPOINT_EVERY, STEPS, KILL_WORKER_AT = 10, 40, 15
COMMAND = [
    "experiments/sweep_sigma.py",
    "data.name=digits", "data.train_limit=240", "data.eval_limit=48", "encoder.image_size=64",
    "hierarchy.spec='8x8x1, 2x2x8'", "hierarchy.sigmas=[0.5]", "sweep.depths=[1,2]", "sweep.sigmas=[0.5]",
    "model.width=32", "model.depth=2", "model.heads=2", "diffusion.sample_steps=4",
    f"training.steps={STEPS}", "training.batch_size=16", "training.log_every=5",
    f"training.checkpoint_every={CHECKPOINT_EVERY}", f"training.kill_worker_at_step={KILL_WORKER_AT}",
    "training.max_failures=2", "resources.workers_per_level=2", "resources.cpus_per_worker=0.45",
    "resources.max_concurrent_trials=1", "eval.num_samples=32", "eval.batch_size=32",
    "eval.substitute_image_size=64", "eval.classifier_steps=50",
    f"paths.cache_dir={REPO_ROOT / 'runs' / 'test-cache'}",
]


class Driver:
    """The sweep command as its own process group (so every process it started can be cleaned up)."""

    def __init__(self, runs: Path):
        self.proc = subprocess.Popen([sys.executable, *COMMAND, f"paths.runs_dir={runs}"], cwd=REPO_ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True).start()

    def output(self) -> str:
        return "".join(self.lines)

    def kill_group(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=60)


def wait_for(predicate, what: str, driver: Driver, timeout: float = 900):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        assert driver.proc.poll() is None, f"the sweep ended before {what}:\n{driver.output()[-4000:]}"
        time.sleep(2)
    raise AssertionError(f"timed out waiting for {what}:\n{driver.output()[-4000:]}")


def trial_runs(client: MlflowClient) -> list:
    experiment = client.get_experiment_by_name("nds-sweep-sigma")
    return client.search_runs([experiment.experiment_id], filter_string=tag_filter(Tag.KIND, RunKind.TRIAL)) if experiment else []


def steps_logged(client: MlflowClient, run, level: int) -> list:
    return client.get_metric_history(run.info.run_id, f"level{level}/train_loss")


def test_worker_and_driver_kills_lose_at_most_a_checkpoint_interval_and_nothing_finished(tmp_path):
    runs = tmp_path / "runs"
    uri = load_config(None, [f"paths.runs_dir={runs}"]).tracking_uri
    levels_dir = runs / "levels"
    first = Driver(runs)
    try:
        wait_for(lambda: "[nds] MLflow:" in first.output(), "the MLflow store", first)
        client = MlflowClient(uri)

        def second_trial_mid_fit():
            trials = trial_runs(client)
            done = [r for r in trials if r.info.status == "FINISHED"]
            running = [r for r in trials if r.info.status == "RUNNING"]
            if not done or not running:
                return None
            steps = [m.step for level in (1, 2) for m in steps_logged(client, running[0], level)]
            return running[0] if steps and 2 * CHECKPOINT_EVERY + 5 <= max(steps) < STEPS else None

        interrupted = wait_for(second_trial_mid_fit, "the second trial to pass two checkpoints", first)
        os.kill(first.proc.pid, signal.SIGKILL)  # the driver only, as the OOM killer or a lost node would
        first.proc.wait(timeout=60)
        killed_at = time.time()
    finally:
        first.kill_group()  # whatever the driver had started (its local Ray instance) goes with it
    finished_before = [r for r in trial_runs(client) if r.info.status == "FINISHED"]
    logged_before = {level: max((m.step for m in steps_logged(client, interrupted, level)), default=0) for level in (1, 2)}
    stored_before = {p.name: (p / "level.json").read_text() for p in levels_dir.iterdir() if (p / "level.json").is_file()}

    again = Driver(runs)
    try:
        assert again.proc.wait(timeout=1200) == 0, again.output()[-6000:]
    finally:
        again.kill_group()
    recovered_in = time.time() - killed_at

    runs_now = client.search_runs([client.get_experiment_by_name("nds-sweep-sigma").experiment_id])
    assert not [r.info.run_name for r in runs_now if r.info.status == "RUNNING"]  # every run ended
    killed = [r for r in runs_now if r.info.status == "KILLED"]
    assert interrupted.info.run_id in {r.info.run_id for r in killed}  # the abandoned trial, its stage, its sweep
    assert {r.data.tags[Tag.KIND] for r in killed} == {RunKind.SWEEP, RunKind.STAGE, RunKind.TRIAL}
    sweep = next(r for r in runs_now if r.data.tags[Tag.KIND] == RunKind.SWEEP and r.info.status == "FINISHED")
    # finished trials: found and reused, not run again
    assert sweep.data.metrics["trials.reused"] == len(finished_before) == 1
    finished_now = [r for r in runs_now if r.data.tags[Tag.KIND] == RunKind.TRIAL and r.info.status == "FINISHED"]
    done_keys = {r.data.tags[Tag.TRIAL_KEY]: r.info.run_id for r in finished_before}
    rerun_trials = [r for r in finished_now if done_keys.get(r.data.tags[Tag.TRIAL_KEY], r.info.run_id) != r.info.run_id]
    assert len(finished_now) == 2 and not rerun_trials
    # finished levels: not retrained (their entries untouched); the others trained in the rerun
    stored_after = {p.name: (p / "level.json").read_text() for p in levels_dir.iterdir() if (p / "level.json").is_file()}
    assert all(stored_after[k] == v for k, v in stored_before.items())
    rerun = next(r for r in finished_now if r.info.run_id != finished_before[0].info.run_id)
    assert rerun.data.metrics["levels.trained"] == len(stored_after) - len(stored_before)
    # an unfinished level resumed from its last checkpoint: at most one checkpoint interval redone (a
    # checkpoint is reported before its step reaches MLflow, so it may be past the last step logged)
    lost = {}
    for level in (1, 2):
        resumed = client.get_metric_history(rerun.info.run_id, f"level{level}/resumed_from")
        if resumed:
            redone = logged_before[level] - max(m.value for m in resumed)
            assert redone <= CHECKPOINT_EVERY
            lost[level] = max(redone, 0)
    assert lost, "no level of the interrupted trial resumed from a checkpoint"
    # the worker kill in every fit of the first run cost at most one checkpoint interval too
    first_trial = finished_before[0]
    resumed = client.get_metric_history(first_trial.info.run_id, "level1/resumed_from")
    assert [m.value for m in resumed] == [KILL_WORKER_AT // CHECKPOINT_EVERY * CHECKPOINT_EVERY]
    assert max(m.step for m in steps_logged(client, first_trial, 1)) == STEPS
    worker_loss = KILL_WORKER_AT - resumed[0].value
    history = steps_logged(client, first_trial, 1)
    worker_recovery = (resumed[0].timestamp - max(m.timestamp for m in history if m.timestamp < resumed[0].timestamp)) / 1000
    print(json.dumps({"drill": "kill", "worker_kill": {"steps_lost": worker_loss, "recovery_s": round(worker_recovery, 1)},
                      "driver_kill": {"trials_rerun": len(rerun_trials),
                                      "levels_retrained": sum(stored_after[k] != v for k, v in stored_before.items()),
                                      "steps_lost_by_level": lost, "rerun_s": round(recovered_in, 1),
                                      "runs_closed_killed": len(killed)}}))
