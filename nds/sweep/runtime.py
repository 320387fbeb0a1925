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
        problem = unanswered(address)
        if problem:  # ray.init would retry for minutes before failing
            raise ConfigError(f"resources.ray_address (or RAY_ADDRESS) = {address}: {problem}; start the cluster "
                              "(ray start --head, cluster/start_local_head.sh) or leave both empty for a local instance")
        # Ray Train's PlacementGroupCleaner (a detached actor on the head) removes the worker placement group
        # of a Train controller that died ungracefully (lost with its node); it finds the cluster through
        # RAY_ADDRESS, else by scanning the machine for GCS processes, and with more than one Ray instance on
        # the machine its thread died ("Found multiple active Ray instances"): the dead fit's placement group
        # was kept, moved to a surviving node, and the retried fit waited for its CPUs (raylet-kill drill)
        gcs = _gcs_address(address)
        if gcs:
            runtime_env["env_vars"]["RAY_ADDRESS"] = gcs
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


def _gcs_address(address: str) -> str:
    """The GCS address (host:port, as Ray resolves it: ``auto`` looked up, a loopback host made the node's
    IP) that ``ray.init(address=...)`` joins; "" for a Ray Client address (``ray://``) or one Ray cannot
    resolve here (ray.init then says why)."""
    if "://" in address:
        return ""
    try:
        from ray._private.services import canonicalize_bootstrap_address

        return canonicalize_bootstrap_address(address) or ""
    except Exception:  # noqa: BLE001 - ray.init reports the problem with this address itself
        return ""


def unanswered(address: str, timeout_s: float = 10.0) -> str:
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


def _slots(capacities: list[dict], ask: dict) -> int:
    """How many of ``ask`` the nodes hold at once (each one on a single node)."""
    return sum(int(min((cap.get(name, 0) + 1e-9) // amount for name, amount in ask.items() if amount))
               for cap in capacities)


def _slots_beside(capacities: list[dict], held: dict, ask: dict) -> int:
    """The most of ``ask`` the nodes hold at once beside one ``held`` (a trial driver, placed where it leaves most)."""
    best = 0
    for i, cap in enumerate(capacities):
        if all(cap.get(name, 0) + 1e-9 >= amount for name, amount in held.items()):
            rest = {name: cap.get(name, 0) - held.get(name, 0) for name in {*cap, *held}}
            best = max(best, _slots(capacities[:i] + [rest] + capacities[i + 1:], ask))
    return best


def unplaceable(cfg: Config, nodes: list[dict]) -> str | None:
    """Why the cluster (``ray.nodes()``) cannot run a trial, naming the config key; None when it can. Each
    Train worker, trial driver and evaluation shard must fit on some node (a worker's CPUs and GPUs share
    a node), and a trial's driver holds its CPUs while its fit's workers and its evaluation shards run: the
    cluster must hold one driver with ``workers_per_level`` workers, and one driver with a shard."""
    r = cfg.resources
    capacities = [node["Resources"] for node in nodes if node.get("Alive")]
    have = "; ".join(f"{c.get('CPU', 0):g} CPU, {c.get('GPU', 0):g} GPU" for c in capacities) or "none"
    driver = {"CPU": r.driver_cpus}
    worker = {"CPU": r.cpus_per_worker, "GPU": r.gpus_per_worker}
    shard = {"CPU": r.eval_cpus_per_worker, "GPU": r.eval_gpus_per_worker}
    worker_key = "resources.gpus_per_worker" if r.gpus_per_worker else "resources.cpus_per_worker"
    shard_key = "resources.eval_gpus_per_worker" if r.eval_gpus_per_worker else "resources.eval_cpus_per_worker"
    for key, ask in (("resources.driver_cpus", driver), (worker_key, worker), (shard_key, shard)):
        if not _slots(capacities, ask):
            wanted = ", ".join(f"{amount:g} {name}" for name, amount in ask.items() if amount)
            return f"{key}: one needs {wanted} on a single node, and no node of the Ray cluster has that (nodes: {have})"
    slots = _slots_beside(capacities, driver, worker)
    if slots < r.workers_per_level:
        return (f"resources.workers_per_level={r.workers_per_level}: beside a trial driver (resources.driver_cpus="
                f"{r.driver_cpus:g}) the Ray cluster holds {slots} workers of {r.cpus_per_worker:g} CPU, "
                f"{r.gpus_per_worker:g} GPU at once (nodes: {have})")
    if not _slots_beside(capacities, driver, shard):
        return (f"{shard_key}={getattr(r, shard_key.split('.')[1]):g}: no evaluation shard fits beside its trial "
                f"driver (resources.driver_cpus={r.driver_cpus:g}) on the Ray cluster (nodes: {have})")
    return None
