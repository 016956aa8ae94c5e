"""Every Triton kernel launch the project makes compiles natively for the GPUs it runs on (sm_90: the
H100 and H200), here on the CPU.

Triton's interpreter, which runs the kernel tests on a machine without a GPU, accepts code that its
compiler refuses (a global that is not a ``tl.constexpr``, a value whose type the compiler cannot
infer, ...); such a kernel passes every CPU test and fails on its first GPU call. So: run the Triton
paths under the interpreter (the U-Net forward and backward on both GroupNorm reduction styles and
both paths, single program and split, in fp32 and bf16, and with persistent row programs; groups of
one channel, whose extents of 1 a GPU launch makes constants, as here, on the single-program, resident
and split paths; the fused
reverse step, with and without clipping; its noise), record each distinct launch (kernel, argument
types, constexpr values), and compile each one in a fresh process, without the interpreter, through
Triton's own pipeline down to a cubin for sm_90 (Triton ships ptxas; no GPU is needed).
"""
import inspect
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernel tests compile natively already")

TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int64: "i64",
         torch.int32: "i32", torch.uint8: "u8", torch.bool: "i1"}

COMPILE = r"""
import importlib.util, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

launches = json.load(sys.stdin)
modules, failures = {}, []
for launch in launches:
    path = launch["file"]
    if path not in modules:
        spec = importlib.util.spec_from_file_location(f"native_{len(modules)}", path)
        modules[path] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(modules[path])
    kernel = getattr(modules[path], launch["kernel"])
    try:
        src = ASTSource(fn=kernel, signature=launch["signature"], constexprs=launch["constexprs"])
        out = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=launch["options"])
        assert out.asm.get("cubin"), "no cubin"
    except Exception as e:
        failures.append(f"{launch['kernel']} {launch['constexprs']}: {str(e).strip().splitlines()[-1][:300]}")
print(json.dumps({"compiled": len(launches) - len(failures), "failures": failures}))
"""


def _record(monkeypatch) -> list[dict]:
    """Run the Triton paths in the interpreter and return their distinct launches."""
    from triton.runtime.interpreter import InterpretedFunction

    from fastddpm.kernels import groupnorm_gelu as gng
    from fastddpm.kernels.reverse_step import reverse_step, reverse_step_noise
    from fastddpm.model import UNet

    seen = {}
    real_run = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        params = inspect.signature(self.fn).parameters
        options = {k: v for k, v in kwargs.items() if k not in params}  # launch options: num_warps, ...
        bound = inspect.signature(self.fn).bind(*args, **{k: v for k, v in kwargs.items() if k in params})
        bound.apply_defaults()
        signature, constexprs = {}, {}
        for name, value in bound.arguments.items():
            if "constexpr" in str(params[name].annotation) or value is None:
                signature[name], constexprs[name] = "constexpr", value
            elif isinstance(value, torch.Tensor):
                signature[name] = "*" + TYPES[value.dtype]
            elif isinstance(value, bool):
                signature[name] = "i1"
            elif isinstance(value, int) and value == 1:  # as Triton's launcher specialises it on a GPU
                signature[name], constexprs[name] = "constexpr", 1
            elif isinstance(value, int):
                signature[name] = "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
            elif isinstance(value, float):
                signature[name] = "fp32"
            else:
                raise TypeError(f"{self.fn.__name__}: argument {name} of type {type(value).__name__}")
        key = (self.fn.__name__, json.dumps(signature, sort_keys=True), json.dumps(constexprs, sort_keys=True),
               json.dumps(options, sort_keys=True))
        seen[key] = {"file": inspect.getsourcefile(self.fn), "kernel": self.fn.__name__, "signature": signature,
                     "constexprs": constexprs, "options": options}
        return real_run(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", run)
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
    tables = {k: torch.rand(10) for k in ("inv_sqrt_alpha", "eps_coef", "sigma")}
    for dtype in (torch.float32, torch.bfloat16):
        reverse_step(x.to(dtype), x.to(dtype), 5, 1, **tables)
    reverse_step(x, x, 5, 1, **tables, clip=1.0, out=torch.empty_like(x))
    reverse_step_noise(x.shape, 5, 1, offset=7)
    return list(seen.values())


def test_every_kernel_launch_compiles_for_sm90(monkeypatch):
    launches = _record(monkeypatch)
    kernels = {launch["kernel"] for launch in launches}
    assert {"_gn_fwd_kernel", "_gn_stats_kernel", "_gn_bwd_reduce_kernel", "_gn_bwd_dx_kernel",
            "_reverse_step_kernel", "_noise_kernel"} <= kernels, kernels
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", COMPILE], input=json.dumps(launches), cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not result["failures"], "\n".join(result["failures"])
    assert result["compiled"] == len(launches)
    assert any(launch["constexprs"].get("PERSIST") for launch in launches)
