"""The selection's tunables and the small numeric kernels its modules share.

The tunables are read through this module (``kernels.CHUNK_CPU``...), so that a test can change them
in one place (``tests/mask_tuning.py``) for every module of the selection.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
from torch import Tensor

from cwmp.parallel import outer_threads

EXACT_MAX = 1 << 15  # pools this small are sorted whole instead of sampled
SAMPLE_MIN, SAMPLE_MAX = 1 << 10, 1 << 16
SIGMAS = 3.0  # bracket half-width, in binomial standard deviations of the boundary's sample rank
CHUNK_CPU, CHUNK_CUDA = 1 << 18, 1 << 26  # CPU: 1 MB of float32 per thread stays in cache; CUDA: few launches
SEED = 20240917  # the sample decides only the speed, never the mask; fixed for repeatable timings
NUMPY_ON_CPU = True  # CPU tensors: numpy kernels on views (faster there); False runs the torch ones
THRESHOLD_STEPS = 4  # floats an estimated magnitude threshold is walked by before bisecting (it is off by 1 or 2)
MIN_GROUP = 1 << 19  # entries a thread's task in a pass has at least (less is not worth a thread)

@contextlib.contextmanager
def single_threaded(device: torch.device | str | None):
    """On the CPU, run torch with one intra-op thread for the duration (restored after).

    The selection's long loops are numpy's (single-threaded) or chunks that stay in cache; between
    them are dozens of small torch operations per call. Each of those above torch's grain size
    wakes the intra-op thread pool, and on a busy machine a wake-up can take tens of milliseconds
    (measured: a 64 Ki-entry torch.sort, 0.3 ms alone, took 200 to 500 ms while other processes
    kept both cores busy). One thread avoids that; the work is the same. Nested uses are free.
    The passes over the whole update still use the caller's thread count, as plain threads
    (``cwmp.parallel``), which sleep on a lock rather than spin.
    """
    if device is None or torch.device(device).type != "cpu" or not NUMPY_ON_CPU:
        yield
        return
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    token = outer_threads.set(threads)
    try:
        yield
    finally:
        outer_threads.reset(token)
        torch.set_num_threads(threads)



def sort_descending(values: Tensor, order: bool) -> tuple[Tensor, Tensor | None]:
    """``values`` sorted, largest first, as float64, and (if asked) the order that sorts them; ties
    in any order (callers never depend on it). On the CPU numpy's vectorised sort is used: it is
    many times faster there than torch.sort."""
    if not (NUMPY_ON_CPU and values.device.type == "cpu"):
        result = torch.sort(values, descending=True)
        return result.values.double(), result.indices if order else None
    negated = -values.double().numpy()
    if not order:
        negated.sort()
        return torch.from_numpy(-negated), None
    permutation = np.argsort(negated)
    return torch.from_numpy(-negated[permutation]), torch.from_numpy(permutation)


def count_up_to(ascending: Tensor, value: float, inclusive: bool = True) -> int:
    """How many entries of an ascending tensor are <= value (< value when not ``inclusive``)."""
    probe = torch.tensor(value, dtype=ascending.dtype, device=ascending.device)
    return int(torch.searchsorted(ascending, probe, right=inclusive))


def next_float(value: float, up: bool, dtype: torch.dtype) -> float:
    v = torch.tensor(value, dtype=dtype)
    return float(torch.nextafter(v, torch.tensor(math.inf if up else -math.inf, dtype=dtype)))


def chunks(n: int, device: torch.device) -> list[tuple[int, int]]:
    chunk = CHUNK_CUDA if device.type == "cuda" else CHUNK_CPU
    return [(start, min(start + chunk, n)) for start in range(0, n, chunk)]
