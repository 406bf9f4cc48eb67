"""The evaluation variants: which model runs with which memory, and their stable names.

A variant spec in `evaluate.variants` is one of
  copy-first              the baseline: the first mask (and each new object's annotation) repeated
  stm:<policy>            the STM model with a frame policy: first, previous, first+previous,
                          every (N = memory.every), fifo (K = memory.fifo), or explicit every:N / fifo:K
  strmn                   the STRMN model, one variant per rule in memory.rules, K = memory.slots
                          (I2M in memory.rules: the input-to-memory ablation recurrent-i2m:K)
  strmn:<RULE>            one STRMN rule (A, B, C, D or I2M) with K = memory.slots
  strmn:<policy>          the STRMN model with any explicit policy (recurrent:K:RULE, recurrent-i2m:K, ...)
  <policy>                a bare policy: recurrent* runs the STRMN model, anything else the STM model
  oracle:<policy>         a diagnostic: the same model and policy, but each frame the policy memorises
                          holds its ground-truth mask instead of the prediction (benchmarks with dense
                          annotations); the gap to the plain policy is what the model's own mistakes in
                          memory cost, and what is left below 100 is the model's reading

Names are stable and filesystem-safe: the model, then the policy with ':' and '+' turned into '-'
(`stm-every-5`, `stm-first-previous`, `strmn-recurrent-3-C`, `copy-first`, `stm-oracle-every-5`). They name the result
folders, the keys of metrics/evaluate.json and the MLflow child runs.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from stm_core.memory import validate_policy
from stm_core.memory.recurrent import I2M, STRMN_RULES

COPY_FIRST = "copy-first"
ORACLE = "oracle"
POSTPROCESS = ("none", "strmn", "all")
MODELS = ("stm", "strmn")
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class MemoryParams:
    """params.yaml `memory`: memory settings used only at inference (evaluate and report)."""

    every: int = 5  # STM every:N: a new memory frame every N frames (the paper's final model: 5)
    fifo: int = 8  # STM fifo:K: the first frame plus the K-1 latest memory frames
    slots: int = 4  # STRMN K: template slots of the recurrent memory (first frame included)
    rules: list[str] = field(default_factory=lambda: list(STRMN_RULES))  # STRMN update rules for `strmn` (+ I2M)
    top_k: int | None = None  # memory read top-k at inference: null keeps the model's own, 0 reads all
    postprocess: str = "strmn"  # drop blobs far from the previous frame's object: none | strmn | all (models)

    def __post_init__(self):
        if self.every < 1:
            raise ValueError(f"every must be >= 1, got {self.every}")
        if self.fifo < 2:
            raise ValueError(f"fifo must be >= 2 (the first frame and at least one more), got {self.fifo}")
        if self.slots < 2:
            raise ValueError(f"slots must be >= 2 (the ground-truth slot and at least one more), got {self.slots}")
        bad = [r for r in self.rules if r not in STRMN_RULES]
        if bad or not self.rules:
            raise ValueError(f"rules must be a non-empty list from {list(STRMN_RULES)}, got {self.rules}")
        if self.postprocess not in POSTPROCESS:
            raise ValueError(f"postprocess must be one of {POSTPROCESS}, got {self.postprocess!r}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be null, 0 (all) or a positive integer, got {self.top_k}")


@dataclass(frozen=True)
class Variant:
    name: str  # stable, filesystem-safe: stm-every-5
    model: str  # "stm", "strmn" or "none" (copy-first)
    policy: str  # memory policy for stm_core.memory.make_memory; "copy-first" for the baseline
    postprocess: bool = False  # stm_core.postprocess on each prediction (STRMN's far-blob removal)
    oracle: bool = False  # memorise the ground truth instead of the prediction (a diagnostic)

    @property
    def family(self) -> str:
        """The policy without its numbers: first, every, fifo, recurrent, ... (report rows)."""
        return self.policy.split(":")[0]

    @property
    def rule(self) -> str | None:
        """STRMN update rule of a recurrent:K:RULE policy."""
        parts = self.policy.split(":")
        if parts[0] == "recurrent-i2m":
            return I2M
        return parts[2] if parts[0] == "recurrent" and len(parts) == 3 else None

    @property
    def size(self) -> int | None:
        """The number in the policy (N of every:N, K of fifo:K / recurrent:K:RULE)."""
        parts = self.policy.split(":")
        return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None


def variant_name(model: str, policy: str, oracle: bool = False) -> str:
    if model == "none":
        return policy
    return f"{model}-{'oracle-' if oracle else ''}{policy}".replace(":", "-").replace("+", "-")


def make_variant(model: str, policy: str, oracle: bool = False) -> Variant:
    name = variant_name(model, policy, oracle)
    if not SAFE_NAME.match(name):
        raise ValueError(f"variant name {name!r} is not filesystem-safe")
    return Variant(name, model, policy, oracle=oracle)


def _expand(spec: str, memory: MemoryParams) -> list[Variant]:
    spec = spec.strip()
    if spec == COPY_FIRST:
        return [Variant(COPY_FIRST, "none", COPY_FIRST)]
    if spec.startswith(ORACLE + ":"):
        rest = spec[len(ORACLE) + 1:].strip()
        if not rest or rest.startswith(ORACLE + ":"):
            raise ValueError("oracle: needs a model's policy, e.g. oracle:every or oracle:strmn:C")
        plain = _expand(rest, memory)
        if any(v.model == "none" for v in plain):
            raise ValueError("copy-first has no memory to hold the ground truth")
        return [make_variant(v.model, v.policy, oracle=True) for v in plain]
    model, _, rest = spec.partition(":")
    if model not in MODELS:  # a bare policy
        model, rest = ("strmn" if spec.startswith("recurrent") else "stm"), spec
    if model == "strmn" and rest in ("", *STRMN_RULES):
        rules = list(memory.rules) if rest == "" else [rest]
        return [make_variant("strmn", f"recurrent-i2m:{memory.slots}" if r == I2M else f"recurrent:{memory.slots}:{r}")
                for r in rules]
    if rest == "":
        raise ValueError(f"{model!r} needs a memory policy, e.g. {model}:every")
    if rest == "every":
        rest = f"every:{memory.every}"
    elif rest == "fifo":
        rest = f"fifo:{memory.fifo}"
    validate_policy(rest)
    if rest.startswith("recurrent") and model != "strmn":
        raise ValueError(f"policy {rest!r} needs the STRMN model (its Fusion Cell): write strmn:{rest}")
    return [make_variant(model, rest)]


def parse_variants(specs: list[str], memory: MemoryParams) -> list[Variant]:
    """Expand the specs of `evaluate.variants` in order; a variant listed twice is an error."""
    variants: list[Variant] = []
    seen: dict[str, str] = {}
    for spec in specs:
        try:
            expanded = _expand(str(spec), memory)
        except ValueError as err:
            raise ValueError(f"evaluate.variants: {spec!r}: {err}") from err
        for v in expanded:
            if v.name in seen:
                raise ValueError(f"evaluate.variants: {spec!r} gives {v.name}, which {seen[v.name]!r} gave already")
            seen[v.name] = str(spec)
            post = memory.postprocess == "all" or (memory.postprocess == "strmn" and v.model == "strmn")
            variants.append(dataclasses.replace(v, postprocess=post and v.model != "none"))
    if not variants:
        raise ValueError("evaluate.variants: no variant to evaluate")
    return variants
