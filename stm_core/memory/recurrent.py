"""STRMN's recurrent memory of K template slots (Nguyen & Li, sec. 3.2), policy `recurrent:K:RULE`.

Slot 1 holds the first (ground-truth) frame's template and is never removed or changed. While
n < K a new template is appended. When n = K the memory first updates itself (memory-to-memory,
"M2M"): a pair (i, j), 1 < i < j, is chosen, template i is distilled into j by the Fusion Cell,
template i is removed, and only then is the new template appended, untouched, at the end. So
the memory always holds the ground truth and the latest frame, and never more than K slots.

Rules (slot numbers 1-based, as in the paper; the code is 0-based):
  A  i = 2 (oldest non-ground-truth), fused into every j in 3..K, then removed
  B  i = K (newest in memory), fused into every j in 2..K-1, then removed
  C  (i, j) = argmin_{1<i<j<=K} S(X_i, X_j): the least similar pair (the paper's best)
  D  (i, j) = argmax_{1<i<j<=K} S(X_i, X_j): the most similar pair
S is eq. 1-2 on the templates, or on the read keys when the Fusion Cell says `similarity="keys"`
(stm_core.model.fusion.token_similarity; `model.similarity`); ties go to the first
pair in row-major (i, j) order. Every object has its own memory (paper sec. 4.1.2), so pairs are
chosen per object: a group's O objects, and a training batch's B clips, are updated in one
batched gather / Fusion Cell call / index_put.

`recurrent-i2m:K` is the input-to-memory ablation (Table 3), the LSTM/NTM-style eq. 11: once
full, the new template X_t updates every slot j in 2..K directly, X_j <- Fusion(X_t -> X_j), and
X_t itself is not stored. Slot 1 stays the untouched ground truth, so the only difference from
M2M is the one the ablation measures: whether the newest template is kept intact.

The paper updates the memory at every time step (sec. 3.1: "the memory from previous time
step (t-1)"), so `wants()` is True for every frame.

One implementation serves inference and training: `update_slots` is functional and
out-of-place (slots are autograd tensors; the Fusion Cell gets gradients in a TBPTT segment);
`RecurrentMemory` is the inference wrapper with B = 1. Keys and values of the read are cached
per slot as tokens: a new template brings the key/value its memory encoding already computed,
fused slots are re-keyed with `network.template_key_value`, nothing else is recomputed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from stm_core.memory import register_policy
from stm_core.memory.base import Encoded, Memory
from stm_core.model.fusion import template_similarity, token_similarity
from stm_core.model.read import to_tokens

RULES = ("A", "B", "C", "D")  # the update rules (pick a pair, fuse one into the other)
I2M = "I2M"  # the input-to-memory ablation: the newest frame is fused, no pair is picked
STRMN_RULES = (*RULES, I2M)  # every rule a model is trained and evaluated with: the one list
KeyValueFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # ... x C x h x w -> key, value


class Slots(NamedTuple):
    """The memory of B clips x O objects, n slots each (slot 0 = ground truth)."""

    feature: torch.Tensor  # B x O x n x C x h x w: templates (memory encoder res4)
    key: torch.Tensor  # B x O x n x hw x Ck: read tokens of each slot
    value: torch.Tensor  # B x O x n x hw x Cv

    @classmethod
    def first(cls, feature: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> Slots:
        """One template per (clip, object): feature B x O x C x h x w, key/value B x O x C' x h x w."""
        return cls(feature[:, :, None], to_tokens(key)[:, :, None], to_tokens(value)[:, :, None])

    @property
    def size(self) -> int:
        return self.feature.shape[2]

    def tokens(self) -> tuple[torch.Tensor, torch.Tensor]:
        """-> keys B x O x (n*hw) x Ck, values B x O x (n*hw) x Cv for `STMNetwork.read` (views)."""
        return self.key.flatten(2, 3), self.value.flatten(2, 3)

    def detach(self) -> Slots:
        return Slots(*(x.detach() for x in self))

    def append(self, new: Slots) -> Slots:
        return Slots(*(torch.cat([x, y.to(x.dtype)], dim=2) for x, y in zip(self, new)))

    @property
    def nbytes(self) -> int:
        return sum(x.numel() * x.element_size() for x in self)


def parse_policy(policy: str) -> tuple[int, str]:
    """'recurrent:5:C' -> (5, 'C'); 'recurrent-i2m:5' -> (5, 'I2M'). Raises ValueError with the fix."""
    prefix, *args = policy.strip().split(":")
    if prefix == "recurrent":
        if len(args) != 2:
            raise ValueError(f"memory policy {policy!r}: expected recurrent:K:RULE, e.g. recurrent:5:C")
        capacity, rule = args[0], args[1].upper()
        if rule not in RULES:
            raise ValueError(f"memory policy {policy!r}: unknown update rule {args[1]!r}; choose one of {RULES}")
        minimum = 3  # a pair 1 < i < j needs two non-ground-truth slots
    elif prefix == "recurrent-i2m":
        if len(args) != 1:
            raise ValueError(f"memory policy {policy!r}: expected recurrent-i2m:K, e.g. recurrent-i2m:5")
        capacity, rule, minimum = args[0], I2M, 2
    else:
        raise ValueError(f"memory policy {policy!r} is not a recurrent (STRMN) policy")
    if not capacity.isdigit() or int(capacity) < minimum:
        raise ValueError(f"memory policy {policy!r}: K must be an integer >= {minimum}, got {capacity!r}")
    return int(capacity), rule


