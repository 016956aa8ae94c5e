"""Bilinear x2 upsampling (``align_corners=True``, the U-Net's Up blocks) whose backward gathers.

The forward is PyTorch's own ``F.interpolate``. Its backward scatters: every output pixel adds its two
weighted taps per axis into the input gradient, which ``torch.compile`` lowers to an atomic
``index_put`` (accumulate). On an H100 that scatter took 0.52 ms of a 13.4 ms NCHW training step
and 1.44 ms of a 14.0 ms channels_last one (bench/results/2026-11-27-h100-80gb-hbm3-profile-fast.json).
Under ``torch.compile`` the backward is the transpose written as a gather, one axis at a time: each
input index ``i`` sums the ``K`` output indices that can read it, with the forward's own weights (zero
where an output does not read ``i``). That is K index-and-multiply terms per axis, with no atomics, which Inductor
can fuse in either memory layout; plain PyTorch, so it needs no Triton. Run eagerly, those are K
small passes per axis, so outside ``torch.compile`` the backward stays PyTorch's own kernel.

The weights repeat the forward's fp32 arithmetic (``scale = (I-1)/(O-1)``, ``src = scale*o``,
``i0 = floor(src)``, ``lambda = src - i0``, the second tap ``min(i0+1, I-1)``), so the gradient is the
transpose of the forward as PyTorch computes it in fp32 (autocast runs this op in fp32; Inductor's
decomposition of a bf16 forward without autocast rounds src in bf16); it is summed in fp32.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["upsample_bilinear2x", "gather_backward"]


def _taps(size_in: int, device, acc: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(o, w, K) for one axis: o (size_in, K) the output indices that may read input i (clamped into
    range), w (size_in, K) their weights on i in the forward's arithmetic ``acc`` (zero for indices
    that do not read it), and K."""
    size_out = 2 * size_in
    if size_in == 1:  # scale 0: both outputs copy the one input
        return torch.arange(2, device=device)[None, :], torch.ones(1, 2, device=device, dtype=acc), 2
    ratio = (size_out - 1) / (size_in - 1)  # outputs per input step: src covers [i-1, i+1) over 2*ratio of them
    k = math.ceil(2 * ratio) + 3  # + the rounding slack at both ends and the floor of lo below
    scale = torch.tensor((size_in - 1) / (size_out - 1), dtype=acc, device=device)  # rounded as the forward's
    i = torch.arange(size_in, device=device)
    lo = ((i - 1) * (size_out - 1)).div(size_in - 1, rounding_mode="floor").sub(1).clamp(min=0)
    o = lo[:, None] + torch.arange(k, device=device)[None, :]
    valid = o < size_out
    o = o.clamp(max=size_out - 1)
    src = o.to(acc) * scale
    i0 = src.to(torch.long)  # src >= 0: truncation is the floor
    lam = src - i0.to(acc)
    i1 = (i0 + 1).clamp(max=size_in - 1)
    w = (i0 == i[:, None]).to(acc) * (1 - lam) + (i1 == i[:, None]).to(acc) * lam
    return o, torch.where(valid, w, torch.zeros_like(w)), k


def _gather_transpose(g: torch.Tensor, dim: int) -> torch.Tensor:
    """The transpose of the forward's interpolation along ``dim`` (of size 2*I) applied to g: size I."""
    o, w, k = _taps(g.shape[dim] // 2, g.device, g.dtype)
    shape = [1] * g.dim()
    shape[dim] = o.shape[0]
    out = 0
    for j in range(k):
        out = out + g.index_select(dim, o[:, j]) * w[:, j].reshape(shape)
    return out


def gather_backward(dy: torch.Tensor, dtype: torch.dtype, memory_format: torch.memory_format) -> torch.Tensor:
    """The input gradient of the x2 upsampling for output gradient ``dy``, summed in the forward's
    opmath type, returned in ``dtype`` and ``memory_format`` (index_select's output is NCHW: an NHWC
    step must stay NHWC)."""
    acc = torch.float64 if dy.dtype == torch.float64 else torch.float32
    return _gather_transpose(_gather_transpose(dy.to(acc), 2), 3).to(dtype, memory_format=memory_format)


class _UpsampleBilinear2x(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        # the input's layout, read here: the gradient that comes back is a slice of the concat's,
        # channels_last-strided but not channels_last-contiguous
        ctx.dtype, ctx.fmt = x.dtype, (torch.channels_last if x.is_contiguous(memory_format=torch.channels_last)
                                       and not x.is_contiguous() else torch.contiguous_format)
        ctx.size = x.shape
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)

    @staticmethod
    def backward(ctx, dy):
        if torch.compiler.is_compiling():  # the gather is for the compiler; eagerly it is 2K small passes
            return gather_backward(dy, ctx.dtype, ctx.fmt)
        dx = torch.ops.aten.upsample_bilinear2d_backward(dy, dy.shape[2:], ctx.size, True, None, None)
        return dx.to(ctx.dtype, memory_format=ctx.fmt)


def upsample_bilinear2x(x: torch.Tensor) -> torch.Tensor:
    """``F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)`` for (N, C, H, W) x,
    NCHW or channels_last: the same forward; under torch.compile, a gather backward."""
    if x.dim() != 4:
        raise ValueError(f"expected (N, C, H, W), got shape {tuple(x.shape)}")
    return _UpsampleBilinear2x.apply(x)
