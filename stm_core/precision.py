"""Inference precision: `fp32` (exact, what results are reported in) or `bf16` (opt-in, for speed).

fp32 runs every operation in IEEE float32: on CUDA, PyTorch would otherwise let cuDNN convolutions
(and cuBLAS matmuls, after `torch.set_float32_matmul_precision("high")`) use TF32, whose 10-bit
mantissa moves STM's probabilities by ~1e-3; oneDNN can be told to do the same with bf16 on CPUs
with AMX. `exact_fp32()` turns all of that off while its body runs and then restores the previous
settings, so a caller's own choice outside inference is left as it was.

bf16 runs the network under `torch.autocast(..., dtype=torch.bfloat16)` on CUDA and on CPU
(oneDNN's bf16 kernels, fast on CPUs with AMX-BF16); memory keys, values and STRMN's templates are
then stored in bf16 too. fp32 stores them in fp32 and never rounds them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

PRECISIONS = ("fp32", "bf16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# The per-backend fp32 settings (torch >= 2.9): "ieee" is exact fp32, "none" inherits the parent.
_NEW_API = ("cuda.matmul", "cudnn.conv", "cudnn.rnn", "cudnn", "mkldnn.matmul", "mkldnn.conv", "mkldnn", "")
_REDUCED_ON_CPU = ("mkldnn.matmul", "mkldnn.conv", "mkldnn", "")  # the ones CPU kernels consult


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
    return precision


def _backend(name: str):
    obj: Any = torch.backends  # walks into submodules, then None where a backend is missing
    for part in filter(None, name.split(".")):
        obj = getattr(obj, part, None)
    return obj


def _saved() -> dict[str, object]:
    saved: dict[str, object] = {"matmul_precision": torch.get_float32_matmul_precision()}
    try:  # raises when a caller mixed the legacy and the per-backend settings: then those restore it
        saved["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
    except RuntimeError:
        pass
    for name in _NEW_API:
        value = getattr(_backend(name), "fp32_precision", None)
        if value is not None:
            saved[name] = value
    return saved


def _restore(saved: dict[str, object]) -> None:
    # The legacy switches first (each also writes per-backend values), then the per-backend values.
    torch.set_float32_matmul_precision(str(saved["matmul_precision"]))
    if "cudnn_allow_tf32" in saved:
        torch.backends.cudnn.allow_tf32 = bool(saved["cudnn_allow_tf32"])
    for name in _NEW_API:
        if name in saved:
            _backend(name).fp32_precision = saved[name]


def _set_exact() -> None:
    torch.backends.cudnn.allow_tf32 = False  # the legacy switches keep both APIs consistent
    torch.backends.cuda.matmul.allow_tf32 = False
    for name in ("cudnn.conv", "cudnn.rnn", "cuda.matmul", "mkldnn.matmul", "mkldnn.conv"):
        backend = _backend(name)
        if getattr(backend, "fp32_precision", None) not in (None, "ieee"):
            backend.fp32_precision = "ieee"


def set_exact_fp32() -> None:
    """IEEE fp32 for this process from now on: for a training worker that trains in fp32 (on CUDA,
    PyTorch's default lets cuDNN convolutions use TF32)."""
    _set_exact()


class ExactScope:
    """What `exact_fp32` found: whether leaving it lets CPU kernels round fp32 again (work still
    running on another thread must then finish inside the scope)."""

    def __init__(self, saved: dict[str, object]):
        self.reduced_on_cpu = any(saved.get(name, "none") not in ("none", "ieee") for name in _REDUCED_ON_CPU)


@contextlib.contextmanager
def exact_fp32() -> Iterator[ExactScope]:
    """IEEE fp32 for convolutions and matmuls (no TF32 on CUDA, no bf16/TF32 in oneDNN) inside;
    the previous `torch.backends` settings are restored on leaving."""
    saved = _saved()
    _set_exact()
    try:
        yield ExactScope(saved)
    finally:
        _restore(saved)


def autocast(precision: str, device_type: str) -> contextlib.AbstractContextManager:
    """The autocast scope of `precision` on `device_type` (a no-op for fp32)."""
    if precision == "bf16":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
