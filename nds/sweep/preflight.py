"""Checks before compute of what the config alone cannot tell: every path a run reads or writes, the
Ray cluster and tracking server, the data against the keys that must match it, the encoders' weights
and the text encoder, checked before Ray starts (the config's own structure is checked on load)."""
from __future__ import annotations

import os
from pathlib import Path

from nds import tracking
from nds.config import Config, ConfigError
from nds.config.schema import ray_address_problem, tracking_uri_problem
from nds.config.specs import check_nesting, parse_spec
from nds.data import DATASET_CHANNELS, FILE_DATASETS, BadImagesError, check_dataset, load_config_split
from nds.sweep.runtime import unanswered


def preflight(cfg: Config, kind: str = "chain") -> dict[str, int]:
    """Everything a run needs that the config alone cannot tell, checked before Ray starts so no compute
    is spent on a run that cannot finish: the places it writes, the Ray cluster and tracking server it
    joins, the data (its files, channels and class count against the keys that must match them) and the
    models it reads. ``kind``: what a trial trains (chain: U-ViT levels on an encoder's features; mdm: a
    NestedUNet on the images). Returns how many image files each split leaves out under data.bad_images=skip."""
    # here, not at the top: the CLI imports this module, and rejecting a bad config needs no torch (1.4 s)
    from nds.latents.encoders import RANDOM_WEIGHTS, SD_VAE_HUB, check_encoder
    from nds.latents.text import encoder_dir

    writes = [("paths.runs_dir", cfg.runs_dir), ("paths.cache_dir", cfg.cache_dir), ("paths.levels_dir", cfg.levels_dir)]
    if cfg.encoder.cache_dir:  # where downloaded encoder weights go
        writes.append(("encoder.cache_dir", Path(cfg.encoder.cache_dir)))
    for key, path in writes:
        problem = _unwritable(path)
        if problem:
            raise ConfigError(f"{key}: cannot write {path}: {problem}")
    check_services(cfg)
    try:
        check_dataset(cfg.data.name, cfg.data.root, cfg.data.captions)
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(f"data.name: {err}") from None
    skipped, classes = {}, None
    d = cfg.data
    for split, limit in dict.fromkeys([("train", d.train_limit), ("test", d.eval_limit),
                                       (cfg.eval.reference_split, d.eval_limit)]):
        if d.name not in FILE_DATASETS and split != "train":
            continue  # in-memory data: its training split gives the class names, nothing can fail to decode
        try:  # file data: every file a run will read decodes (checked once, cached by mtime)
            loaded = load_config_split(cfg, split, limit if d.name in FILE_DATASETS else 1, image_size=1)
        except BadImagesError as err:
            raise ConfigError(f"data.bad_images=fail: {err}") from None
        except (ValueError, FileNotFoundError) as err:
            raise ConfigError(f"data.root: {err}") from None
        if split == "train":
            classes = loaded.class_names
        if loaded.skipped:
            skipped[split] = len(loaded.skipped)
            print(f"[nds] data.bad_images=skip: {len(loaded.skipped)} {split} image file(s) left out, e.g. "
                  f"{next(iter(loaded.skipped.items()))}", flush=True)
    channels = DATASET_CHANNELS[cfg.data.name]
    labelled = cfg.data.name != "coco2014"  # COCO's one pseudo-class is no label
    if cfg.uses_data_classifier and len(classes) < 2:
        raise ConfigError(f"eval.data_classifier: data.name={cfg.data.name} at {cfg.data.root} has "
                          f"{len(classes)} class ({', '.join(classes)}), and a classifier needs 2 or more: "
                          "set eval.data_classifier=false")
    if kind == "mdm":
        check_class_count(cfg, "mdm.num_classes", cfg.mdm.num_classes, classes, labelled)
        if cfg.mdm.channels != channels:
            raise ConfigError(f"mdm.channels={cfg.mdm.channels}, but data.name={cfg.data.name} images have "
                              f"{channels} channel(s): set mdm.channels={channels}")
        if cfg.mdm.baseline == "latent":
            check_latent_vae(cfg)
    else:
        check_class_count(cfg, "model.num_classes", cfg.model.num_classes, classes, labelled)
        level1 = cfg.levels[0]
        if cfg.encoder.level1 == "pixels" and level1.c != channels:
            raise ConfigError(f"hierarchy.spec level 1 ({level1}) has {level1.c} channel(s) but data.name="
                              f"{cfg.data.name} images have {channels}: level 1 is the image itself "
                              f"(encoder.level1=pixels), so write it {level1.h}x{level1.w}x{channels}")
        try:
            check_encoder(cfg.encoder.name, cfg.encoder.weights, cfg.encoder.cache_dir)
        except (ValueError, FileNotFoundError) as err:
            raise ConfigError(f"encoder.name: {err}") from None
        vae = cfg.encoder.level1_weights
        if cfg.encoder.level1 == "vae" and vae and vae != RANDOM_WEIGHTS and not Path(vae).is_file():
            raise ConfigError(f"encoder.level1_weights: no AutoencoderKL weights file at {vae}: put the VAE's "
                              f"{SD_VAE_HUB[1]} (Hugging Face repo {SD_VAE_HUB[0]}) there, or leave "
                              "encoder.level1_weights empty to use the Hugging Face cache")
        check_feature_maps(cfg, channels)
    clip = cfg.eval.clip_dir
    if clip and not (Path(clip) / "config.json").is_file():
        raise ConfigError(f"eval.clip_dir: no CLIP model at {clip} (no config.json): download one (e.g. "
                          "openai/clip-vit-base-patch16) and pass its directory, or leave it empty")
    m = cfg.model
    if m.text_encoder:
        try:
            encoder_dir(m.text_encoder, m.text_encoder_path)
        except (ValueError, FileNotFoundError) as err:
            raise ConfigError(f"model.text_encoder_path: {err}") from None
    return skipped


