"""params.yaml and params-paper.yaml: every key a user may set exists, parses, and is commented;
params-paper.yaml is an overlay of only what differs, and `stm recipe` writes it merged."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from pipeline.download.stage import DownloadParams
from pipeline.evaluate.stage import EvaluateParams
from pipeline.evaluate.variants import MemoryParams
from pipeline.params import OVER_SHARED, ParamsError, load_params, section
from pipeline.storage import StorageParams
from pipeline.synthesize import SynthesizeParams
from pipeline.tracking import MlflowParams
from pipeline.train.settings import STAGE_KEYS, RayParams, StageParams, StrmnParams, settings, stage_section
from stm_core.model.network import ModelConfig

REPO = Path(__file__).resolve().parents[1]
SECTIONS = {"download": DownloadParams, "synthesize": SynthesizeParams, "model": ModelConfig, "strmn": StrmnParams,
            "training": StageParams, "ray": RayParams, "memory": MemoryParams,
            "evaluate": EvaluateParams, "mlflow": MlflowParams, "storage": StorageParams}
FILES = ["params.yaml", "params-paper.yaml"]


@pytest.mark.parametrize("name", FILES)
def test_every_section_parses(name: str):
    params = load_params(REPO / name)
    for key, cls in SECTIONS.items():
        if key != "training":  # no stage on its own: pretrain and train over it
            section(params, key, cls)
    for stage_name in ("pretrain", "train"):
        stage_section(params, stage_name)
    for stage in ("pretrain", "main"):
        for kind in ("stm", "strmn"):
            settings(REPO / name, stage, kind)


@pytest.mark.parametrize("name", FILES)
def test_every_settable_key_is_present(name: str):
    raw = load_params(REPO / name)  # the overlay merged over params.yaml
    declared = {key: {f.name for f in dataclasses.fields(cls)} - {"kind"} for key, cls in SECTIONS.items()}  # kind: --model
    declared["training"] -= set(STAGE_KEYS)  # shared once; each stage holds its own keys
    declared |= {"pretrain": set(STAGE_KEYS), "train": set(STAGE_KEYS)}
    for key, keys in declared.items():
        assert key in raw, f"{name}: section {key} missing"
        missing = keys - set(raw[key])
        assert not missing, f"{name}: {key} lacks {sorted(missing)}"
    if name == "params.yaml":  # the default sets every shared key once (an overlay may set one for one stage)
        shared = {s: set(raw[s]) & declared["training"] for s in ("pretrain", "train")}
        assert shared == {"pretrain": set(), "train": set()}, f"{name}: a shared key repeated in a stage: {shared}"


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


def _leaves(node, prefix=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, f"{prefix}{k}.")
    else:
        yield prefix[:-1], node


def test_the_paper_recipe_holds_only_differences():
    overlay = yaml.safe_load((REPO / "params-paper.yaml").read_text())
    assert overlay.pop("extends") == "params.yaml"
    replaced = overlay.pop("replace")
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    same = []
    for key, value in _leaves(overlay):
        if any(key == r or key.startswith(r + ".") for r in replaced):
            continue
        section, _, rest = key.partition(".")
        node = base[section]
        if section in OVER_SHARED and rest not in node:  # a shared key set for one stage
            node = base[OVER_SHARED[section]]
        for part in rest.split(".") if rest else []:
            node = node[part]
        if node == value:
            same.append(key)
    assert not same, f"params-paper.yaml repeats params.yaml's values: {same}"
    assert set(load_params(REPO / "params-paper.yaml")["download"]["sources"]) == set(overlay["download"]["sources"])


def test_overlay_errors_name_the_file_and_key(tmp_path: Path):
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    bad = tmp_path / "over.yaml"
    bad.write_text("extends: params.yaml\nmemory:\n  slot: 5\n")
    with pytest.raises(ParamsError, match=r"over.yaml: memory.slot: not a key of .*params.yaml"):
        load_params(bad)
    bad.write_text("extends: params.yaml\nreplace: [memory]\ntrain: {steps: 3}\n")
    with pytest.raises(ParamsError, match=r"over.yaml: replace: memory is not set in this file"):
        load_params(bad)
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ParamsError, match="closes a loop"):
        load_params(tmp_path / "a.yaml")
    good = tmp_path / "good.yaml"  # a chain: good -> paper -> params; mappings merge, lists and `replace` replace
    (tmp_path / "paper.yaml").write_text((REPO / "params-paper.yaml").read_text())
    good.write_text("extends: paper.yaml\nreplace: [download.sources]\ndownload:\n  sources: {builtin-images: {count: 4}}\n"
                    "memory: {rules: [C]}\ntrain: {steps: 3}\n")
    p = load_params(good)
    assert p["download"]["sources"] == {"builtin-images": {"count": 4}}
    assert p["memory"]["rules"] == ["C"] and p["memory"]["slots"] == 5 and p["train"]["steps"] == 3
    assert p["training"]["lr"] == 1e-5 and p["training"]["batch_size"] == 4 and p["__file__"] == str(good)
    train = stage_section(p, "train")
    assert (train.steps, train.lr, train.crop, train.max_skip) == (3, 1e-5, 384, 25)


def test_recipe_writes_the_merged_params_and_never_builds_on_its_own_output(tmp_path: Path):
    from pipeline.recipe import write_recipe

    for name in FILES:
        (tmp_path / name).write_text((REPO / name).read_text())
    write_recipe(tmp_path / "params-paper.yaml", tmp_path / "params.yaml")
    full, merged = load_params(tmp_path / "params.yaml"), load_params(REPO / "params-paper.yaml")
    assert {k: v for k, v in full.items() if k != "__file__"} == {k: v for k, v in merged.items() if k != "__file__"}
    assert settings(tmp_path / "params.yaml", "pretrain", "strmn").stage_params.lr_schedule == "plateau"
    before = (tmp_path / "params.yaml").read_text()
    with pytest.raises(ParamsError, match="written by `stm recipe`.*git checkout params.yaml"):
        write_recipe(tmp_path / "params-paper.yaml", tmp_path / "params.yaml")
    assert (tmp_path / "params.yaml").read_text() == before


def _plain(value):
    """A default as YAML would hold it: dataclasses as mappings, tuples as lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _defaults(cls) -> dict:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = _plain(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = _plain(f.default_factory())
    return out


def test_no_default_in_code_differs_from_params_yaml():
    """params.yaml is the one home of every value: a dataclass default, where a field has one, is
    the same value (StageParams' defaults are `training`'s; each stage's own keys have none)."""
    from pipeline.download.stage import BUILTIN

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    checks = [(key, cls, params[key]) for key, cls in SECTIONS.items()]
    checks += [(f"download.sources.{name}", cls, params["download"]["sources"][name]) for name, cls in BUILTIN.items()]
    drift = []
    for key, cls, values in checks:
        for name, default in _defaults(cls).items():
            if name == "kind" and key == "model":
                continue  # set by --model, not a params key
            if name not in values:
                drift.append(f"{key}.{name}: a default in {cls.__name__} ({default!r}) but no value in params.yaml")
            elif _plain(values[name]) != default:
                drift.append(f"{key}.{name}: {cls.__name__} says {default!r}, params.yaml {values[name]!r}")
    assert not drift, "defaults in code that differ from params.yaml:\n" + "\n".join(drift)


def test_the_drift_check_sees_a_changed_default(monkeypatch):
    field = next(f for f in dataclasses.fields(StrmnParams) if f.name == "slots")
    monkeypatch.setattr(field, "default", field.default + 1)
    with pytest.raises(AssertionError, match=r"strmn.slots: StrmnParams says 5, params.yaml 4"):
        test_no_default_in_code_differs_from_params_yaml()


def test_a_key_without_a_default_must_be_given(tmp_path: Path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"train": {"steps": 3, "data": "v", "data_format": "davis"}}))
    with pytest.raises(ParamsError, match=r"params.yaml: train \(over training\): missing key\(s\) \['init', 'max_skip'\]"):
        stage_section(load_params(tmp_path / "params.yaml"), "train")


