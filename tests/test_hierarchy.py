import json
import os

import numpy as np
import pytest
import torch

import nds.latents.hierarchy as hierarchy
from nds.config.specs import LevelShape, check_nesting, parse_spec
from nds.latents.encoders import EncoderSpec, build_encoder
from nds.latents.hierarchy import (
    ChannelCompressor,
    FeatureCache,
    add_condition_noise,
    build_hierarchy,
    cached_features,
    compressors_from_state,
    compressors_state,
    fit_compressors,
    image_level,
    images_from_level1,
    pool,
)

COCO = "32x32x4, 8x8x64, 6x6x56, 4x4x48, 2x2x40"
IMAGENET = "32x32x4, 6x6x32, 4x4x24, 2x2x16"


# -- spec ---------------------------------------------------------------------------------


def test_parse_spec_paper_hierarchies():
    levels = parse_spec(COCO)
    assert levels[0] == LevelShape(32, 32, 4) and levels[-1] == LevelShape(2, 2, 40)
    assert [str(level) for level in levels] == [s.strip() for s in COCO.split(",")]
    assert parse_spec(IMAGENET)[1] == LevelShape(6, 6, 32)
    assert parse_spec("28X28x1,4 x 4 x 32 , 2×2×16") == [LevelShape(28, 28, 1), LevelShape(4, 4, 32), LevelShape(2, 2, 16)]
    check_nesting(parse_spec(COCO))
    check_nesting(parse_spec(IMAGENET), feature_shape=(768, 14, 14))


@pytest.mark.parametrize("spec, token", [
    ("", "''"), ("28x28x1, 4x4", "'4x4'"), ("28x28x1,,2x2x1", "''"),
    ("8x8x0", "'8x8x0'"), ("axbxc", "'axbxc'"), ("4x4x-2", "'4x4x-2'"),
])
def test_parse_spec_rejects_bad_tokens(spec, token):
    with pytest.raises(ValueError, match=f"bad level {token}"):
        parse_spec(spec)


@pytest.mark.parametrize("spec, feature_shape, message", [
    ("8x8x1, 4x4x8", None, r"level 2 \(4x4x8\) has more dimensions \(128\)"),
    ("32x32x4, 8x8x64, 10x10x8", None, r"level 3 \(10x10x8\) is spatially larger"),
    ("28x28x1, 6x6x16", (1280, 4, 4), r"level 2 \(6x6x16\) is larger than the encoder's 4x4"),
    ("64x64x3, 2x2x2000", (1280, 4, 4), r"level 2 \(2x2x2000\) has more channels than the encoder's 1280"),
])
def test_check_nesting_names_the_bad_level(spec, feature_shape, message):
    with pytest.raises(ValueError, match=message):
        check_nesting(parse_spec(spec), feature_shape)


# -- channel compression ------------------------------------------------------------------