def check_feature_maps(cfg: Config, channels: int) -> None:
    """The levels fit the maps they are cut from, computed without building the encoders: levels 2.. the
    encoder's feature map at encoder.image_size, level 1 the VAE's codes under encoder.level1=vae (each
    found only once features were extracted, after Ray and the sweep's MLflow runs had started)."""
    from nds.latents.encoders import feature_shape  # torch: see preflight
    from nds.latents.prepare import encoder_spec, image_size, level1_spec  # torch

    levels, e = parse_spec(cfg.hierarchy.spec), cfg.encoder
    if len(levels) > 1:
        try:
            c, h, w = feature_shape(encoder_spec(cfg, channels))
            check_nesting(levels, (c, h, w))
        except ValueError as err:
            raise ConfigError(f"hierarchy.spec '{cfg.hierarchy.spec}' does not fit encoder.name={e.name} at "
                              f"encoder.image_size={e.image_size}: {err}") from None
    z1 = level1_spec(cfg, channels)
    if z1 is not None:
        try:
            c, h, w = feature_shape(z1)
        except ValueError as err:
            raise ConfigError(f"encoder.level1=vae at {image_size(cfg)} px images (data.image_size): {err}") from None
        if (h, w, c) != (levels[0].h, levels[0].w, levels[0].c):
            raise ConfigError(f"hierarchy.spec level 1 ({levels[0]}) does not match the encoder.level1=vae codes "
                              f"{h}x{w}x{c} of {image_size(cfg)} px images (data.image_size): write it {h}x{w}x{c}")


def check_class_count(cfg: Config, key: str, num_classes: int, classes: list[str], labelled: bool) -> None:
    """A class-conditional model has one class per class of the data: fewer fail on the first label
    beyond them, more sample classes the data does not have."""
    if not num_classes:
        return
    if not labelled:
        raise ConfigError(f"{key}={num_classes}, but data.name={cfg.data.name} has no class labels: set {key}=0 "
                          "(and condition on captions with model.text_encoder)")
    if num_classes != len(classes):
        shown = ", ".join(classes[:12]) + (", ..." if len(classes) > 12 else "")
        raise ConfigError(f"{key}={num_classes}, but data.name={cfg.data.name} has {len(classes)} classes ({shown}): "
                          f"set {key}={len(classes)}, or 0 for an unconditional model")


def check_services(cfg: Config) -> None:
    """The Ray cluster and the MLflow tracking server the run joins, as written and, where they are
    servers, answering (an MLflow server, not another one); the environment's RAY_ADDRESS and
    MLFLOW_TRACKING_URI where the config leaves them to it."""
    address = cfg.resources.ray_address or os.environ.get("RAY_ADDRESS")
    key = "resources.ray_address" if cfg.resources.ray_address else "RAY_ADDRESS (the environment)"
    if address:
        problem = ray_address_problem(address)
        if problem:
            raise ConfigError(f"{key} = {address}: {problem}")
        problem = unanswered(address)
        if problem:
            raise ConfigError(f"{key} = {address}: {problem}; start the cluster (ray start --head, "
                              "cluster/start_local_head.sh) or leave both empty for a local instance")
    uri = cfg.tracking_uri
    key = "tracking.uri" if cfg.tracking.uri or not os.environ.get("MLFLOW_TRACKING_URI") else \
        "MLFLOW_TRACKING_URI (the environment)"
    problem = tracking_uri_problem(uri)
    if problem:
        raise ConfigError(f"{key} = {tracking.mask_credentials(uri)}: {problem}")
    problem = tracking.unreachable(uri)
    if problem:
        raise ConfigError(f"{key}: {problem}; start it, or leave tracking.uri and MLFLOW_TRACKING_URI empty for "
                          "the sqlite store under paths.runs_dir")


def _unwritable(path: Path) -> str:
    """Why a directory could not be created or written, judged without creating it ("" if it could)."""
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            return "no existing parent directory"
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable by this user"
    return ""


def check_latent_vae(cfg: Config) -> None:
    """The latent baseline's autoencoder exists and makes the codes the config says it does."""
    from nds.latents.vae import autoencoder_config  # torch: see preflight

    m = cfg.mdm
    path = Path(m.vae_weights)
    if not path.is_file():
        raise ConfigError(f"mdm.vae_weights: no AutoencoderKL weights file at {m.vae_weights} (a diffusers-format "
                          ".safetensors, e.g. the KL-F4 autoencoder of latent-diffusion converted to diffusers)")
    try:
        vae = autoencoder_config(path)
    except ValueError as err:
        raise ConfigError(f"mdm.vae_weights: {err}") from None
    if (vae.downsample, vae.latent_channels) != (m.latent_downsample, m.latent_channels):
        raise ConfigError(f"mdm.vae_weights: {path} makes {vae.latent_channels}-channel codes at 1/{vae.downsample} of "
                          f"the image size, but the config says mdm.latent_channels={m.latent_channels}, "
                          f"mdm.latent_downsample={m.latent_downsample}")
    if vae.in_channels != m.channels and not (m.channels == 1 and vae.in_channels == 3):
        raise ConfigError(f"mdm.vae_weights: {path} encodes {vae.in_channels}-channel images, the data has "
                          f"mdm.channels={m.channels}")
