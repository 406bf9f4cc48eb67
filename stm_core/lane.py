"""A second CPU thread for inference, for work that shares no input with the caller's.

PyTorch parallelises inside each operation. On a few cores some of STM's work scales badly that
way: NNPACK's Winograd convolutions run about as fast on one thread as on two (its pool and
OpenMP's spinning workers compete), and one object's memory encoding cannot start before the
previous frame's mask exists but needs nothing of the next frame. `SideLane` runs such work on a
second thread while the caller goes on, each with its share of the torch threads; `synchronize`
waits for all of it, in the order it was queued, and re-raises the first error.

The operations and their inputs are those of the one-thread order, so results are the same up to
the kernels' thread-count-dependent rounding (oneDNN, NNPACK's Winograd tiles: ~1e-6 relative).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import torch


class SideLane:
    def __init__(self, threads: int):  # threads: the caller's torch threads (>= 2), split in two
        if threads < 2:
            raise ValueError(f"a side lane needs 2 or more threads to share, got {threads}")
        self.threads = threads
        self.side_threads = threads // 2
        self.main_threads = threads - self.side_threads
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stm-side-lane")
        self._pending: list[Future] = []

    @property
    def busy(self) -> bool:
        return bool(self._pending)

    def submit(self, fn: Callable, *args) -> Future:
        """Queue fn(*args) on the lane (after what is queued there), with the lane's threads."""
        self._pending.append(self._executor.submit(self._run, fn, *args))
        return self._pending[-1]

    def _run(self, fn: Callable, *args):
        torch.get_num_threads()  # a thread's first call reads the process-wide count: take it first,
        torch.set_num_threads(self.side_threads)  # then set this thread's own (OpenMP's is per thread)
        with torch.inference_mode():  # thread-local, like the thread count
            return fn(*args)

    def synchronize(self) -> None:
        pending, self._pending = self._pending, []
        for future in pending:  # in queue order: the first error is raised
            future.result()

    @contextlib.contextmanager
    def sharing(self) -> Iterator[None]:
        """The caller runs the body with its share of the threads, then waits for the lane."""
        torch.set_num_threads(self.main_threads)
        try:
            yield
        finally:
            torch.set_num_threads(self.threads)
            self.synchronize()

    def rows_in_two(
        self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, halo: int
    ) -> torch.Tensor:  # ... x H x W -> fn(x), its bottom half computed on the lane
        """fn(x) for a fn whose output row i depends on input rows i-halo..i+halo only (a stack of
        3x3 convolutions with zero padding 1: halo = their number). Each half gets `halo` extra
        rows, so every kept output row sees exactly the inputs it sees in fn(x)."""
        h = x.shape[-2]
        mid = h // 2
        if mid <= halo:
            return fn(x)
        with self.sharing():
            bottom = self.submit(fn, x[..., mid - halo :, :])
            top = fn(x[..., : mid + halo, :])[..., :mid, :]
            bottom_rows = bottom.result()[..., halo:, :]
        return torch.cat([top, bottom_rows], dim=-2)

    def close(self) -> None:
        self.synchronize()
        self._executor.shutdown()
