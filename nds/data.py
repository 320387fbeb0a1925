"""Image datasets as uint8 ``[N, H, W, C]`` arrays, in memory or decoded on access.

Every loader returns an :class:`ImageSet` whose images index like ``uint8 [N, H, W, C]``
so the encoders and the image level of the hierarchy see one format whatever the
source.  Small sets (Fashion-MNIST, digits) are in-memory arrays; file datasets
(ImageNet-style folders, COCO-2014) are :class:`ImageFiles`, which decode only
the images a slice asks for, so a million-image set never sits in memory.
Loaders are deterministic: ``limit`` always yields the same samples.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import zlib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image

from nds.config import BAD_IMAGE_POLICIES, Config
from nds.files import write_json

FASHION_MNIST_DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
DIGITS_TRAIN_FRACTION = 0.8


class ImageFiles:
    """Image files as a lazy ``uint8 [N, S, S, 3]`` array: centre-cropped, resized, RGB.

    Indexing (an int, a slice, an index array, or a tuple starting with one of
    those) decodes only the selected files.  It pickles as its path list, so a
    Ray task handed a slice decodes its own shard.  A file that cannot be decoded
    raises a ValueError naming it.
    """

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __init__(self, paths: list[Path], image_size: int) -> None:
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size!r}")
        self.paths = list(paths)
        self.image_size = image_size

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.paths), self.image_size, self.image_size, 3)

    def __len__(self) -> int:
        return len(self.paths)

    def decode(self, path: Path) -> np.ndarray:
        size = self.image_size
        try:
            with Image.open(path) as img:
                img.draft("RGB", (size, size))  # JPEG: decode at reduced scale
                return np.asarray(_center_crop_resize(img.convert("RGB"), size))
        except (OSError, SyntaxError, ValueError) as e:
            raise ValueError(f"{path}: cannot decode image ({e})") from e

    def __getitem__(self, key):
        if isinstance(key, tuple):
            head, rest = key[0], key[1:]
            picked = self[head]
            return picked[rest] if isinstance(head, (int, np.integer)) else picked[(slice(None), *rest)]
        if isinstance(key, (int, np.integer)):
            return self.decode(self.paths[key])
        if isinstance(key, slice):
            return self._stack(range(len(self))[key])
        return self._stack(np.arange(len(self))[np.asarray(key)])

    def _stack(self, indices) -> np.ndarray:
        out = np.empty((len(indices), self.image_size, self.image_size, 3), dtype=np.uint8)
        for j, i in enumerate(indices):
            out[j] = self.decode(self.paths[i])
        return out

    def subset(self, key: slice) -> ImageFiles:
        """The same files, lazily: what a Ray task is handed instead of pixels."""
        return ImageFiles(self.paths[key], self.image_size)

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self.decode(p) for p in self.paths)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        arr = self._stack(range(len(self)))
        return arr if dtype is None else arr.astype(dtype)


@dataclass
class ImageSet:
    images: np.ndarray | ImageFiles  # uint8 [N, H, W, C]
    labels: np.ndarray  # int64 [N]
    class_names: list[str]
    captions: list[list[str]] | None = None  # COCO: every caption of image i
    skipped: dict[str, str] = field(default_factory=dict)  # files left out under data.bad_images=skip: path -> why

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise ValueError(f"ImageSet.images must be uint8 [N,H,W,C], got {self.images.dtype} {self.images.shape}")
        if self.labels.shape != (len(self.images),):
            raise ValueError(f"ImageSet.labels shape {self.labels.shape} does not match {len(self.images)} images")
        if self.captions is not None and len(self.captions) != len(self.images):
            raise ValueError(f"ImageSet.captions has {len(self.captions)} entries for {len(self.images)} images")

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


class BadImagesError(ValueError):
    """Image files that cannot be decoded, under data.bad_images=fail."""


def image_problem(path: Path) -> str:
    """Why an image file cannot be used ("zero-byte", "truncated", "corrupt: ..."), or "" if it decodes."""
    try:
        if path.stat().st_size == 0:
            return "zero-byte"
        with Image.open(path) as img:
            img.draft("RGB", (64, 64))  # JPEG: decode every block at reduced scale; truncation still shows
            img.load()
    except OSError as err:
        return "truncated" if "truncated" in str(err).lower() else f"corrupt: {err}"
    except (SyntaxError, ValueError) as err:
        return f"corrupt: {err}"
    return ""


class ImageScan:
    """Per-file verdicts of :func:`image_problem`, cached under ``cache_dir`` by (path, size, mtime) so a
    folder is decoded once, not once per run; a changed file is checked again."""

    def __init__(self, cache_dir: Path | None, folder: Path):
        digest = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]
        self.path = cache_dir / "image_scan" / f"{digest}.json" if cache_dir else None
        self.table = json.loads(self.path.read_text()) if self.path and self.path.is_file() else {}
        self.changed = False

    def problem(self, path: Path) -> str:
        stat = path.stat() if path.exists() else None
        stamp = [stat.st_size, stat.st_mtime_ns] if stat else None
        cached = self.table.get(str(path))
        if cached and cached[0] == stamp:
            return cached[1]
        verdict = image_problem(path) if stat else "missing"
        self.table[str(path)], self.changed = [stamp, verdict], True
        return verdict

    def save(self) -> None:
        if self.path and self.changed:
            write_json(self.path, self.table)


def select_images(candidates: list, path_of: Callable, limit: int | None, policy: str, scan: ImageScan,
                  where: Path) -> tuple[list, dict[str, str]]:
    """The first ``limit`` usable candidates, in order, and the bad files met on the way (path -> why).
    Under ``fail`` any bad file among those that would be used raises, naming the files and the key."""
    if policy not in BAD_IMAGE_POLICIES:
        raise ValueError(f"data.bad_images={policy!r} must be one of {list(BAD_IMAGE_POLICIES)}")
    chosen, bad = [], {}
    try:
        for item in candidates:
            if limit is not None and len(chosen) >= limit:
                break
            problem = scan.problem(path_of(item))
            if problem:
                bad[str(path_of(item))] = problem
            else:
                chosen.append(item)
    finally:
        scan.save()
    if bad and policy == "fail":
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(_count_kinds(bad).items()))
        shown = "; ".join(f"{p} ({why})" for p, why in list(bad.items())[:5])
        raise BadImagesError(f"{len(bad)} image file(s) under {where} cannot be decoded ({kinds}): {shown}"
                             f"{' ...' if len(bad) > 5 else ''}. Fix or remove them, or set data.bad_images=skip "
                             "to leave them out (the count is reported and logged)")
    return chosen, bad


def _count_kinds(bad: dict[str, str]) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for why in bad.values():
        counts[why.split(":")[0]] += 1
    return dict(counts)


IMAGE_FOLDER_SPLITS = {"train": ("train",), "test": ("test", "val")}  # ImageNet's held-out split is val/


def image_folder_split(root: Path, split: str) -> Path:
    """The folder of a split: ``train/``; for ``test``, ``test/`` or else ImageNet's ``val/``."""
    _check_split(split)
    for name in IMAGE_FOLDER_SPLITS[split]:
        if (root / name).is_dir():
            return root / name
    wanted = " or ".join(f"{root / name}/" for name in IMAGE_FOLDER_SPLITS[split])
    raise FileNotFoundError(f"image folder has no {split} split: expected {wanted} with one folder per class")


