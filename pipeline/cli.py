"""The `stm` command: one subcommand per module, imported lazily so `stm score` needs no Ray."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> module exposing `add_arguments(parser)` and `run(args) -> int`; its docstring is the help.
COMMANDS: dict[str, str] = {
    "download": "pipeline.download.stage",
    "synthesize": "pipeline.synthesize",
    "train": "pipeline.train.stage",
    "evaluate": "pipeline.evaluate.stage",
    "report": "pipeline.report.stage",
    "baseline": "pipeline.baseline",
    "recipe": "pipeline.recipe",
    "segment": "pipeline.segment.cli",  # one video: stm_core.segment (no Ray); many: pipeline.segment.stage
    "import-official": "stm_core.import_official",
    "export": "pipeline.export",  # ONNX graphs for `stm segment --runtime onnx`
    "score": "stm_core.scoring.cli",
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stm", description="STM / STRMN video object segmentation pipeline")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        if only is not None and name != only:
            sub.add_parser(name, help=f"see `stm {name} --help`")
            continue
        module = importlib.import_module(module_name)
        summary = (module.__doc__ or "").strip().splitlines()[0] if module.__doc__ else ""
        p = sub.add_parser(name, help=summary, description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Import only the module of the chosen command: `stm score` must not pay for Ray's import.
    chosen = next((a for a in argv if a in COMMANDS), None)
    args = build_parser(only=chosen).parse_args(argv)
    module = importlib.import_module(COMMANDS[args.command])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
