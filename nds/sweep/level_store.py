"""The trained-level store: a level of the chain is trained once and reused by every trial of every sweep.

Given its frozen targets, level l's model depends only on the data, the encoder, its own
shape, the shape and σ of its condition ẑ_{l+1}, the model/diffusion/training config and the
seed (``level_key``). A σ sweep over k values at depth L therefore trains k conditioned
copies of level L-1 and shares every other level. Entries live under ``cfg.levels_dir``
(on storage every node sees), are written atomically, and a file lock per entry makes a
second trial that needs a level wait for the first to train it instead of training it again.

The lock is an flock on ``<id>.lock``: the kernel drops it when its holder dies (killed, OOM), on
local disks at once and on NFSv4 when the dead client's lease runs out (about 90 s); a waiter then
takes it and trains the level (a half-trained level left no entry: entries are published by one
rename). A holder that is alive but stuck, or a lock that a filesystem keeps after its holder died
(NFSv3 without lockd, some FUSE mounts), is caught by the holder's heartbeat in ``<id>.holder.json``:
a waiter that sees it go stale for ``resources.level_lock_stale_s`` stops with an error naming the
holder, and one that has waited ``resources.level_wait_s`` (if set) stops too, instead of hanging.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock, Timeout

from nds.config import Config, config_hash, to_dict
from nds.config.specs import parse_spec
from nds.files import atomic_directory, write_json
from nds.models.uvit import ARCHITECTURE_VERSION
from nds.train.engine import build_level_model, train_level
from nds.train.inputs import LevelData

ENTRY_FILE = "level.json"
LOCK_POLL_S = 2.0  # how often a waiter looks at the holder's heartbeat
WAIT_NOTICE_S = 300.0  # a waiter says whom it waits for this often
WEIGHTS_FILE = "ema_weights.pt"
# Keys that change how a run is logged or resumed, not the weights it ends with.
_TRAINING_BOOKKEEPING = ("log_every", "checkpoint_every", "max_failures", "fail_once_at_step", "nan_at_step",
                         "kill_worker_at_step")
_SAMPLING_ONLY = ("sampler", "sample_steps", "cfg_scale", "eta", "clip_images", "latent_clip")


def level_key(cfg: Config, level: int) -> dict:
    """Exactly what determines level ``level``'s trained weights in ``cfg``'s chain."""
    d = to_dict(cfg)
    shapes = parse_spec(cfg.hierarchy.spec)
    conditioned = level < cfg.hierarchy.L
    encoder = d["encoder"]
    key = {
        "data": {k: v for k, v in d["data"].items() if k != "eval_limit"},
        "shape": str(shapes[level - 1]),
        "condition": {"shape": str(shapes[level]), "sigma": cfg.sigma(level + 1)} if conditioned else None,
        # how a condition enters cannot matter to a level that has none
        "model": {**{k: v for k, v in d["model"].items() if conditioned or k != "cond_injection"},
                  "architecture_version": ARCHITECTURE_VERSION},
        "diffusion": {k: v for k, v in d["diffusion"].items() if k not in _SAMPLING_ONLY},
        "training": {k: v for k, v in d["training"].items() if k not in _TRAINING_BOOKKEEPING},
        "workers": cfg.resources.workers_per_level,  # sets the global batch
        "seed": cfg.seed,
    }
    if level > 1 or conditioned:  # the encoder forms z_2.. (targets above level 1, or the condition)
        key["encoder"] = {k: encoder[k] for k in ("name", "weights", "image_size", "bf16")}
    if level == 1:  # z_1 is pixels or VAE latents
        key["level1"] = {k: encoder[k] for k in ("level1", "level1_weights")}
    return key


def level_id(cfg: Config, level: int) -> str:
    return config_hash(level_key(cfg, level))


@dataclass
class LevelEntry:
    level_id: str
    path: Path
    info: dict  # level.json: the key, final loss, which MLflow run trained it, when

    @property
    def weights(self) -> Path:
        return self.path / WEIGHTS_FILE


class LevelStore:
    """Directory of trained levels: ``<root>/<level_id>/{ema_weights.pt, level.json}``."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def get(self, level_id: str) -> LevelEntry | None:
        path = self.root / level_id
        if not (path / ENTRY_FILE).is_file():
            return None
        if not (path / WEIGHTS_FILE).is_file():
            raise FileNotFoundError(f"level store entry {path} has {ENTRY_FILE} but no {WEIGHTS_FILE}; "
                                    f"delete the directory to retrain the level")
        return LevelEntry(level_id, path, json.loads((path / ENTRY_FILE).read_text()))

    @contextmanager
    def hold(self, level_id: str, stale_s: float, wait_s: float | None = None, holder: str = "") -> Iterator[None]:
        """Held while a level is trained, so concurrent trials that need it wait instead of training it too.
        Raises LevelLockError if the holder's heartbeat is older than ``stale_s`` or (``wait_s`` set) after
        waiting that long; ``holder`` (e.g. the MLflow run) is shown to waiters."""
        lock = FileLock(str(self.root / f"{level_id}.lock"))
        heartbeat = self.root / f"{level_id}.holder.json"
        started, noticed, wall_started = time.monotonic(), time.monotonic(), time.time()
        while True:
            try:
                lock.acquire(timeout=LOCK_POLL_S)
                break
            except Timeout:
                held_by = _read_json(heartbeat)
                age = time.time() - held_by.get("heartbeat", wall_started)  # no heartbeat: a foreign holder
                who = (f"{held_by.get('host')}:{held_by.get('pid')} ({held_by.get('holder') or 'no run named'})"
                       if held_by else "an unknown process")
                if age > stale_s:
                    raise LevelLockError(
                        f"level {level_id} is locked by {who}, whose heartbeat stopped {age:.0f} s ago "
                        f"(resources.level_lock_stale_s={stale_s:g}): the holder is stuck, or the filesystem kept "
                        f"its lock after it died. If no such process runs, delete {lock.lock_file} and run again")
                waited = time.monotonic() - started
                if wait_s and waited > wait_s:
                    raise LevelLockError(f"waited {waited:.0f} s (resources.level_wait_s={wait_s:g}) for level "
                                         f"{level_id}, which {who} is training; its heartbeat is {age:.0f} s old")
                if time.monotonic() - noticed > WAIT_NOTICE_S:
                    print(f"[nds] waiting {waited:.0f} s for level {level_id}, being trained by {who}", flush=True)
                    noticed = time.monotonic()
        stop, acquired = threading.Event(), time.time()

        def beat() -> None:
            write_json(heartbeat, {"host": socket.gethostname(), "pid": os.getpid(), "holder": holder,
                                    "since": acquired, "heartbeat": time.time()})

        def keep_beating() -> None:
            while not stop.wait(max(stale_s / 4, 0.1)):
                beat()

        beat()  # before the block runs: a waiter always finds whom it waits for
        beat_thread = threading.Thread(target=keep_beating, daemon=True, name=f"level-lock-{level_id}")
        beat_thread.start()
        try:
            yield
        finally:
            stop.set()
            beat_thread.join()
            heartbeat.unlink(missing_ok=True)
            lock.release()

    def put(self, level_id: str, weights: dict[str, torch.Tensor], info: dict) -> LevelEntry:
        """Write the entry beside the store and publish it with one rename: a crash leaves no half entry."""
        with atomic_directory(self.root / level_id) as staging:
            torch.save(weights, staging / WEIGHTS_FILE)
            (staging / ENTRY_FILE).write_text(json.dumps({**info, "level_id": level_id, "created": time.time()},
                                                         indent=2, default=str))
        return self.get(level_id)


