"""One typed config tree: the single source of truth for a run.

It is read from YAML plus ``key=value`` overrides (``nds.config.loading``), validated by pydantic
before any Ray worker starts, flattened into MLflow params, and hashed to key caches. Every key has
its type, default, constraints and a one-line description here; ``nds.config.reference`` prints them
(``--help-config``) and writes docs/configuration.md and the JSON Schema from them. Unknown keys and
values of the wrong type or range are errors that name the key.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union, get_args, get_origin

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from nds.config.errors import ConfigError
from nds.config.loading import SOURCE_SCALARS, merge, parse_overrides, plain, read_config_file
from nds.config.specs import (
    BAD_IMAGE_POLICIES,
    BASELINES,
    COND_INJECTIONS,
    DATASETS,
    DOWNSAMPLE_MODES,
    ENCODERS,
    LEVEL1_SOURCES,
    PRECISIONS,
    PREDICTIONS,
    REFERENCE_SPLITS,
    SAMPLERS,
    SCHEDULES,
    TEXT_ENCODERS,
    UVIT_SIZES,
    LevelShape,
    baseline_phases,
    check_nesting,
    latent_spec,
    mdm_spec,
    parse_spec,
    patch_size_for,
)

REPO_ROOT = Path(__file__).resolve().parents[2]

# Each enum once: Literal types built from the names nds.config.specs holds for the implementations.
Dataset = Literal[DATASETS]
BadImagePolicy = Literal[BAD_IMAGE_POLICIES]
EncoderName = Literal[ENCODERS]
Level1Source = Literal[LEVEL1_SOURCES]
UViTSize = Literal[tuple(UVIT_SIZES)]
TextEncoder = Literal[TEXT_ENCODERS]
CondInjection = Literal[COND_INJECTIONS]
Schedule = Literal[SCHEDULES]
Prediction = Literal[PREDICTIONS]
Sampler = Literal[SAMPLERS]
Precision = Literal[PRECISIONS]
ReferenceSplit = Literal[REFERENCE_SPLITS]
DownsampleMode = Literal[DOWNSAMPLE_MODES]
Baseline = Literal[BASELINES]

NonNegative = Annotated[float, Field(ge=0)]
Probability = Annotated[float, Field(ge=0, lt=1)]
Seed = Annotated[int, Field(ge=0, lt=2**32)]  # numpy's and torch's seeds are unsigned 32-bit
PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]

PATH = {"x-nds-path": True}  # json_schema_extra of a path key: ~ and $VAR / ${VAR} are expanded
_ENV_VAR = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


def expand_path(text: str) -> str:
    """``~`` and ``$VAR`` / ``${VAR}`` expanded; an unset variable is an error naming it."""
    def var(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        if name not in os.environ:
            raise ValueError(f"environment variable ${name} is not set")
        return os.environ[name]

    return os.path.expanduser(_ENV_VAR.sub(var, text))


def _accepts_str(annotation) -> bool:
    """Whether a field of this type takes a string (so a YAML number is kept as its text)."""
    if annotation is str:
        return True
    if get_origin(annotation) is Literal:
        return any(isinstance(a, str) for a in get_args(annotation))
    if get_origin(annotation) in (Union, Annotated) or type(annotation).__name__ == "UnionType":
        return any(_accepts_str(a) for a in get_args(annotation) if a is not type(None))
    return False


def _optional(annotation) -> bool:
    return (get_origin(annotation) is Union or type(annotation).__name__ == "UnionType") and \
        type(None) in get_args(annotation)


def _item_type(annotation):
    """The item type of a list type (through Optional / Annotated), or None."""
    if get_origin(annotation) is list:
        return get_args(annotation)[0]
    if get_origin(annotation) in (Union, Annotated) or type(annotation).__name__ == "UnionType":
        for arg in get_args(annotation):
            item = _item_type(arg)
            if item is not None:
                return item
    return None


def as_field_value(annotation, value):
    """A value read from YAML as the field's type wants it: a number keeps its text where the type is a
    string; "" is null where the type is optional (an empty path or name meant "the default")."""
    if isinstance(value, SOURCE_SCALARS):
        return value.source if _accepts_str(annotation) else plain(value)
    if value == "" and _optional(annotation):
        return None
    item = _item_type(annotation)
    if item is not None and isinstance(value, list):
        return [as_field_value(item, v) for v in value]
    return value


def ray_address_problem(address: str) -> str:
    """Why Ray could not join ``address`` as written ("" if it could): ``auto``, ``host:port`` or
    ``ray://host:port``. ``localhost`` alone, say, made ray.init retry for minutes."""
    if address == "auto":
        return ""
    rest = address[len("ray://"):] if address.startswith("ray://") else address
    host, sep, port = rest.rstrip("/").rpartition(":")
    if "://" in rest or not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return ("not a Ray address: give auto, host:port (the head's GCS, e.g. 10.0.0.1:6379) or ray://host:port "
                "(Ray Client), or leave it empty for a local instance")
    return ""


_URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def tracking_uri_problem(uri: str) -> str:
    """Why ``uri`` is not an MLflow tracking URI ("" if it is): it must say its scheme, e.g.
    http://host:5000, sqlite:///path/mlflow.db, databricks."""
    looks_like_host = re.match(r"^[\w.-]+:\d+(/.*)?$", uri)  # localhost:5000, not a scheme
    if uri == "databricks" or (_URI_SCHEME.match(uri) and not looks_like_host):
        if uri.startswith(("http://", "https://")) and not uri.split("://", 1)[1].strip("/"):
            return "names no host"
        return ""
    example = f"http://{uri}" if looks_like_host else f"sqlite:///{uri}"
    return f"no scheme: write the URI in full (e.g. {example}), or leave it empty for the sqlite store under paths.runs_dir"


def _refuse(problem_of) -> AfterValidator:
    """A field check from a function that says what is wrong with a value ("" when nothing is)."""
    def check(value):
        problem = problem_of(value) if value is not None else ""
        if problem:
            raise ValueError(problem)
        return value

    return AfterValidator(check)


class Section(BaseModel):
    """A config section: strict types (no "3" for 3, no 1.5 for an int), finite numbers, no unknown keys."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _yaml_scalars(cls, value, info: ValidationInfo):
        return as_field_value(cls.model_fields[info.field_name].annotation, value)

    @field_validator("*", mode="after")
    @classmethod
    def _paths(cls, value, info: ValidationInfo):
        extra = cls.model_fields[info.field_name].json_schema_extra
        if isinstance(value, str) and isinstance(extra, dict) and extra.get("x-nds-path"):
            return expand_path(value)
        return value


class DataConfig(Section):
    """The images: which dataset, where, how many."""

    name: Dataset = Field("fashion_mnist", description="dataset: an image_folder is ImageNet's train/ + val/ layout")
    root: str = Field("/usr/share/datasets/fashion-mnist", json_schema_extra=PATH,
                      description="where the dataset lies (fashion_mnist: the IDX files; digits ships with scikit-learn)")
    train_limit: Optional[Annotated[int, Field(ge=2)]] = Field(
        3000, description="images of the training split used, 2+ for the levels' SVD (null: all)")
    eval_limit: Optional[Annotated[int, Field(ge=2)]] = Field(
        500, description="held-out images: the metric's reference and the diagnostic's (null: all)")
    image_size: Optional[PositiveInt] = Field(
        None, description="image_folder/coco2014: resize to this (null: the level-1 size, x8 for encoder.level1=vae)")
    captions: Optional[str] = Field(None, json_schema_extra=PATH,
                                    description="coco2014: folder of captions_{train,val}2014.json (null: <root>/annotations)")
    bad_images: BadImagePolicy = Field("fail", description="a file that does not decode: fail (naming it) | skip (count, leave out)")


class EncoderConfig(Section):
    """The frozen encoder whose features, pooled and SVD-reduced, are the levels z_2.. of the hierarchy."""

    name: EncoderName = Field("efficientnet_lite0", description="the frozen encoder (Table 4a's choices)")
    weights: Optional[str] = Field(None, json_schema_extra=PATH,
                                   description="a local weights file, or random (null: what ships with the package or the cache)")
    image_size: PositiveInt = Field(128, description="encoder input resolution (px)")
    batch_size: PositiveInt = Field(256, description="images per encoder forward pass")
    bf16: bool = Field(False, description="extract in bf16 (pays only on CPUs/GPUs with bf16 matrix units)")
    cache_dir: Optional[str] = Field(None, json_schema_extra=PATH,
                                     description="where downloaded weights are cached (null: the standard HF / torch hub caches)")
    parallel: bool = Field(False, description="extract features in Ray tasks (joins/starts Ray as the sweep does)")
    cpus_per_task: float = Field(1.0, gt=0, description="CPUs per Ray extraction task")
    shard_size: PositiveInt = Field(1024, description="images per feature-cache shard, and per Ray task")
    level1: Level1Source = Field("pixels", description="z_1: pixels (the image resized to level 1) | vae (AutoencoderKL codes)")
    level1_weights: Optional[str] = Field(
        None, json_schema_extra=PATH,
        description="level1=vae: AutoencoderKL .safetensors (null: HF cache of stabilityai/sd-vae-ft-mse)")


class HierarchyConfig(Section):
    """The chain's levels, level 1 (image space) first as the paper writes them."""

    spec: str = Field("28x28x1, 4x4x32, 2x2x16", description="level shapes HxWxC, level 1 (image space) first")
    L: PositiveInt = Field(2, description="depth: the first L levels of the spec are used")
    sigmas: list[NonNegative] = Field([0.5, 0.5], description="σ_2..σ_n: the noise on each conditioning copy ẑ_l")


