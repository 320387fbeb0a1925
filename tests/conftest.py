import json
from pathlib import Path

import pytest
import torch
from PIL import Image

FASHION = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(
    not (FASHION / "train-images-idx3-ubyte.gz").is_file() or not (FASHION / "t10k-images-idx3-ubyte.gz").is_file(),
    reason=f"Fashion-MNIST not installed at {FASHION} (apt-get install dataset-fashion-mnist)",
)


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny shapes gain nothing from intra-op threads, and OpenMP spin-waiting makes them ~30x
    slower on a busy 2-core machine. (Ray workers are separate processes and keep their own.)"""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def write_coco(root: Path, n_train: int = 3) -> None:
    """A tiny COCO-2014 tree: train images 30, 10, 20 (the first n_train) and val image 5, each a
    solid red of 8 x its id with captions " image <id> caption <j> " (j = 0, 1)."""
    for split, ids in (("train2014", [30, 10, 20][:n_train]), ("val2014", [5])):
        (root / split).mkdir(parents=True)
        images, annotations = [], []
        for image_id in ids:
            name = f"COCO_{split}_{image_id:012d}.jpg"
            Image.new("RGB", (12, 10), (image_id * 8, 0, 0)).save(root / split / name)
            images.append({"id": image_id, "file_name": name, "width": 12, "height": 10})
            annotations += [{"id": 100 * image_id + j, "image_id": image_id, "caption": f" image {image_id} caption {j} "}
                            for j in range(2)]
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"captions_{split}.json").write_text(json.dumps({"images": images, "annotations": annotations}))
