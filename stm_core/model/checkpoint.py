"""Checkpoint files: a state dict plus the config that rebuilds the network (weights_only-safe)."""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import torch

from stm_core.model.network import ModelConfig, STMNetwork


class CheckpointError(ValueError):
    pass


def save_checkpoint(path: str | Path, network: STMNetwork, **extra: object) -> None:
    """Atomic: a crash mid-write leaves the previous file (or none), never a truncated one."""
    if getattr(network, "inference_only", False):
        raise ValueError("refusing to save a fused_for_inference() copy (BatchNorm folded away); save the original")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"kind": network.config.kind, "model_config": network.config.to_dict(),
               "state_dict": {k: v.detach().cpu() for k, v in network.state_dict().items()}, **extra}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_checkpoint(
    path: str | Path | bytes, map_location: str | torch.device = "cpu", **config_overrides: object
) -> STMNetwork:
    """Rebuild the network from its file (or the file's bytes, kept off the disk). `pretrained` is
    forced to none: the weights come from the file."""
    source: Path | io.BytesIO = io.BytesIO(path) if isinstance(path, bytes) else Path(path)
    path = "<checkpoint bytes>" if isinstance(path, bytes) else Path(path)
    if isinstance(path, Path) and not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        payload = torch.load(source, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - pickle/zip errors have many types
        raise CheckpointError(f"{path}: not a readable checkpoint ({err})") from err
    if not isinstance(payload, dict) or "state_dict" not in payload or "model_config" not in payload:
        raise CheckpointError(f"{path}: not an STM checkpoint (expected keys 'model_config' and 'state_dict')")
    raw = {**payload["model_config"], **config_overrides, "pretrained": "none"}
    known = {f for f in ModelConfig.__dataclass_fields__}
    try:
        config = ModelConfig(**{k: v for k, v in raw.items() if k in known})
        network = STMNetwork(config)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: bad model config {raw}: {err}") from err
    try:
        network.load_state_dict(payload["state_dict"])
    except RuntimeError as err:
        first = str(err).splitlines()[0:3]
        raise CheckpointError(
            f"{path}: weights do not fit a {config.kind} network with backbone {config.backbone}: {' '.join(first)}"
        ) from err
    return network.eval()
