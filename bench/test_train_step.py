"""One training step: ``Trainer.train_step`` (forward, eq. 13 loss, backward, Adam, EMA) on a fixed
batch, per dtype. eager = torch kernels, no compile; compiled = torch kernels under torch.compile;
fast = Triton kernels + torch.compile; compiled-graphs and fast-graphs = the same under
``--compile-mode reduce-overhead`` (Inductor replays forward and backward as CUDA graphs: the H100
profile of 2026-11-27 found the compiled step waiting on the host half its time; CUDA only); the
``-nhwc`` paths train in channels_last (``--channels-last``: activations and weights), where cuDNN's
convolutions should need none of the NCHW<->NHWC transposes that took 3.0 of 13.3 ms in that profile
(with our kernels, fast-graphs-nhwc is the fastest path measured on an H100; under torch.compile's own
GroupNorm the NHWC step keeps its layout copies and is the slower).
Guard: the first step's loss and gradients against eager's (NCHW), from the same weights, t and noise
(Trainer seeds all of them from cfg.seed). FASTDDPM_BENCH_TRAIN_IMPLS picks the non-eager paths
(default: compiled, fast, compiled-graphs, fast-graphs); a Triton path may carry GroupNorm launch
settings, e.g. ``fast-graphs-nhwc@tile=8192+persistent=2`` (``bench.common.split_impl``), timed and
guarded like the path itself."""
import shutil
import tempfile
from typing import NamedTuple

import pytest
import torch

from bench import common as C


class Path(NamedTuple):
    kernels: str  # the GroupNorm+GELU path: torch or triton
    compile: bool
    mode: str  # torch.compile's mode
    channels_last: bool = False


PATHS = {"eager": Path("torch", False, "default"), "compiled": Path("torch", True, "default"),
         "fast": Path("triton", True, "default"), "compiled-graphs": Path("torch", True, "reduce-overhead"),
         "fast-graphs": Path("triton", True, "reduce-overhead"),
         "compiled-graphs-nhwc": Path("torch", True, "reduce-overhead", True),
         "fast-graphs-nhwc": Path("triton", True, "reduce-overhead", True)}
GRAPHED = tuple(i for i, path in PATHS.items() if path.mode == "reduce-overhead")
DEFAULT_IMPLS = ("compiled", "fast", "compiled-graphs", "fast-graphs")  # what fits gpu.sh's train cap
TRITON_PATHS = tuple(i for i, path in PATHS.items() if path.kernels == "triton")
# A path may carry GroupNorm launch settings, "fast-graphs-nhwc@tile=8192+persistent=2" (C.split_impl).
IMPLS = C.impls_from_env("FASTDDPM_BENCH_TRAIN_IMPLS", DEFAULT_IMPLS, list(PATHS)[1:], TRITON_PATHS)
# CUDA graphs exist only on CUDA: elsewhere the graphed paths are not cases at all (not skips)
CASES = C.grid(("eager",) + tuple(i for i in IMPLS if C.CUDA or C.split_impl(i)[0] not in GRAPHED),
               TRITON_PATHS)


def trainer(dtype, impl, channels_last=None, batch=None):
    """The path's Trainer; ``channels_last`` (bench.profile_step's layouts) overrides the path's own."""
    from fastddpm.config import TrainConfig
    from fastddpm.train import Trainer

    path = PATHS[C.split_impl(impl)[0]]  # its launch settings are the caller's (C.run) to put in force
    b = batch or C.S["train_batch"]
    cfg = TrainConfig(data="shapes", preset=C.S["preset"], dtype=dtype, batch_size=b, train_size=b, val_size=0,
                      n_samples=0, compile=path.compile, compile_mode=path.mode, kernels=path.kernels,
                      channels_last=path.channels_last if channels_last is None else channels_last)
    out = tempfile.mkdtemp(prefix="fastddpm-bench-")
    try:
        return Trainer(cfg, out, C.DEVICE, progress=False)
    finally:
        shutil.rmtree(out, ignore_errors=True)  # train_step writes nothing there


def fixed_batch(batch=None) -> torch.Tensor:
    """The one batch every timed step trains on (images in [-1, 1], seeded)."""
    b = batch or C.S["train_batch"]
    return (torch.rand(b, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(C.DEVICE)


def first_step(tr, x0, warm_up: bool = False):
    """(loss, all gradients) of one step; the scaler has unscaled the gradients by then. With
    ``warm_up``, Trainer.warm_up_compiled's passes on other t and noise come first (no optimizer step),
    so that the checked step of a CUDA-graph path is a replay, as in Trainer.check_compiled_step."""
    if warm_up:
        tr.warm_up_compiled(x0)
    loss = tr.train_step(x0).float()
    return loss, torch.cat([p.grad.detach().float().flatten() for p in tr.model.parameters()])


def build(dtype, impl, batch=None):
    """The case at the headline batch (sizes' train_batch) or, for the batch sweep, at ``batch``."""
    b, path = batch or C.S["train_batch"], C.split_impl(impl)[0]
    x0 = fixed_batch(b)
    tr = trainer(dtype, impl, batch=b)
    key = ("train", dtype, b)
    if impl == "eager":
        C.reference(key, lambda: first_step(tr, x0))
        check = None
    else:
        def check():
            ref_loss, ref_grads = C.reference(key, lambda: first_step(trainer(dtype, "eager", batch=b), x0))
            loss, grads = first_step(tr, x0, warm_up=path in GRAPHED)
            tol_loss, tol_grad = C.TOL[dtype]
            out = C.guard(f"loss vs eager ({dtype})", C.rel(loss, ref_loss), tol_loss)
            # fp16: the scaler's first scale overflows some gradients (a skipped step, in both paths)
            if torch.isfinite(ref_grads).all() and torch.isfinite(grads).all():
                out = {**C.guard(f"gradients vs eager ({dtype})", C.rel(grads, ref_grads), tol_grad), "loss": out}
            else:
                out["gradients"] = "not compared: non-finite at the grad scaler's first scale"
            return out
    return C.Case(
        "train_step", impl, dtype, fn=C.synced(lambda: tr.train_step(x0)), items=b, unit="images",
        flops=C.model_flops(tr.model.base_channels, True) * b, check=check, rounds=C.S["train_rounds"],
        warmup=C.S["warmup"],
        info=dict(batch=b, preset=C.S["preset"], params=sum(p.numel() for p in tr.model.parameters())),
        group_norm_kernels=path in TRITON_PATHS)


@pytest.mark.parametrize("params", CASES, ids=C.case_id)
def test_train_step(benchmark, params):
    C.run(benchmark, lambda: build(**params), impl=params["impl"])
