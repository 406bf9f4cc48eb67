"""Import the official STM weights (STM_weights.pth from seoungwugoh/STM) as a project checkpoint.

`stm import-official WEIGHTS --out CHECKPOINT`: WEIGHTS is the official release file (keys with or
without `module.`); CHECKPOINT is a normal project checkpoint (ResNet-50, frozen BatchNorm, key 128,
value 512, decoder 256) for `stm segment`, `stm evaluate` and the bench. The file comes from you:
nothing is downloaded. The output is written atomically; a file that is not an official STM
checkpoint is an error naming the first missing, unexpected or mis-shaped key.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stm_core.model.checkpoint import CheckpointError
from stm_core.model.official import import_official


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("weights", type=Path, help="the official release file, e.g. STM_weights.pth")
    parser.add_argument("--out", required=True, type=Path, help="checkpoint to write, e.g. models/official/model.pt")


def run(args: argparse.Namespace) -> int:
    try:
        network = import_official(args.weights, args.out)
    except CheckpointError as err:
        print(f"stm import-official: {err}", file=sys.stderr)
        return 2
    n = sum(p.numel() for p in network.state_dict().values())
    print(f"imported {args.weights} -> {args.out} ({n:,} numbers, ResNet-50 STM)")
    return 0
