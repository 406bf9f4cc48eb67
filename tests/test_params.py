"""params.yaml and params-paper.yaml: every key a user may set exists, parses, and is commented."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from pipeline.download.stage import DownloadParams
from pipeline.evaluate.stage import EvaluateParams
from pipeline.evaluate.variants import MemoryParams
from pipeline.params import ParamsError, load_params, section
from pipeline.storage import StorageParams
from pipeline.synthesize import SynthesizeParams
from pipeline.tracking import MlflowParams
from pipeline.train.settings import RayParams, StageParams, StrmnParams, settings
from stm_core.model.network import ModelConfig

REPO = Path(__file__).resolve().parents[1]
SECTIONS = {"download": DownloadParams, "synthesize": SynthesizeParams, "model": ModelConfig, "strmn": StrmnParams,
            "pretrain": StageParams, "train": StageParams, "ray": RayParams, "memory": MemoryParams,
            "evaluate": EvaluateParams, "mlflow": MlflowParams, "storage": StorageParams}
FILES = ["params.yaml", "params-paper.yaml"]


@pytest.mark.parametrize("name", FILES)
def test_every_section_parses(name: str):
    params = load_params(REPO / name)
    for key, cls in SECTIONS.items():
        section(params, key, cls)
    for stage in ("pretrain", "main"):
        for kind in ("stm", "strmn"):
            settings(REPO / name, stage, kind)


@pytest.mark.parametrize("name", FILES)
def test_every_settable_key_is_present(name: str):
    raw = yaml.safe_load((REPO / name).read_text())
    for key, cls in SECTIONS.items():
        assert key in raw, f"{name}: section {key} missing"
        declared = {f.name for f in dataclasses.fields(cls)} - {"kind"}  # kind is set by --model
        missing = declared - set(raw[key])
        assert not missing, f"{name}: {key} lacks {sorted(missing)}"


@pytest.mark.parametrize("name", FILES)
def test_every_key_line_has_a_comment(name: str):
    for number, line in enumerate((REPO / name).read_text().splitlines(), 1):
        if re.match(r"^\s*[a-z_0-9-]+:", line) and not line.rstrip().endswith(":"):
            assert "#" in line, f"{name}:{number}: `{line.strip()}` has no comment"


def test_unknown_keys_are_errors_naming_the_file(tmp_path: Path):
    text = (REPO / "params.yaml").read_text().replace("  slots: 4  # STRMN K", "  slot: 4  # STRMN K", 1)
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(ParamsError, match=r"params.yaml: memory: unknown key\(s\) \['slot'\]"):
        section(load_params(tmp_path / "params.yaml"), "memory", MemoryParams)
