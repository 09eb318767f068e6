"""The entries a selection chooses from (pools) and the checked tensors it is given (``Layers``).

A pool is the whole update (scores computed chunk by chunk, never stored), the concatenation of
several tensors (never made: chunks never cross a layer, each layer's scores scaled by one number),
or a set gathered by an earlier pass (scores stored).
"""

from __future__ import annotations

import math
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import torch
from torch import Tensor

from cwmp import kernels as _k
from cwmp.costs import _CostModel
from cwmp.errors import MaskInputError
from cwmp.kernels import chunks
from cwmp.parallel import extremes as tensor_extremes
from cwmp.parallel import map_largest_first, workers

T = TypeVar("T")


def _check_update(update: Tensor) -> float:
    """Reject what cannot give a correct mask; return max |update| (0 for an empty update)."""
    if not isinstance(update, Tensor):
        raise MaskInputError(f"update must be a torch.Tensor, got {type(update).__name__}")
    if not update.is_floating_point():
        raise MaskInputError(f"update must be a floating-point tensor, got dtype {update.dtype}")
    if not update.numel():
        return 0.0
    low, high = (float(v) for v in torch.aminmax(update.detach()))  # NaN makes both NaN
    if not (math.isfinite(low) and math.isfinite(high)):
        bad = torch.nonzero(~torch.isfinite(update.detach().reshape(-1))).squeeze(1)
        raise MaskInputError(
            f"update has {bad.numel()} NaN or infinite entries (first at flat index {int(bad[0])}); "
            "a mask of such an update would be meaningless: fix the training step or clip the update"
        )
    return max(-low, high)


def _score(magnitudes: Tensor, divisor: float | Tensor | None, power: float, out: Tensor | None = None) -> Tensor:
    """|u|**power / divisor in the score dtype; the one place a score is computed."""
    dtype = torch.promote_types(magnitudes.dtype, torch.float32)
    if out is None:
        s = magnitudes.abs().to(dtype)
    elif out.dtype == magnitudes.dtype:
        s = torch.abs(magnitudes, out=out)
    else:
        s = out.copy_(magnitudes).abs_()
    if power == 2:
        s.mul_(s)
    elif power != 1:
        s.pow_(power)
    if divisor is not None:
        s.div_(divisor)
    return s


# --------------------------------------------------------------------------------------- pools
class _Pool(ABC):
    """Entries a mask is chosen from: the whole update (scores computed chunk by chunk) or a set
    gathered by an earlier pass (scores stored). ``n`` entries, pool-local indices."""

    n: int
    cost: _CostModel
    device: torch.device
    score_dtype: torch.dtype
    defer_gather = False  # gather the bracketed entries once per pass, not once per chunk

    def chunks(self) -> list[tuple[int, int]]:
        """The [start, stop) ranges a pass walks, each computed as one piece."""
        return chunks(self.n, self.device)

    def sample_index(self, size: int, generator: torch.Generator) -> Tensor:
        """Uniform sample positions (with replacement)."""
        return torch.randint(self.n, (size,), generator=generator, device=self.device)

    @abstractmethod
    def scores(self, start: int, stop: int, out: Tensor | None) -> Tensor:
        """Scores of entries [start, stop), computed into ``out`` when the pool computes them."""

    @abstractmethod
    def all_scores(self) -> Tensor:
        """All scores, as the passes see them."""

    @abstractmethod
    def sample_scores(self, index: Tensor) -> Tensor:
        """Scores at sampled positions, for pivots only: ``pow`` may round the last bit differently
        outside the chunked pass, so a pivot may miss every entry's score by one ulp."""


class _UpdatePool(_Pool):
    computes_scores = True

    def __init__(self, flat: Tensor, cost: _CostModel, power: float, rank_by_cost: bool) -> None:
        self.flat, self.cost, self.power, self.rank_by_cost = flat, cost, power, rank_by_cost
        self.n, self.device = flat.numel(), flat.device
        self.score_dtype = torch.promote_types(flat.dtype, torch.float32)

    def scores(self, start: int, stop: int, out: Tensor | None) -> Tensor:
        divisor = self.cost.divisor(start, stop) if self.rank_by_cost else None
        return _score(self.flat[start:stop], divisor, self.power, out)

    def all_scores(self) -> Tensor:
        """The scores exactly as the passes compute them (same chunks, so ``pow`` rounds alike)."""
        out = torch.empty(self.n, dtype=self.score_dtype, device=self.device)
        for start, stop in chunks(self.n, self.device):
            self.scores(start, stop, out[start:stop])
        return out

    def sample_scores(self, index: Tensor) -> Tensor:
        divisor = self.cost.gather(index).divisor(0, index.numel()) if self.rank_by_cost else None
        return _score(self.flat[index], divisor, self.power)


