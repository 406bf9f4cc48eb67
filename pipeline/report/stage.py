"""Write the ablation report (reports/ablation.md + .png) from the evaluation's own outputs.

`stm report [--evaluation results/evaluation.json] [--variants plots/evaluate_variants.csv]`. Reads
only what `stm evaluate` wrote and DVC declares as this stage's inputs: the record of the
evaluation (its variants in params order, their models' training data, the MLflow parent run), the
per-variant scores table, and each STM variant's per-sequence scores (results/<variant>/sequences.csv,
beside the record). It writes two tables in the papers' layout: STM Table 5 (memory frames vs J&F,
J, F and time per frame; then each policy sequence by sequence against First) and STRMN Table 4
(update rule vs J, F, mean), both with memory size and the copy-first baseline, then every
variant's full scores, and where the STM memory read looks (results/read_probe.json, when the
evaluation probed it). The same inputs give
the same bytes. Afterwards both files are attached to the evaluation's MLflow parent run (artifact
folder `report`), and each registered model's best J&F version gets the alias `champion`; both are
the browsing side, and their failure only warns.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.report import probe_section
from pipeline.report.champion import set_champions
from pipeline.report.chart import render_chart
from pipeline.report.markdown import render_markdown
from pipeline.report.per_sequence import PerSequenceError, read_sequence_scores
from pipeline.report.rows import ReportError, read_record, rows_from_outputs


def read_inputs(evaluation_file: Path, variants_file: Path) -> tuple[dict, str]:
    for path in (evaluation_file, variants_file):
        if not path.is_file():
            raise ReportError(f"{path}: not found; run `stm evaluate` (or `dvc repro evaluate`) first")
    evaluation = read_record(evaluation_file, "variants", list, "an evaluation record (no `variants` list)")
    return evaluation, variants_file.read_text()


def attach_to_mlflow(evaluation: dict, files: list[Path]) -> str | None:
    """Log the report to the evaluation's parent run; returns a warning instead of failing."""
    uri, run_id = evaluation.get("tracking_uri"), evaluation.get("parent_run_id")
    if not uri or not run_id:
        return "the evaluation record names no MLflow run"
    try:
        from pipeline import tracking

        client = tracking.client(uri)
        for path in files:
            client.log_artifact(run_id, str(path), "report")
    except Exception as err:  # noqa: BLE001 - MLflow is a copy for browsing; the report is written
        return f"could not attach the report to MLflow run {run_id} at {uri}: {err}"
    return None


def crown_champions(evaluation: dict, table: str) -> tuple[dict[str, str], str | None]:
    """`champion` on the best J&F version of each registered model (pipeline/report/champion.py);
    a registry that cannot be reached is a warning, as for the report's copy in MLflow."""
    try:
        return set_champions(evaluation, table), None
    except Exception as err:  # noqa: BLE001 - the report is written; the registry is the browsing side
        return {}, f"could not set the champion versions in the MLflow registry: {err}"


def report(evaluation_file: Path, variants_file: Path, out: Path, chart: Path) -> tuple[dict, str | None]:
    evaluation, table = read_inputs(evaluation_file, variants_file)
    rows = rows_from_outputs(evaluation, table, str(variants_file))
    try:  # results/<variant>/sequences.csv, beside the evaluation record
        scores = read_sequence_scores(evaluation_file.parent, [r.variant for r in rows if r.model == "stm"])
    except PerSequenceError as err:
        raise ReportError(str(err)) from err
    try:
        probe = probe_section.section(evaluation_file.parent, out.parent)
    except probe_section.ReadProbeError as err:
        raise ReportError(str(err)) from err
    render_markdown(out, evaluation, rows, chart, scores, probe)
    render_chart(chart, rows, title=f"{evaluation.get('dataset', '')} ({evaluation.get('split', '')})")
    champions, warning = crown_champions(evaluation, table)
    evaluation = {**evaluation, "champions": champions}
    attached = attach_to_mlflow(evaluation, [out, chart])
    return evaluation, "; ".join(w for w in (warning, attached) if w) or None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--evaluation", type=Path, default=Path("results/evaluation.json"),
                        help="record of the evaluation (written by `stm evaluate`)")
    parser.add_argument("--variants", type=Path, default=Path("plots/evaluate_variants.csv"),
                        help="per-variant scores (written by `stm evaluate`)")
    parser.add_argument("--out", type=Path, default=Path("reports/ablation.md"), help="markdown report")
    parser.add_argument("--chart", type=Path, default=Path("reports/ablation.png"), help="PNG chart")


def run(args: argparse.Namespace) -> int:
    try:
        evaluation, warning = report(args.evaluation, args.variants, args.out, args.chart)
    except ReportError as err:
        print(f"stm report: error: {err}", file=sys.stderr)
        return 2
    if warning:
        print(f"stm report: warning: {warning}", file=sys.stderr)
    print(f"wrote {args.out} and {args.chart} from {args.evaluation} and {args.variants} "
          f"(MLflow run {evaluation.get('parent_run_id', '-')}, artifacts under report/)")
    for name, version in evaluation.get("champions", {}).items():
        print(f"models:/{name}@champion -> version {version}")
    return 0
