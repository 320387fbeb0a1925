"""Matryoshka Diffusion runs and sweep trials: one NestedUNet (or one of MDM's baselines) trained by
``nds.train.mdm``'s phases under one MLflow run (``run_mdm``, experiments/train_mdm.py), and ``MDM``, the
sweep machinery's TrialKind: a trial trains one of them and logs the quality metric at given total
iteration counts, the curves of MDM Fig. 4 and Fig. 8.
"""
from __future__ import annotations

import hashlib
import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nds import tracking
from nds.config import Config, config_hash, flatten, replace, to_dict, to_yaml
from nds.config.specs import baseline_phases
from nds.diffusion.chain import sample_batches
from nds.eval.evaluate import prepare_metric
from nds.eval.figures import sample_grid, save_png
from nds.eval.metrics import distances, metric_features, text_agreement_values
from nds.latents.text import TextBank
from nds.models.nested_unet import NestedUNet
from nds.sweep.runner import TrialKind, TrialReport, eval_device, on_eval_workers
from nds.sweep.runtime import extensions_dir, init_ray
from nds.tracking import RunKind, Tag
from nds.train.engine import prebuild_cpu_comm_op
from nds.train.mdm import (
    PhaseResult,
    generate,
    generate_images,
    model_costs,
    phase_name,
    prepare_images,
    reference_images,
    train_phases,
)


def save_grid(cfg: Config, images: np.ndarray, path: Path) -> Path:
    title = f"NestedUNet {cfg.mdm.baseline} · {'x'.join(map(str, cfg.mdm.resolutions))} px · seed {cfg.seed}"
    return save_png(sample_grid(images, cfg.eval.grid_size, title), path)


@dataclass
class MDMOutcome:
    run_id: str
    experiment_id: str
    phases: list[PhaseResult]
    images: np.ndarray  # the grid's full-resolution samples of the final models, uint8 [n, R, R, C]


def run_mdm(cfg: Config) -> MDMOutcome:
    """The whole run under one MLflow run (tag nds.kind=mdm): data into the object store, the phases
    of ``mdm.baseline`` in order, then samples and costs of the final models. The run is closed
    FAILED on any error."""
    import ray

    uri = cfg.tracking_uri
    experiment = cfg.experiment_name("train_mdm")
    experiment_id = tracking.prepare_experiment(uri, experiment, cfg.runs_dir / "mlartifacts")
    with tracking.open_run(uri, experiment_id, f"mdm-{time.strftime('%Y%m%d-%H%M%S')}", params=flatten(cfg),
                           tags={Tag.KIND: RunKind.MDM, Tag.CONFIG_HASH: config_hash(cfg)}) as run_id:
        print(f"[nds] MLflow: {uri}  experiment '{experiment}'  run {run_id}", flush=True)
        out_dir = cfg.runs_dir / "mdm" / run_id
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(tracking.mask_credentials(to_yaml(cfg)))
        tracking.log_artifact(uri, run_id, out_dir / "config.yaml")
        data = prepare_images(cfg)
        if cfg.resources.gpus_per_worker == 0:
            prebuild_cpu_comm_op(extensions_dir(cfg))
        init_ray(cfg)
        data_refs = {k: None if v is None else ray.put(v) for k, v in data.items()}
        phases = train_phases(cfg, data_refs, f"mdm-{run_id[:8]}", {"uri": uri, "run_id": run_id})
        models = final_models(cfg, phases)
        metrics = {f"{phase_name(p.phase)}/final_loss": p.final_loss for p in phases}
        metrics.update(model_costs(*models))
        side = cfg.eval.grid_size
        samples = generate_images(cfg, models, side * side, data["text"])
        grid_path = save_grid(cfg, samples, out_dir / "samples.png")
        tracking.log_metrics(uri, run_id, metrics)
        tracking.log_artifact(uri, run_id, grid_path)
    return MDMOutcome(run_id, experiment_id, phases, samples)


def final_models(cfg: Config, phases: list[PhaseResult]) -> list[NestedUNet]:
    """What samples a trained baseline: both stages of a cascade, else the last phase's model."""
    return [p.model for p in phases] if cfg.mdm.baseline == "cascaded" else [phases[-1].model]


