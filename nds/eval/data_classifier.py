"""A small CNN trained on the dataset's own labelled training split: its pooled features give the
``fd_data_classifier`` metric (see ``nds.eval.metrics``).

Why: at 28 px an ImageNet network's features barely tell blurred garments from noise (see
``analysis/metric_scale.py``), so small models cannot be ranked with them. A feature space learned
on the data itself can, which is what MNIST-scale generative-model work does. The network is
trained once per (data, settings) and cached under ``<cache_dir>/data_classifier/``.
"""
from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from nds.config import Config, ConfigError, config_hash
from nds.data import load_config_split
from nds.files import atomic_path

VERSION = 1  # bump when the architecture or training recipe changes: old cache entries are then ignored
WIDTHS = (32, 64, 128)
BATCH_SIZE = 128
LR = 2e-3
TEST_IMAGES = 2000  # test-split images the cached accuracy is measured on


class DataClassifier(nn.Module):
    """Three conv stages (two 3x3 convs with batch norm, then 2x max-pool), global average pool, linear.

    Takes uint8 [N, H, W, C] images; any H, W are resized to ``image_size`` first, so generated and
    reference images pass through the same transform."""

    def __init__(self, channels: int, num_classes: int, image_size: int):
        super().__init__()
        self.image_size = image_size
        layers, c_in = [], channels
        for width in WIDTHS:
            for c in (c_in, width):
                layers += [nn.Conv2d(c, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
            c_in = width
        self.trunk = nn.Sequential(*layers)
        self.head = nn.Linear(WIDTHS[-1], num_classes)

    @property
    def feature_dim(self) -> int:
        return WIDTHS[-1]

    def _input(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True,
                              align_corners=False)
        return x

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x).mean(dim=(2, 3))

    def forward(self, images) -> torch.Tensor:
        return self.head(self.pooled(self._input(images)))

    @torch.no_grad()
    def features(self, images, batch_size: int = 500) -> np.ndarray:
        """float64 [N, feature_dim] pooled features of uint8 [N, H, W, C] images, in eval mode."""
        self.eval()
        out = [self.pooled(self._input(images[i : i + batch_size])).double().numpy()
               for i in range(0, len(images), batch_size)]
        return np.concatenate(out)

    @torch.no_grad()
    def predict(self, images, batch_size: int = 500) -> np.ndarray:
        """int64 [N]: the predicted class of each uint8 [N, H, W, C] image, in eval mode."""
        self.eval()
        return np.concatenate([self(images[i : i + batch_size]).argmax(1).numpy() for i in range(0, len(images), batch_size)])

    def accuracy(self, images, labels: np.ndarray, batch_size: int = 500) -> float:
        return float(np.mean(self.predict(images, batch_size) == labels))


def classifier_key(cfg: Config, image_size: int) -> dict:
    """What the trained classifier depends on."""
    d, e = cfg.data, cfg.eval
    return {"data": {"name": d.name, "root": d.root}, "train_limit": e.classifier_train_limit,
            "steps": e.classifier_steps, "image_size": image_size, "version": VERSION}


def _load(cfg: Config, split: str, limit: int | None, image_size: int):
    return load_config_split(cfg, split, limit, image_size)


def train_classifier(cfg: Config, image_size: int, seed: int = 0) -> tuple[DataClassifier, float]:
    """Train on the labelled training split (``eval.classifier_train_limit`` images, None = all) for
    ``eval.classifier_steps`` AdamW steps with a cosine learning rate; returns it with its test accuracy."""
    train = _load(cfg, "train", cfg.eval.classifier_train_limit, image_size)
    num_classes = len(train.class_names)
    if num_classes < 2:
        raise ConfigError(f"eval.data_classifier: data.name={cfg.data.name} has no class labels to train a classifier "
                          "on; set eval.data_classifier=false")
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DataClassifier(train.images.shape[-1], num_classes, image_size)
    steps = cfg.eval.classifier_steps
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    labels = torch.as_tensor(train.labels)
    model.train()
    for _ in range(steps):
        idx = np.sort(torch.randint(len(train.labels), (min(BATCH_SIZE, len(train.labels)),), generator=generator).numpy())
        loss = F.cross_entropy(model(train.images[idx]), labels[idx])  # sorted: file datasets decode in order
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    test = _load(cfg, "test", TEST_IMAGES, image_size)
    return model.eval(), model.accuracy(test.images, test.labels)


def obtain_classifier(cfg: Config, image_size: int) -> tuple[DataClassifier, float]:
    """The cached classifier for this data and size (trained here on a miss), with its test accuracy."""
    key = classifier_key(cfg, image_size)
    path = cfg.cache_dir / "data_classifier" / f"{config_hash(key)}.pt"
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        model = DataClassifier(saved["channels"], saved["num_classes"], image_size)
        model.load_state_dict(saved["state_dict"])
        return model.eval(), saved["accuracy"]
    start = time.perf_counter()
    model, accuracy = train_classifier(cfg, image_size)
    with atomic_path(path) as tmp:  # a concurrent sweep reads a whole file or none
        torch.save({"state_dict": model.state_dict(), "accuracy": accuracy, "key": key,
                    "channels": model.trunk[0].in_channels, "num_classes": model.head.out_features}, tmp)
    print(f"[nds] data classifier for {cfg.data.name} at {image_size} px: {cfg.eval.classifier_steps} steps in "
          f"{time.perf_counter() - start:.0f} s, test accuracy {accuracy:.3f} -> {path}", flush=True)
    return model, accuracy
