"""What a client sends: the kept entries of one tensor, as flat positions and values.

A dense update with zeros where the mask drops costs a tensor of the update's size to allocate and
fill; the kept entries are all that travels. ``SparseUpdate`` holds them (positions in the
row-major order of ``shape``, ascending; values in the update's dtype) and makes the dense tensor
again on request.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from cwmp.errors import MaskInputError

__all__ = ["SparseUpdate", "kept_positions", "narrow_positions", "take_kept"]


@dataclass(frozen=True)
class SparseUpdate:
    """The kept entries of one tensor of ``shape``: ``values[i]`` sits at flat (row-major)
    position ``indices[i]``; positions are ascending, int32 when the tensor has fewer than 2**31
    entries (int64 otherwise). Entries not listed are zero."""

    indices: Tensor
    values: Tensor
    shape: torch.Size

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", torch.Size(self.shape))
        if self.indices.dim() != 1 or self.indices.dtype not in (torch.int64, torch.int32):
            raise MaskInputError(
                f"indices must be a 1-D int64 (or int32) tensor of flat positions, got {self.indices.dtype} "
                f"of shape {tuple(self.indices.shape)}: pass torch.nonzero(mask.reshape(-1)).squeeze(1)"
            )
        if self.values.dim() != 1 or self.values.numel() != self.indices.numel():
            raise MaskInputError(
                f"values must be 1-D with one value per index ({self.indices.numel()}), got shape "
                f"{tuple(self.values.shape)}: pass the tensor's entries at those positions"
            )
        if self.indices.numel() > self.numel:
            raise MaskInputError(f"{self.indices.numel()} indices for a tensor of {self.numel} entries")

    @classmethod
    def from_mask(cls, tensor: Tensor, mask: Tensor) -> SparseUpdate:
        """The entries of ``tensor`` where ``mask`` (bool, same shape) is True; ``tensor`` is not changed."""
        _check_mask(tensor, mask)
        positions, values = take_kept(mask, tensor)
        return cls(positions, values, tensor.shape)

    @property
    def numel(self) -> int:
        """Entries of the dense tensor."""
        return math.prod(self.shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    def to_dense(self) -> Tensor:
        """The dense tensor: the values at their positions, zeros elsewhere."""
        dense = torch.zeros(self.numel, dtype=self.values.dtype, device=self.values.device)
        dense.index_copy_(0, self.indices.long(), self.values)
        return dense.view(self.shape)

    def nbytes_sent(self, index_bytes: int = 4) -> int:
        """Bytes on the wire: each kept entry's value plus an index of ``index_bytes`` bytes (4 by
        default: int32 positions, enough below 2**32 entries). The shape is not counted."""
        if not isinstance(index_bytes, int) or isinstance(index_bytes, bool) or index_bytes < 1:
            raise ValueError(f"index_bytes must be a positive int, got {index_bytes!r}")
        if self.numel > 256**index_bytes:
            raise ValueError(
                f"{index_bytes}-byte indices cannot address {self.numel} entries; use index_bytes="
                f"{max(1, math.ceil(math.log2(self.numel) / 8))} or more"
            )
        return self.values.numel() * (self.values.element_size() + index_bytes)


_PIECE = 1 << 18  # mask entries per step on the CPU: int64 temporaries stay this small


def kept_positions(mask: Tensor) -> Tensor:
    """Ascending flat positions of the True entries of a bool mask, on its device, in the
    narrowest index dtype (``narrow_positions``)."""
    return take_kept(mask)[0]


def take_kept(
    mask: Tensor, tensor: Tensor | None = None, *, clear: bool = False, pieces: bool | None = None
) -> tuple[Tensor, Tensor | None]:
    """The positions of the True entries of ``mask`` (as ``kept_positions``) and, given a
    ``tensor`` of the mask's shape, its values there; with ``clear`` those entries of ``tensor``
    are then set to zero (``tensor`` must be contiguous). On the CPU the mask is walked in pieces
    of ``_PIECE`` entries, so no int64 index of all kept entries is ever made: the memory used is
    the int32 positions and the values, what is sent. ``pieces`` (default: on the CPU) chooses
    that walk or one kernel each over the whole tensor (a device's way)."""
    flat_mask = mask.reshape(-1)
    flat = None if tensor is None else tensor.detach().view(-1) if clear else tensor.detach().reshape(-1)
    if not (flat_mask.device.type == "cpu" if pieces is None else pieces):  # one kernel each, no round trip per piece
        index = torch.nonzero(flat_mask).squeeze(1)
        values = None if flat is None else flat.index_select(0, index)
        if clear:
            flat.index_fill_(0, index, 0)
        return narrow_positions(index, flat_mask.numel()), values
    bits = flat_mask.numpy()
    n = bits.size
    positions = np.empty(int(np.count_nonzero(bits)), dtype=np.int32 if n <= _INT32_MAX else np.int64)
    values = None if flat is None else torch.empty(positions.size, dtype=flat.dtype)
    at = 0
    for start in range(0, n, _PIECE):
        local = np.flatnonzero(bits[start : start + _PIECE])  # numpy's is several times torch's speed
        k = local.size
        if not k:
            continue
        np.add(local, start, out=positions[at : at + k], casting="unsafe")
        if flat is not None:
            index, piece = torch.from_numpy(local), flat[start : start + _PIECE]
            torch.index_select(piece, 0, index, out=values[at : at + k])
            if clear:
                piece.index_fill_(0, index, 0)
        at += k
    return torch.from_numpy(positions), values


def take_at(positions: np.ndarray, tensor: Tensor, *, clear: bool = False) -> tuple[Tensor, Tensor]:
    """``take_kept`` when the kept flat positions (ascending, numpy) are known, for a float32 or
    float64 tensor (numpy's dtypes): the positions as
    ``take_kept`` gives them (int32 where the tensor allows) and the values of the contiguous CPU
    ``tensor`` there, which ``clear`` then sets to zero."""
    flat = tensor.detach().view(-1)
    narrow = np.int32 if flat.numel() <= _INT32_MAX else np.int64
    at = np.ascontiguousarray(positions, dtype=narrow)
    data = flat.numpy()
    # numpy converts int32 positions to intp on every indexing: once here, for both (measured:
    # `remember` on ResNet-18 at 10 %, 6.4 to 5.4 ms); a transient copy of one layer's positions
    index = at.astype(np.intp) if clear and at.dtype != np.intp else at
    values = torch.from_numpy(data[index])
    if clear:
        data[index] = 0
    return torch.from_numpy(at), values


_INT32_MAX = torch.iinfo(torch.int32).max


def narrow_positions(indices: Tensor, numel: int) -> Tensor:
    """int64 positions as int32 where the tensor's ``numel`` allows it (a third less to hold: values
    and indices of a float32 update take 8 bytes per kept entry instead of 12)."""
    return indices.to(torch.int32) if numel <= _INT32_MAX else indices


def _check_mask(tensor: Tensor, mask: Tensor) -> None:
    if mask.dtype != torch.bool or mask.shape != tensor.shape or mask.device != tensor.device:
        raise MaskInputError(
            f"a mask must be a bool tensor of the update's shape {tuple(tensor.shape)} on {tensor.device}, got "
            f"{mask.dtype} of shape {tuple(mask.shape)} on {mask.device}: pass the masks the pruner returned"
        )