class _GatheredPool(_Pool):
    computes_scores = False

    def __init__(self, index: Tensor, stored: Tensor, cost: _CostModel) -> None:
        self.index, self.stored, self.cost = index, stored, cost
        self.n, self.device, self.score_dtype = stored.numel(), stored.device, stored.dtype

    def scores(self, start: int, stop: int, out: Tensor | None) -> Tensor:
        return self.stored[start:stop]

    def all_scores(self) -> Tensor:
        return self.stored

    def sample_scores(self, index: Tensor) -> Tensor:
        return self.stored[index]


def layer_counts(mask: Tensor, sizes: Sequence[int]) -> list[int]:
    """Kept entries per layer of a flat mask over concatenated layers of ``sizes`` entries (one
    host round trip in all, not one per layer)."""
    if not sizes:
        return []
    parts = torch.split(mask, list(sizes))
    if _k.NUMPY_ON_CPU and mask.device.type == "cpu":
        return [int(np.count_nonzero(p.numpy())) for p in parts]  # many times faster than torch's
    return [int(c) for c in torch.stack([torch.count_nonzero(p) for p in parts]).tolist()]


@dataclass
class Layers:
    """Tensors checked once (``check_layers``), to be given to several selections in place of
    the tensors: their flat views, largest magnitudes, score dtype and device."""

    flats: list[Tensor]
    max_magnitudes: list[float]
    score_dtype: torch.dtype
    device: torch.device
    #: the sample's positions and magnitudes by sample size, shared by the selections over these
    #: tensors (Top-K's energy, then CWMP's masks): the seed is fixed, so the positions are the same.
    #: [positions, magnitudes, where the layers are]: for the numpy pools one array of magnitudes
    #: and each point's layer, else one tensor per layer and the layers' bounds
    samples: dict[int, list] = field(default_factory=dict)
    #: every entry is >= +0 (magnitudes gathered by ``cwmp.candidates``): the passes compare them
    #: as they are, with no absolute value taken first
    nonnegative: bool = False
    #: the pools' layout of these layers (sizes, offsets, chunks), made once: ``_Geometry``
    geometry: dict = field(default_factory=dict, repr=False, compare=False)


def check_layers(tensors: Sequence[Tensor], known: Sequence[tuple[float, float] | None] | None = None) -> Layers:
    """Flat views of the tensors, checked as ``_check_update`` checks one, with one host round trip
    for all of them (their min and max are reduced on their device and fetched together).
    ``known[i]``, where given, is tensor i's (min, max), just computed by the caller (error
    feedback's in-place compensation reduces each residual while it is still in cache)."""
    flats, score_dtype, device = _flat_views(tensors)
    known = [None] * len(flats) if known is None else list(known)
    if len(known) != len(flats):
        raise AssertionError("one known (min, max) or None per tensor")
    filled = [f for f, k in zip(flats, known) if f.numel() and k is None]
    return Layers(flats, _largest(flats, known, _extremes(filled, device)), score_dtype, device)


def check_layers_beside(tensors: Sequence[Tensor], alongside: Callable[[Layers], T]) -> tuple[Layers, T | None]:
    """``check_layers``, with ``alongside(layers)`` run on the calling thread while worker threads
    reduce the tensors' min and max on the CPU (a serial step hidden behind that pass). It sees the
    flat views before they are checked, without ``max_magnitudes`` (filled in after), and must not
    change anything: an update the checks refuse is refused with their error whatever it returned;
    an exception of its own is raised after the checks passed."""
    flats, score_dtype, device = _flat_views(tensors)
    layers = Layers(flats, [], score_dtype, device)
    found: list = []
    failure: list[BaseException] = []

    def first() -> None:
        try:
            found.append(alongside(layers))
        except Exception as exc:  # the checks' own error goes first
            failure.append(exc)

    filled = [f for f in flats if f.numel()]
    extremes = _extremes(filled, device, first)
    layers.max_magnitudes = _largest(flats, [None] * len(flats), extremes)
    if failure:
        raise failure[0]
    return layers, found[0]


