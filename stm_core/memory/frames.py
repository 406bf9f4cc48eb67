"""STM's memory policies (paper sec. 3.6 and Table 5) as one parameterised frame memory.

policy            pinned frames                     rolling frames
first             annotated frames                  none
previous          none                              the previous frame
first+previous    annotated frames                  the previous frame
every:N           annotated + every N-th frame      the previous frame   (the paper's default, N=5)
fifo:K            the first frame                   the K-1 most recent frames (bounded, long videos)

Keys and values live in preallocated token buffers laid out [pinned..., rolling...] so the read
sees one contiguous view; the buffer doubles when pinned frames outgrow it, so appends are
amortised O(1) and nothing is concatenated per frame.
"""

from __future__ import annotations

import torch

from stm_core.memory.base import Encoded, Memory
from stm_core.model.read import to_tokens


class TokenBuffer:
    """O x capacity x hw x C, grown by doubling; entry i is one frame's tokens."""

    def __init__(self, capacity: int):
        self.capacity = max(1, capacity)
        self.data: torch.Tensor | None = None

    def write(self, index: int, tokens: torch.Tensor) -> None:  # tokens: O x hw x C
        if self.data is None:
            o, hw, c = tokens.shape
            self.data = tokens.new_empty(o, self.capacity, hw, c)
        if index >= self.data.shape[1]:
            grown = self.data.new_empty(self.data.shape[0], 2 * self.data.shape[1], *self.data.shape[2:])
            grown[:, : self.data.shape[1]] = self.data
            self.data = grown
        self.data[:, index] = tokens

    def move(self, src: int, dst: int) -> None:
        if src != dst:
            assert self.data is not None, "move on an empty token buffer"
            self.write(dst, self.data[:, src].clone())

    def view(self, n: int) -> torch.Tensor:  # O x (n*hw) x C, no copy
        assert self.data is not None, "view of an empty token buffer"
        return self.data[:, :n].flatten(1, 2)


class FrameMemory(Memory):
    def __init__(self, pin_annotated: bool, every: int | None, rolling: int, pin_first_only: bool = False,
                 capacity: int = 8):
        if rolling > 1 and not pin_first_only:
            raise ValueError("more than one rolling frame is only supported with only the first frame pinned")
        self.pin_annotated = pin_annotated
        self.every = every
        self.rolling = rolling
        self.pin_first_only = pin_first_only
        self.keys = TokenBuffer(capacity)
        self.values = TokenBuffer(capacity)
        self.start: int | None = None  # the group's first frame index
        self.n_pinned = 0
        self.n_rolling = 0
        self.next_rolling = 0  # ring position of the next rolling write

    def _pins(self, frame_index: int, annotated: bool) -> bool:
        if self.pin_first_only:
            return self.n_pinned == 0
        if annotated and self.pin_annotated:
            return True
        if self.every is None:
            return False
        assert self.start is not None, "_pins before the first add"  # add and wants set or check it
        return (frame_index - self.start) % self.every == 0

    def wants(self, frame_index: int) -> bool:
        if self.rolling > 0:
            return True
        return self.start is not None and self._pins(frame_index, annotated=False)

    def add(self, frame_index: int, encoded: Encoded, annotated: bool = False) -> None:
        if self.start is None:
            self.start = frame_index
        key, value = to_tokens(encoded.key), to_tokens(encoded.value)  # O x hw x C
        if self._pins(frame_index, annotated):
            slot = self.n_pinned
            self.n_pinned += 1
            # With one rolling slot the pinned frame is also "the previous frame": drop the stale one.
            self.n_rolling = 0 if self.rolling <= 1 else self.n_rolling
            self.next_rolling = 0
        elif self.rolling > 0:
            slot = self.n_pinned + self.next_rolling
            self.next_rolling = (self.next_rolling + 1) % self.rolling
            self.n_rolling = min(self.n_rolling + 1, self.rolling)
        else:
            return
        self.keys.write(slot, key)
        self.values.write(slot, value)

    def keys_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.size
        if n == 0:
            raise RuntimeError("memory is empty: add an annotated frame first")
        return self.keys.view(n), self.values.view(n)

    @property
    def size(self) -> int:
        return self.n_pinned + self.n_rolling

    @property
    def nbytes(self) -> int:
        """Bytes of the entries held now (the buffers' spare capacity is not counted)."""
        return sum(b.data[:, : self.size].numel() * b.data.element_size()
                   for b in (self.keys, self.values) if b.data is not None)