def _anisotropic(n: int, dim: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian data whose variance is dominated by one known unit direction."""
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=dim)
    direction /= np.linalg.norm(direction)
    x = rng.normal(size=(n, dim)) * np.linspace(1.0, 0.2, dim) + 10 * rng.normal(size=(n, 1)) * direction + 50.0
    return x, direction


def test_streaming_fit_matches_one_shot_svd():
    x, _ = _anisotropic(1000)
    comp = ChannelCompressor()
    for chunk in np.array_split(x, 7):
        comp.partial_fit(chunk)
    comp.finish(5)
    centred = x - x.mean(axis=0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    np.testing.assert_allclose(comp.mean, x.mean(axis=0), rtol=1e-10)
    np.testing.assert_allclose(np.abs(np.sum(comp.components * vt[:5], axis=1)), 1.0, atol=1e-8)
    np.testing.assert_allclose(comp.std, s[:5] / np.sqrt(len(x)), rtol=1e-8)
    z = comp.transform(x)
    assert z.shape == (1000, 5) and z.dtype == np.float32
    np.testing.assert_allclose(z.mean(axis=0), 0, atol=1e-4)
    np.testing.assert_allclose(z.std(axis=0), 1, atol=1e-4)
    np.testing.assert_allclose(np.corrcoef(z.T), np.eye(5), atol=1e-4)  # principal axes: decorrelated


def test_leading_component_is_the_dominant_direction_and_sign_is_fixed():
    x, direction = _anisotropic(2000, seed=1)
    comp = ChannelCompressor().partial_fit(x).finish(3)
    assert abs(comp.components[0] @ direction) > 0.99
    assert comp.explained_variance_ratio > 0.9
    flipped = ChannelCompressor().partial_fit(x[::-1]).finish(3)  # same data, other order
    np.testing.assert_allclose(flipped.components, comp.components, atol=1e-8)
    assert (comp.components[np.arange(3), np.abs(comp.components).argmax(axis=1)] > 0).all()


def test_compressor_state_round_trip_and_misuse():
    x, _ = _anisotropic(300)
    comp = ChannelCompressor().partial_fit(x).finish(4)
    again = ChannelCompressor.from_state_dict({k: np.array(v) for k, v in comp.state_dict().items()})
    np.testing.assert_array_equal(again.transform(x), comp.transform(x))
    with pytest.raises(RuntimeError, match="after finish"):
        comp.partial_fit(x)
    with pytest.raises(ValueError, match=r"\[n, 12\]"):
        comp.transform(x[:, :5])
    with pytest.raises(ValueError, match="cannot keep 13 channels of 12"):
        ChannelCompressor().partial_fit(x).finish(13)
    with pytest.raises(ValueError, match="at least 2 samples"):
        ChannelCompressor().finish(1)
    with pytest.raises(ValueError, match="missing"):
        ChannelCompressor.from_state_dict({"mean": comp.mean})


# -- building the hierarchy ------------------------------------------------------------------


def test_pool_is_block_average():
    x = np.arange(2 * 3 * 4 * 4, dtype=np.float32).reshape(2, 3, 4, 4)
    expected = x.reshape(2, 3, 2, 2, 2, 2).mean(axis=(3, 5))
    np.testing.assert_allclose(pool(x, 2, 2), expected)
    np.testing.assert_array_equal(pool(x, 4, 4), x)
    np.testing.assert_allclose(pool(x, 1, 1)[..., 0, 0], x.mean(axis=(2, 3)))


def test_image_level_round_trip_and_channel_check():
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    z1 = image_level(images, LevelShape(8, 8, 3))
    assert z1.shape == (5, 3, 8, 8) and z1.min() >= -1 and z1.max() <= 1
    np.testing.assert_array_equal(images_from_level1(z1), images)
    out_of_range = torch.tensor([-5.0, 5.0]).view(1, 1, 1, 2)  # samples overshoot: clip
    assert images_from_level1(out_of_range).tolist() == [[[[0], [255]]]]
    assert image_level(images, LevelShape(4, 4, 3)).shape == (5, 3, 4, 4)
    with pytest.raises(ValueError, match=r"level 1 \(8x8x1\) must have the images' channels"):
        image_level(images, LevelShape(8, 8, 1))


def test_paper_hierarchy_on_random_features():
    levels = parse_spec(COCO)
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(96, 96)).astype(np.float32)  # correlated channels, like real features
    def features(n):
        return np.einsum("dc,nchw->ndhw", mixing, rng.normal(size=(n, 96, 14, 14)).astype(np.float32))
    train_f, test_f = features(60), features(10)
    train_x = rng.integers(0, 256, (60, 32, 32, 4), dtype=np.uint8)
    test_x = rng.integers(0, 256, (10, 32, 32, 4), dtype=np.uint8)

    compressors = fit_compressors(levels, train_f)
    train = build_hierarchy(levels, train_x, train_f, compressors)
    test = build_hierarchy(levels, test_x, test_f, compressors)
    assert [z.shape[1:] for z in train.latents] == [(l.c, l.h, l.w) for l in levels]
    assert test.latent(5).shape == (10, 40, 2, 2) and compressors[0] is None
    for z in train.latents[1:]:
        per_channel = z.transpose(1, 0, 2, 3).reshape(z.shape[1], -1)
        np.testing.assert_allclose(per_channel.mean(axis=1), 0, atol=1e-3)
        np.testing.assert_allclose(per_channel.std(axis=1), 1, atol=1e-3)
        assert z.dtype == np.float32

    restored = compressors_from_state(compressors_state(compressors), len(levels))
    again = build_hierarchy(levels, test_x, test_f, restored)
    for a, b in zip(again.latents, test.latents):
        np.testing.assert_array_equal(a, b)

    with pytest.raises(ValueError, match=r"level 2 \(8x8x64\) is larger than the encoder's 4x4"):
        fit_compressors(levels, train_f[:, :, :4, :4])
    with pytest.raises(ValueError, match="level 3"):
        compressors_from_state({k: v for k, v in compressors_state(compressors).items() if "level3" not in k}, 5)


def test_single_level_needs_no_features():
    images = np.zeros((3, 4, 4, 1), dtype=np.uint8)
    h = build_hierarchy([LevelShape(4, 4, 1)], images, None, [None])
    assert len(h.latents) == 1 and (h.latents[0] == -1).all()


def test_condition_noise():
    z = torch.zeros(20_000)
    assert add_condition_noise(z, 0.0) is z
    a = add_condition_noise(z, 0.5, generator=torch.Generator().manual_seed(0))
    b = add_condition_noise(z, 0.5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b)
    assert abs(a.std().item() - 0.5) < 0.02 and abs(a.mean().item()) < 0.02
    for bad in (-0.1, float("nan")):
        with pytest.raises(ValueError, match="sigma must be >= 0"):
            add_condition_noise(z, bad)


# -- feature cache ------------------------------------------------------------------------------

PARTS = dict(dataset="fashion_mnist", root="/data", split="train", limit=100,
             encoder="efficientnet_lite0", weights=None, image_size=128)


def test_cache_key_is_canonical_and_covers_every_part():
    cache = FeatureCache("unused")
    key = cache.key(**PARTS)
    assert key == cache.key(**dict(reversed(list(PARTS.items()))))
    changed = {"dataset": "digits", "root": "/other", "split": "test", "limit": 101,
               "encoder": "pixels", "weights": "w.pth", "image_size": 224}
    keys = {cache.key(**{**PARTS, name: value}) for name, value in changed.items()}
    assert len(keys) == len(changed) and key not in keys
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        cache.key(thing=object())


def test_cache_round_trip_is_memory_mapped(tmp_path):
    cache = FeatureCache(tmp_path / "cache")
    key = cache.key(**PARTS)
    assert cache.load(key) is None
    arrays = {"features": np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2), "labels": np.array([3, 1])}
    cache.save(key, arrays, meta={"note": "test"})
    loaded = cache.load(key)
    assert set(loaded) == {"features", "labels"}
    for name, arr in arrays.items():
        np.testing.assert_array_equal(loaded[name], arr)
        assert isinstance(loaded[name], np.memmap) and not loaded[name].flags.writeable
    assert os.listdir(tmp_path / "cache") == [key]  # no temp dir left behind
    with pytest.raises(ValueError, match="bad cache key"):
        cache.load("../etc")


def test_crashed_or_damaged_entries_read_as_misses(tmp_path):
    cache = FeatureCache(tmp_path)
    key = cache.key(**PARTS)
    with pytest.raises(RuntimeError, match="killed"):
        with cache.stage(key) as stage:
            stage.put("features", np.ones(3))
            raise RuntimeError("killed mid-write")
    assert cache.load(key) is None and os.listdir(tmp_path) == []

    # A crash after the rename cannot happen, but a hand-copied entry without its manifest can.
    (tmp_path / key).mkdir()
    np.save(tmp_path / key / "features.npy", np.ones(3))
    assert cache.load(key) is None
    # Temp dirs of a killed writer are never read, and an invalid entry is replaced on save.
    (tmp_path / f".tmp-{key[:16]}-dead").mkdir()
    cache.save(key, {"features": np.zeros(4)})
    np.testing.assert_array_equal(cache.load(key)["features"], np.zeros(4))

    manifest = json.loads((tmp_path / key / "manifest.json").read_text())
    manifest["arrays"]["features"]["shape"] = [5]
    (tmp_path / key / "manifest.json").write_text(json.dumps(manifest))
    assert cache.load(key) is None
    np.save(tmp_path / key / "features.npy", np.zeros(5))
    (tmp_path / key / "features.npy").write_bytes((tmp_path / key / "features.npy").read_bytes()[:-8])
    assert cache.load(key) is None  # truncated array file


def test_cached_features_compute_once(tmp_path, monkeypatch):
    cache = FeatureCache(tmp_path)
    encoder = build_encoder("random_cnn", image_size=16)
    images = np.random.default_rng(0).integers(0, 256, (6, 16, 16, 1), dtype=np.uint8)
    calls = []
    real = hierarchy.extract_features
    monkeypatch.setattr(hierarchy, "extract_features", lambda *a, **k: calls.append(1) or real(*a, **k))
    parts = {"name": "synthetic", "split": "train", "limit": 6}
    first = cached_features(cache, encoder, parts, images, batch_size=4)
    second = cached_features(cache, encoder, parts, images, batch_size=4)
    assert len(calls) == 1 and first.shape == (6, 64, 2, 2)
    np.testing.assert_array_equal(first, second)
    np.testing.assert_allclose(second, encoder(torch.from_numpy(images)).numpy(), rtol=1e-5, atol=1e-6)
    cached_features(cache, encoder, {**parts, "split": "test"}, images, batch_size=4)
    assert len(calls) == 2


def test_imagenet_spec_on_vit_sized_features():
    """The paper's ImageNet hierarchy on a (768, 14, 14) map, as MoCo-v3 ViT-B/16 gives at 224 px."""
    levels = parse_spec(IMAGENET)
    features = np.random.default_rng(0).normal(size=(6, 768, 14, 14)).astype(np.float32)
    compressors = fit_compressors(levels, features)
    h = build_hierarchy(levels, np.zeros((6, 32, 32, 4), np.uint8), features, compressors)
    assert [z.shape[1:] for z in h.latents] == [(4, 32, 32), (32, 6, 6), (24, 4, 4), (16, 2, 2)]
    for z, again in zip(h.latents[1:], hierarchy.encode_levels(levels, features, compressors)):
        np.testing.assert_array_equal(z, again)


def test_precomputed_level1_replaces_the_image():
    levels = parse_spec("4x4x4, 2x2x2")
    z1 = np.random.default_rng(0).normal(size=(3, 4, 4, 4)).astype(np.float32)
    features = np.random.default_rng(1).normal(size=(3, 8, 4, 4)).astype(np.float32)
    images = np.zeros((3, 32, 32, 3), np.uint8)
    h = build_hierarchy(levels, images, features, fit_compressors(levels, features), level1=z1)
    np.testing.assert_array_equal(h.latent(1), z1)
    with pytest.raises(ValueError, match=r"level 1 \(4x4x4\) latents have shape \(4, 2, 2\)"):
        build_hierarchy(levels, images, features, fit_compressors(levels, features), level1=z1[:, :, :2, :2])


def test_sharded_array_indexes_like_one_array():
    full = np.arange(10 * 3, dtype=np.float32).reshape(10, 3)
    sharded = hierarchy.ShardedArray([full[:4], full[4:8], full[8:]], full.shape, full.dtype)
    assert len(sharded) == 10 and sharded.shape == (10, 3) and sharded.ndim == 2
    for key in (0, 5, -1, slice(None), slice(3, 9), slice(9, 3), slice(1, 10, 3), [7, 0, 7], np.arange(10) % 2 == 0):
        np.testing.assert_array_equal(sharded[key], full[key])
    np.testing.assert_array_equal(sharded[2:6, 1], full[2:6, 1])
    np.testing.assert_array_equal(np.asarray(sharded), full)
    np.testing.assert_array_equal(np.stack(list(sharded)), full)
    with pytest.raises(IndexError):
        sharded[10]
    with pytest.raises(ValueError, match="shards hold 8 rows"):
        hierarchy.ShardedArray([full[:4], full[4:8]], full.shape, full.dtype)


def test_cached_features_are_sharded_memmaps(tmp_path):
    cache = FeatureCache(tmp_path)
    encoder = build_encoder("random_cnn", image_size=16)
    images = np.random.default_rng(0).integers(0, 256, (10, 16, 16, 1), dtype=np.uint8)
    feats = cached_features(cache, encoder, {"name": "synthetic"}, images, batch_size=3, shard_size=4)
    assert isinstance(feats, hierarchy.ShardedArray) and [len(s) for s in feats.shards] == [4, 4, 2]
    assert all(isinstance(s, np.memmap) and not s.flags.writeable for s in feats.shards)
    np.testing.assert_allclose(np.asarray(feats), encoder(torch.from_numpy(images)).numpy(), rtol=1e-5, atol=1e-6)
    (entry,) = [p for p in tmp_path.iterdir()]
    manifest = json.loads((entry / "manifest.json").read_text())
    assert manifest["arrays"]["features"]["shards"] == [4, 4, 2]
    assert sorted(p.name for p in entry.glob("features.*.npy")) == [f"features.{k:05d}.npy" for k in range(3)]
    (entry / "features.00001.npy").unlink()  # a lost shard reads as a miss, never as data
    assert cache.load(entry.name) is None


def test_spec_only_cache_hit_never_builds_and_check_runs_first(tmp_path, monkeypatch):
    cache = FeatureCache(tmp_path)
    spec = EncoderSpec("random_cnn", 16, in_channels=1)
    images = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 1), dtype=np.uint8)
    seen = []
    with pytest.raises(RuntimeError, match="rejected"):
        cached_features(cache, spec, {"name": "x"}, images, check=lambda shape: seen.append(shape) or _raise())
    assert seen == [(64, 2, 2)] and list(tmp_path.iterdir()) == []  # nothing encoded, nothing staged left
    first = cached_features(cache, spec, {"name": "x"}, images, check=seen.append)
    monkeypatch.setattr(EncoderSpec, "build", lambda self: _raise("built on a cache hit"))
    np.testing.assert_array_equal(cached_features(cache, spec, {"name": "x"}, images, check=seen.append), first)
    assert seen[-1] == (64, 2, 2)


def _raise(message: str = "rejected"):
    raise RuntimeError(message)


def test_ray_tasks_extract_shards_like_the_serial_path(tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    images = np.random.default_rng(0).integers(0, 256, (9, 16, 16, 3), dtype=np.uint8)
    spec = EncoderSpec("random_cnn", 16)
    serial = np.asarray(cached_features(FeatureCache(tmp_path / "serial"), spec, {"name": "x"}, images, shard_size=4))
    calls = []
    real = hierarchy._extract_with_ray
    monkeypatch.setattr(hierarchy, "_extract_with_ray", lambda *a, **k: calls.append(1) or real(*a, **k))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        parallel = cached_features(FeatureCache(tmp_path / "ray"), spec, {"name": "x"}, images, shard_size=4)
    finally:
        ray.shutdown()
    assert calls == [1] and [len(s) for s in parallel.shards] == [4, 4, 1]
    np.testing.assert_allclose(np.asarray(parallel), serial, rtol=1e-5, atol=1e-6)
