import numpy as np
import pytest
import torch

import nds.eval.evaluate
import nds.latents.hierarchy
from nds.config import ConfigError, load_config
from nds.config.specs import parse_spec
from nds.data import load_digits_set
from nds.eval.evaluate import generate_images
from nds.latents.encoders import EncoderSpec
from nds.latents.hierarchy import encode_levels, images_from_level1, images_from_vae_latents
from nds.latents.prepare import level1_decoder, prepare_latents
from nds.latents.vae import AutoencoderKL, VAEConfig, save_autoencoder, to_unit_range
from nds.sweep.preflight import preflight
from nds.train.engine import build_level_model


def config(tmp_path, *overrides):
    return load_config(None, ["data.name=digits", "data.train_limit=64", "data.eval_limit=16",
                              "encoder.name=random_cnn", "encoder.image_size=32",
                              "hierarchy.spec='8x8x1, 4x4x4, 2x2x4'", "hierarchy.L=3", "hierarchy.sigmas=[0.5,0.5]",
                              f"paths.runs_dir={tmp_path}", *overrides])


def test_targets_for_every_level_and_cache_reuse(tmp_path, monkeypatch):
    cfg = config(tmp_path)
    first = prepare_latents(cfg)
    assert {k: v.shape for k, v in first.latents.items()} == {1: (64, 1, 8, 8), 2: (64, 4, 4, 4), 3: (64, 4, 2, 2)}
    assert first.latents[1].min() >= -1 and first.latents[1].max() <= 1
    for level in (2, 3):  # standardised per channel on the training split
        z = first.latents[level].transpose(0, 2, 3, 1).reshape(-1, first.latents[level].shape[1])
        np.testing.assert_allclose(z.mean(0), 0, atol=1e-4)
        np.testing.assert_allclose(z.std(0), 1, atol=1e-3)
    assert first.reference_images.shape == (16, 8, 8, 1)

    def no_encoder(*args, **kwargs):
        raise AssertionError("the encoder ran although the hierarchy was cached")

    monkeypatch.setattr(nds.latents.hierarchy, "extract_features", no_encoder)
    second = prepare_latents(cfg)
    for level in first.latents:
        np.testing.assert_array_equal(first.latents[level], second.latents[level])


def test_spec_that_does_not_fit_the_encoder_is_named(tmp_path):
    with pytest.raises(ConfigError, match="hierarchy.spec.*random_cnn"):
        prepare_latents(config(tmp_path, "hierarchy.spec='28x28x1, 2x2x100'", "hierarchy.L=2"))


def test_image_level_channels_must_match_the_data(tmp_path):
    with pytest.raises(ConfigError, match="level 1 .*3 channels"):
        prepare_latents(config(tmp_path, "hierarchy.spec='8x8x3, 2x2x4'", "hierarchy.L=2", "hierarchy.sigmas=[0.5]"))


def test_cache_hit_never_builds_the_encoder_and_returns_the_fitted_statistics(tmp_path, monkeypatch):
    cfg = config(tmp_path)
    first = prepare_latents(cfg)
    assert first.compressors[0] is None and [c.components.shape for c in first.compressors[1:]] == [(4, 64), (4, 64)]

    def no_build(self):
        raise AssertionError("the encoder was built although everything was cached")

    monkeypatch.setattr(EncoderSpec, "build", no_build)
    second = prepare_latents(cfg)
    features = np.random.default_rng(0).normal(size=(3, 64, 4, 4)).astype(np.float32)
    levels = parse_spec(cfg.hierarchy.spec)
    for a, b in zip(encode_levels(levels, features, first.compressors), encode_levels(levels, features, second.compressors)):
        np.testing.assert_array_equal(a, b)  # sampling-time reuse: the very statistics of the training fit


def _tiny_vae_file(tmp_path):
    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4)).eval()
    path = tmp_path / "vae.safetensors"
    save_autoencoder(vae, path)
    return vae, path


def test_vae_level1_latents_and_decoding_back_to_pixels(tmp_path):
    vae, path = _tiny_vae_file(tmp_path)
    cfg = config(tmp_path, "encoder.level1=vae", f"encoder.level1_weights={path}", "data.image_size=8",
                 "hierarchy.spec='4x4x4, 2x2x4'", "hierarchy.L=2", "hierarchy.sigmas=[0.5]")
    prepared = prepare_latents(cfg)
    assert prepared.latents[1].shape == (64, 4, 4, 4) and prepared.latents[2].shape == (64, 4, 2, 2)
    train = load_digits_set("train", limit=64)
    with torch.no_grad():
        expected = vae.encode(to_unit_range(train.images, 8)).numpy()
    np.testing.assert_allclose(prepared.latents[1], expected, rtol=1e-4, atol=1e-5)
    images = level1_decoder(cfg)(torch.tensor(prepared.latents[1][:5]))
    assert images.shape == (5, 8, 8, 3) and images.dtype == np.uint8
    assert level1_decoder(config(tmp_path)) is images_from_level1


