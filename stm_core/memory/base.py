"""The memory interface shared by STM's frame policies and STRMN's recurrent slots."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import NamedTuple

import torch


class Encoded(NamedTuple):
    """One frame's memory encoding for a group of O objects (no batch dimension)."""

    feature: torch.Tensor  # O x C x h x w: res4 template (what STRMN slots hold)
    key: torch.Tensor  # O x Ck x h x w
    value: torch.Tensor  # O x Cv x h x w


class Memory(ABC):
    """Memory of one group of objects: those introduced by the same annotated frame.

    The inference loop asks `wants(t)` before paying for a memory encoding of frame t, then
    `add`s it; `keys_values()` gives the read's tokens. Nothing is ever re-encoded.
    """

    @abstractmethod
    def wants(self, frame_index: int) -> bool:
        """Whether frame `frame_index`'s encoding would be stored (so it is worth computing)."""

    @abstractmethod
    def add(self, frame_index: int, encoded: Encoded, annotated: bool = False) -> None:
        """Store a frame. `annotated`: its masks are ground truth (first frame, new objects)."""

    @abstractmethod
    def keys_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (keys: O x L x Ck, values: O x L x Cv), L = entries x h x w memory locations."""

    @property
    @abstractmethod
    def size(self) -> int:
        """Memory entries held now: frames for STM policies, slots for STRMN."""

    @property
    def nbytes(self) -> int:
        """Bytes of tensors the memory holds (for benchmarks)."""
        return 0
