"""The paper's U-Net (section 3.2): ``model(x, t) -> eps``. It knows nothing about diffusion.

One module tree serves both paths. Every normalisation goes through ``GroupNormGELU``, which on the
"torch" path is plain eager PyTorch (the spec) and on the "triton" path calls one fused kernel
(GroupNorm, residual add, GELU and the time-encoding addition in one pass); on the "triton" path the
Up blocks' upsampling also takes a backward that gathers instead of scattering (the same forward).
``UNet.set_kernels`` is the single switch.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

KERNEL_CHOICES = ("auto", "triton", "torch")


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def auto_kernels(is_cuda: bool) -> str:
    """What kernels="auto" means on a device: Triton on CUDA (where Triton is installed), torch elsewhere."""
    return "triton" if is_cuda and _triton_installed() else "torch"


def _check_triton(device) -> None:
    from fastddpm.errors import UsageError
    from fastddpm.kernels import unavailable_reason

    reason = unavailable_reason(device)
    if reason:
        raise UsageError(f"kernels='triton' on {device}: {reason}")


def time_encoding(t: torch.Tensor, channels: int) -> torch.Tensor:
    """Sinusoidal encoding of the time step, shape (N, channels), in fp32.

    Eq. 11 with the minus sign the printed exponent lost: channel c has frequency
    10000^(-2*floor(c/2)/C); even channels take sin, odd channels cos.
    """
    c = torch.arange(channels, device=t.device)
    freq = torch.exp((c // 2 * 2).float() * (-math.log(10000.0) / channels))
    angle = t.float()[:, None] * freq[None, :]
    return torch.where(c % 2 == 0, torch.sin(angle), torch.cos(angle))


class GroupNormGELU(nn.GroupNorm):
    """``y = GN(x)``, then ``+ residual``, then ``GELU`` (if ``gelu``), then ``+ time_encoding(t)``.

    Covers every normalisation of the U-Net: GN->GELU inside a DoubleConv, GELU(x + GN(h)) at the
    end of a residual DoubleConv, GN alone at the end of a DoubleConv, and GN + time encoding at
    the end of a Down/Up block (so the fused kernel never materialises the broadcast encoding).
    """

    def __init__(self, num_groups: int, num_channels: int, gelu: bool = True, eps: float = 1e-5):
        super().__init__(num_groups, num_channels, eps=eps)
        self.gelu = gelu
        self.kernels = "torch"

    def forward(self, x, residual=None, t=None):
        if self.kernels == "triton":
            from fastddpm.kernels.groupnorm_gelu import group_norm_gelu

            return group_norm_gelu(x, self.weight, self.bias, self.num_groups, self.eps,
                                   residual=residual, t=t, gelu=self.gelu)
        y = F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        if residual is not None:
            y = residual + y
        if self.gelu:
            y = F.gelu(y)
        if t is not None:
            y = y + time_encoding(t, y.shape[1]).to(y.dtype)[:, :, None, None]
        return y

    def extra_repr(self):
        return super().extra_repr() + f", gelu={self.gelu}"


class DoubleConv(nn.Module):
    """conv3x3 -> GN -> GELU -> conv3x3 -> GN; with ``residual``, ``GELU(x + block(x))``."""

    def __init__(self, in_ch: int, out_ch: int, mid_ch: int | None = None, residual: bool = False):
        super().__init__()
        mid_ch = mid_ch or out_ch
        if residual and in_ch != out_ch:
            raise ValueError("a residual DoubleConv keeps its channel count")
        self.residual = residual
        self.conv1 = nn.Conv2d(in_ch, mid_ch, 3, padding=1, bias=False)
        self.norm1 = GroupNormGELU(1, mid_ch, gelu=True)
        self.conv2 = nn.Conv2d(mid_ch, out_ch, 3, padding=1, bias=False)
        self.norm2 = GroupNormGELU(1, out_ch, gelu=residual)

    def forward(self, x, t=None):
        h = self.norm1(self.conv1(x))
        return self.norm2(self.conv2(h), residual=x if self.residual else None, t=t)


class Down(nn.Module):
    """MaxPool 2x2, a residual DoubleConv, a channel-changing DoubleConv; then + time encoding."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.pool = nn.MaxPool2d(2)
        self.conv_res = DoubleConv(in_ch, in_ch, residual=True)
        self.conv_out = DoubleConv(in_ch, out_ch)

    def forward(self, x, t):
        return self.conv_out(self.conv_res(self.pool(x)), t=t)


