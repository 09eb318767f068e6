"""Error feedback: the residual memory of one client (Stich, Cordonnier and Jaggi, "Sparsified SGD
with Memory", NeurIPS 2018; Lin et al., "Deep Gradient Compression", ICLR 2018).

What a mask drops is not lost: it is added to the client's next update, so small entries are sent
once they have accumulated. Without it, a pruner that keeps 1 % of the entries converges slowly or
not at all. The state is kept apart from the pruner (which is a function of tensors), one object
per client, and is saved and restored beside the model's own state dict.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor

from cwmp.costmap import NamedTensors, named_tensors
from cwmp.errors import FeedbackStateError, MaskInputError
from cwmp.parallel import extremes, in_parallel, map_largest_first
from cwmp.sparse import SparseUpdate, _check_mask, take_at, take_kept

__all__ = ["ErrorFeedback"]


_PIECE = 1 << 18  # entries per piece of the compensation (1 MiB of float32: in a core's 2 MiB L2 cache; a
# quarter of that made 62 layers of ResNet-18 take 6.5 ms instead of about 5.7, in per-piece calls)


def _add_and_reduce(pair: tuple[Tensor, Tensor]) -> tuple[float, float] | None:
    """residual += update, and the (min, max) of the result (NaN anywhere makes both NaN); None
    for an empty tensor. With numpy's addition, piece by piece, each piece reduced while in cache."""
    residual, update = pair
    arrays = _numpy_views(residual, update)
    if arrays is None:
        residual.add_(update)
        return extremes(residual) if residual.numel() else None
    r, u = arrays
    if not r.size:
        return None
    lows, highs = [], []
    for start in range(0, r.size, _PIECE):
        piece = r[start : start + _PIECE]
        np.add(piece, u[start : start + _PIECE], out=piece)  # IEEE addition, as torch's add_
        lows.append(piece.min())
        highs.append(piece.max())
    return float(np.min(lows)), float(np.max(highs))  # numpy's min and max keep a NaN


def _numpy_views(residual: Tensor, update: Tensor) -> tuple[np.ndarray, np.ndarray] | None:
    """Flat numpy views of both, when numpy's addition on them is torch's (plain contiguous CPU
    tensors of one float32 or float64 dtype); None otherwise (then torch adds)."""
    if not (residual.dtype == update.dtype and residual.dtype in (torch.float32, torch.float64)
            and residual.device.type == update.device.type == "cpu"
            and residual.is_contiguous() and update.is_contiguous()):
        return None
    try:  # a negative or conjugate view, or a tensor that needs grad, has no plain numpy view
        return residual.numpy().reshape(-1), update.numpy().reshape(-1)
    except (RuntimeError, TypeError):
        return None


def _check_positions(update: Tensor, at: np.ndarray) -> None:
    """Kept positions given to ``remember``: a 1-D integer array, ascending, within the update (its
    ends are checked: ascending, they bound the rest)."""
    if not (isinstance(at, np.ndarray) and at.ndim == 1 and np.issubdtype(at.dtype, np.integer)
            and (not at.size or (0 <= int(at[0]) and int(at[-1]) < update.numel()))):
        what = type(at).__name__ if not isinstance(at, np.ndarray) else f"{at.dtype} of shape {at.shape}"
        raise MaskInputError(
            f"kept positions must be a 1-D integer numpy array, ascending, within the update's "
            f"{update.numel()} entries; got {what}: pass the positions the pruner returned"
        )


