import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """These tensors are tiny: with 2 threads, one busy core elsewhere stalls every parallel op for a scheduler
    tick (a 10 ms test takes seconds), so the MoE tests run single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
