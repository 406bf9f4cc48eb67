"""The `evaluate` section of params.yaml (types, validation and help; params.yaml holds the values)."""

from __future__ import annotations

from dataclasses import dataclass, field

from stm_core.precision import check_precision

DEFAULT_VARIANTS = ["copy-first", "stm:first", "stm:previous", "stm:first+previous", "stm:every", "stm:fifo", "strmn"]


@dataclass
class EvaluateParams:
    variants: list[str] = field(default_factory=lambda: list(DEFAULT_VARIANTS))  # see pipeline/evaluate/variants.py
    dataset: str = "data/raw/builtin-videos"  # benchmark root: DAVIS or YouTube-VOS layout
    format: str = "auto"  # davis | youtube-vos | auto (DAVIS if JPEGImages/ exists)
    split: str = "val"  # DAVIS ImageSets/<year>/<split>.txt, or the YouTube-VOS split folder
    year: str = "2017"  # DAVIS ImageSets year
    resolution: str = "480p"  # DAVIS resolution folder
    sequences: list[str] = field(default_factory=list)  # only these sequences (empty: the whole split)
    max_sequences: int = 0  # the first N sequences only (0: all)
    stm_model: str = "models/main/model.pt"  # checkpoint for stm:* variants
    strmn_model: str = "models/strmn-main/{rule}/model.pt"  # checkpoint for strmn* variants ({rule}: one per rule)
    device: str = "cpu"  # cpu | cuda | auto
    max_size: int | None = None  # longest side the network sees (null: native resolution)
    num_cpus: float = 1.0  # CPUs per task (torch threads = max(1, round(num_cpus)))
    num_gpus: float | None = None  # GPUs per evaluation actor; null: 1 on cuda (timed alone), 0 on cpu
    overlays: int = 3  # overlay images per variant logged to MLflow (from the first sequence)
    reproducible: bool = True  # CPU: the same convolution kernels every run (no timed Winograd choice)
    precision: str = "fp32"  # fp32: exact, TF32 off (the official STM's numbers) | bf16: bf16 autocast, faster
    probe_sequences: int = 3  # sequences on which the STM model's memory read is checked against the ground truth (0: off)

    def __post_init__(self):
        if self.format not in ("auto", "davis", "youtube-vos"):
            raise ValueError(f"format must be auto, davis or youtube-vos, got {self.format!r}")
        if self.device not in ("cpu", "cuda", "auto") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be cpu, cuda or auto, got {self.device!r}")
        if self.probe_sequences < 0:
            raise ValueError(f"probe_sequences must be >= 0, got {self.probe_sequences}")
        if self.num_cpus <= 0:
            raise ValueError(f"num_cpus must be > 0, got {self.num_cpus}")
        check_precision(self.precision)


