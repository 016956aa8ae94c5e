"""Fused GroupNorm (+ residual) + GELU (+ time encoding), forward and backward.

    y = GELU(residual + GN(x) * w + b) + time_encoding(t)        (each of the three extras optional)

One pass over a group computes its statistics, a second applies them, so the forward reads x twice
and writes y once; the (N, C, H, W) time-encoding broadcast (eq. 11) is computed in the epilogue and
never materialised. The backward recomputes x_hat and GELU'(u) from the saved mean/rstd.

Resident path (``RESIDENT_MAX``, off by default until a whole training step measures it): a group whose
power-of-two tile holds at most that many elements (16,384 at most: the 4x4 and 8x8 levels) is
loaded once into one program's registers, so the forward reads x once and the backward reads x, dy
(and the residual) once: the compulsory traffic, where the other paths read x twice in the forward
and x, dy and the residual twice in the backward. With ``COOP_TILE`` (off by default; tested and timed
on an H200 on 2026-11-28) larger groups are resident too, over several programs that meet at a barrier
in the kernel.

A group is walked as a (channels, H*W) rectangle with a stride per axis, which covers NCHW and
channels_last without a permute copy. The model uses one group per sample (up to 65,536 elements),
so one program per (sample, group) would leave most of a GPU idle at sampling batch sizes: large
groups are split over S programs, each reducing a sub-rectangle to partial statistics (count, mean,
M2 merged with Chan et al.'s formula, as stable as Welford but made of plain ``tl.sum``) that a second
kernel combines. A program sums x minus a shift, the mean of its first tile, and the partials are
combined about the first one's mean, so that no sum or running mean rounds at the scale of a large
mean (which would swamp the spread). Small groups keep one fused program. Weight/bias gradients
are per-program partial sums reduced by ``torch.sum``: deterministic, no atomics.

With ``PERSISTENT`` row programs per SM, every split kernel loops over the (sample, group) rows its
program id strides to, which bounds the groups in flight; by default a program takes one row and the
kernels compile without the loop. The launch knobs are module settings read at each launch;
``launch_settings(**knobs)`` sets them by the names of ``LAUNCH_KNOBS`` for a block (the bench's sweep
and its ``path@knob=value`` cases use it).

Registered with ``torch.library.custom_op`` (+ fake + autograd) so ``torch.compile(fullgraph=True)``
traces through it, tagged ``flexible_layout``: Inductor may hand it channels_last activations as they
are (its layout optimisation of inference graphs), where by default it would copy them back to the
eager trace's NCHW strides first.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

__all__ = ["group_norm_gelu", "group_norm_gelu_fwd", "group_norm_gelu_bwd", "LAUNCH_KNOBS", "launch_settings",
           "parse_launch_settings", "current_launch_settings", "launch_knob", "GPU_LAUNCH_DEFAULTS",
           "INTERPRETER_LAUNCH_DEFAULTS"]

# Groups of at most this many elements are handled by one program (stats + apply fused).
SPLIT_THRESHOLD = 4096
# Elements per program on the split path (the "elems" launch knob); 0 = derive from _TARGET_PROGRAMS.
# Tests set it small.
ELEMS_PER_PROGRAM = 0
_TARGET_PROGRAMS = 528  # ~4 programs per SM of an H100 (132): enough to fill it at batch 1
_MIN_ELEMS_PER_PROGRAM = 1024
_TILE = 2048  # elements per loaded tile (fp32: 8 KiB in registers)
_ELEMS_PER_THREAD = 8  # sets num_warps from the tile size
# Persistent rows: 0 = a program per (sample, group) row; k > 0 = k row programs per SM (k in all on
# the CPU, where the interpreter runs them), each looping over rows; either way times the S split
# programs of a row. A program that takes both passes over its group (one program per group:
# SPLIT_THRESHOLD) finds the group in L2 on the second pass only if the groups in flight fit there:
# 64x32x32 bf16 is 128 KiB, so 2 programs on each of 132 SMs hold 34 MB of a 50 MB L2, where the 2,560
# groups of a sampling call are otherwise scheduled as densely as occupancy allows. The kernels are
# compiled with the row loop only when it is on (PERSIST), so the default ones are unchanged.
# Unmeasured on a GPU so far; no effect on the resident path (one program per row, one pass).
PERSISTENT = 0
# Reductions: False = each tile reduced across the block as it is loaded (Chan merge per tile; what
# the H200 run of 2026-11-26 measured, before the statistics were shifted); True = per-lane
# accumulators (shifted sums for the statistics) reduced once per rectangle, so the loop carries no
# block-wide reduction. Unmeasured on a GPU so far.
_LANE_ACCUMULATE = False
# The backward's reduction pass over a channels_last group accumulates per lane whatever
# _LANE_ACCUMULATE says: there the dw/db sums run across the tile's strided (pixel) axis, a block-wide
# reduction per tile, and the H100 profile of 2026-11-27 (bench/results/...-profile-fast.json) found
# that pass 2.7x slower in NHWC than in NCHW (3.07 vs 1.16 ms a step). Not timed alone since; with it
# (and the changes of the same commits) the NHWC step became the faster layout on an H100
# (bench/results/2026-11-27-h100-80gb-hbm3-f2564d9.json).
_LANE_BWD_CHANNELS_LAST = True
# Groups whose padded (power-of-two) tile holds at most this many elements take the resident path
# (one program, one load of each input); 0 = off. The fastest setting at the 4x4 and 8x8 levels in the
# H100 sweep of 2026-11-27 (bench/results/2026-11-27-h100-80gb-hbm3-tune.json), yet a whole NHWC training
# step timed it within noise of off (0.99x, bench/results/2026-11-27-h100-80gb-hbm3-f2564d9.json). Never above
# _RESIDENT_LIMIT: at 32 warps that is 16 fp32 values a thread per live tile, and the backward keeps
# about five alive (x, dy, residual, du, x_hat) in a 64-register budget, so it spills beyond.
RESIDENT_MAX = 0
_RESIDENT_LIMIT = 16384
# Cooperative resident programs (the "coop" knob; 0 = off): a group that the resident path does not take
# whole is cut into tiles of at most this many elements, one resident program each; the S programs of a
# group store their partial statistics, meet at a barrier in the kernel (a counter per row in global
# memory), and each normalises the tile it still holds. Every input is then read from memory once,
# where the split path reads x twice in the forward and x, dy (and the residual) twice in the
# backward: 8 tensor passes of a forward + backward without residual against the compulsory 5, which
# caps the split path at 5/8 of the copy bandwidth in DRAM traffic (unless its second reads hit L2),
# under issue 11's 70 % target. Programs that wait for each other must run at once: a group that needs
# more than _row_programs(device) of them (half the SMs) takes the split path instead. Off until a second
# call, and sampling, agree with the H200's of 2026-11-28: native tests passed; coop=4096 the fastest
# setting at the 16x16 and 32x32 levels, 1.03x the defaults in the whole training step (one call).
COOP_TILE = 0
# The GELU's Phi: False = the kernels' own (_normal_cdf_pdf: Phi and phi in 18 instructions a value);
# True = libdevice's erff, what every GPU run up to 2026-11-27 measured (40 for the two). Counted in
# the sm_90 code of Triton 3.8 (bench/static_cost.py's reading); unmeasured on a GPU so far.
_LIBDEVICE_ERF = False
# Each of these launch knobs also takes its FASTDDPM_GN_* variable at import (LAUNCH_KNOBS, below);
# bench/tune_groupnorm.py sweeps them on a GPU through launch_settings().
_LOG_10000 = math.log(10000.0)
# The kernels' GELU constexpr: none, the exact (erf) GELU with the kernels' own Phi, or with libdevice's
# erff (the "libdevice_erf" launch knob).
GELU_OFF, GELU_ON, GELU_LIBDEVICE = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)


# --------------------------------------------------------------------------------------------------
# @triton.jit helpers
# --------------------------------------------------------------------------------------------------
@triton.jit
def _rect(pid, Cg, HW, C_CHUNK, HW_CHUNK, HW_SPLIT):
    """Sub-rectangle [c_lo, c_hi) x [h_lo, h_hi) of the group owned by split program ``pid``."""
    c_lo = (pid // HW_SPLIT) * C_CHUNK
    h_lo = (pid % HW_SPLIT) * HW_CHUNK
    return c_lo, tl.minimum(c_lo + C_CHUNK, Cg), h_lo, tl.minimum(h_lo + HW_CHUNK, HW)


@triton.jit
def _tile(base, c0, c_hi, h0, h_hi, stride_c, stride_hw, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """Offsets and mask of the (BLOCK_C, BLOCK_HW) tile at group-local channel c0, pixel h0."""
    cs = c0 + tl.arange(0, BLOCK_C)
    hs = h0 + tl.arange(0, BLOCK_HW)
    mask = (cs < c_hi)[:, None] & (hs < h_hi)[None, :]
    offs = base + cs[:, None] * stride_c + hs[None, :] * stride_hw
    return offs, mask


@triton.jit
def _rect_stats(X, base, c_lo, c_hi, h_lo, h_hi, stride_c, stride_hw,
                BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, LANE: tl.constexpr):
    """(count, mean, M2) of x over a rectangle, from x - k, k the mean of its first tile. LANE: sums
    of x - k and (x - k)^2 per lane, reduced once at the end; else tile by tile, each tile's (count,
    mean, M2) merged in with Chan et al.'s formula.

    The shift keeps every sum and running mean at the scale of the spread, however large the mean
    is against it: naive sums of x^2 cancel there, and a running mean of x itself rounds at x's
    scale at every merge, an error the normalisation multiplies by 1/std
    (tests/test_kernels_groupnorm_gelu.py, mean/std = 1,000). LANE is about five instructions an
    element with no block-wide reduction in the loop (Welford per lane, what it ran before, divided
    at every element): by arithmetic, an H100 SM streaming bf16 at 3 TB/s has about 22
    lane-instructions an element for everything. Both passed their native tests on an H200 on
    2026-11-28 (the mean far above the spread among them); neither is timed apart."""
    # The first tile gives k and is the loop's first step, so no tile is loaded twice; the loop walks
    # the rest by a flat index (channel tile i // n_h, pixel tile i % n_h).
    offs, mask = _tile(base, c_lo, c_hi, h_lo, h_hi, stride_c, stride_hw, BLOCK_C, BLOCK_HW)
    n_first = (tl.minimum(c_hi - c_lo, BLOCK_C) * tl.minimum(h_hi - h_lo, BLOCK_HW)).to(tl.float32)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    k = tl.sum(x) / tl.maximum(n_first, 1.0)
    d = tl.where(mask, x - k, 0.0)
    n_h = tl.cdiv(h_hi - h_lo, BLOCK_HW)
    n_tiles = tl.cdiv(c_hi - c_lo, BLOCK_C) * n_h
    if LANE:
        s1 = d
        s2 = d * d
        for i in range(1, n_tiles):
            offs, mask = _tile(base, c_lo + (i // n_h) * BLOCK_C, c_hi, h_lo + (i % n_h) * BLOCK_HW, h_hi,
                               stride_c, stride_hw, BLOCK_C, BLOCK_HW)
            d = tl.where(mask, tl.load(X + offs, mask=mask, other=0.0).to(tl.float32) - k, 0.0)
            s1 += d
            s2 += d * d
        count = (c_hi - c_lo) * (h_hi - h_lo) * 1.0  # no .to: on a GPU, 1 x 1 of constant 1s is a constexpr
        sum1 = tl.sum(s1)
        mean = sum1 / tl.maximum(count, 1.0)
        m2 = tl.maximum(tl.sum(s2) - sum1 * mean, 0.0)
    else:
        count = n_first
        mean = tl.sum(d) / tl.maximum(count, 1.0)
        m2 = tl.sum(tl.where(mask, (d - mean) * (d - mean), 0.0))
        for i in range(1, n_tiles):
            c0 = c_lo + (i // n_h) * BLOCK_C
            h0 = h_lo + (i % n_h) * BLOCK_HW
            offs, mask = _tile(base, c0, c_hi, h0, h_hi, stride_c, stride_hw, BLOCK_C, BLOCK_HW)
            x = tl.where(mask, tl.load(X + offs, mask=mask, other=0.0).to(tl.float32) - k, 0.0)
            n_b = (tl.minimum(c_hi - c0, BLOCK_C) * tl.minimum(h_hi - h0, BLOCK_HW)).to(tl.float32)
            mean_b = tl.sum(x) / n_b
            d = tl.where(mask, x - mean_b, 0.0)
            n_ab = count + n_b
            delta = mean_b - mean
            mean = mean + delta * (n_b / n_ab)
            m2 = m2 + tl.sum(d * d) + delta * delta * (count * n_b / n_ab)
            count = n_ab
    return count, k + mean, m2


@triton.jit
def _normal_cdf_pdf(u, GELU: tl.constexpr):
    """(Phi(u), phi(u)): the standard normal distribution and density, for the exact (erf) GELU
    u * Phi(u) and its derivative Phi(u) + u * phi(u).

    GELU_LIBDEVICE: Phi from libdevice's erff, 28 instructions a value in sm_90 code (Triton 3.8),
    40 with phi: the GELU was most of the forward's and backward's instructions, enough to
    issue-limit the backward below the copy bandwidth (bench/static_cost.py). GELU_ON, the default:
    Phi(-|u|) = m(|u|) * phi(u), m the Mills ratio, as t * Q(t), t = 1 / (1 + p|u|) and Q of degree 7,
    fitted to the relative error by linear programming on 12,000 points of t (p by a scalar search):
    1.6e-7 over |u| <= 14 (from |u| = 13.2 Phi(-|u|) and phi leave fp32's normal range; a GPU flushes
    them to 0). t from a squared rsqrt (two instructions, where a division is eight) and phi from one
    exp2: 18 instructions for the two. In fp32 its error is a few 1e-7 of Phi(-|u|) (and of 1, the
    largest Phi), growing with the rounding of exp2's argument u^2/2 to 1e-5 at |u| = 13, where 1 + erf
    cancels entirely (tests/test_kernels_groupnorm_gelu.py); a GPU's approximate rsqrt and exp2 (a
    relative 2^-22 or so each, by PTX's manual) add a few 1e-7 more."""
    if GELU == GELU_LIBDEVICE:
        cdf = 0.5 * (1.0 + tl.erf(u * 0.7071067811865476))
        pdf = tl.exp(-0.5 * u * u) * 0.3989422804014327
    else:
        r = tl.math.rsqrt(1.0 + 0.3048902890945508 * tl.abs(u))
        t = r * r
        m = 0.09125855710145686 * t - 0.3810725680668506
        m = m * t + 0.4623784646703468
        m = m * t - 0.09238804400598577
        m = m * t + 0.3019881574073136
        m = m * t + 0.2595362654434989
        m = m * t + 0.3068141839634633
        m = m * t + 0.30479906032020176
        pdf = tl.exp2(u * u * -0.7213475204444817 - 1.3257480647361595)  # exp(-u^2 / 2) / sqrt(2 pi)
        tail = m * t * pdf  # Phi(-|u|)
        cdf = tl.where(u < 0.0, tail, 1.0 - tail)
    return cdf, pdf


