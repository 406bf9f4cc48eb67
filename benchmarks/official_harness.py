"""Run the official STM implementation (github.com/seoungwugoh/STM) beside ours, for the benchmarks.

The official code is not part of this project: pass the directory of a checkout (or of
`git archive` of it) holding its `model.py` and `helpers.py`. Its `model.py` imports cv2 and
matplotlib (unused by the network) and builds `models.resnet50(pretrained=True)` (a download):
`official_stm` stubs the first two and builds the ResNet without weights, then loads the given
official-layout state dict. `run_video` is the official `Run_video` loop of `eval_DAVIS.py`,
rewritten here because that script parses arguments and evaluates DAVIS on import.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.models

OFFICIAL_URL = "https://github.com/seoungwugoh/STM"


@contextlib.contextmanager
def _offline_imports() -> Iterator[None]:
    """cv2/matplotlib stubs (only if missing) and a resnet50 that ignores `pretrained`."""
    stubs = [name for name in ("cv2", "matplotlib", "matplotlib.pyplot") if importlib.util.find_spec(
        name.split(".")[0]) is None]
    for name in stubs:
        sys.modules[name] = types.ModuleType(name)
    if "matplotlib" in stubs:
        sys.modules["matplotlib"].pyplot = sys.modules["matplotlib.pyplot"]  # type: ignore[attr-defined]
    resnet50 = torchvision.models.resnet50
    torchvision.models.resnet50 = lambda *args, **kwargs: resnet50(weights=None)  # type: ignore[assignment]
    try:
        yield
    finally:
        torchvision.models.resnet50 = resnet50


def official_stm(src: Path, state_dict: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
    """The official `STM()` from `src/model.py` in eval mode, with official-layout weights loaded
    (keys with or without `module.`), or its own random initialisation when `state_dict` is None."""
    src = Path(src).resolve()
    if not (src / "model.py").is_file() or not (src / "helpers.py").is_file():
        raise SystemExit(f"{src}: no official STM code (model.py, helpers.py) there; get it from {OFFICIAL_URL}")
    sys.path.insert(0, str(src))  # model.py does `from helpers import *`
    try:
        with _offline_imports(), contextlib.redirect_stdout(sys.stderr):  # it prints a banner
            spec = importlib.util.spec_from_file_location("official_stm_model", src / "model.py")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            network = module.STM()
    finally:
        sys.path.remove(str(src))
    if state_dict is not None:
        network.load_state_dict({k.removeprefix("module."): v for k, v in state_dict.items()}, strict=True)
    return network.eval()


@torch.no_grad()
def run_video(
    model: torch.nn.Module,
    frames: torch.Tensor,  # 1 x 3 x T x H x W, RGB in [0, 1]
    masks: torch.Tensor,  # 1 x K x T x H x W one-hot (only frame 0 is read), K = 1 + objects
    num_objects: int,
    mem_every: int = 5,
    on_frame: Callable[[int, float], None] | None = None,  # (t, seconds for frame t)
    clock: Callable[[], float] = time.perf_counter,
) -> torch.Tensor:  # 1 x K x T x H x W probabilities, frame 0 = the annotation
    """The official `Run_video(..., Mem_every=mem_every)` loop, step for step."""
    num_frames = frames.shape[2]
    to_memorize = [int(i) for i in np.arange(0, num_frames, step=mem_every)]
    n = torch.tensor([num_objects])
    estimates = torch.zeros_like(masks)
    estimates[:, :, 0] = masks[:, :, 0]
    keys = values = None  # the memorised frames before t-1; set after frame 1, as upstream
    for t in range(1, num_frames):
        start = clock()
        prev_key, prev_value = model(frames[:, :, t - 1], estimates[:, :, t - 1], n)  # memorize
        if t - 1 == 0:
            this_keys, this_values = prev_key, prev_value
        else:
            this_keys = torch.cat([keys, prev_key], dim=3)
            this_values = torch.cat([values, prev_value], dim=3)
        logit = model(frames[:, :, t], this_keys, this_values, n)  # segment
        estimates[:, :, t] = F.softmax(logit, dim=1)
        if t - 1 in to_memorize:
            keys, values = this_keys, this_values
        if on_frame is not None:
            on_frame(t, clock() - start)
    return estimates


def one_hot(mask: np.ndarray, objects: int) -> torch.Tensor:
    """H x W ids -> (1 + objects) x H x W float one-hot, as the official dataset's `To_onehot`."""
    return torch.from_numpy(np.stack([(mask == k) for k in range(objects + 1)]).astype(np.float32))
