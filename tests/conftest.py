from pathlib import Path

import pytest
import torch

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
