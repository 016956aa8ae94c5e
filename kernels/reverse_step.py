"""The DDPM reverse step (eq. 5) in one pass, with its Gaussian noise drawn in-kernel.

    x_{t-1} = (x_t - beta_t / sqrt(1 - alpha_bar_t) * eps) / sqrt(alpha_t) + sigma_t * z,   z ~ N(0, I)

x_t and eps are read once and x_{t-1} written once. The step index t and the seed are read from
device tensors, and the coefficients from fp32 tables of length T indexed by t inside the kernel, so
one captured CUDA graph replayed T times (t updated in place) draws fresh noise at every step.

z comes from Philox4x32-10 keyed by the seed with counter (element index lo, element index hi, t,
NOISE_STREAM): it depends on (seed, t, global element index) only, so sampling n images in batches
of any size (each batch passing its ``offset``) draws the same noise for image i. z = 0 at the last
step (t == 0).

Why the fourth counter word is a constant tag, not 0: x_T comes from ``torch.randn`` on a CUDA
generator seeded with the same seed, and PyTorch's CUDA randn runs the same Philox4x32-10 with the
same key. Its counters are (offset / 4 lo, offset / 4 hi, thread index lo, thread index hi): curand's
``curand_init(seed, subsequence=thread index, offset)`` (curand_philox4x32_x.h: skipahead_sequence
adds the subsequence to words 2-3, skipahead the offset to words 0-1), called from ATen's
distribution kernels (aten/src/ATen/native/cuda/DistributionTemplates.h). No GPU has 2**32 threads
in a grid, so PyTorch's fourth word is always 0; Triton's ``tl.rand``/``tl.randn`` (Inductor's random
ops) pass 0 there too. A nonzero fourth word makes this stream disjoint from both by construction.
With 0 there, z at step t and x_T shared Philox blocks wherever t equalled a thread index.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import triton
import triton.language as tl

__all__ = ["reverse_step", "reverse_step_noise", "NOISE_STREAM"]

_BLOCK = 1024
NOISE_STREAM = 0x46445050  # the fourth Philox counter word of every draw here; never 0 (see above)
_NOISE_STREAM = tl.constexpr(NOISE_STREAM)  # what a @triton.jit function may read (globals must be constexpr)


@triton.jit
def _step_noise(seed, t, idx):
    """z ~ N(0, 1) for global element ``idx`` at step ``t`` (0 at t == 0): one Philox draw per
    element, Box-Muller on its first two words."""
    lo = idx.to(tl.uint32)  # wraps: the low 32 bits
    hi = (idx >> 32).to(tl.uint32)
    zero = lo * 0
    r0, r1, _, _ = tl.philox(seed, lo, hi, zero + t.to(tl.uint32), zero + _NOISE_STREAM)
    z, _ = tl.pair_uniform_to_normal(tl.uint_to_uniform_float(r0), tl.uint_to_uniform_float(r1))
    return tl.where(t > 0, z, 0.0)


@triton.jit
def _reverse_step_kernel(X, EPS, OUT, T, SEED, INV_SQRT_ALPHA, EPS_COEF, SIGMA, numel, OFFSET, clip,
                         HAS_CLIP: tl.constexpr, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < numel
    t = tl.load(T)
    x = tl.load(X + idx, mask=mask, other=0.0).to(tl.float32)
    eps = tl.load(EPS + idx, mask=mask, other=0.0).to(tl.float32)
    # eq. 5: posterior mean from the predicted noise, plus sigma_t * z (sigma_t^2 = beta_t)
    x_prev = (x - tl.load(EPS_COEF + t) * eps) * tl.load(INV_SQRT_ALPHA + t)
    x_prev += tl.load(SIGMA + t) * _step_noise(tl.load(SEED), t, tl.load(OFFSET) + idx)
    if HAS_CLIP:
        x_prev = tl.minimum(tl.maximum(x_prev, -clip), clip)
    tl.store(OUT + idx, x_prev.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _noise_kernel(Z, T, SEED, numel, OFFSET, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Z + idx, _step_noise(tl.load(SEED), tl.load(T), tl.load(OFFSET) + idx), mask=idx < numel)


def _index_tensor(v: Union[int, torch.Tensor], device) -> torch.Tensor:
    """A 1-element int64 device tensor (Python ints are accepted for convenience; CUDA graphs need
    tensors updated in place)."""
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise ValueError(f"expected a 1-element tensor, got shape {tuple(v.shape)}")
        return v.reshape(1).to(device=device, dtype=torch.int64)
    if torch.device(device).type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise ValueError("inside CUDA-graph capture, pass t, seed and offset as 1-element int64 device tensors "
                         "(a Python int would be copied to the GPU at capture time and frozen into the graph)")
    return torch.tensor([int(v)], device=device, dtype=torch.int64)


def _launch(x_t, eps, t, seed, inv_sqrt_alpha, eps_coef, sigma, offset, clip, out):
    n = x_t.numel()
    _reverse_step_kernel[(triton.cdiv(n, _BLOCK),)](
        x_t, eps, out, t, seed, inv_sqrt_alpha, eps_coef, sigma, n, offset,
        0.0 if clip is None else float(clip), HAS_CLIP=clip is not None, BLOCK=_BLOCK)


@torch.library.custom_op("fastddpm::reverse_step", mutates_args=())
def _reverse_step_op(x_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, seed: torch.Tensor,
                     inv_sqrt_alpha: torch.Tensor, eps_coef: torch.Tensor, sigma: torch.Tensor,
                     offset: torch.Tensor, clip: Optional[float]) -> torch.Tensor:
    out = torch.empty_like(x_t, memory_format=torch.contiguous_format)
    _launch(x_t, eps, t, seed, inv_sqrt_alpha, eps_coef, sigma, offset, clip, out)
    return out


@_reverse_step_op.register_fake
def _(x_t, eps, t, seed, inv_sqrt_alpha, eps_coef, sigma, offset, clip):
    return torch.empty_like(x_t, memory_format=torch.contiguous_format)


@torch.library.custom_op("fastddpm::reverse_step_out", mutates_args=("out",))
def _reverse_step_out_op(x_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, seed: torch.Tensor,
                         inv_sqrt_alpha: torch.Tensor, eps_coef: torch.Tensor, sigma: torch.Tensor,
                         offset: torch.Tensor, clip: Optional[float], out: torch.Tensor) -> None:
    _launch(x_t, eps, t, seed, inv_sqrt_alpha, eps_coef, sigma, offset, clip, out)


@_reverse_step_out_op.register_fake
def _(x_t, eps, t, seed, inv_sqrt_alpha, eps_coef, sigma, offset, clip, out):
    return None


def reverse_step(x_t: torch.Tensor, eps: torch.Tensor, t: Union[int, torch.Tensor],
                 seed: Union[int, torch.Tensor], *, inv_sqrt_alpha: torch.Tensor, eps_coef: torch.Tensor,
                 sigma: torch.Tensor, offset: Union[int, torch.Tensor] = 0, clip: Optional[float] = None,
                 out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x_{t-1} by eq. 5, with z drawn in-kernel (see ``reverse_step_noise``).

    x_t, eps: same shape, fp32/fp16/bf16 (computed in fp32); t, seed, offset: 1-element int64
    device tensors (read in-kernel, so a CUDA graph replays with new values) or Python ints;
    inv_sqrt_alpha = 1/sqrt(alpha), eps_coef = beta/sqrt(1 - alpha_bar), sigma = sqrt(beta): fp32
    tables of length T; offset: global element index of x_t[0] (chunked sampling); clip: clamp
    x_{t-1} to [-clip, clip]. Writes into ``out`` (contiguous, may be x_t itself) if given, else
    returns a new contiguous tensor of x_t's dtype.
    """
    if x_t.shape != eps.shape:
        raise ValueError(f"x_t {tuple(x_t.shape)} and eps {tuple(eps.shape)} differ in shape")
    # The noise is indexed by logical element, so walk contiguous memory.
    x_t, eps = x_t.contiguous(), eps.contiguous()
    t, seed, offset = (_index_tensor(v, x_t.device) for v in (t, seed, offset))
    tables = (inv_sqrt_alpha, eps_coef, sigma)
    if out is None:
        return _reverse_step_op(x_t, eps, t, seed, *tables, offset, clip)
    if not out.is_contiguous() or out.shape != x_t.shape:
        raise ValueError("out must be contiguous and shaped like x_t")
    _reverse_step_out_op(x_t, eps, t, seed, *tables, offset, clip, out)
    return out


def reverse_step_noise(shape, t: Union[int, torch.Tensor], seed: Union[int, torch.Tensor],
                       offset: Union[int, torch.Tensor] = 0,
                       device: Optional[Union[str, torch.device]] = None) -> torch.Tensor:
    """The z (fp32, contiguous, of ``shape``) that ``reverse_step`` adds at step t with this seed
    and offset: the same @triton.jit noise function; all zeros at t == 0."""
    if device is None:
        device = t.device if isinstance(t, torch.Tensor) else "cpu"
    z = torch.empty(shape, device=device, dtype=torch.float32)
    n = z.numel()
    _noise_kernel[(triton.cdiv(n, _BLOCK),)](z, _index_tensor(t, device), _index_tensor(seed, device), n,
                                              _index_tensor(offset, device), BLOCK=_BLOCK)
    return z