@triton.jit
def _grad_u(x, dy, r, w, b, mean, rstd, mask, HAS_RESIDUAL: tl.constexpr, GELU: tl.constexpr):
    """x_hat and dL/du, u = residual + x_hat * w + b the GELU input (the time encoding adds a
    constant after the GELU, so it has no gradient to pass)."""
    x_hat = tl.where(mask, (x - mean) * rstd, 0.0)
    du = dy
    if GELU:
        u = x_hat * w[:, None] + b[:, None]
        if HAS_RESIDUAL:
            u += r
        cdf, pdf = _normal_cdf_pdf(u, GELU)
        du = dy * (cdf + u * pdf)  # d/du [u * Phi(u)]
    return x_hat, du


@triton.jit
def _tile_grad(DY, X, R, base, c0, c_hi, h0, h_hi, stride_c, stride_hw, w, b, mean, rstd,
               HAS_RESIDUAL: tl.constexpr, GELU: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """Load one tile of x, dy (and the residual) and return (offs, mask, x_hat, dL/du): the shared
    front half of both backward passes."""
    offs, mask = _tile(base, c0, c_hi, h0, h_hi, stride_c, stride_hw, BLOCK_C, BLOCK_HW)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    r = 0.0
    if HAS_RESIDUAL:
        r = tl.load(R + offs, mask=mask, other=0.0).to(tl.float32)
    x_hat, du = _grad_u(x, dy, r, w, b, mean, rstd, mask, HAS_RESIDUAL, GELU)
    return offs, mask, x_hat, du


@triton.jit
def _affine(W, B, c, cmask):
    """Weight and bias of channels c, in fp32."""
    return tl.load(W + c, mask=cmask, other=0.0).to(tl.float32), tl.load(B + c, mask=cmask, other=0.0).to(tl.float32)


@triton.jit
def _channel_params(W, B, T, n, c, cmask, neg_log_over_c, HAS_T: tl.constexpr):
    """Per channel c: weight, bias and (HAS_T) the time encoding of sample n's step."""
    w, b = _affine(W, B, c, cmask)
    te = w  # a placeholder of the right type, unused without HAS_T (no zero tile to build)
    if HAS_T:
        # eq. 11: frequency 10000^(-2*floor(c/2)/C), sin on even channels, cos on odd ones;
        # one value per channel, broadcast over the pixels of the tile.
        angle = tl.load(T + n).to(tl.float32) * tl.exp((c // 2 * 2).to(tl.float32) * neg_log_over_c)
        te = tl.where(c % 2 == 0, tl.sin(angle), tl.cos(angle))
    return w, b, te


@triton.jit
def _apply_tile(R, Y, offs, mask, x, mean, rstd, w, b, te,
                HAS_RESIDUAL: tl.constexpr, HAS_T: tl.constexpr, GELU: tl.constexpr):
    """Store y = GELU(r + x_hat * w + b) + te for a loaded (channels, pixels) tile x; the residual r
    is loaded here."""
    y = (x - mean) * rstd * w[:, None] + b[:, None]
    if HAS_RESIDUAL:
        y += tl.load(R + offs, mask=mask, other=0.0).to(tl.float32)
    if GELU:
        y = y * _normal_cdf_pdf(y, GELU)[0]  # exact (erf) GELU
    if HAS_T:
        y += te[:, None]
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rect_apply(X, R, T, W, B, Y, base, n, c_off, c_lo, c_hi, h_lo, h_hi, stride_c, stride_hw,
                mean, rstd, neg_log_over_c,
                HAS_RESIDUAL: tl.constexpr, HAS_T: tl.constexpr, GELU: tl.constexpr,
                BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """y = GELU(r + x_hat * w + b) + time_encoding(t) over a rectangle."""
    for c0 in range(c_lo, c_hi, BLOCK_C):
        c = c_off + c0 + tl.arange(0, BLOCK_C)  # global channel
        w, b, te = _channel_params(W, B, T, n, c, c < c_off + c_hi, neg_log_over_c, HAS_T)
        for h0 in range(h_lo, h_hi, BLOCK_HW):
            offs, mask = _tile(base, c0, c_hi, h0, h_hi, stride_c, stride_hw, BLOCK_C, BLOCK_HW)
            x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
            _apply_tile(R, Y, offs, mask, x, mean, rstd, w, b, te, HAS_RESIDUAL, HAS_T, GELU)


@triton.jit
def _rect_bwd_reduce(DY, X, R, DR, W, B, PDW, PDB, base, pd_row, pd_stride_c, c_off, c_lo, c_hi, h_lo, h_hi,
                     stride_c, stride_hw, mean, rstd,
                     HAS_RESIDUAL: tl.constexpr, GELU: tl.constexpr,
                     BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, LANE: tl.constexpr):
    """Over a rectangle: write d_residual = du, store this program's dw/db partials (row ``pd_row`` of
    the partials table, its own channels only) and return sum(dx_hat), sum(dx_hat * x_hat).
    LANE: the per-channel sums accumulate per lane, reduced once a channel chunk; else each tile is
    reduced as it comes. The two group sums need no pass of their own: dx_hat = du * w with w per
    channel, so they are sum_c w_c * db_c and sum_c w_c * dw_c over the chunk's partials."""
    s1 = 0.0
    s2 = 0.0
    for c0 in range(c_lo, c_hi, BLOCK_C):
        c = c_off + c0 + tl.arange(0, BLOCK_C)
        cmask = c < c_off + c_hi
        w, b = _affine(W, B, c, cmask)
        if LANE:
            dw_acc = tl.zeros((BLOCK_C, BLOCK_HW), dtype=tl.float32)
            db_acc = tl.zeros((BLOCK_C, BLOCK_HW), dtype=tl.float32)
        else:
            dw = tl.zeros((BLOCK_C,), dtype=tl.float32)
            db = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for h0 in range(h_lo, h_hi, BLOCK_HW):
            offs, mask, x_hat, du = _tile_grad(DY, X, R, base, c0, c_hi, h0, h_hi, stride_c, stride_hw, w, b,
                                               mean, rstd, HAS_RESIDUAL, GELU, BLOCK_C, BLOCK_HW)
            if HAS_RESIDUAL:
                tl.store(DR + offs, du.to(DR.dtype.element_ty), mask=mask)
            if LANE:  # masked lanes hold du = 0 and x_hat = 0: they add nothing
                dw_acc += du * x_hat
                db_acc += du
            else:
                dw += tl.sum(du * x_hat, axis=1)
                db += tl.sum(du, axis=1)
        if LANE:
            dw = tl.sum(dw_acc, axis=1)
            db = tl.sum(db_acc, axis=1)
        else:  # one use of each loop result: Triton 3.6 asserts (or, without asserts, miscompiles) where a
            # reduction's accumulator is used twice after its loop (triton-lang/triton#11682)
            dw = tl.where(cmask, dw, 0.0)
            db = tl.where(cmask, db, 0.0)
        tl.store(PDW + pd_row + c * pd_stride_c, dw, mask=cmask)
        tl.store(PDB + pd_row + c * pd_stride_c, db, mask=cmask)
        s1 += tl.sum(w * db)  # masked channels have w = 0
        s2 += tl.sum(w * dw)
    return s1, s2


@triton.jit
def _dx(du, w, x_hat, m1, m2, rstd):
    """dx = rstd * (dx_hat - mean(dx_hat) - x_hat * mean(dx_hat * x_hat)), dx_hat = du * w; m1, m2
    are those two means over the group."""
    return (du * w[:, None] - (m1 + x_hat * m2)) * rstd


@triton.jit
def _rect_bwd_dx(DY, X, R, W, B, DX, base, c_off, c_lo, c_hi, h_lo, h_hi, stride_c, stride_hw,
                 mean, rstd, m1, m2,
                 HAS_RESIDUAL: tl.constexpr, GELU: tl.constexpr,
                 BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """dx = rstd * (dx_hat - mean(dx_hat) - x_hat * mean(dx_hat * x_hat)) over a rectangle."""
    for c0 in range(c_lo, c_hi, BLOCK_C):
        c = c_off + c0 + tl.arange(0, BLOCK_C)
        cmask = c < c_off + c_hi
        w, b = _affine(W, B, c, cmask)
        for h0 in range(h_lo, h_hi, BLOCK_HW):
            offs, mask, x_hat, du = _tile_grad(DY, X, R, base, c0, c_hi, h0, h_hi, stride_c, stride_hw, w, b,
                                               mean, rstd, HAS_RESIDUAL, GELU, BLOCK_C, BLOCK_HW)
            tl.store(DX + offs, _dx(du, w, x_hat, m1, m2, rstd).to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _resident_program(SYNC, S, STAGE: tl.constexpr):
    """(row, split program) of a resident program. Where a row's S programs meet (STAGE 0, S > 1)
    each takes a ticket in the order programs start, so that a program only ever waits for programs
    that have started before it or will start as soon as any other finishes (no deadlock while one
    row's programs fit the GPU at once: _launch_config's row_programs); otherwise its id."""
    ticket = tl.program_id(0)
    if STAGE == 0:
        if S > 1:
            ticket = tl.atomic_add(SYNC, 1, sem="relaxed")
    return ticket // S, ticket % S


@triton.jit
def _meet(SYNC, row, S, STAGE: tl.constexpr):
    """The row's barrier, after this program has stored its partials: count it in, and at STAGE 0
    return once all S programs of the row have. (At STAGE 1 the interpreter runs the row's programs
    one after another, and STAGE 2 comes after them all: no wait.)"""
    if STAGE == 0:
        tl.debug_barrier()  # the partial stores before the atomic that publishes them, whichever threads made them
        # acq_rel: the last program to come never spins, yet reads the others' partials after this
        arrived = tl.atomic_add(SYNC + 1 + row, 1, sem="acq_rel") + 1
        while arrived < S:
            arrived = tl.atomic_add(SYNC + 1 + row, 0, sem="acquire")  # compiled to an acquire load


@triton.jit
def _combined_stats(PART, row, S, BLOCK_S: tl.constexpr, VOLATILE: tl.constexpr):
    """(mean, variance) of a row from its S partial (count, mean, M2), combined about the first
    partial's mean, as within a program. VOLATILE: partials that other programs of this kernel
    stored, read past the L1 cache, which may hold a line of them from before they were stored."""
    s = tl.arange(0, BLOCK_S)
    smask = s < S
    p = PART + (row * S + s) * 3
    cnt = tl.load(p, mask=smask, other=0.0, volatile=VOLATILE)
    mu = tl.load(p + 1, mask=smask, other=0.0, volatile=VOLATILE)
    total = tl.sum(cnt)
    mu0 = tl.sum(tl.where(s == 0, mu, 0.0))
    mean = mu0 + tl.sum(cnt * (mu - mu0)) / total
    d = mu - mean
    return mean, (tl.sum(tl.load(p + 2, mask=smask, other=0.0, volatile=VOLATILE)) + tl.sum(cnt * d * d)) / total


@triton.jit
def _summed_partials(PART, row, S, BLOCK_S: tl.constexpr, VOLATILE: tl.constexpr):
    """The backward's group sums (sum dx_hat, sum dx_hat * x_hat) of a row, from its S partials."""
    s = tl.arange(0, BLOCK_S)
    p = PART + (row * S + s) * 2
    return (tl.sum(tl.load(p, mask=s < S, other=0.0, volatile=VOLATILE)),
            tl.sum(tl.load(p + 1, mask=s < S, other=0.0, volatile=VOLATILE)))


# --------------------------------------------------------------------------------------------------
# kernels: grid (N * G, S); axis 0 is the (sample, group) row, axis 1 the split program. With PERSIST
# (the PERSISTENT knob) axis 0 has fewer programs, each looping over the rows its id strides to; the
# work of one row is a helper, so that without PERSIST a kernel compiles to the one-row code alone.
# --------------------------------------------------------------------------------------------------
@triton.jit
def _stats_row(row, pid, X, PART, G, Cg, stride_n, stride_c, stride_hw, S, c_lo, c_hi, h_lo, h_hi,
               BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, LANE: tl.constexpr):
    base = (row // G).to(tl.int64) * stride_n + (row % G) * Cg * stride_c
    count, mean, m2 = _rect_stats(X, base, c_lo, c_hi, h_lo, h_hi, stride_c, stride_hw, BLOCK_C, BLOCK_HW, LANE)
    p = PART + (row * S + pid) * 3
    tl.store(p, count)
    tl.store(p + 1, mean)
    tl.store(p + 2, m2)


@triton.jit
def _gn_stats_kernel(X, PART, ROWS, G, C, Cg, HW, stride_n, stride_c, stride_hw, C_CHUNK, HW_CHUNK, HW_SPLIT, S,
                     BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, LANE: tl.constexpr, PERSIST: tl.constexpr):
    """Split path, pass 1: partial (count, mean, M2) of one sub-rectangle of a row."""
    pid = tl.program_id(1)
    c_lo, c_hi, h_lo, h_hi = _rect(pid, Cg, HW, C_CHUNK, HW_CHUNK, HW_SPLIT)
    if PERSIST:
        for row in range(tl.program_id(0), ROWS, tl.num_programs(0)):
            _stats_row(row, pid, X, PART, G, Cg, stride_n, stride_c, stride_hw, S, c_lo, c_hi, h_lo, h_hi,
                       BLOCK_C, BLOCK_HW, LANE)
    else:
        _stats_row(tl.program_id(0), pid, X, PART, G, Cg, stride_n, stride_c, stride_hw, S, c_lo, c_hi, h_lo, h_hi,
                   BLOCK_C, BLOCK_HW, LANE)


@triton.jit
def _fwd_row(row, pid, X, R, T, W, B, Y, MEAN, RSTD, PART, G, Cg, HW, stride_n, stride_c, stride_hw, S, eps,
             neg_log_over_c, c_lo, c_hi, h_lo, h_hi, SINGLE: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
             HAS_T: tl.constexpr, GELU: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
             BLOCK_S: tl.constexpr, LANE: tl.constexpr):
    n = row // G
    c_off = (row % G) * Cg
    base = n.to(tl.int64) * stride_n
    if SINGLE:
        count, mean, m2 = _rect_stats(X, base + c_off * stride_c, 0, Cg, 0, HW, stride_c, stride_hw,
                                      BLOCK_C, BLOCK_HW, LANE)
        var = m2 / count
    else:
        mean, var = _combined_stats(PART, row, S, BLOCK_S, False)
    rstd = 1.0 / tl.sqrt(var + eps)
    if pid == 0:
        tl.store(MEAN + row, mean)
        tl.store(RSTD + row, rstd)
    _rect_apply(X, R, T, W, B, Y, base + c_off * stride_c, n, c_off, c_lo, c_hi, h_lo, h_hi,
                stride_c, stride_hw, mean, rstd, neg_log_over_c,
                HAS_RESIDUAL, HAS_T, GELU, BLOCK_C, BLOCK_HW)


@triton.jit
def _gn_fwd_kernel(X, R, T, W, B, Y, MEAN, RSTD, PART, ROWS, G, C, Cg, HW, stride_n, stride_c, stride_hw,
                   C_CHUNK, HW_CHUNK, HW_SPLIT, S, eps, neg_log_over_c,
                   SINGLE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_T: tl.constexpr,
                   GELU: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
                   BLOCK_S: tl.constexpr, LANE: tl.constexpr, PERSIST: tl.constexpr):
    """Normalise and apply one sub-rectangle of a row. SINGLE: one program per group computes the
    stats itself; otherwise it combines the S partials left by ``_gn_stats_kernel``."""
    pid = tl.program_id(1)
    c_lo, c_hi, h_lo, h_hi = _rect(pid, Cg, HW, C_CHUNK, HW_CHUNK, HW_SPLIT)
    if PERSIST:
        for row in range(tl.program_id(0), ROWS, tl.num_programs(0)):
            _fwd_row(row, pid, X, R, T, W, B, Y, MEAN, RSTD, PART, G, Cg, HW, stride_n, stride_c, stride_hw, S, eps,
                     neg_log_over_c, c_lo, c_hi, h_lo, h_hi, SINGLE, HAS_RESIDUAL, HAS_T, GELU, BLOCK_C, BLOCK_HW,
                     BLOCK_S, LANE)
    else:
        _fwd_row(tl.program_id(0), pid, X, R, T, W, B, Y, MEAN, RSTD, PART, G, Cg, HW, stride_n, stride_c, stride_hw,
                 S, eps, neg_log_over_c, c_lo, c_hi, h_lo, h_hi, SINGLE, HAS_RESIDUAL, HAS_T, GELU, BLOCK_C,
                 BLOCK_HW, BLOCK_S, LANE)


@triton.jit
def _bwd_reduce_row(row, pid, DY, X, R, DR, W, B, MEAN, RSTD, PDW, PDB, pd_stride_c, PART, G, C, Cg, stride_n, stride_c,
                    stride_hw, HW_SPLIT, S, c_lo, c_hi, h_lo, h_hi, HAS_RESIDUAL: tl.constexpr, GELU: tl.constexpr,
                    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, LANE: tl.constexpr):
    n = row // G
    c_off = (row % G) * Cg
    base = n.to(tl.int64) * stride_n + c_off * stride_c
    pd_row = n * HW_SPLIT + pid % HW_SPLIT
    s1, s2 = _rect_bwd_reduce(DY, X, R, DR, W, B, PDW, PDB, base, pd_row, pd_stride_c, c_off, c_lo, c_hi, h_lo, h_hi,
                              stride_c, stride_hw, tl.load(MEAN + row), tl.load(RSTD + row),
                              HAS_RESIDUAL, GELU, BLOCK_C, BLOCK_HW, LANE)
    tl.store(PART + (row * S + pid) * 2, s1)
    tl.store(PART + (row * S + pid) * 2 + 1, s2)


@triton.jit
def _gn_bwd_reduce_kernel(DY, X, R, DR, W, B, MEAN, RSTD, PDW, PDB, pd_stride_c, PART, ROWS, G, C, Cg, HW,
                          stride_n, stride_c, stride_hw, C_CHUNK, HW_CHUNK, HW_SPLIT, S,
                          HAS_RESIDUAL: tl.constexpr, GELU: tl.constexpr,
                          BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, LANE: tl.constexpr, PERSIST: tl.constexpr):
    """Split path, pass 1: d_residual, dw/db partials and the partial group sums for dx, of a row."""
    pid = tl.program_id(1)
    c_lo, c_hi, h_lo, h_hi = _rect(pid, Cg, HW, C_CHUNK, HW_CHUNK, HW_SPLIT)
    if PERSIST:
        for row in range(tl.program_id(0), ROWS, tl.num_programs(0)):
            _bwd_reduce_row(row, pid, DY, X, R, DR, W, B, MEAN, RSTD, PDW, PDB, pd_stride_c, PART, G, C, Cg,
                            stride_n, stride_c, stride_hw, HW_SPLIT, S, c_lo, c_hi, h_lo, h_hi, HAS_RESIDUAL, GELU,
                            BLOCK_C, BLOCK_HW, LANE)
    else:
        _bwd_reduce_row(tl.program_id(0), pid, DY, X, R, DR, W, B, MEAN, RSTD, PDW, PDB, pd_stride_c, PART, G, C, Cg,
                        stride_n, stride_c, stride_hw, HW_SPLIT, S, c_lo, c_hi, h_lo, h_hi, HAS_RESIDUAL, GELU,
                        BLOCK_C, BLOCK_HW, LANE)


@triton.jit
def _bwd_dx_row(row, DY, X, R, DR, W, B, MEAN, RSTD, PDW, PDB, pd_stride_c, PART, DX, G, C, Cg, HW, stride_n, stride_c,
                stride_hw, S, c_lo, c_hi, h_lo, h_hi, SINGLE: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                GELU: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_S: tl.constexpr,
                LANE: tl.constexpr):
    n = row // G
    c_off = (row % G) * Cg
    base = n.to(tl.int64) * stride_n + c_off * stride_c
    mean = tl.load(MEAN + row)
    rstd = tl.load(RSTD + row)
    if SINGLE:
        s1, s2 = _rect_bwd_reduce(DY, X, R, DR, W, B, PDW, PDB, base, n, pd_stride_c, c_off, 0, Cg, 0, HW,
                                  stride_c, stride_hw, mean, rstd, HAS_RESIDUAL, GELU, BLOCK_C, BLOCK_HW, LANE)
    else:
        s1, s2 = _summed_partials(PART, row, S, BLOCK_S, False)
    inv_m = 1.0 / (Cg * HW * 1.0)
    _rect_bwd_dx(DY, X, R, W, B, DX, base, c_off, c_lo, c_hi, h_lo, h_hi, stride_c, stride_hw,
                 mean, rstd, s1 * inv_m, s2 * inv_m, HAS_RESIDUAL, GELU, BLOCK_C, BLOCK_HW)


@triton.jit
def _gn_bwd_dx_kernel(DY, X, R, DR, W, B, MEAN, RSTD, PDW, PDB, pd_stride_c, PART, DX, ROWS, G, C, Cg, HW,
                      stride_n, stride_c, stride_hw, C_CHUNK, HW_CHUNK, HW_SPLIT, S,
                      SINGLE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, GELU: tl.constexpr,
                      BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_S: tl.constexpr,
                      LANE: tl.constexpr, PERSIST: tl.constexpr):
    """dx of one sub-rectangle of a row. SINGLE: one program per group also does the reduction
    pass; otherwise it sums the S partials left by ``_gn_bwd_reduce_kernel``."""
    c_lo, c_hi, h_lo, h_hi = _rect(tl.program_id(1), Cg, HW, C_CHUNK, HW_CHUNK, HW_SPLIT)
    if PERSIST:
        for row in range(tl.program_id(0), ROWS, tl.num_programs(0)):
            _bwd_dx_row(row, DY, X, R, DR, W, B, MEAN, RSTD, PDW, PDB, pd_stride_c, PART, DX, G, C, Cg, HW,
                        stride_n, stride_c, stride_hw, S, c_lo, c_hi, h_lo, h_hi, SINGLE, HAS_RESIDUAL, GELU, BLOCK_C,
                        BLOCK_HW, BLOCK_S, LANE)
    else:
        _bwd_dx_row(tl.program_id(0), DY, X, R, DR, W, B, MEAN, RSTD, PDW, PDB, pd_stride_c, PART, DX, G, C, Cg, HW,
                    stride_n, stride_c, stride_hw, S, c_lo, c_hi, h_lo, h_hi, SINGLE, HAS_RESIDUAL, GELU, BLOCK_C,
                    BLOCK_HW, BLOCK_S, LANE)


@triton.jit
def _gn_fwd_resident_kernel(X, R, T, W, B, Y, MEAN, RSTD, PART, SYNC, G, C, Cg, HW, stride_n, stride_c, stride_hw,
                            HW_SPLIT, S, eps, neg_log_over_c, STAGE: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                            HAS_T: tl.constexpr, GELU: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
                            BLOCK_S: tl.constexpr):
    """Resident path, grid (N * G * S,): a program holds one BLOCK_C x BLOCK_HW tile of a group,
    loaded once; its statistics by two passes over the registers (the mean, corrected by the centred
    values' own, then the centred squares: no cancellation). A group of S > 1 tiles: its programs store
    their partials, meet, and each applies the combined statistics to the tile it holds, so x is read
    from memory once. STAGE 1 and 2 (the interpreter): the same in two launches, the second loading its tile again."""
    row, pid = _resident_program(SYNC, S, STAGE)
    c_lo, c_hi, h_lo, h_hi = _rect(pid, Cg, HW, BLOCK_C, BLOCK_HW, HW_SPLIT)
    n = row // G
    c_off = (row % G) * Cg
    offs, mask = _tile(n.to(tl.int64) * stride_n + c_off * stride_c, c_lo, c_hi, h_lo, h_hi, stride_c, stride_hw,
                       BLOCK_C, BLOCK_HW)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    count = (c_hi - c_lo) * (h_hi - h_lo) * 1.0
    # the sum of x rounds at x's scale (a GPU adds each thread's values in sequence first): the centred
    # values' own mean corrects it at their scale, and their squares' sum with it (the corrected
    # two-pass algorithm, sum((d - e)^2) = sum(d^2) - count * e^2)
    mean = tl.sum(x) / count
    d = tl.where(mask, x - mean, 0.0)
    e = tl.sum(d) / count
    mean += e
    m2 = tl.maximum(tl.sum(d * d) - count * e * e, 0.0)
    var = m2 / count
    if S > 1:
        if STAGE != 2:
            p = PART + (row * S + pid) * 3
            tl.store(p, count)
            tl.store(p + 1, mean)
            tl.store(p + 2, m2)
            _meet(SYNC, row, S, STAGE)
        if STAGE != 1:
            mean, var = _combined_stats(PART, row, S, BLOCK_S, True)
    if STAGE != 1:
        rstd = 1.0 / tl.sqrt(var + eps)
        if pid == 0:
            tl.store(MEAN + row, mean)
            tl.store(RSTD + row, rstd)
        c = c_off + c_lo + tl.arange(0, BLOCK_C)
        w, b, te = _channel_params(W, B, T, n, c, c < c_off + c_hi, neg_log_over_c, HAS_T)
        _apply_tile(R, Y, offs, mask, x, mean, rstd, w, b, te, HAS_RESIDUAL, HAS_T, GELU)


@triton.jit
def _gn_bwd_resident_kernel(DY, X, R, DR, W, B, MEAN, RSTD, PDW, PDB, pd_stride_c, PART, SYNC, DX, G, C, Cg, HW,
                            stride_n, stride_c, stride_hw, HW_SPLIT, S, STAGE: tl.constexpr,
                            HAS_RESIDUAL: tl.constexpr, GELU: tl.constexpr, BLOCK_C: tl.constexpr,
                            BLOCK_HW: tl.constexpr, BLOCK_S: tl.constexpr):
    """Resident path, grid (N * G * S,): x, dy (and the residual) of one tile loaded once; d_residual,
    the tile's dw/db partials (row n * HW_SPLIT + its pixel chunk of the partials table) and dx from
    the same registers. A group of S > 1 tiles: its programs store their two group sums and meet
    before dx. STAGE 1 and 2 (the interpreter): the same in two launches."""
    row, pid = _resident_program(SYNC, S, STAGE)
    c_lo, c_hi, h_lo, h_hi = _rect(pid, Cg, HW, BLOCK_C, BLOCK_HW, HW_SPLIT)
    n = row // G
    c_off = (row % G) * Cg
    c = c_off + c_lo + tl.arange(0, BLOCK_C)
    cmask = c < c_off + c_hi
    w, b = _affine(W, B, c, cmask)
    rstd = tl.load(RSTD + row)
    offs, mask, x_hat, du = _tile_grad(DY, X, R, n.to(tl.int64) * stride_n + c_off * stride_c, c_lo, c_hi, h_lo, h_hi,
                                       stride_c, stride_hw, w, b, tl.load(MEAN + row), rstd, HAS_RESIDUAL, GELU,
                                       BLOCK_C, BLOCK_HW)
    dw = tl.sum(du * x_hat, axis=1)
    db = tl.sum(du, axis=1)
    s1 = tl.sum(w * db)  # the group sums of dx_hat = du * w from the channels' (_rect_bwd_reduce)
    s2 = tl.sum(w * dw)
    if STAGE != 2:
        if HAS_RESIDUAL:
            tl.store(DR + offs, du.to(DR.dtype.element_ty), mask=mask)
        pd_row = n * HW_SPLIT + pid % HW_SPLIT
        tl.store(PDW + pd_row + c * pd_stride_c, dw, mask=cmask)
        tl.store(PDB + pd_row + c * pd_stride_c, db, mask=cmask)
    if S > 1:
        if STAGE != 2:
            tl.store(PART + (row * S + pid) * 2, s1)
            tl.store(PART + (row * S + pid) * 2 + 1, s2)
            _meet(SYNC, row, S, STAGE)
        if STAGE != 1:
            s1, s2 = _summed_partials(PART, row, S, BLOCK_S, True)
    if STAGE != 1:
        inv_m = 1.0 / (Cg * HW * 1.0)
        dx = _dx(du, w, x_hat, s1 * inv_m, s2 * inv_m, rstd)
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------------
# The launch knobs by the names the bench and its sweep use: (module attribute, allowed values, the
# environment variable that sets the default of a process).
LAUNCH_KNOBS = {"lane": ("_LANE_ACCUMULATE", "0 or 1", "FASTDDPM_GN_LANE_ACCUMULATE"),
                "tile": ("_TILE", "a power of two", "FASTDDPM_GN_TILE"),
                "programs": ("_TARGET_PROGRAMS", "a positive integer", "FASTDDPM_GN_TARGET_PROGRAMS"),
                "threads": ("_ELEMS_PER_THREAD", "a power of two", "FASTDDPM_GN_ELEMS_PER_THREAD"),
                "split": ("SPLIT_THRESHOLD", "an integer >= 0", "FASTDDPM_GN_SPLIT_THRESHOLD"),
                "elems": ("ELEMS_PER_PROGRAM", "an integer >= 0", "FASTDDPM_GN_ELEMS_PER_PROGRAM"),
                "resident": ("RESIDENT_MAX", f"an integer from 0 to {_RESIDENT_LIMIT} (registers)",
                             "FASTDDPM_GN_RESIDENT_MAX"),
                "coop": ("COOP_TILE", f"0 or a power of two up to {_RESIDENT_LIMIT} (registers)",
                         "FASTDDPM_GN_COOP_TILE"),
                "lane_bwd_nhwc": ("_LANE_BWD_CHANNELS_LAST", "0 or 1", "FASTDDPM_GN_LANE_BWD_CHANNELS_LAST"),
                "libdevice_erf": ("_LIBDEVICE_ERF", "0 or 1", "FASTDDPM_GN_LIBDEVICE_ERF"),
                "persistent": ("PERSISTENT", "an integer >= 0", "FASTDDPM_GN_PERSISTENT")}
_KNOB_OK = {"0 or 1": lambda v: v in (0, 1), "a power of two": lambda v: v >= 1 and not v & (v - 1),
            "a positive integer": lambda v: v >= 1, "an integer >= 0": lambda v: v >= 0,
            LAUNCH_KNOBS["resident"][1]: lambda v: 0 <= v <= _RESIDENT_LIMIT,
            LAUNCH_KNOBS["coop"][1]: lambda v: v == 0 or (0 < v <= _RESIDENT_LIMIT and not v & (v - 1))}


def launch_knob(name: str, value):
    """``value`` (an int, a bool or their text) as knob ``name`` takes it, or a ValueError naming the
    knob, the value and what is allowed."""
    if name not in LAUNCH_KNOBS:
        raise ValueError(f"unknown GroupNorm launch knob {name!r}: choose from {', '.join(LAUNCH_KNOBS)}")
    allowed = LAUNCH_KNOBS[name][1]
    try:
        v = int(value) if isinstance(value, int) else int(str(value).strip())  # no float: 2048.9 is no tile
    except ValueError:
        v = None
    if v is None or not _KNOB_OK[allowed](v):
        raise ValueError(f"GroupNorm launch knob {name}={value!r}: must be {allowed}")
    return bool(v) if allowed == "0 or 1" else v


for _name, (_attr, _, _var) in LAUNCH_KNOBS.items():  # a process's defaults, checked like any setting
    if _var in os.environ:
        try:
            globals()[_attr] = launch_knob(_name, os.environ[_var])
        except ValueError as e:
            raise ValueError(f"{_var}={os.environ[_var]!r}: {e}") from None


def _interpreted() -> bool:
    """Whether the kernels run in Triton's interpreter (TRITON_INTERPRET=1 when they were defined)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_gn_fwd_resident_kernel, InterpretedFunction)


# Where the kernels run in Triton's interpreter (a machine without a GPU: the CPU tests), a launch's
# programs run one after another and each op of a program is a numpy call at a fixed Python cost, so
# the time goes with programs x tiles, not bytes: one forward of the tiny U-Net at batch 8 took 50 s
# there with the GPU's split (528 programs, tiles of 2,048), 5 s with one program a group in one tile
# (2026-11-28, CI's kind of CPU: AVX2, 2 cores). There the split path's two sizing knobs default to
# INTERPRETER_LAUNCH_DEFAULTS (a FASTDDPM_GN_* variable still wins). GPU_LAUNCH_DEFAULTS: what a GPU
# launch of this process takes for them, which the GroupNorm kernel tests, one U-Net test and
# bench.static_cost put back; the kernel tests force every other path by its knobs.
GPU_LAUNCH_DEFAULTS = {name: globals()[LAUNCH_KNOBS[name][0]] for name in ("tile", "programs")}
INTERPRETER_LAUNCH_DEFAULTS = {"tile": _RESIDENT_LIMIT, "programs": 1}
if _interpreted():
    for _name, _value in INTERPRETER_LAUNCH_DEFAULTS.items():
        if LAUNCH_KNOBS[_name][2] not in os.environ:
            globals()[LAUNCH_KNOBS[_name][0]] = _value


def current_launch_settings() -> dict:
    """Every launch knob's value now, by name."""
    return {name: globals()[attr] for name, (attr, _, _) in LAUNCH_KNOBS.items()}


@contextlib.contextmanager
def launch_settings(**knobs):
    """Run the kernels with these launch knobs (``LAUNCH_KNOBS`` names), restoring the previous values
    on exit. The knobs are read at each launch: a CUDA graph keeps those it was captured with."""
    checked = {name: launch_knob(name, v) for name, v in knobs.items()}
    before = current_launch_settings()
    try:
        for name, v in checked.items():
            globals()[LAUNCH_KNOBS[name][0]] = v
        yield
    finally:
        for name, v in before.items():
            globals()[LAUNCH_KNOBS[name][0]] = v


def parse_launch_settings(text: str) -> dict:
    """``"tile=8192+persistent=2"`` -> ``{"tile": 8192, "persistent": 2}``, checked ("+" joins them: the
    bench lists its paths with commas, "fast@tile=8192+persistent=2,compiled")."""
    out = {}
    for item in (i.strip() for i in text.split("+")):
        name, eq, value = (part.strip() for part in item.partition("="))
        if not eq:
            raise ValueError(f"GroupNorm launch setting {item!r}: expected knob=value, knobs: "
                             f"{', '.join(LAUNCH_KNOBS)}")
        if name in out:
            raise ValueError(f"GroupNorm launch settings {text!r}: {name} given twice")
        out[name] = launch_knob(name, value)
    return out


def _layout(x: torch.Tensor) -> torch.Tensor:
    """x itself if NCHW- or channels_last-contiguous (kernels walk both through strides, and
    ``empty_like`` gives outputs the same strides), else an NCHW copy."""
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        return x
    return x.contiguous()


def _like(a: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``a`` with ``ref``'s strides (kernels index every tensor of a call with the same offsets)."""
    if a.stride() == ref.stride():
        return a
    return torch.empty_like(ref, dtype=a.dtype).copy_(a)


class _Launch(NamedTuple):
    """How a (Cg, HW) group is cut: S = C_SPLIT * HW_SPLIT programs, each owning a
    C_CHUNK x HW_CHUNK sub-rectangle walked in BLOCK_C x BLOCK_HW tiles. ``resident``: each program
    holds one BLOCK_C x BLOCK_HW tile (the chunk), the whole group where S = 1 (the resident kernels)."""
    c_chunk: int
    hw_chunk: int
    hw_split: int
    s: int
    block_c: int
    block_hw: int
    num_warps: int
    lane: bool
    resident: bool = False
    lane_bwd: bool = False  # the backward's reduction pass accumulates per lane (_LANE_BWD_CHANNELS_LAST)

    @property
    def chunks(self):
        return self.c_chunk, self.hw_chunk, self.hw_split, self.s

    @property
    def meta(self):
        lane = {} if self.resident else dict(LANE=self.lane)
        return dict(BLOCK_C=self.block_c, BLOCK_HW=self.block_hw, num_warps=self.num_warps, **lane)

    @property
    def meta_bwd(self):
        return {**self.meta, **({} if self.resident else dict(LANE=self.lane_bwd))}


def _tile_shape(Cg: int, HW: int, budget: int, channels_last: bool) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_HW) of at most ``budget`` elements: the contiguous axis takes the budget first,
    so that loads coalesce in either layout."""
    if channels_last:
        block_c = min(triton.next_power_of_2(Cg), budget)
        return block_c, min(triton.next_power_of_2(HW), max(1, budget // block_c))
    block_hw = min(triton.next_power_of_2(HW), budget)
    return min(triton.next_power_of_2(Cg), max(1, budget // block_hw)), block_hw


def _resident_warps(block_c: int, block_hw: int) -> int:
    """A resident program's warps: _ELEMS_PER_THREAD elements a thread (the "threads" knob)."""
    return max(1, min(32, block_c * block_hw // (32 * _ELEMS_PER_THREAD)))  # up to 1,024 threads, a program's most


def _launch_config(Cg: int, HW: int, rows: int, stride_c: int, stride_hw: int,
                   row_programs: Optional[int] = None) -> _Launch:
    """``row_programs``: the most programs of one row that can meet at a barrier (that surely run at
    once); None where they run in stages instead (the interpreter)."""
    m = Cg * HW
    channels_last = stride_c == 1 and stride_hw != 1
    block_c, block_hw = triton.next_power_of_2(Cg), triton.next_power_of_2(HW)
    if block_c * block_hw <= min(RESIDENT_MAX, _RESIDENT_LIMIT):
        return _Launch(Cg, HW, 1, 1, block_c, block_hw, num_warps=_resident_warps(block_c, block_hw), lane=False,
                       resident=True)
    if COOP_TILE:  # one resident tile a program, S of them a group, meeting at the row's barrier
        block_c, block_hw = _tile_shape(Cg, HW, COOP_TILE, channels_last)
        hw_split = triton.cdiv(HW, block_hw)
        s = triton.cdiv(Cg, block_c) * hw_split
        if row_programs is None or s <= row_programs:
            return _Launch(block_c, block_hw, hw_split, s, block_c, block_hw,
                           num_warps=_resident_warps(block_c, block_hw), lane=False, resident=True)
    if m <= SPLIT_THRESHOLD:
        per_prog = m
    elif ELEMS_PER_PROGRAM > 0:
        per_prog = ELEMS_PER_PROGRAM
    else:  # enough programs to fill the GPU at small batch, but not tiny ones
        per_prog = max(_MIN_ELEMS_PER_PROGRAM, triton.cdiv(m * rows, _TARGET_PROGRAMS))
    block_c, block_hw = _tile_shape(Cg, HW, min(_TILE, triton.next_power_of_2(per_prog)), channels_last)
    if per_prog >= m:
        c_chunk, hw_chunk = Cg, HW
    else:
        tiles = max(1, per_prog // (block_c * block_hw))
        n_htiles, n_ctiles = triton.cdiv(HW, block_hw), triton.cdiv(Cg, block_c)
        kh = min(tiles, n_htiles)
        kc = min(max(1, tiles // kh), n_ctiles)
        # the same number of programs, with the tiles spread evenly over them: 64 channels in chunks
        # of 30, 30 and 4 leave the last program nearly idle and the others on the critical path
        kh, kc = triton.cdiv(n_htiles, triton.cdiv(n_htiles, kh)), triton.cdiv(n_ctiles, triton.cdiv(n_ctiles, kc))
        c_chunk, hw_chunk = kc * block_c, kh * block_hw
    hw_split = triton.cdiv(HW, hw_chunk)
    return _Launch(c_chunk, hw_chunk, hw_split, triton.cdiv(Cg, c_chunk) * hw_split, block_c, block_hw,
                   num_warps=max(1, min(8, block_c * block_hw // (32 * _ELEMS_PER_THREAD))), lane=_LANE_ACCUMULATE,
                   lane_bwd=_LANE_ACCUMULATE or (_LANE_BWD_CHANNELS_LAST and channels_last))


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    """SMs of a CUDA device; 1 elsewhere (the interpreter), so that PERSISTENT counts programs there."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _grid(rows: int, s: int, device: torch.device) -> tuple[tuple[int, int], dict]:
    """((row programs, split programs), the kernels' PERSIST meta): a program per row, or with
    PERSISTENT that many row programs per SM, each looping over the rows its program id strides to."""
    if PERSISTENT > 0:
        return (min(rows, PERSISTENT * _multiprocessors(device)), s), dict(PERSIST=True)
    return (rows, s), dict(PERSIST=False)


def _programs_meet() -> bool:
    """Whether the resident programs of a row meet at a barrier within one launch: on a GPU, yes;
    Triton's interpreter runs programs one after another, so there a program would wait forever for
    the next, and the resident kernels run in two launches (STAGE 1, then 2) instead."""
    return not _interpreted()


def _row_programs(device: torch.device) -> Optional[int]:
    """The most programs of a row that may wait for each other (``_launch_config``): half a GPU's SMs,
    one program each, so that a row's programs run at once however large they are, while other work
    (NCCL's kernels under DDP) holds at most the other half; no limit where they run in stages."""
    return max(1, _multiprocessors(device) // 2) if _programs_meet() else None


def _geometry(x: torch.Tensor, num_groups: int):
    """(x in a walkable layout, the group's geometry for the kernels: (G, C, Cg, HW, stride_n,
    stride_c, stride_hw), launch config; the split kernels also take ``cfg.chunks``)."""
    x = _layout(x)
    n, c, h, w = x.shape
    cg, hw = c // num_groups, h * w
    stride_n, stride_c, stride_hw = x.stride(0), x.stride(1), (x.stride(3) if w > 1 else x.stride(2))
    cfg = _launch_config(cg, hw, n * num_groups, stride_c, stride_hw, _row_programs(x.device))
    return x, (num_groups, c, cg, hw, stride_n, stride_c, stride_hw), cfg


def _resident_stages(cfg: _Launch, rows: int, part_size: int, device: torch.device):
    """(the resident kernels' launches: their STAGE values, the partials buffer, the barrier's
    counters: a ticket, then one a row, zeroed at each call; unread by the staged launches, which
    take them all the same, so that they are typed as on a GPU). Where S = 1 (a constant on a GPU,
    which drops the code that reads them) no partials (None) and an int32 placeholder."""
    if cfg.s == 1:
        return (0,), None, torch.empty((1,), device=device, dtype=torch.int32)
    part = torch.empty((rows * cfg.s * part_size,), device=device, dtype=torch.float32)
    return (0,) if _programs_meet() else (1, 2), part, torch.zeros((1 + rows,), device=device, dtype=torch.int32)


def _gelu_mode(gelu: bool) -> int:
    """The kernels' GELU constexpr for a call: off, or on with the Phi the libdevice_erf knob says."""
    return (GELU_LIBDEVICE if _LIBDEVICE_ERF else GELU_ON).value if gelu else GELU_OFF.value


def _forward(x, weight, bias, num_groups, eps, residual, t, gelu):
    # The op is flexible_layout: under torch.compile any strides may arrive. The kernels walk x, y
    # (and the residual, made like x) through strides and index weight, bias and t densely.
    weight, bias, t = weight.contiguous(), bias.contiguous(), (t.contiguous() if t is not None else None)
    x, geom, cfg = _geometry(x, num_groups)
    gelu_mode = _gelu_mode(gelu)
    n, c = x.shape[:2]
    y = torch.empty_like(x)
    mean = torch.empty((n, num_groups), device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    if residual is not None:
        residual = _like(residual, x)
    rows = n * num_groups
    if cfg.resident:
        stages, part, sync = _resident_stages(cfg, rows, 3, x.device)
        for stage in stages:
            _gn_fwd_resident_kernel[(rows * cfg.s,)](
                x, residual if residual is not None else x, t if t is not None else mean, weight, bias, y, mean, rstd,
                mean if part is None else part, sync, *geom, cfg.hw_split, cfg.s, eps,
                -_LOG_10000 / c, STAGE=stage, HAS_RESIDUAL=residual is not None, HAS_T=t is not None, GELU=gelu_mode,
                BLOCK_S=triton.next_power_of_2(cfg.s), **cfg.meta)
        return y, mean, rstd
    part = torch.empty((rows * cfg.s * 3,), device=x.device, dtype=torch.float32)
    grid, persist = _grid(rows, cfg.s, x.device)
    if cfg.s > 1:
        _gn_stats_kernel[grid](x, part, rows, *geom, *cfg.chunks, **cfg.meta, **persist)
    _gn_fwd_kernel[grid](
        x, residual if residual is not None else x, t if t is not None else mean, weight, bias, y, mean, rstd,
        part, rows, *geom, *cfg.chunks, eps, -_LOG_10000 / c,
        SINGLE=cfg.s == 1, HAS_RESIDUAL=residual is not None, HAS_T=t is not None, GELU=gelu_mode,
        BLOCK_S=triton.next_power_of_2(cfg.s), **cfg.meta, **persist)
    return y, mean, rstd


def _backward(dy, x, weight, bias, residual, mean, rstd, num_groups, gelu):
    weight, bias, mean, rstd = weight.contiguous(), bias.contiguous(), mean.contiguous(), rstd.contiguous()
    x, geom, cfg = _geometry(x, num_groups)
    gelu_mode = _gelu_mode(gelu)
    n, c = x.shape[:2]
    dy = _like(dy, x)
    dx = torch.empty_like(x)
    # Every (row, channel) of the dw/db partials is written by exactly one program: no zero-fill.
    # One table for both, so that one reduction (one kernel) sums them; stored channel-major (the rows
    # of a channel contiguous, entry (row, c) at row + c * rows), so that the sum over rows is a
    # contiguous reduction per output. Over the strided axis (the table row-major) PyTorch's reduction
    # has few outputs to spread, each walking hundreds of rows: at commit 8323860, two such sums per
    # backward (dw and db apart, C outputs each), 52 a step, took 0.88 ms of an NHWC step and 0.51 ms
    # of an NCHW one in the H100 profile of 2026-11-27 (bench/results/...-profile-fast.json). One sum
    # of both since 0b94e89, channel-major since: neither profiled.
    pd = torch.empty((2, c, n * cfg.hw_split), device=x.device, dtype=torch.float32).transpose(1, 2)
    pdw, pdb = pd[0], pd[1]
    has_residual = residual is not None
    if has_residual:
        residual = _like(residual, x)
        dres = torch.empty_like(residual)
    else:
        residual = dres = x  # placeholders, never touched (HAS_RESIDUAL=False)
    rows = n * num_groups
    if cfg.resident:
        stages, part, sync = _resident_stages(cfg, rows, 2, x.device)
        for stage in stages:
            _gn_bwd_resident_kernel[(rows * cfg.s,)](
                dy, x, residual, dres, weight, bias, mean, rstd, pdw, pdb, pd.stride(2),
                mean if part is None else part, sync, dx, *geom, cfg.hw_split, cfg.s,
                STAGE=stage, HAS_RESIDUAL=has_residual, GELU=gelu_mode, BLOCK_S=triton.next_power_of_2(cfg.s),
                **cfg.meta)
    else:
        part = torch.empty((rows * cfg.s * 2,), device=x.device, dtype=torch.float32)
        args = (dy, x, residual, dres, weight, bias, mean, rstd, pdw, pdb, pd.stride(2), part)
        grid, persist = _grid(rows, cfg.s, x.device)
        if cfg.s > 1:
            _gn_bwd_reduce_kernel[grid](*args, rows, *geom, *cfg.chunks, HAS_RESIDUAL=has_residual, GELU=gelu_mode,
                                        **cfg.meta_bwd, **persist)
        _gn_bwd_dx_kernel[grid](*args, dx, rows, *geom, *cfg.chunks, SINGLE=cfg.s == 1, HAS_RESIDUAL=has_residual,
                                GELU=gelu_mode, BLOCK_S=triton.next_power_of_2(cfg.s), **cfg.meta_bwd, **persist)
    return dx, pd.sum(1), (dres if has_residual else x.new_empty(0))


# --------------------------------------------------------------------------------------------------
# torch.library registration
# --------------------------------------------------------------------------------------------------
@torch.library.custom_op("fastddpm::group_norm_gelu", mutates_args=(), tags=(torch.Tag.flexible_layout,))
def group_norm_gelu_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_groups: int,
                        eps: float, residual: Optional[torch.Tensor], t: Optional[torch.Tensor],
                        gelu: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mean, rstd); mean/rstd are fp32 of shape (N, num_groups)."""
    return _forward(x, weight, bias, num_groups, eps, residual, t, gelu)


@group_norm_gelu_fwd.register_fake
def _(x, weight, bias, num_groups, eps, residual, t, gelu):
    x = _layout(x)
    mean = x.new_empty((x.shape[0], num_groups), dtype=torch.float32)
    return torch.empty_like(x), mean, torch.empty_like(mean)


@torch.library.custom_op("fastddpm::group_norm_gelu_backward", mutates_args=(), tags=(torch.Tag.flexible_layout,))
def group_norm_gelu_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                        residual: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor,
                        num_groups: int, gelu: bool
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight_and_dbias, dresidual): the (2, C) fp32 rows dweight, dbias (one tensor: an op's
    outputs may not alias, and one reduction sums both); dresidual is empty when there is no residual."""
    return _backward(dy, x, weight, bias, residual, mean, rstd, num_groups, gelu)


@group_norm_gelu_bwd.register_fake
def _(dy, x, weight, bias, residual, mean, rstd, num_groups, gelu):
    x = _layout(x)
    dres = torch.empty_like(_like_fake(residual, x)) if residual is not None else x.new_empty(0)
    return torch.empty_like(x), weight.new_empty((2, weight.shape[0]), dtype=torch.float32), dres


def _like_fake(a, ref):
    return a if a.stride() == ref.stride() else torch.empty_like(ref, dtype=a.dtype)


def _setup_context(ctx, inputs, output):
    x, weight, bias, num_groups, _eps, residual, _t, gelu = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, residual, mean, rstd)
    ctx.num_groups, ctx.gelu, ctx.has_residual = num_groups, gelu, residual is not None


def _backward_rule(ctx, dy, _dmean, _drstd):
    x, weight, bias, residual, mean, rstd = ctx.saved_tensors
    dx, dwb, dres = group_norm_gelu_bwd(dy, x, weight, bias, residual, mean, rstd, ctx.num_groups, ctx.gelu)
    dw, db = dwb[0].to(weight.dtype), dwb[1].to(bias.dtype)
    return dx, dw, db, None, None, (dres if ctx.has_residual else None), None, None


group_norm_gelu_fwd.register_autograd(_backward_rule, setup_context=_setup_context)


def group_norm_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_groups: int,
                    eps: float = 1e-5, residual: Optional[torch.Tensor] = None,
                    t: Optional[torch.Tensor] = None, gelu: bool = True) -> torch.Tensor:
    """``GELU(residual + GroupNorm(x) * weight + bias) + time_encoding(t)[:, :, None, None]``.

    x: (N, C, H, W) fp32/fp16/bf16, NCHW or channels_last; weight, bias: (C,) in any float dtype
    (fp32 under autocast); residual: like x; t: (N,) integer steps (eq. 11 encoding computed
    in-kernel); gelu=False skips the GELU. Returns y in x's dtype and layout.
    """
    if x.dim() != 4 or x.shape[1] % num_groups:
        raise ValueError(f"expected (N, C, H, W) with C divisible by num_groups={num_groups}, got {tuple(x.shape)}")
    if t is not None:
        if t.numel() != x.shape[0]:
            raise ValueError(f"expected one time step per sample ({x.shape[0]}), got t of shape {tuple(t.shape)}")
        t = t.reshape(-1)
    return group_norm_gelu_fwd(x, weight, bias, num_groups, float(eps), residual, t, bool(gelu))[0]
