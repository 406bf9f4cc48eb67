"""STRMN's truncated BPTT through DDP's own reducer: two gloo ranks, each with half the batch, get
the gradients one process gets from the whole batch, for both update modes (per clip: segments
accumulate under no_sync; per segment: an update after each), and no hand-written all-reduce is left."""

from __future__ import annotations

import os
import re
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
TINY = {"backbone": "resnet18", "pretrained": "none", "decoder_dim": 16, "fusion_dim": 8, "kind": "strmn",
        "norm": "group"}


def batch(n_clips: int = 4, frames: int = 6, size: int = 32):
    """Clips of a bright square moving over noise (one object each)."""
    from pipeline.train.data import collate

    rng = np.random.default_rng(0)
    clips = []
    for _ in range(n_clips):
        f = rng.integers(0, 80, size=(frames, size, size, 3), dtype=np.uint8)
        m = np.zeros((frames, size, size), np.uint8)
        y, x = rng.integers(2, size // 2, size=2)
        for t in range(frames):
            f[t, y + 2 * t:y + 2 * t + 10, x + 2 * t:x + 2 * t + 10] = (230, 60, 40)
            m[t, y + 2 * t:y + 2 * t + 10, x + 2 * t:x + 2 * t + 10] = 1
        clips.append((f, m))
    return collate(clips)


def gradients_per_update(update: str, rank: int, world: int) -> list[dict[str, torch.Tensor]]:
    """Run one train step of a clip batch (this rank's share of it) -> the gradients at each update."""
    from training_configs import plain_loss

    from pipeline.train.settings import StrmnParams
    from pipeline.train.step import Unroll, make_train_step
    from stm_core.model.network import ModelConfig, STMNetwork

    torch.manual_seed(0)
    net = STMNetwork(ModelConfig(**TINY))
    tp = plain_loss(grad_clip=0.0)
    strmn = StrmnParams(rule="C", slots=3, segment_length=2, update=update)
    model = Unroll(net, tp, strmn)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.0)  # parameters stay put: every update is comparable
    seen = []
    original = optimizer.step

    def step(*a, **k):
        seen.append({n: p.grad.detach().clone() for n, p in net.named_parameters() if p.grad is not None})
        return original(*a, **k)

    optimizer.step = step
    frames, masks, valid = batch()
    share = frames.shape[0] // world
    rows = slice(rank * share, (rank + 1) * share)
    train_step = make_train_step(model, net, optimizer, torch.amp.GradScaler("cpu", enabled=False), nullcontext(),
                                 tp, strmn)
    train_step(frames[rows], masks[rows], valid[rows])
    return seen


def _rank(rank: int, world: int, port: int, update: str, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        grads = gradients_per_update(update, rank, world)
        if rank == 0:
            torch.save(grads, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("update", ["clip", "segment"])
def test_two_gloo_ranks_get_the_gradients_of_one_process(update, tmp_path, one_thread):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "ddp.pt")
    mp.spawn(_rank, args=(2, port, update, out), nprocs=2, join=True)
    ddp = torch.load(out, weights_only=True)
    single = gradients_per_update(update, 0, 1)
    assert len(ddp) == len(single) == (1 if update == "clip" else 3)  # 6 frames, T = 2: 3 segments
    assert any(n.startswith("fusion.") for a in ddp for n in a), "the Fusion Cell trains through the segments"
    for k, (a, b) in enumerate(zip(ddp, single)):
        assert a.keys() == b.keys(), f"update {k}: parameters with gradients differ"
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=f"update {k}, {name}")


def test_no_hand_written_gradient_all_reduce_is_left():
    code = "\n".join(p.read_text() for p in (ROOT / "pipeline").rglob("*.py"))
    code += "\n".join(p.read_text() for p in (ROOT / "stm_core").rglob("*.py"))
    assert "allreduce_gradients" not in code
    assert not re.search(r"_flatten_dense_tensors|all_reduce\(\s*(flat|p\.grad|grad)", code)