def test_vae_level1_errors_name_the_keys(tmp_path):
    _, path = _tiny_vae_file(tmp_path)
    with pytest.raises(ConfigError, match=r"level 1 \(8x8x4\) does not match the encoder.level1=vae latents 4x4x4"):
        prepare_latents(config(tmp_path, "encoder.level1=vae", f"encoder.level1_weights={path}", "data.image_size=8",
                               "hierarchy.spec='8x8x4, 2x2x4'", "hierarchy.L=2", "hierarchy.sigmas=[0.5]"))
    with pytest.raises(ConfigError, match="encoder.level1='jpeg'"):
        prepare_latents(config(tmp_path, "encoder.level1=jpeg"))


def test_generated_vae_level1_is_decoded_to_pixels_before_scoring(tmp_path, monkeypatch):
    """The sampler's z_1 are VAE latents (4x4x4 here, 32x32x4 at 256 px in the paper); the metric
    must see pixels from the same AutoencoderKL (a tiny randomly initialised one, not pretrained)."""
    vae, path = _tiny_vae_file(tmp_path)
    cfg = config(tmp_path, "encoder.level1=vae", f"encoder.level1_weights={path}", "data.image_size=8",
                 "hierarchy.spec='4x4x4, 2x2x4'", "hierarchy.L=2", "hierarchy.sigmas=[0.5]", "model.width=16",
                 "model.depth=2", "model.heads=2", "diffusion.sample_steps=2", "eval.batch_size=4",
                 "diffusion.prediction=eps")  # an untrained ε model's x0 = x_t / sqrt(ᾱ) reaches beyond [-1, 1]
    torch.manual_seed(0)
    models = {level: build_level_model(cfg, level).eval() for level in (1, 2)}
    images = generate_images(cfg, models, 5)
    assert images.shape == (5, 8, 8, 3) and images.dtype == np.uint8  # pixels, not the 4x4x4 latents

    # the decoded samples are the VAE's decoding of the sampled z_1, which was not clipped to [-1, 1]
    sampled = []

    def keep_z1(z1):
        sampled.append(z1)
        return images_from_level1(z1)

    monkeypatch.setattr(nds.eval.evaluate, "level1_decoder", lambda cfg: keep_z1)
    generate_images(cfg, models, 5)
    z1 = torch.cat(sampled)
    np.testing.assert_array_equal(images, images_from_vae_latents(z1, vae))
    assert z1.abs().max() > 1


def test_preflight_names_a_missing_vae_weights_file(tmp_path):
    missing = tmp_path / "sd-vae-ft-mse" / "diffusion_pytorch_model.safetensors"
    says = (f"encoder.level1_weights: no AutoencoderKL weights file at {missing}: "
            "put the VAE's diffusion_pytorch_model.safetensors .*stabilityai/sd-vae-ft-mse")
    with pytest.raises(ConfigError, match=says):
        preflight(config(tmp_path, "encoder.level1=vae", f"encoder.level1_weights={missing}"))
    _, path = _tiny_vae_file(tmp_path)  # 2x downsampling, 4 channels: 8 px images give 4x4x4 codes
    tiny = ["hierarchy.spec='4x4x4, 2x2x4'", "hierarchy.L=2", "hierarchy.sigmas=[0.5]", "data.image_size=8"]
    preflight(config(tmp_path, "encoder.level1=vae", f"encoder.level1_weights={path}", *tiny))
    with pytest.raises(ConfigError, match=r"level 1 \(8x8x1\) does not match the encoder.level1=vae codes 32x32x4 of "
                                          r"64 px images \(data.image_size\): write it 32x32x4"):
        preflight(config(tmp_path, "encoder.level1=vae", f"encoder.level1_weights={path}"))  # found before compute
    preflight(config(tmp_path, "encoder.level1=vae", "encoder.level1_weights=random", "hierarchy.spec='8x8x4, 4x4x4, 2x2x4'"))
    preflight(config(tmp_path, f"encoder.level1_weights={missing}"))  # pixel z_1: the file is never read
