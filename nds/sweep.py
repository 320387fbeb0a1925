"""Ray Tune sweeps: each trial is a driver that trains its levels (Ray Train + DeepSpeed),
samples the chain top-down, scores the samples and closes its MLflow child run."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from nds import tracking
from nds.config import Config, config_hash, flatten, from_dict, preflight, replace, to_dict, to_yaml


@dataclass
class SweepOutcome:
    parent_run_id: str
    experiment_id: str
    trials: list[dict]  # one per trial: its variant, status, metrics


def sigma_variants(cfg: Config) -> list[dict]:
    """Table 1 protocol for one stage: σ_L over sweep.sigmas for each depth L > 1; L = 1 has no σ."""
    variants = []
    for seed in cfg.sweep.seeds:
        for depth in cfg.sweep.depths:
            if depth == 1:
                variants.append({"L": 1, "seed": seed})
            else:
                variants.extend({"L": depth, "sigma": s, "seed": seed} for s in cfg.sweep.sigmas)
    return variants


def trial_config(cfg: Config, variant: dict) -> Config:
    changes = {"hierarchy.L": variant["L"], "seed": variant["seed"]}
    if "sigma" in variant:
        sigmas = list(cfg.hierarchy.sigmas)
        sigmas[variant["L"] - 2] = variant["sigma"]
        changes["hierarchy.sigmas"] = sigmas
    return replace(cfg, **changes)


def variant_name(variant: dict) -> str:
    sigma = f"-sigma{variant['sigma']:g}" if "sigma" in variant else ""
    return f"L{variant['L']}{sigma}-seed{variant['seed']}"


def extensions_dir(cfg: Config) -> Path:
    """Where DeepSpeed's JIT-built ops live, so they are compiled once per machine, not per run."""
    return cfg.cache_dir / "torch_extensions"


def init_ray(cfg: Config) -> None:
    """Join the cluster named in the config or RAY_ADDRESS (``ray job submit``), else start locally."""
    import ray

    if ray.is_initialized():
        return
    runtime_env = {"env_vars": {"TORCH_EXTENSIONS_DIR": str(extensions_dir(cfg))}}
    address = cfg.resources.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=runtime_env)
    else:
        ray.init(include_dashboard=False, runtime_env=runtime_env)


def run_trial(params: dict, *, base: dict, data_refs: dict, metric_state: dict, mlflow_ctx: dict) -> None:
    """One Tune trial; runs as a small Ray actor while its levels train on Train workers."""
    import ray.tune

    from nds.evaluate import evaluate_chain

    variant = params["variant"]
    cfg = trial_config(from_dict(base), variant)
    uri = mlflow_ctx["uri"]
    run_id = tracking.start_run(
        uri, mlflow_ctx["experiment_id"], variant_name(variant), params=flatten(cfg),
        tags={"nds.config_hash": config_hash(cfg), "nds.sweep": mlflow_ctx["sweep"], "nds.kind": "trial"},
        parent_run_id=mlflow_ctx["parent_run_id"],
    )
    try:
        from nds.train import train_level

        config_file = Path(ray.tune.get_context().get_trial_dir()) / "config.yaml"
        config_file.write_text(to_yaml(cfg))
        tracking.log_artifact(uri, run_id, config_file)
        models = {}
        for level in range(cfg.hierarchy.L, 0, -1):
            result = train_level(cfg, level, data_refs,
                                 run_name=f"{mlflow_ctx['parent_run_id'][:8]}-{config_hash(cfg)}-level{level}",
                                 mlflow_run={"uri": uri, "run_id": run_id})
            models[level] = result.model
            tracking.log_metrics(uri, run_id, {f"level{level}/final_loss": result.final_loss})
        report = evaluate_chain(cfg, models, metric_state, Path(ray.tune.get_context().get_trial_dir()))
        tracking.log_metrics(uri, run_id, report.metrics)
        for artifact in report.artifacts:
            tracking.log_artifact(uri, run_id, artifact)
        tracking.end_run(uri, run_id)
    except BaseException as err:
        tracking.end_run(uri, run_id, error=err)
        raise
    ray.tune.report({**report.metrics, "mlflow_run_id": run_id})


def run_sweep(cfg: Config, variants: list[dict], sweep_name: str) -> SweepOutcome:
    """Run one Tune stage over ``variants`` (dicts with L, seed and optionally sigma)."""
    import ray
    from ray import tune

    from nds.evaluate import prepare_metric
    from nds.latents import prepare_latents
    from nds.train import prebuild_cpu_comm_op

    preflight(cfg)
    uri = cfg.tracking_uri
    experiment_id = tracking.prepare_experiment(uri, cfg.tracking.experiment, cfg.runs_dir / "mlartifacts")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    parent_run_id = tracking.start_run(uri, experiment_id, f"{sweep_name}-{stamp}", params=flatten(cfg),
                                       tags={"nds.kind": "sweep", "nds.sweep": sweep_name,
                                             "nds.config_hash": config_hash(cfg)})
    try:
        print(f"[nds] MLflow: {uri}  experiment '{cfg.tracking.experiment}'  parent run {parent_run_id}", flush=True)
        prepared = prepare_latents(cfg)
        if cfg.resources.gpus_per_worker == 0:
            prebuild_cpu_comm_op(extensions_dir(cfg))
        init_ray(cfg)
        data_refs = {"latents": {lvl: ray.put(z) for lvl, z in prepared.latents.items()},
                     "labels": ray.put(prepared.labels)}
        metric_state = prepare_metric(cfg, prepared.reference_images)
        trainable = tune.with_parameters(
            run_trial, base=to_dict(cfg), data_refs=data_refs, metric_state=metric_state,
            mlflow_ctx={"uri": uri, "experiment_id": experiment_id, "parent_run_id": parent_run_id, "sweep": sweep_name},
        )
        tuner = tune.Tuner(
            tune.with_resources(trainable, {"cpu": cfg.resources.driver_cpus}),
            param_space={"variant": tune.grid_search(variants)},
            tune_config=tune.TuneConfig(max_concurrent_trials=cfg.resources.max_concurrent_trials),
            run_config=tune.RunConfig(
                name=f"{sweep_name}-{stamp}",
                storage_path=str(cfg.runs_dir / "ray_results"),
                failure_config=tune.FailureConfig(max_failures=cfg.training.max_failures),
                verbose=1,
            ),
        )
        grid = tuner.fit()
        trials = []
        for result in grid:
            variant = result.config["variant"]
            trials.append({"variant": variant, "ok": result.error is None,
                           "metrics": {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))},
                           "error": repr(result.error) if result.error else None})
        failed = sum(not t["ok"] for t in trials)
        tracking.log_metrics(uri, parent_run_id, {"trials.total": len(trials), "trials.failed": failed})
        tracking.end_run(uri, parent_run_id)
    except BaseException as err:
        tracking.end_run(uri, parent_run_id, error=err)
        raise
    return SweepOutcome(parent_run_id, experiment_id, trials)

