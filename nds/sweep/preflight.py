"""File checks before compute: every path a run reads or writes, the data, the encoders' weights
and the text encoder, checked before Ray starts (the config's own structure is checked on load)."""
from __future__ import annotations

import os
from pathlib import Path

from nds.config import Config, ConfigError
from nds.data import DATASET_CHANNELS, FILE_DATASETS, BadImagesError, check_dataset, load_config_split


def preflight(cfg: Config) -> dict[str, int]:
    """File checks, run before Ray starts so no compute is spent on a run that cannot finish.
    Returns how many image files each split leaves out under data.bad_images=skip."""
    # here, not at the top: the CLI imports this module, and rejecting a bad config needs no torch (1.4 s)
    from nds.latents.encoders import RANDOM_WEIGHTS, SD_VAE_HUB, check_encoder
    from nds.latents.text import encoder_dir

    for key, path in (("paths.runs_dir", cfg.runs_dir), ("paths.cache_dir", cfg.cache_dir),
                      ("paths.levels_dir", cfg.levels_dir)):
        problem = _unwritable(path)
        if problem:
            raise ConfigError(f"{key}: cannot write {path}: {problem}")
    try:
        check_dataset(cfg.data.name, cfg.data.root)
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(f"data.name: {err}") from None
    skipped = {}
    if cfg.data.name in FILE_DATASETS:  # every file a run will read decodes (checked once, cached by mtime)
        d = cfg.data
        for split, limit in dict.fromkeys([("train", d.train_limit), ("test", d.eval_limit),
                                           (cfg.eval.reference_split, d.eval_limit)]):
            try:
                left_out = load_config_split(cfg, split, limit, image_size=1).skipped
            except BadImagesError as err:
                raise ConfigError(f"data.bad_images=fail: {err}") from None
            except (ValueError, FileNotFoundError) as err:
                raise ConfigError(f"data.root: {err}") from None
            if left_out:
                skipped[split] = len(left_out)
                print(f"[nds] data.bad_images=skip: {len(left_out)} {split} image file(s) left out, e.g. "
                      f"{next(iter(left_out.items()))}", flush=True)
    channels = DATASET_CHANNELS[cfg.data.name]
    level1 = cfg.levels[0]
    if cfg.encoder.level1 == "pixels" and level1.c != channels:
        raise ConfigError(f"hierarchy.spec level 1 ({level1}) has {level1.c} channel(s) but data.name={cfg.data.name} "
                          f"images have {channels}: level 1 is the image itself (encoder.level1=pixels), so write "
                          f"it {level1.h}x{level1.w}x{channels}")
    try:
        check_encoder(cfg.encoder.name, cfg.encoder.weights or None)
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(f"encoder.name: {err}") from None

    vae = cfg.encoder.level1_weights
    if cfg.encoder.level1 == "vae" and vae and vae != RANDOM_WEIGHTS and not Path(vae).expanduser().is_file():
        raise ConfigError(f"encoder.level1_weights: no AutoencoderKL weights file at {vae}: put the VAE's "
                          f"{SD_VAE_HUB[1]} (Hugging Face repo {SD_VAE_HUB[0]}) there, or leave "
                          "encoder.level1_weights empty to use the Hugging Face cache")
    if cfg.mdm.baseline == "latent":
        check_latent_vae(cfg)
    clip = cfg.eval.clip_dir
    if clip and not (Path(clip).expanduser() / "config.json").is_file():
        raise ConfigError(f"eval.clip_dir: no CLIP model at {clip} (no config.json): download one (e.g. "
                          "openai/clip-vit-base-patch16) and pass its directory, or leave it empty")
    m = cfg.model
    if m.text_encoder:
        try:
            encoder_dir(m.text_encoder, m.text_encoder_path or None)
        except (ValueError, FileNotFoundError) as err:
            raise ConfigError(f"model.text_encoder_path: {err}") from None
    return skipped


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
    path = Path(m.vae_weights).expanduser()
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
