"""Fused Triton kernels for fastddpm (installed as ``fastddpm.kernels``); one file per fused op."""