class ModelConfig(Section):
    """Each level's U-ViT (nds/models/uvit.py)."""

    size: UViTSize = Field("tiny", description="U-ViT size: its width, depth and heads unless set below")
    width: Optional[PositiveInt] = Field(None, description="token width (null: from model.size)")
    depth: Optional[PositiveInt] = Field(None, description="transformer blocks, even (null: from model.size)")
    heads: Optional[PositiveInt] = Field(None, description="attention heads, dividing the width (null: from model.size)")
    max_token_grid: PositiveInt = Field(8, description="patch size is the smallest divisor keeping the token grid within this")
    num_classes: NonNegativeInt = Field(
        0, description="0 = unconditional; else class-conditional on the data's labels (its class count)")
    text_encoder: Optional[TextEncoder] = Field(
        None, description="captions as condition tokens: minilm (ships offline) | clip | t5 (null: no text)")
    text_encoder_path: Optional[str] = Field(None, json_schema_extra=PATH,
                                             description="local directory of the text encoder (null: minilm's packaged copy)")
    cond_injection: CondInjection = Field(
        "kv", description="how ẑ_{l+1} enters a level: kv (keys/values every two blocks) | tokens (joins the sequence)")
    qkv_bias: bool = Field(True, description="biases in the attention's q/k/v projection (U-ViT's configs: false)")
    mlp_time_embed: bool = Field(True, description="an MLP on the sinusoidal time embedding (U-ViT's configs: false)")


class DiffusionConfig(Section):
    """The Gaussian process, its loss and its sampler (every level; MDM's schedule too)."""

    timesteps: PositiveInt = Field(1000, description="diffusion steps T of the training process")
    schedule: Schedule = Field("linear", description="noise schedule")
    beta_start: float = Field(1e-4, gt=0, lt=1, description="β at t=0 (linear, scaled_linear), below beta_end")
    beta_end: float = Field(0.02, gt=0, lt=1, description="β at t=T (linear, scaled_linear)")
    cond_drop_prob: Probability = Field(0.5, description="conditions dropped this often in training (classifier-free guidance)")
    prediction: Prediction = Field("v", description="what every level regresses: v | eps (U-ViT and the paper: eps)")
    sampler: Sampler = Field("ddim", description="sampler of every level")
    sample_steps: PositiveInt = Field(25, description="sampling steps, at most diffusion.timesteps")
    cfg_scale: float = Field(3.0, ge=0, description="classifier-free guidance out_u + s·(out_c - out_u): 1 = none")
    eta: float = Field(0.0, ge=0, le=1, description="DDIM only: 0 deterministic, 1 DDPM-like")
    clip_images: bool = Field(True, description="clip the image level's predicted x0 to [-1, 1] while sampling")
    latent_clip: Optional[float] = Field(
        None, gt=0, description="clip a latent level's predicted x0 to ± this many training stds (null: no clipping)")


class TrainingConfig(Section):
    """How each level (or NestedUNet phase) is trained: Ray Train + DeepSpeed ZeRO, AdamW, EMA."""

    steps: PositiveInt = Field(300, description="optimiser steps per level")
    batch_size: PositiveInt = Field(64, description="images per step per worker")
    lr: float = Field(5e-3, gt=0, description="AdamW's peak learning rate")
    warmup_steps: NonNegativeInt = Field(50, description="linear warm-up steps to the peak learning rate")
    weight_decay: float = Field(0.03, ge=0, description="AdamW's decoupled weight decay")
    betas: list[Probability] = Field([0.9, 0.99], min_length=2, max_length=2, description="AdamW's (β1, β2)")
    grad_clip: float = Field(1.0, ge=0, description="gradient norm clip (0 = none)")
    ema_decay: Probability = Field(0.999, description="sampling uses these EMA weights (0 = the last weights)")
    zero_stage: int = Field(2, ge=0, le=3, description="DeepSpeed ZeRO stage")
    precision: Precision = Field("auto", description="auto (bf16 where a timed probe finds it faster) | bf16 | fp32")
    log_every: PositiveInt = Field(25, description="steps between logged losses")
    checkpoint_every: PositiveInt = Field(100, description="steps between checkpoints a restarted fit resumes from")
    max_failures: int = Field(1, ge=0, le=10,
                              description="retries of a failed fit or trial, from its last checkpoint (bounded: a "
                                          "repeating failure is not transient)")
    fail_once_at_step: Optional[PositiveInt] = Field(
        None, description="fault drill: raise once at this step to exercise resume (null: off)")
    nan_at_step: Optional[PositiveInt] = Field(
        None, description="fault drill: rank 0's loss is NaN at this step (null: off)")
    kill_worker_at_step: Optional[PositiveInt] = Field(
        None, description="fault drill: the last rank SIGKILLs itself at this step, once per fit (null: off)")


class ResourcesConfig(Section):
    """What Ray gives each fit, trial driver and evaluation shard, and the cluster to run on."""

    workers_per_level: PositiveInt = Field(1, description="Ray Train workers per fit (they set the global batch)")
    cpus_per_worker: float = Field(0.9, gt=0, description="CPUs per Train worker")
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs per Train worker (above 1: whole GPUs)")
    driver_cpus: float = Field(0.1, gt=0, description="CPUs held by each trial's driver")
    eval_workers: PositiveInt = Field(1, description="shards a trial samples and scores in (the same samples for any count)")
    eval_cpus_per_worker: float = Field(0.9, gt=0, description="CPUs per evaluation shard")
    eval_gpus_per_worker: float = Field(0.0, ge=0, description="GPUs per evaluation shard (above 1: whole GPUs)")
    max_concurrent_trials: PositiveInt = Field(2, description="trials of a stage that run at once")
    ray_address: Annotated[Optional[str], _refuse(ray_address_problem)] = Field(
        None, description="Ray cluster to join: auto | host:port | ray://host:port (null: RAY_ADDRESS, else a local instance)")
    level_lock_stale_s: float = Field(600.0, gt=0, description="a level trainer's lock heartbeat this old means it is stuck (s)")
    level_wait_s: Optional[float] = Field(
        None, gt=0, description="longest wait for a level another trial trains, in s (null: while its trainer lives)")


