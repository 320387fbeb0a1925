"""The Ray runtime a sweep runs on: joining or starting it, where DeepSpeed's compiled ops live, and
whether the cluster can place a trial's workers at all."""
from __future__ import annotations

import logging
import os
from pathlib import Path

from nds.config import Config, ConfigError

WORKER_START_TIMEOUT_S = 6 * 3600  # how long a queued level's Train workers may wait for resources


def extensions_dir(cfg: Config) -> Path:
    """Where DeepSpeed's JIT-built ops live, so they are compiled once per machine, not per run."""
    return cfg.cache_dir / "torch_extensions"


def init_ray(cfg: Config) -> None:
    """Join the cluster named in the config or RAY_ADDRESS (``ray job submit``), else start locally."""
    import ray

    if ray.is_initialized():
        return
    # A trial starts all its missing levels at once; fits beyond the free CPUs/GPUs queue until
    # others finish, which takes far longer than Ray Train's default 60 s worker-start timeout.
    start_timeout = os.environ.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", str(WORKER_START_TIMEOUT_S))
    # Ray Train routes a worker's print() through a logger that also writes it to stdout: every progress
    # line reached the console twice. Without the patch a print is a print.
    runtime_env = {"env_vars": {"TORCH_EXTENSIONS_DIR": str(extensions_dir(cfg)),
                                "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": start_timeout,
                                "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}}
    address = cfg.resources.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        problem = _unanswered(address)
        if problem:  # ray.init would retry for minutes before failing
            raise ConfigError(f"resources.ray_address (or RAY_ADDRESS) = {address}: {problem}; start the cluster "
                              "(ray start --head, cluster/start_local_head.sh) or leave both empty for a local instance")
        ray.init(address=address, runtime_env=runtime_env)
    else:
        ray.init(include_dashboard=False,
                 runtime_env={**runtime_env, "worker_process_setup_hook": mute_placement_group_cleaner})


def mute_placement_group_cleaner() -> None:
    """Worker setup hook of a local instance. Ray Train's PlacementGroupCleaner (it removes a dead
    controller's placement group) asks the state API every second whether the controller lives; that
    API needs the dashboard, which a local instance runs without (2 cores), so it warned every second
    of every fit. A local instance's placement groups end with it anyway. On a cluster the dashboard
    runs and its warnings, if any, mean something: they are kept."""
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


def _unanswered(address: str, timeout_s: float = 10.0) -> str:
    """Why nothing answers at a Ray address of the form [ray://|http://]host:port ("" if something does,
    or the address names no port, like "auto")."""
    import socket

    host, _, port = address.split("://")[-1].rstrip("/").rpartition(":")
    if not host or not port.isdigit():
        return ""
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as err:
        return f"nothing answers at {host}:{port} ({err.strerror or err})"
    return ""


def unplaceable(cfg: Config, nodes: list[dict]) -> str | None:
    """Why no node of the cluster (``ray.nodes()``) can hold one Train worker, one trial driver or one
    evaluation shard, naming the config key; None when each fits on some node. A worker's CPUs and GPUs
    must share a node."""
    r = cfg.resources
    capacities = [node["Resources"] for node in nodes if node.get("Alive")]
    have = "; ".join(f"{c.get('CPU', 0):g} CPU, {c.get('GPU', 0):g} GPU" for c in capacities) or "none"
    asks = [("resources.driver_cpus", {"CPU": r.driver_cpus}),
            ("resources.gpus_per_worker" if r.gpus_per_worker else "resources.cpus_per_worker",
             {"CPU": r.cpus_per_worker, "GPU": r.gpus_per_worker}),
            ("resources.eval_gpus_per_worker" if r.eval_gpus_per_worker else "resources.eval_cpus_per_worker",
             {"CPU": r.eval_cpus_per_worker, "GPU": r.eval_gpus_per_worker})]
    for key, ask in asks:
        if not any(all(cap.get(name, 0) >= amount for name, amount in ask.items()) for cap in capacities):
            wanted = ", ".join(f"{amount:g} {name}" for name, amount in ask.items() if amount)
            return f"{key}: one needs {wanted} on a single node, and no node of the Ray cluster has that (nodes: {have})"
    worker = asks[1][1]
    slots = sum(int(min(cap.get(name, 0) // amount for name, amount in worker.items() if amount)) for cap in capacities)
    if slots < r.workers_per_level:
        return (f"resources.workers_per_level={r.workers_per_level}: the Ray cluster holds {slots} workers of "
                f"{r.cpus_per_worker:g} CPU, {r.gpus_per_worker:g} GPU at once (nodes: {have})")
    return None
