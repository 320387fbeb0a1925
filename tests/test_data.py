import gzip
import io
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import FASHION, needs_fashion, write_coco
from PIL import Image

from nds.data import (
    FASHION_MNIST_CLASSES,
    BadImagesError,
    ImageFiles,
    check_dataset,
    load_coco_captions,
    load_dataset,
    load_digits_set,
    load_fashion_mnist,
    load_image_folder,
)


@needs_fashion
def test_fashion_mnist_train_prefix_is_real_data():
    ds = load_fashion_mnist(FASHION, "train", limit=10)
    assert ds.images.shape == (10, 28, 28, 1) and ds.images.dtype == np.uint8
    assert ds.labels.dtype == np.int64
    # The published first ten training labels of Fashion-MNIST.
    assert ds.labels.tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
    assert ds.class_names[9] == "Ankle boot" and len(ds.class_names) == 10
    assert ds.images.max() == 255 and ds.images.min() == 0


@needs_fashion
def test_fashion_mnist_test_split_is_balanced_and_limit_is_a_prefix():
    full = load_dataset("fashion_mnist", str(FASHION), "test")
    assert len(full) == 10_000
    assert np.bincount(full.labels).tolist() == [1000] * 10
    head = load_fashion_mnist(FASHION, "test", limit=7)
    np.testing.assert_array_equal(head.images, full.images[:7])
    np.testing.assert_array_equal(head.labels, full.labels[:7])


@needs_fashion
@pytest.mark.parametrize("cut", [100, 3000])
def test_truncated_gzip_idx_names_the_file(tmp_path, cut):
    shutil.copy(FASHION / "t10k-images-idx3-ubyte.gz", tmp_path)
    data = (FASHION / "t10k-labels-idx1-ubyte.gz").read_bytes()
    bad = tmp_path / "t10k-labels-idx1-ubyte.gz"
    bad.write_bytes(data[:cut])
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte.gz"):
        load_fashion_mnist(tmp_path, "test")


def _write_idx(path: Path, dims: list[int], payload: bytes, magic: bytes = b"\x00\x00\x08") -> None:
    header = magic + bytes([len(dims)]) + np.array(dims, dtype=">u4").tobytes()
    path.write_bytes(header + payload)


def test_truncated_raw_idx_and_bad_magic_name_the_file(tmp_path):
    _write_idx(tmp_path / "train-images-idx3-ubyte", [3, 2, 2], bytes(12))
    _write_idx(tmp_path / "train-labels-idx1-ubyte", [3], bytes([1, 2]))  # one label short
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte.*truncated"):
        load_fashion_mnist(tmp_path, "train")
    _write_idx(tmp_path / "train-labels-idx1-ubyte", [3], bytes(3), magic=b"\x00\x00\x0d")  # float data
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte.*magic"):
        load_fashion_mnist(tmp_path, "train")


def test_uncompressed_idx_files_load(tmp_path):
    images = np.arange(3 * 2 * 2, dtype=np.uint8)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", [3, 2, 2], images.tobytes())
    gz = tmp_path / "t10k-labels-idx1-ubyte.gz"
    with gzip.open(gz, "wb") as f:
        f.write(b"\x00\x00\x08\x01" + np.array([3], ">u4").tobytes() + bytes([4, 0, 9]))
    ds = load_fashion_mnist(tmp_path, "test")
    assert ds.images.shape == (3, 2, 2, 1)
    np.testing.assert_array_equal(ds.images.ravel(), images)
    assert ds.labels.tolist() == [4, 0, 9]
    assert ds.class_names == FASHION_MNIST_CLASSES


def test_missing_fashion_root_says_how_to_install(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist") as err:
        load_fashion_mnist(missing, "train")
    assert str(missing) in str(err.value) and "data.root" in str(err.value)
    with pytest.raises(FileNotFoundError, match="apt-get install"):
        check_dataset("fashion_mnist", str(missing))


def test_digits_split_is_deterministic_and_scaled():
    train, test = load_digits_set("train"), load_digits_set("test")
    assert len(train) + len(test) == 1797
    assert train.images.shape[1:] == (8, 8, 1) and train.images.dtype == np.uint8
    assert train.images.max() == 255 and train.images.min() == 0
    assert train.labels[:10].tolist() == list(range(10))
    np.testing.assert_array_equal(load_digits_set("train", limit=5).images, train.images[:5])
    with pytest.raises(ValueError, match="'val'"):
        load_digits_set("val")


def _image_folder(root: Path) -> None:
    for cls, color in [("cat", (255, 0, 0)), ("dog", (0, 0, 255))]:
        d = root / "train" / cls
        d.mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (20 + i, 12), color).save(d / f"{i}.png")
    Image.new("L", (9, 9), 128).save(root / "train" / "dog" / "gray.jpg")
    (root / "train" / "dog" / "notes.txt").write_text("ignored")