class EvalConfig(Section):
    """Sampling and scoring a trial: the quality metric, the data classifier, the chain diagnostic."""

    num_samples: Annotated[int, Field(ge=2)] = Field(500, description="samples scored per trial (a Fréchet distance needs 2+)")
    batch_size: PositiveInt = Field(250, description="samples per sampling batch")
    grid_size: PositiveInt = Field(8, description="samples per side of the logged sample grid")
    inception_dir: str = Field("/tmp", json_schema_extra=PATH,
                               description="clean-fid's cache of inception-2015-12-05.pt: true FID only if it is there")
    substitute_image_size: PositiveInt = Field(
        128, description="input size of the substitute metric's feature network (px)")
    data_classifier: bool = Field(True, description="also score fd_data_classifier, in a small CNN trained on the data's labels")
    classifier_steps: PositiveInt = Field(1000, description="the data classifier's training steps (batch 128; cached)")
    classifier_train_limit: Optional[PositiveInt] = Field(
        None, description="training images the data classifier learns from (null: the whole training split)")
    diagnostic_samples: NonNegativeInt = Field(
        160, description="held-out images of the chain diagnostic, 2+ (0 = off; L > 1 only)")
    reference_split: ReferenceSplit = Field("test", description="the metric's reference images: held-out (test) or training split")
    clip_dir: Optional[str] = Field(None, json_schema_extra=PATH,
                                    description="local CLIP model directory for the CLIP score (null: caption_class_accuracy)")


class SweepConfig(Section):
    """What the experiment scripts vary; each script reads the lists it sweeps. No list may repeat a value."""

    depths: list[PositiveInt] = Field([1, 2], description="sweep_sigma, sweep_depth: depths L")
    sigmas: list[NonNegative] = Field([0.0, 0.5, 1.0], description="sweep_sigma: values of σ_L")
    cfg_scales: list[NonNegative] = Field(
        [], description="sweep_sigma, sweep_mdm: guidance scales tried at each setting (empty: diffusion.cfg_scale)")
    seeds: list[Seed] = Field([0], min_length=1, description="every sweep: results are mean ± std over these")
    reuse_finished: bool = Field(True, description="a trial whose finished MLflow run (same trial key) exists is reused")
    carry_best_sigma: bool = Field(True, description="sweep_sigma: depth L+1 uses the best σ_L found at depth L")
    shapes: list[str] = Field([], description="sweep_shapes: whole hierarchy.spec strings")
    encoders: list[EncoderName] = Field([], description="sweep_encoders: encoder.name values (Table 4a)")
    encoder_specs: list[Optional[str]] = Field(
        [], description="sweep_encoders: per encoder a hierarchy.spec, null for hierarchy.spec (empty: all null)")
    rcg_encoder: EncoderName = Field("rcg_moco_v3", description="sweep_rcg: the global-vector encoder (Table 4b)")
    rcg_spec: Optional[str] = Field(
        None, description="sweep_rcg: the spec with the global vector on top, e.g. 32x32x4, 1x1x256 (sweep_rcg needs it)")
    mdm_resolutions: list[list[PositiveInt]] = Field([], description="sweep_mdm: nested resolution lists (Fig. 8b)")
    mdm_phase_steps: list[list[NonNegativeInt]] = Field([], description="sweep_mdm: progressive schedules (Fig. 8a)")
    mdm_baselines: list[Baseline] = Field([], description="sweep_mdm: values of mdm.baseline to compare")


class TrackingConfig(Section):
    """Where runs are logged (MLflow)."""

    uri: Annotated[Optional[str], _refuse(tracking_uri_problem)] = Field(
        None, description="MLflow tracking URI with its scheme (null: MLFLOW_TRACKING_URI, else sqlite in paths.runs_dir)")
    experiment: Optional[str] = Field(
        None, description="MLflow experiment (null: nds-<script>; make_tables reads every nds-* experiment)")


class PathsConfig(Section):
    """Where a run writes."""

    runs_dir: str = Field("runs", json_schema_extra=PATH, description="everything a run writes (relative: to the repo root)")
    cache_dir: Optional[str] = Field(None, json_schema_extra=PATH, description="feature and data caches (null: <runs_dir>/cache)")
    levels_dir: Optional[str] = Field(None, json_schema_extra=PATH,
                                      description="trained-level store shared by every sweep (null: <runs_dir>/levels)")