class ErrorFeedback:
    """Residuals per tensor name, in float32 or wider so that small entries can accumulate.

    ``compensate(updates, in_place=True)`` adds each update into the residual held for it and
    returns those very tensors; ``remember`` then writes the sent entries into new tensors and
    zeroes them in the residual, so a step makes no copy of the update beyond what it sends (this
    is what ``Pruner.compress`` does). Without ``in_place`` compensation returns new tensors and
    leaves the state alone until ``remember``. ``remember(..., sparse=True)`` returns the sent
    entries as ``SparseUpdate`` (positions and values) instead, with no dense tensor of the
    update's size made at all.
    """

    def __init__(self) -> None:
        self.residuals: dict[str, Tensor] = {}
        self._open: dict[str, Tensor] = {}  # residuals that hold an update added in place
        self.open_extremes: dict[int, tuple[float, float]] = {}  # their (min, max), by id

    def compensate(self, updates: NamedTensors, *, in_place: bool = False) -> dict[str, Tensor]:
        """The update plus what earlier masks dropped (the update itself where nothing was dropped)."""
        named = named_tensors(updates)
        for name, update in named.items():  # check everything before changing anything
            residual = self.residuals.get(name)
            if residual is not None and residual.shape != update.shape:
                raise FeedbackStateError(
                    f"residual {name!r} has shape {tuple(residual.shape)} but the update has "
                    f"{tuple(update.shape)}; the feedback state belongs to another model: reset() it "
                    "or load the matching state"
                )
        if in_place and self._open:
            raise FeedbackStateError(
                f"compensate(in_place=True) was called twice without remember(); the residuals of "
                f"{sorted(self._open)} already hold an update: call remember() (or undo()) first"
            )
        corrected = {}
        adds = []
        for name, update in named.items():
            dtype = torch.promote_types(update.dtype, torch.float32)
            update = update.detach()
            residual = self.residuals.get(name)
            if residual is None:
                corrected[name] = update.to(dtype)  # no copy if it already is; never written to
            elif in_place and residual.dtype == dtype and residual.device == update.device:
                adds.append((residual, update))
                corrected[name] = residual
                self._open[name] = residual
            else:
                corrected[name] = update.to(dtype) + residual.to(update.device)
        self.open_extremes = {}
        done: list[tuple[Tensor, Tensor]] = []  # the additions that completed

        def add(pair: tuple[Tensor, Tensor]) -> tuple[float, float] | None:
            found = _add_and_reduce(pair)
            done.append(pair)
            return found

        try:
            if adds and all(residual.device.type == "cpu" for residual, _ in adds):
                # on the caller's threads; each residual's (min, max) is taken while it is in cache,
                # for the pruner's checks of the corrected update (``open_extremes``)
                found = map_largest_first(add, adds, [r.numel() for r, _ in adds])
                self.open_extremes = {id(r): ext for (r, _), ext in zip(adds, found) if ext is not None}
            else:
                for residual, update in adds:
                    residual.add_(update)
                    done.append((residual, update))
        except BaseException:  # take back what was added; the state is as before the call
            for residual, update in done:
                residual.sub_(update)
            self._close()
            raise
        return corrected

    def extremes_of(self, corrected: Tensor) -> tuple[float, float] | None:
        """(min, max) of a tensor that the last in-place ``compensate`` returned and nothing has
        changed since (None if not known): what the pruner would otherwise reduce again."""
        # its keys are ids of the residuals held in ``_open``, alive until closed: no other live
        # object has one of those ids
        return self.open_extremes.get(id(corrected))

    def undo(self, updates: NamedTensors) -> None:
        """Take back an in-place ``compensate`` whose step failed (the residual is restored up to
        the rounding of one addition and one subtraction)."""
        named = named_tensors(updates)
        for name, residual in self._open.items():
            residual.sub_(named[name].detach())
        self._close()

    def remember(
        self, corrected: Mapping[str, Tensor], masks: Mapping[str, Tensor], *, sparse: bool = False,
        positions: Mapping[str, np.ndarray] | None = None,
    ) -> dict[str, Tensor] | dict[str, SparseUpdate]:
        """Keep what the masks drop as the new residuals and return what they keep (what is sent):
        dense tensors (zeros where masked), or with ``sparse`` the kept positions and values.
        ``positions`` (with ``sparse``, on the CPU): per tensor the flat positions the mask keeps,
        ascending, when the caller has them (the pruner does): the masks are then not read again."""
        if set(corrected) != set(masks):
            raise FeedbackStateError(
                f"masks cover {sorted(masks)} but the updates are {sorted(corrected)}; give one mask per update"
            )
        if sparse:
            return self._remember_sparse(corrected, masks, positions)
        sent = {}
        for name, update in corrected.items():
            keep = masks[name]
            zero = torch.zeros((), dtype=update.dtype, device=update.device)
            residual = self.residuals.get(name)
            if self._open.get(name) is update:  # the residual holds the update: move the kept entries out
                if update.device.type == "cpu" and update.is_contiguous() and keep.is_contiguous():
                    # numpy's kernels: the kept entries out, then residual - sent (x - x = +0 exactly,
                    # x - 0 = x), faster on the CPU than torch's where and masked_fill
                    values = update.numpy()
                    out = np.where(keep.numpy(), values, values.dtype.type(0))
                    np.subtract(values, out, out=values)
                    sent[name] = torch.from_numpy(out)
                else:  # no host round trip on a device
                    sent[name] = torch.where(keep, update, zero)
                    update.masked_fill_(keep, 0)
                continue
            sent[name] = torch.where(keep, update, zero)
            if residual is not None and residual.shape == update.shape and residual.dtype == update.dtype \
                    and residual.device == update.device and residual is not update:
                torch.where(keep, zero, update, out=residual)  # reuse the buffer
            else:
                self.residuals[name] = torch.where(keep, zero, update)
        self._close()
        return sent

    def _remember_sparse(self, corrected: Mapping[str, Tensor], masks: Mapping[str, Tensor],
                         positions: Mapping[str, np.ndarray] | None = None) -> dict[str, SparseUpdate]:
        """Gather the kept entries, then zero them in the residual: sent + residual is the
        corrected update exactly (the kept entries move, the others stay). On the CPU the layers
        are shared among the pruner's threads (``cwmp.parallel``), the largest first."""
        targets = {name: self._target(name, update) for name, update in corrected.items()}
        # where the kept positions are given they are used; the masks are read and checked, all
        # before anything changes, except masks still to be made from those very positions
        # (``cwmp.pruner.LazyMasks``, which the pruner hands over with them: never made here)
        known = {name for name, (residual, _) in targets.items()
                 if positions is not None and name in positions and residual.device.type == "cpu"
                 and residual.is_contiguous()}
        lazy = getattr(masks, "made", True) is False
        keeps = {}
        for name, update in corrected.items():
            if name in known:
                _check_positions(update, positions[name])
            if name not in known or not lazy:
                keeps[name] = masks[name]
                _check_mask(update, keeps[name])
        jobs = []
        for name, update in corrected.items():
            residual, fresh = targets[name]
            if fresh:  # the residual is written anew; ``update`` may be the caller's tensor, never written to
                self.residuals[name] = residual
            elif residual is not update:
                residual.copy_(update)  # reuse the buffer
            jobs.append((name, residual))

        def move(job: tuple[str, Tensor]) -> list[tuple[str, SparseUpdate]]:
            name, residual = job
            if name in known:
                at, values = take_at(positions[name], residual, clear=True)
                return [(name, SparseUpdate(at, values, residual.shape))]
            keep = keeps[name]
            if residual.is_contiguous():
                at, values = take_kept(keep, residual, clear=True)
            else:  # a residual of another layout (loaded from a checkpoint): slower, same result
                at, values = take_kept(keep, residual)
                residual.masked_fill_(keep, 0)
            return [(name, SparseUpdate(at, values, residual.shape))]

        on_cpu = all(residual.device.type == "cpu" for _, residual in jobs)
        largest_first = sorted(jobs, key=lambda job: -job[1].numel())
        moved = dict(in_parallel(move, largest_first) if on_cpu else [pair for job in jobs for pair in move(job)])
        self._close()
        return {name: moved[name] for name in corrected}

    def _target(self, name: str, update: Tensor) -> tuple[Tensor, bool]:
        """Where ``_remember_sparse`` moves the kept entries out of: the residual holding the update,
        the held residual's buffer (reused), or a fresh copy of the update (True: not held yet)."""
        if self._open.get(name) is update:
            return update, False
        residual = self.residuals.get(name)
        if residual is not None and residual.shape == update.shape and residual.dtype == update.dtype \
                and residual.device == update.device and residual is not update:
            return residual, False
        return update.clone(memory_format=torch.contiguous_format), True

    def _close(self) -> None:
        self._open.clear()
        self.open_extremes = {}

    def reset(self) -> None:
        self.residuals.clear()
        self._close()

    # ------------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, dict[str, Tensor]]:
        """Save this beside ``model.state_dict()`` in the client's checkpoint."""
        return {"residuals": {name: r.detach().clone() for name, r in self.residuals.items()}}

    def load_state_dict(self, state: Mapping[str, Mapping[str, Tensor]], like: NamedTensors | None = None) -> None:
        """Restore saved residuals; with ``like`` (e.g. ``model.named_parameters()``) check that each
        residual names a tensor of that shape, so a checkpoint of another model fails here."""
        if set(state) != {"residuals"} or not isinstance(state["residuals"], Mapping):
            raise FeedbackStateError(f"expected {{'residuals': {{name: tensor}}}}, got keys {sorted(state)}")
        residuals = dict(state["residuals"])
        if like is not None:
            shapes = {name: tuple(t.shape) for name, t in named_tensors(like).items()}
            wrong = [
                f"{name} {tuple(r.shape)} vs {shapes.get(name, 'absent')}"
                for name, r in residuals.items()
                if shapes.get(name) != tuple(r.shape)
            ]
            if wrong:
                raise FeedbackStateError(
                    f"the saved residuals do not fit these tensors: {'; '.join(wrong)}; "
                    "load the checkpoint of this model, or start with an empty ErrorFeedback()"
                )
        self.residuals = {name: r.detach().clone() for name, r in residuals.items()}
        self._close()
