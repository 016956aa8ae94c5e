"""``python -m bench.native_compile``: does every Triton launch the project makes compile natively for sm_90
(the H100 and H200) under the Triton that is importable? Run on the CPU, before spending GPU time.

Why a tool beside tests/test_kernels_native_compile.py: that test compiles the launches with the venv's
Triton (CI's), while the GPU machine's image brings its own, older one, whose compiler passes differ. A
pass that asserts there and not here is invisible to every CPU test: Triton 3.6's
TritonGPUOptimizeThreadLocality asserted (``loopResult.hasOneUse()``, triton-lang/triton#11682, fixed
later) on the GroupNorm backward kernels on the H200, which CI's 3.8 compiles. ``make gpu-triton-check``
installs the image's Triton into an ignored folder and runs this module with it first on PYTHONPATH
(the compile processes inherit the environment, so they import it too).

What is compiled: every path the kernel tests force (``launch_every_path``), recorded through Triton's
interpreter as a GPU launch specialises it, without running it (``bench.static_cost.recorded_launches``),
one launch a code path (``code_path``); with ``--all`` every distinct launch, plus those of whole U-Nets
(``launch_unets``) and the paper's U-Net's GroupNorm launches configured as at the training batch, 256, under
the defaults and any ``--settings``. The faulty pass above depended on the tiles' sizes: on the kernels before the fix
(commit 56253b5), ``--all`` found 8 distinct errors (10 launches), one launch a code path 2 of them.

    python -m bench.native_compile                          # CI's selection, this Triton
    PYTHONPATH=.triton-gpu/3.6.0 python -m bench.native_compile --all   # what make gpu-triton-check runs
    ... --all --settings none,coop=4096+threads=32+resident=16384    # and the settings a call will time

Prints each distinct compile error on a line, then the counts and the Triton used; exit status 1 on any
error.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
from pathlib import Path

import torch


def launch_every_path(monkeypatch) -> None:
    """Launch every Triton path (``recorded_launches`` records them); the module knobs it sets go through
    ``monkeypatch`` (pytest's fixture, or a ``pytest.MonkeyPatch``), which the caller undoes."""
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


def launch_unets() -> None:
    """Launch whole U-Nets' forward and backward at batch 2 under the knobs' defaults: the tiny width (base
    channels 8) and the paper's (64), NCHW and channels_last, in fp32 and under bf16 and fp16 autocast.
    Their groups' sizes give tiles and warps that ``launch_every_path``'s small shapes do not."""
    from fastddpm.model import UNet

    x, t = torch.randn(2, 3, 32, 32), torch.tensor([17, 873])
    for base_channels in (8, 64):
        torch.manual_seed(0)
        model = UNet(base_channels=base_channels, kernels="triton")
        for layout in (torch.contiguous_format, torch.channels_last):
            model = model.to(memory_format=layout)
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                    model.zero_grad()
                    model(x.contiguous(memory_format=layout), t).float().square().mean().backward()


def code_path(launch: dict) -> str:
    """A launch's code path: its kernel, argument types, divisible-by-16 marks and constexprs, with a
    tile's extents read only as 1 or more (an extent of 1 changes the code; 8 against 16 only its
    sizes) and its warps only as whether the tile fills them; the resident path's launches all (a
    program's one tile is its whole group: registers at every size)."""
    if "resident" in launch["kernel"]:
        return json.dumps(launch, sort_keys=True, default=str)
    c = launch["constexprs"]
    blocks = {k: v == 1 for k, v in c.items() if k.startswith("BLOCK")}
    under_threads = c.get("BLOCK_C", 1) * c.get("BLOCK_HW", 1) < 32 * launch["options"].get("num_warps", 4)
    options = {k: v for k, v in launch["options"].items() if k != "num_warps"}
    return json.dumps([launch["kernel"], launch["signature"], launch["divisible"], {**c, **blocks}, options,
                       under_threads], sort_keys=True, default=str)


def one_per_code_path(launches: list[dict]) -> list[dict]:
    """One launch of each code path (the last recorded)."""
    return list({code_path(launch): launch for launch in launches}.values())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.native_compile", description=__doc__.split("\n\n")[0])
    p.add_argument("--all", action="store_true",
                   help="every distinct launch, not one a code path, and whole U-Nets' launches too")
    p.add_argument("--settings", default="none",
                   help="with --all, also the paper's U-Net's GroupNorm launches as at the training batch (256) "
                        "under these launch settings, comma-separated, each 'none' (the defaults) or knob=value "
                        "joined by '+' (bench.tune_groupnorm's knobs: what a GPU call is about to time)")
    args = p.parse_args(argv)
    if args.settings != "none" and not args.all:
        p.error(f"--settings {args.settings}: only with --all (the training batch's launches)")
    # The launches are recorded through the interpreter's launcher, which Triton selects when a kernel is
    # defined: set before fastddpm.kernels is imported, whatever the environment says (compile_launches
    # takes it out of the compile processes' environment).
    os.environ["TRITON_INTERPRET"] = "1"
    from fastddpm.kernels import groupnorm_gelu as gng

    try:
        settings = [{} if text == "none" else gng.parse_launch_settings(text) for text in args.settings.split(",")]
    except ValueError as e:
        p.error(f"--settings {args.settings}: {e}")
    import pytest
    import triton

    from bench.static_cost import _key, compile_launches, recorded_launches

    start = time.perf_counter()
    with recorded_launches() as launches:  # recorded, not run
        with pytest.MonkeyPatch.context() as monkeypatch:
            launch_every_path(monkeypatch)
        if args.all:  # after the knobs launch_every_path set are undone: the U-Nets take the defaults
            launch_unets()
    if args.all:  # launch configurations depend on the batch: the bench trains at 256
        from bench.static_cost import record_calls, unet_norm_calls

        calls = unet_norm_calls()
        for setting in settings:
            for layout in ("nchw", "nhwc"):
                launches += record_calls(calls, 256, layout, setting)
    recorded = time.perf_counter()
    distinct = list({_key(launch): launch for launch in launches}.values())
    selected = distinct if args.all else one_per_code_path(launches)
    errors = collections.Counter(r["error"] for r in compile_launches(selected) if "error" in r)
    for error, times in sorted(errors.items()):
        print(f"error: {error}" + (f" (x{times} launches)" if times > 1 else ""))
    where = Path(triton.__file__).resolve().parent.parent
    print(f"{len(distinct)} distinct launches recorded in {recorded - start:.0f} s; "
          f"{len(selected)} compiled for sm_90 in {time.perf_counter() - recorded:.0f} s "
          f"({'all' if args.all else 'one a code path'}) by Triton {triton.__version__} from {where}: "
          f"{sum(errors.values())} failed")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