def load_image_folder(root: str | Path, split: str, image_size: int, limit: int | None = None,
                      bad_images: str = "fail", cache_dir: Path | None = None) -> ImageSet:
    """ImageNet-style ``root/<split>/<class>/*.{png,jpg,jpeg}`` (ImageNet-100 layout: train/ and val/,
    or train/ and test/), lazily decoded.

    Only the directory listing is read here; pixels are decoded when indexed
    (:class:`ImageFiles`: center-cropped and resized to RGB).  With ``limit`` the
    files are taken round-robin over classes (i-th file of every class before the
    (i+1)-th), so a small subset still covers all classes. Each file taken is checked to decode
    (``bad_images``: ``fail`` raises on a bad one, ``skip`` leaves it out and takes the next).
    """
    _check_limit(limit)
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size!r}")
    split_dir = image_folder_split(Path(root), split)
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
    files, skipped = select_images(files, lambda t: t[2], limit, bad_images, ImageScan(cache_dir, split_dir), split_dir)
    labels = np.array([label for _, label, _ in files], dtype=np.int64)
    return ImageSet(ImageFiles([p for _, _, p in files], image_size), labels, [d.name for d in class_dirs],
                    skipped=skipped)


COCO_SPLITS = {"train": "train2014", "test": "val2014"}  # the paper's FID reference is the val split


def _coco_paths(root: Path, split: str, captions_dir: str | Path | None) -> tuple[Path, Path]:
    _check_split(split)
    name = COCO_SPLITS[split]
    annotations = Path(captions_dir) if captions_dir else root / "annotations"
    json_path, image_dir = annotations / f"captions_{name}.json", root / name
    if not json_path.is_file():
        raise FileNotFoundError(f"COCO-2014 caption annotations not found: {json_path} (unzip annotations_trainval2014.zip "
                                f"into data.root, or set data.captions to the folder holding captions_{name}.json)")
    if not image_dir.is_dir():
        raise FileNotFoundError(f"COCO-2014 image folder not found: {image_dir} (unzip {name}.zip into data.root)")
    return json_path, image_dir