class LevelLockError(RuntimeError):
    """A level's lock could not be had: its holder stopped beating, or the wait ran past its limit."""


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # not there (yet), or caught mid-write
        return {}


@dataclass
class ObtainedLevel:
    level: int
    entry: LevelEntry
    trained: bool  # False: reused from the store


def obtain_level(cfg: Config, level: int, data: LevelData, mlflow_run: dict | None = None) -> ObtainedLevel:
    """The store's entry for this level of ``cfg``'s chain, training it first if no trial has yet."""
    store = LevelStore(cfg.levels_dir)
    key = level_key(cfg, level)
    ident = config_hash(key)
    r = cfg.resources
    with store.hold(ident, r.level_lock_stale_s, r.level_wait_s, holder=f"MLflow run {(mlflow_run or {}).get('run_id')}"):
        entry = store.get(ident)
        if entry is not None:
            return ObtainedLevel(level, entry, trained=False)
        result = train_level(cfg, level, data, run_name=f"level{level}-{ident}", mlflow_run=mlflow_run)
        info = {"key": key, "level": level, "final_loss": result.final_loss,
                "ray_checkpoint": result.checkpoint_path,
                "trained_by_mlflow_run": mlflow_run["run_id"] if mlflow_run else None}
        return ObtainedLevel(level, store.put(ident, result.model.state_dict(), info), trained=True)


def load_level_model(cfg: Config, entry: LevelEntry) -> torch.nn.Module:
    """The level's U-ViT with the stored EMA weights, on CPU in eval mode."""
    model = build_level_model(cfg, entry.info["level"])
    try:
        state = torch.load(entry.weights, map_location="cpu", weights_only=True)  # tensors only: no pickled code
    except Exception as err:  # a truncated or foreign file: name it, say how to recover
        raise RuntimeError(f"cannot read level weights {entry.weights} ({err}); delete {entry.path} to retrain") from err
    model.load_state_dict(state)
    return model.eval()
