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
launch of each code path (``_code_path``: launches that differ only in their tiles' sizes or warps are
one) in fresh processes, without the interpreter, through Triton's own pipeline down to a cubin for
sm_90 (Triton ships ptxas; no GPU is needed). The recorder and the compiler are ``bench.static_cost``'s,
which also reads the machine code.
"""
import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernel tests compile natively already")


def _run_every_path(monkeypatch):
    """Launch every Triton path (``recorded_launches`` records them)."""
    from fastddpm.kernels import groupnorm_gelu as gng
    from fastddpm.kernels.reverse_step import reverse_step, reverse_step_noise
    from fastddpm.model import UNet

    torch.manual_seed(0)
    model = UNet(base_channels=4, kernels="triton")  # 32x32 groups of 4 channels: the split path; the rest single
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([3, 17])
    for lane in (False, True):
        monkeypatch.setattr(gng, "_LANE_ACCUMULATE", lane)
        for dtype in (torch.float32, torch.bfloat16):
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                model(x, t).float().square().mean().backward()
        # groups of one channel, a constant 1 on a GPU: of one pixel too (one program, and resident),
        # and of 8,192 pixels (split over 8 programs)
        resident = gng.RESIDENT_MAX
        for shape, resident_max in (((2, 4, 1, 1), resident), ((2, 4, 1, 1), 16384), ((2, 4, 1, 8192), resident)):
            monkeypatch.setattr(gng, "RESIDENT_MAX", resident_max)
            one = torch.randn(*shape, requires_grad=True)
            gng.group_norm_gelu(one, torch.ones(4), torch.zeros(4), 4).sum().backward()
        monkeypatch.setattr(gng, "RESIDENT_MAX", resident)
    monkeypatch.setattr(gng, "PERSISTENT", 2)  # the kernels with their row loop (PERSIST)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x, t).float().square().mean().backward()
    monkeypatch.setattr(gng, "PERSISTENT", 0)
    with gng.launch_settings(libdevice_erf=1):  # the GELU from libdevice's erf: split and one-program groups
        for shape in ((2, 8, 32, 32), (2, 8, 8, 8)):
            g = torch.randn(*shape, dtype=torch.bfloat16, requires_grad=True)
            gng.group_norm_gelu(g, torch.ones(8), torch.zeros(8), 1, residual=torch.randn_like(g)).sum().backward()
    with gng.launch_settings(coop=1024):  # resident programs meeting at a barrier, 8 and 4 a group (staged
        nchw = torch.randn(2, 8, 32, 32, dtype=torch.bfloat16, requires_grad=True)  # here, recorded as one launch)
        nhwc = torch.randn(2, 16, 16, 16, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
        gng.group_norm_gelu(nchw, torch.ones(8), torch.zeros(8), 1, residual=torch.randn_like(nchw)).sum().backward()
        gng.group_norm_gelu(nhwc.requires_grad_(), torch.ones(16), torch.zeros(16), 1, t=torch.tensor([3, 17]),
                            gelu=False).sum().backward()
    tables = {k: torch.rand(10) for k in ("inv_sqrt_alpha", "eps_coef", "sigma")}
    for dtype in (torch.float32, torch.bfloat16):
        reverse_step(x.to(dtype), x.to(dtype), 5, 1, **tables)
    reverse_step(x, x, 5, 1, **tables, clip=1.0, out=torch.empty_like(x))
    reverse_step_noise(x.shape, 5, 1, offset=7)


def _code_path(launch: dict) -> str:
    """A launch's code path: its kernel, argument types, divisible-by-16 marks and constexprs, with a
    tile's extents read only as 1 or more (an extent of 1 changes the code; 8 against 16 only its
    sizes) and its warps only as whether the tile fills them; the resident path's launches all (a
    program's one tile is its whole group: registers at every size)."""
    import json

    if "resident" in launch["kernel"]:
        return json.dumps(launch, sort_keys=True, default=str)
    c = launch["constexprs"]
    blocks = {k: v == 1 for k, v in c.items() if k.startswith("BLOCK")}
    under_threads = c.get("BLOCK_C", 1) * c.get("BLOCK_HW", 1) < 32 * launch["options"].get("num_warps", 4)
    options = {k: v for k, v in launch["options"].items() if k != "num_warps"}
    return json.dumps([launch["kernel"], launch["signature"], launch["divisible"], {**c, **blocks}, options,
                       under_threads], sort_keys=True, default=str)


def test_every_kernel_launch_compiles_for_sm90(monkeypatch):
    from bench.static_cost import compile_launches, recorded_launches

    with recorded_launches() as launches:  # recorded, not run
        _run_every_path(monkeypatch)
    kernels = {launch["kernel"] for launch in launches}
    assert {"_gn_fwd_kernel", "_gn_stats_kernel", "_gn_bwd_reduce_kernel", "_gn_bwd_dx_kernel",
            "_reverse_step_kernel", "_noise_kernel"} <= kernels, kernels
    # one launch a code path (_code_path): 159 of the 253 distinct launches (2026-11-28), a third less to compile
    paths = list({_code_path(launch): launch for launch in launches}.values())
    failures = [r["error"] for r in compile_launches(paths) if "error" in r]
    assert not failures, "\n".join(failures)
    assert any(launch["constexprs"].get("PERSIST") for launch in launches)
    assert {launch["constexprs"].get("GELU") for launch in launches} >= {0, 1, 2}
    met = [launch for launch in launches if "resident" in launch["kernel"] and launch["signature"]["S"] == "i32"]
    assert {launch["kernel"] for launch in met} == {"_gn_fwd_resident_kernel", "_gn_bwd_resident_kernel"}
    assert {launch["constexprs"]["STAGE"] for launch in met} == {0}  # the barrier's code, not the stages'
