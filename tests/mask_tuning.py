"""The selection's tunings for tests: 'shipped', 'tiny' (sample, chunk, recurse and share out
among threads on tensors of a few dozen entries, so every branch runs) and 'tiny_torch_kernels'
(also the torch kernels and the gather-once-per-pass path that CUDA uses, instead of numpy's)."""

from __future__ import annotations

import contextlib
from unittest import mock

import cwmp.kernels as kernels

TUNINGS = ["shipped", "tiny", "tiny_torch_kernels"]
TINY = dict(EXACT_MAX=3, SAMPLE_MIN=2, SAMPLE_MAX=12, CHUNK_CPU=16, MIN_GROUP=8)


@contextlib.contextmanager
def tuning(name: str):
    settings = {}
    if name.startswith("tiny"):
        settings.update(TINY)
    if name.endswith("torch_kernels"):
        settings.update(NUMPY_ON_CPU=False)
    with mock.patch.multiple(kernels, **settings) if settings else contextlib.nullcontext():
        yield
