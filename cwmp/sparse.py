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

__all__ = ["SparseUpdate", "kept_positions", "narrow_positions"]


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
        indices = kept_positions(mask)
        values = tensor.detach().reshape(-1).index_select(0, indices)
        return cls(narrow_positions(indices, tensor.numel()), values, tensor.shape)

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


def kept_positions(mask: Tensor) -> Tensor:
    """Ascending flat positions (int64) of the True entries of a bool mask, on its device."""
    flat = mask.reshape(-1)
    if flat.device.type == "cpu":  # numpy's flatnonzero is several times faster than torch.nonzero here
        return torch.from_numpy(np.flatnonzero(flat.numpy()))
    return torch.nonzero(flat).squeeze(1)


def narrow_positions(indices: Tensor, numel: int) -> Tensor:
    """int64 positions as int32 where the tensor's ``numel`` allows it (a third less to hold: values
    and indices of a float32 update take 8 bytes per kept entry instead of 12)."""
    return indices.to(torch.int32) if numel <= torch.iinfo(torch.int32).max else indices


def _check_mask(tensor: Tensor, mask: Tensor) -> None:
    if mask.dtype != torch.bool or mask.shape != tensor.shape or mask.device != tensor.device:
        raise MaskInputError(
            f"a mask must be a bool tensor of the update's shape {tuple(tensor.shape)} on {tensor.device}, got "
            f"{mask.dtype} of shape {tuple(mask.shape)} on {mask.device}: pass the masks the pruner returned"
        )
