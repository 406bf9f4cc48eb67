"""Score predicted masks against ground truth with the DAVIS-2017 J and F measures.

`stm score --gt GT_DIR --pred PRED_DIR [--sequences a b ...] [--json OUT]`; each directory holds
`<sequence>/<frame>.png` index masks (palette PNGs: pixel value = object id; DAVIS-2016 style 0/255
masks are read as object 1). Semi-supervised protocol of the official DAVIS-2017 evaluation: the
first and last frames are not scored; per object Mean, Recall (> 0.5) and Decay (4 bins) of J and
F; a sequence's and the dataset's scores are means over their objects; J&F = (J + F) / 2.

Objects are the ids present in the ground truth (any frame; in DAVIS all appear in the first). A
prediction must exist for every frame after the first, have the ground truth's size, and hold only
those ids: anything else is a `MetricError` naming the file. In the ground truth, 255 (next to other
ids) is DAVIS's void label and counts as background, as in the official code.
"""

from __future__ import annotations

import argparse
import sys

from stm_core.data.io import write_json_atomic
from stm_core.scoring.folders import score_folders
from stm_core.scoring.masks import MetricError
from stm_core.scoring.measures import BOUND_TH
from stm_core.scoring.sequences import KEYS


def format_table(summary: dict) -> str:
    """Per-sequence rows and the overall row, one column per key."""
    width = max([len("sequence"), len("overall"), *map(len, summary["sequences"])])
    lines = [f"{'sequence':<{width}}  " + "  ".join(f"{k:>8}" for k in KEYS)]
    rows = [*summary["sequences"].items(), ("overall", summary)]
    for i, (name, row) in enumerate(rows):
        if i == len(rows) - 1:
            lines.append("-" * len(lines[0]))
        lines.append(f"{name:<{width}}  " + "  ".join(f"{row[k]:>8.4f}" for k in KEYS))
    return "\n".join(lines)



def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gt", required=True, help="ground-truth folder holding <sequence>/<frame>.png")
    parser.add_argument("--pred", required=True, help="prediction folder holding <sequence>/<frame>.png")
    parser.add_argument("--sequences", nargs="+", default=None, metavar="SEQ",
                        help="sequences to score (default: every sequence folder under --gt)")
    parser.add_argument("--json", default=None, metavar="OUT", help="also write the scores as JSON here")
    parser.add_argument("--bound-th", type=float, default=BOUND_TH,
                        help="boundary tolerance: fraction of the image diagonal (< 1) or pixels (>= 1)")


def run(args: argparse.Namespace) -> int:
    try:
        summary = score_folders(args.gt, args.pred, args.sequences, args.bound_th)
    except MetricError as exc:
        print(f"stm score: error: {exc}", file=sys.stderr)
        return 2
    print(format_table(summary))
    if args.json:
        try:
            write_json_atomic(args.json, summary)
        except OSError as exc:
            print(f"stm score: error: cannot write {args.json}: {exc}", file=sys.stderr)
            return 2
    return 0
