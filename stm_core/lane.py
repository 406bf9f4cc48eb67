"""A second CPU thread for inference, for work that shares no input with the caller's.

PyTorch parallelises inside each operation. On a few cores some of STM's work scales badly that
way: NNPACK's Winograd convolutions run about as fast on one thread as on two (its pool and
OpenMP's spinning workers compete), and one object's memory encoding cannot start before the
previous frame's mask exists but needs nothing of the next frame. `SideLane` runs such work on a
second thread while the caller goes on, each with its share of the torch threads; `synchronize`
waits for all of it, in the order it was queued, and re-raises the first error.

`Overlap` holds the decisions of what `stm_core.inference.InferenceCore` hands to the lane
(measured on a 2-core AVX2 VM), each with half the threads:
- one object's memory encoding of frame t runs beside frame t+1's query encoding (the query side
  needs only the new frame, the memory side only the previous frame and its mask); the memory read
  waits for both. With more objects the memory side (one encoder pass per object) outweighs the
  query side, and it runs with all threads instead;
- one object's decoder merge blocks (3x3 convs at 1/8 and 1/4 scale, NNPACK's Winograd, which
  does not scale past one thread here) run in two row bands, one per thread. With several
  objects one band of O images already keeps NNPACK busy (3 objects: the split was 0.96x).

The operations and their inputs are those of the one-thread order, so results are the same up to
the kernels' thread-count-dependent rounding (oneDNN, NNPACK's Winograd tiles: ~1e-6 relative).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from stm_core.model.decoder import RowSplit
from stm_core.model.fast_path import claim_nnpack_threads

ContextFactory = Callable[[], contextlib.AbstractContextManager]


class SideLane:
    def __init__(self, threads: int, context: ContextFactory = contextlib.nullcontext):
        # threads: the caller's torch threads (>= 2), split in two. context: entered around each
        # piece of work on the lane (thread-local state such as autocast does not cross threads).
        if threads < 2:
            raise ValueError(f"a side lane needs 2 or more threads to share, got {threads}")
        self.threads = threads
        self.side_threads = threads // 2
        self.main_threads = threads - self.side_threads
        self.context = context
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
        with torch.inference_mode(), self.context():  # thread-local, like the thread count
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


class Overlap:
    """What of one video's inference runs on a side lane (see the module docstring); off: nothing."""

    def __init__(self, enabled: bool, winograd: bool, context: ContextFactory = contextlib.nullcontext):
        # winograd: the network runs NNPACK's Winograd convs (CPU fast path), whose pool is sized once
        self.enabled = enabled
        self.context = context
        self._lane: SideLane | None = None  # made at the first frame that uses it (with 2+ threads)
        if enabled and winograd:
            threads = torch.get_num_threads()
            claim_nnpack_threads(threads - threads // 2)  # a lane's share: no oversubscribed cores

    def _lane_for(self, threads: int) -> SideLane | None:
        """The side lane, made (or remade for a new thread count) if overlap is on and threads >= 2."""
        if not self.enabled or threads < 2:
            return None
        if self._lane is None or self._lane.threads != threads:
            self.close()
            self._lane = SideLane(threads, self.context)
        return self._lane

    @contextlib.contextmanager
    def beside_memory_encoding(self) -> Iterator[Callable[..., Future] | None]:
        """For the frame's own work (the query encoding): while the previous frame's memory
        encoding still runs on the lane, the body gets half the threads and `beside` (queue more
        of its work on the lane), and the lane is waited for after it; otherwise `None`."""
        lane = self._lane
        if lane is not None and lane.busy:
            with lane.sharing():
                yield lane.submit
        else:
            yield None

    def decoder_split(self, objects: int) -> RowSplit | None:
        """How the decoder of a group of `objects` splits its merge convs (None: it does not)."""
        lane = self._lane_for(torch.get_num_threads()) if objects == 1 else None
        return lane.rows_in_two if lane is not None else None

    def encode_memory(self, objects: int, fn: Callable, *args) -> None:
        """fn(*args), a memory encoding of `objects` object passes: on the lane (returning at once)
        for one object, balanced against the next query encoding; here with all threads otherwise."""
        lane = self._lane_for(torch.get_num_threads()) if objects == 1 else None
        if lane is None:
            fn(*args)
        else:
            lane.submit(fn, *args)

    def synchronize(self) -> None:
        """Wait for the lane's work (re-raises its error)."""
        if self._lane is not None:
            self._lane.synchronize()

    def close(self) -> None:
        if self._lane is not None:
            self._lane.close()
            self._lane = None
