"""Which runtime runs a checkpoint's network for InferenceCore: torch, or onnxruntime on the graphs
of `stm export` (`stm segment --runtime`). Both give InferenceCore a `StepNetwork`
(stm_core/inference.py), so the inference loop and the memory policies are one code for both.
"""

from __future__ import annotations

from pathlib import Path

import torch

RUNTIMES = ("torch", "onnx")


def load_network(runtime: str, checkpoint: str | Path | bytes, device: str | torch.device = "cpu",
                 onnx_dir: str | Path | None = None):
    """-> the checkpoint's network for InferenceCore: a torch STMNetwork, or (runtime 'onnx') an
    OnnxNetwork on the graphs in `onnx_dir`, checked against the checkpoint; without `onnx_dir`
    the checkpoint is exported to a temporary folder first (seconds to a minute). `checkpoint` may
    be the file's bytes: torch reads them in memory (no copy on a small node disk)."""
    if runtime == "torch":
        if onnx_dir is not None:
            raise ValueError(f"{onnx_dir}: ONNX graphs are for --runtime onnx (the runtime is torch)")
        from stm_core.model.checkpoint import load_checkpoint

        return load_checkpoint(checkpoint, map_location=device).to(device)
    if runtime != "onnx":
        raise ValueError(f"unknown runtime {runtime!r}; choose one of {RUNTIMES}")
    if isinstance(checkpoint, bytes):  # the exporter and the graph check read a file
        import tempfile

        with tempfile.TemporaryDirectory(prefix="stm-ckpt-") as folder:
            (Path(folder) / "model.pt").write_bytes(checkpoint)
            return load_network(runtime, Path(folder) / "model.pt", device, onnx_dir)
    from stm_core.onnx_runtime import OnnxNetwork

    device_type = torch.device(device).type
    if onnx_dir is not None:
        return OnnxNetwork(onnx_dir, checkpoint=checkpoint, device=device_type)
    import tempfile

    from stm_core.onnx_export import export_checkpoint

    with tempfile.TemporaryDirectory(prefix="stm-onnx-") as tmp:
        export_checkpoint(checkpoint, tmp)
        return OnnxNetwork(tmp, checkpoint=checkpoint, device=device_type)  # sessions hold the graphs