def test_a_stage_sets_shared_keys_for_itself_and_never_shares_its_own(tmp_path: Path):
    params = load_params(REPO / "params.yaml")
    params["train"] = {**params["train"], "lr": 1e-4}
    pretrain, train = stage_section(params, "pretrain"), stage_section(params, "train")
    assert (pretrain.lr, train.lr) == (params["training"]["lr"], 1e-4)
    assert (pretrain.crop, train.crop) == (params["training"]["crop"],) * 2
    params["training"] = {**params["training"], "steps": 5}
    with pytest.raises(ParamsError, match=r"params.yaml: training: \['steps'\] belong to each stage"):
        stage_section(params, "train")
    params["training"] = {**params["training"], "step": 5}
    with pytest.raises(ParamsError, match=r"params.yaml: training: unknown key\(s\) \['step'\]"):
        stage_section(params, "train")


@pytest.mark.parametrize("key, value", [("synthesize.object_scale", [0.6, 0.3]),
                                        ("download.sources.builtin-videos.object_size", [0.5]),
                                        ("download.sources.builtin-videos.scale_change", [0.0, 1.6]),
                                        ("synthesize.frame_affine.zoom", [1.1, 0.9])])
def test_a_range_that_is_not_min_max_is_an_error_naming_the_file_and_key(tmp_path: Path, key: str, value: list):
    from pipeline.download.stage import read_params

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    *parents, leaf = key.split(".")
    node = params
    for part in parents:
        node = node[part]
    node[leaf] = value
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ParamsError, match=rf"params.yaml: .*{leaf} must be \[min, max\]"):
        if key.startswith("synthesize"):
            section(load_params(tmp_path / "params.yaml"), "synthesize", SynthesizeParams)
        else:
            read_params(load_params(tmp_path / "params.yaml"), ["builtin-videos"])


def test_strmn_rules_come_from_one_list_and_unknown_rules_name_the_file(tmp_path: Path, caplog):
    from stm_core.memory.recurrent import STRMN_RULES

    assert StrmnParams().rules == list(STRMN_RULES) == MemoryParams().rules
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["strmn"]["rules"] = ["A", "E"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(params))
    with pytest.raises(ParamsError, match=r"bad\.yaml.*\['E'\]"):
        settings(bad, "main", "strmn", rule="A")
    with pytest.raises(ParamsError, match="unknown STRMN rule 'E'"):
        settings("params.yaml", "main", "strmn", rule="E")
    with pytest.raises(ParamsError, match="STRMN main stage only"):
        settings("params.yaml", "pretrain", "strmn", rule="C")


def test_a_rule_fine_tuning_says_what_it_derives_from_strmn(caplog):
    """strmn.main_steps sets the fine-tuning's steps and cuts its warm-up: logged, not silent."""
    with caplog.at_level("INFO", logger="pipeline.train"):
        s = settings("params.yaml", "main", "strmn", rule="B")
    assert s.strmn.rule == "B" and s.stage_params.steps == s.strmn.main_steps
    assert s.stage_params.warmup_steps <= s.strmn.main_steps // 4
    assert "rule B: steps" in caplog.text and "warmup_steps" in caplog.text