def load_coco_captions(root: str | Path, split: str, image_size: int, limit: int | None = None,
                       captions_dir: str | Path | None = None, bad_images: str = "fail",
                       cache_dir: Path | None = None) -> ImageSet:
    """COCO-2014 images (lazily decoded) with all their captions, ordered by image id.

    ``train`` is train2014, ``test`` is val2014.  Only the annotation JSON is parsed
    up front; labels are all 0 (COCO has no class labels: unconditional or caption-conditioned).
    """
    _check_limit(limit)
    json_path, image_dir = _coco_paths(Path(root), split, captions_dir)
    try:
        with open(json_path) as f:
            data = json.load(f)
        entries = sorted((im["id"], im["file_name"]) for im in data["images"])
        by_image: dict[int, list[str]] = defaultdict(list)
        for ann in data["annotations"]:
            by_image[ann["image_id"]].append(ann["caption"].strip())
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{json_path}: not a COCO captions annotation file ({e!r})") from e
    entries, skipped = select_images(entries, lambda e: image_dir / e[1], limit, bad_images,
                                     ImageScan(cache_dir, image_dir), image_dir)
    images = ImageFiles([image_dir / file_name for _, file_name in entries], image_size)
    captions = [by_image.get(image_id, []) for image_id, _ in entries]
    return ImageSet(images, np.zeros(len(entries), dtype=np.int64), ["coco"], captions, skipped=skipped)


DATASETS = ("fashion_mnist", "digits", "image_folder", "coco2014")
FILE_DATASETS = ("image_folder", "coco2014")  # decoded from files: data.bad_images applies
DATASET_CHANNELS = {"fashion_mnist": 1, "digits": 1, "image_folder": 3, "coco2014": 3}  # images are loaded so


def check_dataset(name: str, root: str | Path | None, captions_dir: str | Path | None = None) -> None:
    """Cheap preflight: fail before any compute if the dataset cannot be found."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {list(DATASETS)}")
    if name == "fashion_mnist":
        for split in ("train", "test"):
            _fashion_files(Path(root or FASHION_MNIST_DEFAULT_ROOT), split)
    elif name == "image_folder":
        if not (root and Path(root).is_dir()):
            raise FileNotFoundError(f"image folder data.root not found: {root!r}")
        for split in IMAGE_FOLDER_SPLITS:
            image_folder_split(Path(root), split)
    elif name == "coco2014":
        if not (root and Path(root).is_dir()):
            raise FileNotFoundError(f"COCO-2014 data.root not found: {root!r}")
        for split, folder in COCO_SPLITS.items():
            if captions_dir:
                _coco_paths(Path(root), split, captions_dir)
            elif not (Path(root) / folder).is_dir():  # preflight knows no data.captions: JSON checked at load
                raise FileNotFoundError(f"COCO-2014 image folder not found: {Path(root) / folder} (unzip {folder}.zip into data.root)")


def load_dataset(
    name: str,
    root: str | Path | None,
    split: str,
    limit: int | None = None,
    image_size: int | None = None,
    captions_dir: str | Path | None = None,
    bad_images: str = "fail",
    cache_dir: Path | None = None,
) -> ImageSet:
    """Dispatch on the config's ``data.name`` (``captions_dir`` is ``data.captions``, COCO only;
    ``bad_images`` and the scan cache apply to the file datasets)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {list(DATASETS)}")
    loaders: dict[str, Callable[[], ImageSet]] = {
        "fashion_mnist": lambda: load_fashion_mnist(root or FASHION_MNIST_DEFAULT_ROOT, split, limit),
        "digits": lambda: load_digits_set(split, limit),
        "image_folder": lambda: load_image_folder(*_root_and_size(name, root, image_size, split), limit,
                                                  bad_images, cache_dir),
        "coco2014": lambda: load_coco_captions(*_root_and_size(name, root, image_size, split), limit, captions_dir,
                                               bad_images, cache_dir),
    }
    return loaders[name]()


def load_config_split(cfg: Config, split: str, limit: int, image_size: int) -> ImageSet:
    """``split`` of the config's dataset (``limit`` 0 = all), with its captions folder and bad-image policy."""
    d = cfg.data
    return load_dataset(d.name, d.root, split, limit or None, image_size, d.captions or None, d.bad_images,
                        cfg.cache_dir)


def _root_and_size(name: str, root: str | Path | None, image_size: int | None, split: str) -> tuple[str | Path, str, int]:
    """(root, split, image_size) for the file datasets, which need both root and size."""
    if root is None or image_size is None:
        raise ValueError(f"dataset {name!r} needs data.root and image_size (got root={root!r}, image_size={image_size!r})")
    return root, split, image_size
