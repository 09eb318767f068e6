"""Worker threads for the CPU passes of the selection and of error feedback.

numpy and torch release the GIL inside their loops, so a pass split into contiguous pieces runs on
several cores from plain Python threads. Each piece writes only its own part of the output and the
results are put together in piece order, so what a pass computes does not depend on how many
threads ran it or in which order they finished.

How many threads: torch's intra-op thread count as the caller set it (``torch.set_num_threads(1)``
makes the pruner single-threaded too), at most ``MAX_WORKERS``. The pruner runs torch itself with
one thread meanwhile (``cwmp.kernels.single_threaded``), which records the caller's count here.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
import os
import threading
from typing import Callable, Iterator, Sequence, TypeVar

import torch

__all__ = ["MAX_WORKERS", "extremes", "in_parallel", "map_largest_first", "outer_threads", "torch_threads", "workers"]

MAX_WORKERS = 8  # threads a CPU pass may use
G = TypeVar("G")
R = TypeVar("R")

#: torch's thread count outside the pruner's single-threaded section (None: not inside one)
outer_threads: contextvars.ContextVar[int | None] = contextvars.ContextVar("cwmp_outer_threads", default=None)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``n`` for the duration, restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def workers() -> int:
    """Threads a CPU pass may use now."""
    outer = outer_threads.get()
    return max(1, min(MAX_WORKERS, torch.get_num_threads() if outer is None else outer))


def in_parallel(run: Callable[[G], list[R]], groups: Sequence[G], first: Callable[[], None] | None = None) -> list[R]:
    """``run`` on each group, by up to ``workers()`` threads that take the groups in turn (the
    calling thread is one of them); the results of all groups concatenated, in group order. An
    exception in any group is raised here, after every thread has stopped. ``first``: work for the
    calling thread before it takes groups (the helper threads start on the groups meanwhile): a
    serial step that does not depend on the groups hides behind them."""
    helpers_wanted = min(workers(), len(groups) + (first is not None)) - 1
    if helpers_wanted <= 0:
        if first is not None:
            first()
        return [r for group in groups for r in run(group)]
    results: list[list[R] | None] = [None] * len(groups)
    turns = iter(range(len(groups)))
    lock = threading.Lock()
    failed = threading.Event()

    def work() -> None:
        while not failed.is_set():
            with lock:
                i = next(turns, None)
            if i is None:
                return
            try:
                results[i] = run(groups[i])
            except BaseException:
                failed.set()
                raise

    helpers = [_executor().submit(work) for _ in range(helpers_wanted)]
    try:
        try:
            if first is not None:
                first()
        except BaseException:
            failed.set()
            raise
        work()
    finally:
        errors = [helper.exception() for helper in helpers]  # waits for every helper
    for error in errors:
        if error is not None:
            raise error
    return [r for part in results for r in part]  # type: ignore[union-attr]


_EXECUTOR: tuple[int, concurrent.futures.ThreadPoolExecutor] | None = None
_EXECUTOR_LOCK = threading.Lock()


def _after_fork_in_child() -> None:
    """A fork while another thread held the lock would leave the child's copy locked for good."""
    global _EXECUTOR_LOCK, _EXECUTOR
    _EXECUTOR_LOCK = threading.Lock()
    _EXECUTOR = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _executor() -> concurrent.futures.ThreadPoolExecutor:
    """The helper threads, made on first use, and again in a forked child (whose copy of the
    parent's pool has no threads behind it: work given to it would never run)."""
    global _EXECUTOR
    with _EXECUTOR_LOCK:
        if _EXECUTOR is None or _EXECUTOR[0] != os.getpid():
            _EXECUTOR = (os.getpid(), concurrent.futures.ThreadPoolExecutor(MAX_WORKERS, thread_name_prefix="cwmp-pass"))
        return _EXECUTOR[1]


def map_largest_first(fn: Callable[[G], R], items: Sequence[G], sizes: Sequence[int],
                      first: Callable[[], None] | None = None) -> list[R]:
    """``[fn(item) for item in items]``, the items shared among the threads largest first (so that
    the last one taken is small); results in the items' order. ``first``: as ``in_parallel``'s."""
    order = sorted(range(len(items)), key=lambda i: -sizes[i])
    done = in_parallel(lambda i: [(i, fn(items[i]))], order, first)
    results: list = [None] * len(items)
    for i, result in done:
        results[i] = result
    return results


def extremes(tensor: torch.Tensor) -> tuple[float, float]:
    """(min, max) of a non-empty tensor; NaN in it makes both NaN. On the CPU, for float32 and
    float64, numpy's reductions (about twice the speed of ``torch.aminmax`` there)."""
    t = tensor.detach()
    if t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64):
        values = t.numpy()
        return float(values.min()), float(values.max())
    low, high = torch.aminmax(t)
    return float(low), float(high)
