"""The SDPA kernel each attention call claims (`READ_KERNELS`, `FAM_KERNELS`) really serves it: the
call runs with only that backend allowed, which raises when the kernel cannot take its inputs."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from stm_core.model.fusion import FAM_KERNELS, FusionCell, fam
from stm_core.model.read import READ_KERNELS, memory_read, to_tokens

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]
DTYPES = [torch.float32, torch.bfloat16]


def only(backend: SDPBackend):
    return sdpa_kernel([backend])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_the_read_runs_on_the_kernel_it_claims_and_flash_refuses_its_widths(device, dtype):
    g = torch.Generator().manual_seed(0)
    # ResNet-50's widths (keys 128, values 512), as the network hands them over: tokens of NCHW maps.
    qk = torch.randn(2, 128, 6, 7, generator=g).to(device, dtype)
    mk = torch.randn(2, 128, 3 * 6 * 7, 1, generator=g).to(device, dtype)
    mv = torch.randn(2, 512, 3 * 6 * 7, 1, generator=g).to(device, dtype)
    q, k, v = to_tokens(qk), to_tokens(mk), to_tokens(mv)
    with only(READ_KERNELS[device]):
        claimed = memory_read(q, k, v)
    with only(SDPBackend.MATH):
        reference = memory_read(q, k, v)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(claimed.float(), reference.float(), atol=tol, rtol=tol)
    with only(SDPBackend.FLASH_ATTENTION), pytest.raises(RuntimeError):
        memory_read(q, k, v)  # widths 128 vs 512: flash cannot serve, on any device


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_fam_runs_on_the_kernel_it_claims(device, dtype, channels_last):
    g = torch.Generator().manual_seed(1)
    xa = torch.randn(3, 64, 5, 6, generator=g).to(device, dtype)
    xb = torch.randn(3, 64, 5, 6, generator=g).to(device, dtype)
    if channels_last:
        xa, xb = xa.to(memory_format=torch.channels_last), xb.to(memory_format=torch.channels_last)
    with only(FAM_KERNELS[device]):
        claimed = fam(xa, xb, 64 ** -0.5)
    with only(SDPBackend.MATH):
        reference = fam(xa, xb, 64 ** -0.5)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(claimed.float(), reference.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("device", DEVICES)
def test_the_fusion_cell_trains_through_its_claimed_kernel(device):
    """Forward and backward of the whole cell with only FAM's kernel allowed (training takes it too)."""
    cell = FusionCell(32, hidden=8).to(device)
    x_i = torch.randn(2, 32, 4, 5, device=device, requires_grad=True)
    x_j = torch.randn(2, 32, 4, 5, device=device)
    with only(FAM_KERNELS[device]):
        out = cell(x_i, x_j)
        out.square().mean().backward()
    assert out.shape == x_j.shape and x_i.grad is not None and torch.isfinite(x_i.grad).all()
