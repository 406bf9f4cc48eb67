"""Inference-only fast path: frozen BatchNorm folded into the convolution in front of it,
3x3 convolutions by Winograd on CPU (`WinogradConv2d`), and the stems' max-pool as separable
maxima (`MaxPoolAfterReLU`).

Frozen BatchNorm is an affine map per channel, y = (x - mean) * s + beta with
s = gamma / sqrt(var + eps), so `bn(conv(x))` equals one convolution with weights W * s and bias
(b - mean) * s + beta: one pass over the activations instead of three (torchvision's
FrozenBatchNorm2d recomputes s and runs x * s + b on every call). The result differs from the
unfolded network only by float rounding (~1e-6 relative in fp32). The folded network has no
BatchNorm parameters left, so it is for inference only: never train or save it.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import FrozenBatchNorm2d


def _affine(bn: FrozenBatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (scale, shift): bn(x) == x * scale + shift, per channel."""
    scale = bn.weight * (bn.running_var + bn.eps).rsqrt()
    return scale, bn.bias - bn.running_mean * scale


@torch.no_grad()
def fold_into(convs: list[nn.Conv2d], bn: FrozenBatchNorm2d) -> None:
    """Fold `bn` into convs whose outputs are summed before it (bn(sum of convs)); the first gets the shift."""
    scale, shift = _affine(bn)
    for i, conv in enumerate(convs):
        conv.weight.mul_(scale.view(-1, 1, 1, 1))
        bias = conv.bias * scale if conv.bias is not None else torch.zeros_like(shift)
        if i == 0:
            bias = bias + shift
        if conv.bias is None:
            conv.bias = nn.Parameter(bias, requires_grad=False)
        else:
            conv.bias.copy_(bias)


def fold_batchnorm_(module: nn.Module) -> int:
    """Fold every frozen BatchNorm that directly follows a conv (ResNet blocks, stems, downsample
    paths) into it and replace it with Identity, in place. Returns how many were folded."""
    folded = 0
    for parent in module.modules():
        children = list(parent.named_children())
        for (_, prev), (name, child) in zip(children, children[1:]):
            if isinstance(child, FrozenBatchNorm2d) and isinstance(prev, nn.Conv2d):
                fold_into([prev], child)
                setattr(parent, name, nn.Identity())
                folded += 1
    return folded


# (input shape, weight shape, threads) -> whether NNPACK's Winograd beat oneDNN on this machine
_WINOGRAD_FASTER: dict[tuple, bool] = {}
# "auto": time both kernels per shape and keep the faster (fastest; which one wins can depend on the
# machine's load, so two runs may round differently); "off": oneDNN only, the same kernels every run.
WINOGRAD_MODES = ("auto", "off")
_winograd_mode = "auto"


def set_winograd_mode(mode: str) -> None:
    """Choose how WinogradConv2d picks its kernel for this process (see WINOGRAD_MODES).

    Like `cudnn.benchmark`, "auto" times the candidates, so the kernel behind a shape can differ
    between runs: Winograd rounds differently (~1e-5 relative), and a policy that feeds its own
    predictions back (`previous`) can turn that into different masks. "off" makes re-runs repeat.
    """
    global _winograd_mode
    if mode not in WINOGRAD_MODES:
        raise ValueError(f"unknown Winograd mode {mode!r}; choose one of {WINOGRAD_MODES}")
    _winograd_mode = mode


def winograd_mode() -> str:
    return _winograd_mode


_nnpack_claimed = False


def claim_nnpack_threads(threads: int) -> None:
    """Create NNPACK's thread pool with `threads` threads, if this is the process's first NNPACK call.

    PyTorch creates that pool once per process, at the first NNPACK call, with the calling thread's
    torch thread count, and never resizes it: later claims, and claims after any other NNPACK call,
    change nothing. On 2 cores NNPACK's Winograd runs about as fast on one thread as on two (its pool
    and OpenMP's spinning workers compete), and a 2-thread pool beside another busy thread
    oversubscribes the cores: `InferenceCore`'s overlap claims one lane's share before its first frame.
    """
    global _nnpack_claimed
    if _nnpack_claimed or not torch.backends.nnpack.is_available():
        return
    _nnpack_claimed = True
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():  # the smallest call NNPACK accepts creates the pool
            torch._nnpack_spatial_convolution(torch.zeros(1, 8, 8, 8), torch.zeros(8, 8, 3, 3), torch.zeros(8),
                                              [1, 1], [1, 1])
    finally:
        torch.set_num_threads(before)


def _best_seconds(fn, x: torch.Tensor, repeats: int = 2) -> float:
    fn(x)  # warm-up: first calls allocate and pack weights
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn(x)
        best = min(best, time.perf_counter() - start)
    return best