def select_update(rule: str, feature: torch.Tensor, key: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Which slot leaves and which slots it is fused into, per (clip, object), 0-based.

    feature: B x O x K x C x h x w (a full memory) -> source B x O, targets B x O x T
    (T = K-2 for rules A and B, 1 for C and D). key: B x O x K x hw x Ck read tokens: when given,
    rules C and D compare keys instead of templates.
    """
    b, o, k = feature.shape[:3]
    device = feature.device
    if rule == "A":
        source = torch.full((b, o), 1, device=device)
        targets = torch.arange(2, k, device=device).expand(b, o, -1)
    elif rule == "B":
        source = torch.full((b, o), k - 1, device=device)
        targets = torch.arange(1, k - 1, device=device).expand(b, o, -1)
    elif rule in ("C", "D"):
        with torch.no_grad():  # a discrete choice: no gradient to give
            if key is None:
                sim = template_similarity(feature[:, :, 1:].flatten(0, 1), upper=True)  # BO x M x M, j > i
            else:
                sim = token_similarity(key[:, :, 1:].flatten(0, 1), upper=True)
            score = sim if rule == "C" else -sim
            flat = score.nan_to_num(nan=float("inf")).flatten(1).argmin(dim=1)  # first minimum on ties
            m = k - 1
            source = (flat // m + 1).view(b, o)
            targets = (flat % m + 1).view(b, o, 1)
    else:
        raise ValueError(f"unknown update rule {rule!r}; choose one of {RULES}")
    return source, targets


def update_slots(
    slots: Slots,
    new: Slots,  # the new frame's template, n = 1
    capacity: int,
    rule: str,
    fusion: nn.Module,
    key_value: KeyValueFn,
) -> Slots:
    """One memory update step (out-of-place, differentiable). Returns a memory of <= capacity slots."""
    n = slots.size
    if n < capacity:
        return slots.append(new)
    if n > capacity:
        raise ValueError(f"memory holds {n} slots, more than its capacity {capacity}")
    b, o = slots.feature.shape[:2]
    device = slots.feature.device
    bi = torch.arange(b, device=device)[:, None, None]
    oi = torch.arange(o, device=device)[None, :, None]
    if rule == I2M:
        targets = torch.arange(1, n, device=device).expand(b, o, -1)
        source_feature = new.feature[:, :, 0]
    else:
        by_key = getattr(fusion, "similarity", "templates") == "keys"
        source, targets = select_update(rule, slots.feature, slots.key if by_key else None)
        source_feature = slots.feature[bi[..., 0], oi[..., 0], source]  # B x O x C x h x w
    t = targets.shape[-1]
    x_j = slots.feature[bi, oi, targets]  # B x O x T x C x h x w
    x_i = source_feature[:, :, None].expand(-1, -1, t, -1, -1, -1)
    fused = fusion(x_i, x_j)
    key, value = key_value(fused)
    updated = Slots(
        slots.feature.index_put((bi, oi, targets), fused.to(slots.feature.dtype)),
        slots.key.index_put((bi, oi, targets), to_tokens(key).to(slots.key.dtype)),
        slots.value.index_put((bi, oi, targets), to_tokens(value).to(slots.value.dtype)),
    )
    if rule == I2M:
        return updated
    ar = torch.arange(n - 1, device=device)
    keep = ar + (ar >= source[..., None]).long()  # B x O x (n-1): every slot but the source, in order
    return Slots(*(x[bi, oi, keep] for x in updated)).append(new)


class RecurrentMemory(Memory):
    """The K-slot memory of one object group at inference (B = 1 around `update_slots`)."""

    def __init__(self, capacity: int, rule: str, network, differentiable: bool = False):
        if getattr(network, "fusion", None) is None:
            raise ValueError(
                "recurrent memory policies need an STRMN network with a Fusion Cell "
                "(ModelConfig(kind='strmn')); this network has none"
            )
        if rule not in STRMN_RULES:
            raise ValueError(f"unknown update rule {rule!r}; choose one of {STRMN_RULES}")
        self.capacity = capacity
        self.rule = rule
        self.network = network
        self.differentiable = differentiable  # False: updates run without autograd (inference)
        self.slots: Slots | None = None

    def wants(self, frame_index: int) -> bool:
        return True

    def add(self, frame_index: int, encoded: Encoded, annotated: bool = False) -> None:
        """The first frame added becomes slot 1 (it should be the annotated one); later annotated
        frames of the same group are stored as ordinary templates."""
        new = Slots.first(*(x[None] for x in encoded))
        if self.slots is None:
            self.slots = new
            return
        with torch.set_grad_enabled(self.differentiable and torch.is_grad_enabled()):
            self.slots = update_slots(
                self.slots, new, self.capacity, self.rule, self.network.fusion, self.network.template_key_value
            )

    def keys_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.slots is None:
            raise RuntimeError("memory is empty: add an annotated frame first")
        key, value = self.slots.tokens()
        return key[0], value[0]

    @property
    def size(self) -> int:
        return 0 if self.slots is None else self.slots.size

    @property
    def nbytes(self) -> int:
        return 0 if self.slots is None else self.slots.nbytes


def _build(policy: str, args: list[str], network) -> RecurrentMemory:
    capacity, rule = parse_policy(policy)
    if network is None:
        raise ValueError(f"memory policy {policy!r} needs the STRMN network (its Fusion Cell): make_memory(policy, network)")
    return RecurrentMemory(capacity, rule, network)


register_policy("recurrent", _build)
register_policy("recurrent-i2m", _build)
