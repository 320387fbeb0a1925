"""Training one level of the hierarchy: a Ray Train TorchTrainer whose workers run DeepSpeed ZeRO.

A level's model only sees its frozen targets z_l (and, below the top, the noised copy
ẑ_{l+1} = z_{l+1} + σ_{l+1}·ε, drawn fresh every step), so every level trains on its
own. Checkpoints go through ``ray.train.report``; a restarted worker, or a retried Tune
trial that names the same run, resumes from the last one. The step loop (``run_steps``),
``resume`` and ``fit`` are shared with the NestedUNet phases (nds.train.mdm).
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nds.config import Config, config_hash, from_dict, to_dict
from nds.config.specs import patch_size_for
from nds.diffusion.chain import keyed_generator, noise_schedule
from nds.diffusion.process import diffusion_loss
from nds.latents.hierarchy import add_condition_noise
from nds.latents.text import text_width
from nds.models.uvit import UViT, uvit_from_size
from nds.tracking import log_metrics, set_tags
from nds.train.inputs import LevelData

WEIGHTS_FILE = "ema_weights.pt"  # full fp32 EMA state dict, written next to the DeepSpeed shards


def prebuild_cpu_comm_op(extensions_dir: Path) -> None:
    """Compile DeepSpeed's CPU shared-memory comm op once, in the driver.

    Every CPU worker loads it in ``deepspeed.initialize``; left to the workers, several
    compile it at once on the first trials (minutes on a small machine instead of ~30 s).
    """
    os.environ["TORCH_EXTENSIONS_DIR"] = str(extensions_dir)
    from deepspeed.comm.torch import build_shm_op

    build_shm_op()


def step_generator(seed: int, stream: int, rank: int, step: int) -> torch.Generator:
    """The generator of every random draw of one training step on one rank (captions, σ-noise,
    condition drops, t, ε), fixed by its arguments like :func:`batch_indices`: data-parallel ranks
    draw different noise, and a resumed run draws what an uninterrupted one would have drawn.
    ``stream`` separates levels or phases. (Initialisation is seeded alike on every rank instead.)"""
    return keyed_generator(seed, stream, rank, step)


def condition_drops(n: int, drop_prob: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """[n] bool: which examples train the classifier-free-guidance null branch this step."""
    return (torch.rand(n, generator=generator) < drop_prob).to(device)


def batch_indices(seed: int, stream: int, rank: int, step: int, n: int, batch: int) -> np.ndarray:
    """Sorted indices of one worker's batch; they depend only on their arguments, so a resumed
    run draws the same batches (``stream`` separates levels or phases)."""
    rng = np.random.default_rng([seed, stream, rank, step])
    return np.sort(rng.choice(n, size=batch, replace=n < batch))


def build_level_model(cfg: Config, level: int) -> UViT:
    """The U-ViT of one level: z_level as input, ẑ_{level+1} (if any) as condition tokens, and with
    ``model.text_encoder`` caption tokens (every level, as in the paper's conditional runs)."""
    levels = cfg.levels
    shape = levels[level - 1]
    above = levels[level] if level < len(levels) else None
    overrides = {key: getattr(cfg.model, key) for key in ("width", "depth", "heads") if getattr(cfg.model, key)}
    text = cfg.model.text_encoder
    return uvit_from_size(
        cfg.model.size,
        input_shape=(shape.h, shape.w, shape.c),
        patch_size=patch_size_for(shape.h, shape.w, cfg.model.max_token_grid),
        cond_shape=(above.h, above.w, above.c) if above else None,
        num_classes=cfg.model.num_classes,
        cond_drop_prob=cfg.diffusion.cond_drop_prob,
        text_dim=text_width(text, cfg.model.text_encoder_path or None) if text else 0,
        cond_injection=cfg.model.cond_injection,
        qkv_bias=cfg.model.qkv_bias,
        mlp_time_embed=cfg.model.mlp_time_embed,
        **overrides,
    )


def deepspeed_config(cfg: Config) -> dict:
    """DeepSpeed keeps fp32 weights; bf16 compute, where used, comes from autocast (see ``bf16_autocast``)."""
    t = cfg.training
    return {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        "optimizer": {
            "type": "AdamW",
            # torch_adam avoids DeepSpeed's JIT-compiled Fused/CPU Adam (~75 s compile on CPU)
            "params": {"lr": t.lr, "weight_decay": t.weight_decay, "betas": list(t.betas), "torch_adam": True},
        },
        "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": t.lr,
                                                     "warmup_num_steps": max(1, t.warmup_steps), "warmup_type": "linear"}},
        "steps_per_print": 10**9,
    }


