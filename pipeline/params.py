"""params.yaml -> typed, validated config. Each stage declares its section as a dataclass.

Unknown keys are errors (a typo in `-S memory.slot=5` must not pass silently), and every error
names the file and the key.

A params file may be an overlay: `extends: params.yaml` at its top level names the file it
changes (relative to the overlay's folder; that one may extend another), and the overlay holds only
what differs. Mappings merge key by key; any other value (a list, a number) replaces the base's.
Every overlay key must exist in its base (a typo is an error naming the overlay and the key), or,
under `pretrain:` or `train:`, in the base's `training:` (a shared key set for one stage);
`replace: [download.sources]` names mappings that the overlay's value replaces whole, new names
allowed. `load_params` returns the merged mapping, so every `--params` accepts an overlay; DVC reads
only params.yaml, which `stm recipe OVERLAY` writes from one (pipeline/recipe.py).
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import yaml

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")  # every params section is a dataclass
DEFAULT_PARAMS = "params.yaml"
# Keys that say where work runs or where results are kept, never what the results are. No stage
# depends on them in dvc.yaml, so `dvc exp run -S ray.storage=s3://...` or more CPUs re-run nothing.
PLACEMENT_KEYS = (
    "ray.cpus_per_worker", "ray.gpus_per_worker", "ray.num_cpus", "ray.object_store_mb", "ray.storage",
    "ray.placement_strategy", "ray.data_min_actors", "ray.data_max_actors", "ray.data_cpus", "ray.materialize_max_mb",
    "ray.eval_actors", "ray.wait_for_nodes_s",
    "storage.root", "storage.cache_mb",
    "mlflow.experiment", "mlflow.tracking_uri",
    "download.cache", "download.keep_archives", "download.retries", "download.timeout",
)
READS_ENV = "STM_PARAMS_READS"  # a file: every process appends the params keys it read (tests of dvc.yaml)


class ParamsError(ValueError):
    pass


OVER_SHARED = {"pretrain": "training", "train": "training"}  # section -> the shared section whose keys it may set
EXTENDS_KEY = "extends"  # overlay: the params file it changes
REPLACE_KEY = "replace"  # overlay: dotted keys of mappings its values replace whole instead of merging


def in_project(root: Path, path: str | Path) -> Path:
    """A path from params: absolute as given, else relative to the project root `root`."""
    p = Path(path)
    return p if p.is_absolute() else (root / p).resolve()


def load_params(path: str | Path = DEFAULT_PARAMS) -> dict[str, Any]:
    """The params of `path`, an overlay merged over its base(s); `__file__` names `path`."""
    path = Path(path)
    data = resolve_overlay(path)
    data["__file__"] = str(path)
    if os.environ.get(READS_ENV):
        return _recorded(data, os.environ[READS_ENV])
    return data


def read_mapping(path: Path) -> dict[str, Any]:
    """One params file as written (no overlay resolved), checked to be a YAML mapping."""
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def overlay_chain(path: str | Path) -> list[Path]:
    """`path` and the files it extends, nearest first (a plain params file: itself only)."""
    chain = [Path(path)]
    while True:
        data = read_mapping(chain[-1])
        if EXTENDS_KEY not in data:
            return chain
        base = data[EXTENDS_KEY]
        if not isinstance(base, str) or not base:
            raise ParamsError(f"{chain[-1]}: {EXTENDS_KEY}: expected the base params file's name, got {base!r}")
        nxt = chain[-1].parent / base
        if nxt.resolve() in {p.resolve() for p in chain}:
            raise ParamsError(f"{chain[-1]}: {EXTENDS_KEY}: {base} closes a loop ({' -> '.join(map(str, chain))})")
        chain.append(nxt)


def resolve_overlay(path: str | Path) -> dict[str, Any]:
    """The merged params of `path` and the files it extends (`extends`/`replace` removed)."""
    path = Path(path)
    data = read_mapping(path)
    if EXTENDS_KEY not in data:
        if REPLACE_KEY in data:
            raise ParamsError(f"{path}: {REPLACE_KEY}: only an overlay (a file with `{EXTENDS_KEY}:`) replaces keys")
        return data
    base_file = overlay_chain(path)[1]
    replace = data.pop(REPLACE_KEY, [])
    data.pop(EXTENDS_KEY)
    if not isinstance(replace, list) or not all(isinstance(k, str) for k in replace):
        raise ParamsError(f"{path}: {REPLACE_KEY}: expected a list of dotted keys, got {replace!r}")
    for key in replace:
        node: Any = data
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise ParamsError(f"{path}: {REPLACE_KEY}: {key} is not set in this file")
            node = node[part]
    return merge(resolve_overlay(base_file), data, set(replace), f"{path}", f"{base_file}")


def shared_keys(root: dict[str, Any], prefix: str) -> dict[str, Any]:
    """The keys a section at `prefix` may set beyond its own (OVER_SHARED), from the top-level base."""
    shared = OVER_SHARED.get(prefix.removesuffix("."))
    if shared is None:
        return {}
    return root.get(shared) or {}


def merge(base: dict[str, Any], overlay: dict[str, Any], replace: set[str], where: str, base_file: str,
          prefix: str = "", root: dict[str, Any] | None = None) -> dict[str, Any]:
    """`base` with `overlay`'s values: mappings key by key, keys in `replace` (dotted) whole."""
    root = base if root is None else root
    out = dict(base)
    for key, value in overlay.items():
        dotted = f"{prefix}{key}"
        if key not in base and (shared := shared_keys(root, prefix)) and key in shared:
            out[key] = value  # a stage's own value of a shared key
            continue
        if key not in base:
            known = ", ".join(sorted(map(str, base))) if isinstance(base, dict) else ""
            raise ParamsError(f"{where}: {dotted}: not a key of {base_file} (an overlay only changes existing keys; "
                              f"list a mapping under `{REPLACE_KEY}:` to replace it whole). Known here: {known}")
        if dotted not in replace and isinstance(value, dict) and isinstance(base[key], dict):
            out[key] = merge(base[key], value, replace, where, base_file, f"{dotted}.", root)
        else:
            out[key] = value
    return out