class MDMConfig(Section):
    """Matryoshka Diffusion: one NestedUNet over all resolutions (nds/models/nested_unet.py); optimisation
    from training, the schedule and sampling from diffusion."""

    resolutions: list[PositiveInt] = Field([14, 28], min_length=1,
                                           description="innermost first, each a power-of-two multiple of the one before")
    channels: PositiveInt = Field(1, description="image channels: the data's (1 for Fashion-MNIST and digits, 3 for RGB)")
    core_widths: list[PositiveInt] = Field([32, 64], min_length=1, description="inner UNet widths, halving resolution between")
    core_blocks: PositiveInt = Field(1, description="residual blocks per core level")
    attention_levels: list[NonNegativeInt] = Field([], description="core levels with self-attention (the middle always has it)")
    stage_widths: list[PositiveInt] = Field([16], description="one width per outer resolution")
    stage_blocks: PositiveInt = Field(1, description="residual blocks per outer stage")
    heads: PositiveInt = Field(4, description="attention heads, dividing each attended core width")
    num_classes: NonNegativeInt = Field(
        0, description="0 = unconditional; else class-conditional on the data's labels (its class count)")
    cond_drop_prob: Probability = Field(0.1, description="labels or captions dropped this often in training, for guidance")
    snr_power: float = Field(2.0, ge=0, description="resolution r's SNR is the base schedule's times (r_base / r)^power")
    loss_weights: Optional[list[NonNegative]] = Field(None, description="one loss weight per resolution (null: all 1)")
    prediction: Prediction = Field("v", description="what the NestedUNet regresses: v | eps")
    phase_steps: list[NonNegativeInt] = Field(
        [200, 200], description="progressive training: phase i trains the i+1 innermost resolutions; 0 skips it")
    sampler: Sampler = Field("ddim", description="sampler of the NestedUNet")
    text_layers: NonNegativeInt = Field(2, description="with model.text_encoder: self-attention layers over the caption tokens")
    threshold: Optional[float] = Field(
        None, gt=0, le=1, description="dynamic thresholding of x0 at this percentile while sampling (null: off)")
    downsample: DownsampleMode = Field("bilinear", description="how the lower resolutions are formed: bilinear | area")
    baseline: Baseline = Field("nested", description="what is trained: nested | cascaded | plain | latent (MDM's LDM)")
    vae_weights: Optional[str] = Field(None, json_schema_extra=PATH,
                                       description="baseline=latent: the AutoencoderKL .safetensors (diffusers format)")
    latent_downsample: PositiveInt = Field(4, description="baseline=latent: the autoencoder's downsampling factor")
    latent_channels: PositiveInt = Field(3, description="baseline=latent: the autoencoder's code channels")


def _section(cls: type[Section]):
    return Field(default_factory=cls, description=cls.__doc__)


class Config(Section):
    """A whole run."""

    data: DataConfig = _section(DataConfig)
    encoder: EncoderConfig = _section(EncoderConfig)
    hierarchy: HierarchyConfig = _section(HierarchyConfig)
    model: ModelConfig = _section(ModelConfig)
    diffusion: DiffusionConfig = _section(DiffusionConfig)
    training: TrainingConfig = _section(TrainingConfig)
    resources: ResourcesConfig = _section(ResourcesConfig)
    eval: EvalConfig = _section(EvalConfig)
    sweep: SweepConfig = _section(SweepConfig)
    tracking: TrackingConfig = _section(TrackingConfig)
    paths: PathsConfig = _section(PathsConfig)
    mdm: MDMConfig = _section(MDMConfig)
    seed: Seed = Field(0, description="the run's seed (a sweep's trials take theirs from sweep.seeds)")

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        validate(self)
        return self

    # -- derived values, so no caller recomputes them --------------------------------
    @property
    def levels(self) -> list[LevelShape]:
        """The first L levels of the spec (level 1 = image space)."""
        return parse_spec(self.hierarchy.spec)[: self.hierarchy.L]

    def sigma(self, level: int) -> float:
        """σ of the conditioning copy ẑ_level (levels 2..L)."""
        return self.hierarchy.sigmas[level - 2]

    @property
    def uses_data_classifier(self) -> bool:
        """Whether runs are also scored with fd_data_classifier (it needs class labels: not COCO)."""
        return self.eval.data_classifier and self.data.name != "coco2014"

    @property
    def runs_dir(self) -> Path:
        path = Path(self.paths.runs_dir)
        return path if path.is_absolute() else REPO_ROOT / path

    @property
    def cache_dir(self) -> Path:
        return Path(self.paths.cache_dir) if self.paths.cache_dir else self.runs_dir / "cache"

    @property
    def levels_dir(self) -> Path:
        return Path(self.paths.levels_dir) if self.paths.levels_dir else self.runs_dir / "levels"

    def experiment_name(self, script: str) -> str:
        """The MLflow experiment of a run of ``script`` (e.g. sweep_sigma -> nds-sweep-sigma)."""
        return self.tracking.experiment or f"nds-{script.replace('_', '-')}"

    @property
    def tracking_uri(self) -> str:
        if self.tracking.uri:
            return self.tracking.uri
        return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{self.runs_dir / 'mlflow.db'}"


SECTIONS: dict[str, type[Section]] = {name: field.annotation for name, field in Config.model_fields.items()
                                       if isinstance(field.annotation, type) and issubclass(field.annotation, Section)}


# -- reading -----------------------------------------------------------------------------


