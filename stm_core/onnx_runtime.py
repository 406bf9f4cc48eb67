"""The exported graphs (`stm export`) run by onnxruntime behind the network interface InferenceCore uses.

`OnnxNetwork(directory, checkpoint=None)` loads `manifest.json` and an InferenceSession per graph and
offers the methods `InferenceCore` and the memories call on a torch `STMNetwork`
(`stm_core.inference.StepNetwork`): tensors in, tensors out, so the memory policies
(`stm_core.memory`) and the inference loop are the same code for both runtimes. The memory stays
torch tensors on the host; each call hands numpy views to onnxruntime.

Checked on load, each an error naming the file: the manifest's format; the checkpoint, if given,
is the one exported (SHA-256); every graph file is the manifest's (its own metadata names the
same checkpoint and part). onnxruntime is imported here only, so `stm_core` imports without it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from stm_core.model.encoders import QueryFeatures
from stm_core.model.network import MemoryFeatures, ModelConfig
from stm_core.onnx_export import CHECKPOINT_KEY, FORMAT, GRAPH_KEY, MANIFEST, file_sha256
from stm_core.onnx_graphs import graph_names


class OnnxGraphError(ValueError):
    pass


def _onnxruntime():
    try:
        import onnxruntime
    except ModuleNotFoundError as err:
        raise OnnxGraphError("the onnx runtime needs onnxruntime: pip install 'stm-vos[onnx]'") from err
    return onnxruntime


def read_manifest(directory: Path) -> dict:
    path = directory / MANIFEST
    if not path.is_file():
        raise OnnxGraphError(f"{path}: no manifest (write the graphs with `stm export --checkpoint CKPT --out DIR`)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise OnnxGraphError(f"{path}: not a readable manifest ({err})") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or "graphs" not in manifest:
        raise OnnxGraphError(f"{path}: not an `stm export` manifest (format {FORMAT!r} expected)")
    return manifest


class _Fusion:
    """The Fusion Cell graph as RecurrentMemory calls `network.fusion`: ... x C x h x w pairs."""

    def __init__(self, owner: OnnxNetwork, similarity: str):
        self.owner = owner
        self.similarity = similarity  # what rules C/D compare, as FusionCell.similarity

    def __call__(self, x_i: torch.Tensor, x_j: torch.Tensor) -> torch.Tensor:
        lead = x_j.shape[:-3]
        x_i, x_j = x_i.reshape(-1, *x_i.shape[-3:]), x_j.reshape(-1, *x_j.shape[-3:])
        (fused,) = self.owner.run("fusion", x_i=x_i, x_j=x_j)
        return fused.reshape(*lead, *fused.shape[1:])


class OnnxNetwork:
    """The network of an `stm export` folder on onnxruntime (CPU, or CUDA with device='cuda')."""

    inference_only = True  # like a fused torch copy: InferenceCore runs it as it is

    def __init__(self, directory: str | Path, checkpoint: str | Path | None = None, device: str = "cpu",
                 threads: int | None = None):
        ort = _onnxruntime()
        self.directory = directory = Path(directory)
        manifest = read_manifest(directory)
        self.manifest = manifest
        digest = manifest.get("checkpoint", {}).get("sha256", "")
        if checkpoint is not None:
            actual = file_sha256(checkpoint)
            if actual != digest:
                raise OnnxGraphError(
                    f"{directory / MANIFEST}: the graphs were exported from another checkpoint than {checkpoint} "
                    f"(sha256 {digest[:12]}..., the file's {actual[:12]}...); re-run `stm export`")
        try:
            self.config = ModelConfig(**{**manifest["model"]["config"], "pretrained": "none"})
        except (KeyError, TypeError, ValueError) as err:
            raise OnnxGraphError(f"{directory / MANIFEST}: bad model config ({err})") from err
        self.device = torch.device("cpu")  # tensors cross to onnxruntime through host memory
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
        if device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise OnnxGraphError("--device cuda with the onnx runtime needs onnxruntime-gpu (CUDAExecutionProvider)")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # warnings about shapes the tracer saw are not the user's concern
        self.sessions = {}
        for name in graph_names(self.config.kind):
            entry = manifest["graphs"].get(name)
            path = directory / (entry["file"] if entry else f"{name}.onnx")
            if entry is None or not path.is_file():
                raise OnnxGraphError(f"{path}: graph {name!r} missing from the export (re-run `stm export`)")
            try:
                session = ort.InferenceSession(str(path), options, providers=providers)
            except Exception as err:  # noqa: BLE001 - onnxruntime raises its own types
                raise OnnxGraphError(f"{path}: not a loadable ONNX graph ({str(err).splitlines()[0]})") from err
            meta = session.get_modelmeta().custom_metadata_map
            if meta.get(CHECKPOINT_KEY) != digest or meta.get(GRAPH_KEY) != name:
                raise OnnxGraphError(
                    f"{path}: graph from another export (its checkpoint sha256 {meta.get(CHECKPOINT_KEY, '?')[:12]}..., "
                    f"part {meta.get(GRAPH_KEY)!r}; the manifest's {digest[:12]}..., part {name!r})")
            self.sessions[name] = session
        self.fusion = _Fusion(self, self.config.similarity) if self.config.kind == "strmn" else None

    def run(self, graph: str, **inputs: torch.Tensor) -> list[torch.Tensor]:
        feed = {k: np.ascontiguousarray(v.detach().cpu().float().numpy()) for k, v in inputs.items()}
        return [torch.from_numpy(x) for x in self.sessions[graph].run(None, feed)]

    # --- the StepNetwork interface (shapes as on STMNetwork) ---------------------------------

    def encode_query_with_skip_features(self, frames: torch.Tensor, beside=None):
        """frames 1 x 3 x H x W -> (QueryFeatures(key, value, (s3, s2)), (s3, s2)); the decoder graph
        takes the skip features, so they stand in for the raw skips too."""
        key, value, s3, s2 = self.run("query_encoder", image=frames)
        return QueryFeatures(key, value, (s3, s2)), (s3, s2)

    def read(self, query: QueryFeatures, memory_key: torch.Tensor, memory_value: torch.Tensor) -> torch.Tensor:
        (readout,) = self.run("read", query_key=query.key, query_value=query.value,
                              memory_key=memory_key, memory_value=memory_value)
        return readout

    def decode(self, readout: torch.Tensor, skips, out_size: tuple[int, int], skip_features=None,
               split=None) -> torch.Tensor:
        s3, s2 = skip_features if skip_features is not None else skips
        (logits,) = self.run("decoder", readout=readout, s3=s3, s2=s2)
        if tuple(logits.shape[-2:]) != tuple(out_size):
            raise ValueError(f"decoder graph gave {tuple(logits.shape[-2:])}, expected {tuple(out_size)} "
                             "(inputs must be padded to a multiple of 16)")
        return logits

    def aggregate(self, foreground: torch.Tensor) -> torch.Tensor:
        (probs,) = self.run("aggregate", foreground=foreground)
        return probs

    def encode_memory(self, frames: torch.Tensor, probs: torch.Tensor, others: torch.Tensor) -> MemoryFeatures:
        return MemoryFeatures(*self.run("memory_encoder", image=frames, probs=probs, others=others))

    def template_key_value(self, feature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lead = feature.shape[:-3]
        key, value = self.run("template_key_value", feature=feature.reshape(-1, *feature.shape[-3:]))
        return key.reshape(*lead, *key.shape[1:]), value.reshape(*lead, *value.shape[1:])