# ----------------------------------------------------------------------------- which keys a stage reads

class _Recording(dict):
    """A params mapping that notes each value read (`a.b.c`), so a test can compare the keys a stage
    really reads with its `params:` in dvc.yaml. Listing keys is not reading them."""

    def __init__(self, data: dict, prefix: str, sink: set[str]):
        super().__init__(data)
        self._prefix, self._sink = prefix, sink

    def _read(self, key: Any, value: Any) -> Any:
        path = f"{self._prefix}{key}"
        if str(key).startswith("__"):
            return value
        if isinstance(value, dict):  # a section: its values are noted as they are read
            self._sink.add(f"{path}.*")
            return _Recording(value, f"{path}.", self._sink)
        self._sink.add(path)
        return value

    def __getitem__(self, key: Any) -> Any:
        return self._read(key, super().__getitem__(key))

    def get(self, key: Any, default: Any = None) -> Any:
        return self._read(key, super().__getitem__(key)) if key in self else default

    def items(self):  # type: ignore[override]
        return [(k, self._read(k, v)) for k, v in super().items()]

    def values(self):  # type: ignore[override]
        return [v for _, v in self.items()]

    def __iter__(self):
        return iter(list(super().keys()))


def _recorded(data: dict[str, Any], sink_file: str) -> dict[str, Any]:
    reads: set[str] = set()

    def flush() -> None:  # one JSON line per process: the DVC stage (or command) and what it read
        line = json.dumps({"stage": os.environ.get("DVC_STAGE", ""), "reads": sorted(reads)})
        with open(sink_file, "a") as f:
            f.write(line + "\n")

    atexit.register(flush)
    return _Recording(data, "", reads)


def section(params: dict[str, Any], name: str, cls: type[T]) -> T:
    """Build dataclass `cls` from `params[name]` (missing keys take the dataclass defaults, which
    equal params.yaml's values; a field without one must be given)."""
    where = f"{params.get('__file__', DEFAULT_PARAMS)}: {name}"
    raw = params.get(name, {})
    return from_dict(cls, raw if raw is not None else {}, where)


def from_dict(cls: type[T], raw: Any, where: str) -> T:
    if not isinstance(raw, dict):
        raise ParamsError(f"{where}: expected a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ParamsError(f"{where}: unknown key(s) {unknown}; known: {sorted(fields)}")
    missing = sorted(n for n, f in fields.items() if n not in raw and f.init
                     and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
    if missing:
        raise ParamsError(f"{where}: missing key(s) {missing} (no default: params.yaml sets them)")
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in raw.items():
        values[key] = _coerce(hints[key], value, f"{where}.{key}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        raise ParamsError(f"{where}: {err}") from err


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(typing.cast(type, hint), value, where)  # a field's hint is a class, not an instance
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, where)
            except ParamsError as err:
                errors.append(str(err))
        raise ParamsError(f"{where}: {value!r} does not match {hint}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ParamsError(f"{where}: expected a list, got {value!r}")
        item = args[0] if args else Any
        return [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ParamsError(f"{where}: expected a mapping, got {value!r}")
        return {k: _coerce(args[1], v, f"{where}.{k}") for k, v in value.items()} if args else dict(value)
    if origin is typing.Literal:
        if value not in args:
            raise ParamsError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if hint is Any:
        return value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is bool and not isinstance(value, bool):
        raise ParamsError(f"{where}: expected true/false, got {value!r}")
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ParamsError(f"{where}: expected an integer, got {value!r}")
    if hint is str and not isinstance(value, str):
        # YAML turns `every:5`-like strings fine, but `5` for a str key is a likely slip: accept numbers.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ParamsError(f"{where}: expected a string, got {value!r}")
    if isinstance(hint, type) and not isinstance(value, hint):
        raise ParamsError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value
