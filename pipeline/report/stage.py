"""Write the ablation report (reports/ablation.md + .png) from the evaluation runs in MLflow.

`stm report [--params params.yaml] [--run-id ID]`. Reads the parent evaluation run named in
results/evaluation.json (written by `stm evaluate`; else the latest finished one, or --run-id) and
its child runs with `mlflow.search_runs`, and writes two tables in the papers' layout: STM Table 5
(memory frames vs J&F, J, F and time per frame) and STRMN Table 4 (update rule vs J, F, mean),
both with memory size and the copy-first baseline, then every variant's full scores and the
recent evaluations side by side. The chart and the markdown are logged to the parent run too.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline import tracking
from pipeline.params import ParamsError, load_params, section
from pipeline.report.ablation import ReportError, render_chart, render_markdown, rows_from_runs, variant_order


def _search(experiment: str, filter_string: str, **kwargs):
    import mlflow

    return mlflow.search_runs(experiment_names=[experiment], filter_string=filter_string, **kwargs)


def find_parent(experiment: str, run_id: str | None, evaluation_file: Path) -> str:
    """--run-id, else the run named by results/evaluation.json, else the latest finished evaluation."""
    if run_id:
        return run_id
    if evaluation_file.is_file():
        try:
            return json.loads(evaluation_file.read_text())["parent_run_id"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ReportError(f"{evaluation_file}: not an evaluation record ({err}); re-run `stm evaluate`") from err
    runs = _search(experiment, "tags.stm_role = 'evaluation' and attributes.status = 'FINISHED'",
                   order_by=["attributes.start_time DESC"], max_results=1)
    if runs.empty:
        raise ReportError(f"no finished evaluation run in MLflow experiment {experiment!r}; run `stm evaluate` first")
    return str(runs.iloc[0]["run_id"])


def load_runs(experiment: str, parent_id: str, history: int):
    """(parent row, children DataFrame, recent parents DataFrame) from MLflow."""
    parent = _search(experiment, f"attributes.run_id = '{parent_id}'")
    if parent.empty:
        raise ReportError(f"evaluation run {parent_id} not found in MLflow experiment {experiment!r} "
                          "(another tracking store? set MLFLOW_TRACKING_URI, or pass --run-id)")
    children = _search(experiment, f"tags.mlflow.parentRunId = '{parent_id}'")
    if children.empty:
        raise ReportError(f"evaluation run {parent_id} has no variant runs (did `stm evaluate` fail?)")
    recent = _search(experiment, "tags.stm_role = 'evaluation' and attributes.status = 'FINISHED'",
                     order_by=["attributes.start_time DESC"], max_results=max(1, history))
    return parent.iloc[0], children, recent


def log_to_parent(uri: str, parent_id: str, files: list[Path]) -> None:
    client = tracking.client(uri)
    for path in files:
        client.log_artifact(parent_id, str(path), "report")


def report(params_path: str | Path, run_id: str | None, evaluation_file: Path, out: Path, chart: Path,
           history: int) -> tuple[str, Path, Path]:
    import mlflow

    params = load_params(params_path)
    mlflow_p = section(params, "mlflow", tracking.MlflowParams)
    uri = tracking.tracking_uri(tracking.project_root(params_path), mlflow_p.tracking_uri)
    mlflow.set_tracking_uri(uri)
    parent_id = find_parent(mlflow_p.experiment, run_id, evaluation_file)
    parent, children, recent = load_runs(mlflow_p.experiment, parent_id, history)
    rows = rows_from_runs(children, variant_order(parent))
    render_markdown(out, parent, rows, recent, chart, mlflow_p.experiment)
    render_chart(chart, rows, title=f"{parent.get('params.evaluate.dataset', '')} ({parent.get('params.evaluate.split', '')})")
    log_to_parent(uri, parent_id, [out, chart])
    return parent_id, out, chart


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default="params.yaml", help="params file (section mlflow)")
    parser.add_argument("--run-id", default=None, help="parent evaluation run to report (default: see below)")
    parser.add_argument("--evaluation", type=Path, default=Path("results/evaluation.json"),
                        help="record of the last `stm evaluate`, naming its parent run")
    parser.add_argument("--out", type=Path, default=Path("reports/ablation.md"), help="markdown report")
    parser.add_argument("--chart", type=Path, default=Path("reports/ablation.png"), help="PNG chart")
    parser.add_argument("--history", type=int, default=10, help="recent evaluations shown side by side")


def run(args: argparse.Namespace) -> int:
    try:
        parent_id, out, chart = report(args.params, args.run_id, args.evaluation, args.out, args.chart, args.history)
    except (ParamsError, ReportError) as err:
        print(f"stm report: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out} and {chart} from MLflow run {parent_id}")
    return 0