def bf16_autocast(enabled: bool, device: torch.device):
    """DeepSpeed keeps fp32 weights; bf16 compute comes from autocast where the precision says so."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


PRECISION_MARGIN = 0.95  # auto picks bf16 only if its steps take at most this fraction of fp32's


def _probe_seconds(probe_loss, model: torch.nn.Module, bf16: bool, repeats: int = 2) -> float:
    """Best time of a forward + backward of ``probe_loss(model, bf16)`` (after one warm-up)."""
    times = []
    for _ in range(repeats + 1):
        model.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        probe_loss(model, bf16).backward()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times[1:])


def resolve_precision(cfg: Config, model: torch.nn.Module, probe_loss, device: torch.device, rank: int) -> dict:
    """``training.precision``, with ``auto`` settled by measurement rather than by rule: rank 0 times
    a copy of ``model`` on ``probe_loss(module, bf16)`` (one training batch) in fp32 and under bf16
    autocast, and every rank follows it. bf16 pays only with bf16 matrix units and matrices big
    enough to amortise the casts: on this project's CPU (AMX) a U-ViT-S level trains 1.8x faster
    in bf16, the tiny one slower. The timings are cached per device, model and batch under
    ``paths.cache_dir``. Returns {"precision", and for auto "fp32_s", "bf16_s", "cached"}."""
    if cfg.training.precision != "auto":
        return {"precision": cfg.training.precision}
    import torch.distributed as dist
    from filelock import FileLock

    decision = [None]
    if rank == 0:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu/{torch.get_num_threads()} threads"
        key = config_hash({"device": name, "model": str(model), "batch": cfg.training.batch_size})
        path = cfg.cache_dir / "precision.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock"):
            table = json.loads(path.read_text()) if path.is_file() else {}
            cached = key in table
            if not cached:  # on a copy, with the random state put back: training draws what it would have
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                    probe = copy.deepcopy(model).to(device).train()
                    table[key] = {"device": name, "fp32_s": _probe_seconds(probe_loss, probe, False),
                                  "bf16_s": _probe_seconds(probe_loss, probe, True)}
                path.write_text(json.dumps(table, indent=2))
        timing = table[key]
        faster = timing["bf16_s"] <= PRECISION_MARGIN * timing["fp32_s"]
        decision[0] = {"precision": "bf16" if faster else "fp32", "fp32_s": timing["fp32_s"],
                       "bf16_s": timing["bf16_s"], "cached": cached}
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(decision, src=0)
    return decision[0]


def log_precision(decision: dict, metric_prefix: str, mlflow_run: dict | None, rank: int) -> None:
    """Say which precision a fit uses and, for auto, the timings it was chosen by (console, MLflow)."""
    if rank != 0:
        return
    timing = (f" (auto: fp32 {decision['fp32_s']:.3g} s, bf16 {decision['bf16_s']:.3g} s per forward+backward"
              f"{', cached' if decision['cached'] else ''})") if "fp32_s" in decision else ""
    print(f"[nds] {metric_prefix} trains in {decision['precision']}{timing}", flush=True)
    if mlflow_run:
        set_tags(mlflow_run["uri"], mlflow_run["run_id"], {f"nds.{metric_prefix}.precision": decision["precision"]})
        if "fp32_s" in decision:
            log_metrics(mlflow_run["uri"], mlflow_run["run_id"],
                        {f"{metric_prefix}/bf16_speedup": decision["fp32_s"] / decision["bf16_s"]})


def worker_device(cfg: Config) -> torch.device:
    """This Train worker's device: its GPU where the config asks for GPUs, else the CPU."""
    import ray.train

    if torch.cuda.is_available() and cfg.resources.gpus_per_worker > 0:
        return torch.device("cuda", ray.train.get_context().get_local_rank())
    return torch.device("cpu")