def test_image_folder_layout_resize_and_round_robin_limit(tmp_path):
    _image_folder(tmp_path)
    ds = load_image_folder(tmp_path, "train", image_size=8)
    assert ds.images.shape == (7, 8, 8, 3) and ds.images.dtype == np.uint8
    assert ds.class_names == ["cat", "dog"]
    assert np.bincount(ds.labels).tolist() == [3, 4]
    head = load_dataset("image_folder", tmp_path, "train", limit=4, image_size=8)
    assert head.labels.tolist() == [0, 1, 0, 1]  # every class before the second file of any class
    cat = head.images[0].reshape(-1, 3)
    assert (cat[:, 0] >= 250).all() and (cat[:, 2] <= 5).all()  # red stays red after crop + resize


def test_image_folder_center_crops(tmp_path):
    d = tmp_path / "train" / "only"
    d.mkdir(parents=True)
    img = np.zeros((10, 30, 3), dtype=np.uint8)
    img[:, :10] = img[:, 20:] = (0, 0, 255)
    img[:, 10:20] = (0, 255, 0)  # the centred 10x10 square
    Image.fromarray(img).save(d / "a.png")
    ds = load_image_folder(tmp_path, "train", image_size=5)
    assert (ds.images[0, :, :, 1] == 255).all() and (ds.images[0, :, :, 2] == 0).all()


def _bad_files(root: Path) -> dict[str, Path]:
    """A zero-byte, a truncated and a non-image file among the good ones of _image_folder."""
    good = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good, format="JPEG")
    files = {"zero-byte": root / "train" / "cat" / "zero.jpg", "truncated": root / "train" / "dog" / "cut.jpg",
             "corrupt": root / "train" / "cat" / "broken.jpg"}
    files["zero-byte"].write_bytes(b"")
    files["truncated"].write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    files["corrupt"].write_bytes(b"definitely not a jpeg")
    return files


def test_bad_image_files_fail_by_name_or_are_skipped_and_counted(tmp_path):
    _image_folder(tmp_path)
    bad = _bad_files(tmp_path)
    with pytest.raises(BadImagesError) as err:
        load_image_folder(tmp_path, "train", image_size=8, cache_dir=tmp_path / "cache")
    for kind, path in bad.items():
        assert f"{path} ({kind}" in str(err.value)
    assert "data.bad_images=skip" in str(err.value)
    kept = load_image_folder(tmp_path, "train", image_size=8, bad_images="skip", cache_dir=tmp_path / "cache")
    assert {Path(p): why.split(":")[0] for p, why in kept.skipped.items()} == {p: k for k, p in bad.items()}
    assert len(kept) == 7 and np.asarray(kept.images).shape == (7, 8, 8, 3)  # what is left decodes
    limited = load_image_folder(tmp_path, "train", image_size=8, limit=5, bad_images="skip")
    assert len(limited) == 5  # a bad file's place goes to the next good one
    for path in bad.values():  # mended files (new mtime) are checked again, not taken from the cache
        Image.new("RGB", (9, 9)).save(path, format="PNG" if path.suffix == ".png" else "JPEG")
    assert len(load_image_folder(tmp_path, "train", image_size=8, cache_dir=tmp_path / "cache")) == 10


def test_a_file_spoiled_after_loading_is_named_when_decoded(tmp_path):
    _image_folder(tmp_path)
    ds = load_image_folder(tmp_path, "train", image_size=8)
    spoiled = ds.images.paths[0]
    spoiled.write_bytes(b"not an image any more")
    with pytest.raises(ValueError, match=spoiled.name):
        ds.images[0]
    with pytest.raises(ValueError, match=spoiled.name):
        np.asarray(ds.images)


