"""The plateau learning-rate schedule of STRMN (sec. 3.4.2): "the learning rate is dropped by a
factor of 0.1 each time the error on the validation set does not decrease".

`lr_schedule: plateau` in a stage's params: every `val_every` steps the loss on a fixed set of
held-out clips is measured (no gradient), and the learning rate is multiplied by
`plateau_factor` whenever it has not decreased for more than `plateau_patience` checks. The
held-out clips come from the last `val_holdout` videos of the training split, which are then not
trained on. Every rank measures the same clips with the same weights, so all ranks agree on the
rate without communicating.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch


@dataclass
class Plateau:
    factor: float = 0.1  # the rate is multiplied by this at each drop
    patience: int = 0  # checks without a decrease tolerated before a drop (the paper: 0)
    best: float = math.inf  # lowest validation error so far
    bad: int = 0  # checks since it last decreased
    scale: float = 1.0  # current multiplier of the base learning rate
    drops: int = 0

    def update(self, error: float) -> float:
        """Record one validation error; -> the learning-rate multiplier from now on."""
        if not math.isfinite(error):
            raise ValueError(f"validation error is {error}: the plateau schedule needs a finite loss")
        if error < self.best:
            self.best, self.bad = error, 0
        else:
            self.bad += 1
            if self.bad > self.patience:
                self.scale *= self.factor
                self.drops += 1
                self.bad = 0
        return self.scale

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def holdout(train: dict) -> int:
    """Videos held out of training: only a plateau stage validates (and so holds any out)."""
    return int(train.get("val_holdout", 0)) if train.get("lr_schedule") == "plateau" else 0


def split_holdout(videos: Sequence, holdout: int) -> tuple[list, list]:
    """-> (training videos, the last `holdout` videos for validation)."""
    videos = list(videos)
    if holdout <= 0:
        return videos, []
    if holdout >= len(videos):
        raise ValueError(f"val_holdout = {holdout} leaves no training video (the split has {len(videos)})")
    return videos[:-holdout], videos[-holdout:]


def validation_clips(videos: Sequence, n_clips: int, n_frames: int, crop: int, max_objects: int, seed: int) -> list:
    """A fixed list of held-out clips (frames N x H x W x 3 uint8, masks N x H x W uint8): same every call."""
    from stm_core.data.sampler import VideoClipSampler, VideoSamplerConfig

    sampler = VideoClipSampler(list(videos), VideoSamplerConfig(n_frames=n_frames, height=crop, width=crop,
                                                                 max_objects=max_objects))
    rng = np.random.default_rng([seed, 77])
    return [(c.frames, c.masks) for c in (sampler.sample(rng, 0) for _ in range(n_clips))]


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
    if sp.data_format == "parquet":
        raise ValueError(f"{where}: lr_schedule plateau needs held-out videos (val_holdout); validation on held-out "
                         "images for Parquet pretraining is not implemented yet: use constant or cosine there")
    if sp.val_holdout < 1 or sp.val_every < 1 or sp.val_clips < 1:
        raise ValueError(f"{where}: lr_schedule plateau needs val_holdout >= 1, val_every >= 1 and val_clips >= 1 "
                         f"(got {sp.val_holdout}, {sp.val_every}, {sp.val_clips})")


def plateau_setup(config: dict, device: torch.device, totals: dict) -> tuple[Plateau | None, list]:
    """The stage's Plateau (restored from a checkpoint's totals) and its held-out batches on `device`."""
    tp = config["train"]
    if tp["lr_schedule"] != "plateau":
        return None, []
    from pipeline.train.data import collate, open_videos

    plateau = Plateau(factor=tp["plateau_factor"], patience=tp["plateau_patience"])
    if "plateau" in totals:
        plateau.load_state_dict(totals["plateau"])
    _, held = split_holdout(open_videos(config["data"]), tp["val_holdout"])
    clips = validation_clips(held, tp["val_clips"], config["frames"], tp["crop"], tp["max_objects"], config["seed"])
    batch = max(1, config["per_worker_batch"])
    batches = [tuple(t.to(device) for t in collate(clips[i:i + batch])) for i in range(0, len(clips), batch)]
    return plateau, batches


def check_plateau(plateau: Plateau, unroll: torch.nn.Module, batches: list, totals: dict) -> float:
    """One validation check: the held-out error, the plateau updated (and kept in `totals` for checkpoints)."""
    unroll.eval()
    error = validation_error(unroll, batches)
    unroll.train()
    plateau.update(error)
    totals["plateau"] = plateau.state_dict()
    return error
