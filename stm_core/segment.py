"""Segment a folder of frames from its annotated masks with a trained checkpoint.

`stm segment --checkpoint CKPT --frames DIR --masks DIR --out DIR [--memory every:5] [--precision fp32]
[--runtime torch|onnx]`:
FRAMES holds the video's JPEGs; MASKS holds index PNGs named like the frames, for the first frame
and for any later frame that introduces objects. OUT receives one palette PNG per frame (pixel value = object id,
in the input masks' palette). Two runs give the same masks: the CPU convolution kernels are fixed
unless `--timed-kernels` lets them be chosen by timing (see `stm_core.model.fast_path.set_winograd_mode`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from stm_core.data.io import DAVIS_PALETTE, DataError, read_frame, read_index_mask, write_index_mask
from stm_core.inference import segment_video
from stm_core.memory import validate_policy
from stm_core.model import fast_path
from stm_core.model.checkpoint import CheckpointError
from stm_core.precision import PRECISIONS
from stm_core.runtimes import RUNTIMES, load_network

FRAME_SUFFIXES = {".jpg", ".jpeg", ".png"}


def load_annotations(
    masks_dir: Path, frame_paths: list[Path], resize_masks: bool = False
) -> tuple[dict[int, torch.Tensor], list[int]]:
    """Annotated frames -> {frame index: H x W ids}; a mask of another size is an error naming it."""
    index = {p.stem: i for i, p in enumerate(frame_paths)}
    masks: dict[int, torch.Tensor] = {}
    palette: list[int] | None = None
    for path in sorted(masks_dir.glob("*.png")):
        if path.stem not in index:
            raise DataError(f"{path}: no frame named {path.stem} in the frames folder")
        ids = read_index_mask(path)
        if palette is None:
            with Image.open(path) as im:
                palette = im.getpalette() if im.mode == "P" else None
        t = index[path.stem]
        with Image.open(frame_paths[t]) as im:
            w, h = im.size
        if ids.shape != (h, w):
            if not resize_masks:
                raise DataError(f"{path}: mask is {ids.shape[1]}x{ids.shape[0]} but frame {frame_paths[t].name} "
                                f"is {w}x{h}; fix the mask or pass --resize-masks")
            resized = F.interpolate(torch.from_numpy(ids)[None, None].float(), size=(h, w), mode="nearest")[0, 0]
            ids = resized.to(torch.uint8).numpy()
        masks[t] = torch.from_numpy(ids.astype(np.int64))
    if 0 not in masks:
        raise DataError(f"{masks_dir}: no mask for the first frame {frame_paths[0].stem}.png")
    return masks, palette or DAVIS_PALETTE


def add_arguments(parser: argparse.ArgumentParser, frames_required: bool = True) -> None:
    """frames_required=False: the parser also takes the many-video form (`pipeline.segment`)."""
    parser.add_argument("--checkpoint", help="model.pt written by `stm train` (required)")
    parser.add_argument("--frames", required=frames_required, type=Path, help="folder of the video's frames (JPEG)")
    parser.add_argument("--masks", required=frames_required, type=Path, help="folder of index PNGs for annotated frames")
    parser.add_argument("--out", required=True, help="output folder for palette PNGs")
    parser.add_argument("--memory", default="every:5", help="memory policy, e.g. every:5, fifo:8, recurrent:5:C")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--max-size", type=int, default=None, help="longest side the network sees")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="fp32: exact, TF32 off (default; what results are reported in); bf16: bf16 autocast "
                             "on CUDA or CPU, faster where the hardware has bf16 units")
    parser.add_argument("--runtime", choices=RUNTIMES, default="torch",
                        help="torch (default) or onnx: the graphs of `stm export` on onnxruntime, fp32 "
                             "(needs the onnx extra: pip install 'stm-vos[onnx]')")
    parser.add_argument("--onnx", default=None,
                        help="with --runtime onnx: the folder `stm export` wrote for this checkpoint "
                             "(default: export the checkpoint to a temporary folder first)")
    parser.add_argument("--resize-masks", action="store_true", help="resize masks whose size differs from the frame")
    parser.add_argument("--timed-kernels", action="store_true",
                        help="CPU: time NNPACK's Winograd against oneDNN per convolution shape and keep the faster "
                             "(faster on large frames, but the choice follows the machine's load, so two runs can "
                             "round differently and a policy that feeds its predictions back can give other masks); "
                             "default: the same kernels every run")


def run(args: argparse.Namespace) -> int:
    if args.frames is None or args.masks is None:
        print("stm segment: --frames and --masks name the video to segment", file=sys.stderr)
        return 2
    args.out = Path(args.out)
    if not args.checkpoint:
        print("stm segment: --checkpoint is required: segmenting needs trained weights "
              "(train one with `dvc repro` or `stm train`, e.g. models/main/model.pt)", file=sys.stderr)
        return 2
    try:
        validate_policy(args.memory)
        network = load_network(args.runtime, args.checkpoint, args.device, args.onnx)
        frame_paths = sorted(p for p in args.frames.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
        if not frame_paths:
            raise DataError(f"{args.frames}: no frames (.jpg/.png) found")
        masks, palette = load_annotations(args.masks, frame_paths, args.resize_masks)
        start = time.perf_counter()
        frames = (read_frame(p) for p in frame_paths)
        mode = fast_path.winograd_mode()
        fast_path.set_winograd_mode("auto" if args.timed_kernels else "off")  # as `evaluate.reproducible`
        try:
            for path, ids in zip(frame_paths, segment_video(network, frames, masks, args.memory, args.device,
                                                            args.max_size, args.precision)):
                write_index_mask(args.out / f"{path.stem}.png", ids, palette)
        finally:
            fast_path.set_winograd_mode(mode)
        elapsed = time.perf_counter() - start
    except (CheckpointError, DataError, ValueError, FileNotFoundError) as err:
        print(f"stm segment: {err}", file=sys.stderr)
        return 2
    print(f"segmented {len(frame_paths)} frames into {args.out} ({len(frame_paths) / elapsed:.1f} frames/s)")
    return 0
