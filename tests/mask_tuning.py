"""The selection's tunings for tests: 'shipped', 'tiny' (sample, chunk, recurse and share out
among threads on tensors of a few dozen entries, so every branch runs) and 'tiny_torch_kernels'
(also the torch kernels and the gather-once-per-pass path that CUDA uses, instead of numpy's)."""

from __future__ import annotations

import contextlib
from unittest import mock

import cwmp.masks as masks

TUNINGS = ["shipped", "tiny", "tiny_torch_kernels"]
TINY = dict(_EXACT_MAX=3, _SAMPLE_MIN=2, _SAMPLE_MAX=12, _CHUNK_CPU=16, _MIN_GROUP=8)


@contextlib.contextmanager
def tuning(name: str):
    settings = {}
    if name.startswith("tiny"):
        settings.update(TINY)
    if name.endswith("torch_kernels"):
        settings.update(_NUMPY_ON_CPU=False)
    with mock.patch.multiple(masks, **settings) if settings else contextlib.nullcontext():
        yield