# -- MDM trials in a sweep -------------------------------------------------------------------------


def trial_iterations(cfg: Config) -> list[int]:
    """Total iterations at the end of each phase of the trial's baseline."""
    return list(itertools.accumulate(p.steps for p in baseline_phases(cfg, cfg.mdm.baseline)))


def data_key(cfg: Config) -> str:
    """What ``prepare_images`` returns depends on."""
    m = cfg.mdm
    return config_hash({"data": to_dict(cfg)["data"], "resolution": m.resolutions[-1], "channels": m.channels,
                        "num_classes": m.num_classes, "text": [cfg.model.text_encoder, cfg.model.text_encoder_path]})


def metric_key(cfg: Config) -> str:
    """What the reference statistics depend on."""
    d = to_dict(cfg)
    return config_hash({"data": d["data"], "eval": d["eval"], "resolution": cfg.mdm.resolutions[-1]})


@dataclass(frozen=True)
class MDMInputs:
    """What a stage of MDM trials shares: each data setting's images, labels and captions in the object
    store (by ``data_key``), each metric setting's state (by ``metric_key``), and the evaluation points."""

    data: dict[str, dict] = field(default_factory=dict)
    metric: dict[str, dict] = field(default_factory=dict)
    eval_at: list[int] = field(default_factory=list)


def prepare_mdm_inputs(sweep, configs: list[Config]) -> MDMInputs:
    """Images and labels in the object store and the metric's reference statistics at the full
    resolution, once per sweep for each data setting; and the stage's evaluation points: the end of
    every phase of every trial (in total iterations), so all its curves share the same x values."""
    import ray

    inputs = MDMInputs(eval_at=sorted({n for cfg in configs for n in trial_iterations(cfg)}))
    for cfg in configs:
        def put_data(cfg=cfg):
            return {k: None if v is None else ray.put(v) for k, v in prepare_images(cfg).items()}

        inputs.data[data_key(cfg)] = sweep.memo(("mdm-data", data_key(cfg)), put_data)
        inputs.metric[metric_key(cfg)] = sweep.memo(("mdm-metric", metric_key(cfg)),
                                                       lambda cfg=cfg: prepare_metric(cfg, reference_images(cfg)))
    return inputs


def run_mdm_trial(cfg: Config, inputs: MDMInputs, mlflow_run: dict, trial_dir: Path) -> TrialReport:
    """Train the trial's baseline, scoring it at the stage's evaluation points: the quality metric
    goes to the trial's MLflow run with step = total training iterations. Each scoring samples in
    ``resources.eval_workers`` shards (``score_shard``).

    The quality metric is not in the returned metrics: the sweep logs those at step 0, which would
    add a false first point to the curve; the run's latest value of the metric is the final one.
    """
    import ray

    total = trial_iterations(cfg)[-1]
    eval_at = [n for n in inputs.eval_at if n <= total]
    metric_state = inputs.metric[metric_key(cfg)]
    state_ref = ray.put(metric_state)
    data_refs = inputs.data[data_key(cfg)]
    last = {}

    def evaluate(done: int, models: list[NestedUNet]) -> None:
        launched = launch_shards(cfg, ray.put(models), state_ref, data_refs["text"])
        scores, last["images"] = sharded_scores(cfg, ray.get(launched), metric_state)
        tracking.log_metrics(mlflow_run["uri"], mlflow_run["run_id"], scores, step=done)
        print(f"[nds] {cfg.mdm.baseline} after {done} iterations: "
              f"{', '.join(f'{k} {v:.2f}' for k, v in scores.items())}", flush=True)

    run_prefix = "mdm-" + hashlib.sha1(str(trial_dir).encode()).hexdigest()[:12]  # stable when Tune retries the trial
    phases = train_phases(cfg, data_refs, run_prefix, mlflow_run, eval_at, evaluate)
    models = final_models(cfg, phases)
    metrics = {f"{phase_name(p.phase)}/final_loss": p.final_loss for p in phases}
    metrics.update(model_costs(*models), iterations=total,
                   **{"eval.shards": len(sample_batches(cfg.eval.num_samples, cfg.eval.batch_size, cfg.resources.eval_workers))})
    metrics.update(guidance_curve(cfg, models, state_ref, data_refs["text"], metric_state))
    grid = save_grid(cfg, last["images"], trial_dir / "sample_grid.png")
    return TrialReport(metrics, [grid], {Tag.MDM_BASELINE: cfg.mdm.baseline})


