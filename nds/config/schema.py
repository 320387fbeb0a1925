"""One typed config tree: the single source of truth for a run.

It is read from YAML plus ``key=value`` overrides, validated before any Ray worker
starts, flattened into MLflow params, and hashed to key caches. Unknown keys and
values of the wrong type are errors that name the key.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from nds.config.errors import ConfigError
from nds.config.specs import (
    COND_INJECTIONS,
    DOWNSAMPLE_MODES,
    PREDICTIONS,
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
BAD_IMAGE_POLICIES = ("fail", "skip")  # data.bad_images


@dataclass
class DataConfig:
    name: str = "fashion_mnist"  # fashion_mnist | digits | image_folder (ImageNet-100 layout) | coco2014
    root: str = "/usr/share/datasets/fashion-mnist"
    train_limit: int = 3000  # images of the training split used (0 = all)
    eval_limit: int = 500  # reference images for the sample-quality metric (0 = all)
    image_size: int = 0  # image_folder/coco2014: resize to this (0 = the level-1 size; x8 for encoder.level1=vae)
    captions: str = ""  # coco2014: folder with captions_{train,val}2014.json (empty = <root>/annotations)
    bad_images: str = "fail"  # image_folder/coco2014 files that do not decode: fail (name them) | skip (count, leave out)


@dataclass
class EncoderConfig:
    name: str = "efficientnet_lite0"
    weights: str = ""  # local weights file; empty = what ships with the package / standard cache
    image_size: int = 128  # encoder input resolution
    batch_size: int = 256
    bf16: bool = False  # only pays on CPUs/GPUs with bf16 matrix units
    cache_dir: str = ""  # where downloaded weights are cached (empty = the standard HF / torch hub caches)
    parallel: bool = False  # extract features in Ray tasks (joins/starts Ray as the sweep does) instead of in-process
    cpus_per_task: float = 1.0  # CPUs per Ray extraction task
    shard_size: int = 1024  # images per feature-cache shard, and per Ray task
    level1: str = "pixels"  # z_1: pixels (image resized to level 1) | vae (AutoencoderKL latents, e.g. 256 px -> 32x32x4)
    level1_weights: str = ""  # level1=vae: AutoencoderKL .safetensors (empty = HF cache of stabilityai/sd-vae-ft-mse)


@dataclass
class HierarchyConfig:
    spec: str = "28x28x1, 4x4x32, 2x2x16"  # level 1 (image space) first, as the paper writes it
    L: int = 2  # depth: the first L levels of the spec are used
    sigmas: list[float] = field(default_factory=lambda: [0.5, 0.5])  # σ_2..σ_len(spec)


@dataclass
class ModelConfig:
    size: str = "tiny"  # tiny | small | mid | large (U-ViT sizes)
    width: int = 0  # 0 = from size
    depth: int = 0
    heads: int = 0
    max_token_grid: int = 8  # patch size is the smallest divisor keeping the token grid ≤ this
    num_classes: int = 0  # 0 = unconditional; >0 = class-conditional on the dataset labels
    text_encoder: str = ""  # "" = no text; minilm (ships offline) | clip | t5: captions as condition tokens
    text_encoder_path: str = ""  # local directory of the text encoder (empty = minilm's packaged copy)
    # how ẑ_{l+1} enters a level (§4.1; nds/models/uvit.py): kv = condition tokens that only supply keys/values
    # every two blocks; tokens = a channel-mixing deconvolution to the token grid and two FC layers make
    # condition tokens that join the sequence, refreshed every two blocks (the paper presets' reading)
    cond_injection: str = "kv"
    qkv_bias: bool = True  # U-ViT's configs: false
    mlp_time_embed: bool = True  # an MLP on the sinusoidal time embedding (U-ViT's configs: false)


@dataclass
class DiffusionConfig:
    timesteps: int = 1000
    schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    cond_drop_prob: float = 0.5
    # what every level regresses: v | eps (U-ViT, as the paper). Under ε a small level learns to ignore its
    # condition (it informs the high-noise steps, where the ε target is nearly x_t itself); v weighs those
    # steps in (README: "The nested gain at laptop scale")
    prediction: str = "v"
    sampler: str = "ddim"  # ddim | ddpm | dpm_solver | dpm_solver++ | dpm_solver++_fast (every level)
    sample_steps: int = 25
    cfg_scale: float = 3.0  # classifier-free guidance, out_u + s·(out_c - out_u): 1 = none; 3 measured best here
    eta: float = 0.0  # DDIM only: 0 deterministic, 1 DDPM-like
    clip_images: bool = True  # clip the image level's predicted x0 to [-1, 1] while sampling
    latent_clip: float = 0.0  # clip a latent level's predicted x0 to ± this many (training) stds (0 = off)


@dataclass
class TrainingConfig:
    steps: int = 300
    batch_size: int = 64  # per worker
    lr: float = 5e-3  # the tiny U-ViT learns too slowly at 2e-3 for a 300-step budget (samples stay noise)
    warmup_steps: int = 50
    weight_decay: float = 0.03
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])  # AdamW's (β1, β2)
    grad_clip: float = 1.0
    ema_decay: float = 0.999  # sampling uses the EMA weights (0 = the last weights)
    zero_stage: int = 2
    precision: str = "auto"  # auto (bf16 where a timed probe of the model finds it faster) | bf16 | fp32
    log_every: int = 25
    checkpoint_every: int = 100
    max_failures: int = 1  # worker restarts, resumed from the last checkpoint
    fail_once_at_step: int = 0  # fault drill: raise once at this step to exercise resume (0 = off)
    nan_at_step: int = 0  # fault drill: rank 0's loss is NaN at this step, to exercise non-finite detection (0 = off)
    kill_worker_at_step: int = 0  # fault drill: the last rank SIGKILLs itself at this step, once per fit (0 = off)


@dataclass
class ResourcesConfig:
    workers_per_level: int = 1
    cpus_per_worker: float = 0.9
    gpus_per_worker: float = 0.0
    driver_cpus: float = 0.1
    # A chain trial samples and scores in this many shards, Ray tasks of these resources spread over the
    # cluster (each shard its contiguous run of eval.batch_size batches; the same samples for any count)
    eval_workers: int = 1
    eval_cpus_per_worker: float = 0.9  # with the 0.1 CPU trial driver: a one-CPU node holds both
    eval_gpus_per_worker: float = 0.0
    max_concurrent_trials: int = 2
    ray_address: str = ""  # empty: join RAY_ADDRESS if set, else start a local instance
    level_lock_stale_s: float = 600.0  # a level's trainer whose lock heartbeat is this old is stuck: waiters stop
    level_wait_s: float = 0.0  # longest wait for a level another trial trains (0 = while its trainer lives)


@dataclass
class EvalConfig:
    num_samples: int = 500
    batch_size: int = 250
    grid_size: int = 8  # samples per side in the logged grid
    inception_dir: str = "/tmp"  # clean-fid's cache of inception-2015-12-05.pt; true FID only if it is there
    substitute_image_size: int = 128  # input size of the substitute metric's feature network
    # Also score fd_data_classifier: Fréchet distance in the features of a small CNN trained on the data's own
    # labelled training split (nds/eval/data_classifier.py); tables rank by it where FID is absent. Skipped for data
    # without class labels (COCO).
    data_classifier: bool = True
    classifier_steps: int = 1000  # its training steps (batch 128; ~2 min on 2 cores); trained once per data setting, cached
    classifier_train_limit: int = 0  # training images it learns from (0 = the whole training split)
    # The chain diagnostic (nds/eval/diagnostics.py), for L > 1: each level l < L is also sampled given the true
    # condition (held-out z_{l+1}) and the null one, on this many held-out images (0 = off). With guidance
    # the two columns cost 3/2 of the chain's level-1 sampling per image: 160 of 500 keeps them within +50%
    diagnostic_samples: int = 160
    # the metric's reference images: data.eval_limit images of the held-out split (test; an image folder's
    # test/ or val/) or of the training split (the nested paper's ImageNet-100 FID, "too few val images")
    reference_split: str = "test"
    # A local CLIP model directory (CLIPModel + processor, e.g. openai/clip-vit-base-patch16): text-conditional
    # samples get a CLIP score (MDM Fig. 8c); without it, caption_class_accuracy where captions name classes
    clip_dir: str = ""


@dataclass
class SweepConfig:
    """What the experiment scripts vary; each script reads the lists it sweeps."""

    depths: list[int] = field(default_factory=lambda: [1, 2])  # sweep_sigma, sweep_depth
    sigmas: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0])  # sweep_sigma: values of σ_L
    # sweep_sigma: guidance scales tried at every σ_L of depths L > 1 (empty: diffusion.cfg_scale only); the
    # best (σ_L, scale) pair is carried into depth L+1. Guidance only changes sampling: no extra level trainings
    cfg_scales: list[float] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0])  # every sweep: results are mean ± std over these
    reuse_finished: bool = True  # a trial whose finished MLflow run (same trial key) exists is reused, not rerun
    carry_best_sigma: bool = True  # sweep_sigma: depth L+1 uses the best σ_L found at depth L
    shapes: list[str] = field(default_factory=list)  # sweep_shapes: whole hierarchy.spec strings to compare
    encoders: list[str] = field(default_factory=list)  # sweep_encoders: encoder.name values (Table 4a)
    encoder_specs: list[str] = field(default_factory=list)  # sweep_encoders: per encoder a spec ("" = hierarchy.spec)
    rcg_encoder: str = "rcg_moco_v3"  # sweep_rcg: the global-vector encoder (Table 4b)
    rcg_spec: str = ""  # sweep_rcg: the spec with the global vector on top, e.g. "32x32x4, 1x1x256"
    mdm_resolutions: list[list[int]] = field(default_factory=list)  # sweep_mdm: nested resolution lists (Fig. 8b)
    mdm_phase_steps: list[list[int]] = field(default_factory=list)  # sweep_mdm: progressive schedules (Fig. 8a)
    mdm_baselines: list[str] = field(default_factory=list)  # sweep_mdm: values of mdm.baseline to compare


@dataclass
class TrackingConfig:
    uri: str = ""  # empty: MLFLOW_TRACKING_URI if set, else sqlite in paths.runs_dir
    experiment: str = ""  # empty: nds-<script>, e.g. nds-sweep-sigma (make_tables reads every nds-* experiment)


@dataclass
class PathsConfig:
    runs_dir: str = "runs"  # relative paths resolve against the repo root
    cache_dir: str = ""  # empty: <runs_dir>/cache
    levels_dir: str = ""  # trained-level store shared by every sweep (empty: <runs_dir>/levels)


@dataclass
class MDMConfig:
    """Matryoshka Diffusion: one NestedUNet over all resolutions (nds/models/nested_unet.py).

    The defaults fit Fashion-MNIST as it is: 14 -> 28, two levels, no padding. Images are
    resized to the last (full) resolution. Optimisation (lr, warm-up, clipping, EMA, ZeRO, batch)
    comes from ``training``; the schedule and sampling from ``diffusion``.
    """

    resolutions: list[int] = field(default_factory=lambda: [14, 28])  # innermost first, each a power-of-two multiple of the last
    channels: int = 1  # image channels (1 for Fashion-MNIST and digits, 3 for RGB folders)
    core_widths: list[int] = field(default_factory=lambda: [32, 64])  # inner UNet widths, halving resolution between
    core_blocks: int = 1
    attention_levels: list[int] = field(default_factory=list)  # core levels with self-attention (the middle always has it)
    stage_widths: list[int] = field(default_factory=lambda: [16])  # one per outer resolution
    stage_blocks: int = 1
    heads: int = 4
    num_classes: int = 0  # 0 = unconditional; >0 = class-conditional on the dataset labels
    cond_drop_prob: float = 0.1  # labels dropped this often in training, for classifier-free guidance
    snr_power: float = 2.0  # resolution r's SNR is the base schedule's times (r_base / r)^power
    loss_weights: list[float] = field(default_factory=list)  # one per resolution (empty = all 1)
    prediction: str = "v"  # v | eps
    # Progressive training: phase i trains the i+1 innermost resolutions for phase_steps[i] steps,
    # growing from the previous phase's EMA weights; 0 skips a phase (e.g. [0, 400] = no progression).
    phase_steps: list[int] = field(default_factory=lambda: [200, 200])
    sampler: str = "ddim"  # ddim | ddpm | dpm_solver | dpm_solver++ | dpm_solver++_fast
    text_layers: int = 2  # with model.text_encoder: self-attention layers over the caption tokens (MDM §4.1)
    # Imagen's dynamic thresholding of every resolution's x0 at this percentile while sampling (App. C; 0 = off)
    threshold: float = 0.0
    downsample: str = "bilinear"  # how the lower resolutions are formed: bilinear (§3.1) | area (pixel means)
    # What is trained on that budget: nested (the NestedUNet) | cascaded (a low-resolution UNet, then a
    # full-resolution UNet conditioned on its noised upsampled output) | plain (full resolution only) |
    # latent (the innermost UNet on a frozen autoencoder's codes, decoded after sampling: MDM's LDM).
    baseline: str = "nested"
    # The latent baseline's AutoencoderKL: a diffusers-format .safetensors (architecture from its
    # metadata or a config.json beside it), and the code shape it must have, checked before training.
    vae_weights: str = ""
    latent_downsample: int = 4  # MDM App. E.2: KL-F4, 256 px -> 64x64 codes
    latent_channels: int = 3


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    hierarchy: HierarchyConfig = field(default_factory=HierarchyConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    mdm: MDMConfig = field(default_factory=MDMConfig)
    seed: int = 0

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
        path = Path(self.paths.runs_dir).expanduser()
        return path if path.is_absolute() else REPO_ROOT / path

    @property
    def cache_dir(self) -> Path:
        return Path(self.paths.cache_dir).expanduser() if self.paths.cache_dir else self.runs_dir / "cache"

    @property
    def levels_dir(self) -> Path:
        return Path(self.paths.levels_dir).expanduser() if self.paths.levels_dir else self.runs_dir / "levels"

    def experiment_name(self, script: str) -> str:
        """The MLflow experiment of a run of ``script`` (e.g. sweep_sigma -> nds-sweep-sigma)."""
        return self.tracking.experiment or f"nds-{script.replace('_', '-')}"

    @property
    def tracking_uri(self) -> str:
        if self.tracking.uri:
            return self.tracking.uri
        return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{self.runs_dir / 'mlflow.db'}"


# -- reading -----------------------------------------------------------------------------


def _coerce(value, annotation, key: str):
    """Check/convert one leaf value against its dataclass annotation."""
    # annotations are strings under `from __future__ import annotations`
    kind = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    if kind.startswith("list["):
        item_kind = kind[5:-1]
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(v, item_kind, f"{key}[{i}]") for i, v in enumerate(value)]
    if kind == "bool":
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"config key '{key}' must be a finite number, got {value!r}")
        return float(value)
    if kind == "str":
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
        return str(value)
    raise ConfigError(f"config key '{key}' has an unsupported type {kind}")


def _merge(node, updates: dict, prefix: str = ""):
    if not isinstance(updates, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {updates!r}")
    fields = {f.name: f for f in dataclasses.fields(node)}
    for name, value in updates.items():
        key = f"{prefix}{name}"
        if name not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"unknown config key '{key}' (known here: {known})")
        current = getattr(node, name)
        if dataclasses.is_dataclass(current):
            _merge(current, value, f"{key}.")
        else:
            setattr(node, name, _coerce(value, fields[name].type, key))


def parse_overrides(overrides: list[str]) -> dict:
    """``['model.width=64', 'sweep.sigmas=[0,1]']`` -> nested dict (values parsed as YAML)."""
    nested: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ConfigError(f"override '{item}': value is not valid YAML ({problem})") from None
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return nested


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the last, silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' given twice (first on line {seen[key]})", key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def read_yaml(path: Path):
    """A YAML file's content; a syntax error is one line naming the file, line and column."""
    try:
        return yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML: {err.problem or err.context}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not a text file ({err.reason} at byte {err.start})") from None