def _flat_views(tensors: Sequence[Tensor]) -> tuple[list[Tensor], torch.dtype, torch.device]:
    """The tensors' flat views, their score dtype and their one device (types and devices checked)."""
    flats: list[Tensor] = []
    devices = set()
    for i, t in enumerate(tensors):
        if not isinstance(t, Tensor):
            raise MaskInputError(f"tensor {i} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise MaskInputError(f"tensor {i} must be floating-point, got dtype {t.dtype}")
        flats.append(t.detach().reshape(-1))
        devices.add(t.device)
    if len(devices) > 1:
        raise MaskInputError(f"all tensors must be on one device, got {sorted(map(str, devices))}; move them first")
    device = devices.pop() if devices else torch.device("cpu")
    score_dtype = torch.float32
    for f in flats:
        score_dtype = torch.promote_types(score_dtype, f.dtype)
    if isinstance(tensors, Layers):
        raise AssertionError("already checked")
    return flats, score_dtype, device


def _extremes(filled: list[Tensor], device: torch.device, first: Callable[[], None] | None = None) -> list:
    """(min, max) of each tensor: on the CPU on the caller's threads (``first`` on the calling
    thread meanwhile, see ``in_parallel``), elsewhere with one host round trip for all."""
    if device.type == "cpu":
        return map_largest_first(tensor_extremes, filled, [f.numel() for f in filled], first)
    if first is not None:
        first()
    return torch.stack([torch.stack(torch.aminmax(f)).to(torch.float64) for f in filled]).tolist() if filled else []


def _largest(flats: list[Tensor], known: list, extremes: list) -> list[float]:
    """Each tensor's largest magnitude from its (min, max) (``known`` where given, else the next of
    ``extremes``); a NaN or infinite entry is refused here, naming the tensor."""
    max_magnitudes, it = [], iter(extremes)
    for i, f in enumerate(flats):
        if not f.numel():
            max_magnitudes.append(0.0)
            continue
        low, high = next(it) if known[i] is None else known[i]
        if not (math.isfinite(low) and math.isfinite(high)):
            try:
                _check_update(f)
            except MaskInputError as exc:
                raise MaskInputError(f"tensor {i}: {exc}") from None
        max_magnitudes.append(max(-low, high))
    return max_magnitudes


class _Geometry:
    """How the pools over one ``Layers`` lay it out: sizes, offsets, chunks of ``width`` entries
    (each within one layer), and on the CPU the layers' numpy views; the same for every pool over
    it, so made once (``Layers.geometry``)."""

    def __init__(self, layers: Layers, width: int, numpy: bool) -> None:
        self.flats = layers.flats
        self.sizes = [f.numel() for f in layers.flats]
        self.offsets = [0]
        for size in self.sizes:
            self.offsets.append(self.offsets[-1] + size)
        self.n = self.offsets[-1]
        self.bounds = torch.tensor(self.offsets, dtype=torch.int64, device=layers.device)
        self.chunks: list[tuple[int, int]] = []
        self.where: dict[int, tuple[int, int]] = {}
        for layer, (offset, size) in enumerate(zip(self.offsets, self.sizes)):
            for local in range(0, size, width):
                self.chunks.append((offset + local, offset + min(local + width, size)))
                self.where[offset + local] = (layer, local)
        self._numpy_views: tuple[list[np.ndarray], list[tuple[int, int, int, int]]] | None = None

    def numpy_views(self) -> tuple[list[np.ndarray], list[tuple[int, int, int, int]]]:
        """The layers' numpy views and the chunks as (start, stop, layer, local start)."""
        if self._numpy_views is None:
            self._numpy_views = ([f.numpy() for f in self.flats],
                                 [(start, stop) + self.where[start] for start, stop in self.chunks])
        return self._numpy_views


class _LayeredPool(_Pool):
    """The concatenation of several tensors, never made: chunks never cross a layer, and each
    layer's scores are its magnitudes (to the power) divided by the layer's one divisor, and then
    at most the layer's cap, when ``caps`` are given (the set-up-aware rule's clipped scores,
    ``cwmp.setup_rule``; inf: no cap). ``min(score, cap)`` is still a monotone function of the
    magnitude, so everything below holds with caps too."""

    computes_scores = True

    def __init__(
        self, layers: Layers, divisors: Sequence[float] | None, power: float, caps: Sequence[float] | None = None
    ) -> None:
        self.flats, self.power, self.samples = layers.flats, power, layers.samples
        self.nonnegative = layers.nonnegative
        #: (key, count) of the first numpy pass over this pool: ``count`` entries have a key >= ``key``
        self.first_split: tuple[float, int] | None = None
        self.device, self.score_dtype = layers.device, layers.score_dtype
        self.defer_gather = not (_k.NUMPY_ON_CPU and self.device.type == "cpu")
        self._numpy = not self.defer_gather
        width = _k.CHUNK_CUDA if self.device.type == "cuda" else _k.CHUNK_CPU
        geometry = layers.geometry.get((width, self._numpy))
        if geometry is None:  # the first pool over these layers lays them out for all
            geometry = layers.geometry[(width, self._numpy)] = _Geometry(layers, width, self._numpy)
        self.sizes, self.offsets, self.n = geometry.sizes, geometry.offsets, geometry.n
        self._bounds, self._chunks, self._where = geometry.bounds, geometry.chunks, geometry.where
        # a device tensor, so that CPU and CUDA both divide (CUDA multiplies by the reciprocal of a
        # Python number, which can differ in the last bit)
        self.divisors = (
            None if divisors is None else torch.tensor(list(divisors), dtype=self.score_dtype, device=self.device)
        )
        self._divisors_np = None if self.divisors is None or not self._numpy else self.divisors.numpy()
        self.caps = None if caps is None else torch.tensor(list(caps), dtype=self.score_dtype, device=self.device)
        self._caps_np = None if self.caps is None or not self._numpy else self.caps.numpy()
        # the all-numpy pass: float32 or float64 layers of the score dtype, power 1 or 2
        self.numpy_pass = (
            self._numpy and power in (1, 2) and all(f.dtype == self.score_dtype for f in self.flats)
            and self.score_dtype in (torch.float32, torch.float64)
        )
        if self.numpy_pass:
            self.numpy_flats, self.chunk_info = geometry.numpy_views()
            self.numpy_divisors = self._divisors_np
            self.numpy_dtype = self.numpy_flats[0].dtype if self.flats else np.dtype(np.float32)

    def numpy_scores(self, magnitudes: np.ndarray, layer, in_place: bool = False) -> np.ndarray:
        """Scores of magnitudes of ``layer`` (an int, or one layer per magnitude), with the very
        operations of ``_score``: the square (power 2), then the IEEE division by the divisor;
        written over ``magnitudes`` when ``in_place``."""
        s = magnitudes if in_place else magnitudes.copy()
        if self.power == 2:
            np.multiply(s, s, out=s)
        if self.numpy_divisors is not None:
            np.divide(s, self.numpy_divisors[layer], out=s)
        if self._caps_np is not None:
            np.minimum(s, self._caps_np[layer], out=s)
        return s

    def _capped(self, s: Tensor, layer: int) -> Tensor:
        """``s`` (a layer's scores, written in place) at most the layer's cap."""
        if self.caps is not None:
            torch.minimum(s, self.caps[layer], out=s)
        return s

    def chunk_groups(self) -> list[list[tuple[int, int, int, int]]]:
        """The chunks in contiguous groups, one task of a pass each: about four per worker thread
        (so that a thread held up by the machine's other work does not hold the pass up), none
        below ``_k.MIN_GROUP`` entries; one group when one thread is all there is."""
        threads = workers()
        if threads == 1 or self.n < 2 * _k.MIN_GROUP:
            return [self.chunk_info]
        target = max(_k.MIN_GROUP, self.n // (4 * threads))
        out: list[list[tuple[int, int, int, int]]] = [[]]
        size = 0
        for chunk in self.chunk_info:
            if size >= target:
                out.append([])
                size = 0
            out[-1].append(chunk)
            size += chunk[1] - chunk[0]
        return out

    def chunks(self) -> list[tuple[int, int]]:
        return self._chunks

    def _divisor(self, layer: int) -> Tensor | None:
        return None if self.divisors is None else self.divisors[layer]

    def scores(self, start: int, stop: int, out: Tensor | None) -> Tensor:
        layer, local = self._where[start]
        piece = self.flats[layer][local : local + stop - start]
        if self._numpy and out is not None and self.power in (1, 2) and piece.dtype == out.dtype:
            o = out.numpy()  # numpy's kernels, on views of the same memory: faster on the CPU
            np.abs(piece.numpy(), out=o)
            if self.power == 2:
                np.multiply(o, o, out=o)
            if self._divisors_np is not None:
                np.divide(o, self._divisors_np[layer], out=o)  # IEEE division, as torch's
            if self._caps_np is not None:
                np.minimum(o, self._caps_np[layer], out=o)
            return out
        return self._capped(_score(piece, self._divisor(layer), self.power, out), layer)

    def all_scores(self) -> Tensor:
        out = torch.empty(self.n, dtype=self.score_dtype, device=self.device)
        for start, stop in self._chunks:
            self.scores(start, stop, out[start:stop])
        return out

    def scores_at(self, index: Tensor) -> Tensor:
        """Scores at ascending concatenated positions: one host round trip for the layer bounds,
        then one gather per layer."""
        bounds = torch.searchsorted(index, self._bounds).tolist()
        parts = []
        for layer in range(len(self.flats)):
            a, b = bounds[layer], bounds[layer + 1]
            if b > a:
                local = index[a:b] - self.offsets[layer]
                magnitudes = self.flats[layer][local].to(self.score_dtype)
                parts.append(self._capped(_score(magnitudes, self._divisor(layer), self.power), layer))
        return torch.cat(parts) if parts else torch.empty(0, dtype=self.score_dtype, device=self.device)

    def sample_scores(self, index: Tensor) -> Tensor:
        """Scores at the sample's positions, from magnitudes gathered once per sample for all the
        selections over these tensors (the gather, random access, is most of a sample's cost)."""
        cached = self.samples.get(index.numel())
        if cached is None or cached[0] is not index:
            return self.scores_at(index)
        if self.numpy_pass:  # the magnitudes in one array, all layers scored by one numpy call each
            if not isinstance(cached[1], np.ndarray):
                self.read_sample(index)
            return torch.from_numpy(self.numpy_scores(cached[1], cached[2]))
        if cached[1] is None or isinstance(cached[1], np.ndarray):
            bounds = torch.searchsorted(index, self._bounds).tolist()
            parts = [self.flats[layer][index[a:b] - self.offsets[layer]].to(self.score_dtype).abs_()
                     for layer, (a, b) in enumerate(zip(bounds, bounds[1:]))]
            cached[1], cached[2] = parts, bounds
        parts = [self._capped(_score(part, self._divisor(layer), self.power), layer)
                 for layer, part in enumerate(cached[1]) if part.numel()]
        return torch.cat(parts) if parts else torch.empty(0, dtype=self.score_dtype, device=self.device)

    def read_sample(self, index: Tensor) -> None:
        """Read the magnitudes at the positions ``sample_index`` gave (a numpy pool) into the
        shared cache, with each point's layer."""
        at = index.numpy()
        bounds = np.searchsorted(at, self.offsets).tolist()
        magnitudes = np.empty(at.size, dtype=self.numpy_dtype)
        for layer, (a, b) in enumerate(zip(bounds, bounds[1:])):
            if b > a:
                np.abs(self.numpy_flats[layer][at[a:b] - self.offsets[layer]], out=magnitudes[a:b])
        self.samples[index.numel()][1:] = [magnitudes, np.repeat(np.arange(len(self.flats)), np.diff(bounds))]

    def sample_index(self, size: int, generator: torch.Generator) -> Tensor:
        cached = self.samples.get(size)
        if cached is not None:
            return cached[0]
        key = (self.n, size, str(self.device), generator.initial_seed())
        index = _POSITIONS.get(key)
        if index is None:  # the same positions for every update of this many entries (the seed is fixed)
            index = super().sample_index(size, generator)  # ascending, for scores_at
            index = torch.from_numpy(np.sort(index.numpy())) if self._numpy else torch.sort(index).values
            with _POSITIONS_LOCK:
                _POSITIONS[key] = index
                while len(_POSITIONS) > _POSITIONS_KEPT:
                    _POSITIONS.pop(next(iter(_POSITIONS)))
        self.samples[size] = [index, None, None]
        return index


#: sample positions by (entries, points, device, seed): the positions are a function of these alone,
#: and a client's update has the same number of entries every round (a sample only ever decides
#: how fast a selection runs, never what it keeps). The most recent few are kept; never written to.
_POSITIONS: dict[tuple, Tensor] = {}
_POSITIONS_KEPT = 8
_POSITIONS_LOCK = threading.Lock()