@dataclass
class ScoredShard:
    """What an MDM evaluation shard returns of its batches: each quality metric's features, each image's
    agreement with its caption (text-conditional models, when asked) and the grid's first images."""

    features: dict[str, np.ndarray]
    agreement: dict[str, np.ndarray]
    head: np.ndarray


def score_shard(cfg: Config, models: list[NestedUNet], metric_state: dict, firsts: list[int],
                text_bank: TextBank | None = None, agreement: bool = False) -> ScoredShard:
    """One evaluation shard of an MDM trial, a Ray task with the ``resources.eval_*`` resources: the batches
    ``firsts`` of the models' ``eval.num_samples`` samples (``nds.train.mdm.generate``: the same images
    whatever the shards), scored on the task's device."""
    e, device = cfg.eval, eval_device(cfg)
    samples = generate(cfg, [m.to(device) for m in models], e.num_samples, text_bank, firsts)
    features = metric_features(samples.images, e.inception_dir, e.substitute_image_size, e.batch_size,
                               metric_state["classifier"], tuple(metric_state["ref_stats"]), device)
    agrees = {}
    if agreement and samples.captions is not None:
        agrees = text_agreement_values(samples.images, samples.captions, samples.caption_classes, e.clip_dir,
                                       metric_state["classifier"], e.batch_size)
    head = samples.images[:max(0, min(e.grid_size ** 2 - firsts[0], len(samples.images)))]
    return ScoredShard(features, agrees, head)


def launch_shards(cfg: Config, models_ref, metric_state_ref, text_bank_ref, agreement: bool = False) -> list:
    """``score_shard`` tasks over the batches of ``eval.num_samples`` samples, split ``resources.eval_workers``
    ways; the models, the metric state and the caption bank are in the object store."""
    e = cfg.eval
    task = on_eval_workers(cfg, score_shard)
    return [task.remote(cfg, models_ref, metric_state_ref, firsts, text_bank_ref, agreement)
            for firsts in sample_batches(e.num_samples, e.batch_size, cfg.resources.eval_workers)]


def sharded_scores(cfg: Config, shards: list[ScoredShard], metric_state: dict) -> tuple[dict[str, float], np.ndarray]:
    """The scores of a sample set from its shards, in shard order (each Fréchet distance over all their
    features at once, the mean caption agreement), and the grid's images."""
    features = {name: np.concatenate([s.features[name] for s in shards]) for name in shards[0].features}
    scores = distances(features, metric_state["ref_stats"])
    scores.update({name: float(np.concatenate([s.agreement[name] for s in shards]).mean())
                   for name in shards[0].agreement})
    return scores, np.concatenate([s.head for s in shards])[:cfg.eval.grid_size ** 2]


def guidance_name(scale: float, metric: str) -> str:
    return f"guidance{scale:g}/{metric}"


def guidance_curve(cfg: Config, models: list[NestedUNet], metric_state_ref, text_bank_ref, metric_state: dict) -> dict:
    """MDM Fig. 8c: the final models sampled at every guidance scale of ``sweep.cfg_scales`` (all scales'
    shards launched at once), each scored with the quality metrics and, for text-conditional models,
    the samples' agreement with their captions (nds.eval.metrics.text_agreement_values); one sampling of
    eval.num_samples per scale."""
    import ray

    models_ref = ray.put(models)
    launched = {scale: launch_shards(replace(cfg, **{"diffusion.cfg_scale": scale}), models_ref, metric_state_ref,
                                     text_bank_ref, agreement=True) for scale in cfg.sweep.cfg_scales}
    curve = {}
    for scale, shards in launched.items():
        scores, _ = sharded_scores(cfg, ray.get(shards), metric_state)
        curve.update({guidance_name(scale, name): value for name, value in scores.items()})
        print(f"[nds] guidance {scale:g}: {', '.join(f'{k} {v:.3f}' for k, v in scores.items())}", flush=True)
    return curve


MDM = TrialKind(prepare_mdm_inputs, run_mdm_trial, "mdm")
