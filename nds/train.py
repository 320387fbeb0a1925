"""Training one level of the hierarchy: a Ray Train TorchTrainer whose workers run DeepSpeed ZeRO.

A level's model only sees its frozen targets z_l (and, below the top, the noised copy
ẑ_{l+1} = z_{l+1} + σ_{l+1}·ε, drawn fresh every step), so every level trains on its
own. Checkpoints go through ``ray.train.report``; a restarted worker, or a retried Tune
trial that names the same run, resumes from the last one.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nds.config import Config, from_dict, to_dict
from nds.diffusion import diffusion_loss, make_schedule
from nds.hierarchy import add_condition_noise
from nds.models import UViT, uvit_from_size

WEIGHTS_FILE = "weights.pt"  # consolidated fp32 state dict, written next to the DeepSpeed shards


def patch_size_for(h: int, w: int, max_grid: int) -> int:
    """Smallest patch that divides h and w and keeps the token grid within max_grid per side."""
    for p in range(1, min(h, w) + 1):
        if h % p == 0 and w % p == 0 and h // p <= max_grid and w // p <= max_grid:
            return p
    raise ValueError(f"no patch size divides {h}x{w} into a grid of at most {max_grid} per side")


def build_level_model(cfg: Config, level: int) -> UViT:
    """The U-ViT of one level: z_level as input, ẑ_{level+1} (if any) as condition tokens."""
    levels = cfg.levels
    shape = levels[level - 1]
    above = levels[level] if level < len(levels) else None
    overrides = {key: getattr(cfg.model, key) for key in ("width", "depth", "heads") if getattr(cfg.model, key)}
    return uvit_from_size(
        cfg.model.size,
        input_shape=(shape.h, shape.w, shape.c),
        patch_size=patch_size_for(shape.h, shape.w, cfg.model.max_token_grid),
        cond_shape=(above.h, above.w, above.c) if above else None,
        num_classes=cfg.model.num_classes,
        cond_drop_prob=cfg.diffusion.cond_drop_prob,
        **overrides,
    )


def deepspeed_config(cfg: Config) -> dict:
    """DeepSpeed keeps fp32 weights; bf16 compute, where used, comes from autocast (see ``_autocast``)."""
    t = cfg.training
    return {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        "optimizer": {
            "type": "AdamW",
            # torch_adam avoids DeepSpeed's JIT-compiled Fused/CPU Adam (~75 s compile on CPU)
            "params": {"lr": t.lr, "weight_decay": t.weight_decay, "betas": [0.9, 0.99], "torch_adam": True},
        },
        "steps_per_print": 10**9,
    }


def _autocast(cfg: Config, device: torch.device):
    """bf16 autocast where asked; "auto" uses it on GPUs only (CPUs without bf16 units run it ~100x slower)."""
    precision = cfg.training.precision
    enabled = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def train_loop(loop_config: dict) -> None:
    """Runs inside each Ray Train worker."""
    import deepspeed
    import ray
    import ray.train

    cfg = from_dict(loop_config["config"])
    level: int = loop_config["level"]
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    device = torch.device("cuda", ctx.get_local_rank()) if torch.cuda.is_available() and cfg.resources.gpus_per_worker > 0 else torch.device("cpu")

    targets = ray.get(loop_config["targets"])
    above = ray.get(loop_config["condition"]) if loop_config["condition"] is not None else None
    labels = ray.get(loop_config["labels"]) if cfg.model.num_classes else None
    sigma = cfg.sigma(level + 1) if above is not None else 0.0

    torch.manual_seed(cfg.seed + 1000 * level)
    model = build_level_model(cfg, level)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=deepspeed_config(cfg))
    alphas = make_schedule(cfg.diffusion.schedule, cfg.diffusion.timesteps,
                           beta_start=cfg.diffusion.beta_start, beta_end=cfg.diffusion.beta_end).to(device)

    start = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as ckpt_dir:
            _, client_state = engine.load_checkpoint(ckpt_dir, tag="ckpt")
        start = client_state["step"]

    steps, batch = cfg.training.steps, cfg.training.batch_size
    fail_at = cfg.training.fail_once_at_step
    for step in range(start, steps):
        if fail_at and step == fail_at and start < fail_at:
            raise RuntimeError(f"fault drill: training.fail_once_at_step={fail_at} reached")
        # Indices depend only on (seed, level, rank, step), so a resumed run sees the same batches.
        rng = np.random.default_rng([cfg.seed, level, rank, step])
        idx = np.sort(rng.choice(len(targets), size=batch, replace=len(targets) < batch))
        x0 = torch.as_tensor(np.asarray(targets[idx]), device=device)
        cond = None
        if above is not None:
            cond = add_condition_noise(torch.as_tensor(np.asarray(above[idx]), device=device), sigma)
        y = torch.as_tensor(labels[idx], device=device) if labels is not None else None
        with _autocast(cfg, device):
            loss = diffusion_loss(lambda x, t: engine(x, t, cond=cond, labels=y), x0, alphas)
        engine.backward(loss)
        engine.step()

        done = step + 1
        metrics = {"step": done, "loss": float(loss.detach()), "level": level}
        if done % cfg.training.checkpoint_every == 0 or done == steps:
            _report_with_checkpoint(engine, metrics, final=done == steps, rank=rank)
        elif done % cfg.training.log_every == 0:
            ray.train.report(metrics)
        if rank == 0 and (done % cfg.training.log_every == 0 or done == steps) and loop_config.get("mlflow"):
            from nds.tracking import log_metrics

            log_metrics(loop_config["mlflow"]["uri"], loop_config["mlflow"]["run_id"],
                        {f"level{level}/train_loss": metrics["loss"]}, step=done)


def _report_with_checkpoint(engine, metrics: dict, final: bool, rank: int) -> None:
    """Every rank saves its DeepSpeed shard; rank 0 adds consolidated weights for sampling."""
    import deepspeed
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        engine.save_checkpoint(tmp, tag="ckpt", client_state={"step": metrics["step"]})
        if final:
            params = list(engine.module.parameters())
            stage3 = engine.zero_optimization_stage() == 3
            with deepspeed.zero.GatheredParameters(params) if stage3 else contextlib.nullcontext():
                if rank == 0:
                    state = {k: v.detach().float().cpu() for k, v in engine.module.state_dict().items()}
                    torch.save(state, os.path.join(tmp, WEIGHTS_FILE))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


@dataclass
class LevelResult:
    level: int
    model: UViT
    final_loss: float
    checkpoint_path: str


def train_level(cfg: Config, level: int, data_refs: dict, run_name: str, mlflow_run: dict | None = None) -> LevelResult:
    """Fit one level with a TorchTrainer; returns the trained model (weights on CPU).

    ``data_refs`` holds Ray object refs: ``latents[l]`` for each level and ``labels``.
    ``run_name`` must be stable across retries so a retried trial resumes.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    r = cfg.resources
    use_gpu = r.gpus_per_worker > 0
    resources = {"CPU": r.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = r.gpus_per_worker
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "config": to_dict(cfg),
            "level": level,
            "targets": data_refs["latents"][level],
            "condition": data_refs["latents"][level + 1] if level < cfg.hierarchy.L else None,
            "labels": data_refs["labels"],
            "mlflow": mlflow_run,
        },
        scaling_config=ScalingConfig(num_workers=r.workers_per_level, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=run_name,
            storage_path=str(cfg.runs_dir / "ray_results"),
            failure_config=FailureConfig(max_failures=cfg.training.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
        ),
    )
    result = trainer.fit()
    if result.error:
        raise RuntimeError(f"training level {level} failed: {result.error}") from result.error
    model = build_level_model(cfg, level)
    with result.checkpoint.as_directory() as ckpt_dir:
        path = Path(ckpt_dir) / WEIGHTS_FILE
        if not path.exists():
            raise FileNotFoundError(f"checkpoint {result.checkpoint.path} has no {WEIGHTS_FILE}")
        model.load_state_dict(torch.load(path, map_location="cpu"))
    model.eval()
    return LevelResult(level, model, float(result.metrics["loss"]), result.checkpoint.path)
