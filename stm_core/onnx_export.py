"""Export a checkpoint's network as ONNX graphs, one per part of an inference step (`stm export`).

DIR receives `<part>.onnx` for each graph of `stm_core.onnx_graphs.GRAPHS` (STRMN adds its Fusion
Cell and the template key/value heads) and `manifest.json`: the format, the opset, the precision,
the model kind and config, the checkpoint's name and SHA-256, and per graph its file, SHA-256,
inputs and outputs. Each graph also carries the checkpoint's SHA-256 in its own metadata, so a
graph copied in from another export is caught when the runtime loads it (`stm_core.onnx_runtime`).

The graphs are traced from the inference copy of the network (`fused_for_inference`: BatchNorm
folded into the convolutions; the Winograd and max-pool rewrites are torch kernels, not exported)
by the TorchScript exporter (`dynamo=False`: no onnxscript needed). Precision: fp32, the only one
exported (docs/speed.md says why).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from stm_core.model.checkpoint import load_checkpoint
from stm_core.model.network import STMNetwork
from stm_core.onnx_graphs import GRAPHS, graph_names

OPSET = 17
FORMAT = "stm-onnx"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CHECKPOINT_KEY = "stm.checkpoint_sha256"  # in every graph's metadata_props
GRAPH_KEY = "stm.graph"


class ExportError(ValueError):
    pass


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _onnx():
    try:
        import onnx
    except ModuleNotFoundError as err:
        raise ExportError("exporting needs the onnx package: pip install 'stm-vos[onnx]'") from err
    return onnx


def export_graph(network: STMNetwork, name: str, checkpoint_sha256: str, path: Path, opset: int = OPSET) -> str:
    """One graph of GRAPHS into `path`, tagged with the checkpoint's digest and checked; -> its SHA-256."""
    onnx = _onnx()
    spec = GRAPHS[name]
    module = spec.module(network).eval()
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on Python ints taken from shapes
        torch.onnx.export(module, spec.example(network), str(path), dynamo=False, opset_version=opset,
                          input_names=list(spec.inputs), output_names=list(spec.outputs),
                          dynamic_axes={**spec.inputs, **spec.outputs}, do_constant_folding=True)
    model = onnx.load(str(path))
    for key, value in ((CHECKPOINT_KEY, checkpoint_sha256), (GRAPH_KEY, name)):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    data = model.SerializeToString()
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def export_network(network: STMNetwork, out: str | Path, checkpoint_sha256: str, checkpoint_name: str = "",
                   opset: int = OPSET) -> dict:
    """Write every graph of `network` and the manifest into `out`; -> the manifest.

    Files are staged beside `out` and moved in, the manifest last: a crash leaves no manifest
    that names a missing or half-written graph.
    """
    out = Path(out)
    if network.config.top_k is not None:
        raise ExportError(f"model.top_k={network.config.top_k}: the top-k read is not exported (only the full read)")
    fused = network.fused_for_inference(channels_last=True).to(memory_format=torch.contiguous_format).cpu()
    out.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        graphs = {}
        for name in graph_names(network.config.kind):
            digest = export_graph(fused, name, checkpoint_sha256, stage / f"{name}.onnx", opset)
            spec = GRAPHS[name]
            graphs[name] = {"file": f"{name}.onnx", "sha256": digest,
                            "inputs": list(spec.inputs), "outputs": list(spec.outputs)}
        manifest = {"format": FORMAT, "version": FORMAT_VERSION, "opset": opset, "precision": "fp32",
                    "model": {"kind": network.config.kind, "config": network.config.to_dict()},
                    "checkpoint": {"name": checkpoint_name, "sha256": checkpoint_sha256},
                    "torch": torch.__version__, "onnx": _onnx().__version__, "graphs": graphs}
        (stage / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        (out / MANIFEST).unlink(missing_ok=True)
        for file in [*(f"{name}.onnx" for name in graphs), MANIFEST]:
            os.replace(stage / file, out / file)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return manifest


def export_checkpoint(checkpoint: str | Path, out: str | Path, opset: int = OPSET) -> dict:
    """`stm export`: the checkpoint file's network -> graphs and manifest in `out`."""
    network = load_checkpoint(checkpoint)  # raises CheckpointError naming the file
    return export_network(network, out, file_sha256(checkpoint), Path(checkpoint).name, opset)
