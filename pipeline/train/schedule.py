"""The plateau learning-rate schedule of STRMN (sec. 3.4.2): "the learning rate is dropped by a
factor of 0.1 each time the error on the validation set does not decrease".

`lr_schedule: plateau` in a stage's params: every `val_every` steps the loss on a fixed set of
held-out clips is measured (no gradient), and the learning rate is multiplied by
`plateau_factor` whenever it has not decreased for more than `plateau_patience` checks. The
held-out clips come from the last `val_holdout` videos of the training split, which are then not
trained on; for synthetic (Parquet) pretraining, from the set's validation clips (`<data>/_val`,
made by `stm synthesize` from images held out of the training clips: `synthesize.val_share` and
the set's `val_clips`). Every rank measures the same clips with the same weights, so all ranks
agree on the rate without communicating.

The paper drops the rate at every check without a decrease (patience 0). A check's error is noisy,
so with patience 0 and frequent checks the rate falls to nothing long before training ends; a
stage therefore needs `plateau_patience >= 1` or a floor `plateau_min_scale > 0` (the rate never
goes below lr x that), and checks that fit the stage (`val_every < steps`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from pipeline.train.data import DataSpec, split_holdout

VAL_DIR = "_val"  # a synthetic set's validation clips (pipeline.synthesize.VAL_DIR)


@dataclass
class Plateau:
    factor: float = 0.1  # the rate is multiplied by this at each drop
    patience: int = 0  # checks without a decrease tolerated before a drop (the paper: 0)
    best: float = math.inf  # lowest validation error so far
    bad: int = 0  # checks since it last decreased
    scale: float = 1.0  # current multiplier of the base learning rate
    drops: int = 0
    min_scale: float = 0.0  # the multiplier never drops below this (0: no floor)

    def update(self, error: float) -> float:
        """Record one validation error; -> the learning-rate multiplier from now on."""
        if not math.isfinite(error):
            raise ValueError(f"validation error is {error}: the plateau schedule needs a finite loss")
        if error < self.best:
            self.best, self.bad = error, 0
        else:
            self.bad += 1
            if self.bad > self.patience and self.scale > self.min_scale * (1 + 1e-6):  # 0.1 * 0.1 > 0.01 in floats
                self.scale = max(self.scale * self.factor, self.min_scale)
                self.drops += 1
                self.bad = 0
        return self.scale

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def validation_clips(videos: Sequence, n_clips: int, n_frames: int, crop: int, max_objects: int, seed: int,
                     short_videos: Literal["drop", "repeat"] = "drop") -> list:
    """A fixed list of held-out clips (frames N x H x W x 3 uint8, masks N x H x W uint8): same every call."""
    from stm_core.data.sampler import VideoClipSampler, VideoSamplerConfig

    sampler = VideoClipSampler(list(videos), VideoSamplerConfig(n_frames=n_frames, height=crop, width=crop,
                                                                 max_objects=max_objects, short_videos=short_videos))
    rng = np.random.default_rng([seed, 77])
    return [(c.frames, c.masks) for c in (sampler.sample(rng, 0) for _ in range(n_clips))]


def parquet_validation_clips(data_path: str, n_clips: int, crop: int, max_objects: int, seed: int) -> list:
    """The first `n_clips` validation clips of a synthetic set (`<set>/_val`), decoded and cropped
    as training clips are, each by its own clip id: the same clips every call. At a URI only the rows
    needed are read from the store, by key (never the set onto the node's disk)."""
    from pipeline import storage
    from pipeline.train.data import DecodeSynthetic
    from pipeline.train.shards import open_parquet, parquet_files

    folder = storage.join(data_path, VAL_DIR) if storage.is_uri(data_path) else str(Path(data_path) / VAL_DIR)
    files = parquet_files(folder)
    if not files:
        raise FileNotFoundError(f"{folder}: no validation clips for the plateau schedule; give the set val_clips > 0 "
                                "(synthesize.sets.<set>.val_clips, with synthesize.val_share) and run `stm synthesize`")
    decode = DecodeSynthetic(crop, max_objects, seed)
    clips: list[tuple[np.ndarray, np.ndarray]] = []  # (frames N x H x W x 3, masks N x H x W) uint8
    for f in files:
        for batch in open_parquet(f).iter_batches(batch_size=max(1, n_clips - len(clips)),
                                                  columns=["clip_id", "n_frames", "frames", "masks"]):
            rows = batch.slice(0, n_clips - len(clips))
            out = decode({k: rows.column(k).to_numpy(zero_copy_only=False) for k in rows.schema.names})
            clips += list(zip(out["frames"], out["masks"]))
            if len(clips) >= n_clips:
                return clips
    return clips


def video_counts(data: DataSpec, n_frames: int, holdout_videos: int, mode: str) -> dict[str, int]:
    """A video stage's training videos, how many are shorter than its clips, and how many of those
    it never sees (`short_videos: drop`): for the stage's log and metrics."""
    from pipeline.train.data import open_videos
    from stm_core.data.sampler import short_videos

    videos, _ = split_holdout(open_videos(data), holdout_videos)
    short = len(short_videos(videos, n_frames))
    return {"videos": len(videos), "short_videos": short, "dropped_videos": short if mode == "drop" else 0}


@torch.no_grad()
def validation_error(unroll: Callable, batches: Sequence[tuple[torch.Tensor, ...]]) -> float:
    """Mean loss of `unroll(frames, masks, valid)` over prepared batches (the model in eval mode)."""
    total = 0.0
    for frames, masks, valid in batches:
        total += float(unroll(frames, masks, valid).loss)
    return total / max(1, len(batches))


def check_stage(stage_params, where: str) -> None:
    """Params errors of a plateau stage, naming the file and section."""
    sp = stage_params
    if sp.lr_schedule != "plateau":
        return
    if sp.data_format != "parquet" and sp.val_holdout < 1:
        raise ValueError(f"{where}: lr_schedule plateau on videos needs held-out videos: val_holdout >= 1 "
                         f"(got {sp.val_holdout})")
    if sp.val_every < 1 or sp.val_clips < 1:
        raise ValueError(f"{where}: lr_schedule plateau needs val_every >= 1 and val_clips >= 1 "
                         f"(got {sp.val_every}, {sp.val_clips})")
    if sp.val_every >= sp.steps:
        raise ValueError(f"{where}: lr_schedule plateau checks every {sp.val_every} steps but the stage has "
                         f"{sp.steps}: the rate would never change (lower val_every)")
    if not 0.0 <= sp.plateau_min_scale < 1.0:
        raise ValueError(f"{where}: plateau_min_scale must be in [0, 1), got {sp.plateau_min_scale}")
    if sp.plateau_patience < 1 and sp.plateau_min_scale <= 0.0:
        raise ValueError(f"{where}: lr_schedule plateau with plateau_patience 0 and no floor (plateau_min_scale 0) "
                         "cuts the rate at every noisy check until training stops: set plateau_patience >= 1 "
                         "or plateau_min_scale > 0")


def check_plateau(plateau: Plateau, unroll: torch.nn.Module, batches: list, totals: dict) -> float:
    """One validation check: the held-out error, the plateau updated (and kept in `totals` for checkpoints)."""
    unroll.eval()
    error = validation_error(unroll, batches)
    unroll.train()
    plateau.update(error)
    totals["plateau"] = plateau.state_dict()
    return error
