"""Export a checkpoint as ONNX graphs for onnxruntime (`stm segment --runtime onnx --onnx DIR`).

  stm export --checkpoint CKPT --out DIR [--opset 17]

DIR receives one graph per part of an inference step (query encoder, memory encoder, memory read
with a dynamic number of memory locations, decoder, soft aggregation; STRMN adds its Fusion Cell
and the template key/value heads), each passing `onnx.checker`, and manifest.json: opset,
precision (fp32), model kind and config, the checkpoint's SHA-256 and each graph's. The runtime
refuses graphs of another checkpoint. See docs/segment.md.
"""

from __future__ import annotations

import argparse
import sys
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from stm_core.onnx_export import OPSET

    parser.add_argument("--checkpoint", required=True, help="model.pt written by `stm train` or `stm import-official`")
    parser.add_argument("--out", required=True, help="folder for the graphs and manifest.json")
    parser.add_argument("--opset", type=int, default=OPSET, help="ONNX opset of the graphs")


def run(args: argparse.Namespace) -> int:
    from stm_core.model.checkpoint import CheckpointError
    from stm_core.onnx_export import ExportError, export_checkpoint

    start = time.perf_counter()
    try:
        manifest = export_checkpoint(args.checkpoint, args.out, args.opset)
    except (CheckpointError, ExportError) as err:
        print(f"stm export: {err}", file=sys.stderr)
        return 2
    print(f"exported {len(manifest['graphs'])} graphs ({', '.join(manifest['graphs'])}) of the "
          f"{manifest['model']['kind']} checkpoint {args.checkpoint} to {args.out} (opset {manifest['opset']}, "
          f"{manifest['precision']}) in {time.perf_counter() - start:.0f} s")
    return 0