def newest_complete_checkpoint(run_dir: Path, world_size: int) -> Path | None:
    """The newest checkpoint directory of a fit's run that every rank finished writing, registered or not.

    Ray Train registers a reported checkpoint only once its controller has polled the report from
    every worker (every ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``); a worker killed in that window made the
    fit restart from the checkpoint before (from step 0 when it was the first; seen in the kill drill),
    although the newer one was already on storage, complete."""
    def complete(path: Path) -> bool:
        shards = list((path / "ckpt").glob("zero_pp_rank_*_optim_states.pt"))
        return (path / "latest").is_file() and (path / "ckpt" / "mp_rank_00_model_states.pt").is_file() and (
            not shards or len(shards) == world_size)

    found = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir() and complete(p))  # names are timestamps
    return found[-1] if found else None


def resume(engine, ema: EMA, run_dir: Path | None = None) -> int:
    """Load the fit's newest checkpoint, if any (a restarted worker or a retried run); its step. That is
    the one Ray Train hands back, or a newer complete one in ``run_dir`` that it had not yet registered."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    newest = newest_complete_checkpoint(run_dir, ray.train.get_context().get_world_size()) if run_dir else None
    if newest and (not checkpoint or Path(checkpoint.path).name < newest.name):
        checkpoint = ray.train.Checkpoint.from_directory(str(newest))
    if not checkpoint:
        return 0
    with checkpoint.as_directory() as ckpt_dir:
        _, client_state = engine.load_checkpoint(ckpt_dir, tag="ckpt")
    ema.load_state_dict(client_state["ema"])
    return client_state["step"]


class NonFiniteLoss(RuntimeError):
    """A fit's training loss became NaN or Inf: deterministic under the keyed draws, so not retried."""


NONFINITE_FILE = "nonfinite.json"  # written beside a fit's checkpoints when its loss went non-finite


def first_nonfinite_step(local: int, device) -> int:
    """The first step (1-based) at which any rank's loss was non-finite since the last report, or 0:
    one all-reduce per report, so every rank stops at the same report."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return local
    flag = torch.tensor([local if local else 2**62], dtype=torch.int64, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return 0 if int(flag) == 2**62 else int(flag)


PROGRESS_LINES = 10  # progress lines a fit prints (rank 0), besides its first and last report


def quiet_worker_logs() -> None:
    """Ray Train logs every report of every worker at INFO ("Reporting training result ..."), under a
    logger named by its file; the fit's own progress lines (``run_steps``) replace them on the console."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray Train layout: keep its lines
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def progress_line(what: str, done: int, steps: int, start: int, loss: float, seconds: float) -> str:
    rate = (done - start) / max(seconds, 1e-9)
    eta = (steps - done) / max(rate, 1e-9)
    return (f"[nds] {what}: step {done}/{steps} ({100 * done / steps:.0f}%), loss {loss:.4f}, {rate:.1f} steps/s, "
            f"{'done' if done == steps else f'ETA {eta / 60:.1f} min'}")


