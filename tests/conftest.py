import pytest
import torch


@pytest.fixture
def one_torch_thread():
    """For tests that time real torch kernels against a real-clock simulated meter: on a loaded
    machine a multi-threaded pool stalls tiny ops for milliseconds while its threads wait for each
    other, so calls per window (and with them the noise) would vary wildly."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
