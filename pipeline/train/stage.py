"""Train STM or STRMN on Ray Train: `--stage pretrain` (synthetic clips) or `--stage main` (videos).

The driver reads params.yaml, creates (or re-attaches to) the MLflow run, starts a Ray Train
`TorchTrainer` whose loop is `pipeline.train.loop.train_loop`, and writes the DVC outputs from
the final checkpoint: `models/[strmn-]<stage>[/<RULE>]/model.pt` and
`metrics/train-<stage>[-strmn][-<RULE>].json` (`<RULE>`: the STRMN main stage's `--rule`).
Checkpoints live under `ray.storage` in a run named from a hash of everything that shapes the
result, so re-running the stage after a crash resumes where it stopped, while changed params or
data start a fresh run.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from pipeline.cluster import ClusterError
from pipeline.params import DEFAULT_PARAMS, ParamsError
from pipeline.train.settings import FAULT_ENV, STAGES, settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stage", choices=STAGES, required=True, help="pretrain (synthetic clips) or main (videos)")
    parser.add_argument("--model", choices=("stm", "strmn"), default="stm", help="which network to train")
    parser.add_argument("--params", default=DEFAULT_PARAMS, help="params file (default: params.yaml)")
    parser.add_argument("--rule", choices=("A", "B", "C", "D", "I2M"), default=None,
                        help="STRMN main stage: train with this memory update rule into models/strmn-main/<RULE>/")
    parser.add_argument("--fresh", action="store_true", help="ignore and delete this run's earlier checkpoints")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    from pipeline.runguard import RunLocked, run_stoppable
    from pipeline.train.driver import train

    def body() -> int:
        try:
            s = settings(args.params, args.stage, args.model, args.rule)
            # stopped: train ends the run KILLED, keeps the checkpoints, and returns 130 / 143
            return train(s, fresh=args.fresh, fault=os.environ.get(FAULT_ENV, ""))
        except (ParamsError, FileNotFoundError, ValueError, ClusterError, RunLocked) as err:
            print(f"stm train: error: {err}", file=sys.stderr)
            return 2

    return run_stoppable("stm train", body)  # nothing partial: models/ is written only at the end
