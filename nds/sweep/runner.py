"""Ray Tune sweeps: a sweep is an MLflow run holding stages; a stage is one Tune run over variants;
each trial is a small driver that gets its chain's levels from the level store (training the
missing ones on Ray Train + DeepSpeed, concurrently), samples, scores and closes its MLflow run.

A ``Variant`` (a name, a seed and ``changes``: dotted config keys) is applied to the
sweep's base config, so every experiment script only says which configs to compare.

The modules that load torch (latents, evaluation, training) are imported inside the functions that
run a stage, each marked "torch": the CLI imports this module to check a config and print a plan,
which needs none of them (importing torch costs ~1.4 s per command).
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nds import tracking
from nds.config import Config, ConfigError, config_hash, flatten, from_dict, replace, to_dict, to_yaml
from nds.sweep.preflight import preflight
from nds.sweep.runtime import extensions_dir, init_ray, unplaceable
from nds.tracking import RunKind, Tag
from nds.train.inputs import LevelData

TRIAL_ERROR = "nds_error"  # a trial that failed in a way a retry would repeat reports its error under this key

# Config sections that say where and how a run is executed or logged, not what it computes.
_NOT_THE_EXPERIMENT = ("paths", "tracking", "resources", "sweep")


@dataclass(frozen=True)
class Variant:
    """One setting of a stage at one seed: ``changes`` (dotted config keys -> values) applied to the
    sweep's base config. Its name, without the seed, is the trial's ``nds.variant`` tag."""

    name: str
    seed: int
    changes: dict = field(default_factory=dict)


def variant(name: str, seed: int, **changes) -> Variant:
    return Variant(name, seed, changes)


def trial_config(cfg: Config, v: Variant) -> Config:
    return replace(cfg, **v.changes, seed=v.seed)


def trial_name(v: Variant) -> str:
    return f"{v.name}-seed{v.seed}"


def experiment_hash(cfg: Config, with_seed: bool = True) -> str:
    """Identity of what a trial computes: equal hashes are the same experiment (``with_seed=False``:
    the same setting, so its seeds are averaged)."""
    d = {k: v for k, v in to_dict(cfg).items() if k not in _NOT_THE_EXPERIMENT and (with_seed or k != "seed")}
    return config_hash(d)


def preflight_trials(cfg: Config, variants: list[Variant], check_files: bool = True, kind: str = "chain",
                     earlier: list[Variant] = ()) -> list[Config]:
    """Every trial's config, validated, with the files of each distinct setting checked (unless
    ``check_files`` is off: a plan made before the data is at hand), before any compute is spent; no
    two trials (nor one of ``earlier``, the sweep's trials so far) share a name. ``kind``: what the
    trials train (``TrialKind.name``)."""
    check_trial_names([*earlier, *variants])
    configs = [trial_config(cfg, v) for v in variants]
    for distinct in {experiment_hash(c, with_seed=False): c for c in configs}.values() if check_files else ():
        preflight(distinct, kind)
    return configs


def check_trial_names(variants: list[Variant]) -> None:
    """A trial's name is its MLflow run's and its identity in a sweep (an earlier attempt of the same name
    is closed as abandoned): two trials of one name would take each other's records."""
    seen: dict[str, Variant] = {}
    for v in variants:
        name = trial_name(v)
        if name in seen:
            raise ConfigError(f"two trials of the sweep are named {name} ({seen[name].changes} and {v.changes}): "
                              "the sweep.* lists give the same setting twice, or settings that print alike")
        seen[name] = v


# -- what a trial does ---------------------------------------------------------------------------


@dataclass
class TrialReport:
    metrics: dict[str, float]
    artifacts: list[Path] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class TrialKind:
    """How one kind of experiment prepares shared inputs in the driver and runs a trial.

    ``prepare(sweep, configs)`` returns the kind's inputs (a frozen dataclass of Ray object refs and
    small values: ``ChainInputs``, ``nds.sweep.mdm.MDMInputs``) shared by the stage's trials;
    ``run(cfg, inputs, mlflow_run, trial_dir)`` returns the trial's TrialReport.
    """

    prepare: Callable[["Sweep", list[Config]], Any]
    run: Callable[[Config, Any, dict, Path], TrialReport]
    name: str  # in the trial key: two kinds never share results


def trial_key(cfg: Config, kind: TrialKind, metric: str) -> str:
    """What a trial computes and reports: the experiment (seed included), the workers per fit (they set
    the global batch), the kind, the quality metric and the guidance scales it is scored at. A finished
    trial run with this key is reused, not run again."""
    return config_hash({"experiment": experiment_hash(cfg), "workers": cfg.resources.workers_per_level,
                        "kind": kind.name, "metric": metric, "cfg_scales": cfg.sweep.cfg_scales})


def data_key(cfg: Config) -> str:
    """What a chain's inputs depend on: the data, the encoders, the whole spec and the text encoder."""
    d = to_dict(cfg)
    text = {k: d["model"][k] for k in ("text_encoder", "text_encoder_path")}
    return config_hash({"data": d["data"], "encoder": d["encoder"], "spec": cfg.hierarchy.spec, "text": text})


def metric_key(cfg: Config) -> str:
    """What the metric's state (reference statistics, data classifier) depends on."""
    from nds.latents.prepare import image_size  # torch

    d = to_dict(cfg)
    return config_hash({"data": d["data"], "eval": d["eval"], "image_size": image_size(cfg)})


@dataclass(frozen=True)
class ChainData(LevelData):
    """A chain's inputs in the object store: what its level fits read, and the held-out latents and
    labels its diagnostic compares samples with."""

    held_out: Any = None  # ref of {level: float32 [M, c, h, w]}
    held_out_labels: Any = None  # ref of int64 [M]


@dataclass(frozen=True)
class ChainInputs:
    """What a stage of chain trials shares: each distinct hierarchy's data (by ``data_key``) and each
    metric setting's state (by ``metric_key``: reference statistics, data classifier, anchors)."""

    data: dict[str, ChainData] = field(default_factory=dict)
    metric: dict[str, dict] = field(default_factory=dict)


def prepare_chain_inputs(sweep: "Sweep", configs: list[Config]) -> ChainInputs:
    """Every distinct hierarchy the stage needs (feature cache: an encoder runs once per key) and,
    for text-conditional configs, its caption bank, in the object store; the metric's state (the
    reference statistics and the data classifier) per data and eval setting."""
    import ray

    from nds.eval.evaluate import prepare_metric  # torch
    from nds.latents.prepare import prepare_latents  # torch
    from nds.latents.text import prepare_text_condition  # torch

    inputs = ChainInputs()
    for cfg in configs:
        key = data_key(cfg)
        if key in inputs.data:
            continue

        def put_data(cfg=cfg):
            prepared = prepare_latents(cfg)
            bank = prepare_text_condition(cfg, prepared.class_names, prepared.captions)
            data = ChainData({lvl: ray.put(z) for lvl, z in prepared.latents.items()}, ray.put(prepared.labels),
                             ray.put(bank) if bank is not None else None, ray.put(prepared.held_out_latents),
                             ray.put(prepared.held_out_labels))
            return data, prepared.reference_images

        inputs.data[key], reference = sweep.memo(("data", key), put_data)
        inputs.metric[metric_key(cfg)] = sweep.memo(("metric", metric_key(cfg)),
                                                       lambda ref=reference, cfg=cfg: prepare_metric(cfg, ref))
    return inputs


def run_chain_trial(cfg: Config, inputs: ChainInputs, mlflow_run: dict, trial_dir: Path) -> TrialReport:
    """Obtain levels 1..L (all at once: each is independent given its frozen targets), sample and score
    them in ``resources.eval_workers`` shards, then evaluate."""
    import ray

    from nds.diffusion.chain import sample_batches  # torch
    from nds.eval.evaluate import evaluate_chain, merge_shards  # torch
    from nds.sweep.level_store import obtain_level  # torch
    from nds.train.engine import build_level_model  # torch

    data = inputs.data[data_key(cfg)]
    metric_state = inputs.metric[metric_key(cfg)]
    obtain = ray.remote(num_cpus=0)(obtain_level)
    obtained = ray.get([obtain.remote(cfg, level, data, mlflow_run) for level in range(1, cfg.hierarchy.L + 1)])
    entries = {o.level: o.entry for o in obtained}
    e = cfg.eval
    state = ray.put(metric_state)
    shards = sample_batches(e.num_samples, e.batch_size, cfg.resources.eval_workers)
    sampled = [on_eval_workers(cfg, eval_shard).remote(cfg, entries, state, firsts, data.text) for firsts in shards]
    diagnosed = None if cfg.hierarchy.L == 1 else on_eval_workers(cfg, eval_diagnostic).remote(
        cfg, entries, state, data.held_out, data.held_out_labels, data.text)
    samples = merge_shards(ray.get(sampled))
    models = {level: build_level_model(cfg, level) for level in entries}  # their costs: the weights stay in the shards
    text_bank = ray.get(data.text) if data.text is not None else None
    train_latents = {level: ray.get(data.latents[level]) for level in models}
    held_out = {level: z for level, z in ray.get(data.held_out).items() if level in models}
    report = evaluate_chain(cfg, models, samples, metric_state, trial_dir, text_bank, train_latents, held_out,
                            ray.get(diagnosed) if diagnosed else None)
    trained = sum(o.trained for o in obtained)
    metrics = {**report.metrics, "levels.trained": trained, "levels.reused": len(obtained) - trained,
               "eval.shards": len(shards)}
    metrics.update({f"level{o.level}/final_loss": o.entry.info["final_loss"] for o in obtained})
    tags = {}
    for o in obtained:  # the trial's link to the level-store entries it used
        tags[Tag.level(o.level)] = o.entry.level_id
        tags[Tag.level(o.level, "path")] = str(o.entry.path)
        tags[Tag.level(o.level, "trained_here")] = str(o.trained).lower()
    return TrialReport(metrics, report.artifacts, tags)


def eval_device(cfg: Config):
    """An evaluation task's device: its GPU when it is given one (``resources.eval_gpus_per_worker``)."""
    import torch

    return torch.device("cuda" if cfg.resources.eval_gpus_per_worker and torch.cuda.is_available() else "cpu")


def on_eval_workers(cfg: Config, task: Callable):
    """``task`` as a Ray remote function with an evaluation shard's resources, spread over the nodes."""
    import ray

    r = cfg.resources
    return ray.remote(num_cpus=r.eval_cpus_per_worker, num_gpus=r.eval_gpus_per_worker,
                      scheduling_strategy="SPREAD")(task)


def eval_models(cfg: Config, entries: dict):
    """An evaluation task's device and the chain's levels from the store on it."""
    from nds.sweep.level_store import load_level_model  # torch

    device = eval_device(cfg)
    return device, {level: load_level_model(cfg, entry).to(device) for level, entry in entries.items()}


def eval_shard(cfg: Config, entries: dict, metric_state: dict, firsts: list[int], text_bank=None):
    """One evaluation shard, a Ray task with the ``resources.eval_*`` resources: its batches of the
    chain's samples and their metric features (``nds.eval.evaluate.sample_shard``)."""
    from nds.eval.evaluate import sample_shard  # torch

    device, models = eval_models(cfg, entries)
    return sample_shard(cfg, models, metric_state, firsts, text_bank, device)


def eval_diagnostic(cfg: Config, entries: dict, metric_state: dict, held_out: dict, held_out_labels, text_bank=None):
    """The chain diagnostic's columns (``nds.eval.evaluate.diagnostic``), a Ray task beside the shards."""
    from nds.eval.evaluate import diagnostic  # torch

    _, models = eval_models(cfg, entries)
    return diagnostic(cfg, models, metric_state, {level: z for level, z in held_out.items() if level in models},
                      held_out_labels, text_bank)


CHAIN = TrialKind(prepare_chain_inputs, run_chain_trial, "chain")


def run_trial(params: dict, *, base: dict, kind: TrialKind, inputs: dict, ctx: dict) -> None:
    """One Tune trial; runs as a small Ray actor while its training runs on Ray Train workers."""
    import ray.tune

    from nds.train.engine import NonFiniteLoss  # torch

    v = params["variant"]
    cfg = trial_config(from_dict(base), v)
    try:
        report, run_id = _trial(cfg, v, kind, inputs, ctx)
    except NonFiniteLoss as err:  # deterministic: a Tune retry would only repeat it (the run is closed FAILED)
        ray.tune.report({TRIAL_ERROR: f"{type(err).__name__}: {err}"})
        return
    ray.tune.report({**report.metrics, "mlflow_run_id": run_id})


def _trial(cfg: Config, v: Variant, kind: TrialKind, inputs: dict, ctx: dict) -> tuple[TrialReport, str]:
    """The trial's MLflow run around ``kind.run``: (its report, the run id)."""
    import ray.tune

    uri = ctx["uri"]
    tracking.close_earlier_attempts(uri, ctx["experiment_id"], ctx["parent_run_id"], trial_name(v))
    with tracking.open_run(
        uri, ctx["experiment_id"], trial_name(v), params=flatten(cfg),
        tags={Tag.KIND: RunKind.TRIAL, Tag.SWEEP: ctx["sweep"], Tag.STAGE: ctx["stage"], Tag.VARIANT: v.name,
              Tag.CONFIG_HASH: experiment_hash(cfg), Tag.GROUP_HASH: experiment_hash(cfg, with_seed=False),
              Tag.METRIC: ctx["metric"], Tag.DRIVER: ctx["driver"],
              Tag.TRIAL_KEY: trial_key(cfg, kind, ctx["metric"])},
        parent_run_id=ctx["parent_run_id"],
    ) as run_id:
        trial_dir = Path(ray.tune.get_context().get_trial_dir())
        (trial_dir / "config.yaml").write_text(tracking.mask_credentials(to_yaml(cfg)))
        tracking.log_artifact(uri, run_id, trial_dir / "config.yaml")
        report = kind.run(cfg, inputs, {"uri": uri, "run_id": run_id}, trial_dir)
        tracking.log_metrics(uri, run_id, report.metrics)
        tracking.set_tags(uri, run_id, report.tags)
        for artifact in report.artifacts:
            tracking.log_artifact(uri, run_id, artifact)
    return report, run_id


# -- a sweep: stages of Tune runs under one MLflow run --------------------------------------------


def trial_lines(stage: str, total: int, metric: str):
    """A Tune callback that prints one line per trial as it ends: its name, how many of the stage's
    trials are done, the time so far, and its metric or its error."""
    from ray import tune

    class TrialLines(tune.Callback):
        def __init__(self) -> None:
            self.done, self.start = 0, time.monotonic()

        def _line(self, trial, outcome: str) -> None:
            self.done += 1
            minutes, seconds = divmod(int(time.monotonic() - self.start), 60)
            print(f"[nds] stage {stage}: trial {trial_name(trial.config['variant'])} {outcome} "
                  f"({self.done}/{total}, {minutes}:{seconds:02d})", flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            result = trial.last_result or {}
            error = result.get(TRIAL_ERROR)
            value = result.get(metric)
            self._line(trial, f"failed: {error}" if error else
                       f"finished, {metric} {value:.2f}" if isinstance(value, (int, float)) else "finished")

        def on_trial_error(self, iteration, trials, trial, **info) -> None:
            self._line(trial, "failed (see its MLflow run)")

    return TrialLines()


def level_counts(trials: list[dict]) -> dict[str, int]:
    """Level-store trainings and reuses summed over trials; empty when the trials do not use the
    store (an MDM trial trains its one model itself)."""
    if not any("levels.trained" in t["metrics"] for t in trials):
        return {}
    return {key: int(sum(t["metrics"].get(key, 0) for t in trials)) for key in ("levels.trained", "levels.reused")}


@dataclass
class StageOutcome:
    name: str
    run_id: str
    trials: list[dict]  # one per trial: variant, ok, metrics, error

    def count(self, metric: str) -> int:
        return int(sum(t["metrics"].get(metric, 0) for t in self.trials))


class Sweep:
    """One sweep: its MLflow run (stages nest under it), the Ray instance, inputs shared by stages.

    Use as a context manager: the sweep run ends FINISHED, or FAILED with the error.
    """

    def __init__(self, cfg: Config, name: str):
        import ray

        from nds.eval.metrics import quality_metric_name  # torch
        from nds.train.engine import prebuild_cpu_comm_op  # torch

        skipped_images = preflight(cfg)  # and the tracking server answers, as MLflow
        self.cfg, self.name = cfg, name
        self.uri = cfg.tracking_uri
        self.metric = quality_metric_name(cfg.eval.inception_dir, cfg.uses_data_classifier)
        self.experiment = cfg.experiment_name(name)
        self.experiment_id = tracking.prepare_experiment(self.uri, self.experiment, cfg.runs_dir / "mlartifacts")
        init_ray(cfg)
        problem = unplaceable(cfg, ray.nodes())
        if problem and not (cfg.resources.ray_address or os.environ.get("RAY_ADDRESS")):
            raise ConfigError(problem + ": this local Ray instance cannot grow, so the sweep would wait, not run")
        if problem:  # a cluster joined by address may still add nodes (an autoscaler)
            print(f"[nds] warning: {problem}; waiting for the cluster to add one", flush=True)
        if cfg.resources.gpus_per_worker == 0:  # before any Train worker starts: built once, not per worker
            prebuild_cpu_comm_op(extensions_dir(cfg))
        abandoned = tracking.close_abandoned_runs(self.uri, self.experiment_id)
        if abandoned:
            print(f"[nds] {abandoned} MLflow run(s) of a killed sweep driver closed as KILLED", flush=True)
        # the run is made last: nothing above can leave it RUNNING
        self.stamp = time.strftime("%Y%m%d-%H%M%S")
        self.driver = tracking.driver_id()
        self.run_id = tracking.start_run(self.uri, self.experiment_id, f"{name}-{self.stamp}", params=flatten(cfg),
                                         tags={Tag.KIND: RunKind.SWEEP, Tag.SWEEP: name, Tag.METRIC: self.metric,
                                               Tag.CONFIG_HASH: experiment_hash(cfg), Tag.DRIVER: self.driver})
        if skipped_images:  # data.bad_images=skip: what was left out, where the sweep is compared
            tracking.log_metrics(self.uri, self.run_id, {f"data.skipped_images.{split}": n
                                                         for split, n in skipped_images.items()})
        self.stages: list[StageOutcome] = []
        self._memo: dict = {}
        print(f"[nds] MLflow: {tracking.mask_credentials(self.uri)}  experiment '{self.experiment}'  sweep run "
              f"{self.run_id}\n[nds] see it: {tracking.ui_link(self.uri, self.experiment_id)}", flush=True)

    def __enter__(self) -> "Sweep":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            trials = [t for s in self.stages for t in s.trials]
            tracking.log_metrics(self.uri, self.run_id, {
                "trials.total": len(trials), "trials.failed": sum(not t["ok"] for t in trials),
                "trials.reused": sum("reused_run" in t for t in trials), **level_counts(trials)})
        tracking.end_run(self.uri, self.run_id, error=exc)

    def memo(self, key, compute):
        """A value computed once per sweep (latents in the object store, reference statistics)."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def stage(self, name: str, variants: list[Variant], cfg: Config | None = None, kind: TrialKind = CHAIN) -> StageOutcome:
        """Run ``variants`` of ``cfg`` (default: the sweep's config) as one Tune run; failed trials are recorded,
        and trials an earlier finished run already holds are reused, not run again."""
        cfg = cfg or self.cfg
        configs = preflight_trials(cfg, variants, kind=kind.name,
                                   earlier=[t["variant"] for stage in self.stages for t in stage.trials])
        with tracking.open_run(self.uri, self.experiment_id, f"{self.name}-{name}", params=flatten(cfg),
                               tags={Tag.KIND: RunKind.STAGE, Tag.SWEEP: self.name, Tag.STAGE: name,
                                     Tag.DRIVER: self.driver},
                               parent_run_id=self.run_id) as run_id:
            print(f"[nds] {self.name} stage {name}: {len(variants)} trials: "
                  f"{', '.join(trial_name(v) for v in variants)}", flush=True)
            reused = self.finished_elsewhere(variants, configs, kind)
            to_run = [(v, c) for v, c in zip(variants, configs) if trial_name(v) not in reused]
            ran = self._run_trials(name, run_id, cfg, kind, to_run) if to_run else {}
            trials = [reused.get(trial_name(v)) or ran[trial_name(v)] for v in variants]
            outcome = StageOutcome(name, run_id, trials)
            counts = level_counts(trials)
            tracking.log_metrics(self.uri, run_id, {"trials.total": len(trials), "trials.reused": len(reused),
                                                    "trials.failed": sum(not t["ok"] for t in trials), **counts})
            store = f"; levels trained {counts['levels.trained']}, reused {counts['levels.reused']}" if counts else ""
            again = f" ({len(reused)} reused from earlier runs)" if reused else ""
            print(f"[nds] stage {name}: {sum(t['ok'] for t in trials)}/{len(trials)} trials finished{again}{store}",
                  flush=True)
        self.stages.append(outcome)
        return outcome

    def finished_elsewhere(self, variants: list[Variant], configs: list[Config], kind: TrialKind) -> dict[str, dict]:
        """Trials (by name) whose result an earlier finished run of this experiment already holds
        (``sweep.reuse_finished``): a rerun after a crash, or a sweep that overlaps another."""
        if not self.cfg.sweep.reuse_finished:
            return {}
        done = tracking.finished_trials(self.uri, self.experiment_id)
        reused = {}
        for v, c in zip(variants, configs):
            found = done.get(trial_key(c, kind, self.metric))
            if found:
                run_id, metrics = found
                reused[trial_name(v)] = {"variant": v, "ok": True, "error": None, "reused_run": run_id,
                                         "metrics": {k: x for k, x in metrics.items() if not k.startswith("levels.")}}
        return reused

    def _run_trials(self, name: str, run_id: str, cfg: Config, kind: TrialKind,
                    to_run: list[tuple[Variant, Config]]) -> dict[str, dict]:
        """``to_run`` as one Tune run; its trials (variant, ok, metrics, error) by name."""
        from ray import tune

        variants = [v for v, _ in to_run]
        inputs = kind.prepare(self, [c for _, c in to_run])
        ctx = {"uri": self.uri, "experiment_id": self.experiment_id, "parent_run_id": run_id, "sweep": self.name,
               "stage": name, "metric": self.metric, "driver": self.driver}
        trainable = tune.with_parameters(run_trial, base=to_dict(cfg), kind=kind, inputs=inputs, ctx=ctx)
        tuner = tune.Tuner(
            tune.with_resources(trainable, {"cpu": cfg.resources.driver_cpus}),
            param_space={"variant": tune.grid_search(variants)},
            tune_config=tune.TuneConfig(max_concurrent_trials=cfg.resources.max_concurrent_trials),
            run_config=tune.RunConfig(
                name=f"{self.name}-{self.stamp}-{name}",
                storage_path=str(cfg.runs_dir / "ray_results"),
                failure_config=tune.FailureConfig(max_failures=cfg.training.max_failures),
                verbose=0,  # Tune's status tables; one line per finished trial instead (trial_lines)
                callbacks=[trial_lines(name, len(variants), self.metric)],
            ),
        )
        trials = {}
        for result in tuner.fit():
            reported = result.metrics or {}
            error = repr(result.error) if result.error else reported.get(TRIAL_ERROR)
            trials[trial_name(result.config["variant"])] = {
                "variant": result.config["variant"], "ok": error is None, "error": error,
                "metrics": {k: v for k, v in reported.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}}
        return trials

    def tag_stage(self, outcome: StageOutcome, tags: dict[str, str]) -> None:
        tracking.set_tags(self.uri, outcome.run_id, tags)


def mean_metric(outcome: StageOutcome, metric: str) -> dict[str, float]:
    """Mean of ``metric`` over seeds per variant name (finished trials only)."""
    values: dict[str, list[float]] = {}
    for t in outcome.trials:
        if t["ok"] and metric in t["metrics"]:
            values.setdefault(t["variant"].name, []).append(t["metrics"][metric])
    return {name: sum(v) / len(v) for name, v in values.items()}
