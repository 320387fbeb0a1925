"""What a sweep will cost, before it runs (``experiments/<sweep>.py --plan``): its trials, the level
trainings left after the level store's dedup, training and sampling FLOPs from the models' own FLOP
counts, device-hours at a given throughput, and the schedule's length on a named cluster.

Neither Ray nor MLflow is started and no model is initialised: models are built on the meta
device and counted on empty CPU tensors. Training a step costs 3x the forward (backward ≈ 2x);
sampling costs one forward per solver step and sample, two under classifier-free guidance. Not
counted: the metric's feature network, data loading, the optimizer's elementwise update.
"""
from __future__ import annotations

import heapq
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nds.config import Config, ConfigError, to_dict
from nds.config.specs import baseline_phases
from nds.latents.text import MAX_CAPTION_TOKENS
from nds.models.uvit import forward_flops
from nds.sweep.level_store import ENTRY_FILE, level_id
from nds.sweep.mdm import trial_iterations
from nds.train.engine import build_level_model
from nds.train.mdm import forward_cost, phase_module


@dataclass(frozen=True)
class Training:
    """One model fit: a level of the store, or an MDM trial's phase."""
    key: str
    stage: str
    label: str
    flops: float
    devices: float  # devices it holds while it trains: workers × GPUs per worker (CPU configs: workers)
    stored: bool = False  # already in the level store: costs nothing


@dataclass(frozen=True)
class Sampling:
    """One trial's sampling, spread evenly over ``devices``: its evaluation shards."""
    trial: str
    stage: str
    flops: float
    devices: float = 1.0


@dataclass
class SweepPlan:
    stages: list[str]
    trials: list[str]
    trainings: list[Training] = field(default_factory=list)
    samplings: list[Sampling] = field(default_factory=list)
    concurrent_trials: int = 1
    notes: list[str] = field(default_factory=list)

    @property
    def to_train(self) -> list[Training]:
        return [t for t in self.trainings if not t.stored]


@dataclass(frozen=True)
class Throughput:
    """Achieved (not peak) TFLOP/s of one device, for training and for sampling."""
    device: str
    train_tflops: float
    sample_tflops: float

    @classmethod
    def parse(cls, text: str) -> "Throughput":
        """A JSON file as ``bench/bench_models.py --write-throughput`` writes it, or one number of TFLOP/s."""
        try:
            value = float(text)
        except ValueError:
            path = Path(text)
            if not path.is_file():
                raise ConfigError(f"--throughput {text!r}: neither a number of TFLOP/s nor a JSON file") from None
            d = json.loads(path.read_text())
            try:
                return cls(d["device"], float(d["train_tflops"]), float(d["sample_tflops"]))
            except KeyError as err:
                raise ConfigError(f"--throughput {path}: missing key {err} (needs device, train_tflops, "
                                  "sample_tflops)") from None
        if value <= 0:
            raise ConfigError(f"--throughput {text!r}: TFLOP/s must be positive")
        return cls("as given", value, value)


