import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from nds.latents.encoders import build_encoder
from nds.latents.hierarchy import images_from_vae_latents
from nds.latents.vae import (
    AutoencoderKL,
    VAEConfig,
    autoencoder_config,
    load_autoencoder,
    save_autoencoder,
    to_unit_range,
    train_autoencoder,
)

TINY = VAEConfig(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4)


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(TINY).eval()


def test_default_is_stable_diffusions_vae_with_diffusers_key_names():
    vae = AutoencoderKL()
    state = vae.state_dict()
    # diffusers' AutoencoderKL for SD v1 (e.g. stabilityai/sd-vae-ft-mse): 248 tensors, 83,653,863 parameters
    assert len(state) == 248 and sum(p.numel() for p in vae.parameters()) == 83_653_863
    for key, shape in {
        "encoder.down_blocks.1.resnets.0.conv_shortcut.weight": (256, 128, 1, 1),
        "encoder.down_blocks.2.downsamplers.0.conv.weight": (512, 512, 3, 3),
        "encoder.mid_block.attentions.0.to_out.0.weight": (512, 512),
        "encoder.conv_out.weight": (8, 512, 3, 3),
        "decoder.up_blocks.3.resnets.2.conv2.weight": (128, 128, 3, 3),
        "decoder.up_blocks.2.upsamplers.0.conv.weight": (256, 256, 3, 3),
        "quant_conv.weight": (8, 8, 1, 1),
        "post_quant_conv.weight": (4, 4, 1, 1),
    }.items():
        assert tuple(state[key].shape) == shape, key
    assert vae.config.downsample == 8 and vae.config.scaling_factor == 0.18215
    with torch.no_grad():
        assert vae.encode(torch.zeros(1, 3, 16, 16)).shape == (1, 4, 2, 2)  # 256 px would give 32x32x4


def test_encode_is_scaled_posterior_mean_and_decode_inverts_the_scaling():
    vae = tiny_vae()
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        mean, _ = vae.moments(x)
        z = vae.encode(x)
        torch.testing.assert_close(z, mean * TINY.scaling_factor)
        torch.testing.assert_close(vae.decode(z), vae.decoder(vae.post_quant_conv(mean)))
    assert z.shape == (2, 4, 4, 4) and vae.decode(z).shape == (2, 3, 8, 8)


def test_attention_is_single_head_softmax_with_residual():
    attn = tiny_vae().encoder.mid_block.attentions[0]
    x = torch.randn(1, 16, 3, 3)
    with torch.no_grad():
        t = attn.group_norm(x).flatten(2).transpose(1, 2)
        q, k, v = attn.to_q(t), attn.to_k(t), attn.to_v(t)
        out = torch.softmax(q @ k.transpose(1, 2) / 16**0.5, dim=-1) @ v
        expected = x + attn.to_out[0](out).transpose(1, 2).reshape(1, 16, 3, 3)
        torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-5)


def test_save_load_round_trip_keeps_architecture_and_outputs(tmp_path):
    vae = tiny_vae()
    path = tmp_path / "vae.safetensors"
    save_autoencoder(vae, path)
    loaded = load_autoencoder(path)
    assert loaded.config == TINY and not any(p.requires_grad for p in loaded.parameters())
    x = torch.rand(1, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(x), vae.encode(x))


def test_legacy_attention_names_are_renamed_on_load(tmp_path):
    vae = tiny_vae()
    legacy = {}
    for key, value in vae.state_dict().items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            key = key.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        legacy[key] = value.contiguous()
    assert "decoder.mid_block.attentions.0.proj_attn.weight" in legacy
    path = tmp_path / "old.safetensors"
    save_file(legacy, str(path), metadata={"nds.vae_config": TINY.to_json()})
    x = torch.rand(1, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(load_autoencoder(path).encode(x), vae.encode(x))


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.safetensors.*sd-vae-ft-mse"):
        load_autoencoder(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="junk.safetensors"):
        load_autoencoder(junk)
    partial = tmp_path / "partial.safetensors"
    save_file({"quant_conv.weight": torch.zeros(8, 8, 1, 1)}, str(partial))  # no metadata: SD config expected
    with pytest.raises(ValueError, match="partial.safetensors.*AutoencoderKL"):
        load_autoencoder(partial)


@pytest.fixture
def one_thread():
    """Tiny convs are many times faster single-threaded, above all on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_training_reduces_reconstruction_error_and_standardises_latents(one_thread):
    rng = np.random.default_rng(0)
    images = np.zeros((64, 8, 8, 1), np.uint8)
    for i, (r, c) in enumerate(rng.integers(0, 5, (64, 2))):
        images[i, r : r + 4, c : c + 4] = 255  # a bright square at a random place

    def error(vae):
        x = to_unit_range(images, 8)
        with torch.no_grad():
            return (vae.decode(vae.encode(x)) - x).abs().mean().item()

    trained = train_autoencoder(images, TINY, image_size=8, steps=60, batch_size=16, lr=3e-3)
    assert error(trained) < 0.6 * error(tiny_vae())
    with torch.no_grad():
        assert abs(trained.encode(to_unit_range(images, 8)).std().item() - 1.0) < 0.05
    with pytest.raises(ValueError, match="multiple of 2"):
        train_autoencoder(images, TINY, image_size=7, steps=1)


def test_vae_encoder_and_level1_decoding(tmp_path):
    vae = tiny_vae()
    path = tmp_path / "vae.safetensors"
    save_autoencoder(vae, path)
    encoder = build_encoder("vae", image_size=8, weights=str(path))
    assert encoder.feature_shape == (4, 4, 4) and encoder.identity["weights"]["source"] == "file"
    images = np.random.default_rng(1).integers(0, 256, (3, 8, 8, 1), dtype=np.uint8)
    with torch.no_grad():
        expected = vae.encode(to_unit_range(images, 8))
    torch.testing.assert_close(encoder(torch.from_numpy(images)), expected, rtol=1e-5, atol=1e-5)
    decoded = images_from_vae_latents(expected.numpy(), vae, batch_size=2)
    assert decoded.shape == (3, 8, 8, 3) and decoded.dtype == np.uint8
    with pytest.raises(ValueError, match="multiple of 2"):
        build_encoder("vae", image_size=7, weights=str(path))


def test_a_diffusers_folder_gives_its_architecture_in_config_json(tmp_path):
    """Weights without our metadata take the architecture from the diffusers config.json beside them
    (extra diffusers fields ignored); without either, Stable Diffusion's VAE is assumed."""
    import json

    vae = tiny_vae()
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file(vae.state_dict(), str(path))
    with pytest.raises(ValueError, match="not an AutoencoderKL"):
        load_autoencoder(path)  # read as SD's VAE: the tiny weights do not fit
    (tmp_path / "config.json").write_text(json.dumps({
        "_class_name": "AutoencoderKL", "block_out_channels": [8, 16], "layers_per_block": 1, "latent_channels": 4,
        "norm_num_groups": 4, "in_channels": 3, "scaling_factor": 0.5, "sample_size": 8}))
    assert autoencoder_config(path) == VAEConfig(**{**TINY.__dict__, "scaling_factor": 0.5})
    loaded = load_autoencoder(path)
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(x), vae.encode(x) / TINY.scaling_factor * 0.5)
