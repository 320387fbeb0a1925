"""Matryoshka Diffusion: one NestedUNet trained progressively through Ray Train + DeepSpeed ZeRO.

The phase schedule (``mdm.phase_steps``) runs as one TorchTrainer fit per phase, in order. Phase k
builds its model by ``grow``ing the previous phase's EMA weights (the new outer stage starts fresh
and joins the inner network through zero-initialised convs, so what was learned is kept), trains its
steps with a fresh optimiser and warm-up, and reports checkpoints exactly as a U-ViT level does
(nds.train): the run name is stable per phase, so a restarted worker resumes its own phase.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np
import torch

from nds import tracking
from nds.config import Config, ConfigError, config_hash, flatten, from_dict, to_dict, to_yaml
from nds.diffusion import make_schedule
from nds.models import count_params, forward_flops
from nds.nested_unet import NestedUNet, NestedUNetSpec, Phase, make_phases, mdm_sample, model_for_step, multires_loss
from nds.train import EMA, _autocast, batch_indices, deepspeed_config, fit, load_ema_weights, resume, run_steps, worker_device


def mdm_spec(cfg: Config) -> NestedUNetSpec:
    m = cfg.mdm
    return NestedUNetSpec(
        resolutions=m.resolutions, channels=m.channels, core_widths=m.core_widths, core_blocks=m.core_blocks,
        attention_levels=m.attention_levels, stage_widths=m.stage_widths, stage_blocks=m.stage_blocks,
        heads=m.heads, num_classes=m.num_classes, cond_drop_prob=m.cond_drop_prob,
    )


def mdm_phases(cfg: Config) -> list[Phase]:
    """phase_steps[i] > 0 is a phase over the i+1 innermost resolutions; zeros are skipped."""
    steps = cfg.mdm.phase_steps
    return make_phases([(i + 1, n) for i, n in enumerate(steps) if n], len(cfg.mdm.resolutions))


def phase_name(phase: Phase) -> str:
    """Named by its position in mdm.phase_steps, so skipped phases do not renumber the others."""
    return f"phase{phase.levels}"


def prepare_images(cfg: Config) -> tuple[np.ndarray, np.ndarray | None]:
    """Training images as float32 [N, C, R, R] in [-1, 1] at the full resolution R, and the labels
    (None when unconditional)."""
    from nds.data import load_dataset
    from nds.hierarchy import LevelShape, image_level

    d, m = cfg.data, cfg.mdm
    top = m.resolutions[-1]
    data = load_dataset(d.name, d.root, "train", limit=d.train_limit or None, image_size=d.image_size or top)
    channels = data.images.shape[-1]
    if channels != m.channels:
        raise ConfigError(f"mdm.channels={m.channels}, but data.name={d.name} has {channels}-channel images")
    if m.num_classes and data.labels.max() >= m.num_classes:
        raise ConfigError(f"mdm.num_classes={m.num_classes}, but data.name={d.name} has label {data.labels.max()}")
    images = image_level(data.images, LevelShape(top, top, channels))
    return images, (data.labels.astype(np.int64) if m.num_classes else None)


def phase_loop(loop_config: dict) -> None:
    """Runs inside each Ray Train worker: one phase of the schedule."""
    import deepspeed
    import ray
    import ray.train

    cfg = from_dict(loop_config["config"])
    index: int = loop_config["phase"]
    phases, spec = mdm_phases(cfg), mdm_spec(cfg)
    phase = phases[index]
    rank = ray.train.get_context().get_world_rank()
    device = worker_device(cfg)
    images = ray.get(loop_config["images"])
    labels = ray.get(loop_config["labels"])

    torch.manual_seed(cfg.seed + 1000 * index)  # the same fresh outer stage on every rank
    previous = None
    if index:
        previous = NestedUNet(spec, phases[index - 1].levels)
        previous.load_state_dict(ray.get(loop_config["previous_weights"]))
    model = model_for_step(previous, spec, phases, sum(p.steps for p in phases[:index]))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=deepspeed_config(cfg))
    d, m = cfg.diffusion, cfg.mdm
    alphas = make_schedule(d.schedule, d.timesteps, beta_start=d.beta_start, beta_end=d.beta_end).to(device)
    weights = m.loss_weights[: phase.levels] or None
    ema = EMA(cfg.training.ema_decay)
    start = resume(engine, ema)
    batch = cfg.training.batch_size

    def loss_at(step: int):
        idx = batch_indices(cfg.seed, index, rank, step, len(images), batch)
        x = torch.as_tensor(images[idx], device=device)
        y = torch.as_tensor(labels[idx], device=device) if labels is not None else None
        with _autocast(cfg, device):
            loss, per_res = multires_loss(engine, x, alphas, m.snr_power, weights, m.prediction, labels=y)
        return loss, {f"loss_{r}": float(v.detach()) for r, v in zip(model.io_resolutions, per_res)}

    run_steps(cfg, engine, ema, loss_at, start=start, steps=phase.steps, tags={"levels": phase.levels},
              metric_prefix=phase_name(phase), mlflow_run=loop_config.get("mlflow"))


@dataclass
class PhaseResult:
    phase: Phase
    model: NestedUNet  # the EMA weights, on CPU, in eval mode
    final_loss: float
    checkpoint_path: str


def train_phases(cfg: Config, data_refs: dict, run_prefix: str, mlflow_run: dict | None = None) -> list[PhaseResult]:
    """Fit the phases in order; each phase's run is ``{run_prefix}-{phase_name}``, stable across retries.

    ``data_refs``: Ray object refs of ``images`` and ``labels`` (from ``prepare_images``).
    """
    import ray

    results: list[PhaseResult] = []
    for index, phase in enumerate(mdm_phases(cfg)):
        loop_config = {
            "config": to_dict(cfg),
            "phase": index,
            "images": data_refs["images"],
            "labels": data_refs["labels"],
            "previous_weights": ray.put(results[-1].model.state_dict()) if results else None,
            "mlflow": mlflow_run,
        }
        name = phase_name(phase)
        result = fit(cfg, phase_loop, loop_config, f"{run_prefix}-{name}", what=f"MDM {name}")
        model = load_ema_weights(NestedUNet(mdm_spec(cfg), phase.levels), result)
        results.append(PhaseResult(phase, model, float(result.metrics["loss"]), result.checkpoint.path))
    return results


def model_costs(model: NestedUNet) -> dict[str, float]:
    """GFLOPs of one forward (batch 1) and parameters of the NestedUNet and of the plain UNet of the
    same size (nested=False: the same blocks, input and output at the top resolution only)."""
    plain = NestedUNet(dataclasses.replace(model.spec, nested=False), model.levels)
    costs = {}
    for name, net in (("mdm", model), ("unet", plain)):
        xs = [torch.zeros(1, net.spec.channels, r, r) for r in net.io_resolutions]
        labels = torch.zeros(1, dtype=torch.long) if net.spec.num_classes else None
        costs[f"{name}/gflops"] = forward_flops(net, xs, torch.zeros(1), labels=labels) / 1e9
        costs[f"{name}/params"] = float(count_params(net))
    return costs


def sample_images(cfg: Config, model: NestedUNet, n: int) -> list[torch.Tensor]:
    """n samples of every resolution (innermost first), with a fixed seed; labels cycle over the classes."""
    d, m = cfg.diffusion, cfg.mdm
    alphas = make_schedule(d.schedule, d.timesteps, beta_start=d.beta_start, beta_end=d.beta_end)
    labels = torch.arange(n) % m.num_classes if m.num_classes else None
    extra = {"eta": d.eta} if m.sampler == "ddim" else {}
    return mdm_sample(model, n, alphas, d.sample_steps, sampler=m.sampler, power=m.snr_power,
                      prediction=m.prediction, cfg_scale=d.cfg_scale, labels=labels,
                      generator=torch.Generator().manual_seed(cfg.seed), **extra)


@dataclass
class MDMOutcome:
    run_id: str
    experiment_id: str
    phases: list[PhaseResult]
    samples: list[torch.Tensor]  # the final model's samples, one tensor per resolution


def run_mdm(cfg: Config) -> MDMOutcome:
    """The whole run under one MLflow run (tag nds.kind=mdm): data into the object store, the phases
    in order, then samples and costs of the final model. The run is closed FAILED on any error."""
    import ray
    from PIL import Image

    from nds.evaluate import image_grid
    from nds.hierarchy import images_from_level1
    from nds.sweep import extensions_dir, init_ray
    from nds.train import prebuild_cpu_comm_op

    uri = cfg.tracking_uri
    experiment_id = tracking.prepare_experiment(uri, cfg.tracking.experiment, cfg.runs_dir / "mlartifacts")
    run_id = tracking.start_run(uri, experiment_id, f"mdm-{time.strftime('%Y%m%d-%H%M%S')}", params=flatten(cfg),
                                tags={"nds.kind": "mdm", "nds.config_hash": config_hash(cfg)})
    try:
        print(f"[nds] MLflow: {uri}  experiment '{cfg.tracking.experiment}'  run {run_id}", flush=True)
        out_dir = cfg.runs_dir / "mdm" / run_id
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(to_yaml(cfg))
        tracking.log_artifact(uri, run_id, out_dir / "config.yaml")
        images, labels = prepare_images(cfg)
        if cfg.resources.gpus_per_worker == 0:
            prebuild_cpu_comm_op(extensions_dir(cfg))
        init_ray(cfg)
        data_refs = {"images": ray.put(images), "labels": ray.put(labels)}
        phases = train_phases(cfg, data_refs, f"mdm-{run_id[:8]}", {"uri": uri, "run_id": run_id})
        metrics = {f"{phase_name(p.phase)}/final_loss": p.final_loss for p in phases}
        model = phases[-1].model
        metrics.update(model_costs(model))
        side = cfg.eval.grid_size
        samples = sample_images(cfg, model, side * side)
        grid = image_grid(images_from_level1(samples[-1]), side)
        grid_path = out_dir / "samples.png"
        Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(grid_path)
        tracking.log_metrics(uri, run_id, metrics)
        tracking.log_artifact(uri, run_id, grid_path)
        tracking.end_run(uri, run_id)
    except BaseException as err:
        tracking.end_run(uri, run_id, error=err)
        raise
    return MDMOutcome(run_id, experiment_id, phases, samples)
