"""Where does the space-time memory read look? A ground-truth diagnostic of eq. (1)-(2).

STM segments a query pixel by reading the memory values at the memory locations whose keys match
its key. With ground truth for the query and the memory frames, that can be checked directly: the
share of a target's query pixels' read weight that lands on memory locations of the same target
(`precision`), against what a read that ignores the keys would give (uniform weights: the target's
share of the memory, `chance`). A read that matches scores well above chance. A read that has
collapsed onto one memory location for every query location (an attention sink: the value there
sees the whole frame through its receptive field and acts as a global descriptor of the target)
scores at or below chance, and then more memory frames cannot help, correct or not.

Memory frames hold their ground truth here, as in the oracle variants, so the probe measures the
read, not the model's earlier mistakes. Two memories are probed per query frame: the target's first
annotated frame (`first`), and that frame plus every N-th annotated frame before the query
(`every:N`, STM's saved frames without the temporary previous one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from stm_core.inference import pad_to_stride
from stm_core.model.network import STRIDE, STMNetwork
from stm_core.model.read import label_shares, to_tokens


def read_weights(query_key: torch.Tensor, memory_key: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """query_key: Lq x Ck, memory_key: L x Ck -> Lq x L softmax weights of eq. (1) (scale 1/sqrt(Ck) as STM)."""
    scale = 1.0 / math.sqrt(query_key.shape[-1]) if scale is None else scale
    return (query_key.float() @ memory_key.float().T * scale).softmax(dim=-1)


def target_read(weights: torch.Tensor, query_share: torch.Tensor, memory_share: torch.Tensor) -> tuple[float, float]:
    """weights: Lq x L; query_share: Lq, memory_share: L (the target's area share per location) ->
    (precision, chance): the target's query pixels' read weight on target memory, and the same for
    uniform weights. Both nan when the target covers no query pixel."""
    total = float(query_share.sum())
    if total <= 0:
        return math.nan, math.nan
    precision = float((query_share @ weights @ memory_share) / total)
    return precision, float(memory_share.mean())


def sink_share(weights: torch.Tensor) -> float:
    """weights: Lq x L -> the share of query locations whose strongest memory location is the most common
    one: ~1/Lq when each location matches its own, 1.0 when every location reads the same one."""
    counts = torch.bincount(weights.argmax(dim=-1), minlength=weights.shape[-1])
    return float(counts.max()) / weights.shape[0]


@dataclass
class ProbeTotals:
    precision: float = 0.0
    chance: float = 0.0
    sink: float = 0.0
    count: int = 0

    def add(self, precision: float, chance: float, sink: float) -> None:
        self.merge(ProbeTotals(precision, chance, sink, 1))

    def merge(self, other: ProbeTotals) -> None:
        self.precision += other.precision
        self.chance += other.chance
        self.sink += other.sink
        self.count += other.count

    def summary(self) -> dict:
        n = max(self.count, 1)
        mean_precision, mean_chance = self.precision / n, self.chance / n
        return {"precision": mean_precision, "chance": mean_chance,
                "lift": mean_precision / mean_chance if mean_chance > 0 else None,
                "sink_share": self.sink / n, "samples": self.count}


def _pad(x: torch.Tensor) -> torch.Tensor:
    return pad_to_stride(x)[0]  # as inference pads: the same key locations


def memory_frames(first: int, query: int, annotated: list[int], every: int) -> dict[str, list[int]]:
    """The probed memories of a target first annotated at `first`, for query frame `query`."""
    saved = [t for t in annotated if first < t < query and (t - first) % every == 0]
    return {"first": [first], f"every:{every}": [first, *saved]}


@torch.no_grad()
def probe_sequence(
    network: STMNetwork,
    frames: list[torch.Tensor],  # T x (3 x H x W) in [0, 1]
    masks: dict[int, torch.Tensor],  # frame index -> H x W object ids (ground truth)
    every: int = 5,
    heatmap_frame: int | None = None,  # also return, for this query frame, where each target's pixels read
) -> tuple[dict[str, ProbeTotals], dict]:
    """Probe the read of one video. Returns ({memory name: totals}, heatmaps), where heatmaps (empty
    unless `heatmap_frame` has ground truth) maps object id -> {memory frame index: h x w read weight
    of that object's query pixels at `heatmap_frame`, `first` memory}."""
    masks = {t: m.long().masked_fill(m == 255, 0) for t, m in masks.items()}  # DAVIS void: background here
    annotated = sorted(masks)
    objects = sorted({int(i) for t in annotated for i in torch.unique(masks[t]).tolist()} - {0})
    num_labels = max(objects, default=0) + 1
    firsts = {o: next(t for t in annotated if bool((masks[t] == o).any())) for o in objects}
    totals: dict[str, ProbeTotals] = {}
    keys: dict[int, torch.Tensor] = {}  # memory frame -> O x L x Ck (object channel o-1), by ground truth
    shares: dict[int, torch.Tensor] = {}  # annotated frame -> L x labels
    heatmaps: dict = {}
    device = next(network.parameters()).device

    def memory_key(t: int) -> torch.Tensor:
        if t not in keys:
            probs = F.one_hot(masks[t].long(), num_labels).permute(2, 0, 1)[1:].float()  # O x H x W
            memory = network.encode_memory(_pad(frames[t])[None].to(device), _pad(probs)[None].to(device))
            keys[t] = to_tokens(memory.key[0]).cpu()
        return keys[t]

    for t in annotated:
        if all(t <= f for f in firsts.values()):
            continue
        query = network.encode_query(_pad(frames[t])[None].to(device))
        size = (query.key.shape[-2], query.key.shape[-1])  # h, w of the keys
        q = to_tokens(query.key[0]).cpu()  # Lq x Ck
        for s in {t, *[f for f in annotated if f < t]}:
            if s not in shares:
                shares[s] = label_shares(_pad(masks[s]), num_labels, size)
        for o in objects:
            if firsts[o] >= t or float(shares[t][:, o].sum()) <= 0:
                continue  # not yet annotated, or not in view at t: nothing to read for
            for name, held in memory_frames(firsts[o], t, annotated, every).items():
                weights = read_weights(q, torch.cat([memory_key(s)[o - 1] for s in held]))
                precision, chance = target_read(weights, shares[t][:, o], torch.cat([shares[s][:, o] for s in held]))
                totals.setdefault(name, ProbeTotals()).add(precision, chance, sink_share(weights))
            if t == heatmap_frame:
                weights = read_weights(q, memory_key(firsts[o])[o - 1])
                target = shares[t][:, o]
                heatmaps[o] = {firsts[o]: (target @ weights / target.sum()).reshape(size).numpy()}
    return totals, heatmaps


def heatmap_picture(query_frame: np.ndarray, query_mask: np.ndarray, memory_frame: np.ndarray,
                    memory_mask: np.ndarray, heat: np.ndarray, obj: int) -> np.ndarray:
    """Two panels, H x 2W x 3 uint8: the query frame with target `obj` outlined, and the memory frame
    tinted by where that target's query pixels read (red: more weight), target outlined."""
    h, w = query_frame.shape[:2]
    hp, wp = h + (-h) % STRIDE, w + (-w) % STRIDE
    up = np.kron(heat / max(float(heat.max()), 1e-12), np.ones((STRIDE, STRIDE)))  # padded size
    top, left = (hp - h) // 2, (wp - w) // 2
    up = up[top: top + h, left: left + w, None]
    tinted = memory_frame.astype(np.float32) * (1 - 0.7 * up) + np.array([255.0, 0, 0]) * 0.7 * up
    return np.concatenate([_outline(query_frame, query_mask == obj), _outline(tinted, memory_mask == obj)], axis=1)


def _outline(frame: np.ndarray, region: np.ndarray) -> np.ndarray:
    out = frame.astype(np.float32).copy()
    inner = region.copy()
    inner[1:-1, 1:-1] = region[1:-1, 1:-1] & region[:-2, 1:-1] & region[2:, 1:-1] & region[1:-1, :-2] & region[1:-1, 2:]
    out[region & ~inner] = (255, 255, 0)
    return out.clip(0, 255).astype(np.uint8)