def _merge_file(cfg: Config, path: Path, seen: tuple[Path, ...] = ()) -> None:
    """Merge a YAML file into ``cfg``; its ``extends: other.yaml`` (relative to it) is merged first,
    so a preset states only how it differs from the setup it builds on."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"config file {path} extends itself (via {' -> '.join(map(str, seen))})")
    loaded = read_yaml(path)
    if isinstance(loaded, dict) and "extends" in loaded:
        _merge_file(cfg, path.parent / str(loaded.pop("extends")), (*seen, path.resolve()))
    _merge(cfg, loaded)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file (and what it extends) <- overrides, then validated."""
    cfg = Config()
    if path is not None:
        _merge_file(cfg, Path(path))
    _merge(cfg, parse_overrides(overrides or []))
    validate(cfg)
    return cfg


def from_dict(data: dict) -> Config:
    """Rebuild a config from ``to_dict`` output (e.g. inside a Ray worker)."""
    cfg = Config()
    _merge(cfg, data)
    return cfg


def replace(cfg: Config, **dotted) -> Config:
    """A validated copy with dotted keys changed: ``replace(cfg, **{"hierarchy.L": 1})``."""
    new = from_dict(to_dict(cfg))
    _merge(new, parse_overrides([f"{k}={json.dumps(v)}" for k, v in dotted.items()]))
    validate(new)
    return new