class Up(nn.Module):
    """Bilinear x2, concat with the skip, a residual DoubleConv, a DoubleConv to ``out_ch`` (middle
    width in/2); then + time encoding."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv_res = DoubleConv(in_ch, in_ch, residual=True)
        self.conv_out = DoubleConv(in_ch, out_ch, mid_ch=in_ch // 2)
        self.kernels = "torch"

    def forward(self, x, skip, t):
        if self.kernels == "triton":  # the same upsampling, its backward a gather (no atomic scatter)
            from fastddpm.kernels.upsample_bilinear import upsample_bilinear2x

            x = upsample_bilinear2x(x)
        else:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        x = torch.cat([skip, x], dim=1)
        return self.conv_out(self.conv_res(x), t=t)


def _cpu_attention_backend(x: torch.Tensor):
    """On the CPU, PyTorch's math attention: at these lengths (16 and 64 tokens) its flash kernel's
    backward is slow, 20 % of a tiny-preset bf16 training step at batch 16 (the math one: 51 instead
    of 59 ms a step, 127 instead of 168 at batch 64, measured on this project's 2-core CPU). GPUs
    keep PyTorch's own choice; so does torch.compile, which picks its own kernels."""
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


class SelfAttention(nn.Module):
    """LayerNorm -> 4-head attention (+ residual) -> LayerNorm -> Linear -> GELU -> Linear (+ residual)."""

    def __init__(self, channels: int, size: int, heads: int = 4):
        super().__init__()
        self.channels, self.size = channels, size
        self.ln = nn.LayerNorm(channels)
        self.mha = nn.MultiheadAttention(channels, heads, batch_first=True)
        self.ff = nn.Sequential(nn.LayerNorm(channels), nn.Linear(channels, channels), nn.GELU(),
                                nn.Linear(channels, channels))

    def forward(self, x):
        n, c, h, w = x.shape
        seq = x.flatten(2).transpose(1, 2)  # (N, HW, C)
        q = self.ln(seq)
        # need_weights=False keeps the fused scaled-dot-product path (no HWxHW matrix is returned).
        with _cpu_attention_backend(x):
            seq = self.mha(q, q, q, need_weights=False)[0] + seq
        seq = self.ff(seq) + seq
        # (N, H, W, C) memory seen as (N, C, H, W): channels_last, without a copy. Through reshape, so that
        # a batch of 1 gets the canonical batch stride too: attention's output gives it C, and with that
        # stride cat and interpolate, which read a layout from the strides, allocated NCHW in NHWC runs.
        return seq.reshape(n, h, w, c).permute(0, 3, 1, 2)


class UNet(nn.Module):
    """The paper's U-Net. ``base_channels=64`` is the paper's model (12,920,323 parameters).

    ``forward(x, t)``: x is (N, 3, 32, 32) in [-1, 1], t the integer step index in [0, T) (a tensor
    of shape (N,)); returns the predicted noise, shape of x.
    """

    def __init__(self, base_channels: int = 64, in_channels: int = 3, kernels: str = "auto"):
        super().__init__()
        b = base_channels
        if not isinstance(b, int) or b < 4 or b % 4:
            raise ValueError(f"base_channels={b!r}: must be a positive multiple of 4 (4 attention heads)")
        if not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels={in_channels!r}: must be a positive integer")
        self.base_channels = b
        self.inc = DoubleConv(in_channels, b)
        self.down1 = Down(b, 2 * b)
        self.down2 = Down(2 * b, 4 * b)
        self.sa1 = SelfAttention(4 * b, 8)
        self.down3 = Down(4 * b, 4 * b)
        self.sa2 = SelfAttention(4 * b, 4)
        self.up1 = Up(8 * b, 2 * b)
        self.sa3 = SelfAttention(2 * b, 8)
        self.up2 = Up(4 * b, b)
        self.up3 = Up(2 * b, b)
        self.outc = nn.Conv2d(b, in_channels, 1)
        self.set_kernels(kernels)

    def set_kernels(self, kernels: str) -> "UNet":
        """Choose the GroupNormGELU implementation (and the Up blocks' upsampling backward): "torch"
        (eager reference), "triton" (fused kernels) or "auto" (Triton on CUDA, torch elsewhere,
        decided at each forward)."""
        if kernels not in KERNEL_CHOICES:
            raise ValueError(f"kernels={kernels!r}: choose one of {', '.join(KERNEL_CHOICES)}")
        self.kernels = kernels
        self._apply_kernels(auto_kernels(self.outc.weight.is_cuda) if kernels == "auto" else kernels)
        return self

    def _apply_kernels(self, path: str):
        self._path = path
        for m in self.modules():
            if isinstance(m, (GroupNormGELU, Up)):
                m.kernels = path

    def _apply(self, fn, recurse=True):
        # "auto" follows the device when the model moves (.to/.cuda), so that a compiled forward
        # never has to switch paths itself.
        module = super()._apply(fn, recurse)
        if self.kernels == "auto":
            self._apply_kernels(auto_kernels(self.outc.weight.is_cuda))
        return module

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.kernels == "auto" and self._path != auto_kernels(x.is_cuda):
            self._apply_kernels(auto_kernels(x.is_cuda))
        if self._path == "triton" and not x.is_cuda and not torch.compiler.is_compiling():
            _check_triton(x.device)  # one clear line, not an error from deep inside Triton's launcher
        x1 = self.inc(x)
        x2 = self.down1(x1, t)
        x3 = self.sa1(self.down2(x2, t))
        x4 = self.sa2(self.down3(x3, t))
        x = self.sa3(self.up1(x4, x3, t))
        x = self.up2(x, x2, t)
        x = self.up3(x, x1, t)
        return self.outc(x)
