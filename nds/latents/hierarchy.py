"""Frozen hierarchical latents z_1..z_L (paper §3.2) and their feature cache.

Level 1 is the image space (as in the paper's tables): the image resized to the
level, or a VAE's latents (the paper's 256 px -> 32x32x4 z_0, decoded back to
pixels after sampling).  Level l >= 2 is the frozen encoder's feature map, spatially average-pooled to the level's h x w,
reduced to its top-c principal channels (SVD fitted on the training split) and
standardised to zero mean / unit variance per channel.  The conditioning copy
ẑ_l = z_l + σ_l ε limits how much information flows down a level.

Typical use (statistics come from the training split only)::

    compressors = fit_compressors(levels, train_features)
    train = build_hierarchy(levels, train_images, train_features, compressors)
    test = build_hierarchy(levels, test_images, test_features, compressors)
    arrays = compressors_state(compressors)        # save next to the models
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import operator
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from nds.config.specs import LevelShape, check_nesting
from nds.files import atomic_directory
from nds.latents.encoders import EncoderSpec, FrozenEncoder, extract_features, resize_images

log = logging.getLogger(__name__)

CHUNK = 256  # images per chunk when streaming over (possibly memory-mapped) features
SHARD_SIZE = 1024  # images per feature-cache shard file (and per Ray extraction task)


# -- conditioning noise and the image level -------------------------------------------------


def add_condition_noise(z: torch.Tensor, sigma: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """ẑ = z + σ·ε: the information bottleneck on the conditioning copy (σ = 0 returns z)."""
    if not sigma >= 0:
        raise ValueError(f"condition noise sigma must be >= 0, got {sigma!r}")
    if sigma == 0:
        return z
    device = z.device if generator is None else generator.device  # a CPU generator serves any device
    eps = torch.randn(z.shape, generator=generator, dtype=z.dtype, device=device).to(z.device)
    return z + sigma * eps


def image_level(images: np.ndarray, level: LevelShape) -> np.ndarray:
    """uint8 [N, H, W, C] -> float32 [N, C, h, w] in [-1, 1], resized to the level's h x w."""
    if images.ndim != 4 or images.shape[-1] != level.c:
        raise ValueError(f"level 1 ({level}) must have the images' channels, got images of shape {images.shape}")
    out = np.empty((len(images), level.c, level.h, level.w), dtype=np.float32)
    for i in range(0, len(images), CHUNK):
        x = torch.from_numpy(np.array(images[i : i + CHUNK])).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        out[i : i + len(x)] = resize_images(x, level.h, level.w).numpy()
    return out