# -- checking ----------------------------------------------------------------------------


def validate(cfg: Config) -> None:
    """Structural checks that need no files; raise ConfigError naming the key."""
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
    for i, s in enumerate(cfg.hierarchy.sigmas):
        if s < 0:
            raise ConfigError(f"hierarchy.sigmas[{i}] (σ_{i + 2}) = {s} must be >= 0")
    for i, s in enumerate(cfg.sweep.sigmas):
        if s < 0:
            raise ConfigError(f"sweep.sigmas[{i}] = {s} must be >= 0")
    for i, depth in enumerate(cfg.sweep.depths):
        if not 1 <= depth <= len(spec):
            raise ConfigError(f"sweep.depths[{i}] = {depth} must be between 1 and the {len(spec)} levels of hierarchy.spec")
    if cfg.sweep.encoder_specs and len(cfg.sweep.encoder_specs) != len(cfg.sweep.encoders):
        raise ConfigError(f"sweep.encoder_specs needs one spec (or \"\") per entry of sweep.encoders "
                          f"({len(cfg.sweep.encoders)}), got {len(cfg.sweep.encoder_specs)}")
    if not cfg.sweep.seeds:
        raise ConfigError("sweep.seeds must list at least one seed")
    for key, seed in [("seed", cfg.seed), *((f"sweep.seeds[{i}]", s) for i, s in enumerate(cfg.sweep.seeds))]:
        if not 0 <= seed < 2**32:  # numpy's and torch's seeds are unsigned 32-bit
            raise ConfigError(f"{key}={seed} must be in [0, 2**32)")
    if len(set(cfg.sweep.seeds)) != len(cfg.sweep.seeds):
        raise ConfigError(f"sweep.seeds={cfg.sweep.seeds} repeats a seed: a repeat is not a second sample of the spread")
    r = cfg.resources
    for prefix in ("", "eval_"):
        cpus, gpus = getattr(r, f"{prefix}cpus_per_worker"), getattr(r, f"{prefix}gpus_per_worker")
        if not cpus > 0 or not gpus >= 0:
            raise ConfigError(f"resources.{prefix}cpus_per_worker={cpus} must be > 0 and resources.{prefix}gpus_per_worker="
                              f"{gpus} >= 0")
        if gpus > 1 and gpus != int(gpus):
            raise ConfigError(f"resources.{prefix}gpus_per_worker={gpus}: above 1 a worker takes whole GPUs")
    if r.level_lock_stale_s <= 0 or r.level_wait_s < 0:
        raise ConfigError(f"resources.level_lock_stale_s={r.level_lock_stale_s} must be > 0 and "
                          f"resources.level_wait_s={r.level_wait_s} >= 0 (0 = no limit)")
    if cfg.training.lr <= 0 or cfg.training.warmup_steps < 0 or cfg.training.grad_clip < 0:
        raise ConfigError(f"training.lr={cfg.training.lr} must be > 0, training.warmup_steps="
                          f"{cfg.training.warmup_steps} and training.grad_clip={cfg.training.grad_clip} >= 0")
    if cfg.training.log_every < 1 or cfg.training.checkpoint_every < 1:
        raise ConfigError(f"training.log_every={cfg.training.log_every} and training.checkpoint_every="
                          f"{cfg.training.checkpoint_every} must be >= 1")
    if cfg.model.size not in UVIT_SIZES:
        raise ConfigError(f"model.size='{cfg.model.size}' is not one of {sorted(UVIT_SIZES)}")
    if cfg.model.text_encoder and cfg.model.text_encoder not in TEXT_ENCODERS:
        raise ConfigError(f"model.text_encoder='{cfg.model.text_encoder}' must be empty (no text) or one of {list(TEXT_ENCODERS)}")
    if cfg.training.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"training.zero_stage={cfg.training.zero_stage} must be 0, 1, 2 or 3")
    if cfg.training.precision not in ("auto", "bf16", "fp32"):
        raise ConfigError(f"training.precision='{cfg.training.precision}' must be 'auto', 'bf16' or 'fp32'")
    for key in ("training.steps", "training.batch_size", "resources.workers_per_level",
                "resources.max_concurrent_trials", "resources.eval_workers", "eval.num_samples", "eval.batch_size",
                "diffusion.timesteps", "diffusion.sample_steps", "eval.classifier_steps"):
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) < 1:
            raise ConfigError(f"{key} must be >= 1")
    d = cfg.diffusion
    if d.prediction not in PREDICTIONS:
        raise ConfigError(f"diffusion.prediction='{d.prediction}' must be one of {list(PREDICTIONS)}")
    if d.schedule not in SCHEDULES:
        raise ConfigError(f"diffusion.schedule='{d.schedule}' must be one of {sorted(SCHEDULES)}")
    if d.sampler not in SAMPLERS:
        raise ConfigError(f"diffusion.sampler='{d.sampler}' must be one of {sorted(SAMPLERS)}")
    if d.eta and d.sampler != "ddim":
        raise ConfigError(f"diffusion.eta={d.eta} is a DDIM setting; diffusion.sampler='{d.sampler}' does not take it")
    if not 0.0 <= d.eta <= 1.0:
        raise ConfigError(f"diffusion.eta={d.eta} must be in [0, 1]")
    if not d.cfg_scale >= 0:
        raise ConfigError(f"diffusion.cfg_scale={d.cfg_scale} must be >= 0 (1 = no guidance)")
    for i, scale in enumerate(cfg.sweep.cfg_scales):
        if not scale >= 0:
            raise ConfigError(f"sweep.cfg_scales[{i}] = {scale} must be >= 0 (1 = no guidance)")
    if not d.latent_clip >= 0:
        raise ConfigError(f"diffusion.latent_clip={d.latent_clip} must be >= 0 (0 = off)")
    if cfg.model.cond_injection not in COND_INJECTIONS:
        raise ConfigError(f"model.cond_injection='{cfg.model.cond_injection}' must be one of {list(COND_INJECTIONS)}")
    if cfg.data.bad_images not in BAD_IMAGE_POLICIES:
        raise ConfigError(f"data.bad_images='{cfg.data.bad_images}' must be one of {list(BAD_IMAGE_POLICIES)}")
    if cfg.eval.reference_split not in ("train", "test"):
        raise ConfigError(f"eval.reference_split='{cfg.eval.reference_split}' must be 'train' or 'test'")
    if cfg.eval.diagnostic_samples < 0:
        raise ConfigError(f"eval.diagnostic_samples={cfg.eval.diagnostic_samples} must be >= 0 (0 = off)")
    if cfg.diffusion.sample_steps > cfg.diffusion.timesteps:
        raise ConfigError("diffusion.sample_steps must not exceed diffusion.timesteps")
    if len(cfg.training.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.training.betas):
        raise ConfigError(f"training.betas={cfg.training.betas} must be two numbers in [0, 1) (AdamW's β1, β2)")
    if not 0.0 <= cfg.training.ema_decay < 1.0:
        raise ConfigError("training.ema_decay must be in [0, 1)")
    if not 0.0 <= cfg.diffusion.cond_drop_prob < 1.0:
        raise ConfigError("diffusion.cond_drop_prob must be in [0, 1)")
    if cfg.resources.driver_cpus <= 0:
        raise ConfigError("resources.driver_cpus must be > 0 (Ray Tune refuses a zero-CPU trial driver)")
    _validate_mdm(cfg)