def _field_at(loc: tuple) -> tuple[type[Section] | None, Any]:
    """(the section holding the field, the field's annotation) at a pydantic error location; list
    indices give the item type."""
    model, annotation = Config, Config
    for part in loc:
        if isinstance(part, int):
            annotation = _item_type(annotation) or annotation
            continue
        if not (isinstance(annotation, type) and issubclass(annotation, Section)) or part not in annotation.model_fields:
            return (annotation if isinstance(annotation, type) and issubclass(annotation, Section) else None), None
        model, annotation = annotation, annotation.model_fields[part].annotation
    return model, annotation


def dotted(loc: tuple) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p)) for i, p in enumerate(loc))


def _shown(value) -> str:
    if isinstance(value, SOURCE_SCALARS):
        return value.source
    return repr(value) if isinstance(value, str) else json.dumps(value) if isinstance(value, list) else str(value)


def _literal_values(annotation) -> list:
    if get_origin(annotation) is Literal:
        return list(get_args(annotation))
    for arg in get_args(annotation):
        values = _literal_values(arg)
        if values:
            return values
    return []


_NULL_MEANING = re.compile(r"\(null: ([^)]*)\)")


def _message(error: dict) -> str:
    """One pydantic error as a line that names the dotted key, the value given and what is allowed."""
    loc, kind, given = tuple(error["loc"]), error["type"], error.get("input")
    key = dotted(loc)
    section, annotation = _field_at(loc)
    if kind == "extra_forbidden":
        known = sorted(section.model_fields) if section else []
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f"did you mean '{dotted((*loc[:-1], close[0]))}'? " if close else ""
        anchors = "; a top-level key that only holds YAML anchors starts with x-" if len(loc) == 1 else ""
        return f"unknown config key '{key}' ({hint}known here: {', '.join(known)}{anchors})"
    if kind in ("model_type", "dict_type", "model_attributes_type"):
        return f"config section '{key or '<root>'}' must be a mapping of its keys, got {_shown(given)}"
    types = {"int_type": "an integer", "int_from_float": "an integer", "int_parsing": "an integer",
             "float_type": "a number", "float_parsing": "a number", "finite_number": "a finite number",
             "bool_type": "true or false", "bool_parsing": "true or false", "string_type": "a string",
             "list_type": "a list"}
    if kind in types:
        return f"config key '{key}' must be {types[kind]}, got {_shown(given)}"
    if kind == "literal_error":
        values = _literal_values(annotation)
        return f"{key}={_shown(given)} must be one of {values}" + (" or null" if _optional(annotation) else "")
    bounds = {"greater_than_equal": (">=", "ge"), "greater_than": (">", "gt"), "less_than_equal": ("<=", "le"),
              "less_than": ("<", "lt")}
    if kind in bounds:
        op, name = bounds[kind]
        field = section.model_fields.get(loc[-1]) if section and isinstance(loc[-1], str) else None
        meaning = _NULL_MEANING.search(field.description or "") if field is not None else None
        null = f" (or null: {meaning.group(1)})" if meaning and _optional(annotation) and not isinstance(loc[-1], int) else ""
        bound = error["ctx"][name]
        return f"{key}={_shown(given)} must be {op} {bound:g}{null}" if isinstance(bound, float) else \
            f"{key}={_shown(given)} must be {op} {bound}{null}"
    if kind in ("too_short", "too_long"):
        ctx = error.get("ctx", {})
        need = (f"at least {ctx['min_length']}" if kind == "too_short" else f"at most {ctx['max_length']}")
        return f"{key}={_shown(given)} must have {need} entries"
    if kind in ("value_error", "assertion_error"):
        text = str(error.get("ctx", {}).get("error", error["msg"]))
        return text if not key or text.startswith(key) else f"{key}={_shown(given)}: {text}"
    return f"config key '{key}': {error['msg']}, got {_shown(given)}"


def config_error(err: ValidationError) -> ConfigError:
    """pydantic's errors as one ConfigError line (several joined by '; ')."""
    return ConfigError("; ".join(dict.fromkeys(_message(e) for e in err.errors(include_url=False))))