class WinogradConv2d(nn.Conv2d):
    """A 3x3, stride-1 convolution run by NNPACK's Winograd kernels on CPU in fp32 inference, where
    that is faster.

    Winograd computes the same convolution with ~2-4x fewer multiplications; its rounding differs
    (fp32: ~1e-5 relative). Whether it wins depends on the shape and the thread count: on a 2-core
    AVX2 VM it is 2-3x faster than oneDNN for 256 channels at 60x108, but 2x slower at 15x27 with 2
    threads (oneDNN parallelises small maps better). So, like `cudnn.benchmark`, the first call per
    (input shape, weight shape, thread count) times both and remembers the faster one for the
    process. NNPACK's batched path uses a slower algorithm, so batches run one image at a time.
    Anywhere else (GPU, autograd, other dtypes, `set_winograd_mode("off")`) it is a plain Conv2d.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # N x Cin x H x W -> N x Cout x H x W
        if (x.device.type != "cpu" or x.dtype != torch.float32 or (torch.is_grad_enabled() and x.requires_grad)
                or _winograd_mode == "off"):
            return super().forward(x)
        key = (tuple(x.shape), tuple(self.weight.shape), torch.get_num_threads())
        faster = _WINOGRAD_FASTER.get(key)
        if faster is None:
            faster = _WINOGRAD_FASTER[key] = _best_seconds(self._winograd, x) < _best_seconds(super().forward, x)
        return self._winograd(x) if faster else super().forward(x)

    def _winograd(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()  # NNPACK reads NCHW
        # NNPACK takes numeric padding only; a "same"/"valid" conv fails here
        assert not isinstance(self.padding, str), f"winograd conv needs numeric padding, got {self.padding!r}"
        out = [torch._nnpack_spatial_convolution(x[i : i + 1], self.weight, self.bias, self.padding, self.stride)
               for i in range(x.shape[0])]
        return out[0] if len(out) == 1 else torch.cat(out)


def winograd_convs_(module: nn.Module) -> int:
    """Swap every eligible conv (3x3, stride 1, no dilation or groups, numeric zero padding: what
    NNPACK takes) for a WinogradConv2d, in place."""
    if not torch.backends.nnpack.is_available():
        return 0
    swapped = 0
    for conv in module.modules():
        if (type(conv) is nn.Conv2d and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
                and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
                and not isinstance(conv.padding, str)):  # "same"/"valid" stay plain convs
            conv.__class__ = WinogradConv2d  # same parameters, only forward differs: no copy
            conv.weight.data = conv.weight.data.contiguous()
            swapped += 1
    return swapped


class MaxPoolAfterReLU(nn.Module):
    """ResNet's stem max-pool (3x3, stride 2, padding 1) for inputs >= 0, as two separable passes
    of strided maxima over a zero-padded copy.

    After a ReLU, zero padding is never larger than a window's values, so this equals
    `F.max_pool2d(x, 3, 2, 1)` bit for bit (a max does not round). PyTorch's NCHW CPU max-pool
    is about 4x slower (1 x 64 x 120 x 216, one thread: 14.0 against 3.5 ms).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # N x C x H x W (>= 0) -> N x C x ceil(H/2) x ceil(W/2)
        oh, ow = (x.shape[-2] + 1) // 2, (x.shape[-1] + 1) // 2
        p = F.pad(x, (1, 1, 1, 1))
        rows = torch.maximum(torch.maximum(p[..., 0 : 2 * oh : 2, :], p[..., 1 : 2 * oh + 1 : 2, :]),
                             p[..., 2 : 2 * oh + 2 : 2, :])
        return torch.maximum(torch.maximum(rows[..., 0 : 2 * ow : 2], rows[..., 1 : 2 * ow + 1 : 2]),
                             rows[..., 2 : 2 * ow + 2 : 2])


def _is_stem_pool(m: nn.Module) -> bool:
    return (isinstance(m, nn.MaxPool2d) and m.kernel_size in (3, (3, 3)) and m.stride in (2, (2, 2))
            and m.padding in (1, (1, 1)) and m.dilation in (1, (1, 1)) and not m.ceil_mode
            and not m.return_indices)


def stem_maxpools_(module: nn.Module) -> int:
    """Swap each stem max-pool that directly follows a ReLU in a Sequential for MaxPoolAfterReLU."""
    swapped = 0
    for parent in module.modules():
        if not isinstance(parent, nn.Sequential):
            continue
        for i in range(1, len(parent)):
            if isinstance(parent[i - 1], nn.ReLU) and _is_stem_pool(parent[i]):
                parent[i] = MaxPoolAfterReLU()
                swapped += 1
    return swapped