def run_steps(cfg: Config, engine, ema: EMA, loss_at, *, start: int, steps: int, tags: dict,
              metric_prefix: str, mlflow_run: dict | None, nonfinite_marker: str | None = None) -> None:
    """The step loop shared by U-ViT levels and NestedUNet phases: optimise, update the EMA, report
    mean losses every log_every steps and checkpoints every checkpoint_every (and at the end).

    ``loss_at(step)`` returns (loss, {name: float}) for the batch of that step; the extra values
    are averaged and reported like the loss. MLflow gets ``{metric_prefix}/train_{name}``.
    A non-finite loss on any rank ends the fit at the next report, on every rank, without a
    checkpoint: its last checkpoint keeps finite weights; rank 0 writes ``nonfinite_marker`` (from
    ``fit``), which then raises :class:`NonFiniteLoss` instead of letting Ray retry the same NaN.
    """
    import ray.train

    context = ray.train.get_context()
    rank = context.get_world_rank()
    t = cfg.training
    sums, count, nonfinite = {}, 0, 0
    began, next_line = time.perf_counter(), start
    if start and rank == 0 and mlflow_run:  # what a restart cost is read off this and the steps logged before it

        log_metrics(mlflow_run["uri"], mlflow_run["run_id"], {f"{metric_prefix}/resumed_from": start}, step=start)
    killed_marker = Path(nonfinite_marker).with_name("kill_drill_done") if nonfinite_marker else None
    for step in range(start, steps):
        if t.fail_once_at_step and step == t.fail_once_at_step and start < t.fail_once_at_step:
            raise RuntimeError(f"fault drill: training.fail_once_at_step={t.fail_once_at_step} reached")
        if (t.kill_worker_at_step and step == t.kill_worker_at_step and rank == context.get_world_size() - 1
                and killed_marker and not killed_marker.exists()):  # fault drill: killed as the OOM killer would
            killed_marker.parent.mkdir(parents=True, exist_ok=True)
            killed_marker.write_text(str(step))
            os.kill(os.getpid(), signal.SIGKILL)
        loss, parts = loss_at(step)
        if t.nan_at_step and step + 1 == t.nan_at_step and rank == 0:
            loss = loss * float("nan")  # fault drill: one rank's loss goes NaN
        value = float(loss.detach())
        nonfinite = nonfinite or (0 if math.isfinite(value) else step + 1)
        engine.backward(loss)
        engine.step()
        ema.update(engine.module)
        for name, part in {"loss": value, **parts}.items():
            sums[name] = sums.get(name, 0.0) + part
        count += 1

        done = step + 1
        if done % t.log_every and done % t.checkpoint_every and done != steps:
            continue
        bad = first_nonfinite_step(nonfinite, engine.device)
        if bad:
            if rank == 0 and nonfinite_marker:
                Path(nonfinite_marker).parent.mkdir(parents=True, exist_ok=True)
                Path(nonfinite_marker).write_text(json.dumps({"step": bad, "stopped": done}))
            return
        # the means over the steps since the last report: single-step diffusion losses are noisy
        means = {name: total / count for name, total in sums.items()}
        metrics = {"step": done, **means, **tags}
        sums, count = {}, 0
        if rank == 0 and (done >= next_line or done == steps):
            print(progress_line(metric_prefix, done, steps, start, means["loss"], time.perf_counter() - began), flush=True)
            next_line = done + max(1, (steps - start) // PROGRESS_LINES)
        if done % cfg.training.checkpoint_every == 0 or done == steps:
            _report_with_checkpoint(engine, ema, metrics, final=done == steps, rank=rank)
        else:
            ray.train.report(metrics)
        if rank == 0 and mlflow_run:
            log_metrics(mlflow_run["uri"], mlflow_run["run_id"],
                        {f"{metric_prefix}/train_{name}": value for name, value in means.items()}, step=done)


def train_loop(loop_config: dict) -> None:
    """Runs inside each Ray Train worker."""
    import ray
    import ray.train

    quiet_worker_logs()
    cfg = from_dict(loop_config["config"])
    level: int = loop_config["level"]
    rank = ray.train.get_context().get_world_rank()
    device = worker_device(cfg)

    targets = ray.get(loop_config["targets"])
    above = ray.get(loop_config["condition"]) if loop_config["condition"] is not None else None
    bank = ray.get(loop_config["text"]) if loop_config["text"] is not None else None
    class_groups = bank is not None and not bank.groups_are_images  # captions drawn for the batch's labels
    labels = ray.get(loop_config["labels"]) if cfg.model.num_classes or class_groups else None
    sigma = cfg.sigma(level + 1) if above is not None else 0.0

    torch.manual_seed(cfg.seed + 1000 * level)
    model = build_level_model(cfg, level)
    alphas = noise_schedule(cfg).to(device)
    batch = cfg.training.batch_size

    def batch_loss(module, step: int, bf16: bool) -> torch.Tensor:
        idx = batch_indices(cfg.seed, level, rank, step, len(targets), batch)
        draws = step_generator(cfg.seed, level, rank, step)
        x0 = torch.as_tensor(np.asarray(targets[idx]), device=device)
        cond = None
        if above is not None:
            cond = add_condition_noise(torch.as_tensor(np.asarray(above[idx]), device=device), sigma, draws)
        y = torch.as_tensor(labels[idx], device=device) if labels is not None else None
        text = {}
        if bank is not None:  # a caption per example; the condition drop nulls it for CFG
            groups = torch.as_tensor(idx, device=device) if bank.groups_are_images else y
            text["text"], text["text_mask"], _ = bank.sample(groups, draws)
        y = y if cfg.model.num_classes else None
        drop = condition_drops(len(idx), cfg.diffusion.cond_drop_prob, draws, device)
        with bf16_autocast(bf16, device):
            return diffusion_loss(lambda x, t: module(x, t, cond=cond, labels=y, drop_cond=drop, **text), x0, alphas,
                                  generator=draws, prediction=cfg.diffusion.prediction)

    train_worker(cfg, model, lambda module, step, bf16: (batch_loss(module, step, bf16), {}), loop_config,
                 device=device, rank=rank, name=f"level{level}", tags={"level": level}, steps=cfg.training.steps)


def train_worker(cfg: Config, model: torch.nn.Module, batch_loss, loop_config: dict, *, device: torch.device,
                 rank: int, name: str, tags: dict, steps: int) -> None:
    """The one training engine every worker loop ends in (a U-ViT level, a NestedUNet phase): the measured
    precision, DeepSpeed ZeRO, the EMA, resume from the fit's newest checkpoint, then the step loop up to
    ``steps``. ``batch_loss(module, step, bf16)`` returns (loss, extra metrics to log)."""
    import deepspeed

    decision = resolve_precision(cfg, model, lambda module, bf16: batch_loss(module, 0, bf16)[0], device, rank)
    log_precision(decision, name, loop_config.get("mlflow"), rank)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=deepspeed_config(cfg))
    ema = EMA(cfg.training.ema_decay)
    marker = loop_config.get("nonfinite_marker")  # beside the fit's checkpoints
    start = resume(engine, ema, Path(marker).parent if marker else None)
    bf16 = decision["precision"] == "bf16"
    run_steps(cfg, engine, ema, lambda step: batch_loss(engine, step, bf16), start=start, steps=steps, tags=tags,
              metric_prefix=name, mlflow_run=loop_config.get("mlflow"), nonfinite_marker=marker)