def build(data: dict) -> Config:
    """A validated Config from a nested dict (YAML, overrides, ``to_dict`` output)."""
    if not isinstance(data, dict):
        raise ConfigError(f"config section '<root>' must be a mapping of sections, got {data!r}")
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise config_error(err) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file (and what it extends) <- overrides, then validated."""
    data = read_config_file(Path(path)) if path is not None else {}
    return build(merge(data, parse_overrides(overrides or [])))


def from_dict(data: dict) -> Config:
    """Rebuild a config from ``to_dict`` output (e.g. inside a Ray worker)."""
    return build(data)


def replace(cfg: Config, **dotted_keys) -> Config:
    """A validated copy with dotted keys changed: ``replace(cfg, **{"hierarchy.L": 1})``; values as JSON
    gives them (a tuple is a list)."""
    changes: dict = {}
    for key, value in dotted_keys.items():
        node, parts = changes, key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = json.loads(json.dumps(value))
    return build(merge(to_dict(cfg), changes))


# -- checking ----------------------------------------------------------------------------


def _check_unique(key: str, values: list, same=lambda v: v, shown=None, why: str = "") -> None:
    """A sweep list repeats no value: nor two values that are the same setting (``same``) or that
    name the same trial (``shown``: how a trial name prints them)."""
    seen: dict = {}
    for i, value in enumerate(values):
        form = json.dumps(same(value))
        if form in seen:
            j = seen[form]
            raise ConfigError(f"{key}[{i}] = {_shown(value)} repeats {key}[{j}] = {_shown(values[j])}: each entry "
                              f"of a sweep list is one setting{why}")
        seen[form] = i
    named: dict = {}
    for i, value in enumerate(values if shown else ()):
        form = shown(value)
        if form in named:
            j = named[form]
            raise ConfigError(f"{key}[{j}] = {_shown(values[j])} and {key}[{i}] = {_shown(value)} both print as {form} "
                              "in trial names, so their trials would share one name and one MLflow record: give "
                              "values that differ within 6 significant digits")
        named[form] = i


def trial_float(value: float) -> str:
    """How a swept number is written in a trial name (σ, guidance scale)."""
    return f"{value:g}"


def validate(cfg: Config) -> None:
    """Checks across keys, and those no field type states; raise ConfigError naming the key."""
    try:
        spec = parse_spec(cfg.hierarchy.spec)
        check_nesting(spec)
    except ValueError as err:
        raise ConfigError(f"hierarchy.spec '{cfg.hierarchy.spec}': {err}") from None
    for level, shape in enumerate(spec, start=1):
        try:
            patch = patch_size_for(shape.h, shape.w, cfg.model.max_token_grid)
        except ValueError as err:
            raise ConfigError(f"hierarchy.spec level {level} ({shape}) cannot be split into U-ViT patches "
                              f"(model.max_token_grid={cfg.model.max_token_grid}): {err}") from None
        above = spec[level] if level < len(spec) else None
        if cfg.model.cond_injection == "tokens" and above and (above.h > shape.h // patch or above.w > shape.w // patch):
            raise ConfigError(f"hierarchy.spec level {level + 1} ({above}) is finer than level {level}'s "
                              f"{shape.h // patch}x{shape.w // patch} token grid, which model.cond_injection=tokens "
                              "upsamples it to: use model.cond_injection=kv or a smaller model.max_token_grid patch")
    if not 1 <= cfg.hierarchy.L <= len(spec):
        raise ConfigError(f"hierarchy.L={cfg.hierarchy.L} must be between 1 and the {len(spec)} levels of hierarchy.spec")
    if len(cfg.hierarchy.sigmas) < len(spec) - 1:
        raise ConfigError(
            f"hierarchy.sigmas needs one σ per conditioning level (levels 2..{len(spec)}): "
            f"got {len(cfg.hierarchy.sigmas)}, need {len(spec) - 1}"
        )
    _validate_model(cfg)
    _validate_sweep(cfg, len(spec))
    r = cfg.resources
    for prefix in ("", "eval_"):
        gpus = getattr(r, f"{prefix}gpus_per_worker")
        if gpus > 1 and gpus != int(gpus):
            raise ConfigError(f"resources.{prefix}gpus_per_worker={gpus}: above 1 a worker takes whole GPUs")
    d = cfg.diffusion
    if d.beta_start >= d.beta_end:
        raise ConfigError(f"diffusion.beta_start={d.beta_start:g} must be below diffusion.beta_end={d.beta_end:g} "
                          "(β grows from t=0 to t=T)")
    if d.eta and d.sampler != "ddim":
        raise ConfigError(f"diffusion.eta={d.eta} is a DDIM setting; diffusion.sampler='{d.sampler}' does not take it")
    if d.sample_steps > d.timesteps:
        raise ConfigError(f"diffusion.sample_steps={d.sample_steps} must not exceed diffusion.timesteps={d.timesteps}")
    for key, sampler in (("diffusion.sampler", d.sampler), ("mdm.sampler", cfg.mdm.sampler)):
        if sampler == "dpm_solver++_fast" and d.sample_steps >= d.timesteps:
            raise ConfigError(f"diffusion.sample_steps={d.sample_steps} must be below diffusion.timesteps="
                              f"{d.timesteps} for {key}=dpm_solver++_fast (its grid has sample_steps + 1 points)")
    if cfg.eval.diagnostic_samples == 1:
        raise ConfigError("eval.diagnostic_samples=1: the diagnostic's Fréchet distances need 2 or more (0 = off)")
    _validate_mdm(cfg)


def _validate_model(cfg: Config) -> None:
    """The U-ViT's width, depth and heads as a level will be built: from model.size where not set."""
    m = cfg.model
    size = UVIT_SIZES[m.size]
    width, depth, heads = (getattr(m, k) or size[k] for k in ("width", "depth", "heads"))
    named = lambda k: f"model.{k}={getattr(m, k)}" if getattr(m, k) else f"model.size={m.size}'s {k} {size[k]}"  # noqa: E731
    if width % heads:
        raise ConfigError(f"{named('width')} is not a multiple of {named('heads')}: each attention head takes "
                          "width/heads channels")
    if depth % 2:
        raise ConfigError(f"{named('depth')} must be even: a U-ViT has depth/2 in-blocks and depth/2 out-blocks "
                          "joined by long skips")


