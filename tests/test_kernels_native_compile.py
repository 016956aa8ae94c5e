"""Every Triton kernel launch the project makes compiles natively for the GPUs it runs on (sm_90: the
H100 and H200), here on the CPU.

Triton's interpreter, which runs the kernel tests on a machine without a GPU, accepts code that its
compiler refuses (a global that is not a ``tl.constexpr``, a value whose type the compiler cannot
infer, ...); such a kernel passes every CPU test and fails on its first GPU call. So: launch every
Triton path through the interpreter's launcher (the U-Net forward and backward on both GroupNorm
reduction styles and both paths, single program and split, in fp32 and bf16, with persistent row
programs and with libdevice's erf for the GELU; the resident programs of a group meeting at a barrier,
which the interpreter runs in two stages and a GPU in one launch, compiled as the latter; groups of one
channel, whose extents of 1 a GPU launch makes constants, as here, on the single-program, resident
and split paths; the fused reverse step, with and without clipping; its noise), record each distinct
launch (kernel, argument types, constexpr values) as a GPU launch specialises it (integers equal to 1
made constants, pointers and integers divisible by 16 marked so) without running it (a launch depends
on shapes, dtypes, strides and settings, not on values; the kernel tests run them), and compile one
launch of each code path (``code_path``: launches that differ only in their tiles' sizes or warps are
one) in fresh processes, without the interpreter, through Triton's own pipeline down to a cubin for
sm_90 (Triton ships ptxas; no GPU is needed). The paths and ``code_path`` are ``bench.native_compile``'s;
the recorder and the compiler ``bench.static_cost``'s, which also reads the machine code.

This compiles with the venv's Triton (CI's); ``make gpu-triton-check`` compiles every launch, whole
U-Nets' too, with the GPU image's older Triton, whose passes can assert on code that this one accepts.
"""
import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernel tests compile natively already")


def test_every_kernel_launch_compiles_for_sm90(monkeypatch):
    from bench.native_compile import launch_every_path, one_per_code_path
    from bench.static_cost import compile_launches, recorded_launches

    with recorded_launches() as launches:  # recorded, not run
        launch_every_path(monkeypatch)
    kernels = {launch["kernel"] for launch in launches}
    assert {"_gn_fwd_kernel", "_gn_stats_kernel", "_gn_bwd_reduce_kernel", "_gn_bwd_dx_kernel",
            "_reverse_step_kernel", "_noise_kernel"} <= kernels, kernels
    # one launch a code path: 159 of the 253 distinct launches (2026-11-28), a third less to compile
    failures = [r["error"] for r in compile_launches(one_per_code_path(launches)) if "error" in r]
    assert not failures, "\n".join(failures)
    assert any(launch["constexprs"].get("PERSIST") for launch in launches)
    assert {launch["constexprs"].get("GELU") for launch in launches} >= {0, 1, 2}
    met = [launch for launch in launches if "resident" in launch["kernel"] and launch["signature"]["S"] == "i32"]
    assert {launch["kernel"] for launch in met} == {"_gn_fwd_resident_kernel", "_gn_bwd_resident_kernel"}
    assert {launch["constexprs"]["STAGE"] for launch in met} == {0}  # the barrier's code, not the stages'
