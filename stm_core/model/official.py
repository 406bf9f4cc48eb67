"""Import the official STM release (`STM_weights.pth`, seoungwugoh/STM) into a project checkpoint.

The official state dict was saved from `nn.DataParallel(STM())`: keys carry a `module.` prefix
(accepted with or without it). Every tensor maps onto one of ours by name; two facts need more
than a rename:
- the decoder's first conv (`convFM`) reads `[memory read, query value]`, ours reads
  `[query value, memory read]`: its input channels are swapped halves, so we permute them;
- the encoders' `mean` / `std` buffers must be the ImageNet statistics our `Normalize` applies,
  and BatchNorm's `num_batches_tracked` has no use in frozen BatchNorm: both are checked, then
  dropped.
Anything else (a key we don't know, one we need and don't find, a wrong shape) is an error that
names the file and the first such key: a half-imported network would run and silently be wrong.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from stm_core.model.checkpoint import CheckpointError, save_checkpoint
from stm_core.model.encoders import IMAGENET_MEAN, IMAGENET_STD
from stm_core.model.network import ModelConfig, STMNetwork

# The official network: ResNet-50 to res4, frozen BN, key 128, value 512, decoder 256.
OFFICIAL_CONFIG = ModelConfig(kind="stm", backbone="resnet50", pretrained="none", norm="frozen_bn",
                              decoder_dim=256, top_k=None)

# official name (without `module.`) -> ours; first matching pattern wins.
_RENAMES: list[tuple[str, str]] = [
    (r"^Encoder_Q\.conv1\.", "query_encoder.stem.0."),
    (r"^Encoder_Q\.bn1\.", "query_encoder.stem.1."),
    (r"^Encoder_Q\.(res[234])\.", r"query_encoder.\1."),
    (r"^Encoder_M\.conv1_m\.", "memory_encoder.conv1_mask."),
    (r"^Encoder_M\.conv1_o\.", "memory_encoder.conv1_others."),
    (r"^Encoder_M\.conv1\.", "memory_encoder.conv1."),
    (r"^Encoder_M\.bn1\.", "memory_encoder.stem_rest.0."),
    (r"^Encoder_M\.(res[234])\.", r"memory_encoder.\1."),
    (r"^KV_Q_r4\.Key\.", "query_kv.key."),
    (r"^KV_Q_r4\.Value\.", "query_kv.value."),
    (r"^KV_M_r4\.Key\.", "memory_kv.key."),
    (r"^KV_M_r4\.Value\.", "memory_kv.value."),
    (r"^Decoder\.convFM\.", "decoder.compress."),
    (r"^Decoder\.ResMM\.", "decoder.compress_res."),
    (r"^Decoder\.RF([23])\.convFS\.", r"decoder.refine\1.skip_conv."),
    (r"^Decoder\.RF([23])\.ResFS\.", r"decoder.refine\1.skip_res."),
    (r"^Decoder\.RF([23])\.ResMM\.", r"decoder.refine\1.merge_res."),
    (r"^Decoder\.pred2\.", "decoder.predict."),
]
# What the released weights were trained on (STM sec. 4: pre-training, then DAVIS + YouTube-VOS).
OFFICIAL_TRAINING_DATA = "static images (pre-training) + DAVIS-2017 + YouTube-VOS (official STM release)"
_NORMALIZE = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}
_DECODER_INPUT = "decoder.compress.weight"  # D x (2 Cv) x 3 x 3, input halves swapped


def our_name(official: str) -> str | None:
    """Official key (without `module.`) -> our state-dict key; None for keys we don't know."""
    for pattern, replacement in _RENAMES:
        if re.match(pattern, official):
            return re.sub(pattern, replacement, official)
    return None


