import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny shapes gain nothing from intra-op threads, and OpenMP spin-waiting makes them ~30x
    slower on a busy 2-core machine. (Ray workers are separate processes and keep their own.)"""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
