"""Image datasets as small in-memory uint8 arrays.

Every loader returns an :class:`ImageSet` with images ``uint8 [N, H, W, C]`` so
the encoders and the image level of the hierarchy see one format whatever the
source.  Loaders are deterministic: ``limit`` always yields the same samples.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

FASHION_MNIST_DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
DIGITS_TRAIN_FRACTION = 0.8


@dataclass
class ImageSet:
    images: np.ndarray  # uint8 [N, H, W, C]
    labels: np.ndarray  # int64 [N]
    class_names: list[str]

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise ValueError(f"ImageSet.images must be uint8 [N,H,W,C], got {self.images.dtype} {self.images.shape}")
        if self.labels.shape != (len(self.images),):
            raise ValueError(f"ImageSet.labels shape {self.labels.shape} does not match {len(self.images)} images")

    def __len__(self) -> int:
        return len(self.images)


def _check_split(split: str, allowed: tuple[str, ...] = ("train", "test")) -> None:
    if split not in allowed:
        raise ValueError(f"unknown split {split!r}; expected one of {list(allowed)}")


def _check_limit(limit: int | None) -> None:
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")


def read_idx(path: Path, limit: int | None = None) -> np.ndarray:
    """Parse an IDX file (optionally gzipped) holding unsigned bytes.

    Only the first ``limit`` items are decompressed, so small runs stay fast.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            header = f.read(4)
            if len(header) < 4 or header[:2] != b"\x00\x00" or header[2] != 0x08:
                raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {header.hex()!r})")
            ndim = header[3]
            dims_raw = f.read(4 * ndim)
            if len(dims_raw) < 4 * ndim:
                raise ValueError(f"{path}: truncated IDX header")
            dims = [int(d) for d in np.frombuffer(dims_raw, dtype=">u4")]
            n = dims[0] if limit is None else min(limit, dims[0])
            item_size = int(np.prod(dims[1:], dtype=np.int64))
            data = f.read(n * item_size)
    except (EOFError, OSError, zlib.error) as e:
        raise ValueError(f"{path}: corrupt or truncated IDX file ({e})") from e
    if len(data) != n * item_size:
        raise ValueError(f"{path}: truncated IDX file: expected {n * item_size} bytes of data, got {len(data)}")
    return np.frombuffer(data, dtype=np.uint8).reshape([n, *dims[1:]])


def _find_idx(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}(.gz) not found in {root}. Install the data with "
        f"`apt-get install dataset-fashion-mnist` (it goes to {FASHION_MNIST_DEFAULT_ROOT}), "
        f"or set data.root to the directory that holds the IDX files."
    )


def _fashion_files(root: Path, split: str) -> tuple[Path, Path]:
    prefix = "train" if split == "train" else "t10k"
    return _find_idx(root, f"{prefix}-images-idx3-ubyte"), _find_idx(root, f"{prefix}-labels-idx1-ubyte")


def load_fashion_mnist(root: str | Path, split: str, limit: int | None = None) -> ImageSet:
    """Fashion-MNIST (28x28 grayscale) from the original IDX files."""
    _check_split(split)
    _check_limit(limit)
    images_path, labels_path = _fashion_files(Path(root), split)
    images = read_idx(images_path, limit)
    labels = read_idx(labels_path, limit)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{images_path} / {labels_path}: inconsistent shapes {images.shape} / {labels.shape}")
    if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise ValueError(f"{labels_path}: label {labels.max()} out of range 0..9")
    return ImageSet(images[..., None].copy(), labels.astype(np.int64), list(FASHION_MNIST_CLASSES))


def load_digits_set(split: str, limit: int | None = None) -> ImageSet:
    """scikit-learn's 8x8 digits; first 80% is train, the rest test (fixed order)."""
    from sklearn.datasets import load_digits

    _check_split(split)
    _check_limit(limit)
    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = digits.target.astype(np.int64)
    cut = int(round(DIGITS_TRAIN_FRACTION * len(images)))
    sl = slice(0, cut) if split == "train" else slice(cut, None)
    images, labels = images[sl][:limit], labels[sl][:limit]
    return ImageSet(np.ascontiguousarray(images), labels, [str(d) for d in range(10)])


def _center_crop_resize(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    # crop first: resize(box=...) would let the filter read pixels outside the crop
    return img.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)


def load_image_folder(root: str | Path, split: str, image_size: int, limit: int | None = None) -> ImageSet:
    """ImageNet-style ``root/<split>/<class>/*.{png,jpg,jpeg}``, center-cropped and resized to RGB.

    Images are decoded one at a time and only the resized copy is kept.  With
    ``limit`` the files are taken round-robin over classes (i-th file of every
    class before the (i+1)-th), so a small subset still covers all classes.
    """
    _check_limit(limit)
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size!r}")
    split_dir = Path(root) / split
    if not split_dir.is_dir():
        raise FileNotFoundError(f"image folder split directory not found: {split_dir}")
    class_dirs = sorted(d for d in split_dir.iterdir() if d.is_dir())
    if not class_dirs:
        raise ValueError(f"{split_dir}: no class subdirectories")
    files: list[tuple[int, int, Path]] = []
    for label, d in enumerate(class_dirs):
        paths = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        files.extend((rank, label, p) for rank, p in enumerate(paths))
    if not files:
        raise ValueError(f"{split_dir}: no {'/'.join(IMAGE_EXTENSIONS)} images in class folders")
    files.sort(key=lambda t: (t[0], t[1]))
    files = files[:limit]

    images = np.empty((len(files), image_size, image_size, 3), dtype=np.uint8)
    for i, (_, _, path) in enumerate(files):
        try:
            with Image.open(path) as img:
                img.draft("RGB", (image_size, image_size))  # JPEG: decode at reduced scale
                images[i] = np.asarray(_center_crop_resize(img.convert("RGB"), image_size))
        except (OSError, SyntaxError, ValueError) as e:
            raise ValueError(f"{path}: cannot decode image ({e})") from e
    labels = np.array([label for _, label, _ in files], dtype=np.int64)
    return ImageSet(images, labels, [d.name for d in class_dirs])


DATASETS = ("fashion_mnist", "digits", "image_folder")


def check_dataset(name: str, root: str | Path | None) -> None:
    """Cheap preflight: fail before any compute if the dataset cannot be found."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {list(DATASETS)}")
    if name == "fashion_mnist":
        for split in ("train", "test"):
            _fashion_files(Path(root or FASHION_MNIST_DEFAULT_ROOT), split)
    elif name == "image_folder" and not (root and Path(root).is_dir()):
        raise FileNotFoundError(f"image folder data.root not found: {root!r}")


def load_dataset(
    name: str,
    root: str | Path | None,
    split: str,
    limit: int | None = None,
    image_size: int | None = None,
) -> ImageSet:
    """Dispatch on the config's ``data.name``."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {list(DATASETS)}")
    loaders: dict[str, Callable[[], ImageSet]] = {
        "fashion_mnist": lambda: load_fashion_mnist(root or FASHION_MNIST_DEFAULT_ROOT, split, limit),
        "digits": lambda: load_digits_set(split, limit),
        "image_folder": lambda: _load_image_folder_checked(root, split, image_size, limit),
    }
    return loaders[name]()


def _load_image_folder_checked(root: str | Path | None, split: str, image_size: int | None, limit: int | None) -> ImageSet:
    if root is None or image_size is None:
        raise ValueError(f"dataset 'image_folder' needs data.root and image_size (got root={root!r}, image_size={image_size!r})")
    return load_image_folder(root, split, image_size, limit)
