"""Inference precision: exact fp32 by default (TF32 and reduced oneDNN modes off while it runs, the
caller's settings restored after), the memory's stored dtype following the precision, bad values named."""

from __future__ import annotations

import pytest
import torch

from stm_core.inference import InferenceCore
from stm_core.model.network import ModelConfig, STMNetwork
from stm_core.precision import PRECISIONS, exact_fp32


def tiny_network(kind: str = "stm") -> STMNetwork:
    torch.manual_seed(0)
    config = ModelConfig(kind=kind, decoder_dim=16, fusion_dim=8, norm="frozen_bn") if kind == "strmn" else ModelConfig(decoder_dim=16, norm="frozen_bn")
    return STMNetwork(config).eval()


def clip(frames: int = 4, size: int = 48) -> tuple[list[torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, size, size, generator=g) for _ in range(frames)]
    mask = torch.zeros(size, size, dtype=torch.long)
    mask[8:24, 10:30] = 1
    mask[28:40, 20:44] = 2
    return images, mask


def tf32_flags() -> tuple[bool, bool, str]:
    return (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
            torch.get_float32_matmul_precision())


@pytest.fixture()
def tf32_on():
    """A caller who asked for TF32 (as many training scripts do): inference must not keep it, nor undo it."""
    before = tf32_flags()
    torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision("high")  # TF32 matmuls
    yield tf32_flags()
    torch.backends.cudnn.allow_tf32, _, precision = before
    torch.set_float32_matmul_precision(precision)


def test_exact_fp32_turns_tf32_off_and_restores_the_callers_settings(tf32_on):
    assert tf32_on == (True, True, "high")
    with exact_fp32():
        assert tf32_flags() == (False, False, "highest")
    assert tf32_flags() == tf32_on


def test_the_callers_settings_come_back_after_an_error_inside(tf32_on):
    with pytest.raises(RuntimeError, match="inside"):
        with exact_fp32():
            raise RuntimeError("an error inside")
    assert tf32_flags() == tf32_on


def test_an_fp32_step_runs_with_tf32_off_and_leaves_it_as_it_was(tf32_on, monkeypatch):
    seen: list[tuple] = []
    original = InferenceCore._predict

    def predict(self, image, pad):
        seen.append(tf32_flags())
        return original(self, image, pad)

    monkeypatch.setattr(InferenceCore, "_predict", predict)
    images, mask = clip(3)
    core = InferenceCore(tiny_network(), "every:1", device="cpu")
    for t, image in enumerate(images):
        core.step(image, mask if t == 0 else None)
    core.close()
    assert seen and all(flags == (False, False, "highest") for flags in seen), seen
    assert tf32_flags() == tf32_on


def test_bf16_steps_leave_the_settings_alone(tf32_on, monkeypatch):
    seen: list[tuple] = []
    original = InferenceCore._predict
    monkeypatch.setattr(InferenceCore, "_predict",
                        lambda self, image, pad: (seen.append(tf32_flags()), original(self, image, pad))[1])
    images, mask = clip(2)
    core = InferenceCore(tiny_network(), "every:1", device="cpu", precision="bf16")
    for t, image in enumerate(images):
        core.step(image, mask if t == 0 else None)
    core.close()
    assert seen and all(flags == tf32_on for flags in seen)


def run_strmn(precision: str):
    images, mask = clip(5)
    core = InferenceCore(tiny_network("strmn"), "recurrent:3:C", device="cpu", precision=precision)
    for t, image in enumerate(images):
        core.step(image, mask if t == 0 else None)
    core.synchronize()
    slots = core._groups[0].memory.slots
    core.close()
    return slots


def test_fp32_stores_strmn_slots_in_fp32_and_never_rounds_them():
    slots = run_strmn("fp32")
    assert slots.feature.shape[2] == 3  # the memory is full: fused slots exist
    for tensor in slots:
        assert tensor.dtype == torch.float32
        rounded = tensor.to(torch.bfloat16).float()
        assert not torch.equal(tensor, rounded), "fp32 slots hold values bf16 cannot: they were not rounded"


def stm_memory(precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """-> the keys and values an STM every:1 memory stores after 3 frames at `precision`."""
    images, mask = clip(3)
    core = InferenceCore(tiny_network(), "every:1", device="cpu", precision=precision)
    for t, image in enumerate(images):
        core.step(image, mask if t == 0 else None)
    core.synchronize()
    key, value = core._groups[0].memory.keys_values()
    core.close()
    return key, value


def test_bf16_stores_the_memory_in_bf16():
    assert all(t.dtype == torch.bfloat16 for t in run_strmn("bf16"))
    key, value = stm_memory("bf16")
    assert key.dtype == value.dtype == torch.bfloat16


def test_fp32_memory_of_stm_is_fp32():
    key, value = stm_memory("fp32")
    assert key.dtype == value.dtype == torch.float32


@pytest.mark.parametrize("bad", ["fp16", "float", "FP32"])
def test_a_bad_precision_is_refused_with_the_choices(bad, capsys):
    from pipeline.cli import main
    from pipeline.evaluate.stage import EvaluateParams

    with pytest.raises(ValueError, match=f"{bad!r}.*{PRECISIONS!r}".replace("(", r"\(").replace(")", r"\)")):
        InferenceCore(tiny_network(), "every:5", device="cpu", precision=bad)
    with pytest.raises(ValueError, match="precision"):
        EvaluateParams(precision=bad)
    with pytest.raises(SystemExit) as exit_info:
        main(["segment", "--checkpoint", "x.pt", "--frames", "f", "--masks", "m", "--out", "o", "--precision", bad])
    assert exit_info.value.code == 2
    assert "--precision" in capsys.readouterr().err