class EMA:
    """Exponential moving average of the weights, used for sampling.

    The average lives beside the weights on their device and is updated in place each step (one
    fused lerp over all tensors): no host copy. Under ZeRO-3 each rank averages only its own
    partition of every parameter, so nothing is gathered per step; :meth:`full_state` gathers the
    averaged partitions when the weights are exported. The decay warms up as (1 + n) / (10 + n),
    so short runs are not dominated by the random initialisation. A decay of 0 turns it off (the
    EMA is the last weights).
    """

    def __init__(self, decay: float):
        self.decay, self.updates, self.shadow = decay, 0, {}

    @staticmethod
    def _sources(module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Every state-dict entry, or under ZeRO-3 this rank's partition of it."""
        return {name: getattr(value, "ds_tensor", value).detach()
                for name, value in module.state_dict(keep_vars=True).items()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        self.updates += 1
        sources = self._sources(module)
        if not self.shadow:
            self.shadow = {name: value.float().clone() if value.is_floating_point() else value.clone()
                           for name, value in sources.items()}
            return
        for name, value in sources.items():  # a resumed state comes back on the CPU
            if self.shadow[name].device != value.device:
                self.shadow[name] = self.shadow[name].to(value.device)
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        floats = [name for name, value in sources.items() if value.is_floating_point()]
        torch._foreach_lerp_([self.shadow[n] for n in floats], [sources[n].float() for n in floats], 1 - d)
        for name in sources.keys() - set(floats):
            self.shadow[name].copy_(sources[name])

    def full_state(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The averaged weights as a full state dict on the CPU. Under ZeRO-3 every rank must call
        it: each lends its averaged partitions to one all-gather (the weights are put back after)."""
        entries = module.state_dict(keep_vars=True)
        sharded = [(name, value) for name, value in entries.items() if hasattr(value, "ds_tensor")]
        if not sharded:
            return {name: value.detach().cpu().clone() for name, value in self.shadow.items()}
        import deepspeed

        trained = {name: value.ds_tensor.data for name, value in sharded}
        try:
            for name, value in sharded:
                value.ds_tensor.data = self.shadow[name].to(value.ds_tensor.dtype)
            with deepspeed.zero.GatheredParameters([value for _, value in sharded]):
                return {name: (value.detach().float() if name in trained else self.shadow[name]).cpu().clone()
                        for name, value in entries.items()}
        finally:
            for name, value in sharded:
                value.ds_tensor.data = trained[name]

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.updates, self.shadow = state["decay"], state["updates"], state["shadow"]


def _report_with_checkpoint(engine, ema: EMA, metrics: dict, final: bool, rank: int) -> None:
    """Every rank saves its DeepSpeed shard (with its EMA); rank 0 adds the full EMA weights for sampling."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        engine.save_checkpoint(tmp, tag="ckpt", client_state={"step": metrics["step"], "ema": ema.state_dict()})
        if final:
            weights = ema.full_state(engine.module)  # a collective under ZeRO-3: every rank takes part
            if rank == 0:
                torch.save(weights, os.path.join(tmp, WEIGHTS_FILE))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


@dataclass
class LevelResult:
    level: int
    model: UViT
    final_loss: float
    checkpoint_path: str


def train_level(cfg: Config, level: int, data: LevelData, run_name: str, mlflow_run: dict | None = None) -> LevelResult:
    """Fit one level with a TorchTrainer; returns the trained model (weights on CPU). ``run_name``
    must be stable across retries so a retried trial resumes."""
    text = data.text if cfg.model.text_encoder else None
    if cfg.model.text_encoder and text is None:
        raise ValueError(f"model.text_encoder={cfg.model.text_encoder!r} but the level data has no caption bank: "
                         "put nds.latents.text.prepare_text_condition(cfg, class_names, captions) in LevelData.text")
    loop_config = {
        "config": to_dict(cfg),
        "level": level,
        "targets": data.latents[level],
        "condition": data.latents[level + 1] if level < cfg.hierarchy.L else None,
        "labels": data.labels,
        "text": text,
        "mlflow": mlflow_run,
    }
    result = fit(cfg, train_loop, loop_config, run_name, what=f"training level {level}")
    model = load_ema_weights(build_level_model(cfg, level), result)
    return LevelResult(level, model, float(result.metrics["loss"]), result.checkpoint.path)


def fit(cfg: Config, loop, loop_config: dict, run_name: str, what: str):
    """Run ``loop`` on a TorchTrainer sized by ``cfg.resources``; the Ray Train result.

    Runs are kept under ``<runs_dir>/ray_results/<run_name>``: a fit that names a run seen
    before resumes from its last checkpoint.
    """
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    marker = cfg.runs_dir / "ray_results" / run_name / NONFINITE_FILE
    marker.unlink(missing_ok=True)
    loop_config = {**loop_config, "nonfinite_marker": str(marker)}
    r = cfg.resources
    use_gpu = r.gpus_per_worker > 0
    resources = {"CPU": r.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = r.gpus_per_worker
    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=r.workers_per_level, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=run_name,
            storage_path=str(cfg.runs_dir / "ray_results"),
            failure_config=FailureConfig(max_failures=cfg.training.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            # Ray Train's INFO lines (resources requested, worker group started) stay in Ray's session logs;
            # the console gets the fit's own progress lines
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    result = trainer.fit()
    if result.error:
        raise RuntimeError(f"{what} failed: {result.error}") from result.error
    if marker.is_file():
        seen = json.loads(marker.read_text())
        raise NonFiniteLoss(f"{what}: the training loss became non-finite at step {seen['step']} (stopped at step "
                            f"{seen['stopped']}; no weights after its last checkpoint are kept; try a lower "
                            "training.lr, more training.warmup_steps or training.precision=fp32)")
    return result


def load_ema_weights(model: torch.nn.Module, result) -> torch.nn.Module:
    """``model`` (on CPU, in eval mode) with the EMA weights of the result's final checkpoint."""
    with result.checkpoint.as_directory() as ckpt_dir:
        path = Path(ckpt_dir) / WEIGHTS_FILE
        if not path.exists():
            raise FileNotFoundError(f"checkpoint {result.checkpoint.path} has no {WEIGHTS_FILE}")
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()