def test_image_files_decode_only_what_is_indexed(tmp_path, monkeypatch):
    _image_folder(tmp_path)
    files = load_image_folder(tmp_path, "train", image_size=8).images
    assert isinstance(files, ImageFiles) and files.shape == (7, 8, 8, 3) and files.dtype == np.uint8
    decoded = []
    real = ImageFiles.decode
    monkeypatch.setattr(ImageFiles, "decode", lambda self, path: decoded.append(path) or real(self, path))
    full = np.asarray(files)
    assert len(decoded) == 7
    decoded.clear()
    np.testing.assert_array_equal(files[2:5], full[2:5])
    np.testing.assert_array_equal(files[[6, 0]], full[[6, 0]])
    np.testing.assert_array_equal(files[-1], full[-1])
    np.testing.assert_array_equal(files[1, :, :, 0], full[1, :, :, 0])
    np.testing.assert_array_equal(files[::3, 0], full[::3, 0])
    assert len(decoded) == 3 + 2 + 1 + 1 + 3
    shard = pickle.loads(pickle.dumps(files.subset(slice(4, 7))))  # what a Ray task receives: paths, no pixels
    assert len(pickle.dumps(files.subset(slice(4, 7)))) < 2000
    np.testing.assert_array_equal(np.asarray(shard), full[4:7])
    assert [img.shape for img in files] == [(8, 8, 3)] * 7


def test_coco_captions_by_image_id_lazy_images(tmp_path):
    write_coco(tmp_path)
    ds = load_dataset("coco2014", tmp_path, "train", image_size=6)
    assert isinstance(ds.images, ImageFiles) and ds.images.shape == (3, 6, 6, 3)
    assert ds.captions == [["image 10 caption 0", "image 10 caption 1"], ["image 20 caption 0", "image 20 caption 1"],
                           ["image 30 caption 0", "image 30 caption 1"]]
    assert ds.labels.tolist() == [0, 0, 0]
    assert np.abs(ds.images[1][..., 0].astype(int) - 160).max() <= 2  # id 20: red = 160
    head = load_coco_captions(tmp_path, "train", 6, limit=2)
    assert len(head) == 2 and head.captions[1][0] == "image 20 caption 0"
    val = load_dataset("coco2014", tmp_path, "test", image_size=6)
    assert len(val) == 1 and val.images.paths[0].parent.name == "val2014"
    check_dataset("coco2014", str(tmp_path))


def test_coco_missing_files_name_path_and_key(tmp_path):
    write_coco(tmp_path)
    moved = tmp_path / "ann"
    (tmp_path / "annotations").rename(moved)
    with pytest.raises(FileNotFoundError, match="captions_train2014.json.*data.captions"):
        load_dataset("coco2014", tmp_path, "train", image_size=6)
    assert len(load_dataset("coco2014", tmp_path, "train", image_size=6, captions_dir=moved)) == 3
    check_dataset("coco2014", str(tmp_path), captions_dir=moved)
    (moved / "captions_val2014.json").write_text("{}")
    with pytest.raises(ValueError, match="captions_val2014.json.*not a COCO captions"):
        load_coco_captions(tmp_path, "test", 6, captions_dir=moved)
    shutil.rmtree(tmp_path / "val2014")
    with pytest.raises(FileNotFoundError, match="val2014"):
        check_dataset("coco2014", str(tmp_path))


def test_dispatcher_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="fashion_mnist.*digits.*image_folder.*coco2014"):
        load_dataset("cifar", None, "train")
    with pytest.raises(ValueError, match="image_size"):
        load_dataset("image_folder", tmp_path, "train")
    with pytest.raises(ValueError, match="'val'"):  # the splits are train and test (test: test/ or val/)
        load_dataset("image_folder", tmp_path, "val", image_size=8)
    with pytest.raises(FileNotFoundError, match="no train split"):
        load_dataset("image_folder", tmp_path, "train", image_size=8)
    with pytest.raises(ValueError, match="limit"):
        load_dataset("digits", None, "train", limit=0)
    check_dataset("digits", None)


def test_image_folder_in_imagenet_layout_holds_out_val(tmp_path):
    """ImageNet's train/ + val/ layout: val/ is the held-out split; test/ wins where both exist; a
    folder without either fails the preflight with the folders it looked for."""
    _image_folder(tmp_path)
    check_dataset_fails = pytest.raises(FileNotFoundError, match=r"no test split: expected .*test/ or .*val/")
    with check_dataset_fails:
        check_dataset("image_folder", str(tmp_path))
    (tmp_path / "train").rename(tmp_path / "val")
    _image_folder(tmp_path)
    check_dataset("image_folder", str(tmp_path))
    assert len(load_image_folder(tmp_path, "test", image_size=8)) == 7
    (tmp_path / "test" / "cat").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "test" / "cat" / "0.png")
    assert len(load_image_folder(tmp_path, "test", image_size=8)) == 1
