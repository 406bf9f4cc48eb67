"""What InferenceCore and the memories call on a network: one interface, two runtimes.

`STMNetwork` (torch) implements it, and so does `stm_core.onnx_runtime.OnnxNetwork` (the graphs of
`stm export` on onnxruntime), so the inference loop and the memory policies are one code for both.
`load_network` builds either from a checkpoint (`stm segment --runtime`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch

from stm_core.model.encoders import QueryFeatures
from stm_core.model.network import MemoryFeatures, ModelConfig

RUNTIMES = ("torch", "onnx")


class StepNetwork(Protocol):
    config: ModelConfig
    fusion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None  # STRMN: x_i, x_j -> updated x_j

    def encode_query_with_skip_features(
        self, frames: torch.Tensor, beside: Any = None  # 1 x 3 x H x W
    ) -> tuple[QueryFeatures, tuple[torch.Tensor, torch.Tensor]]: ...

    def read(self, query: QueryFeatures, memory_key: torch.Tensor,  # 1 x O x L x Ck
             memory_value: torch.Tensor) -> torch.Tensor: ...  # 1 x O x L x Cv -> 1 x O x 2Cv x h x w

    def decode(self, readout: torch.Tensor, skips: tuple[torch.Tensor, torch.Tensor], out_size: tuple[int, int],
               skip_features: tuple[torch.Tensor, torch.Tensor] | None = None,
               split: Any = None) -> torch.Tensor: ...  # -> 1 x O x H x W logits

    def aggregate(self, foreground: torch.Tensor) -> torch.Tensor: ...  # 1 x O x H x W -> 1 x (1+O) x H x W

    def encode_memory(self, frames: torch.Tensor, probs: torch.Tensor,  # 1 x O x H x W
                      others: torch.Tensor) -> MemoryFeatures: ...

    def template_key_value(self, feature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


def load_network(runtime: str, checkpoint: str | Path, device: str | torch.device = "cpu",
                 onnx_dir: str | Path | None = None):
    """-> the checkpoint's network for InferenceCore: a torch STMNetwork, or (runtime 'onnx') an
    OnnxNetwork on the graphs in `onnx_dir`, checked against the checkpoint; without `onnx_dir`
    the checkpoint is exported to a temporary folder first (seconds to a minute)."""
    if runtime == "torch":
        if onnx_dir is not None:
            raise ValueError(f"{onnx_dir}: ONNX graphs are for --runtime onnx (the runtime is torch)")
        from stm_core.model.checkpoint import load_checkpoint

        return load_checkpoint(checkpoint, map_location=device).to(device)
    if runtime != "onnx":
        raise ValueError(f"unknown runtime {runtime!r}; choose one of {RUNTIMES}")
    from stm_core.onnx_runtime import OnnxNetwork

    device_type = torch.device(device).type
    if onnx_dir is not None:
        return OnnxNetwork(onnx_dir, checkpoint=checkpoint, device=device_type)
    import tempfile

    from stm_core.onnx_export import export_checkpoint

    with tempfile.TemporaryDirectory(prefix="stm-onnx-") as tmp:
        export_checkpoint(checkpoint, tmp)
        return OnnxNetwork(tmp, checkpoint=checkpoint, device=device_type)  # sessions hold the graphs