def parse_cluster(text: str) -> tuple[int, int]:
    """'NODESxGPUS' -> (nodes, devices per node)."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match or min(map(int, match.groups())) < 1:
        raise ConfigError(f"--cluster {text!r}: expected NODESxGPUS with both ≥ 1, e.g. 8x8")
    return int(match[1]), int(match[2])


# -- FLOPs of one forward ---------------------------------------------------------------------------


def _level_forward_flops(cfg: Config, level: int) -> float:
    """FLOPs of one forward of ``cfg``'s level (batch 1), with every condition it takes at its
    largest: class tokens, the full caption length, the condition tokens."""
    with torch.device("meta"):
        model = build_level_model(cfg, level)
    model = model.to_empty(device="cpu").eval()  # counted on CPU kernels (meta attention counts differently)
    h, w, c = model.input_shape
    inputs = {}
    if model.cond_shape:
        ch, cw, cc = model.cond_shape
        inputs["cond"] = torch.zeros(1, cc, ch, cw)
    if model.num_classes:
        inputs["labels"] = torch.zeros(1, dtype=torch.long)
    if model.text_dim:
        length = MAX_CAPTION_TOKENS
        inputs["text"], inputs["text_mask"] = torch.zeros(1, length, model.text_dim), torch.ones(1, length, dtype=torch.bool)
    return float(forward_flops(model, torch.zeros(1, c, h, w), torch.zeros(1), **inputs))


_FORWARD_FLOPS: dict[str, float] = {}


def level_forward_flops(cfg: Config, level: int) -> float:
    """:func:`_level_forward_flops`, counted once per architecture (seeds and σ do not change it)."""
    d = to_dict(cfg)
    key = json.dumps({"model": d["model"], "spec": cfg.hierarchy.spec, "L": cfg.hierarchy.L, "level": level},
                     sort_keys=True)
    if key not in _FORWARD_FLOPS:
        _FORWARD_FLOPS[key] = _level_forward_flops(cfg, level)
    return _FORWARD_FLOPS[key]


def _devices(cfg: Config) -> float:
    r = cfg.resources
    return r.workers_per_level * (r.gpus_per_worker or 1.0)


def _eval_devices(cfg: Config) -> float:
    r = cfg.resources
    return r.eval_workers * (r.eval_gpus_per_worker or 1.0)


def _global_batch(cfg: Config) -> int:
    return cfg.training.batch_size * cfg.resources.workers_per_level


# -- chains of U-ViT levels ---------------------------------------------------------------------------


def chain_sampling_flops(cfg: Config) -> float:
    """One trial's sampling: the scored chain and, below the top, the diagnostic's true- and
    null-condition columns (nds.eval.diagnostics)."""
    d, e, depth = cfg.diffusion, cfg.eval, cfg.hierarchy.L
    guided = d.cfg_scale != 1.0

    def level_cost(level: int, unguided: bool = False) -> float:
        conditioned = level < depth or cfg.model.num_classes or cfg.model.text_encoder
        passes = 2 if guided and conditioned and not unguided else 1
        return level_forward_flops(cfg, level) * d.sample_steps * passes

    chain = sum(level_cost(level) for level in range(1, depth + 1))
    total = e.num_samples * chain
    if depth > 1 and e.diagnostic_samples:
        held_out = cfg.data.eval_limit or e.num_samples  # eval_limit 0: the whole reference split
        n = min(e.diagnostic_samples, e.num_samples, held_out)
        for start in range(1, depth):
            below = sum(level_cost(level) for level in range(1, start))
            total += n * (level_cost(start) + below)  # true condition
            total += n * (level_cost(start, unguided=True) + below)  # null condition, unguided at its level
    return total


def plan_chain_sweep(stages: list[tuple[str, list[tuple[str, Config]]]]) -> SweepPlan:
    """``stages``: (stage name, [(trial name, trial config)]) in the order they run."""
    trainings: dict[str, Training] = {}
    plan = SweepPlan([name for name, _ in stages], [])
    for stage, trials in stages:
        for name, cfg in trials:
            plan.trials.append(name)
            plan.concurrent_trials = cfg.resources.max_concurrent_trials
            for level in range(1, cfg.hierarchy.L + 1):
                ident = level_id(cfg, level)
                if ident in trainings:
                    continue
                shape = cfg.levels[level - 1]
                above = f" given {cfg.levels[level]} at σ={cfg.sigma(level + 1):g}" if level < cfg.hierarchy.L else ""
                flops = 3 * level_forward_flops(cfg, level) * _global_batch(cfg) * cfg.training.steps
                stored = (cfg.levels_dir / ident / ENTRY_FILE).is_file()
                trainings[ident] = Training(ident, stage, f"level {level} {shape}{above}", flops, _devices(cfg), stored)
            plan.samplings.append(Sampling(name, stage, chain_sampling_flops(cfg), _eval_devices(cfg)))
    plan.trainings = list(trainings.values())
    return plan


# -- NestedUNet (MDM) trials --------------------------------------------------------------------------


def plan_mdm_sweep(stages: list[tuple[str, list[tuple[str, Config]]]]) -> SweepPlan:
    """An MDM trial fits its own phases (no level store); it samples at every evaluation point of its stage."""
    plan = SweepPlan([name for name, _ in stages], [])
    for stage, trials in stages:
        eval_at = sorted({n for _, cfg in trials for n in trial_iterations(cfg)})
        for name, cfg in trials:
            plan.trials.append(name)
            plan.concurrent_trials = cfg.resources.max_concurrent_trials
            baseline = cfg.mdm.baseline
            flops = 0.0
            for index, phase in enumerate(baseline_phases(cfg, baseline)):
                with torch.device("meta"):
                    net = phase_module(cfg, baseline, index)
                flops = forward_cost(net.to_empty(device="cpu"))[0] * 1e9
                plan.trainings.append(Training(f"{name}/phase{index}", stage, f"{name} phase {index} ({baseline})",
                                               3 * flops * _global_batch(cfg) * phase.steps, _devices(cfg)))
            conditional = bool(cfg.mdm.num_classes or cfg.model.text_encoder)
            guided = 2 if cfg.diffusion.cfg_scale != 1.0 and conditional else 1
            points = sum(n <= trial_iterations(cfg)[-1] for n in eval_at)
            curve = sum(2 if scale != 1.0 and conditional else 1 for scale in cfg.sweep.cfg_scales)  # Fig. 8c
            plan.samplings.append(Sampling(name, stage, (points * guided + curve) * cfg.eval.num_samples * flops
                                           * cfg.diffusion.sample_steps, _eval_devices(cfg)))
    plan.notes.append("MDM sampling counted with each trial's last model at every evaluation point "
                      "(and at every scale of sweep.cfg_scales: the guidance curve)")
    return plan


# -- hours and schedule -------------------------------------------------------------------------------


def device_hours(flops: float, tflops: float) -> float:
    return flops / (tflops * 1e12) / 3600


def _makespan(jobs: list[tuple[float, float]], capacity: float) -> float:
    """Hours to run (hours, devices) jobs on ``capacity`` devices, longest first, each starting as
    soon as enough devices are free (greedy list scheduling; a job wider than the cluster runs alone)."""
    now, free, running, end = 0.0, capacity, [], 0.0
    for hours, width in sorted(jobs, reverse=True):
        width = min(width, capacity)
        while free < width:
            finish, w = heapq.heappop(running)
            now, free = max(now, finish), free + w
        heapq.heappush(running, (now + hours, width))
        free -= width
        end = max(end, now + hours)
    return end


def schedule_hours(plan: SweepPlan, devices: int, throughput: Throughput) -> float:
    """Wall-clock hours: stages run one after another; inside one, the level trainings share the
    devices, then its trials sample, at most ``concurrent_trials`` at once, each over its evaluation
    devices."""
    total = 0.0
    for stage in plan.stages:
        fits = [(device_hours(t.flops, throughput.train_tflops) / t.devices, t.devices)
                for t in plan.to_train if t.stage == stage]
        samples = [(device_hours(s.flops, throughput.sample_tflops) / s.devices, s.devices)
                   for s in plan.samplings if s.stage == stage]
        widest = max((width for _, width in samples), default=1.0)
        total += _makespan(fits, devices) + _makespan(samples, min(devices, plan.concurrent_trials * widest))
    return total


def _si(flops: float) -> str:
    for unit, scale in (("EFLOP", 1e18), ("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if flops >= scale:
            return f"{flops / scale:.3g} {unit}"
    return f"{flops:.3g} FLOP"


def render(plan: SweepPlan, throughput: Throughput | None = None, cluster: tuple[int, int] | None = None) -> str:
    """The plan as the console shows it."""
    stored = len(plan.trainings) - len(plan.to_train)
    train_flops = sum(t.flops for t in plan.to_train)
    sample_flops = sum(s.flops for s in plan.samplings)
    lines = [f"{len(plan.trials)} trials in {len(plan.stages)} stage(s); {len(plan.trainings)} distinct model fits, "
             f"{len(plan.to_train)} to train ({stored} already in the level store)",
             "", "| stage | fit | train FLOPs | devices |", "|---|---|---|---|"]
    lines += [f"| {t.stage} | {t.label}{' (stored)' if t.stored else ''} | {_si(0 if t.stored else t.flops)} | "
              f"{t.devices:g} |" for t in plan.trainings]
    lines += ["", f"training: {_si(train_flops)}; sampling and diagnostics: {_si(sample_flops)} "
                  f"({_si(sample_flops / max(1, len(plan.samplings)))} per trial)"]
    if throughput is None:
        lines.append("device-hours: give --throughput (achieved TFLOP/s, or the JSON that "
                     "bench/bench_models.py --write-throughput writes)")
    else:
        train_h = device_hours(train_flops, throughput.train_tflops)
        sample_h = device_hours(sample_flops, throughput.sample_tflops)
        lines.append(f"at {throughput.train_tflops:g} / {throughput.sample_tflops:g} achieved TFLOP/s per device "
                     f"(train / sample; {throughput.device}): {train_h + sample_h:.3g} device-hours "
                     f"({train_h:.3g} training, {sample_h:.3g} sampling)")
        if cluster:
            nodes, per_node = cluster
            hours = schedule_hours(plan, nodes * per_node, throughput)
            length = f"{hours:.3g} h" if hours >= 1 else f"{math.ceil(hours * 60):d} min"
            lines.append(f"on {nodes} x {per_node} devices: about {length} wall-clock (stages in sequence, "
                         "fits packed longest first, then the stage's sampling)")
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)