def _validate_mdm(cfg: Config) -> None:
    """The mdm section: the phase schedule against the resolutions, then the NestedUNet spec's own checks."""
    m = cfg.mdm
    res = m.resolutions
    if not res or min(res) < 1:
        raise ConfigError(f"mdm.resolutions must list positive resolutions, got {res}")
    for i in range(1, len(res)):
        ratio = res[i] // res[i - 1]
        if res[i] % res[i - 1] or ratio < 2 or ratio & (ratio - 1):
            raise ConfigError(f"mdm.resolutions[{i}] = {res[i]} is not a power-of-two multiple (>= 2x) "
                              f"of mdm.resolutions[{i - 1}] = {res[i - 1]}")
    if len(m.phase_steps) != len(res):
        raise ConfigError(f"mdm.phase_steps needs one entry per resolution in mdm.resolutions ({len(res)}; "
                          f"phase i trains the i+1 innermost), got {len(m.phase_steps)}")
    for i, steps in enumerate(m.phase_steps):
        if steps < 0:
            raise ConfigError(f"mdm.phase_steps[{i}] = {steps} must be >= 0 (0 skips the phase)")
    if m.phase_steps[-1] < 1:
        raise ConfigError("mdm.phase_steps: the last entry must be >= 1 (the last phase trains the full model)")
    if m.loss_weights and len(m.loss_weights) != len(res):
        raise ConfigError(f"mdm.loss_weights needs one weight per resolution ({len(res)}) or none, "
                          f"got {len(m.loss_weights)}")
    for i, w in enumerate(m.loss_weights):
        if w < 0:
            raise ConfigError(f"mdm.loss_weights[{i}] = {w} must be >= 0")
    if m.prediction not in PREDICTIONS:
        raise ConfigError(f"mdm.prediction='{m.prediction}' must be one of {list(PREDICTIONS)}")
    if not 0.0 <= m.threshold <= 1.0:
        raise ConfigError(f"mdm.threshold={m.threshold} must be a percentile in (0, 1], or 0 for none")
    if m.downsample not in DOWNSAMPLE_MODES:
        raise ConfigError(f"mdm.downsample='{m.downsample}' must be one of {list(DOWNSAMPLE_MODES)}")
    if m.sampler not in SAMPLERS:
        raise ConfigError(f"mdm.sampler='{m.sampler}' must be one of {sorted(SAMPLERS)}")
    if not 0.0 <= m.cond_drop_prob < 1.0:
        raise ConfigError("mdm.cond_drop_prob must be in [0, 1)")
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
        if m.latent_downsample < 1 or m.latent_channels < 1 or res[-1] % m.latent_downsample:
            raise ConfigError(f"mdm.latent_downsample={m.latent_downsample} must divide the top resolution {res[-1]}, "
                              f"and mdm.latent_channels={m.latent_channels} must be >= 1")
        try:
            latent_spec(cfg).validate()
        except ValueError as err:
            raise ConfigError(f"mdm.baseline=latent ({res[-1] // m.latent_downsample}px codes): {err}") from None


# -- writing -----------------------------------------------------------------------------


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def flatten(cfg: Config) -> dict[str, str]:
    """Flat, stable param names for MLflow (``model.width``, ``hierarchy.sigma.2``, ...)."""
    flat: dict[str, str] = {}

    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                flat[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, list) else str(value)

    walk(to_dict(cfg), "")
    for level in range(2, cfg.hierarchy.L + 1):
        flat[f"hierarchy.sigma.{level}"] = str(cfg.sigma(level))
    for level, shape in enumerate(cfg.levels, start=1):
        flat[f"hierarchy.shape.{level}"] = str(shape)
    return flat


def config_hash(obj) -> str:
    """Stable short hash of a config (or any section / plain dict) to key caches and group runs."""
    data = to_dict(obj) if dataclasses.is_dataclass(obj) else obj
    blob = json.dumps(data, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