def _validate_sweep(cfg: Config, levels: int) -> None:
    s = cfg.sweep
    for i, depth in enumerate(s.depths):
        if depth > levels:
            raise ConfigError(f"sweep.depths[{i}] = {depth} must be between 1 and the {levels} levels of hierarchy.spec")
    if s.encoder_specs and len(s.encoder_specs) != len(s.encoders):
        raise ConfigError(f"sweep.encoder_specs needs one spec (or null) per entry of sweep.encoders "
                          f"({len(s.encoders)}), got {len(s.encoder_specs)}")
    specs = [(f"sweep.shapes[{i}]", spec) for i, spec in enumerate(s.shapes)]
    specs += [(f"sweep.encoder_specs[{i}]", spec) for i, spec in enumerate(s.encoder_specs) if spec is not None]
    for key, spec in specs + ([("sweep.rcg_spec", s.rcg_spec)] if s.rcg_spec is not None else []):
        try:
            check_nesting(parse_spec(spec))
        except ValueError as err:
            raise ConfigError(f"{key} = '{spec}': {err}") from None
    normal_spec = lambda spec: ", ".join(map(str, parse_spec(spec)))  # noqa: E731
    _check_unique("sweep.depths", s.depths)
    _check_unique("sweep.sigmas", s.sigmas, shown=trial_float)
    _check_unique("sweep.cfg_scales", s.cfg_scales, shown=trial_float)
    _check_unique("sweep.seeds", s.seeds, why=" (a repeated seed is not a second sample of the spread)")
    _check_unique("sweep.shapes", s.shapes, same=normal_spec)
    _check_unique("sweep.encoders", s.encoders)
    _check_unique("sweep.mdm_resolutions", s.mdm_resolutions)
    _check_unique("sweep.mdm_phase_steps", s.mdm_phase_steps)
    _check_unique("sweep.mdm_baselines", s.mdm_baselines)


def _validate_mdm(cfg: Config) -> None:
    """The mdm section: the phase schedule against the resolutions, then the NestedUNet spec's own checks."""
    m = cfg.mdm
    res = m.resolutions
    for i in range(1, len(res)):
        ratio = res[i] // res[i - 1]
        if res[i] % res[i - 1] or ratio < 2 or ratio & (ratio - 1):
            raise ConfigError(f"mdm.resolutions[{i}] = {res[i]} is not a power-of-two multiple (>= 2x) "
                              f"of mdm.resolutions[{i - 1}] = {res[i - 1]}")
    if len(m.phase_steps) != len(res):
        raise ConfigError(f"mdm.phase_steps needs one entry per resolution in mdm.resolutions ({len(res)}; "
                          f"phase i trains the i+1 innermost), got {len(m.phase_steps)}")
    if m.phase_steps[-1] < 1:
        raise ConfigError("mdm.phase_steps: the last entry must be >= 1 (the last phase trains the full model)")
    if m.loss_weights is not None and len(m.loss_weights) != len(res):
        raise ConfigError(f"mdm.loss_weights needs one weight per resolution ({len(res)}) or null, "
                          f"got {len(m.loss_weights)}")
    try:
        mdm_spec(cfg).validate()
    except ValueError as err:  # names the spec field: core_widths, stage_widths, heads, ...
        raise ConfigError(f"mdm: {err}") from None
    try:
        baseline_phases(cfg, m.baseline)
    except ConfigError as err:
        raise ConfigError(f"mdm.baseline={m.baseline}: {err}") from None
    if m.baseline == "latent":
        if not m.vae_weights:
            raise ConfigError("mdm.baseline=latent needs mdm.vae_weights: the AutoencoderKL .safetensors whose codes "
                              "it models")
        if res[-1] % m.latent_downsample:
            raise ConfigError(f"mdm.latent_downsample={m.latent_downsample} must divide the top resolution {res[-1]}")
        try:
            latent_spec(cfg).validate()
        except ValueError as err:
            raise ConfigError(f"mdm.baseline=latent ({res[-1] // m.latent_downsample}px codes): {err}") from None


# -- writing -----------------------------------------------------------------------------


def to_dict(cfg: BaseModel) -> dict:
    return cfg.model_dump()


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)


def flatten(cfg: Config) -> dict[str, str]:
    """Flat, stable param names for MLflow (``model.width``, ``hierarchy.sigma.2``, ...); null is ""."""
    flat: dict[str, str] = {}

    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                flat[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, list) else "" if value is None else str(value)

    walk(to_dict(cfg), "")
    for level in range(2, cfg.hierarchy.L + 1):
        flat[f"hierarchy.sigma.{level}"] = str(cfg.sigma(level))
    for level, shape in enumerate(cfg.levels, start=1):
        flat[f"hierarchy.shape.{level}"] = str(shape)
    return flat


def config_hash(obj) -> str:
    """Stable short hash of a config (or any section / plain dict) to key caches and group runs."""
    data = to_dict(obj) if isinstance(obj, BaseModel) else obj
    blob = json.dumps(data, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
