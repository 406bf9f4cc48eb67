"""STM memory policies keep exactly the frames they should."""

from __future__ import annotations

import pytest
import torch

from stm_core.memory import Encoded, make_memory, validate_policy


def frame_encoding(t: int, objects: int = 2) -> Encoded:
    """Keys tagged with the frame index so the memory's content can be read back."""
    key = torch.full((objects, 4, 2, 3), float(t))
    return Encoded(torch.zeros(objects, 8, 2, 3), key, key[:, :2] * 10)


def held_frames(memory) -> list[int]:
    keys, values = memory.keys_values()  # O x (T*hw) x C
    per_frame = keys[0, :, 0].reshape(-1, 6)[:, 0]
    assert torch.equal(values[0, :, 0].reshape(-1, 6)[:, 0], per_frame * 10)
    return sorted(int(t) for t in per_frame)


def run_policy(policy: str, n: int = 50) -> list[int]:
    memory = make_memory(policy)
    for t in range(n):
        if t == 0 or memory.wants(t):
            memory.add(t, frame_encoding(t), annotated=(t == 0))
    assert memory.size == len(held_frames(memory))
    return held_frames(memory)


@pytest.mark.parametrize(
    "policy,expected",
    [
        ("first", [0]),
        ("previous", [49]),
        ("first+previous", [0, 49]),
        ("every:5", [0, 5, 10, 15, 20, 25, 30, 35, 40, 45, 49]),
        ("every:7", [0, 7, 14, 21, 28, 35, 42, 49]),
        ("every:10", [0, 10, 20, 30, 40, 49]),
        ("fifo:4", [0, 47, 48, 49]),
        ("fifo:2", [0, 49]),
    ],
)
def test_policy_keeps_exactly_its_frames(policy: str, expected: list[int]):
    assert run_policy(policy) == expected


def test_every_n_holds_the_right_frames_at_each_step():
    memory = make_memory("every:5")
    for t in range(50):
        if t > 0:  # what frame t reads: first, every 5th before it, and the previous frame
            expected = sorted({s for s in range(0, t, 5)} | {t - 1})
            assert held_frames(memory) == expected, t
        memory.add(t, frame_encoding(t), annotated=(t == 0))


def test_first_policy_does_not_ask_for_encodings():
    memory = make_memory("first")
    memory.add(0, frame_encoding(0), annotated=True)
    assert not any(memory.wants(t) for t in range(1, 50))


def test_fifo_memory_is_bounded():
    memory = make_memory("fifo:5")
    for t in range(200):
        memory.add(t, frame_encoding(t), annotated=(t == 0))
        assert memory.size <= 5
    assert memory.nbytes > 0


def test_mid_video_annotation_is_pinned():
    memory = make_memory("first+previous")
    memory.add(0, frame_encoding(0), annotated=True)
    memory.add(1, frame_encoding(1))
    memory.add(2, frame_encoding(2), annotated=True)
    memory.add(3, frame_encoding(3))
    assert held_frames(memory) == [0, 2, 3]


@pytest.mark.parametrize("bad", ["every", "every:0", "every:x", "fifo:1", "first:3", "nope", "lru:3"])
def test_bad_policies_are_clear_errors(bad: str):
    with pytest.raises(ValueError, match="memory policy"):
        validate_policy(bad)