def images_from_level1(z1: np.ndarray | torch.Tensor) -> np.ndarray:
    """Inverse of :func:`image_level`: float [N, C, h, w] (clipped to [-1, 1]) -> uint8 [N, h, w, C]."""
    z = z1.detach().float().cpu().numpy() if isinstance(z1, torch.Tensor) else np.asarray(z1, dtype=np.float32)
    return np.clip(np.rint((z + 1.0) * 127.5), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


@torch.no_grad()
def images_from_vae_latents(z1: np.ndarray | torch.Tensor, vae: torch.nn.Module, batch_size: int = 16) -> np.ndarray:
    """VAE level 1 back to pixels: scaled latents [N, c, h, w] -> uint8 [N, h*f, w*f, 3]."""
    z = torch.as_tensor(np.asarray(z1, dtype=np.float32)) if not isinstance(z1, torch.Tensor) else z1.detach().float().cpu()
    return np.concatenate([images_from_level1(vae.decode(z[i : i + batch_size])) for i in range(0, len(z), batch_size)])


def pool(features: np.ndarray, h: int, w: int) -> np.ndarray:
    """Adaptive spatial average pooling of float [N, C, H, W] to [N, C, h, w]."""
    if features.shape[-2:] == (h, w):
        return np.asarray(features, dtype=np.float32)
    x = torch.from_numpy(np.array(features, dtype=np.float32))
    return F.adaptive_avg_pool2d(x, (h, w)).numpy()


# -- channel compression ------------------------------------------------------------------------


class ChannelCompressor:
    """Top-c principal channels, standardised, fitted by streaming.

    ``partial_fit`` keeps only a count, a sum and a C x C Gram matrix (float64,
    around a shift taken from the first chunk to avoid cancellation), so memory
    stays flat in the number of samples.  The variance of component i is its
    eigenvalue, so standardisation needs no second pass.
    """

    def __init__(self) -> None:
        self.count = 0
        self._shift: np.ndarray | None = None
        self._sum: np.ndarray | None = None
        self._gram: np.ndarray | None = None
        self.mean: np.ndarray | None = None  # [C]
        self.components: np.ndarray | None = None  # [c, C], rows sign-fixed
        self.std: np.ndarray | None = None  # [c]
        self.explained_variance_ratio: float | None = None

    @property
    def fitted(self) -> bool:
        return self.components is not None

    def partial_fit(self, x: np.ndarray) -> ChannelCompressor:
        """Accumulate rows ``x [n, C]``."""
        if self.fitted:
            raise RuntimeError("ChannelCompressor.partial_fit after finish()")
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or (self._shift is not None and x.shape[1] != len(self._shift)):
            expected = "[n, C]" if self._shift is None else f"[n, {len(self._shift)}]"
            raise ValueError(f"ChannelCompressor.partial_fit expects {expected}, got {x.shape}")
        if len(x) == 0:
            return self
        if self._shift is None:
            self._shift = x.mean(axis=0)
            self._sum = np.zeros_like(self._shift)
            self._gram = np.zeros((x.shape[1], x.shape[1]))
        d = x - self._shift
        self.count += len(x)
        self._sum += d.sum(axis=0)
        self._gram += d.T @ d
        return self

    def finish(self, c: int) -> ChannelCompressor:
        """Compute the mean, the top-``c`` directions and their std; drops the accumulators."""
        if self._gram is None or self.count < 2:
            raise ValueError(f"ChannelCompressor needs at least 2 samples to fit, got {self.count}")
        if not 1 <= c <= len(self._shift):
            raise ValueError(f"cannot keep {c} channels of {len(self._shift)}")
        delta = self._sum / self.count
        cov = self._gram / self.count - np.outer(delta, delta)
        size = len(cov)
        # only the top c eigenpairs: ~30x faster than a full eigh for 768 channels
        eigvals, eigvecs = scipy.linalg.eigh(cov, subset_by_index=[size - c, size - 1])  # ascending
        order = np.argsort(eigvals)[::-1]
        components = eigvecs[:, order].T
        pivots = np.abs(components).argmax(axis=1)
        components *= np.sign(components[np.arange(c), pivots])[:, None]  # largest entry positive
        variances = np.maximum(eigvals[order], 1e-12)
        self.mean = self._shift + delta
        self.components = components
        self.std = np.sqrt(variances)
        self.explained_variance_ratio = float(eigvals[order].sum() / max(np.trace(cov), 1e-300))  # trace = total variance
        self._shift = self._sum = self._gram = None
        return self

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Rows ``[n, C]`` -> standardised components ``[n, c]`` (float32)."""
        if not self.fitted:
            raise RuntimeError("ChannelCompressor.transform before finish()")
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != len(self.mean):
            raise ValueError(f"ChannelCompressor.transform expects [n, {len(self.mean)}], got {x.shape}")
        return (((x - self.mean) @ self.components.T) / self.std).astype(np.float32)

    def state_dict(self) -> dict[str, np.ndarray]:
        if not self.fitted:
            raise RuntimeError("ChannelCompressor.state_dict before finish()")
        return {
            "mean": self.mean,
            "components": self.components,
            "std": self.std,
            "count": np.array(self.count),
            "explained_variance_ratio": np.array(self.explained_variance_ratio),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, np.ndarray]) -> ChannelCompressor:
        missing = {"mean", "components", "std", "count", "explained_variance_ratio"} - set(state)
        if missing:
            raise ValueError(f"ChannelCompressor state is missing {sorted(missing)}")
        comp = cls()
        comp.mean = np.asarray(state["mean"], dtype=np.float64)
        comp.components = np.asarray(state["components"], dtype=np.float64)
        comp.std = np.asarray(state["std"], dtype=np.float64)
        comp.count = int(state["count"])
        comp.explained_variance_ratio = float(state["explained_variance_ratio"])
        if comp.components.shape != (len(comp.std), len(comp.mean)):
            raise ValueError(f"ChannelCompressor state: components {comp.components.shape} do not match mean/std")
        return comp


def _rows(x: np.ndarray) -> np.ndarray:
    """[n, C, h, w] -> [n*h*w, C]: every spatial position is a sample of the channel distribution."""
    return x.transpose(0, 2, 3, 1).reshape(-1, x.shape[1])


def _check_features(levels: list[LevelShape], features: np.ndarray) -> None:
    if features.ndim != 4:
        raise ValueError(f"features must be [N, C, h, w], got shape {features.shape}")
    check_nesting(levels, tuple(features.shape[1:]))


# -- the hierarchy ----------------------------------------------------------------------------


@dataclass
class Hierarchy:
    levels: list[LevelShape]
    latents: list[np.ndarray]  # level k (index k-1) -> float32 [N, c, h, w]
    compressors: list[ChannelCompressor | None]  # None for level 1 (image space)

    def latent(self, level: int) -> np.ndarray:
        """z_level with the paper's 1-based level numbers."""
        return self.latents[level - 1]


def fit_compressors(levels: list[LevelShape], train_features: np.ndarray) -> list[ChannelCompressor | None]:
    """Fit one compressor per level >= 2 on the training features, in a single streaming pass."""
    _check_features(levels, train_features)
    compressors = [None] + [ChannelCompressor() for _ in levels[1:]]
    for i in range(0, len(train_features), CHUNK):
        chunk = train_features[i : i + CHUNK]
        for level, comp in zip(levels[1:], compressors[1:]):
            comp.partial_fit(_rows(pool(chunk, level.h, level.w)))
    for k, (level, comp) in enumerate(zip(levels[1:], compressors[1:]), start=2):
        comp.finish(level.c)
        log.info("level %d (%s): top-%d channels keep %.1f%% of the pooled feature variance",
                 k, level, level.c, 100 * comp.explained_variance_ratio)
    return compressors


def build_hierarchy(
    levels: list[LevelShape],
    images: np.ndarray,
    features: np.ndarray | None,
    compressors: list[ChannelCompressor | None],
    level1: np.ndarray | None = None,
) -> Hierarchy:
    """z_1..z_L for one split, using compressors fitted on the training split.

    ``features`` may be None only for a single-level (image-only) hierarchy.
    ``level1`` replaces the resized image as z_1 (e.g. VAE latents, [N, c, h, w]).
    """
    if len(compressors) != len(levels):
        raise ValueError(f"{len(compressors)} compressors for {len(levels)} levels")
    if level1 is None:
        latents = [image_level(images, levels[0])]
    elif tuple(level1.shape) != (len(images), levels[0].c, levels[0].h, levels[0].w):
        raise ValueError(f"level 1 ({levels[0]}) latents have shape {tuple(level1.shape)[1:]}, "
                         f"expected {(levels[0].c, levels[0].h, levels[0].w)}")
    else:
        latents = [np.asarray(level1, dtype=np.float32)]
    if len(levels) > 1:
        if features is None or len(features) != len(images):
            raise ValueError(f"need encoder features for all {len(images)} images, got {None if features is None else len(features)}")
        latents += encode_levels(levels, features, compressors)
    return Hierarchy(list(levels), latents, list(compressors))


def encode_levels(levels: list[LevelShape], features: np.ndarray,
                  compressors: list[ChannelCompressor | None]) -> list[np.ndarray]:
    """z_2..z_L of encoder features with already-fitted compressors, streamed in chunks.

    The same transform serves the training targets and any later images (e.g. KNN queries).
    """
    _check_features(levels, features)
    latents = []
    for k, (level, comp) in enumerate(zip(levels[1:], compressors[1:]), start=2):
        if comp is None or not comp.fitted or comp.components.shape != (level.c, features.shape[1]):
            raise ValueError(f"level {k} ({level}): compressor does not map {features.shape[1]} channels to {level.c}")
        z = np.empty((len(features), level.c, level.h, level.w), dtype=np.float32)
        for i in range(0, len(features), CHUNK):
            rows = comp.transform(_rows(pool(features[i : i + CHUNK], level.h, level.w)))
            z[i : i + CHUNK] = rows.reshape(-1, level.h, level.w, level.c).transpose(0, 3, 1, 2)
        latents.append(z)
    return latents


def compressors_state(compressors: list[ChannelCompressor | None]) -> dict[str, np.ndarray]:
    """Flat ``{"level2.mean": ..., ...}`` arrays, for np.savez or :class:`FeatureCache`."""
    return {
        f"level{k}.{name}": arr
        for k, comp in enumerate(compressors, start=1)
        if comp is not None
        for name, arr in comp.state_dict().items()
    }


def compressors_from_state(state: dict[str, np.ndarray], n_levels: int) -> list[ChannelCompressor | None]:
    """Inverse of :func:`compressors_state` for a hierarchy of ``n_levels``."""
    compressors: list[ChannelCompressor | None] = [None]
    for k in range(2, n_levels + 1):
        prefix = f"level{k}."
        part = {key[len(prefix):]: v for key, v in state.items() if key.startswith(prefix)}
        if not part:
            raise ValueError(f"compressor state has no entries for level {k} (keys {prefix}*)")
        compressors.append(ChannelCompressor.from_state_dict(part))
    return compressors


# -- feature cache ------------------------------------------------------------------------------

CACHE_VERSION = 1  # bump when preprocessing changes so old entries stop matching
_MANIFEST = "manifest.json"
_KEY_RE = re.compile(r"^[0-9a-f]{64}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


def _json_default(value: object) -> str:
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cache key part of type {type(value).__name__} is not JSON-serialisable: {value!r}")


class ShardedArray:
    """Row shards (read-only memmaps) that index like one ``[N, ...]`` array.

    Integer, slice and index-array reads touch only the shards they need, so a
    feature table far larger than memory streams chunk by chunk.
    """

    def __init__(self, shards: list[np.ndarray], shape: tuple[int, ...], dtype: np.dtype | str) -> None:
        self.shards = shards
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self.ndim = len(self.shape)
        self._starts = np.cumsum([0, *(len(s) for s in shards)])
        if self._starts[-1] != self.shape[0]:
            raise ValueError(f"shards hold {self._starts[-1]} rows, shape says {self.shape[0]}")

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key):
        if isinstance(key, tuple):
            head, rest = key[0], key[1:]
            picked = self[head]
            return picked[rest] if isinstance(head, (int, np.integer)) else picked[(slice(None), *rest)]
        n = self.shape[0]
        if isinstance(key, (int, np.integer)):
            i = operator.index(key) + (n if key < 0 else 0)
            if not 0 <= i < n:
                raise IndexError(f"index {key} is out of bounds for {n} rows")
            s = int(np.searchsorted(self._starts, i, side="right")) - 1
            return np.asarray(self.shards[s][i - self._starts[s]])
        if isinstance(key, slice) and key.indices(n)[2] == 1:
            start, stop, _ = key.indices(n)
            parts = [shard[max(start - s0, 0) : min(stop - s0, len(shard))]
                     for shard, s0 in zip(self.shards, self._starts) if s0 < stop and s0 + len(shard) > start]
            return np.concatenate(parts) if parts else np.empty((0, *self.shape[1:]), self.dtype)
        rows = np.arange(n)[key]
        out = np.empty((len(rows), *self.shape[1:]), self.dtype)
        which = np.searchsorted(self._starts, rows, side="right") - 1
        for s in np.unique(which):
            mask = which == s
            out[mask] = self.shards[s][rows[mask] - self._starts[s]]
        return out

    def __iter__(self) -> Iterator[np.ndarray]:
        for shard in self.shards:
            yield from shard

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        arr = self[:]
        return arr if dtype is None else arr.astype(dtype)


class _Stage:
    """Arrays being written into a cache entry's temporary directory."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.arrays: dict[str, dict] = {}

    def _path(self, name: str) -> Path:
        if not _NAME_RE.match(name) or name in self.arrays:
            raise ValueError(f"bad or duplicate cache array name {name!r}")
        return self.tmp / f"{name}.npy"

    def array(self, name: str, shape: tuple[int, ...], dtype: np.dtype | str = np.float32) -> np.memmap:
        """A writable .npy memmap to fill in place (e.g. features too large for RAM)."""
        arr = np.lib.format.open_memmap(self._path(name), mode="w+", dtype=dtype, shape=shape)
        self.arrays[name] = {"shape": list(shape), "dtype": np.dtype(dtype).str}
        return arr

    def sharded(self, name: str, shape: tuple[int, ...], shard_rows: int,
                dtype: np.dtype | str = np.float32) -> list[tuple[Path, int, int]]:
        """Pre-created .npy shard files of ``shard_rows`` rows: ``(path, start, stop)`` each.

        Writers (this process or Ray tasks) open each with ``open_memmap(path, mode="r+")``.
        """
        if shard_rows < 1:
            raise ValueError(f"shard size must be >= 1, got {shard_rows}")
        self._path(name)  # validates the name
        shards = []
        for k, start in enumerate(range(0, shape[0], shard_rows)):
            stop = min(start + shard_rows, shape[0])
            path = self.tmp / f"{name}.{k:05d}.npy"
            np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(stop - start, *shape[1:]))  # header + sparse file
            shards.append((path, start, stop))
        self.arrays[name] = {"shape": list(shape), "dtype": np.dtype(dtype).str, "shards": [b - a for _, a, b in shards]}
        return shards

    def put(self, name: str, arr: np.ndarray) -> None:
        arr = np.asarray(arr, order="C")  # not ascontiguousarray: it turns 0-d scalars into 1-d
        np.save(self._path(name), arr)
        self.arrays[name] = {"shape": list(arr.shape), "dtype": arr.dtype.str}


def _load_array(entry: Path, name: str, spec: dict) -> np.ndarray | ShardedArray:
    def checked(path: Path, shape: list[int]) -> np.ndarray:
        arr = np.load(path, mmap_mode="r")
        if list(arr.shape) != shape or arr.dtype.str != spec["dtype"]:
            raise ValueError(f"{path.name} is {arr.dtype.str} {list(arr.shape)}, manifest says {spec['dtype']} {shape}")
        return arr

    if "shards" not in spec:
        return checked(entry / f"{name}.npy", spec["shape"])
    shards = [checked(entry / f"{name}.{k:05d}.npy", [rows, *spec["shape"][1:]]) for k, rows in enumerate(spec["shards"])]
    return ShardedArray(shards, tuple(spec["shape"]), spec["dtype"])


class FeatureCache:
    """Content-keyed directory of .npy arrays, written atomically.

    An entry is ``root/<sha256 key>/`` with one ``<name>.npy`` per array and a
    ``manifest.json`` written last.  Entries are assembled in a hidden temp dir
    in ``root``, fsynced, then renamed into place, so a crash leaves at most a
    hidden staging dir that is never read (``nds.files.atomic_directory``).  Loading checks the manifest against the
    files, so a damaged entry reads as a miss, never as data.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def key(self, **parts: object) -> str:
        """sha256 of the canonical JSON of everything that determines the cached result."""
        blob = json.dumps({"cache_version": CACHE_VERSION, **parts}, sort_keys=True,
                          separators=(",", ":"), default=_json_default)
        return hashlib.sha256(blob.encode()).hexdigest()

    def _entry(self, key: str) -> Path:
        if not _KEY_RE.match(key):
            raise ValueError(f"bad cache key {key!r}: expected a sha256 hex digest from FeatureCache.key()")
        return self.root / key

    def load(self, key: str) -> dict[str, np.ndarray | ShardedArray] | None:
        """The entry's arrays (read-only memmaps), or None if absent or incomplete."""
        entry = self._entry(key)
        if not entry.is_dir():
            return None
        try:
            manifest = json.loads((entry / _MANIFEST).read_text())
            if manifest.get("key") != key:
                raise ValueError(f"manifest key {manifest.get('key')!r} does not match")
            arrays = {name: _load_array(entry, name, spec) for name, spec in manifest["arrays"].items()}
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("ignoring incomplete feature cache entry %s: %s", entry, e)
            return None
        return arrays

    @contextmanager
    def stage(self, key: str, meta: dict | None = None) -> Iterator[_Stage]:
        """Write an entry: fill arrays inside the ``with``; it is published only if the block succeeds."""
        # a concurrent writer that published first won: its entry is kept
        with atomic_directory(self._entry(key), keep_existing=lambda _: self.load(key) is not None) as tmp:
            stage = _Stage(tmp)
            yield stage
            manifest = {"key": key, "meta": meta or {}, "arrays": stage.arrays}
            (tmp / _MANIFEST).write_text(json.dumps(manifest, indent=1, default=_json_default))

    def save(self, key: str, arrays: dict[str, np.ndarray], meta: dict | None = None) -> None:
        with self.stage(key, meta) as stage:
            for name, arr in arrays.items():
                stage.put(name, arr)


def cached_features(
    cache: FeatureCache,
    encoder: FrozenEncoder | EncoderSpec,
    dataset_key_parts: dict,
    images: np.ndarray,
    batch_size: int = 64,
    bf16: bool = False,
    shard_size: int = SHARD_SIZE,
    cpus_per_task: float = 1.0,
    check: Callable[[tuple[int, int, int]], None] | None = None,
) -> ShardedArray:
    """Encoder features of ``images``, computed once and then memory-mapped from the cache.

    ``dataset_key_parts`` must identify the images (dataset name, root, split,
    limit, image size); the key also covers the encoder's identity and bf16.
    Given an :class:`EncoderSpec`, a cache hit never builds the network.  The
    features are written shard by shard (``shard_size`` images each): by Ray tasks
    (``cpus_per_task`` each) when Ray is initialised, else in this process.  On a
    cluster the cache directory must be on storage every node sees.  ``check`` sees
    the feature shape ``(C, h, w)`` before any image is encoded (e.g. to reject a
    hierarchy spec that cannot nest) and may raise.
    """
    spec = encoder.spec if isinstance(encoder, FrozenEncoder) else encoder
    identity = encoder.identity if isinstance(encoder, FrozenEncoder) else encoder.identity()
    key = cache.key(kind="features", dataset=dataset_key_parts, encoder=identity,
                    bf16=bf16, images_shape=list(images.shape))
    hit = cache.load(key)
    if hit is not None:
        log.info("feature cache hit %s (%s)", key[:12], identity["name"])
        if check is not None:
            check(hit["features"].shape[1:])
        return hit["features"]
    if not isinstance(encoder, FrozenEncoder):
        encoder = encoder.build()
    if check is not None:
        check(encoder.feature_shape)
    log.info("feature cache miss %s: encoding %d images with %s", key[:12], len(images), encoder.name)
    with cache.stage(key, meta={"dataset": dataset_key_parts, "encoder": identity, "bf16": bf16}) as stage:
        shards = stage.sharded("features", (len(images), *encoder.feature_shape), shard_size)
        with tqdm(total=len(images), desc=f"{encoder.name} features", unit="img", mininterval=2.0) as bar:
            if spec is not None and len(shards) > 1 and _ray_initialized():
                _extract_with_ray(spec, images, shards, batch_size, bf16, cpus_per_task, bar)
            else:
                for path, start, stop in shards:
                    out = np.lib.format.open_memmap(path, mode="r+")
                    extract_features(encoder, _image_shard(images, start, stop), batch_size, bf16=bf16, out=out,
                                     progress=lambda done, n, start=start: bar.update(start + done - bar.n))
                    out.flush()
                    del out
    return cache.load(key)["features"]


def _image_shard(images, start: int, stop: int):
    """A shard of the images without decoding it (lazy file sets stay lazy, memmaps stay mapped)."""
    return images.subset(slice(start, stop)) if hasattr(images, "subset") else images[start:stop]


def _ray_initialized() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


@functools.lru_cache(maxsize=1)
def _worker_encoder(spec: EncoderSpec) -> FrozenEncoder:
    """One build per Ray worker process, reused by every shard it is given."""
    return spec.build()


def _extract_shard(spec: EncoderSpec, images, path: str, batch_size: int, bf16: bool) -> int:
    out = np.lib.format.open_memmap(path, mode="r+")
    extract_features(_worker_encoder(spec), images, batch_size, bf16=bf16, out=out)
    out.flush()
    return len(images)


def _extract_with_ray(spec: EncoderSpec, images, shards: list[tuple[Path, int, int]], batch_size: int,
                      bf16: bool, cpus_per_task: float, bar: tqdm) -> None:
    """One Ray task per shard; each writes its own shard file of the staged entry."""
    import ray

    task = ray.remote(num_cpus=cpus_per_task, max_retries=2)(_extract_shard)
    pending = [task.remote(spec, _image_shard(images, start, stop), str(path), batch_size, bf16) for path, start, stop in shards]
    log.info("extracting %d shards with Ray tasks (%.2g CPUs each)", len(pending), cpus_per_task)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        bar.update(ray.get(done[0]))