def convert_state_dict(official: dict[str, torch.Tensor], source: str = "weights") -> STMNetwork:
    """Official state dict -> our STMNetwork with every tensor placed. Raises CheckpointError."""
    network = STMNetwork(OFFICIAL_CONFIG)
    target = network.state_dict()
    placed: dict[str, torch.Tensor] = {}
    seen_normalize: set[str] = set()
    for full_name, tensor in official.items():
        name = full_name.removeprefix("module.")
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"{source}: {full_name!r} is a {type(tensor).__name__}, not a tensor")
        encoder, _, leaf = name.partition(".")
        if encoder in ("Encoder_Q", "Encoder_M") and leaf in _NORMALIZE:
            expected = torch.tensor(_NORMALIZE[leaf]).view(1, 3, 1, 1)
            if tensor.shape != expected.shape or not torch.allclose(tensor.float(), expected, atol=1e-6):
                raise CheckpointError(f"{source}: {full_name!r} is {tensor.flatten().tolist()}, expected the "
                                      f"ImageNet {leaf} {list(_NORMALIZE[leaf])} our encoders apply")
            seen_normalize.add(name)
            continue
        if name.endswith(".num_batches_tracked"):  # frozen BatchNorm keeps no counter
            continue
        ours = our_name(name)
        if ours is None or ours not in target:
            raise CheckpointError(f"{source}: unexpected key {full_name!r}: not in the official STM layout "
                                  "(is this an official STM_weights.pth?)")
        if ours == _DECODER_INPUT:  # [read, value] -> [value, read]
            half = tensor.shape[1] // 2
            tensor = torch.cat([tensor[:, half:], tensor[:, :half]], dim=1)
        if tuple(tensor.shape) != tuple(target[ours].shape):
            raise CheckpointError(f"{source}: key {full_name!r} has shape {list(tensor.shape)}, the official STM "
                                  f"(ResNet-50, key 128, value 512) has {list(target[ours].shape)}")
        placed[ours] = tensor.to(target[ours].dtype)
    for name in target:
        if name not in placed:
            raise CheckpointError(f"{source}: missing key {_official_name(name)!r} (for our {name!r})")
    for encoder in ("Encoder_Q", "Encoder_M"):
        for leaf in _NORMALIZE:
            if f"{encoder}.{leaf}" not in seen_normalize:
                raise CheckpointError(f"{source}: missing key 'module.{encoder}.{leaf}'")
    network.load_state_dict(placed, strict=True)
    return network.eval()


def _official_name(ours: str) -> str:
    """Best-effort inverse of `our_name`, for error messages."""
    inverse = [
        ("query_encoder.stem.0.", "Encoder_Q.conv1."), ("query_encoder.stem.1.", "Encoder_Q.bn1."),
        ("query_encoder.", "Encoder_Q."), ("memory_encoder.conv1_mask.", "Encoder_M.conv1_m."),
        ("memory_encoder.conv1_others.", "Encoder_M.conv1_o."), ("memory_encoder.stem_rest.0.", "Encoder_M.bn1."),
        ("memory_encoder.", "Encoder_M."), ("query_kv.key.", "KV_Q_r4.Key."), ("query_kv.value.", "KV_Q_r4.Value."),
        ("memory_kv.key.", "KV_M_r4.Key."), ("memory_kv.value.", "KV_M_r4.Value."),
        ("decoder.compress.", "Decoder.convFM."), ("decoder.compress_res.", "Decoder.ResMM."),
        ("decoder.predict.", "Decoder.pred2."),
    ]
    for ours_prefix, official_prefix in inverse:
        if ours.startswith(ours_prefix):
            return "module." + official_prefix + ours[len(ours_prefix):]
    m = re.match(r"decoder\.refine([23])\.(skip_conv|skip_res|merge_res)\.(.*)", ours)
    if m:
        part = {"skip_conv": "convFS", "skip_res": "ResFS", "merge_res": "ResMM"}[m[2]]
        return f"module.Decoder.RF{m[1]}.{part}.{m[3]}"
    return ours


def load_official(path: str | Path) -> STMNetwork:
    """Read an official release file (weights_only) and convert it; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - truncated zips and bad pickles raise many types
        raise CheckpointError(f"{path}: not a readable torch file ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else 'no detail'})") from err
    if isinstance(state, dict) and "model_config" in state and "state_dict" in state:
        raise CheckpointError(f"{path}: this is already a project checkpoint (written by `stm train` or "
                              "`stm import-official`), not an official STM release; use it directly")
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]  # some re-saves wrap the state dict
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"{path}: expected a state dict (name -> tensor), found {type(state).__name__}")
    return convert_state_dict(state, source=str(path))


def import_official(weights: str | Path, out: str | Path) -> STMNetwork:
    """Convert `weights` and write `out` atomically (nothing is written if anything is wrong)."""
    network = load_official(weights)
    save_checkpoint(out, network, source=f"official STM release {Path(weights).name}",
                    training_data=OFFICIAL_TRAINING_DATA)
    return network
