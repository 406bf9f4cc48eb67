"""The `champion` alias: for each registered model an evaluation ran, the version with the best J&F.

A version's score on a benchmark is the best J&F of the evaluation's variants that ran it (oracle
diagnostics left out: they read the ground truth). `stm report` records it on the version as tags
(`JF_mean`, `JF_variant`, `JF_dataset`, `JF_evaluation_run`), then gives `champion` to the version
of that registered model with the highest `JF_mean` on the same benchmark (`JF_dataset`, the
dataset and split). The scores themselves are logged against the logged model by `stm evaluate`
(metrics with `model_id`), so the model's page lists them.
"""

from __future__ import annotations

import csv
import io
import math

CHAMPION = "champion"


def _rule(policy: str) -> str | None:
    parts = policy.split(":")
    if parts[0] == "recurrent-i2m":
        return "I2M"
    return parts[2] if parts[0] == "recurrent" and len(parts) == 3 else None


def version_scores(evaluation: dict, variants_csv: str) -> dict[str, tuple[float, str]]:
    """model key (`stm`, `strmn`, `strmn@C`) -> (best J&F, its variant) over the non-oracle variants."""
    table = {r.get("variant", ""): r for r in csv.DictReader(io.StringIO(variants_csv))}
    models = evaluation.get("models") or {}
    best: dict[str, tuple[float, str]] = {}
    for v in evaluation.get("variants") or []:
        if v.get("oracle") or v.get("model") not in ("stm", "strmn"):
            continue
        rule = _rule(v.get("policy", ""))
        key = f"strmn@{rule}" if v["model"] == "strmn" and f"strmn@{rule}" in models else v["model"]
        try:
            jf = float(table[v["name"]]["JF_mean"])
        except (KeyError, TypeError, ValueError):
            continue
        if math.isfinite(jf) and (key not in best or jf > best[key][0]):
            best[key] = (jf, v["name"])
    return best


def set_champions(evaluation: dict, variants_csv: str) -> dict[str, str]:
    """Tag each evaluated version with its score and move `champion`; -> {registered model: champion
    version}. Models without a registered version (official weights, a hand-made checkpoint) are skipped."""
    from pipeline import tracking

    dataset = f"{evaluation.get('dataset', '')}/{evaluation.get('split', '')}"
    champions = {}
    for key, (jf, variant) in sorted(version_scores(evaluation, variants_csv).items()):
        info = (evaluation.get("models") or {}).get(key) or {}
        name, version = info.get("registered_model"), info.get("version")
        uri = info.get("tracking_uri") or evaluation.get("tracking_uri")
        if not (name and version and uri):
            continue
        client = tracking.client(uri)
        for tag, value in {"JF_mean": f"{jf:.6f}", "JF_variant": variant, "JF_dataset": dataset,
                           "JF_evaluation_run": evaluation.get("parent_run_id", "")}.items():
            client.set_model_version_tag(name, str(version), tag, value)
        scored = [(float(mv.tags["JF_mean"]), int(mv.version))
                  for mv in client.search_model_versions(f"name = '{name}'")
                  if mv.tags.get("JF_dataset") == dataset and "JF_mean" in mv.tags]
        _, top = max(scored)
        client.set_registered_model_alias(name, CHAMPION, str(top))
        champions[name] = str(top)
    return champions
