"""Fused Triton kernels for fastddpm (installed as ``fastddpm.kernels``); one file per fused op.

- ``fastddpm.kernels.groupnorm_gelu.group_norm_gelu``: GroupNorm (+ residual) + GELU
  (+ time encoding), forward and backward.
- ``fastddpm.kernels.reverse_step.reverse_step`` (and ``reverse_step_noise``): the fused DDPM
  reverse step (eq. 5) with in-kernel Philox noise.
- ``fastddpm.kernels.upsample_bilinear.upsample_bilinear2x``: the Up blocks' bilinear x2 upsampling,
  whose backward under torch.compile is a gather instead of an atomic scatter (plain PyTorch, no Triton).

Deliberately no re-exports: importing this package (which ``import fastddpm`` does) neither
imports Triton nor defines a kernel, so the package works without Triton, and ``TRITON_INTERPRET``
(read by Triton when a kernel is defined) can still be set afterwards. (A lazy re-export of
``reverse_step`` would also be shadowed by the submodule of the same name once it is imported.)
"""

import importlib.util as _ilu
import os as _os


def unavailable_reason(device) -> "str | None":
    """Why the Triton kernels cannot run on ``device``, or None when they can."""
    if _ilu.find_spec("triton") is None:
        return "Triton is not installed (pip install triton), or use the torch kernels"
    if str(device).startswith("cuda") or _os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return ("the Triton kernels need a CUDA GPU; on the CPU they run only in Triton's interpreter "
            "(set TRITON_INTERPRET=1: slow, for testing), or use the torch kernels")
